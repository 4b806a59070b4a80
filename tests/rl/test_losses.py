import math

import pytest
import torch

from nashkern.rl.losses import nash_md_loss


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


# ---- DPO / XPO (Online DPO and XPO trainers) -----------------------------------------------
def _pair_inputs():
    pc = torch.tensor([-1.0, -4.0], requires_grad=True)
    pr = torch.tensor([-2.0, -1.0], requires_grad=True)
    rc = torch.tensor([-1.5, -3.0], requires_grad=True)  # grads must not reach the reference
    rr = torch.tensor([-1.0, -2.0])
    # h = (pc - pr) - (rc - rr) = [1 - (-0.5), -3 - (-1)] = [1.5, -2]
    return pc, pr, rc, rr


def test_dpo_loss_sigmoid_hand_computed():
    from nashkern.rl.losses import dpo_loss

    pc, pr, rc, rr = _pair_inputs()
    loss, losses = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # -log σ(0.5·1.5) = log(1 + e^-0.75), -log σ(0.5·-2) = log(1 + e^1)
    want = [math.log1p(math.exp(-0.75)), math.log1p(math.e)]
    assert losses.tolist() == pytest.approx(want)
    assert loss.item() == pytest.approx(sum(want) / 2)
    loss.backward()
    # d/dpc = -β σ(-β h) / B, d/dpr = -d/dpc
    sig = torch.sigmoid(-0.5 * torch.tensor([1.5, -2.0]))
    torch.testing.assert_close(pc.grad, -0.5 * sig / 2)
    torch.testing.assert_close(pr.grad, 0.5 * sig / 2)
    assert rc.grad is None


def test_dpo_loss_ipo_hand_computed():
    from nashkern.rl.losses import dpo_loss

    pc, pr, rc, rr = _pair_inputs()
    loss, losses = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")
    # target 1/(2β) = 1 on the *summed* log-ratios: (1.5 - 1)² = 0.25, (-2 - 1)² = 9
    assert losses.tolist() == pytest.approx([0.25, 9.0])
    assert loss.item() == pytest.approx(4.625)
    loss.backward()
    torch.testing.assert_close(pc.grad, torch.tensor([2 * 0.5, 2 * -3.0]) / 2)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_xpo_loss_hand_computed(loss_type):
    from nashkern.rl.losses import dpo_loss, xpo_loss

    pc, pr, rc, rr = _pair_inputs()
    ref_sample = torch.tensor([-2.0, -4.0], requires_grad=True)  # Σ log π(ỹ)
    loss, dpo_losses, xpo_losses = xpo_loss(pc, pr, rc, rr, ref_sample, beta=0.5, alpha=0.1,
                                            loss_type=loss_type)
    _, want_dpo = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type=loss_type)
    torch.testing.assert_close(dpo_losses, want_dpo)
    assert xpo_losses.tolist() == pytest.approx([-0.2, -0.4])
    assert loss.item() == pytest.approx((want_dpo.sum().item() - 0.6) / 2)
    loss.backward()
    torch.testing.assert_close(ref_sample.grad, torch.tensor([0.05, 0.05]))  # α / B
    # alpha = 0: plain DPO
    loss0, _, x0 = xpo_loss(pc, pr, rc, rr, ref_sample, beta=0.5, alpha=0.0, loss_type=loss_type)
    assert loss0.item() == pytest.approx(want_dpo.mean().item()) and (x0 == 0).all()


def test_dpo_xpo_bad_input():
    from nashkern.rl.losses import dpo_loss, xpo_loss

    a = torch.zeros(3)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(a, a, a, a, beta=-0.1)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(a, a, a, a, beta=0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="ipo"):
        dpo_loss(a, a, a, a, beta=0.0, loss_type="ipo")
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(a, a, a, torch.zeros(2), beta=0.1)
    with pytest.raises(ValueError, match="1-D"):
        dpo_loss(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 4),
                 beta=0.1)
    with pytest.raises(ValueError, match="policy_ref_sample_logps"):
        xpo_loss(a, a, a, a, torch.zeros(4), beta=0.1, alpha=0.1)
    with pytest.raises(ValueError, match="alpha"):
        xpo_loss(a, a, a, a, a, beta=0.1, alpha=-1.0)


def test_pairs_chosen_rejected_reordering():
    from nashkern.rl.generation import GenerationOutput
    from nashkern.rl.pairs import (chosen_rejected_from_preference, concat_generations,
                                first_preferred, sequence_logps)

    prompt = torch.tensor([[0, 7], [8, 9]])
    pmask = torch.tensor([[0, 1], [1, 1]])
    a = GenerationOutput(prompt, pmask, torch.tensor([[10, 1], [11, 12]]),
                         torch.tensor([[1, 1], [1, 1]]))
    b = GenerationOutput(prompt, pmask, torch.tensor([[20, 21, 1], [1, 0, 0]]),
                         torch.tensor([[1, 1, 1], [1, 0, 0]]))
    s = concat_generations(a, b, pad_token_id=0)
    assert s.completion_ids.tolist() == [[10, 1, 0], [11, 12, 0], [20, 21, 1], [1, 0, 0]]
    assert s.completion_mask[:2, 2].tolist() == [0, 0]
    fc = first_preferred(scores=torch.tensor([1.0, 0.0]), other_scores=torch.tensor([1.0, 2.0]))
    assert fc.tolist() == [True, False]  # a tie goes to the first
    assert first_preferred(judge_choices=[0, -1]).tolist() == [True, False]
    pairs = chosen_rejected_from_preference(s, fc)
    # chosen: a's row 0, b's row 1; rejected: b's row 0, a's row 1
    assert pairs.index.tolist() == [0, 3, 2, 1]
    assert pairs.input_ids[:, 2:].tolist() == [[10, 1, 0], [1, 0, 0], [20, 21, 1], [11, 12, 0]]
    assert pairs.context_length == 2 and pairs.input_ids[:, :2].tolist() == [[0, 7], [8, 9]] * 2
    lp = torch.tensor([[-1.0, -2.0, float("nan")]] * 4)
    assert sequence_logps(lp, pairs.completion_mask)[:2].tolist() == [-3.0, -1.0]
    with pytest.raises(ValueError, match="either"):
        first_preferred(scores=torch.zeros(2))
