"""Memory is a tested property: record every tensor allocation, forward and backward, with a
TorchDispatchMode, and assert that nothing near tokens x vocab elements is ever created.

The recorder (nashkern.memory) sees through nashkern's custom ops: every aten op inside a
backend, and inside the backward op reached from autograd, is recorded.
"""
import pytest
import torch

from nashkern import ops
from nashkern.memory import AllocationRecorder
from nashkern.naive import naive_linear_token_stats


N, V, D = 8192, 16384, 32


def _inputs(requires_grad=True):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g).requires_grad_(requires_grad)
    weight = (torch.randn(V, D, generator=g) * 0.2).requires_grad_(requires_grad)
    ref_hidden = torch.randn(N, D, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, ref_hidden, targets


@pytest.mark.parametrize("with_ref", [False, True])
def test_linear_token_stats_never_allocates_tokens_x_vocab(with_ref):
    hidden, weight, ref_hidden, targets = _inputs()
    recorder = AllocationRecorder()
    with recorder:
        s = ops.linear_token_stats(
            hidden, weight, targets, ref_hidden=ref_hidden if with_ref else None,
            coef=0.5 if with_ref else None, backend="torch",
        )
        loss = s.logprobs.sum() + s.entropy.sum()
        if with_ref:
            loss = loss + s.kl.sum() + s.mixture_logprobs.sum()
        loss.backward()
    assert hidden.grad is not None and weight.grad is not None
    largest, op = recorder.largest()
    # The fp32 dW accumulator is V x D; a streaming tile is rows x vocab_tile = N*V/32 here.
    assert largest <= N * V // 16, f"{op} allocated {largest} elements (N*V = {N * V})"
    assert len(recorder.sizes) > 100  # the recorder really saw the backend's ops


def test_recorder_catches_materialised_logits():
    """The same check on the naive reference must fail: the recorder cannot be fooled."""
    hidden, weight, _, targets = _inputs(requires_grad=False)
    hidden, weight, targets = hidden[:1024], weight, targets[:1024]
    recorder = AllocationRecorder()
    with recorder:
        naive_linear_token_stats(hidden, weight, targets)
    assert recorder.largest()[0] >= 1024 * V
