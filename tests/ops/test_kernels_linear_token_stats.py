"""Direct tests of the fused ``hidden @ weight.T`` kernels (kernels/linear_token_stats.py and
kernels/linear_token_stats_backward.py).

Forward statistics, the saved log-sum-exps and every gradient (hidden, weight, bias and the
reference's three, for random upstream grads of all five fields) are compared with the float64
reference evaluated on the *same* (possibly bf16/fp16-rounded) inputs, so the tolerances only
absorb the kernels' fp32 arithmetic and, for bf16/fp16, the rounding of the logit gradients and of
the returned gradients to the input dtype. Without a GPU the kernels run in the Triton
interpreter: shapes are small, tiles are small (``CFG``) so that every shape spans several
vocabulary tiles, row blocks and hidden-size chunks, and each case covers several features.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels

pytest.importorskip("triton")

from nashkern.kernels import linear_token_stats as lts  # noqa: E402
from nashkern.kernels.linear_token_stats_backward import linear_token_stats_backward  # noqa: E402
from nashkern.kernels.layout import Scalars  # noqa: E402
from nashkern.naive import mix_logits, naive_linear_token_stats, softcap_logits  # noqa: E402
from nashkern.tuning import LinearTokenStatsTriton  # noqa: E402
from nashkern.types import (  # noqa: E402
    ENTROPY, KL, LOGPROBS, MIXTURE_LOGPROBS, NUM_LSE, NUM_STATS, REF_LOGPROBS,
)
from oracle import assert_within  # noqa: E402

# The interpreter evaluates masked-out lanes too (e.g. log(0) in padding rows); those values are
# discarded by tl.where / masked stores, so numpy's floating-point warnings are noise here.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100
NEG_INF = float("-inf")
#: Smallest legal tiles; 3 programs per SM makes the interpreter (one "SM") split the vocabulary
#: of a single row block in 3 (a GPU splits it across its SMs).
#: The precise mode (bf16/fp16 logit gradients fed as hi + lo: two tl.dot per product).
#: Backward groups of 2 row blocks: N=70 makes 5 blocks, i.e. groups of 2, 2 and a partial 1.
CFG = LinearTokenStatsTriton(BLOCK_N=16, BLOCK_V_FWD=32, BLOCK_V_BWD=16, BLOCK_D=16,
                             GROUP_N_BWD=2, num_warps=4, num_stages=2, programs_per_sm=3)
GRAD_NAMES = ("hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias")


def _make_inputs(N, V, D, Dr, dtype, ref_dtype=None, *, bias=True, ref_bias=False, scale=2.0,
                 masked_cols=(), ignored_rows=(), targets=True, seed=0):
    """Policy (and, with ``ref_dtype``, reference) hidden states, heads and biases whose logits
    have standard deviation about ``scale``; ``masked_cols`` get a -inf policy bias (and a -inf
    reference bias with ``ref_bias``); targets avoid them, ``ignored_rows`` are ``IGNORE``."""
    gen = torch.Generator().manual_seed(seed)

    def model(d, dt, with_bias):
        h = torch.randn(N, d, generator=gen, dtype=torch.float64)
        w = torch.randn(V, d, generator=gen, dtype=torch.float64) * (scale / d ** 0.5)
        b = None
        if with_bias:
            b = torch.randn(V, generator=gen, dtype=torch.float64)
            b[list(masked_cols)] = NEG_INF
        return [None if x is None else x.to(dt).to(DEVICE) for x in (h, w, b)]

    inputs = dict(zip(("hidden", "weight", "bias"), model(D, dtype, bias)))
    ref = model(Dr, ref_dtype, ref_bias) if ref_dtype is not None else (None, None, None)
    inputs.update(zip(("ref_hidden", "ref_weight", "ref_bias"), ref))
    t = None
    if targets:
        valid = [c for c in range(V) if c not in masked_cols]
        t = torch.tensor(valid)[torch.randint(len(valid), (N,), generator=gen)]
        t[list(ignored_rows)] = IGNORE
        t = t.to(DEVICE)
    inputs["targets"] = t
    return inputs


def _reference(inputs, grad_stats, *, coef, temperature, softcap, fields=None):
    """float64 stats ``[5, N]`` (absent fields 0), log-sum-exps ``[3, N]`` and the gradients of
    ``sum_k grad_stats[k] * stats[k]`` over the present fields (or only ``fields``)."""
    x = {k: None if inputs[k] is None else inputs[k].detach().double().requires_grad_()
         for k in GRAD_NAMES}
    kw = dict(coef=coef, temperature=temperature, softcap=softcap)
    out = naive_linear_token_stats(x["hidden"], x["weight"], inputs["targets"], bias=x["bias"],
                                   ref_hidden=x["ref_hidden"], ref_weight=x["ref_weight"],
                                   ref_bias=x["ref_bias"], ignore_index=IGNORE, **kw)
    n = x["hidden"].shape[0]
    zeros = torch.zeros(n, dtype=torch.float64, device=DEVICE)
    stats = torch.stack([zeros if f is None else f for f in out]).detach()

    def scaled(h, w, b):
        return softcap_logits(torch.nn.functional.linear(h, w, b), softcap) / temperature

    with torch.no_grad():
        a = scaled(x["hidden"], x["weight"], x["bias"])
        lse = [a.logsumexp(-1), zeros, zeros]
        if x["ref_hidden"] is not None:
            b = scaled(x["ref_hidden"], x["ref_weight"], x["ref_bias"])
            lse[1] = b.logsumexp(-1)
            if coef is not None and inputs["targets"] is not None:
                lse[2] = mix_logits(a, b, coef).logsumexp(-1)
    loss = sum((f * grad_stats[k].double()).sum() for k, f in enumerate(out)
               if f is not None and (fields is None or k in fields))
    leaves = [v for v in x.values() if v is not None]
    grads = iter(torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True))
    return stats, torch.stack(lse), {k: None if v is None else next(grads) for k, v in x.items()}


def _needed_grads(inputs, grads, needs):
    """``(name, input, gradient)`` for each needed gradient, after checking that unneeded ones
    are None and needed ones have their input's shape and dtype."""
    for name, need in zip(GRAD_NAMES, needs):
        x, g = inputs[name], grads[name]
        if not need or x is None:
            assert g is None, name
            continue
        assert g.shape == x.shape and g.dtype == x.dtype, name
        yield name, x, g


def _check(inputs, *, coef, temperature=1.0, softcap=None, rows=None, grad_stats=None,
           fields=None, needs=(True,) * 6, config=CFG, split_grad_operand=True):
    """Forward + backward vs the reference (on ``rows`` only if given); returns ours."""
    n = inputs["hidden"].shape[0]
    if grad_stats is None:
        grad_stats = torch.randn(NUM_STATS, n, generator=torch.Generator().manual_seed(1))
    grad_stats = grad_stats.to(DEVICE)
    kw = dict(config=config)
    args = [inputs[k] for k in ("hidden", "weight", "targets", "bias", "ref_hidden",
                                "ref_weight", "ref_bias")] + [Scalars(coef, temperature, softcap,
                                                                      IGNORE)]
    stats, lse = lts.linear_token_stats_forward(*args, **kw)
    assert stats.shape == (NUM_STATS, n) and stats.dtype == torch.float32
    assert lse.shape == (NUM_LSE, n) and lse.dtype == torch.float32
    grads = linear_token_stats_backward(grad_stats, *args[:-1], stats, lse, args[-1], **kw,
                                        needs_input_grad=needs,
                                        split_grad_operand=split_grad_operand)
    ref_stats, ref_lse, ref_grads = _reference(inputs, grad_stats, coef=coef,
                                               temperature=temperature, softcap=softcap,
                                               fields=fields)
    sel = slice(None) if rows is None else rows
    # Statistics: absolute error scaled by each field's magnitude.
    for k in range(NUM_STATS):
        assert_within(f"stats[{k}]", stats[k][sel], ref_stats[k][sel], atol_scale=1e-5, rtol=0.0)
    for k in range(NUM_LSE):
        assert_within(f"lse[{k}]", lse[k][sel], ref_lse[k][sel], atol_scale=1e-6, rtol=0.0)
    ours = dict(zip(GRAD_NAMES, grads))
    for name, x, g in _needed_grads(inputs, ours, needs):
        # bf16/fp16 logit gradients enter the tensor cores as hi + lo in the input dtype (about
        # fp32 accuracy), or rounded once (an error of eps(dtype) x the largest entry).
        atol = 2e-6 if x.dtype == torch.float32 else (
            2e-5 if split_grad_operand else torch.finfo(x.dtype).eps)
        ref = ref_grads[name]
        if name in ("hidden", "ref_hidden"):
            g, ref = g[sel], ref[sel]
        assert_within(f"d {name}", g, ref, x.dtype, atol_scale=atol)
    return stats, ours


CASES = [
    # id, (N, V, D, Dr), dtype, ref dtype, input options, op kwargs
    ("fp32-N70-V257-masked-softcap", (70, 257, 40, 24), torch.float32, torch.float32,
     dict(masked_cols=[0, 100, 256], ignored_rows=[3, 50]),
     dict(coef=0.3, temperature=0.7, softcap=5.0)),
    ("bf16-fp16-N3-V1031-split-coef1", (3, 1031, 24, 40), torch.bfloat16, torch.float16,
     dict(bias=False, ref_bias=True, ignored_rows=[1]), dict(coef=1.0)),
    ("V1", (3, 1, 40, 24), torch.float32, torch.float32, dict(ref_bias=True, ignored_rows=[2]),
     dict(coef=0.3, softcap=2.0)),
    ("fp16-bf16-N1-V37-coef0", (1, 37, 24, 24), torch.float16, torch.bfloat16,
     dict(masked_cols=[7], ref_bias=True), dict(coef=0.0, temperature=1.3, softcap=3.0)),
    ("no-ref", (70, 37, 40, 0), torch.float32, None, dict(ignored_rows=[0, 69]),
     dict(coef=None, softcap=3.0)),
    ("no-targets-unsplit", (3, 257, 24, 40), torch.bfloat16, torch.float32, dict(targets=False),
     dict(coef=0.3, temperature=0.8, split_grad_operand=False)),  # the default mode
    ("no-coef-large-logits", (20, 257, 40, 40), torch.bfloat16, torch.bfloat16,
     dict(scale=30.0, ref_bias=True), dict(coef=None, temperature=1.1)),
]


@pytest.mark.parametrize("shape,dtype,ref_dtype,opts,kw", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_matches_reference(shape, dtype, ref_dtype, opts, kw):
    inputs = _make_inputs(*shape, dtype, ref_dtype, **opts)
    stats, grads = _check(inputs, **kw)
    t = inputs["targets"]
    for n in [] if t is None else (t == IGNORE).nonzero().flatten().tolist():
        # Exactly zero, not merely close.
        assert bool((stats[:, n] == 0).all())
        assert bool((grads["hidden"][n] == 0).all())
        assert grads["ref_hidden"] is None or bool((grads["ref_hidden"][n] == 0).all())


def test_nan_row_stays_in_its_row():
    inputs = _make_inputs(20, 37, 24, 40, torch.float32, torch.float32, ignored_rows=[17])
    inputs["hidden"][4, 3] = float("nan")
    inputs["hidden"][17, 0] = float("nan")  # in an ignored row: zero stats and gradient
    # The NaN rows poison d weight / d bias (as in PyTorch): check the per-row gradients only.
    needs = (True, False, False, True, False, False)
    others = [n for n in range(20) if n not in (4, 17)]
    stats, grads = _check(inputs, coef=0.3, softcap=4.0, rows=others, needs=needs)
    assert bool(stats[[LOGPROBS, ENTROPY, KL, MIXTURE_LOGPROBS], 4].isnan().all())
    assert bool(stats[REF_LOGPROBS, 4].isfinite())  # from the reference model only
    assert bool(grads["hidden"][4].isnan().all())
    assert bool((stats[:, 17] == 0).all())
    assert bool((grads["hidden"][17] == 0).all()) and bool((grads["ref_hidden"][17] == 0).all())


def test_infinite_kl_keeps_other_grads_finite():
    """KL = inf (the reference masks a column the policy does not); with a zero KL upstream grad
    every gradient is finite (the KL terms are selected away, not multiplied by 0)."""
    inputs = _make_inputs(5, 37, 24, 24, torch.float32, torch.float32, ref_bias=True)
    inputs["ref_bias"][5] = NEG_INF
    grad_stats = torch.randn(NUM_STATS, 5, generator=torch.Generator().manual_seed(2))
    grad_stats[KL] = 0.0
    fields = [LOGPROBS, ENTROPY, REF_LOGPROBS, MIXTURE_LOGPROBS]
    stats, grads = _check(inputs, coef=0.3, grad_stats=grad_stats, fields=fields)
    assert bool((stats[KL] == float("inf")).all())
    assert all(bool(g.isfinite().all()) for g in grads.values())


def test_infinite_kl_term_of_underflowing_policy_mass_is_dropped():
    """Column 5 (first vocabulary tile / split) has q = 0 but p > 0 until column 36 (the next
    one) raises the running max by ~1000: p_5 underflows even in float64, so the KL is finite
    and the infinite partial sum must be dropped when rescaled, not turned into 0 * inf.
    Forward only: fp32 logits of 1000 carry errors of 6e-5 into the (saturated) gradients."""
    inputs = _make_inputs(5, 37, 24, 24, torch.float32, torch.float32, ref_bias=True)
    inputs["ref_bias"][5] = NEG_INF
    inputs["bias"][36] = 1000.0
    inputs["targets"][:] = 36
    stats, _ = _check(inputs, coef=0.3, needs=(False,) * 6)
    assert bool(stats[KL].isfinite().all())


def test_needs_input_grad_subset():
    """Only the gradients asked for are computed (and returned); None without the input."""
    inputs = _make_inputs(3, 37, 24, 40, torch.float32, torch.float32)
    _check(inputs, coef=0.3, needs=(True, False, False, False, False, False))
    _check(inputs, coef=0.3, needs=(False, False, True, False, True, True))  # ref_bias is None
    args = [inputs[k] for k in ("hidden", "weight", "targets", "bias", "ref_hidden",
                                "ref_weight", "ref_bias")]
    scalars, kw = Scalars(0.3, 1.0, None, IGNORE), dict(config=CFG)
    stats, lse = lts.linear_token_stats_forward(*args, scalars, **kw)
    assert linear_token_stats_backward(torch.ones_like(stats), *args, stats, lse, scalars, **kw,
                                       needs_input_grad=(False,) * 6) == (None,) * 6
