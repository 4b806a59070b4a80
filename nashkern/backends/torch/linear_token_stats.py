"""``linear_token_stats`` on the torch backend (the fused strategy): logits tiles are
``hidden_block @ weight_tile.T (+ bias_tile)``, recomputed in the backward and folded into
dhidden / dweight / dbias in float32."""
from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from ...kernels.layout import NUM_LSE, NUM_STATS, Scalars
from ... import tuning
from .common import (
    Partials, accumulate_block, active_fields, forward_block, needs_ref_tiles, tile_grads, upstream,
)


# ----------------------------------------------------------------------------------------------
# Hidden states + lm_head: logits tiles are hidden_block @ weight_tile.T (+ bias_tile)
# ----------------------------------------------------------------------------------------------
def _linear_tiles(V: int) -> Iterator[Tuple[int, int]]:
    for v0 in range(0, V, tuning.TORCH.linear_vocab_tile):
        yield v0, min(V, v0 + tuning.TORCH.linear_vocab_tile)


def _head_tile(h: torch.Tensor, weight, bias, v0: int, v1: int):
    """(float32 logits tile ``[rows, v1 - v0]``, float32 weight tile)."""
    w = weight[v0:v1].float()
    z = h @ w.T
    if bias is not None:
        z = z + bias[v0:v1].float()
    return z, w


def _linear_row_blocks(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets,
                       vocab_start: int = 0):
    """Row blocks of the head: ``(n0, n1, tiles, targets block)``; ``tiles`` yields
    ``(vocab_start + v0, (z, r))``, the float32 logits tiles of ``weight``'s rows (the global
    column of a vocabulary shard that starts at ``vocab_start``)."""
    N, V = hidden.shape[0], weight.shape[0]
    has_ref = ref_hidden is not None
    for n0 in range(0, N, tuning.TORCH.linear_rows):
        n1 = min(N, n0 + tuning.TORCH.linear_rows)
        h = hidden[n0:n1].float()
        rh = ref_hidden[n0:n1].float() if has_ref else None
        tiles = (
            (vocab_start + v0, (_head_tile(h, weight, bias, v0, v1)[0],
                                _head_tile(rh, ref_weight, ref_bias, v0, v1)[0] if has_ref else None))
            for v0, v1 in _linear_tiles(V)
        )
        yield n0, n1, tiles, (targets[n0:n1] if targets is not None else None)


def linear_token_stats_forward(
    hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, scalars: Scalars,
):
    N = hidden.shape[0]
    stats = torch.empty(NUM_STATS, N, device=hidden.device)
    lse = torch.empty(NUM_LSE, N, device=hidden.device)
    for n0, n1, tiles, t in _linear_row_blocks(hidden, weight, bias, ref_hidden, ref_weight,
                                               ref_bias, targets):
        stats[:, n0:n1], lse[:, n0:n1] = forward_block(
            tiles, n1 - n0, t, ref_hidden is not None, scalars, hidden.device)
    return stats, lse


def linear_token_stats_partials(
    hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, scalars: Scalars, *,
    vocab_start: int,
) -> List[Tuple[int, int, Partials]]:
    """The forward's online statistics over ``weight``'s rows only, per row block, not yet
    finished: a vocabulary shard starting at global column ``vocab_start`` (``targets`` global
    ids). ``backends/linear_token_stats_vocab_parallel.py`` merges them across the shards."""
    return [(n0, n1, accumulate_block(tiles, n1 - n0, t, ref_hidden is not None, scalars,
                                      hidden.device))
            for n0, n1, tiles, t in _linear_row_blocks(hidden, weight, bias, ref_hidden,
                                                        ref_weight, ref_bias, targets, vocab_start)]


def linear_token_stats_backward(
    grad_stats, hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, stats, lse,
    scalars: Scalars, *, needs_input_grad: Sequence[bool], vocab_start: int = 0, reduce_hidden_grad: Optional[Callable[[torch.Tensor], None]] = None,
):
    """``vocab_start``, ``reduce_hidden_grad``: for a vocabulary shard (``weight``'s rows start
    at global column ``vocab_start``, ``targets`` are global ids, ``stats`` / ``lse`` are the
    merged ones); ``reduce_hidden_grad`` sums the float32 d_hidden / d_ref_hidden partials
    across the shards in place, before the cast to the inputs' dtype."""
    inputs = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    need = [bool(n) and x is not None for n, x in zip(needs_input_grad, inputs)]
    need_policy, need_ref = any(need[:3]), any(need[3:])
    N, V = hidden.shape[0], weight.shape[0]
    grad = upstream(grad_stats, targets, scalars, ref_hidden is not None)
    active = active_fields(grad)
    # float32 accumulators (a bf16 dW accumulation loses precision at large N).
    acc = [torch.zeros(x.shape, device=x.device) if n else None for x, n in zip(inputs, need)]
    dh, dw, db, drh, drw, drb = acc
    has_ref = needs_ref_tiles(ref_hidden is not None, need_ref, active)
    for n0 in range(0, N, tuning.TORCH.linear_rows):
        n1 = min(N, n0 + tuning.TORCH.linear_rows)
        h = hidden[n0:n1].float()
        rh = ref_hidden[n0:n1].float() if has_ref else None
        t = targets[n0:n1] if targets is not None else None
        for v0, v1 in _linear_tiles(V):
            z, w = _head_tile(h, weight, bias, v0, v1)
            r, rw = _head_tile(rh, ref_weight, ref_bias, v0, v1) if has_ref else (None, None)
            dz, dr = tile_grads(
                z, r, vocab_start + v0, t, grad[:, n0:n1], stats[:, n0:n1], lse[:, n0:n1], scalars,
                need_policy, need_ref, active,
            )
            for d_logits, x, wt, d_x, d_w, d_b in ((dz, h, w, dh, dw, db), (dr, rh, rw, drh, drw, drb)):
                if d_logits is None:
                    continue
                if d_x is not None:  # in place: no [rows, D] / [tile, D] product temporaries
                    d_x[n0:n1].addmm_(d_logits, wt)
                if d_w is not None:
                    d_w[v0:v1].addmm_(d_logits.T, x)
                if d_b is not None:
                    d_b[v0:v1] += d_logits.sum(0)
    if reduce_hidden_grad is not None:
        for d in (dh, drh):
            if d is not None:
                reduce_hidden_grad(d)
    return tuple(None if a is None else a.to(x.dtype) for a, x in zip(acc, inputs))
