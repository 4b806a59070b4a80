"""The plain-PyTorch backend (``backend="torch"``), the CPU path of every op: what its ops share.

It runs the same algorithm as the Triton kernels, tile by tile, in float32:

* forward: for each block of rows, stream over vocabulary tiles keeping per-row online
  statistics (running max, Σexp, Σexp·(a − max) for the entropy, Σexp·(a − b) for the KL, the
  mixture's running max and Σexp, and the target logits); only the ``[5, N]`` statistics and the
  ``[3, N]`` log-sum-exps are kept;
* backward: recompute each tile from the saved log-sum-exps and consume its logit gradient
  (written out for logits input; folded into dhidden / dweight / dbias in float32 for hidden
  states).

The largest temporary is a few ``[rows, vocab_tile]`` float32 tiles (sizes in
:mod:`nashkern.tuning`), never ``[N, V]``. The math is spelled out in DESIGN.md. This module holds
the streaming core (online statistics of a row block, the gradient of a tile, the upstream
gradients) that ``token_stats.py``, ``linear_token_stats.py`` beside it and the chunked /
vocabulary-parallel strategies (``backends/linear_token_stats_*.py``) build on.
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from ...naive import mix_logits as mix  # the coef end-point rule (DESIGN.md)
from ...kernels.layout import (
    ENTROPY, KL, LOGPROBS, LSE_MIXTURE, LSE_POLICY, LSE_REF, MIXTURE_LOGPROBS, NUM_LSE, NUM_STATS,
    REF_LOGPROBS, Scalars,
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


def scaled(z: torch.Tensor, scalars: Scalars) -> torch.Tensor:
    """``cap(z) / T``: a model's softcapped, tempered logits."""
    return temper(_cap(z, scalars.softcap), scalars.temperature)


def _scale_grad(g: torch.Tensor, z: torch.Tensor, scalars: Scalars):
    """Chain rule through ``cap(z) / T``: ``g / T * cap'(z)`` (cap' = 0 at −inf)."""
    g, softcap = temper(g, scalars.temperature), scalars.softcap
    if softcap is None:
        return g
    t = torch.tanh(z / softcap)
    # g == 0 (an ignored row) stays exactly 0 even where z is NaN (tanh(NaN) would leak).
    return torch.where((z == NEG_INF) | (g == 0), torch.zeros_like(g), g * (1.0 - t * t))


# On CPU tiles ``torch.where`` costs ~25x a multiply (3.5 ms vs 0.13 ms for a 512 x 2048 fp32
# tile, torch 2.13, AMD EPYC, 1 thread), so the helpers below keep the multiply as the common
# path and fall back to ``where`` only for tiles that hold non-finite values (on other devices
# they use ``where`` directly: no host sync).
def temper(x: torch.Tensor, temperature: float) -> torch.Tensor:
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
        head (``backends/linear_token_stats_vocab_parallel.py``)."""
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
class Partials:
    """One row block's online statistics over the vocabulary tiles seen so far: the policy,
    reference and mixture accumulators and the target logits (a, b, m at the target, 0 where
    the target lies in no tile seen). :meth:`finish` turns them into ``stats`` / ``lse``; a
    vocabulary-parallel head merges the shards' partials first (:meth:`maxima`, :meth:`rebase`,
    :meth:`sums`, :meth:`set_sums`: ``backends/linear_token_stats_vocab_parallel.py``)."""

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
               targets: Optional[torch.Tensor], scalars: Scalars) -> None:
        """Fold in one tile of raw float32 logits, columns ``v0 : v0 + z.shape[1]``."""
        a = scaled(z, scalars)
        b = scaled(r, scalars) if self.ref is not None else None
        self.pol.update(a, None if b is None else a - b)
        if self.ref is not None:
            self.ref.update(b)
        m = mix(a, b, scalars.coef) if self.mix is not None else None
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


def accumulate_block(tiles: Iterator[Tuple[int, Tile]], rows: int,
                     targets: Optional[torch.Tensor], has_ref: bool, scalars: Scalars,
                     device) -> Partials:
    parts = Partials(rows, has_ref, scalars.coef is not None, device)
    for v0, (z, r) in tiles:
        parts.update(v0, z, r, targets, scalars)
    return parts


def forward_block(tiles: Iterator[Tuple[int, Tile]], rows: int, targets: Optional[torch.Tensor],
                  has_ref: bool, scalars: Scalars, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Statistics ``[5, rows]`` and log-sum-exps ``[3, rows]`` of one row block."""
    return accumulate_block(tiles, rows, targets, has_ref, scalars, device).finish(
        targets, scalars.ignore_index)


def tile_grads(
    z: torch.Tensor, r: Optional[torch.Tensor], v0: int, targets: Optional[torch.Tensor],
    grad: torch.Tensor, stats: torch.Tensor, lse: torch.Tensor, scalars: Scalars,
    need_policy: bool, need_ref: bool, active: Sequence[bool],
) -> Tile:
    """Gradients w.r.t. the raw logits tile(s), given upstream ``grad [5, rows]`` (ignored rows
    already zeroed) and the block's saved ``stats`` / ``lse``. Formulas in DESIGN.md.

    ``active[f]`` is False when field ``f``'s upstream gradient is zero everywhere: its term is
    skipped (it would add exact zeros), which saves both the work and the tile temporaries,
    e.g. log-probs alone need one ``[rows, tile]`` term, not five. The target one-hot terms are
    scattered (``+g`` at the target column), never built as a dense tile."""
    has_targets, coef = targets is not None, scalars.coef
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

    a = scaled(z, scalars)
    if use_lp or use_ent or use_kl:
        logp = a - lse[LSE_POLICY][:, None]
        p = torch.exp(logp)
        if use_ent:
            ga = plus(ga, _guarded(grad[ENTROPY], -_times_live(p, logp + stats[ENTROPY][:, None])))
        if use_lp:
            ga = plus_target(plus(ga, _guarded(grad[LOGPROBS], -p)), grad[LOGPROBS])
    if use_kl or use_rlp or use_mix:
        b = scaled(r, scalars)
        if use_kl or use_rlp:
            logq = b - lse[LSE_REF][:, None]
            q = torch.exp(logq)
        if use_kl:
            ga = plus(ga, _guarded(grad[KL], _times_live(p, logp - logq - stats[KL][:, None])))
            gb = plus(gb, _guarded(grad[KL], q - p))
        if use_rlp:
            gb = plus_target(plus(gb, _guarded(grad[REF_LOGPROBS], -q)), grad[REF_LOGPROBS])
        if use_mix:
            pi = torch.exp(mix(a, b, coef) - lse[LSE_MIXTURE][:, None])
            g = grad[MIXTURE_LOGPROBS]
            if coef != 1:
                ga = plus_target(plus(ga, _guarded((1.0 - coef) * g, -pi)), (1.0 - coef) * g)
            if coef != 0:
                gb = plus_target(plus(gb, _guarded(coef * g, -pi)), coef * g)
    dz = dr = None
    if need_policy:
        dz = torch.zeros_like(z) if ga is None else _scale_grad(ga, z, scalars)
    if need_ref and r is not None:
        dr = torch.zeros_like(r) if gb is None else _scale_grad(gb, r, scalars)
    return dz, dr


def needs_ref_tiles(has_ref: bool, need_ref_grad: bool, active: Sequence[bool]) -> bool:
    """Whether the backward must recompute reference tiles: for the reference's own gradient,
    or for the policy terms that read them (KL, mixture). A frozen reference whose fields carry
    no gradient into the policy (e.g. log-probs-only losses: Nash-MD's sample KL, DPO, XPO)
    costs nothing in the backward."""
    return has_ref and (need_ref_grad or active[KL] or active[MIXTURE_LOGPROBS])


def active_fields(grad: torch.Tensor) -> list:
    """Which of the 5 fields have a nonzero upstream gradient anywhere (one host sync). While a
    CUDA graph is being captured no host sync is allowed: every field counts as active there
    (same result, the skipped work is done)."""
    if grad.is_cuda and torch.cuda.is_current_stream_capturing():
        return [True] * grad.shape[0]
    return (grad != 0).any(dim=1).tolist() if grad.shape[1] else [False] * grad.shape[0]


def upstream(grad_stats: torch.Tensor, targets: Optional[torch.Tensor], scalars: Scalars,
             has_ref: bool) -> torch.Tensor:
    """float32 upstream gradients ``[5, N]``, 0 on ignored rows. At the mixture's end points
    (coef 0 / 1, where the mixture IS the policy / the reference) the mixture's gradient is
    folded into the log-probs' / reference log-probs' row: exact, and a policy-only loss at
    coef 0 then never needs the reference's tiles."""
    g = grad_stats.float()
    coef = scalars.coef
    if targets is not None:
        g = torch.where((targets == scalars.ignore_index)[None, :],
                        torch.zeros((), device=g.device), g)
        if has_ref and coef in (0.0, 1.0):
            g = g.clone()
            g[LOGPROBS if coef == 0 else REF_LOGPROBS] += g[MIXTURE_LOGPROBS]
            g[MIXTURE_LOGPROBS] = 0.0
    return g
