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

from ..kernels import layout
from ..kernels.layout import NUM_LSE, NUM_STATS, Scalars
from .torch import linear_token_stats as torch_linear_token_stats
from .torch.common import Partials, _OnlineLSE

try:
    from ..kernels import linear_token_stats as triton_kernels
    from ..kernels.linear_token_stats_backward import linear_token_stats_backward as triton_backward
except ImportError:  # triton is optional
    triton_kernels = triton_backward = None


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
    return _merge_shards(blocks, targets, scalars.ignore_index, stats, lse, process_group)


def _merge_shards(blocks, targets, ignore_index, stats, lse, process_group):
    """Merge every rank's unfinished ``(n0, n1, Partials)`` row blocks (one MAX and one SUM
    all-reduce) and finish them into ``stats`` / ``lse``."""
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
        stats[:, n0:n1], lse[:, n0:n1] = parts.finish(t, ignore_index)
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


def _local_targets(targets, vocab_start: int, rows: int, ignore_index: int):
    """Global target ids -> this shard's columns; a target in another shard becomes a value
    outside ``[0, rows)`` that is not ``ignore_index`` (it matches no column and its row keeps
    its gradient); ``ignore_index`` stays."""
    if targets is None:
        return None
    elsewhere = -1 if ignore_index != -1 else -2
    local = targets - vocab_start
    inside = (local >= 0) & (local < rows)
    return torch.where(targets == ignore_index, targets,
                       torch.where(inside, local, torch.full_like(targets, elsewhere)))


def _from_workspace(work, has_ref: bool, has_mix: bool) -> Partials:
    """The Triton forward kernel's split workspace ``[NUM_PARTIALS, splits, N]`` merged over its
    splits into the torch backend's unfinished ``Partials`` (the same quantities: per model the
    max and Σe relative to it, the policy's Σe·(a − max) and Σe·(a − b), the target logits; a
    split with no finite logit holds zero sums)."""
    N = work.shape[2]
    parts = Partials(N, has_ref, has_mix, work.device)

    def merged(acc, rows):
        maxes = work[rows[0]]  # [splits, N]
        top = maxes.amax(0)
        pivot = torch.where(top == float("-inf"), torch.zeros_like(top), top)
        own = torch.where(maxes == float("-inf"), torch.zeros_like(maxes), maxes)
        scale = torch.where(maxes == float("-inf"), torch.zeros_like(maxes),
                            torch.exp(own - pivot))
        live = scale > 0
        zero = torch.zeros((), device=work.device)
        acc.max, acc.pivot = top, pivot
        acc.sumexp = (scale * work[rows[1]]).sum(0)
        if acc.centered is not None:
            acc.centered = torch.where(
                live, scale * (work[rows[2]] + (own - pivot) * work[rows[1]]), zero).sum(0)
        if acc.cross is not None:
            acc.cross = torch.where(live, scale * work[rows[3]], zero).sum(0)

    merged(parts.pol, (layout.PART_MAX_A, layout.PART_SUM_A, layout.PART_ENT_A,
                       layout.PART_KL_A))
    if parts.ref is not None:
        merged(parts.ref, (layout.PART_MAX_B, layout.PART_SUM_B))
    if parts.mix is not None:
        merged(parts.mix, (layout.PART_MAX_M, layout.PART_SUM_M))
    zeros = torch.zeros(N, device=work.device)
    parts.picked = torch.stack([work[layout.PART_TGT_A].sum(0),
                                work[layout.PART_TGT_B].sum(0) if has_ref else zeros,
                                work[layout.PART_TGT_M].sum(0) if has_mix else zeros])
    return parts


def triton_linear_token_stats_forward(
    hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, scalars: Scalars, *,
    process_group, vocab_start: int, config,
):
    """The Triton shard pass: the fused forward kernel over this rank's rows (its split
    workspace, targets made local), the splits merged in torch (O(splits·N)), then the same
    O(N) merge across the ranks as the torch pass."""
    N = hidden.shape[0]
    stats = torch.empty(NUM_STATS, N, device=hidden.device)
    lse = torch.empty(NUM_LSE, N, device=hidden.device)
    if N == 0:
        return stats, lse
    work, flags = triton_kernels.linear_token_stats_partials(
        hidden, weight, _local_targets(targets, vocab_start, weight.shape[0],
                                       scalars.ignore_index),
        bias, ref_hidden, ref_weight, ref_bias, scalars, config=config)
    parts = _from_workspace(work, ref_hidden is not None, flags["HAS_MIX"])
    if scalars.coef is not None and not flags["HAS_MIX"]:  # no targets: an empty mixture
        parts.mix = _OnlineLSE(N, hidden.device)           # (zero sums on every rank)
    return _merge_shards([(0, N, parts)], targets, scalars.ignore_index, stats, lse,
                         process_group)


def triton_linear_token_stats_backward(
    grad_stats, hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, stats, lse,
    scalars: Scalars, *, needs_input_grad: Sequence[bool], process_group, vocab_start: int,
    config,
):
    """The Triton backward kernel over the shard's rows (local targets, the merged ``stats`` /
    ``lse``), the float32 d_hidden / d_ref_hidden summed over the group before their cast."""
    if hidden.shape[0] == 0:  # nothing to stream: zero gradients, no collective (as torch)
        inputs = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
        return tuple(torch.zeros_like(x) if need and x is not None else None
                     for need, x in zip(needs_input_grad, inputs))

    def all_reduce(d):
        if d.numel():
            dist.all_reduce(d, op=dist.ReduceOp.SUM, group=process_group)

    return triton_backward(
        grad_stats, hidden, weight, _local_targets(targets, vocab_start, weight.shape[0],
                                                   scalars.ignore_index),
        bias, ref_hidden, ref_weight, ref_bias, stats, lse, scalars,
        needs_input_grad=needs_input_grad, config=config, reduce_hidden_grad=all_reduce)
