"""ops.linear_mixture_sample: the ids of ops.mixture_sample on the heads' float32 logits for the
same generator, without ever building [B, V].

Equality is exact here: the tile GEMMs give the whole-row GEMM's bits (same rows, this CPU's
BLAS), and the block masses are per vocabulary block, independent of the tile width. Only the
recomputation of each row's chosen block (a matrix-vector product) may differ in the last bit
of a logit; a sample then moves only if its uniform falls within ~1e-7 (relative) of a CDF
boundary inside that block: with the few hundred draws below the chance of one flip is ~1e-4.
The chi-square test checks the distribution itself against float64.
"""
import dataclasses

import pytest
import torch

from nashkern import ops, tuning
from nashkern.memory import AllocationRecorder
from nashkern.naive import naive_mixture_logits

from oracle import assert_samples_follow


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Blocks of 16 columns, chunks of 96 elements (tiles of 32 columns at 3 rows), GEMM row
    blocks of 3 and sampler row blocks of 6 rows: several tiles, partial last blocks and row
    blocks at these small shapes (the logits sampler uses the same blocks)."""
    monkeypatch.setattr(tuning, "TORCH", dataclasses.replace(
        tuning.TORCH, sample_block=16, sample_chunk_elements=96, linear_sample_rows=3))


def _heads(B, V, D, dtype=torch.float32, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) * 0.5).to(dtype)
    hr = torch.randn(B, D + 3, generator=g).to(dtype)
    wr = (torch.randn(V, D + 3, generator=g) * 0.5).to(dtype)
    b = (torch.randn(V, generator=g)).to(dtype) if bias else None
    br = (torch.randn(V, generator=g)).to(dtype) if bias else None
    return h, w, hr, wr, b, br


def _logits(h, w, b=None, softcap=None):
    z = h.float() @ w.float().T
    if b is not None:
        z = z + b.float()
    if softcap is not None:
        z = torch.where(z == float("-inf"), z, softcap * torch.tanh(z / softcap))
    return z


def _both(h, w, hr, wr, b, br, seed, **kw):
    softcap = kw.pop("softcap", None)
    got = ops.linear_mixture_sample(h, w, hr, wr, bias=b, ref_bias=br, softcap=softcap,
                                    generator=torch.Generator().manual_seed(seed), **kw)
    want = ops.mixture_sample(_logits(h, w, b, softcap), _logits(hr, wr, br, softcap),
                              generator=torch.Generator().manual_seed(seed), backend="torch", **kw)
    return got, want


@pytest.mark.parametrize("B,V,dtype,kw", [
    (7, 301, torch.float32, dict(coef=0.5)),
    (5, 97, torch.float32, dict(coef=0.0, temperature=0.7)),
    (4, 160, torch.float32, dict(coef=1.0, temperature=1.3)),
    (1, 33, torch.float32, dict(coef=0.3, softcap=2.0)),
    (9, 1, torch.float32, dict(coef=0.5)),
    (6, 211, torch.bfloat16, dict(coef=0.4)),
    (6, 211, torch.float16, dict(coef=0.6, temperature=0.9)),
])
def test_same_ids_as_mixture_sample_on_the_logits(B, V, dtype, kw):
    h, w, hr, wr, b, br = _heads(B, V, 8, dtype, seed=B + V, bias=True)
    for seed in range(12):
        got, want = _both(h, w, hr, wr, b, br, seed, **kw)
        assert got.dtype == torch.long and got.shape == (B,)
        assert torch.equal(got, want), (seed, got, want)


def test_policy_alone_needs_no_reference():
    h, w, _, _, b, _ = _heads(5, 77, 8, bias=True)
    for seed in range(5):
        got = ops.linear_mixture_sample(h, w, coef=0.0, bias=b,
                                        generator=torch.Generator().manual_seed(seed))
        z = _logits(h, w, b)
        want = ops.mixture_sample(z, z, coef=0.0, generator=torch.Generator().manual_seed(seed),
                                  backend="torch")
        assert torch.equal(got, want)


def test_groups_draw_what_separate_calls_draw():
    """Rows in groups (own coef, own generator) share one pass over the weight and draw what
    one call per group draws; the coef-0 group's reference rows are never read."""
    h, w, hr, wr, _, _ = _heads(10, 130, 8)
    hr_masked = hr.clone()
    hr_masked[:4] = float("nan")  # the coef-0 group's reference rows: never read
    got = ops.linear_mixture_sample(
        h, w, hr_masked, wr, coef=[0.0, 0.5, 1.0], group_rows=[4, 3, 3], temperature=0.8,
        generator=[torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    want = torch.cat([
        ops.linear_mixture_sample(h[r], w, hr[r], wr, coef=c, temperature=0.8,
                                  generator=torch.Generator().manual_seed(s))
        for r, c, s in ((slice(0, 4), 0.0, 1), (slice(4, 7), 0.5, 2), (slice(7, 10), 1.0, 3))])
    assert torch.equal(got, want)


def test_empty_batch():
    h, w, hr, wr, _, _ = _heads(0, 50, 8)
    out = ops.linear_mixture_sample(h, w, hr, wr, coef=0.5)
    assert out.shape == (0,) and out.dtype == torch.long


def test_masked_infinite_and_nan_logits():
    """-inf columns (bias) are never drawn, a +inf column takes all the mass, an all -inf row
    and a NaN row give -1, a tiny temperature gives the argmax: as mixture_sample does."""
    h, w, hr, wr, _, _ = _heads(6, 90, 8)
    b = torch.zeros(90)
    b[::3] = float("-inf")
    for seed in range(4):
        got, want = _both(h, w, hr, wr, b, b.clone(), seed, coef=0.5)
        assert torch.equal(got, want) and bool((got % 3 != 0).all())
    b_inf = torch.zeros(90)
    b_inf[41] = float("inf")
    got, want = _both(h, w, hr, wr, b_inf, None, 0, coef=0.3)
    assert torch.equal(got, want) and bool((got == 41).all())
    h_nan = h.clone()
    h_nan[2, 1] = float("nan")
    got, want = _both(h_nan, w, hr, wr, None, None, 0, coef=0.5)
    assert torch.equal(got, want) and got[2] == -1 and bool((got[[0, 1, 3, 4, 5]] >= 0).all())
    got = ops.linear_mixture_sample(h, w, hr, wr, coef=0.5, bias=torch.full((90,), -float("inf")),
                                    ref_bias=torch.zeros(90))
    assert bool((got == -1).all())
    got = ops.linear_mixture_sample(h, w, hr, wr, coef=0.0, temperature=1e-40)
    assert torch.equal(got, _logits(h, w).argmax(1))


@pytest.mark.parametrize("coef", [0.0, 0.35, 1.0])
def test_distribution_chi_square(coef):
    """The sampled frequencies against float64 softmax of the mixture (13 columns, one of them
    masked in both heads by the bias)."""
    V, draws = 13, 1500
    h, w, hr, wr, _, _ = _heads(1, V, 6, seed=4)
    b = torch.zeros(V)
    b[4] = float("-inf")
    out = ops.linear_mixture_sample(h.expand(draws, -1), w, hr.expand(draws, -1), wr, coef=coef,
                                    bias=b, ref_bias=b, temperature=0.7,
                                    generator=torch.Generator().manual_seed(5))
    z = (h.double() @ w.double().T)[0] + b.double()
    r = (hr.double() @ wr.double().T)[0] + b.double()
    probs = torch.softmax(naive_mixture_logits(z, r, coef=coef, temperature=0.7), -1)
    assert_samples_follow(out, probs, never=4)


def test_never_allocates_rows_x_vocab(monkeypatch):
    monkeypatch.setattr(tuning, "TORCH", dataclasses.replace(
        tuning.TORCH, sample_block=256, sample_chunk_elements=1 << 14, linear_sample_rows=256))
    B, V = 24, 20011
    h, w, hr, wr, b, br = _heads(B, V, 16, bias=True)
    with AllocationRecorder() as rec:
        out = ops.linear_mixture_sample(h, w, hr, wr, coef=[0.0, 0.5], group_rows=[12, 12],
                                        bias=b, ref_bias=br, generator=[None, None])
    assert bool(((out >= 0) & (out < V)).all())
    largest, op = rec.largest()
    # the tile buffers (2**14 elements) and pass 2's gathered block rows [rows, block, Dr]
    assert largest <= max(1 << 14, B * 256 * 19) < B * V // 4, \
        f"{op} allocated {largest} elements (B*V = {B * V})"
    assert len(rec.sizes) > 50  # the recorder saw the backend's ops


def test_errors_name_the_argument():
    h, w, hr, wr, _, _ = _heads(3, 20, 8)
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.linear_mixture_sample(h, w[:, :5], coef=0.0)
    with pytest.raises(ValueError, match="ref_hidden and ref_weight are required"):
        ops.linear_mixture_sample(h, w, coef=0.5)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.linear_mixture_sample(h, w, coef=0.0, bias=torch.zeros(19))
    with pytest.raises(ValueError, match="group_rows"):
        ops.linear_mixture_sample(h, w, coef=[0.0], group_rows=[2], generator=[None])
    with pytest.raises(ValueError, match="coef must be a sequence"):
        ops.linear_mixture_sample(h, w, coef=0.0, group_rows=[3], generator=[None])
    with pytest.raises(ValueError, match="coef must be in"):
        ops.linear_mixture_sample(h, w, hr, wr, coef=1.5)
    with pytest.raises(ValueError, match="does not implement linear_mixture_sample"):
        ops.linear_mixture_sample(h, w, coef=0.0, backend="cuda")
