"""Direct tests of the Triton token-statistics kernels (kernels/token_stats.py).

Forward statistics and both gradients (random upstream grads for all five fields) are compared
with the float64 reference evaluated on the *same* (possibly bf16/fp16-rounded) inputs, so the
tolerances only have to absorb the kernels' fp32 arithmetic and the rounding of gradients to the
input dtype. Without a GPU the kernels run in the Triton interpreter: shapes are small and each
case covers several features.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels

pytest.importorskip("triton")

from nashkern import tuning  # noqa: E402
from nashkern.kernels import layout  # noqa: E402
from nashkern.kernels import token_stats as ts  # noqa: E402
from nashkern.kernels.layout import Scalars  # noqa: E402
from nashkern.naive import naive_token_stats  # noqa: E402
from nashkern.types import (  # noqa: E402
    ENTROPY, KL, LOGPROBS, MIXTURE_LOGPROBS, NUM_STATS, REF_LOGPROBS,
)
from oracle import assert_within  # noqa: E402

# The kernels evaluate both sides of their `where`s (e.g. -inf - -inf at masked columns, log 0
# in ignored rows) and select the finite one; numpy, under the interpreter, warns about those.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CFG = tuning.config_for("token_stats", torch.device(DEVICE))
IGNORE = -100
NEG_INF = float("-inf")


def _make_inputs(G, R, V, dtype, ref_dtype=None, *, strided=False, masked_cols=(),
                 ignored_rows=(), targets=True, ramp=0.0, seed=0):
    """``[G, R, V]`` logits (a ``[:, :-1]`` view of ``[G, R + 1, V]`` when ``strided``), optional
    reference logits of ``ref_dtype``, and targets (``ignored_rows`` set to ``IGNORE``).
    ``masked_cols`` are -inf in both models; ``ramp`` adds ``linspace(0, ramp, V)`` (the row max
    then moves by large steps from tile to tile)."""
    gen = torch.Generator().manual_seed(seed)

    def logits(dt):
        x = torch.randn(G, R + int(strided), V, generator=gen, dtype=torch.float64) * 3.0
        x += torch.linspace(0.0, ramp, V, dtype=torch.float64)
        x[..., list(masked_cols)] = NEG_INF
        x = x.to(dt).to(DEVICE)
        return x[:, :-1] if strided else x

    z = logits(dtype)
    r = logits(ref_dtype) if ref_dtype is not None else None
    t = None
    if targets:
        valid = [c for c in range(V) if c not in masked_cols]
        t = torch.tensor(valid)[torch.randint(len(valid), (G * R,), generator=gen)]
        t[list(ignored_rows)] = IGNORE
        t = t.to(DEVICE)
    return z, t, r


def _reference(z, t, r, weights, *, coef, temperature, softcap, fields=None):
    """float64 reference stats ``[5, N]`` (absent fields 0) and the gradients of
    ``sum_k weights[k] * stats[k]`` over the present fields (or only ``fields``)."""
    V = z.shape[-1]
    z64 = z.detach().double().reshape(-1, V).requires_grad_()
    r64 = r.detach().double().reshape(-1, V).requires_grad_() if r is not None else None
    out = naive_token_stats(z64, t, r64, coef=coef, temperature=temperature, softcap=softcap,
                            ignore_index=IGNORE)
    zeros = torch.zeros(z64.shape[0], dtype=torch.float64, device=z64.device)
    stats = torch.stack([zeros if f is None else f for f in out]).detach()
    loss = sum((f * weights[k].double()).sum() for k, f in enumerate(out)
               if f is not None and (fields is None or k in fields))
    leaves = [x for x in (z64, r64) if x is not None]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    dz = grads[0].reshape(z.shape)
    dr = grads[1].reshape(r.shape) if r is not None else None
    return stats, dz, dr


def _check(z, t, r, *, coef, temperature=1.0, softcap=None, rows=None, weights=None,
           fields=None):
    """Run forward + backward and compare with the reference (only ``rows`` if given)."""
    N = z.shape[0] * z.shape[1]
    if weights is None:
        weights = torch.randn(NUM_STATS, N, generator=torch.Generator().manual_seed(1))
    weights = weights.to(DEVICE)
    scalars, kw = Scalars(coef, temperature, softcap, IGNORE), dict(config=CFG)
    stats, lse = ts.token_stats_forward(z, t, r, scalars, **kw)
    assert stats.shape == (NUM_STATS, N) and stats.dtype == torch.float32
    assert lse.shape == (3, N) and lse.dtype == torch.float32
    dz, dr = ts.token_stats_backward(weights, z, t, r, stats, lse, scalars, **kw,
                                     needs_grad_logits=True, needs_grad_ref=True)
    ref_stats, ref_dz, ref_dr = _reference(z, t, r, weights, coef=coef, temperature=temperature,
                                           softcap=softcap, fields=fields)
    assert dz.shape == z.shape and dz.dtype == z.dtype
    sel = slice(None) if rows is None else rows
    # Statistics: absolute error scaled by each field's magnitude.
    for k in range(NUM_STATS):
        assert_within(f"stats[{k}]", stats[k][sel], ref_stats[k][sel], atol_scale=1e-5, rtol=0.0)
    assert_within("d logits", dz.reshape(N, -1)[sel], ref_dz.reshape(N, -1)[sel], z.dtype)
    if r is None:
        assert dr is None
    else:
        assert dr.shape == r.shape and dr.dtype == r.dtype
        assert_within("d ref_logits", dr.reshape(N, -1)[sel], ref_dr.reshape(N, -1)[sel], r.dtype)
    return stats, dz, dr


CASES = [
    # id, (G, R, V), dtype, ref dtype, input options, op kwargs
    ("V1", (1, 5, 1), torch.float32, torch.float32, dict(ignored_rows=[2]), dict(coef=0.3)),
    ("V7-bf16-fp16-coef1-softcap", (5, 1, 7), torch.bfloat16, torch.float16,
     dict(ignored_rows=[0, 3]), dict(coef=1.0, temperature=0.7, softcap=5.0)),
    ("V257-fp16-coef0-masked", (1, 1, 257), torch.float16, torch.float16,
     dict(masked_cols=[0, 100, 256]), dict(coef=0.0, temperature=1.3, softcap=2.0)),
    ("V4099-strided-fp32", (2, 2, 4099), torch.float32, torch.float32,
     dict(strided=True, masked_cols=[7, 4098], ignored_rows=[1]),
     dict(coef=0.3, temperature=0.9, softcap=30.0)),
    ("V4099-N1-bf16-ramp", (1, 1, 4099), torch.bfloat16, torch.bfloat16,
     dict(masked_cols=[2048, 3000], ramp=-40.0), dict(coef=0.3)),
    ("V4099-N5-fp16-ramp", (1, 5, 4099), torch.float16, torch.bfloat16,
     dict(ignored_rows=[4], ramp=40.0), dict(coef=1.0, softcap=50.0)),
    ("no-ref", (5, 1, 257), torch.float32, None, dict(ignored_rows=[1]),
     dict(coef=None, softcap=3.0)),
    ("no-targets", (1, 5, 257), torch.float16, torch.float32, dict(targets=False),
     dict(coef=0.3, temperature=0.8)),
    ("no-coef", (1, 5, 257), torch.bfloat16, torch.bfloat16, dict(strided=True),
     dict(coef=None, temperature=1.1)),
]


@pytest.mark.parametrize("shape,dtype,ref_dtype,opts,kw", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_matches_reference(shape, dtype, ref_dtype, opts, kw):
    z, t, r = _make_inputs(*shape, dtype, ref_dtype, **opts)
    stats, dz, dr = _check(z, t, r, **kw)
    ignored = [] if t is None else (t == IGNORE).nonzero().flatten().tolist()
    for n in ignored:  # exactly zero, not merely close
        assert bool((stats[:, n] == 0).all())
        assert bool((dz.reshape(-1, shape[-1])[n] == 0).all())
        assert dr is None or bool((dr.reshape(-1, shape[-1])[n] == 0).all())


@pytest.mark.parametrize("num_splits", [1, 2, 3])
def test_vocabulary_splits(monkeypatch, num_splits):
    """One program per row, 2 chunks of 2 and 1 tiles, 3 chunks of 1 tile: same results."""
    monkeypatch.setattr(layout, "num_vocab_splits", lambda *args: num_splits)
    z, t, r = _make_inputs(1, 2, 4099, torch.float32, torch.float32, masked_cols=[1, 4097])
    _check(z, t, r, coef=0.6, temperature=0.8, softcap=20.0)


@pytest.mark.parametrize("coef", [0.0, 1.0])
def test_mixture_end_points_ignore_the_other_model(coef):
    """coef 0 / 1: the mixture *is* the policy / reference, even where the other model has -inf
    (never 0 * -inf)."""
    z, t, r = _make_inputs(1, 3, 257, torch.float32, torch.float32)
    t[t == 9] = 10
    weights = torch.randn(NUM_STATS, 3)
    fields = None
    if coef == 0.0:
        r[..., 9] = NEG_INF
        weights[KL] = 0.0  # KL = inf: its gradient is not finite
        fields = [LOGPROBS, ENTROPY, REF_LOGPROBS, MIXTURE_LOGPROBS]
    else:
        z[..., 9] = NEG_INF
    stats, _, _ = _check(z, t, r, coef=coef, weights=weights, fields=fields)
    same_as = LOGPROBS if coef == 0.0 else REF_LOGPROBS
    assert torch.equal(stats[MIXTURE_LOGPROBS], stats[same_as])


def test_nan_row_stays_in_its_row():
    z, t, r = _make_inputs(1, 4, 257, torch.float32, torch.float32, ignored_rows=[3])
    z[0, 1, 11] = float("nan")
    z[0, 3, 5] = float("nan")  # in an ignored row: zero stats and gradient all the same
    stats, dz, dr = _check(z, t, r, coef=0.3, rows=[0, 2])
    assert bool(stats[[LOGPROBS, ENTROPY, KL], 1].isnan().all())
    assert bool(stats[REF_LOGPROBS, 1].isfinite())  # from the reference model only
    assert bool(dz[0, 1].isnan().all())
    assert bool((stats[:, 3] == 0).all()) and bool((dz[0, 3] == 0).all())
    assert bool((dr[0, 3] == 0).all())


def test_infinite_kl_keeps_logprob_grad_finite():
    """KL = inf (the reference masks a column the policy does not); with only the log-prob
    upstream grad non-zero, every gradient is finite (the KL terms are selected away)."""
    z, t, r = _make_inputs(1, 3, 257, torch.float32, torch.float32)
    r[..., 5] = NEG_INF
    weights = torch.zeros(NUM_STATS, 3)
    weights[LOGPROBS] = torch.randn(3)
    stats, dz, dr = _check(z, t, r, coef=0.3, weights=weights, fields=[LOGPROBS])
    assert bool((stats[KL] == float("inf")).all())
    assert bool(dz.isfinite().all()) and bool((dr == 0).all())


def test_needs_grad_flags():
    z, t, r = _make_inputs(1, 2, 33, torch.float32, torch.float32)
    scalars, kw = Scalars(0.5, 1.0, None, IGNORE), dict(config=CFG)
    stats, lse = ts.token_stats_forward(z, t, r, scalars, **kw)
    g = torch.randn(NUM_STATS, 2, device=DEVICE)
    dz, dr = ts.token_stats_backward(g, z, t, r, stats, lse, scalars, **kw, needs_grad_logits=False,
                                     needs_grad_ref=True)
    assert dz is None and dr is not None
    assert ts.token_stats_backward(g, z, t, r, stats, lse, scalars, **kw, needs_grad_logits=False,
                                   needs_grad_ref=False) == (None, None)
