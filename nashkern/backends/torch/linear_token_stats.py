"""``linear_token_stats`` on the torch backend (the fused strategy): logits tiles are
``hidden_block @ weight_tile.T (+ bias_tile)``, recomputed in the backward and folded into
dhidden / dweight / dbias in float32.

CPU layout (DESIGN.md, "The torch backend's fused loop"): the vocabulary is cut into ranges,
each range is one work item (every row block x every tile of the range); items run on
``tuning.TORCH.linear_workers`` threads (default: torch's intra-op thread count), each running
its torch ops single-threaded into its own reused tile buffers. The forward merges the items'
online statistics per row (as the vocabulary-parallel head merges its shards); the backward
writes disjoint rows of dweight / dbias and sums the workers' float32 dhidden partials.
Single-threaded tiles with dynamic scheduling: an OpenMP team per small op spin-waits at its
barrier whenever one of its threads is descheduled by a competing process (measured, DESIGN.md).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ...kernels.layout import ENTROPY, LOGPROBS, LSE_POLICY, NUM_LSE, NUM_STATS, Scalars
from ... import tuning
from .common import (
    Partials, _pick, _times_live, active_fields, needs_ref_tiles, tile_grads, upstream,
)


# ----------------------------------------------------------------------------------------------
# Tiles, buffers, work items
# ----------------------------------------------------------------------------------------------
def _linear_tiles(v_start: int, v_end: int) -> Iterator[Tuple[int, int]]:
    for v0 in range(v_start, v_end, tuning.TORCH.linear_vocab_tile):
        yield v0, min(v_end, v0 + tuning.TORCH.linear_vocab_tile)


def _row_blocks(N: int) -> Iterator[Tuple[int, int]]:
    for n0 in range(0, N, tuning.TORCH.linear_rows):
        yield n0, min(N, n0 + tuning.TORCH.linear_rows)


class _Scratch:
    """One worker's reused float32 tile buffers (``tile(k, rows, cols)``: a contiguous
    ``[rows, cols]`` view of buffer ``k``): no fresh tensor per tile (on the CPU each fresh
    multi-MB tensor costs page faults and a fill)."""

    def __init__(self, device):
        self.device, self.flat = device, {}

    def tile(self, k: int, rows: int, cols: int) -> torch.Tensor:
        n = rows * cols
        if k not in self.flat or self.flat[k].numel() < n:
            # sized by the first request (the first tile of the first row block is the largest
            # a call asks for): a call with few rows keeps [N, tile] buffers, not [512, tile]
            self.flat[k] = torch.empty(n, device=self.device)
        return self.flat[k][:n].view(rows, cols)


def _head_tile(h: torch.Tensor, weight, bias, v0: int, v1: int, out: torch.Tensor):
    """(float32 logits tile ``[rows, v1 - v0]`` written into ``out``, float32 weight tile).
    Detached: ``out=`` takes no autograd inputs (the op's own autograd is the custom op's)."""
    w = weight[v0:v1].detach().float()
    if bias is None:
        torch.mm(h.detach(), w.T, out=out)
    else:
        torch.addmm(bias[v0:v1].detach().float(), h.detach(), w.T, out=out)
    return out, w


def _workers(device) -> int:
    """Threads for the work items: 1 off the CPU, under a dispatch mode (the allocation recorder
    and other modes are thread-local: they must see every op) or when torch runs 1 thread."""
    if device.type != "cpu" or _get_current_dispatch_mode() is not None:
        return 1
    wanted = tuning.TORCH.linear_workers
    return max(1, torch.get_num_threads() if wanted is None else wanted)


def _vocab_items(V: int, workers: int) -> List[Tuple[int, int]]:
    """The work items' vocabulary ranges: one range with one worker; else
    ``tuning.TORCH.linear_items_per_worker`` per worker (tile-aligned) for dynamic balance."""
    tile = tuning.TORCH.linear_vocab_tile
    if workers == 1:
        return [(0, V)]
    tiles = -(-V // tile)
    count = min(tiles, workers * tuning.TORCH.linear_items_per_worker)
    step = -(-tiles // count) * tile
    return [(v, min(V, v + step)) for v in range(0, V, step)]


@contextmanager
def _single_threaded_ops():
    """torch's intra-op threads set to 1 while the workers run (restored after): each worker's
    ops then run on its own thread, no OpenMP team per op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_items(items: Sequence, work: Callable, workers: int, device) -> list:
    """``[work(item, scratch, slot) for item in items]`` on ``workers`` threads pulling items in
    order (``slot``: the worker's index, for its private accumulators)."""
    if workers == 1 or len(items) == 1:
        scratch = _Scratch(device)
        return [work(item, scratch, 0) for item in items]
    results = [None] * len(items)
    next_item = iter(range(len(items)))
    lock = threading.Lock()

    def worker(slot: int):
        torch.set_grad_enabled(False)  # grad mode is per thread; the caller's op runs without
        scratch = _Scratch(device)
        while True:
            with lock:
                i = next(next_item, None)
            if i is None:
                return
            results[i] = work(items[i], scratch, slot)

    with _single_threaded_ops(), ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(worker, slot) for slot in range(workers)]:
            f.result()  # re-raises a worker's exception
    return results


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
def _rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(x, y, dim=1)


def _fast_update(parts: Partials, v0: int, a: torch.Tensor, b: Optional[torch.Tensor],
                 targets: Optional[torch.Tensor], temperature: float, scratch: _Scratch) -> None:
    """:meth:`Partials.update` without softcap or mixture, in place on the owned float32 tiles
    ``a`` (policy) and ``b`` (reference) and one scratch buffer: 7 (11 with the reference)
    passes over the tile instead of ~20 and no tile allocation. The sums ``Σe·(a − max)`` and
    ``Σe·(a − b)`` are row dots; where they come out NaN (``0 · ∓inf`` at a −inf logit, or a
    NaN logit) they are recomputed with the guarded formulas of :class:`_OnlineLSE`."""
    if temperature != 1.0:
        a.div_(temperature)
        if b is not None:
            b.div_(temperature)
    if targets is not None:
        local = targets - v0
        hit = (local >= 0) & (local < a.shape[1])
        parts.picked[0] += _pick(a, local, hit)
        if b is not None:
            parts.picked[1] += _pick(b, local, hit)
    diff = torch.sub(a, b, out=scratch.tile(2, *a.shape)) if b is not None else None
    pol = parts.pol
    pol.rebase(torch.maximum(pol.max, a.amax(dim=1)))
    shifted = a.sub_(pol.pivot[:, None])
    e = torch.exp(shifted, out=scratch.tile(3, *a.shape))
    pol.sumexp = pol.sumexp + e.sum(1)
    centered = _rowdot(e, shifted)
    if bool(centered.isnan().any()):  # exp(−inf)·(−inf) := 0: a finite floor (e is 0 there)
        centered = _rowdot(e, shifted.clamp_min_(torch.finfo(shifted.dtype).min))
    pol.centered = pol.centered + centered
    if b is not None:
        cross = _rowdot(e, diff)
        if bool(cross.isnan().any()):
            cross = _times_live(e, diff).sum(1)
        pol.cross = pol.cross + cross
        ref = parts.ref
        ref.rebase(torch.maximum(ref.max, b.amax(dim=1)))
        ref.sumexp = ref.sumexp + b.sub_(ref.pivot[:, None]).exp_().sum(1)


def _forward_item(item, scratch: _Scratch, hidden, weight, bias, ref_hidden, ref_weight, ref_bias,
                  targets, scalars: Scalars, vocab_start: int) -> List[Partials]:
    """One vocabulary range over every row block: the unfinished :class:`Partials` per block."""
    has_ref = ref_hidden is not None
    fast = scalars.softcap is None and scalars.coef is None
    blocks = []
    for n0, n1 in _row_blocks(hidden.shape[0]):
        blocks.append((n0, n1, hidden[n0:n1].float(), ref_hidden[n0:n1].float() if has_ref else None,
                       targets[n0:n1] if targets is not None else None,
                       Partials(n1 - n0, has_ref, scalars.coef is not None, hidden.device)))
    for v0, v1 in _linear_tiles(*item):
        for n0, n1, h, rh, t, parts in blocks:
            z, _ = _head_tile(h, weight, bias, v0, v1, scratch.tile(0, n1 - n0, v1 - v0))
            r = _head_tile(rh, ref_weight, ref_bias, v0, v1,
                           scratch.tile(1, n1 - n0, v1 - v0))[0] if has_ref else None
            if fast:
                _fast_update(parts, vocab_start + v0, z, r, t, scalars.temperature, scratch)
            else:
                parts.update(vocab_start + v0, z, r, t, scalars)
    return [parts for *_, parts in blocks]


def _merge_items(per_item: List[List[Partials]]) -> List[Partials]:
    """Per row block, the items' partials over disjoint vocabulary ranges merged into one
    (rescaled to the common max, sums added: the target logits are 0 outside their range)."""
    if len(per_item) == 1:
        return per_item[0]
    merged = []
    for parts in zip(*per_item):
        # a NaN max (a NaN row) propagates: the row's sums are NaN either way
        top = torch.stack([p.maxima() for p in parts]).amax(0)
        for p in parts:
            p.rebase(top)
        parts[0].set_sums(torch.stack([p.sums() for p in parts]).sum(0))
        merged.append(parts[0])
    return merged


def linear_token_stats_partials(
    hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, scalars: Scalars, *,
    vocab_start: int,
) -> List[Tuple[int, int, Partials]]:
    """The forward's online statistics over ``weight``'s rows only, per row block, not yet
    finished: a vocabulary shard starting at global column ``vocab_start`` (``targets`` global
    ids). ``backends/linear_token_stats_vocab_parallel.py`` merges them across the shards."""
    workers = _workers(hidden.device)
    per_item = _run_items(
        _vocab_items(weight.shape[0], workers),
        lambda item, scratch, slot: _forward_item(item, scratch, hidden, weight, bias, ref_hidden,
                                                  ref_weight, ref_bias, targets, scalars,
                                                  vocab_start),
        workers, hidden.device)
    return [(n0, n1, parts) for (n0, n1), parts
            in zip(_row_blocks(hidden.shape[0]), _merge_items(per_item))]


def linear_token_stats_forward(
    hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, scalars: Scalars,
):
    N = hidden.shape[0]
    stats = torch.empty(NUM_STATS, N, device=hidden.device)
    lse = torch.empty(NUM_LSE, N, device=hidden.device)
    for n0, n1, parts in linear_token_stats_partials(hidden, weight, targets, bias, ref_hidden,
                                                     ref_weight, ref_bias, scalars, vocab_start=0):
        t = targets[n0:n1] if targets is not None else None
        stats[:, n0:n1], lse[:, n0:n1] = parts.finish(t, scalars.ignore_index)
    return stats, lse


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
def _fast_policy_grads(z: torch.Tensor, v0: int, targets: Optional[torch.Tensor],
                       grad: torch.Tensor, stats: torch.Tensor, lse_policy: torch.Tensor,
                       temperature: float, use_lp: bool, use_ent: bool,
                       scratch: _Scratch) -> Optional[torch.Tensor]:
    """The policy logit gradient when only the log-probs and / or the entropy carry an upstream
    gradient (``grad [5, rows]``) and there is no softcap, in place on the owned tile ``z``:
    ``(p·(α + β·log p) + onehot(t)·g_lp) / T`` with ``α = −g_lp − g_ent·H``, ``β = −g_ent``
    (4-6 passes). None for a tile holding a non-finite logit (the caller uses
    :func:`tile_grads`, whose guards give ``exp(−inf)·(−inf) := 0``). A row whose upstream
    gradients are all 0 is exactly 0, even a NaN row (``_guarded``'s rule)."""
    if use_ent:
        lo, hi = torch.aminmax(z)
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            return None
    g_lp = grad[LOGPROBS] if use_lp else torch.zeros_like(lse_policy)
    alpha = -g_lp
    if temperature != 1.0:
        z.div_(temperature)
    logp = z.sub_(lse_policy[:, None])
    dz = torch.exp(logp, out=scratch.tile(3, *z.shape))
    if use_ent:
        alpha = alpha - grad[ENTROPY] * stats[ENTROPY]
        dz.mul_(logp.mul_(-grad[ENTROPY][:, None]).add_(alpha[:, None]))
        idle = ((g_lp == 0) & (grad[ENTROPY] == 0)).nonzero().squeeze(1)
    else:
        dz.mul_(alpha[:, None])
        idle = (g_lp == 0).nonzero().squeeze(1)
    if idle.numel():
        dz.index_fill_(0, idle, 0.0)
    if use_lp:
        local = targets - v0
        hit = (local >= 0) & (local < z.shape[1])
        local = torch.where(hit, local, torch.zeros_like(local))[:, None]
        dz.scatter_add_(1, local, torch.where(hit, g_lp, torch.zeros_like(g_lp))[:, None])
    return dz.div_(temperature) if temperature != 1.0 else dz


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
    has_ref = needs_ref_tiles(ref_hidden is not None, need_ref, active)
    # only the log-probs and / or the entropy carry a gradient, into the policy alone
    use_lp, use_ent = active[LOGPROBS] and targets is not None, active[ENTROPY]
    fast = (scalars.softcap is None and not need_ref and (use_lp or use_ent)
            and not any(a for f, a in enumerate(active) if f not in (LOGPROBS, ENTROPY)))
    # float32 accumulators (a bf16 dW accumulation loses precision at large N); d_hidden and
    # d_ref_hidden per worker (every item adds to every row), the others by disjoint rows.
    workers = _workers(hidden.device)
    acc = [torch.zeros(x.shape, device=x.device) if n else None for x, n in zip(inputs, need)]
    dh, dw, db, drh, drw, drb = acc
    hidden_acc = [(dh, drh)] + [
        tuple(None if d is None else torch.zeros_like(d) for d in (dh, drh))
        for _ in range(workers - 1)]
    blocks = [(n0, n1) for n0, n1 in _row_blocks(N)]

    def item_grads(item, scratch: _Scratch, slot: int):
        my_dh, my_drh = hidden_acc[slot]
        h_blocks = [hidden[n0:n1].float() for n0, n1 in blocks]
        rh_blocks = [ref_hidden[n0:n1].float() if has_ref else None for n0, n1 in blocks]
        for v0, v1 in _linear_tiles(*item):
            for (n0, n1), h, rh in zip(blocks, h_blocks, rh_blocks):
                t = targets[n0:n1] if targets is not None else None
                z, w = _head_tile(h, weight, bias, v0, v1, scratch.tile(0, n1 - n0, v1 - v0))
                dz = dr = rw = None
                if fast:
                    dz = _fast_policy_grads(z, vocab_start + v0, t, grad[:, n0:n1],
                                            stats[:, n0:n1], lse[LSE_POLICY, n0:n1],
                                            scalars.temperature, use_lp, use_ent, scratch)
                if dz is None:
                    r, rw = _head_tile(rh, ref_weight, ref_bias, v0, v1,
                                       scratch.tile(1, n1 - n0, v1 - v0)) if has_ref else (None, None)
                    dz, dr = tile_grads(
                        z, r, vocab_start + v0, t, grad[:, n0:n1], stats[:, n0:n1],
                        lse[:, n0:n1], scalars, need_policy, need_ref, active)
                for d_logits, x, wt, d_x, d_w, d_b in ((dz, h, w, my_dh, dw, db),
                                                       (dr, rh, rw, my_drh, drw, drb)):
                    if d_logits is None:
                        continue
                    if d_x is not None:  # in place: no [rows, D] / [tile, D] product temporaries
                        d_x[n0:n1].addmm_(d_logits, wt)
                    if d_w is not None:
                        d_w[v0:v1].addmm_(d_logits.T, x)
                    if d_b is not None:
                        d_b[v0:v1] += d_logits.sum(0)

    _run_items(_vocab_items(V, workers), item_grads, workers, hidden.device)
    for extra_dh, extra_drh in hidden_acc[1:]:
        for total, part in ((dh, extra_dh), (drh, extra_drh)):
            if total is not None:
                total += part
    if reduce_hidden_grad is not None:
        for d in (dh, drh):
            if d is not None:
                reduce_hidden_grad(d)
    return tuple(None if a is None else a.to(x.dtype) for a, x in zip(acc, inputs))
