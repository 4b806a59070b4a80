"""The ops are torch.library custom ops: they trace under torch.compile with fullgraph=True,
forward and backward, and give the eager results."""
import pytest
import torch

from nashkern import ops


def _loss(hidden, weight, ref_hidden, targets):
    s = ops.linear_token_stats(hidden, weight, targets, ref_hidden=ref_hidden, coef=0.3,
                               softcap=20.0)
    return s.logprobs.sum() + s.entropy.sum() + s.kl.sum() + s.mixture_logprobs.sum()


def _logits_loss(z, r, targets):
    s = ops.token_stats(z[:, :-1], targets[:, 1:], r[:, :-1], coef=0.5, temperature=0.9)
    return s.mixture_logprobs.sum() + s.kl.sum() + ops.entropy(z).sum()


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_matches_eager(compiler):
    h = torch.randn(2, 5, 16, requires_grad=True)
    w = torch.randn(37, 16, requires_grad=True)
    t = torch.randint(0, 37, (2, 5))
    z = torch.randn(2, 5, 37, requires_grad=True)
    r = torch.randn(2, 5, 37)
    for fn, args, leaf in ((_loss, (h, w, h.detach() * 0.5, t), h), (_logits_loss, (z, r, t), z)):
        compiled = torch.compile(fn, fullgraph=True, backend=compiler)
        out = compiled(*args)
        out.backward()
        grad, leaf.grad = leaf.grad.clone(), None
        expected = fn(*args)
        expected.backward()
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(grad, leaf.grad)
        leaf.grad = None


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck: schema, fake tensor and autograd registration are consistent."""
    z = torch.randn(2, 3, 17, requires_grad=True)
    r = torch.randn(2, 3, 17)
    t = torch.randint(0, 17, (6,))
    from nashkern.ops.linear_stats import linear_token_stats_op
    from nashkern.ops.stats import token_stats_op
    torch.library.opcheck(token_stats_op, (z, t, r, 0.5, 1.0, None, -100, "torch"))
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(17, 8, requires_grad=True)
    torch.library.opcheck(linear_token_stats_op,
                          (h, w, t, None, None, None, None, None, 1.0, None, -100, "torch"))
