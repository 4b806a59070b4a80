"""Backward of the fused ``hidden @ weight.T`` token statistics (Triton); the forward, the
input contract, the cost and the numerics are in ``linear_token_stats.py``.

Backward (``_bwd_kernel``, 1-D grid of ``cdiv(N, BLOCK_N) * cdiv(V, BLOCK_V)`` programs in grouped
order, ``BLOCK_V = BLOCK_V_BWD``)
    Each program recomputes one ``[BLOCK_N, BLOCK_V]`` tile of both models' logits, turns it into
    probabilities with the saved ``lse`` (``p = exp(a - L_a)``, likewise ``q`` and ``pi``), forms
    the logit gradients ``dz`` / ``dr`` of DESIGN.md in registers (entropy and KL from ``stats``
    enter the formula), and adds ``dz @ W_tile`` into ``d_hidden``, ``dz.T @ H_block`` into
    ``d_weight`` and the column sums of ``dz`` into ``d_bias`` with fp32 ``tl.atomic_add`` (as in
    Cut Cross-Entropy; summation order, hence the last bits, vary run to run); the host casts
    the fp32 buffers to the input dtypes. Gradients that are not needed are compiled out
    (``HAS_GRAD_*``). Rows whose target is ``ignore_index`` get exactly 0.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import layout
from .common import (
    ENTROPY, KL, LOGPROBS, LSE_MIXTURE, LSE_POLICY, LSE_REF, MIXTURE_LOGPROBS, REF_LOGPROBS, mix,
)
from .layout import NUM_LSE, NUM_STATS
from .linear_token_stats import check_inputs, is_tf32, logits_tile, scaled_logits, tile_dot


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _guarded(g, term):
    """``g[:, None] * term``, exactly 0 where the upstream grad ``g`` is 0 (even if term is not
    finite, e.g. with an infinite KL)."""
    return tl.where(g[:, None] != 0, g[:, None] * term, 0.0)


@triton.jit
def _split_operand(x, dtype, IS_SPLIT: tl.constexpr):
    """Tensor-core operands ``(hi, lo)`` of an fp32 tile: ``hi`` is ``x`` rounded to ``dtype``;
    with IS_SPLIT ``lo`` is the rounding error rounded too, so that ``hi + lo`` keeps 16 (bf16) or
    22 (fp16) of fp32's 24 mantissa bits, else 0."""
    hi = x.to(dtype)
    if IS_SPLIT:
        lo = (x - hi.to(tl.float32)).to(dtype)
    else:
        lo = tl.zeros(x.shape, dtype)
    return hi, lo


@triton.jit
def _accumulate_grads(
    dz_hi,  # [BLOCK_N, BLOCK_V] gradient of this model's logit tile (0 outside) in its dtype...
    dz_lo,  # ... plus, if IS_SPLIT, its rounding error in that dtype (see _split_operand)
    hidden_ptr,  # [N, D] hidden states
    weight_ptr,  # [V, D] lm_head
    d_hidden_ptr,  # [N, D] fp32 accumulator (written only if HAS_GRAD_HIDDEN)
    d_weight_ptr,  # [V, D] fp32 accumulator (written only if HAS_GRAD_WEIGHT)
    rows,  # [BLOCK_N] row indices of the tile
    cols,  # [BLOCK_V] vocabulary indices of the tile
    row_mask,  # [BLOCK_N] rows < N
    col_mask,  # [BLOCK_V] cols < V
    D,  # hidden size
    HAS_GRAD_HIDDEN: tl.constexpr,
    HAS_GRAD_WEIGHT: tl.constexpr,
    IS_SPLIT: tl.constexpr,  # two tl.dot per product, with dz_hi and dz_lo
    IS_TF32: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``d_hidden[rows] += dz @ W[cols]`` and ``d_weight[cols] += dz.T @ H[rows]`` with fp32
    atomics, ``BLOCK_D`` columns at a time."""
    offs_d = tl.arange(0, BLOCK_D)
    row_off = rows.to(tl.int64)[:, None] * D + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    col_off = cols.to(tl.int64)[:, None] * D + offs_d[None, :]  # [BLOCK_V, BLOCK_D]
    for d0 in range(0, D, BLOCK_D):
        d_mask = offs_d < D - d0
        row_d_mask = row_mask[:, None] & d_mask[None, :]
        col_d_mask = col_mask[:, None] & d_mask[None, :]
        if HAS_GRAD_HIDDEN:
            w = tl.load(weight_ptr + col_off, mask=col_d_mask, other=0.0)
            dh = tile_dot(dz_hi, w, None, IS_TF32)
            if IS_SPLIT:
                dh = tile_dot(dz_lo, w, dh, IS_TF32)
            tl.atomic_add(d_hidden_ptr + row_off, dh, mask=row_d_mask, sem="relaxed")
        if HAS_GRAD_WEIGHT:
            h = tl.load(hidden_ptr + row_off, mask=row_d_mask, other=0.0)
            dw = tile_dot(tl.trans(dz_hi), h, None, IS_TF32)
            if IS_SPLIT:
                dw = tile_dot(tl.trans(dz_lo), h, dw, IS_TF32)
            tl.atomic_add(d_weight_ptr + col_off, dw, mask=col_d_mask, sem="relaxed")
        row_off += BLOCK_D
        col_off += BLOCK_D


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------
@triton.jit
def _bwd_kernel(
    hidden_ptr,  # [N, D] policy hidden states
    weight_ptr,  # [V, D] policy lm_head, same dtype as hidden
    bias_ptr,  # [V] policy bias (read only if HAS_BIAS)
    ref_hidden_ptr,  # [N, DR] reference hidden states (read only if HAS_REF)
    ref_weight_ptr,  # [V, DR] reference lm_head (read only if HAS_REF)
    ref_bias_ptr,  # [V] reference bias (read only if HAS_REF_BIAS)
    targets_ptr,  # [N] int64 targets (read only if HAS_TARGETS)
    grad_stats_ptr,  # [5, N] fp32 upstream gradients of the packed statistics
    stats_ptr,  # [5, N] fp32 forward statistics (entropy and KL enter the gradient)
    lse_ptr,  # [3, N] fp32 forward log-sum-exps L_a, L_b, L_m
    d_hidden_ptr,  # [N, D] fp32 accumulator, zero-initialised (if HAS_GRAD_HIDDEN)
    d_weight_ptr,  # [V, D] fp32 accumulator, zero-initialised (if HAS_GRAD_WEIGHT)
    d_bias_ptr,  # [V] fp32 accumulator, zero-initialised (if HAS_GRAD_BIAS)
    d_ref_hidden_ptr,  # [N, DR] fp32 accumulator, zero-initialised (if HAS_GRAD_REF_HIDDEN)
    d_ref_weight_ptr,  # [V, DR] fp32 accumulator, zero-initialised (if HAS_GRAD_REF_WEIGHT)
    d_ref_bias_ptr,  # [V] fp32 accumulator, zero-initialised (if HAS_GRAD_REF_BIAS)
    N,  # rows
    V,  # vocabulary size
    D,  # policy hidden size
    DR,  # reference hidden size
    ignore_index,  # target value of rows that receive no gradient
    inv_temperature,  # 1 / T
    softcap,  # s (used only if HAS_SOFTCAP)
    coef,  # mixture weight of the reference in [0, 1] (used only if HAS_MIX)
    HAS_BIAS: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_REF_BIAS: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
    HAS_MIX: tl.constexpr,  # implies HAS_REF and HAS_TARGETS
    HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD_HIDDEN: tl.constexpr,
    HAS_GRAD_WEIGHT: tl.constexpr,
    HAS_GRAD_BIAS: tl.constexpr,
    HAS_GRAD_REF_HIDDEN: tl.constexpr,  # the HAS_GRAD_REF_* imply HAS_REF
    HAS_GRAD_REF_WEIGHT: tl.constexpr,
    HAS_GRAD_REF_BIAS: tl.constexpr,
    IS_SPLIT_DZ: tl.constexpr,  # policy dz enters its dots as hi + lo (16-bit policy dtype)
    IS_SPLIT_DR: tl.constexpr,  # reference dr likewise
    IS_TF32: tl.constexpr,  # fp32 operands as tf32, else 3xTF32
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,  # row blocks that sweep the vocabulary together (L2 reuse of d_hidden)
):
    # 1-D grid in grouped order: GROUP_N consecutive row blocks walk the vocabulary tiles
    # together, so the running wave keeps those blocks' d_hidden rows (GROUP_N * BLOCK_N * D
    # fp32) and a few weight / d_weight tiles in L2, instead of sweeping all N rows of d_hidden
    # per vocabulary tile (the matmul "super-grouping" of the Triton tutorial).
    pid = tl.program_id(0)
    num_row_blocks = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_N * tl.cdiv(V, BLOCK_V)
    first_row_block = (pid // programs_per_group) * GROUP_N
    group_size = tl.minimum(num_row_blocks - first_row_block, GROUP_N)
    rows = (first_row_block + (pid % programs_per_group) % group_size) * BLOCK_N \
        + tl.arange(0, BLOCK_N)
    cols = ((pid % programs_per_group) // group_size) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V

    # Row data: L_a, L_b, L_m from the forward, entropy H and KL, upstream grads g_*.
    lse_a = tl.load(lse_ptr + LSE_POLICY * N + rows, mask=row_mask, other=0.0)
    entropy = tl.load(stats_ptr + ENTROPY * N + rows, mask=row_mask, other=0.0)
    g_ent = tl.load(grad_stats_ptr + ENTROPY * N + rows, mask=row_mask, other=0.0)
    keep = row_mask  # rows that receive a gradient
    if HAS_TARGETS:
        target = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
        keep &= target != ignore_index
        is_target = cols[None, :] == target[:, None]  # delta_j of DESIGN.md
        g_lp = tl.load(grad_stats_ptr + LOGPROBS * N + rows, mask=row_mask, other=0.0)
    if HAS_REF:
        lse_b = tl.load(lse_ptr + LSE_REF * N + rows, mask=row_mask, other=0.0)
        kl = tl.load(stats_ptr + KL * N + rows, mask=row_mask, other=0.0)
        g_kl = tl.load(grad_stats_ptr + KL * N + rows, mask=row_mask, other=0.0)
        if HAS_TARGETS:
            g_rlp = tl.load(grad_stats_ptr + REF_LOGPROBS * N + rows, mask=row_mask, other=0.0)
    if HAS_MIX:
        lse_m = tl.load(lse_ptr + LSE_MIXTURE * N + rows, mask=row_mask, other=0.0)
        g_mix = tl.load(grad_stats_ptr + MIXTURE_LOGPROBS * N + rows, mask=row_mask, other=0.0)

    # Both models' logits first: only one tile is live across the other's tl.dot loop.
    a = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, D,
                     HAS_BIAS, IS_TF32, BLOCK_N, BLOCK_V, BLOCK_D)
    if HAS_REF:
        b = logits_tile(ref_hidden_ptr, ref_weight_ptr, ref_bias_ptr, rows, cols, row_mask,
                         col_mask, DR, HAS_REF_BIAS, IS_TF32, BLOCK_N, BLOCK_V, BLOCK_D)
        b, db = scaled_logits(b, col_mask, inv_temperature, softcap, HAS_SOFTCAP)
    a, da = scaled_logits(a, col_mask, inv_temperature, softcap, HAS_SOFTCAP)

    # ga, gb of DESIGN.md (p == 0 terms contribute exactly 0: log p may be -inf there).
    log_p = a - lse_a[:, None]
    p = tl.exp(log_p)
    live = p > 0
    ga = _guarded(g_ent, tl.where(live, -p * (log_p + entropy[:, None]), 0.0))
    if HAS_TARGETS:
        ga += _guarded(g_lp, tl.where(is_target, 1.0 - p, -p))
    if HAS_REF:
        log_q = b - lse_b[:, None]
        q = tl.exp(log_q)
        ga += _guarded(g_kl, tl.where(live, p * (log_p - log_q - kl[:, None]), 0.0))
        gb = _guarded(g_kl, q - p)
        if HAS_TARGETS:
            gb += _guarded(g_rlp, tl.where(is_target, 1.0 - q, -q))
        if HAS_MIX:
            pi = tl.exp(mix(a, b, coef) - lse_m[:, None])
            delta_pi = tl.where(is_target, 1.0 - pi, -pi)
            ga += _guarded(g_mix * (1 - coef), delta_pi)
            gb += _guarded(g_mix * coef, delta_pi)
        if HAS_GRAD_REF_HIDDEN or HAS_GRAD_REF_WEIGHT or HAS_GRAD_REF_BIAS:
            dr = tl.where(keep[:, None], gb * db, 0.0)  # ignored rows get exactly 0
            if HAS_GRAD_REF_BIAS:
                tl.atomic_add(d_ref_bias_ptr + cols, tl.sum(dr, 0), mask=col_mask, sem="relaxed")
            dr_hi, dr_lo = _split_operand(dr, ref_weight_ptr.dtype.element_ty, IS_SPLIT_DR)

    if HAS_GRAD_HIDDEN or HAS_GRAD_WEIGHT or HAS_GRAD_BIAS:
        dz = tl.where(keep[:, None], ga * da, 0.0)  # ignored rows get exactly 0
        if HAS_GRAD_BIAS:
            tl.atomic_add(d_bias_ptr + cols, tl.sum(dz, 0), mask=col_mask, sem="relaxed")
        dz_hi, dz_lo = _split_operand(dz, weight_ptr.dtype.element_ty, IS_SPLIT_DZ)
        _accumulate_grads(dz_hi, dz_lo, hidden_ptr, weight_ptr, d_hidden_ptr, d_weight_ptr, rows,
                          cols, row_mask, col_mask, D, HAS_GRAD_HIDDEN, HAS_GRAD_WEIGHT,
                          IS_SPLIT_DZ, IS_TF32, BLOCK_D)
    if HAS_GRAD_REF_HIDDEN or HAS_GRAD_REF_WEIGHT:
        _accumulate_grads(dr_hi, dr_lo, ref_hidden_ptr, ref_weight_ptr, d_ref_hidden_ptr,
                          d_ref_weight_ptr, rows, cols, row_mask, col_mask, DR,
                          HAS_GRAD_REF_HIDDEN, HAS_GRAD_REF_WEIGHT, IS_SPLIT_DR, IS_TF32, BLOCK_D)


# ----------------------------------------------------------------------------------------------
# Host wrapper
# ----------------------------------------------------------------------------------------------
def linear_token_stats_backward(
    grad_stats: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    ref_hidden: Optional[torch.Tensor],
    ref_weight: Optional[torch.Tensor],
    ref_bias: Optional[torch.Tensor],
    stats: torch.Tensor,
    lse: torch.Tensor,
    scalars: layout.Scalars,
    *,
    needs_input_grad: Tuple[bool, bool, bool, bool, bool, bool],
    config,
    split_grad_operand: bool = False,
    reduce_hidden_grad=None,
) -> Tuple[Optional[torch.Tensor], ...]:
    """Gradients ``(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)`` of
    ``sum(grad_stats * stats)``, None where ``needs_input_grad`` is False or the input is None.
    ``config``: a ``nashkern.tuning.LinearTokenStatsTriton`` (``tuning.config_for``).

    ``split_grad_operand`` (a numerics option, not a tuning value; internal: the ops use the
    default): for bf16/fp16 models, False rounds the fp32 logit gradient once to the model's
    dtype before its two tensor-core products (as eager PyTorch, Cut Cross-Entropy and Liger:
    6 N*D*V backward FLOPs per model, error ~eps(dtype) relative to the largest gradient entry);
    True feeds it as hi + lo in the model's dtype (two dots each, 10 N*D*V FLOPs), so gradients
    match float32 math up to the output rounding.

    ``reduce_hidden_grad`` (a vocabulary shard, ``nashkern/backends/
    linear_token_stats_vocab_parallel.py``): called on the float32 d_hidden / d_ref_hidden
    before the cast to the inputs' dtype (the sum over the shards); ``targets`` are then local
    (another shard's target: a value outside ``[0, V_r)`` other than ``ignore_index``)."""
    coef, softcap = scalars.coef, scalars.softcap
    check_inputs(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, coef)
    n, d = hidden.shape
    for name, t, rows in (("grad_stats", grad_stats, NUM_STATS), ("stats", stats, NUM_STATS),
                          ("lse", lse, NUM_LSE)):
        if t.shape != (rows, n) or t.dtype != torch.float32 or t.device != hidden.device:
            raise ValueError(f"{name}: expected float32 [{rows}, {n}], got {tuple(t.shape)} "
                             f"{t.dtype}")
    if len(needs_input_grad) != 6:
        raise ValueError("needs_input_grad must hold 6 flags")
    cfg = config
    v = weight.shape[0]
    inputs = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    needed = [need and t is not None for need, t in zip(needs_input_grad, inputs)]
    if not any(needed):
        return (None,) * 6

    grads = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) if need else None
             for need, t in zip(needed, inputs)]
    has_ref = ref_hidden is not None
    grid = (triton.cdiv(n, cfg.BLOCK_N) * triton.cdiv(v, cfg.BLOCK_V_BWD),)
    with layout.device_guard(hidden.device):
        _bwd_kernel[grid](
            hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets,
            grad_stats.contiguous(), stats.contiguous(), lse.contiguous(), *grads,
            n, v, d, ref_hidden.shape[1] if has_ref else 0, scalars.ignore_index,
            1.0 / scalars.temperature, softcap or 0.0, coef or 0.0,
            HAS_BIAS=bias is not None, HAS_REF=has_ref, HAS_REF_BIAS=ref_bias is not None,
            HAS_TARGETS=targets is not None, HAS_MIX=coef is not None and targets is not None,
            HAS_SOFTCAP=softcap is not None,
            HAS_GRAD_HIDDEN=needed[0], HAS_GRAD_WEIGHT=needed[1], HAS_GRAD_BIAS=needed[2],
            HAS_GRAD_REF_HIDDEN=needed[3], HAS_GRAD_REF_WEIGHT=needed[4],
            HAS_GRAD_REF_BIAS=needed[5],
            IS_SPLIT_DZ=split_grad_operand and weight.dtype != torch.float32,
            IS_SPLIT_DR=has_ref and split_grad_operand and ref_weight.dtype != torch.float32,
            IS_TF32=is_tf32(),
            BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V_BWD, BLOCK_D=cfg.BLOCK_D,
            GROUP_N=cfg.GROUP_N_BWD, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if reduce_hidden_grad is not None:
        for k in (0, 3):
            if grads[k] is not None:
                reduce_hidden_grad(grads[k])
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, inputs))
