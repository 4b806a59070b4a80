"""Direct tests of the fused Gumbel-max mixture sampler (kernels/mixture_sample.py).

Without a GPU the kernel runs in the Triton interpreter (about 10 ms per row), so the
frequency test uses 1500 draws of an 11-column row.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels

pytest.importorskip("triton")

from nashkern import tuning  # noqa: E402
from nashkern.kernels import layout  # noqa: E402
from nashkern.kernels import mixture_sample as ms  # noqa: E402
from nashkern.kernels.layout import Scalars  # noqa: E402
from nashkern.naive import naive_mixture_logits  # noqa: E402
from oracle import assert_samples_follow  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NEG_INF = float("-inf")


CFG = tuning.config_for("mixture_sample", torch.device(DEVICE))


def _sample(z, r, coef, temperature=1.0, seed=None, config=CFG):
    gen = None if seed is None else torch.Generator(device=DEVICE).manual_seed(seed)
    return ms.mixture_sample(z, r, None, Scalars(coef, temperature), generator=gen,
                             config=config)


def _randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def test_reproducible_per_seed():
    z = _randn(6, 1100, dtype=torch.bfloat16, scale=2.0)[:, :1000]  # row stride 1100
    r = _randn(6, 1000, dtype=torch.float16, scale=2.0, seed=1)
    a, b, c = _sample(z, r, 0.4, 0.8, seed=1), _sample(z, r, 0.4, 0.8, seed=1), \
        _sample(z, r, 0.4, 0.8, seed=2)
    assert a.dtype == torch.int64 and a.shape == (6,)
    assert bool(((a >= 0) & (a < 1000)).all())
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    seed = torch.tensor([12345], device=DEVICE)  # the caller's own seed tensor
    assert torch.equal(ms.mixture_sample(z, r, seed, Scalars(0.4, 0.8), config=CFG),
                       ms.mixture_sample(z, r, seed, Scalars(0.4, 0.8), config=CFG))


def test_frequencies_match_mixture_softmax():
    """Chi-square test of 1500 draws against softmax(naive_mixture_logits). V = 11 uses
    3 Philox counters per row in a tile of 4 lanes: the spare lane must not alias columns."""
    V, draws, coef, temperature = 11, 1500, 0.3, 0.7
    z = _randn(V, seed=3)
    r = _randn(V, seed=4)
    z[4] = NEG_INF  # masked in the policy only: -inf in the mixture
    out = _sample(z.expand(draws, V), r.expand(draws, V), coef, temperature, seed=5)
    probs = torch.softmax(naive_mixture_logits(z.cpu(), r.cpu(), coef=coef,
                                               temperature=temperature), -1)
    # 9 degrees of freedom: P(chi2 > 30) < 5e-4
    assert_samples_follow(out, probs, never=4, chi2_max=30.0)


@pytest.mark.parametrize("coef", [0.0, 1.0])
def test_end_points_sample_one_model(coef):
    """coef 0 / 1 draw from the policy / reference alone (the other model is not even read:
    NaN there changes nothing), with the very samples of that model mixed with itself."""
    x = _randn(8, 300, scale=2.0)
    x[:, 17] = NEG_INF
    junk = torch.full_like(x, float("nan"))
    z, r = (x, junk) if coef == 0.0 else (junk, x)
    out = _sample(z, r, coef, 0.9, seed=7)
    assert torch.equal(out, _sample(x, x, 0.5, 0.9, seed=7))
    assert bool((out != 17).all())


def test_masked_columns_never_sampled():
    V = 50
    z = _randn(64, V, scale=3.0)
    r = _randn(64, V, scale=3.0, seed=1)
    both = [0, 9, 10, 11, 49]
    policy_only = [20, 30]
    z[:, both + policy_only] = NEG_INF
    r[:, both] = NEG_INF
    out = _sample(z, r, 0.5, seed=11)
    assert bool(((out >= 0) & (out < V)).all())
    assert not bool(torch.isin(out.cpu(), torch.tensor(both + policy_only)).any())


def test_invalid_rows_give_minus_one():
    z = _randn(5, 40)
    r = _randn(5, 40, seed=1)
    z[0] = r[0] = NEG_INF          # no finite mixture entry
    z[1, 3] = float("nan")         # NaN in the policy
    r[2, 39] = float("nan")        # NaN in the reference
    z[3] = r[3] = NEG_INF
    z[3, 21] = r[3, 21] = 1.0      # a single finite entry: always drawn
    out = _sample(z, r, 0.3, seed=0)
    assert out[:4].tolist() == [-1, -1, -1, 21]
    assert 0 <= out[4] < 40


@pytest.mark.parametrize("block_v,num_splits", [(4096, 2), (1024, 1), (1024, 3)])
def test_tiling_and_splits_do_not_change_samples(monkeypatch, block_v, num_splits):
    """The noise of an entry depends on (seed, row, column) only: any tile width or vocabulary
    split gives the same samples, including the NaN / all -inf rows of a split merge."""
    V = 5000
    z = _randn(4, V, dtype=torch.float16, scale=2.0)
    r = _randn(4, V, scale=2.0, seed=1)
    # Column j uses counter j mod 1250: the NaN is in the last chunk, the finite entry in the
    # first one.
    z[1, 1100] = float("nan")
    z[2] = r[2] = NEG_INF
    z[2, 10] = r[2, 10] = 0.0
    expected = _sample(z, r, 0.6, 1.2, seed=21)
    monkeypatch.setattr(layout, "num_vocab_splits", lambda *args: num_splits)
    out = _sample(z, r, 0.6, 1.2, seed=21, config=tuning.MixtureSampleTriton(BLOCK_V=block_v))
    assert out[1] == -1 and out[2] == 10
    assert torch.equal(out, expected)
