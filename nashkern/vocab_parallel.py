"""Token statistics of a head sharded by vocabulary rows (a tensor-parallel ``lm_head``, as in
Megatron): each rank holds ``weight[v0 : v0 + V_r]`` and the full final hidden states, streams its
vocabulary shard, and the per-row partial statistics are merged across the group.

Per row, on each rank (``z = h W_rᵀ`` over its shard, float32): the shard max ``m_r``, then
``S_r = Σ e``, ``T_r = Σ e·z`` (entropy), ``U_r = Σ e·r`` (KL, ``r`` the reference logits),
``S'_r = Σ exp(r − m'_r)`` (reference normaliser), the target logits where the target is in the
shard. Merged with one MAX all-reduce of the two ``[N]`` maxima and one SUM all-reduce of the
rescaled ``[N, ≤6]`` partials: ``lse = M + log S``, ``H = lse − T/S``, ``KL = T/S − lse − U/S +
lse_ref``. The backward recomputes the shard's logits from the saved hidden states and merged
``lse``/``H``/``KL`` (no communication beyond ``d_hidden``'s SUM all-reduce: each rank's
``dz W_r`` is a partial sum); ``d_weight`` stays local to the shard.

Communication per call: ``O(N)`` scalars, against ``(P−1)·N·D`` to all-gather the hidden states
of a sequence-parallel head, or ``V·D`` to all-gather the weight (see DESIGN.md for when it pays).

Scope of this first version: the plain PyTorch path (row chunks of ``[rows, V_r]`` float32
temporaries), no bias / softcap / temperature / mixture (``coef``); the reference, when given,
is frozen (no gradient), as in the trainers.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .types import TokenStats

CHUNK_ROWS = 1024  # rows per recompute tile: [1024, V_r] float32 temporaries (estimated budget)


def _shard_offset(vocab_shard: int, group) -> int:
    sizes = torch.zeros(dist.get_world_size(group), dtype=torch.long)
    mine = torch.tensor([vocab_shard], dtype=torch.long)
    dist.all_gather_into_tensor(sizes, mine, group=group)
    return int(sizes[: dist.get_rank(group)].sum())


def _shard_partials(h, w, rh, rw):
    """One shard's logits (float32) and their per-row maxima (policy, reference)."""
    z = h.float() @ w.float().t()
    m = z.amax(-1)
    out = {"z": z, "m": m}
    if rh is not None:
        r = rh.float() @ rw.float().t()
        out.update(r=r, mr=r.amax(-1))
    return out


def _merge(parts, targets, start, group):
    """Merge the shards' per-row partials (one MAX and one SUM all-reduce)."""
    z, m = parts["z"], parts["m"]
    has_ref = "r" in parts
    maxima = torch.stack([m, parts["mr"]] if has_ref else [m], 1)
    maxima = torch.where(torch.isfinite(maxima), maxima, torch.full_like(maxima, -1e30))
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    M = maxima[:, 0]
    e = torch.exp(z - M[:, None])
    zs = torch.where(e > 0, z, torch.zeros_like(z))
    cols = [e.sum(-1), (e * zs).sum(-1)]
    if targets is not None:
        local = (targets >= start) & (targets < start + z.shape[1])
        idx = (targets - start).clamp(0, z.shape[1] - 1)[:, None]
        cols.append(torch.where(local, z.gather(1, idx)[:, 0], torch.zeros_like(M)))
    if has_ref:
        r, Mr = parts["r"], maxima[:, 1]
        er = torch.exp(r - Mr[:, None])
        rs = torch.where(e > 0, r, torch.zeros_like(r))
        cols += [er.sum(-1), (e * rs).sum(-1)]
        if targets is not None:
            cols.append(torch.where(local, r.gather(1, idx)[:, 0], torch.zeros_like(M)))
    sums = torch.stack(cols, 1)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return M, (maxima[:, 1] if has_ref else None), sums


class _VocabParallelStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ref_hidden, ref_weight, start, group, ignore_index):
        N = hidden.shape[0]
        has_t, has_ref = targets is not None, ref_hidden is not None
        lse = torch.empty(N, device=hidden.device)
        out = {k: torch.zeros(N, device=hidden.device) for k in ("lp", "H", "rlp", "kl", "lser")}
        for i in range(0, N, CHUNK_ROWS):
            sl = slice(i, i + CHUNK_ROWS)
            t = targets[sl] if has_t else None
            parts = _shard_partials(hidden[sl], weight, ref_hidden[sl] if has_ref else None,
                                    ref_weight)
            M, Mr, s = _merge(parts, t, start, group)
            S, T = s[:, 0], s[:, 1]
            lse[sl] = M + S.log()
            out["H"][sl] = lse[sl] - T / S
            k = 2
            if has_t:
                out["lp"][sl] = s[:, k] - lse[sl]
                k += 1
            if has_ref:
                lser = Mr + s[:, k].log()
                out["lser"][sl] = lser
                out["kl"][sl] = T / S - lse[sl] - s[:, k + 1] / S + lser
                if has_t:
                    out["rlp"][sl] = s[:, k + 2] - lser
        valid = (targets != ignore_index) if has_t else torch.ones(N, dtype=torch.bool,
                                                                     device=hidden.device)
        for key in ("lp", "H", "rlp", "kl"):
            out[key] = torch.where(valid, out[key], torch.zeros_like(out[key]))
        ctx.save_for_backward(hidden, weight, targets if has_t else None,
                              ref_hidden, ref_weight, lse, out["H"], out["kl"], out["lser"],
                              valid)
        ctx.start, ctx.group, ctx.has_t, ctx.has_ref = start, group, has_t, has_ref
        ctx.mark_non_differentiable(out["rlp"])
        return out["lp"], out["H"], out["rlp"], out["kl"]

    @staticmethod
    def backward(ctx, g_lp, g_H, g_rlp, g_kl):
        hidden, weight, targets, rh, rw, lse, H, kl, lser, valid = ctx.saved_tensors
        start, V_r = ctx.start, weight.shape[0]
        d_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for i in range(0, hidden.shape[0], CHUNK_ROWS):
            sl = slice(i, i + CHUNK_ROWS)
            h = hidden[sl].float()
            z = h @ weight.float().t()
            logp = z - lse[sl, None]
            p = torch.exp(logp)
            logp = torch.where(p > 0, logp, torch.zeros_like(logp))
            v = valid[sl, None].float()
            dz = torch.zeros_like(z)
            if g_lp is not None and ctx.has_t:
                onehot = torch.zeros_like(z)
                t = targets[sl]
                local = (t >= start) & (t < start + V_r) & valid[sl]
                onehot.scatter_(1, (t - start).clamp(0, V_r - 1)[:, None], local[:, None].float())
                dz += g_lp[sl, None] * (onehot - p * v)
            if g_H is not None:
                dz -= g_H[sl, None] * v * p * (logp + H[sl, None])
            if g_kl is not None and ctx.has_ref:
                logq = rh[sl].float() @ rw.float().t() - lser[sl, None]
                diff = torch.where(p > 0, logp - logq, torch.zeros_like(logp))
                dz += g_kl[sl, None] * v * p * (diff - kl[sl, None])
            d_hidden[sl] = dz @ weight.float()
            d_weight += dz.t() @ h
        dist.all_reduce(d_hidden, op=dist.ReduceOp.SUM, group=ctx.group)
        return (d_hidden.to(hidden.dtype), d_weight.to(weight.dtype), None, None, None, None, None,
                None)


def vocab_parallel_linear_token_stats(
        hidden: Tensor, weight: Tensor, targets: Optional[Tensor], *, process_group=None,
        ref_hidden: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
        ignore_index: int = -100) -> TokenStats:
    """:func:`nashkern.ops.linear_token_stats` for a head sharded by vocabulary rows.

    hidden: ``[..., D]`` (the same on every rank of ``process_group``); weight: ``[V_r, D]``, this
    rank's rows of the head, the shards in rank order; targets: ``[...]`` global vocabulary ids
    (``ignore_index``: every statistic 0) or None; ref_hidden ``[..., Dr]`` / ref_weight
    ``[V_r, Dr]``: the frozen reference (its weight sharded like the policy's). Returns
    :class:`TokenStats` (logprobs, entropy, ref_logprobs, kl; float32 ``[...]``).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("vocab_parallel_linear_token_stats needs an initialised process group")
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., D] and weight [V_r, D] expected, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("ref_hidden and ref_weight (this rank's shard of the reference head) "
                         "go together")
    if ref_hidden is not None and (ref_hidden.shape[:-1] != hidden.shape[:-1]
                                   or ref_weight.shape != (weight.shape[0], ref_hidden.shape[-1])):
        raise ValueError(f"ref_hidden {tuple(ref_hidden.shape)} / ref_weight "
                         f"{tuple(ref_weight.shape)} must match hidden's rows and weight's shard")
    lead = hidden.shape[:-1]
    flat = lambda x: None if x is None else x.reshape(-1, x.shape[-1])  # noqa: E731
    t = None if targets is None else targets.reshape(-1).long()
    if t is not None and t.shape[0] != flat(hidden).shape[0]:
        raise ValueError(f"targets must have the leading shape of hidden {tuple(lead)}, got "
                         f"{tuple(targets.shape)}")
    start = _shard_offset(weight.shape[0], process_group)
    rh = flat(ref_hidden)
    lp, H, rlp, kl = _VocabParallelStats.apply(
        flat(hidden), weight, t, None if rh is None else rh.detach(),
        None if ref_weight is None else ref_weight.detach(), start, process_group, ignore_index)
    shape = lambda x: x.reshape(lead)  # noqa: E731
    has_ref = ref_hidden is not None
    return TokenStats(shape(lp) if t is not None else None, shape(H),
                      shape(rlp) if has_ref and t is not None else None,
                      shape(kl) if has_ref else None)
