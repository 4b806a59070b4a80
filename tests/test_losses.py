import math

import pytest
import torch

from nashkern.losses import nash_md_loss


def test_hand_computed_values():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -7.0], [-1.0, -0.25, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    p = torch.tensor([0.75, 0.0])
    loss, score, kl = nash_md_loss(lp, ref, p, mask, beta=0.1)
    # row 0: Σlp = -3, score = 0.25 * -3 = -0.75; kl = (0.5)(-1) + (-1)(-2) = 1.5
    # row 1: Σlp = -1, score = -0.5 * -1 = 0.5;  kl = (0.5)(-0.5) + (-0.25)(-0.5) = -0.125
    assert score.tolist() == pytest.approx([-0.75, 0.5])
    assert kl.tolist() == pytest.approx([1.5, -0.125])
    expected = ((0.1 * 1.5 + 0.75) + (0.1 * -0.125 - 0.5)) / 2
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    # d/dlp of mean(β·sg(lp-ref)·lp - (P-½)·lp) = (β·(lp-ref) - (P-½)) / B on unmasked tokens
    g = (0.1 * (lp.detach() - ref) - (p - 0.5)[:, None]) / 2 * mask
    torch.testing.assert_close(lp.grad, g)


def test_matches_autograd_of_reference_definition():
    torch.manual_seed(0)
    B, T = 4, 7
    lp = (-torch.rand(B, T, dtype=torch.float64) * 3).requires_grad_()
    ref = -torch.rand(B, T, dtype=torch.float64) * 3
    mask = torch.rand(B, T) > 0.3
    p = torch.rand(B, dtype=torch.float64)
    loss, score, kl = nash_md_loss(lp, ref, p, mask, beta=0.3)
    (g,) = torch.autograd.grad(loss, lp)
    # Original TRL formulation (masked_fill before the sums).
    lp2 = lp.detach().clone().requires_grad_()
    m = lp2.masked_fill(~mask, 0.0)
    r = ref.masked_fill(~mask, 0.0)
    sc = (p - 0.5) * m.sum(1)
    with torch.no_grad():
        log_ratio = m - r
    kll = (log_ratio * m).sum(1)
    loss2 = (0.3 * kll - sc).mean()
    (g2,) = torch.autograd.grad(loss2, lp2)
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(score, sc)
    torch.testing.assert_close(kl, kll)
    torch.testing.assert_close(g, g2)
    assert (g[~mask] == 0).all()


def test_padding_values_are_ignored_even_if_nan():
    lp = torch.tensor([[-1.0, float("nan")]], requires_grad=True)
    ref = torch.tensor([[-2.0, float("-inf")]])
    loss, score, kl = nash_md_loss(lp, ref, 1.0, torch.tensor([[1, 0]]), beta=1.0)
    assert math.isfinite(loss.item())
    loss.backward()
    assert torch.isfinite(lp.grad).all() and lp.grad[0, 1] == 0


def test_token_kl_full_estimator():
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]])
    tkl = torch.tensor([[0.2, 0.3]], requires_grad=True)
    loss, score, kl = nash_md_loss(lp, ref, 0.5, None, beta=2.0, token_kl=tkl)
    assert kl.item() == pytest.approx(0.5) and score.item() == 0
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    torch.testing.assert_close(tkl.grad, torch.tensor([[2.0, 2.0]]))


def test_bad_input():
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="beta"):
        nash_md_loss(lp, lp, 0.5, None, beta=-1.0)
    with pytest.raises(ValueError, match="ref_logprobs"):
        nash_md_loss(lp, torch.zeros(2, 2), 0.5, None, beta=0.1)
    with pytest.raises(ValueError, match="mask"):
        nash_md_loss(lp, lp, 0.5, torch.ones(3, 3), beta=0.1)
