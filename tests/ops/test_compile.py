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
    from nashkern.ops.linear_token_stats import linear_token_stats_op
    from nashkern.ops.token_stats import token_stats_op
    torch.library.opcheck(token_stats_op, (z, t, r, 0.5, 1.0, None, -100, "torch"))
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(17, 8, requires_grad=True)
    for strategy in ("fused", "chunked"):  # one backend table per strategy
        torch.library.opcheck(linear_token_stats_op, (h, w, t, None, None, None, None, None, 1.0,
                                                      None, -100, "torch", strategy))


def _every_op(z, r, t, h, w, temperature, coef):
    s = ops.token_stats(z, t, r, coef=coef, temperature=temperature, softcap=5.0)
    loss = (s.mixture_logprobs.sum() + s.kl.sum() + ops.entropy(z, temperature=temperature).sum()
            + ops.logprobs(z, t, temperature=temperature).sum()
            + ops.kl(z, r, temperature=temperature).sum()
            + ops.mixture_logprobs(z, r, t, coef=coef, temperature=temperature).sum())
    lin = ops.linear_token_stats(h, w, t.reshape(-1), ref_hidden=h.detach(), coef=coef,
                                 temperature=temperature)
    loss = loss + lin.logprobs.sum() + lin.mixture_logprobs.sum()
    return loss, ops.mixture_sample(z.detach()[0], r[0], coef=coef, temperature=temperature)


def test_every_op_traces_with_dynamic_shapes_and_scalars():
    """torch.compile(dynamic=True, fullgraph=True): the scalar checks trace with SymFloats (no
    math.isfinite), results match eager, and a bad scalar still stops the compile with the
    op's message."""
    z = torch.randn(2, 3, 37, requires_grad=True)
    r = torch.randn(2, 3, 37)
    t = torch.randint(0, 37, (2, 3))
    h = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(37, 16, requires_grad=True)
    compiled = torch.compile(_every_op, dynamic=True, fullgraph=True, backend="eager")
    for temperature, coef in ((0.9, 0.3), (1.3, 0.6)):  # the second call reuses the graph
        loss, sample = compiled(z, r, t, h, w, temperature, coef)
        expected, _ = _every_op(z, r, t, h, w, temperature, coef)
        torch.testing.assert_close(loss, expected)
        assert sample.shape == (3,) and bool(((sample >= 0) & (sample < 37)).all())
        loss.backward()
    for temperature, coef, message in ((-1.0, 0.3, "temperature must be a finite float > 0"),
                                       (1.0, 1.5, r"coef must be in \[0, 1\]")):
        with pytest.raises(Exception, match=message):
            compiled(z, r, t, h, w, temperature, coef)
        with pytest.raises(ValueError, match=message):  # eagerly: the same ValueError
            _every_op(z, r, t, h, w, temperature, coef)


def test_double_backward_raises_a_clear_error():
    """First-order gradients only (DESIGN.md): a second backward through the backward ops
    raises instead of returning silently wrong (zero) second derivatives."""
    z = torch.randn(3, 17, requires_grad=True)
    t = torch.randint(0, 17, (3,))
    (g,) = torch.autograd.grad(ops.logprobs(z, t).sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward is not supported by nashkern ops "
                                           r"\(nashkern::token_stats_backward\)"):
        g.square().sum().backward()
    h = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(17, 8, requires_grad=True)
    (g,) = torch.autograd.grad(ops.linear_token_stats(h, w, t).logprobs.sum(), h,
                               create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported.*linear_token_stats"):
        g.square().sum().backward()
