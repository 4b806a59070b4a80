"""Streaming plain-PyTorch backend (``backend="torch"``): the CPU path of every op.

It runs the same algorithm as the Triton kernels, tile by tile, in float32:

* forward: for each block of rows, stream over vocabulary tiles keeping per-row online
  statistics (running max, Σexp, Σexp·(a − max) for the entropy, Σexp·(a − b) for the KL, the
  mixture's running max and Σexp, and the target logits); only the ``[5, N]`` statistics and the
  ``[3, N]`` log-sum-exps are kept;
* backward: recompute each tile from the saved log-sum-exps and consume its logit gradient
  (written out for logits input; folded into dhidden / dweight / dbias in float32 for hidden
  states).

The largest temporary is a few ``[rows, vocab_tile]`` float32 tiles (sizes in
:mod:`nashkern.tuning`), never ``[N, V]``. The math is spelled out in DESIGN.md.
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from ...naive import mix_logits as _mix  # the coef end-point rule (kernels/layout.py)
from ...tuning import TORCH
from ...kernels.layout import (
    ENTROPY, KL, LOGPROBS, LSE_MIXTURE, LSE_POLICY, LSE_REF, MIXTURE_LOGPROBS, NUM_LSE, NUM_STATS,
    REF_LOGPROBS, grad_outputs,
)

NEG_INF = float("-inf")
Tile = Tuple[torch.Tensor, Optional[torch.Tensor]]  # raw float32 (policy, reference) logits


# ----------------------------------------------------------------------------------------------
# Elementwise pieces
# ----------------------------------------------------------------------------------------------
def _cap(z: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    if softcap is None:
        return z
    return torch.where(z == NEG_INF, z, softcap * torch.tanh(z / softcap))


def _scale_grad(g: torch.Tensor, z: torch.Tensor, temperature: float, softcap: Optional[float]):
    """Chain rule through ``cap(z) / T``: ``g / T * cap'(z)`` (cap' = 0 at −inf)."""
    g = _temper(g, temperature)
    if softcap is None:
        return g
    t = torch.tanh(z / softcap)
    # g == 0 (an ignored row) stays exactly 0 even where z is NaN (tanh(NaN) would leak).
    return torch.where((z == NEG_INF) | (g == 0), torch.zeros_like(g), g * (1.0 - t * t))


# On CPU tiles ``torch.where`` costs ~25x a multiply (3.5 ms vs 0.13 ms for a 512 x 2048 fp32
# tile, torch 2.13, AMD EPYC, 1 thread), so the helpers below keep the multiply as the common
# path and fall back to ``where`` only for tiles that hold non-finite values (on other devices
# they use ``where`` directly: no host sync).
def _temper(x: torch.Tensor, temperature: float) -> torch.Tensor:
    return x if temperature == 1.0 else x / temperature


def _times_live(e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``e * x`` with 0 wherever ``e == 0``, whatever ``x`` is (``exp(−inf)·(−inf) := 0``)."""
    if x.device.type == "cpu" and bool(torch.isfinite(x).all()):
        return e * x
    return torch.where(e > 0, e * x, torch.zeros((), device=e.device))


def _guarded(g: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """``g[:, None] * term`` where a zero upstream grad contributes exactly zero."""
    if term.device.type != "cpu":
        return torch.where(g[:, None] != 0, g[:, None] * term, torch.zeros((), device=term.device))
    out = term * g[:, None]
    idle = (g == 0).nonzero().squeeze(1)
    return out.index_fill_(0, idle, 0.0) if idle.numel() else out


class _OnlineLSE:
    """Per-row online log-sum-exp over vocabulary tiles.

    ``centered`` accumulates Σ exp(x − pivot)·(x − pivot) (for the entropy) and ``cross``
    accumulates Σ exp(x − pivot)·y (for the KL), both rescaled whenever the pivot (the running
    max, held at 0 while every entry seen is −inf) moves. Entries with exp(x − pivot) == 0
    contribute nothing, whatever y is.
    """

    def __init__(self, rows: int, device, centered: bool = False, cross: bool = False):
        self.max = torch.full((rows,), NEG_INF, device=device)
        self.pivot = torch.zeros(rows, device=device)
        self.sumexp = torch.zeros(rows, device=device)
        self.centered = torch.zeros(rows, device=device) if centered else None
        self.cross = torch.zeros(rows, device=device) if cross else None

    def rebase(self, new_max: torch.Tensor) -> None:
        """Move the pivot to ``new_max`` (>= every max seen so far, per row) and rescale the
        sums to it. A row with nothing finite seen yet holds zero sums: its scale is 0, never
        ``exp(overflow) * 0``. Used per tile and to merge the shards of a vocabulary-parallel
        head (``backends/vocab_parallel.py``)."""
        new_pivot = torch.where(new_max == NEG_INF, torch.zeros_like(new_max), new_max)
        scale = torch.where(self.max == NEG_INF, torch.zeros_like(new_max),
                            torch.exp(self.pivot - new_pivot))
        if self.centered is not None:
            self.centered = scale * (self.centered + (self.pivot - new_pivot) * self.sumexp)
        if self.cross is not None:
            self.cross = scale * self.cross
        self.sumexp = scale * self.sumexp
        self.max, self.pivot = new_max, new_pivot

    def update(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> None:
        self.rebase(torch.maximum(self.max, x.amax(dim=1)))
        shifted = x - self.pivot[:, None]
        e = torch.exp(shifted)
        if self.centered is not None:
            # e·shifted with exp(−inf)·(−inf) := 0: a finite floor under the shift (e is 0 there)
            self.centered = self.centered + torch.linalg.vecdot(
                e, shifted.clamp_min_(torch.finfo(shifted.dtype).min), dim=1)
        if self.cross is not None:
            self.cross = self.cross + _times_live(e, y).sum(1)
        self.sumexp = self.sumexp + e.sum(1)

    def sums(self) -> List[torch.Tensor]:
        """The per-row sums (Σe, then Σe·(x − pivot) and Σe·y where kept), relative to the pivot."""
        return [x for x in (self.sumexp, self.centered, self.cross) if x is not None]

    def set_sums(self, sums: Sequence[torch.Tensor]) -> None:
        it = iter(sums)
        self.sumexp = next(it)
        self.centered = None if self.centered is None else next(it)
        self.cross = None if self.cross is None else next(it)

    def lse(self) -> torch.Tensor:
        return self.pivot + torch.log(self.sumexp)

    def entropy(self) -> torch.Tensor:
        return torch.log(self.sumexp) - self.centered / self.sumexp


def _pick(x: torch.Tensor, local: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
    """x[i, local[i]] where hit[i], else 0."""
    idx = local.clamp(0, x.shape[1] - 1)
    return torch.where(hit, x.gather(1, idx[:, None]).squeeze(1), torch.zeros((), device=x.device))


# ----------------------------------------------------------------------------------------------
# The streaming core: one row block, any source of tiles
# ----------------------------------------------------------------------------------------------
class _Partials:
    """One row block's online statistics over the vocabulary tiles seen so far: the policy,
    reference and mixture accumulators and the target logits (a, b, m at the target, 0 where
    the target lies in no tile seen). :meth:`finish` turns them into ``stats`` / ``lse``; a
    vocabulary-parallel head merges the shards' partials first (:meth:`maxima`, :meth:`rebase`,
    :meth:`sums`, :meth:`set_sums`: ``backends/vocab_parallel.py``)."""

    def __init__(self, rows: int, has_ref: bool, has_mix: bool, device):
        self.pol = _OnlineLSE(rows, device, centered=True, cross=has_ref)
        self.ref = _OnlineLSE(rows, device) if has_ref else None
        self.mix = _OnlineLSE(rows, device) if has_mix else None
        self.picked = torch.zeros(3, rows, device=device)

    def accumulators(self) -> List[_OnlineLSE]:
        return [x for x in (self.pol, self.ref, self.mix) if x is not None]

    def maxima(self) -> torch.Tensor:
        """``[k, rows]``: each accumulator's running max."""
        return torch.stack([acc.max for acc in self.accumulators()])

    def rebase(self, maxima: torch.Tensor) -> None:
        for acc, m in zip(self.accumulators(), maxima):
            acc.rebase(m)

    def sums(self) -> torch.Tensor:
        """``[s, rows]``: every accumulator's sums (relative to its pivot), then the 3 target logits."""
        return torch.cat([torch.stack([x for acc in self.accumulators() for x in acc.sums()]),
                          self.picked])

    def set_sums(self, sums: torch.Tensor) -> None:
        rows = iter(sums)
        for acc in self.accumulators():
            acc.set_sums([next(rows) for _ in acc.sums()])
        self.picked = sums[-3:]

    def update(self, v0: int, z: torch.Tensor, r: Optional[torch.Tensor],
               targets: Optional[torch.Tensor], coef: Optional[float], temperature: float,
               softcap: Optional[float]) -> None:
        """Fold in one tile of raw float32 logits, columns ``v0 : v0 + z.shape[1]``."""
        a = _temper(_cap(z, softcap), temperature)
        b = _temper(_cap(r, softcap), temperature) if self.ref is not None else None
        self.pol.update(a, None if b is None else a - b)
        if self.ref is not None:
            self.ref.update(b)
        m = _mix(a, b, coef) if self.mix is not None else None
        if m is not None:
            self.mix.update(m)
        if targets is not None:
            local = targets - v0
            hit = (local >= 0) & (local < a.shape[1])
            for k, x in enumerate((a, b, m)):
                if x is not None:
                    self.picked[k] += _pick(x, local, hit)

    def finish(self, targets: Optional[torch.Tensor], ignore_index: int
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Statistics ``[5, rows]`` and log-sum-exps ``[3, rows]``."""
        pol, ref, mix, picked = self.pol, self.ref, self.mix, self.picked
        rows, device = picked.shape[1], picked.device
        stats = torch.zeros(NUM_STATS, rows, device=device)
        lse = torch.zeros(NUM_LSE, rows, device=device)
        lse[LSE_POLICY] = pol.lse()
        stats[ENTROPY] = pol.entropy()
        if ref is not None:
            lse[LSE_REF] = ref.lse()
            stats[KL] = pol.cross / pol.sumexp - lse[LSE_POLICY] + lse[LSE_REF]
        if mix is not None:
            lse[LSE_MIXTURE] = mix.lse()
        if targets is not None:
            stats[LOGPROBS] = picked[0] - lse[LSE_POLICY]
            if ref is not None:
                stats[REF_LOGPROBS] = picked[1] - lse[LSE_REF]
            if mix is not None:
                stats[MIXTURE_LOGPROBS] = picked[2] - lse[LSE_MIXTURE]
            stats[:, targets == ignore_index] = 0.0
        return stats, lse


def _accumulate_block(
    tiles: Iterator[Tuple[int, Tile]], rows: int, targets: Optional[torch.Tensor], has_ref: bool,
    coef: Optional[float], temperature: float, softcap: Optional[float], device,
) -> _Partials:
    parts = _Partials(rows, has_ref, coef is not None, device)
    for v0, (z, r) in tiles:
        parts.update(v0, z, r, targets, coef, temperature, softcap)
    return parts


def _forward_block(
    tiles: Iterator[Tuple[int, Tile]], rows: int, targets: Optional[torch.Tensor], has_ref: bool,
    coef: Optional[float], temperature: float, softcap: Optional[float], ignore_index: int, device,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Statistics ``[5, rows]`` and log-sum-exps ``[3, rows]`` of one row block."""
    return _accumulate_block(tiles, rows, targets, has_ref, coef, temperature, softcap,
                             device).finish(targets, ignore_index)


def _tile_grads(
    z: torch.Tensor, r: Optional[torch.Tensor], v0: int, targets: Optional[torch.Tensor],
    grad: torch.Tensor, stats: torch.Tensor, lse: torch.Tensor, coef: Optional[float],
    temperature: float, softcap: Optional[float], need_policy: bool, need_ref: bool,
    active: Sequence[bool],
) -> Tile:
    """Gradients w.r.t. the raw logits tile(s), given upstream ``grad [5, rows]`` (ignored rows
    already zeroed) and the block's saved ``stats`` / ``lse``. Formulas in DESIGN.md.

    ``active[f]`` is False when field ``f``'s upstream gradient is zero everywhere: its term is
    skipped (it would add exact zeros), which saves both the work and the tile temporaries,
    e.g. log-probs alone need one ``[rows, tile]`` term, not five. The target one-hot terms are
    scattered (``+g`` at the target column), never built as a dense tile."""
    has_targets = targets is not None
    use_lp = active[LOGPROBS] and has_targets
    use_ent = active[ENTROPY]
    use_kl = active[KL] and r is not None
    use_rlp = active[REF_LOGPROBS] and has_targets and r is not None
    use_mix = active[MIXTURE_LOGPROBS] and has_targets and r is not None and coef is not None
    ga = gb = None
    local = hit = None
    if has_targets:
        local = targets - v0
        hit = (local >= 0) & (local < z.shape[1])
        local = torch.where(hit, local, torch.zeros_like(local))[:, None]

    def plus(acc, term):
        return term if acc is None else acc.add_(term)

    def plus_target(acc, g):  # acc[i, target_i] += g_i where the target lies in this tile
        if acc is None:
            acc = torch.zeros_like(z)
        return acc.scatter_add_(1, local, torch.where(hit, g, torch.zeros_like(g))[:, None])

    a = _temper(_cap(z, softcap), temperature)
    if use_lp or use_ent or use_kl:
        logp = a - lse[LSE_POLICY][:, None]
        p = torch.exp(logp)
        if use_ent:
            ga = plus(ga, _guarded(grad[ENTROPY], -_times_live(p, logp + stats[ENTROPY][:, None])))
        if use_lp:
            ga = plus_target(plus(ga, _guarded(grad[LOGPROBS], -p)), grad[LOGPROBS])
    if use_kl or use_rlp or use_mix:
        b = _temper(_cap(r, softcap), temperature)
        if use_kl or use_rlp:
            logq = b - lse[LSE_REF][:, None]
            q = torch.exp(logq)
        if use_kl:
            ga = plus(ga, _guarded(grad[KL], _times_live(p, logp - logq - stats[KL][:, None])))
            gb = plus(gb, _guarded(grad[KL], q - p))
        if use_rlp:
            gb = plus_target(plus(gb, _guarded(grad[REF_LOGPROBS], -q)), grad[REF_LOGPROBS])
        if use_mix:
            pi = torch.exp(_mix(a, b, coef) - lse[LSE_MIXTURE][:, None])
            g = grad[MIXTURE_LOGPROBS]
            if coef != 1:
                ga = plus_target(plus(ga, _guarded((1.0 - coef) * g, -pi)), (1.0 - coef) * g)
            if coef != 0:
                gb = plus_target(plus(gb, _guarded(coef * g, -pi)), coef * g)
    dz = dr = None
    if need_policy:
        dz = torch.zeros_like(z) if ga is None else _scale_grad(ga, z, temperature, softcap)
    if need_ref and r is not None:
        dr = torch.zeros_like(r) if gb is None else _scale_grad(gb, r, temperature, softcap)
    return dz, dr


def _needs_ref_tiles(has_ref: bool, need_ref_grad: bool, active: Sequence[bool]) -> bool:
    """Whether the backward must recompute reference tiles: for the reference's own gradient,
    or for the policy terms that read them (KL, mixture). A frozen reference whose fields carry
    no gradient into the policy (e.g. log-probs-only losses: Nash-MD's sample KL, DPO, XPO)
    costs nothing in the backward."""
    return has_ref and (need_ref_grad or active[KL] or active[MIXTURE_LOGPROBS])


def _active_fields(grad: torch.Tensor) -> list:
    """Which of the 5 fields have a nonzero upstream gradient anywhere (one host sync). While a
    CUDA graph is being captured no host sync is allowed: every field counts as active there
    (same result, the skipped work is done)."""
    if grad.is_cuda and torch.cuda.is_current_stream_capturing():
        return [True] * grad.shape[0]
    return (grad != 0).any(dim=1).tolist() if grad.shape[1] else [False] * grad.shape[0]


def _upstream(grad_stats: torch.Tensor, targets: Optional[torch.Tensor], ignore_index: int,
              coef: Optional[float], has_ref: bool) -> torch.Tensor:
    """float32 upstream gradients ``[5, N]``, 0 on ignored rows. At the mixture's end points
    (coef 0 / 1, where the mixture IS the policy / the reference) the mixture's gradient is
    folded into the log-probs' / reference log-probs' row: exact, and a policy-only loss at
    coef 0 then never needs the reference's tiles."""
    g = grad_stats.float()
    if targets is not None:
        g = torch.where((targets == ignore_index)[None, :], torch.zeros((), device=g.device), g)
        if has_ref and coef in (0.0, 1.0):
            g = g.clone()
            g[LOGPROBS if coef == 0 else REF_LOGPROBS] += g[MIXTURE_LOGPROBS]
            g[MIXTURE_LOGPROBS] = 0.0
    return g


# ----------------------------------------------------------------------------------------------
# Logits input: [G, R, V] views
# ----------------------------------------------------------------------------------------------
def _row_blocks(G: int, R: int, V: int) -> Iterator[Tuple[int, int, Callable]]:
    """Row blocks of a ``[G, R, V]`` tensor as ``(n0, n1, take)``; ``take(x3)`` returns the block
    as ``[n1 - n0, V]`` (a view of a contiguous result; at most the block is copied)."""
    rows = max(1, TORCH.logits_tile_elements // max(V, 1))
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
    width = max(1, min(V, TORCH.logits_tile_elements // max(rows, 1)))
    for v0 in range(0, V, width):
        yield v0, min(V, v0 + width)


def token_stats_forward(logits, targets, ref_logits, *, coef, temperature, softcap, ignore_index):
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
        stats[:, n0:n1], lse[:, n0:n1] = _forward_block(
            tiles, n1 - n0, t, ref_logits is not None, coef, temperature, softcap, ignore_index,
            logits.device,
        )
    return stats, lse


def token_stats_backward(
    grad_stats, logits, targets, ref_logits, stats, lse, *, coef, temperature, softcap,
    ignore_index, needs_grad_logits, needs_grad_ref, out=None,
):
    """``out``: optional (grad_logits, grad_ref) destinations, possibly the inputs themselves
    (each tile is read before its gradient is written)."""
    G, R, V = logits.shape
    grad = _upstream(grad_stats, targets, ignore_index, coef, ref_logits is not None)
    active = _active_fields(grad)
    needs_grad_ref = needs_grad_ref and ref_logits is not None
    d_logits, d_ref = grad_outputs(logits, ref_logits, needs_grad_logits, needs_grad_ref, out)
    use_ref = _needs_ref_tiles(ref_logits is not None, needs_grad_ref, active)
    for n0, n1, take in _row_blocks(G, R, V):
        z_rows = take(logits)
        r_rows = take(ref_logits) if use_ref else None
        t = targets[n0:n1] if targets is not None else None
        for v0, v1 in _vocab_tiles(V, n1 - n0):
            dz, dr = _tile_grads(
                z_rows[:, v0:v1].float(), None if r_rows is None else r_rows[:, v0:v1].float(), v0,
                t, grad[:, n0:n1], stats[:, n0:n1], lse[:, n0:n1], coef, temperature, softcap,
                needs_grad_logits, needs_grad_ref, active,
            )
            if d_logits is not None:
                take(d_logits)[:, v0:v1] = dz
            if d_ref is not None:
                take(d_ref)[:, v0:v1] = dr
    return d_logits, d_ref


# ----------------------------------------------------------------------------------------------
# Hidden states + lm_head: logits tiles are hidden_block @ weight_tile.T (+ bias_tile)
# ----------------------------------------------------------------------------------------------
def _linear_tiles(V: int) -> Iterator[Tuple[int, int]]:
    for v0 in range(0, V, TORCH.linear_vocab_tile):
        yield v0, min(V, v0 + TORCH.linear_vocab_tile)


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
    for n0 in range(0, N, TORCH.linear_rows):
        n1 = min(N, n0 + TORCH.linear_rows)
        h = hidden[n0:n1].float()
        rh = ref_hidden[n0:n1].float() if has_ref else None
        tiles = (
            (vocab_start + v0, (_head_tile(h, weight, bias, v0, v1)[0],
                                _head_tile(rh, ref_weight, ref_bias, v0, v1)[0] if has_ref else None))
            for v0, v1 in _linear_tiles(V)
        )
        yield n0, n1, tiles, (targets[n0:n1] if targets is not None else None)


def linear_token_stats_forward(
    hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, *, coef, temperature, softcap,
    ignore_index,
):
    N = hidden.shape[0]
    stats = torch.empty(NUM_STATS, N, device=hidden.device)
    lse = torch.empty(NUM_LSE, N, device=hidden.device)
    for n0, n1, tiles, t in _linear_row_blocks(hidden, weight, bias, ref_hidden, ref_weight,
                                               ref_bias, targets):
        stats[:, n0:n1], lse[:, n0:n1] = _forward_block(
            tiles, n1 - n0, t, ref_hidden is not None, coef, temperature, softcap, ignore_index,
            hidden.device,
        )
    return stats, lse


def linear_token_stats_partials(
    hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, *, coef, temperature, softcap,
    vocab_start: int,
) -> List[Tuple[int, int, _Partials]]:
    """The forward's online statistics over ``weight``'s rows only, per row block, not yet
    finished: a vocabulary shard starting at global column ``vocab_start`` (``targets`` global
    ids). ``backends/vocab_parallel.py`` merges them across the shards."""
    return [(n0, n1, _accumulate_block(tiles, n1 - n0, t, ref_hidden is not None, coef,
                                       temperature, softcap, hidden.device))
            for n0, n1, tiles, t in _linear_row_blocks(hidden, weight, bias, ref_hidden,
                                                        ref_weight, ref_bias, targets, vocab_start)]


def linear_token_stats_backward(
    grad_stats, hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, stats, lse, *,
    coef, temperature, softcap, ignore_index, needs_input_grad: Sequence[bool],
    vocab_start: int = 0, reduce_hidden_grad: Optional[Callable[[torch.Tensor], None]] = None,
):
    """``vocab_start``, ``reduce_hidden_grad``: for a vocabulary shard (``weight``'s rows start
    at global column ``vocab_start``, ``targets`` are global ids, ``stats`` / ``lse`` are the
    merged ones); ``reduce_hidden_grad`` sums the float32 d_hidden / d_ref_hidden partials
    across the shards in place, before the cast to the inputs' dtype."""
    inputs = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    need = [bool(n) and x is not None for n, x in zip(needs_input_grad, inputs)]
    need_policy, need_ref = any(need[:3]), any(need[3:])
    N, V = hidden.shape[0], weight.shape[0]
    grad = _upstream(grad_stats, targets, ignore_index, coef, ref_hidden is not None)
    active = _active_fields(grad)
    # float32 accumulators (a bf16 dW accumulation loses precision at large N).
    acc = [torch.zeros(x.shape, device=x.device) if n else None for x, n in zip(inputs, need)]
    dh, dw, db, drh, drw, drb = acc
    has_ref = _needs_ref_tiles(ref_hidden is not None, need_ref, active)
    for n0 in range(0, N, TORCH.linear_rows):
        n1 = min(N, n0 + TORCH.linear_rows)
        h = hidden[n0:n1].float()
        rh = ref_hidden[n0:n1].float() if has_ref else None
        t = targets[n0:n1] if targets is not None else None
        for v0, v1 in _linear_tiles(V):
            z, w = _head_tile(h, weight, bias, v0, v1)
            r, rw = _head_tile(rh, ref_weight, ref_bias, v0, v1) if has_ref else (None, None)
            dz, dr = _tile_grads(
                z, r, vocab_start + v0, t, grad[:, n0:n1], stats[:, n0:n1], lse[:, n0:n1], coef, temperature,
                softcap, need_policy, need_ref, active,
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


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def mixture_sample(logits, ref_logits, *, coef, temperature, generator):
    """Sample from softmax(mix(z / T, r / T, coef)) by a two-level inverse CDF, row block by
    row block. ``[B, V] -> [B]`` (-1 for a row with no finite entry or a NaN).

    One ``exp``; sums of vocabulary blocks (float32 inside a block, float64 across blocks), a
    uniform per row and a search over the block sums pick a block, then a float64 prefix sum
    inside that block picks the token: tail probabilities (~1e-12) keep their mass next to a
    large head, and only ``[B, sample_block]`` is ever prefix-summed. On the CPU this is a few
    ms per [8, 151936] call vs 15 ms for a float64 prefix sum over whole rows and 13-15 ms for
    Gumbel-max (a uniform and two logs per entry). The GPU kernels use Gumbel-max (one pass, no
    prefix sums across tiles)."""
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.long, device=logits.device)
    rows = max(1, TORCH.logits_tile_elements // max(V, 1))
    block = min(TORCH.sample_block, V)
    full = V // block * block
    cols = torch.arange(block, device=logits.device)
    for n0 in range(0, B, rows):
        n1 = min(B, n0 + rows)
        # mix, then temper: only the operand(s) with nonzero weight are touched
        mixed = _mix(logits[n0:n1].float(), ref_logits[n0:n1].float(), coef)
        m = _temper(mixed, temperature)
        top = m.amax(dim=1, keepdim=True)  # NaN if the row has a NaN
        valid = (top > NEG_INF) & ~torch.isnan(top)
        w = torch.exp(m - torch.where(valid, top, torch.zeros_like(top)))
        # A +inf tempered logit (a +inf mixture logit, or m / T overflowing at a tiny T) takes
        # all the mass: the limit distribution is uniform over the maxima of the untempered
        # mixture (exp(inf - inf) would be NaN and send the search past V).
        # On the CPU the rare case is looked for first (a [rows, 1] read; a full-row where costs
        # ~15 ms per [8, 151936] call there, nearly doubling the sampler); no host read on GPUs.
        saturated = top == float("inf")
        if m.device.type != "cpu" or bool(saturated.any()):
            w = torch.where(saturated, (mixed == mixed.amax(dim=1, keepdim=True)).float(), w)
        sums = w[:, :full].view(n1 - n0, -1, block).sum(2)
        if full < V:
            sums = torch.cat([sums, w[:, full:].sum(1, keepdim=True)], 1)
        u = torch.rand((n1 - n0, 1), dtype=torch.float64, device=m.device, generator=generator)
        k, u = _search(sums, u)  # the block, then u's residual inside it
        idx = k * block + cols[None, :]
        inner = torch.where(idx < V, w.gather(1, idx.clamp_max(V - 1)), torch.zeros((), device=w.device))
        j, _ = _search(inner, u, scaled=True)
        pick = (k * block + j).squeeze(1)
        out[n0:n1] = torch.where(valid.squeeze(1), pick, torch.full_like(pick, -1))
    return out


def _search(weights: torch.Tensor, u: torch.Tensor, scaled: bool = False):
    """Inverse CDF over ``weights [rows, n]`` (float64 prefix sum): the first index whose prefix
    sum exceeds ``u·total`` (``u`` uniform in [0, 1)), or ``u`` itself when ``scaled``. Zero
    weights are never picked: ``u`` stays strictly below the total. Returns (index [rows, 1],
    ``u`` minus the prefix sum before that index)."""
    cdf = weights.cumsum(1, dtype=torch.float64)
    total = cdf[:, -1:]
    u = u if scaled else u * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    idx = torch.searchsorted(cdf, u, right=True)
    before = torch.where(idx > 0, cdf.gather(1, (idx - 1).clamp_min(0)), torch.zeros_like(u))
    return idx, u - before
