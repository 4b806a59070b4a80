"""The chunked strategy of ``linear_token_stats`` (nashkern/backends/linear_token_stats_chunked.py) against the
float64 reference, forward and every gradient, with each logits epilogue: ``torch``, ``triton``
(the interpreter without a GPU) and ``cuda`` (the library's host emulation on CPU tensors, or
the device). Chunks are tiny (``row_align`` 4, a budget of a few rows) so every case spans
several chunks, the last one partial.

bf16/fp16: the chunk's logits are rounded once to the model's dtype (as eager PyTorch's
``F.linear``), so the error budget is set by eager PyTorch in that dtype (``_native``): ours must
stay within a small multiple of its error against float64 on the same inputs.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels

from nashkern import ops  # noqa: E402
from nashkern.backends import linear_token_stats_chunked as chunked  # noqa: E402
from nashkern.backends.cuda import library as cuda_lib  # noqa: E402
from nashkern.backends.torch import token_stats as torch_token_stats  # noqa: E402
from nashkern.kernels.layout import Scalars  # noqa: E402
from nashkern.kernels.layout import (  # noqa: E402
    ENTROPY, KL, LOGPROBS, MIXTURE_LOGPROBS, NUM_LSE, NUM_STATS, REF_LOGPROBS,
)
from nashkern.memory import AllocationRecorder  # noqa: E402
from nashkern.naive import naive_token_stats  # noqa: E402
from nashkern.ops.token_stats import FAMILY as TOKEN_STATS_FAMILY  # noqa: E402
from nashkern.ops.linear_token_stats import resolve_strategy  # noqa: E402
from nashkern.ops.registry import Implementation  # noqa: E402
from nashkern.tuning import ChunkedLinear  # noqa: E402

from oracle import _max_err, assert_within  # noqa: E402
from test_cuda_backend import cuda_library  # noqa: E402,F401  (the fixture)
from test_kernels_linear_token_stats import (  # noqa: E402
    DEVICE, GRAD_NAMES, IGNORE, NEG_INF, _make_inputs, _needed_grads, _reference,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter padding lanes

ARG_NAMES = ("hidden", "weight", "targets", "bias", "ref_hidden", "ref_weight", "ref_bias")
ALIGN = 4


def _config(rows: int, itemsize_per_row: int) -> ChunkedLinear:
    """A budget of exactly ``rows`` rows of ``itemsize_per_row`` bytes (per vocabulary entry)
    in blocks of ``ALIGN`` rows."""
    return ChunkedLinear(max_chunk_bytes=rows * itemsize_per_row, row_align=ALIGN)


@pytest.fixture(params=["torch", "triton", "cuda"])
def epilogue(request):
    if request.param == "triton":
        pytest.importorskip("triton")
    if request.param == "cuda":
        request.getfixturevalue("cuda_library")
        if DEVICE == "cuda" and cuda_lib.unavailable_reason() is not None:
            pytest.skip(cuda_lib.unavailable_reason())
    return request.param


def _impl(epilogue, config):
    """The chunked strategy with ``epilogue``'s token_stats implementation (as the op's table
    declares it, nashkern/ops/linear_token_stats.py) and a test budget."""
    return chunked.ChunkedLinearTokenStats(TOKEN_STATS_FAMILY.implementation(epilogue), config)


def _run(impl, inputs, grad_stats, needs, **kw):
    """``kw``: the fields of :class:`Scalars`."""
    args, scalars = [inputs[k] for k in ARG_NAMES], Scalars(**kw)
    stats, lse = impl.linear_token_stats_forward(*args, scalars)
    assert stats.shape == (NUM_STATS, args[0].shape[0]) and stats.dtype == torch.float32
    assert lse.shape == (NUM_LSE, args[0].shape[0]) and lse.dtype == torch.float32
    grads = impl.linear_token_stats_backward(grad_stats, *args, stats, lse, scalars,
                                             needs_input_grad=needs)
    return stats, lse, dict(zip(GRAD_NAMES, grads))


def _native(inputs, grad_stats, *, coef, temperature, softcap, fields=None):
    """Eager PyTorch in the model dtype: ``F.linear`` in that dtype, then float32 statistics;
    (stats [5, N], grads) as in ``_reference``."""
    x = {k: None if inputs[k] is None else inputs[k].detach().clone().requires_grad_()
         for k in GRAD_NAMES}
    linear = torch.nn.functional.linear
    z = linear(x["hidden"], x["weight"], x["bias"]).float()
    r = None
    if x["ref_hidden"] is not None:
        r = linear(x["ref_hidden"], x["ref_weight"], x["ref_bias"]).float()
    out = naive_token_stats(z, inputs["targets"], r, coef=coef, temperature=temperature,
                            softcap=softcap, ignore_index=IGNORE)
    zeros = torch.zeros(z.shape[0], device=z.device)
    stats = torch.stack([zeros if f is None else f for f in out]).detach()
    loss = sum((f * grad_stats[k].float()).sum() for k, f in enumerate(out)
               if f is not None and (fields is None or k in fields))
    leaves = [v for v in x.values() if v is not None]
    grads = iter(torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True))
    return stats, {k: None if v is None else next(grads) for k, v in x.items()}


def _close(name, ours, ref, nat, out_dtype, atol_scale):
    """``oracle.assert_within`` of the fused kernel's tests, plus 4x eager-in-the-model-dtype's error
    against float64 (``nat``, bf16/fp16) in the absolute tolerance."""
    if nat is not None:
        ref64 = ref.detach().double().cpu()
        finite = torch.isfinite(ref64)
        scale = ref64[finite].abs().max().item() if finite.any() else 0.0
        atol_scale += 4.0 * _max_err(nat.detach().cpu(), ref64) / max(scale, 1e-30)
    assert_within(name, ours, ref, out_dtype, atol_scale=atol_scale, rtol=0.0)


def _check(impl, inputs, *, coef, temperature=1.0, softcap=None, rows=None, grad_stats=None,
           fields=None, needs=(True,) * 6):
    """Forward + backward of ``impl`` vs float64 (on ``rows`` only if given); returns ours."""
    n = inputs["hidden"].shape[0]
    if grad_stats is None:
        grad_stats = torch.randn(NUM_STATS, n, generator=torch.Generator().manual_seed(1))
        if fields is not None:
            grad_stats[[k for k in range(NUM_STATS) if k not in fields]] = 0.0
    grad_stats = grad_stats.to(DEVICE)
    kw = dict(coef=coef, temperature=temperature, softcap=softcap)
    stats, lse, grads = _run(impl, inputs, grad_stats, needs, ignore_index=IGNORE, **kw)
    ref_stats, ref_lse, ref_grads = _reference(inputs, grad_stats, fields=fields, **kw)
    low = any(inputs[k] is not None and inputs[k].dtype != torch.float32
              for k in ("hidden", "ref_hidden"))
    nat_stats = nat_grads = None
    if low:
        nat_stats, nat_grads = _native(inputs, grad_stats, fields=fields, **kw)
    sel = slice(None) if rows is None else rows

    def part(x, k):
        return None if x is None else x[k][sel]

    for k in range(NUM_STATS):
        _close(f"stats[{k}]", stats[k][sel], ref_stats[k][sel], part(nat_stats, k),
               torch.float32, 1e-5)
    # The log-sum-exps are backward state: only those of rows with a target (the mixture's
    # only with targets) are needed and defined. bf16/fp16: checked through the gradients.
    t = inputs["targets"]
    live = torch.ones(n, dtype=torch.bool) if t is None else (t != IGNORE).cpu()
    live = live & torch.zeros(n, dtype=torch.bool).index_fill_(0, torch.arange(n)[sel], True)
    for k in range(0 if low else NUM_LSE if t is not None else NUM_LSE - 1):
        _close(f"lse[{k}]", lse[k][live], ref_lse[k][live], None, torch.float32, 1e-6)
    for name, x, g in _needed_grads(inputs, grads, needs):
        ref, nat = ref_grads[name], None if nat_grads is None else nat_grads[name]
        if name in ("hidden", "ref_hidden"):
            g, ref = g[sel], ref[sel]
            nat = None if nat is None else nat[sel]
        _close(f"d {name}", g, ref, nat, x.dtype, 2e-6)
    return stats, grads


CASES = [
    # id, (N, V, D, Dr), dtype, ref dtype, input options, op kwargs, fields with a gradient
    ("logprobs-fp32-N37", (37, 131, 24, 0), torch.float32, None,
     dict(ignored_rows=[2, 36]), dict(coef=None), [LOGPROBS]),
    ("entropy-bf16-softcap-N21", (21, 67, 24, 0), torch.bfloat16, None,
     dict(masked_cols=[3]), dict(coef=None, temperature=0.7, softcap=4.0), [LOGPROBS, ENTROPY]),
    ("reference-fp32-masked-N19", (19, 257, 40, 24), torch.float32, torch.float32,
     dict(masked_cols=[0, 100, 256], ignored_rows=[3], ref_bias=True), dict(coef=None),
     [LOGPROBS, ENTROPY, REF_LOGPROBS, KL]),
    ("mixture-bf16-fp16-N13", (13, 131, 24, 40), torch.bfloat16, torch.float16,
     dict(bias=False, ref_bias=True, ignored_rows=[12]), dict(coef=0.3, softcap=5.0), None),
    ("mixture-fp32-coef1-N9", (9, 67, 24, 24), torch.float32, torch.float32,
     dict(ref_bias=True), dict(coef=1.0, temperature=1.3), None),
    ("no-targets-bf16-N6", (6, 67, 24, 24), torch.bfloat16, torch.bfloat16,
     dict(targets=False), dict(coef=0.3), None),
]


@pytest.mark.parametrize("shape,dtype,ref_dtype,opts,kw,fields", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_matches_reference(epilogue, shape, dtype, ref_dtype, opts, kw, fields):
    inputs = _make_inputs(*shape, dtype, ref_dtype, **opts)
    itemsize = dtype.itemsize + (ref_dtype.itemsize if ref_dtype is not None else 0)
    impl = _impl(epilogue, _config(8, shape[1] * itemsize))  # C = 8: N splits unevenly
    stats, grads = _check(impl, inputs, fields=fields, **kw)
    t = inputs["targets"]
    for n in [] if t is None else (t == IGNORE).nonzero().flatten().tolist():
        assert bool((stats[:, n] == 0).all())  # exactly zero, not merely close
        assert bool((grads["hidden"][n] == 0).all())


@pytest.mark.parametrize("N", [0, 1, 3])
def test_fewer_rows_than_a_chunk(epilogue, N):
    """N < C (one partial chunk, a buffer of N rows), N = 1 and N = 0 (empty statistics, zero
    weight gradients)."""
    inputs = _make_inputs(N, 37, 16, 24, torch.float32, torch.float32, ref_bias=True)
    impl = _impl(epilogue, ChunkedLinear(row_align=ALIGN))
    if N:
        _check(impl, inputs, coef=0.3, softcap=3.0)
        return
    grad_stats = torch.zeros(NUM_STATS, 0, device=DEVICE)
    stats, lse, grads = _run(impl, inputs, grad_stats, (True,) * 6, coef=0.3, temperature=1.0,
                             softcap=None, ignore_index=IGNORE)
    assert stats.shape == (NUM_STATS, 0) and lse.shape == (NUM_LSE, 0)
    for name in GRAD_NAMES:
        assert grads[name].shape == inputs[name].shape and not grads[name].any(), name


def test_nan_row_stays_in_its_row(epilogue):
    inputs = _make_inputs(20, 37, 24, 40, torch.float32, torch.float32, ignored_rows=[17])
    inputs["hidden"][4, 3] = float("nan")
    inputs["hidden"][17, 0] = float("nan")  # in an ignored row: zero stats and gradient
    needs = (True, False, False, True, False, False)  # NaN rows poison d weight, as in PyTorch
    others = [n for n in range(20) if n not in (4, 17)]
    impl = _impl(epilogue, _config(8, 37 * 8))
    stats, grads = _check(impl, inputs, coef=0.3, softcap=4.0, rows=others, needs=needs)
    assert bool(stats[[LOGPROBS, ENTROPY, KL, MIXTURE_LOGPROBS], 4].isnan().all())
    assert bool(stats[REF_LOGPROBS, 4].isfinite())
    assert bool(grads["hidden"][4].isnan().all())
    assert bool((stats[:, 17] == 0).all()) and bool((grads["hidden"][17] == 0).all())


def test_infinite_kl_keeps_other_grads_finite(epilogue):
    inputs = _make_inputs(9, 37, 24, 24, torch.float32, torch.float32, ref_bias=True)
    inputs["ref_bias"][5] = NEG_INF
    fields = [LOGPROBS, ENTROPY, REF_LOGPROBS, MIXTURE_LOGPROBS]
    stats, grads = _check(_impl(epilogue, _config(4, 37 * 8)), inputs, coef=0.3, fields=fields)
    assert bool((stats[KL] == float("inf")).all())
    assert all(bool(g.isfinite().all()) for g in grads.values())


def _spy_epilogue(ref_seen):
    """The torch epilogue, recording in ``ref_seen`` whether each backward call was given
    reference logits."""
    def backward(grad_stats, logits, targets, ref_logits, *args, **kw):
        ref_seen.append(ref_logits is not None)
        return torch_token_stats.token_stats_backward(grad_stats, logits, targets, ref_logits, *args,
                                               **kw)
    return Implementation(torch_token_stats.token_stats_forward, backward)


@pytest.mark.parametrize("coef,fields,needs_ref", [
    (0.0, [LOGPROBS, ENTROPY, REF_LOGPROBS, MIXTURE_LOGPROBS], False),  # coef 0: pi == p
    (0.3, [LOGPROBS, REF_LOGPROBS], False),  # frozen reference, no KL / mixture gradient
    (0.3, [LOGPROBS, KL], True),
])
def test_frozen_reference_is_not_recomputed(coef, fields, needs_ref):
    inputs = _make_inputs(10, 37, 16, 24, torch.float32, torch.float32, ref_bias=True)
    ref_seen = []
    impl = chunked.ChunkedLinearTokenStats(_spy_epilogue(ref_seen), _config(4, 37 * 8))
    _check(impl, inputs, coef=coef, fields=fields, needs=(True, True, True, False, False, False))
    # Vocabulary chunks: 12 columns of both [10, Cv] buffers fit in the budget, or 28 of the
    # policy's alone: 4 or 2 chunks of the 37 columns.
    assert ref_seen == [needs_ref] * (4 if needs_ref else 2)


def test_chunk_rows_respects_the_budget():
    per_row = 1000 * (2 + 4)
    assert chunked.chunk_rows(5000, 1000, [2, 4], 300 * per_row + 5, 128) == 256
    assert chunked.chunk_rows(5000, 1000, [2, 4], 10, 128) == 128  # at least one block
    assert chunked.chunk_rows(100, 1000, [2, 4], 300 * per_row, 128) == 100  # N < C
    assert chunked.chunk_rows(0, 1000, [2], 10, 128) == 1


@pytest.mark.parametrize("epi", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_buffers_respect_the_budget(epi, dtype):
    """Forward and backward allocate no [N, V] tensor; apart from the [V, D] weight gradients and
    the [N, D] hidden gradients (their fp32 accumulator, the bf16 per-chunk product), the
    largest allocation is one [C, V] (forward) or [N, Cv] (backward) buffer, and the buffers
    (plus the [N, D] product for bf16) fit in max_chunk_bytes."""
    if epi == "triton":
        pytest.importorskip("triton")
    N, V, D = 40, 301, 12
    inputs = _make_inputs(N, V, D, D, dtype, dtype, ref_bias=True)
    e = dtype.itemsize
    budget = 8 * V * 2 * e + 100
    slice_rows = min(N, budget // 4 // (D * e))  # d_hidden's bf16 product, in row slices
    temp = 0 if dtype == torch.float32 else slice_rows * D * e
    C = chunked.chunk_rows(N, V, [e, e], budget, ALIGN)
    Cv = chunked.chunk_rows(V, N, [e, e], budget - temp, ALIGN)
    assert C == 8 and Cv < V and V % Cv  # several chunks each way, the last partial
    assert C * V * 2 * e <= budget and N * Cv * 2 * e + temp <= budget
    impl = _impl(epi, ChunkedLinear(max_chunk_bytes=budget, row_align=ALIGN))
    grad_stats = torch.randn(NUM_STATS, N).to(DEVICE)
    with AllocationRecorder() as rec:
        _run(impl, inputs, grad_stats, (True,) * 6, coef=0.3, temperature=1.0, softcap=None,
             ignore_index=IGNORE)
    # aten.set_: the Triton interpreter's byte copies of kernel arguments (not on a GPU).
    sizes = [s for s, op in rec.sizes if not op.startswith("aten.set_")]
    assert max(sizes) < N * V // 2
    others = [s for s in sizes if s not in (V * D, N * D, slice_rows * D)]
    assert max(others) == max(C * V, N * Cv), rec.largest()
    assert C * V in sizes and N * Cv in sizes


def test_strategy_argument_through_ops():
    """ops.linear_token_stats(strategy=...) reaches the chunked and the fused implementations
    with the same results; an unknown strategy or one a backend lacks is a clear error."""
    inputs = _make_inputs(9, 37, 16, 16, torch.float32, torch.float32, ref_bias=True)
    x = {k: None if inputs[k] is None else inputs[k].clone().requires_grad_()
         for k in GRAD_NAMES}
    kw = dict(bias=x["bias"], ref_hidden=x["ref_hidden"], ref_weight=x["ref_weight"],
              ref_bias=x["ref_bias"], coef=0.3, backend="torch")
    results = []
    for strategy in ("chunked", "fused", "auto"):
        s = ops.linear_token_stats(x["hidden"], x["weight"], inputs["targets"], strategy=strategy,
                                   **kw)
        g = torch.autograd.grad(s.logprobs.sum() + s.kl.sum(), [x["hidden"], x["weight"]])
        results.append((s.logprobs.detach(), s.kl.detach(), *g))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="strategy must be one of"):
        ops.linear_token_stats(x["hidden"], x["weight"], inputs["targets"], strategy="tiled")


def test_resolve_strategy():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_strategy("auto", "torch", cpu) == "fused"
    assert resolve_strategy("auto", "triton", gpu) == "chunked"
    assert resolve_strategy("auto", "cuda", gpu) == "chunked"
    assert resolve_strategy("chunked", "torch", cpu) == "chunked"
    with pytest.raises(ValueError, match="backend='cuda' implements linear_token_stats with "
                                         "strategy='chunked' only"):
        resolve_strategy("fused", "cuda", gpu)


def test_auto_follows_the_cost_model(monkeypatch):
    """"auto" is the cheaper strategy of ``predicted_seconds`` for the shape: constants that make
    the CPU's chunked epilogue cheaper flip the CPU's choice; on a GPU the roofline fractions
    decide (the chunked GEMMs)."""
    import dataclasses
    from nashkern import tuning
    from nashkern.ops.linear_token_stats import predicted_seconds

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    shape = (1024, 128, 151936)  # N, D, V (the choice takes D, V: every term is linear in N)
    assert predicted_seconds("fused", "cpu", *shape) < predicted_seconds("chunked", "cpu", *shape)
    assert resolve_strategy("auto", "torch", cpu, *shape[1:], 2) == "fused"
    monkeypatch.setattr(tuning, "LINEAR_STRATEGY_COSTS", dataclasses.replace(
        tuning.LINEAR_STRATEGY_COSTS, cpu_chunked_ns_per_logit=1.0))
    assert resolve_strategy("auto", "torch", cpu, *shape[1:], 2) == "chunked"
    monkeypatch.setattr(tuning, "LINEAR_STRATEGY_COSTS", dataclasses.replace(
        tuning.LINEAR_STRATEGY_COSTS, gpu_chunked_fraction=0.1))
    assert resolve_strategy("auto", "triton", gpu, *shape[1:]) == "fused"
