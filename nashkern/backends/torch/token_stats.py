"""``token_stats`` on the torch backend: logits ``[G, R, V]`` views, row blocks x vocabulary
tiles in float32 (the streaming core is ``common.py``)."""
from __future__ import annotations

from typing import Callable, Iterator, Tuple

import torch

from ...kernels.layout import NUM_LSE, NUM_STATS, Scalars, grad_outputs
from ... import tuning
from .common import active_fields, forward_block, needs_ref_tiles, tile_grads, upstream


# ----------------------------------------------------------------------------------------------
# Logits input: [G, R, V] views
# ----------------------------------------------------------------------------------------------
def _row_blocks(G: int, R: int, V: int) -> Iterator[Tuple[int, int, Callable]]:
    """Row blocks of a ``[G, R, V]`` tensor as ``(n0, n1, take)``; ``take(x3)`` returns the block
    as ``[n1 - n0, V]`` (a view of a contiguous result; at most the block is copied)."""
    rows = max(1, tuning.TORCH.logits_tile_elements // max(V, 1))
    if G * R == 0:
        return
    if R >= rows:
        for g in range(G):
            for r0 in range(0, R, rows):
                r1 = min(R, r0 + rows)
                yield g * R + r0, g * R + r1, (lambda x, g=g, r0=r0, r1=r1: x[g, r0:r1])
    else:
        step = max(1, rows // R)
        for g0 in range(0, G, step):
            g1 = min(G, g0 + step)
            yield g0 * R, g1 * R, (lambda x, g0=g0, g1=g1: x[g0:g1].reshape(-1, x.shape[-1]))


def _vocab_tiles(V: int, rows: int) -> Iterator[Tuple[int, int]]:
    width = max(1, min(V, tuning.TORCH.logits_tile_elements // max(rows, 1)))
    for v0 in range(0, V, width):
        yield v0, min(V, v0 + width)


def token_stats_forward(logits, targets, ref_logits, scalars: Scalars):
    G, R, V = logits.shape
    N = G * R
    stats = torch.empty(NUM_STATS, N, device=logits.device)
    lse = torch.empty(NUM_LSE, N, device=logits.device)
    for n0, n1, take in _row_blocks(G, R, V):
        z_rows = take(logits)
        r_rows = take(ref_logits) if ref_logits is not None else None
        tiles = (
            (v0, (z_rows[:, v0:v1].float(), None if r_rows is None else r_rows[:, v0:v1].float()))
            for v0, v1 in _vocab_tiles(V, n1 - n0)
        )
        t = targets[n0:n1] if targets is not None else None
        stats[:, n0:n1], lse[:, n0:n1] = forward_block(
            tiles, n1 - n0, t, ref_logits is not None, scalars, logits.device)
    return stats, lse


def token_stats_backward(
    grad_stats, logits, targets, ref_logits, stats, lse, scalars: Scalars, *, needs_grad_logits,
    needs_grad_ref, out=None,
):
    """``out``: optional (grad_logits, grad_ref) destinations, possibly the inputs themselves
    (each tile is read before its gradient is written)."""
    G, R, V = logits.shape
    grad = upstream(grad_stats, targets, scalars, ref_logits is not None)
    active = active_fields(grad)
    needs_grad_ref = needs_grad_ref and ref_logits is not None
    d_logits, d_ref = grad_outputs(logits, ref_logits, needs_grad_logits, needs_grad_ref, out)
    use_ref = needs_ref_tiles(ref_logits is not None, needs_grad_ref, active)
    for n0, n1, take in _row_blocks(G, R, V):
        z_rows = take(logits)
        r_rows = take(ref_logits) if use_ref else None
        t = targets[n0:n1] if targets is not None else None
        for v0, v1 in _vocab_tiles(V, n1 - n0):
            dz, dr = tile_grads(
                z_rows[:, v0:v1].float(), None if r_rows is None else r_rows[:, v0:v1].float(), v0,
                t, grad[:, n0:n1], stats[:, n0:n1], lse[:, n0:n1], scalars, needs_grad_logits,
                needs_grad_ref, active,
            )
            if d_logits is not None:
                take(d_logits)[:, v0:v1] = dz
            if d_ref is not None:
                take(d_ref)[:, v0:v1] = dr
    return d_logits, d_ref
