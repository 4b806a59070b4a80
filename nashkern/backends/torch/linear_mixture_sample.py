"""``linear_mixture_sample`` on the torch backend: the sampler of ``mixture_sample.py`` beside
this file, fed by logit tiles ``hidden @ weight_tile.T`` streamed over the vocabulary, so no
``[B, V]`` logits exist.

Pass 1, per row block of ``tuning.TORCH.linear_sample_rows`` rows and vocabulary tile of
``sample_chunk_elements // rows`` columns (block-aligned): one GEMM per model into ONE reused
float32 buffer each (``[rows, tile]``, 1 MiB), the softcap, the mix and temperature in place, then the per-block
maxima and masses of :func:`~.mixture_sample.block_masses`. The masses are per vocabulary
block (the block's own max), so they do not depend on the tile width: given the same logits
the ids are those of ``ops.mixture_sample(hidden @ weight.T, ...)`` with the same generator
(the same seed draw, uniforms per :func:`~.mixture_sample.sample_rows` row block, and the same
exceptional-row path). Pass 2 recomputes only each row's chosen block of columns from its
hidden row and the block's weight rows.

Logit rounding: a tile GEMM gives the bits of the whole-row GEMM with the same rows on this
CPU (MKL; checked by the tests), but the pass-2 recomputation is a smaller GEMM over the rows
that chose a block, whose last bits may differ: a sample then moves only if its uniform falls
within that rounding (~1e-7 relative) of a CDF boundary inside the chosen block.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ... import tuning
from ...kernels.layout import Scalars
from .common import _cap
from .mixture_sample import (_mixture_sample_rows, block_masses, mix_scales, pick_from_blocks,
                             sample_rows)


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], c0: int, c1: int,
            softcap: Optional[float], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float32 ``cap(h @ weight[c0:c1].T + bias[c0:c1])`` (``h`` float32 ``[rows, D]``), into
    ``out`` (contiguous ``[rows, c1 - c0]``) when given."""
    w = weight[c0:c1]
    if w.dtype != torch.float32:
        w = w.float()  # fp32 accumulation of bf16 / fp16 weights: one [tile, D] copy
    if out is None:
        out = h @ w.T
    else:
        torch.mm(h, w.T, out=out)
    if bias is not None:
        out.add_(bias[c0:c1].float() if bias.dtype != torch.float32 else bias[c0:c1])
    if softcap is not None:
        out = _cap(out, softcap)  # -inf stays -inf
    return out


class _Segment:
    """The rows ``[r0, r1)`` of a row block that belong to one group."""

    def __init__(self, group: int, r0: int, r1: int, scalars: Scalars):
        self.group, self.r0, self.r1 = group, r0, r1
        self.scale_z, self.scale_r = mix_scales(scalars)


def _span(segments: List[_Segment], scale: str):
    """The smallest row range covering the segments that read ``scale``'s model, or None."""
    used = [s for s in segments if getattr(s, scale) is not None]
    return (min(s.r0 for s in used), max(s.r1 for s in used)) if used else None


def linear_mixture_sample(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, seeds,
                          group_rows: Sequence[int], scalars: Sequence[Scalars]):
    """hidden ``[B, D]``, weight ``[V, D]`` (ref_hidden ``[B, Dr]``, ref_weight ``[V, Dr]``,
    rows of groups with coef 0 never read), seeds int64 ``[G]``, ``group_rows`` (G row counts,
    consecutive, summing to B), one :class:`Scalars` per group (softcap and temperature shared)
    -> int64 ``[B]``: each group sampled as ``mixture_sample`` samples its logits."""
    B, V = hidden.shape[0], weight.shape[0]
    device = hidden.device
    block = min(tuning.TORCH.sample_block, V)
    nb = -(-V // block)
    softcap = scalars[0].softcap
    maxes, sums = [], []  # per row block: [rows, nb] block maxima and masses
    starts = [0]
    for n in group_rows:
        starts.append(starts[-1] + n)
    row_block = tuning.TORCH.linear_sample_rows
    budget = tuning.TORCH.sample_chunk_elements  # float32 elements of one tile buffer
    zbuf = torch.empty(max(budget, min(B, row_block) * block), device=device)
    rbuf = torch.empty_like(zbuf) if ref_hidden is not None else None
    for n0 in range(0, B, row_block):
        n1 = min(B, n0 + row_block)
        # block-aligned tiles of ~budget elements per model (the logits sampler's chunking)
        tile = max(block, budget // (n1 - n0) // block * block)
        tops, parts = [], []
        segments = [_Segment(g, max(s0, n0) - n0, min(s1, n1) - n0, scalars[g])
                    for g, (s0, s1) in enumerate(zip(starts[:-1], starts[1:]))
                    if max(s0, n0) < min(s1, n1)]
        zspan, rspan = _span(segments, "scale_z"), _span(segments, "scale_r")
        h = hidden[n0 + zspan[0]:n0 + zspan[1]].float() if zspan else None
        rh = ref_hidden[n0 + rspan[0]:n0 + rspan[1]].float() if rspan else None
        for c0 in range(0, V, tile):
            c1 = min(V, c0 + tile)
            w = c1 - c0
            m = zbuf[: (n1 - n0) * w].view(n1 - n0, w)  # the policy's logits, then m in place
            z = r = None
            if zspan:  # into m's own rows (contiguous): the mix then runs in place
                z = _logits(h, weight, bias, c0, c1, softcap, m[zspan[0]:zspan[1]])
            if rspan:
                r = _logits(rh, ref_weight, ref_bias, c0, c1, softcap,
                            rbuf[: (rspan[1] - rspan[0]) * w].view(-1, w))
            _mix_into(m, z, zspan, r, rspan, segments)
            top, part = block_masses(m, block)
            tops.append(top)
            parts.append(part)
        maxes.append(torch.cat(tops, 1))
        sums.append(torch.cat(parts, 1))
    maxes, sums = torch.cat(maxes, 0), torch.cat(sums, 0)
    out = torch.empty(B, dtype=torch.long, device=device)
    for g, (s0, s1) in enumerate(zip(starts[:-1], starts[1:])):
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seeds[g].item()))
        rows = sample_rows(s1 - s0, V)
        for n0 in range(s0, s1, rows):
            n1 = min(s1, n0 + rows)
            recompute = _recompute(hidden[n0:n1], weight, bias, ref_hidden, ref_weight, ref_bias,
                                   n0, n1, scalars[g], block, V)
            u = torch.rand((n1 - n0, 1), dtype=torch.float64, device=device, generator=gen)
            out[n0:n1], exceptional = pick_from_blocks(maxes[n0:n1], sums[n0:n1], u, recompute,
                                                       V, block)
            if exceptional.device.type != "cpu" or bool(exceptional.any()):
                redo = exceptional.nonzero().squeeze(1)
                if redo.numel():  # +inf / NaN rows: their whole logit rows (rare; [rows, V])
                    z = _logits(hidden[n0 + redo].float(), weight, bias, 0, V, softcap)
                    r = z if ref_hidden is None or scalars[g].coef == 0 else _logits(
                        ref_hidden[n0 + redo].float(), ref_weight, ref_bias, 0, V, softcap)
                    out[n0 + redo] = _mixture_sample_rows(z, r, scalars[g], generator=gen)
    return out


def _mix_into(m, z, zspan, r, rspan, segments) -> None:
    """``m[rows of s] = z·scale_z + r·scale_r`` per segment ``s`` (``z`` / ``r`` hold the rows of
    ``zspan`` / ``rspan``; ``m`` may be ``z`` itself: then in place), as
    :func:`~.mixture_sample.mix_tempered` computes it (the same operations, the same bits)."""
    for s in segments:
        dst = m[s.r0:s.r1]
        zs = z[s.r0 - zspan[0]:s.r1 - zspan[0]] if s.scale_z is not None else None
        rs = r[s.r0 - rspan[0]:s.r1 - rspan[0]] if s.scale_r is not None else None
        if zs is None:
            torch.mul(rs, s.scale_r, out=dst)
            continue
        if zs.data_ptr() != dst.data_ptr() or zs.stride() != dst.stride():
            torch.mul(zs, s.scale_z, out=dst)
        elif s.scale_z != 1.0:  # (x·1 is x: coef 0 at T = 1 skips the pass)
            dst.mul_(s.scale_z)
        if rs is not None:
            dst.add_(rs, alpha=s.scale_r)


def _recompute(h, weight, bias, ref_hidden, ref_weight, ref_bias, n0, n1, scalars: Scalars,
               block: int, V: int):
    """Pass 2: ``recompute(idx, out)`` for :func:`pick_from_blocks` over rows ``[n0, n1)``: each
    row's chosen block of columns from its hidden row and that block's weight rows (a
    batched matrix-vector product per model over the gathered block rows; then the bias, softcap
    and mix). Columns past V (the last block, ``idx`` clamped) are masked by the caller."""
    scale_z, scale_r = mix_scales(scalars)
    rh = ref_hidden[n0:n1] if scale_r is not None else None

    def products(x, w, b, idx, out):
        # the chosen block's weight rows, gathered ([rows, block, D]: block x D x 4 bytes per
        # row, 128 KiB at 256 x 128) and one batched matrix-vector product: two torch calls per
        # model instead of one per row
        wsel = w[idx]
        if wsel.dtype != torch.float32:
            wsel = wsel.float()
        torch.bmm(wsel, x.float()[:, :, None], out=out[:, :, None])
        if b is not None:
            out.add_(b[idx].float() if b.dtype != torch.float32 else b[idx])
        return _cap(out, scalars.softcap) if scalars.softcap is not None else out

    def recompute(idx, out):
        z = products(h, weight, bias, idx, out) if scale_z is not None else None
        r = products(rh, ref_weight, ref_bias, idx, torch.empty_like(out)) \
            if scale_r is not None else None
        seg = _Segment(0, 0, out.shape[0], scalars)
        _mix_into(out, z, (0, out.shape[0]), r, (0, out.shape[0]), [seg])
    return recompute
