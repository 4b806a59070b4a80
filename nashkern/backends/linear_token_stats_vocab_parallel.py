"""``linear_token_stats`` for a head sharded by vocabulary rows (a tensor-parallel ``lm_head``,
as in Megatron): each rank of ``process_group`` holds the rows ``[vocab_start, vocab_start +
V_r)`` of ``weight`` (and of ``bias``, ``ref_weight``, ``ref_bias``) and the full, replicated
hidden states; ``targets`` are global ids. Plain functions of the backend contract
(DESIGN.md) plus ``process_group`` and ``vocab_start``; the autograd and the checks are
``nashkern/ops/linear_token_stats.py``'s.

Forward: the torch backend's streaming pass over this rank's rows only
(``torch/linear_token_stats.py: linear_token_stats_partials``: per row the running max, Σe, Σe·(a − max),
Σe·(a − b), the reference's and the mixture's max and Σe, the target logits where the target
lies in the shard, 0 elsewhere), then one MAX all-reduce of the ``[k, N]`` maxima (k ≤ 3
models), every shard rescaled to the global max, and one SUM all-reduce of the ``[s, N]`` sums
(s ≤ 8: 3 policy sums, 1 each for reference and mixture, 3 target logits): O(N) values per call.
The merged partials finish exactly as one unsharded pass would.

Backward: ``torch/linear_token_stats.py: linear_token_stats_backward`` over the shard's tiles, recomputed from the
merged ``stats`` / ``lse`` (the column offset ``vocab_start`` places the targets), then one SUM
all-reduce per replicated input of its float32 gradient (``d_hidden``, and ``d_ref_hidden`` when
the reference hidden states require grad); ``d_weight`` / ``d_bias`` (and the reference's) stay
local to the shard. The loss on the (replicated) statistics must be the same on every rank.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from ..kernels.layout import NUM_LSE, NUM_STATS, Scalars
from .torch import linear_token_stats as torch_linear_token_stats


def linear_token_stats_forward(
    hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, scalars: Scalars, *,
    process_group, vocab_start: int,
):
    """-> (stats ``[5, N]``, lse ``[3, N]``), the same on every rank: those of the full head."""
    N = hidden.shape[0]
    stats = torch.empty(NUM_STATS, N, device=hidden.device)
    lse = torch.empty(NUM_LSE, N, device=hidden.device)
    if N == 0:  # N is the same on every rank (replicated hidden states): no collective skipped
        return stats, lse
    blocks = torch_linear_token_stats.linear_token_stats_partials(
        hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, scalars,
        vocab_start=vocab_start)
    maxima = torch.cat([parts.maxima() for _, _, parts in blocks], 1)
    # a NaN max (a NaN row) may or may not win the MAX: the row's sums are NaN either way
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=process_group)
    for (n0, n1, parts) in blocks:
        parts.rebase(maxima[:, n0:n1])
    sums = torch.cat([parts.sums() for _, _, parts in blocks], 1)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=process_group)
    for (n0, n1, parts) in blocks:
        parts.set_sums(sums[:, n0:n1])
        t = targets[n0:n1] if targets is not None else None
        stats[:, n0:n1], lse[:, n0:n1] = parts.finish(t, scalars.ignore_index)
    return stats, lse


def linear_token_stats_backward(
    grad_stats, hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, stats, lse,
    scalars: Scalars, *, needs_input_grad: Sequence[bool], process_group, vocab_start: int,
):
    """-> the 6 gradients of the contract; d_hidden / d_ref_hidden summed over the group."""
    def all_reduce(d):
        if d.numel():
            dist.all_reduce(d, op=dist.ReduceOp.SUM, group=process_group)

    return torch_linear_token_stats.linear_token_stats_backward(
        grad_stats, hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, stats, lse,
        scalars, needs_input_grad=needs_input_grad, vocab_start=vocab_start, reduce_hidden_grad=all_reduce)
