"""Triton kernels for the per-token statistics over logits input (see DESIGN.md for the math).

For each row ``n`` (one token) with policy logits ``z``, reference logits ``r`` and target ``t``:
``a = cap(z) / T``, ``b = cap(r) / T``, ``m = (1 - c) a + c b``, and the five statistics
log p[t], H(p), log q[t], KL(p || q) and log π[t], packed as float32 ``stats [5, N]``, plus
``lse [3, N] = (L_a, L_b, L_m)`` for the backward.

Forward: one online pass per row
--------------------------------
A program walks ``BLOCK_V``-wide tiles of (its chunk of) the vocabulary, reading each logits
tensor exactly once. Per model it keeps a scalar running max ``M`` and per-lane fp32
accumulators taken relative to it::

    S = sum exp(a - M)              ->  L_a = M + log S
    E = sum exp(a - M) * (a - M)    ->  H   = log S - E / S
    K = sum exp(a - M) * (a - b)    ->  KL  = K / S - (L_a - L_b)

(likewise ``S`` for ``b`` and ``m``). Only the max is reduced per tile; when it grows from ``M``
to ``M'`` the accumulators are rescaled by ``exp(M - M')`` and ``E`` also gains ``(M - M') S``.
The sums are reduced once, at the end. While everything seen is ``-inf`` the shift is 0 instead
of ``M`` so that masked columns give ``exp(-inf) = 0`` and never ``-inf - -inf``; products with a
zero weight (masked columns, underflowed probabilities) are selected away, so ``p == 0`` terms
contribute exactly 0. Target logits are loaded directly (one scalar load per model).

Few rows cannot fill a GPU with one program per row, so the host may split each row's vocabulary
into ``num_splits`` chunks (grid ``(N, num_splits)``); the programs then write their partial
``(M, S, E, K)`` to a small workspace and a merge kernel (one program per row) combines them with
the same rescaling and finalises the row. With one chunk the forward kernel finalises the row
itself.

Backward: grid (row, vocab tile)
--------------------------------
Reads the logits once more and writes each gradient once, recomputing ``p, q, π`` from ``lse``
(entropy and KL come from ``stats``). Every term is guarded with ``where(g != 0, ...)``, so an
infinite KL with a zero upstream grad cannot poison the log-prob gradient.

Rows whose target is ``ignore_index`` run no vocabulary iteration (forward) and read nothing
(backward): all-zero statistics and gradient. A NaN only reaches the outputs of its own row.
The mixture end points ``coef == 0`` / ``coef == 1`` are the policy / reference themselves
(``common.mix``, the one end-point rule), so a column masked only in the unused model never
becomes ``0 * -inf``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import (
    ENTROPY, KL, LOGPROBS, LSE_MIXTURE, LSE_POLICY, LSE_REF, MIXTURE_LOGPROBS, PART_ENT_A,
    PART_KL_A, PART_MAX_A, PART_MAX_B, PART_MAX_M, PART_SUM_A, PART_SUM_B, PART_SUM_M, REF_LOGPROBS,
    finite_shift, mix, shift_step, softcap_temper,
)
from . import layout
from .layout import (
    NUM_LSE, NUM_STATS, check_token_stats_inputs, plan_vocab_splits, split_workspace,
)


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _row_ptr(base_ptr, row, R, stride_g, stride_r):
    """Pointer to the start of row ``row`` (int64) of a ``[G, R, V]`` view."""
    return base_ptr + (row // R) * stride_g + (row % R) * stride_r


@triton.jit
def _target_logits(z_row_ptr, r_row_ptr, target, is_valid, coef, inv_temperature, softcap,
                   HAS_REF: tl.constexpr, HAS_MIX: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """``(a[t], b[t], m[t])`` from one scalar load per model (0 for models not present)."""
    safe_target = tl.where(is_valid, target, 0)
    a_t, _ = softcap_temper(tl.load(z_row_ptr + safe_target).to(tl.float32), softcap,
                           inv_temperature, HAS_SOFTCAP)
    b_t = 0.0
    m_t = 0.0
    if HAS_REF:
        b_t, _ = softcap_temper(tl.load(r_row_ptr + safe_target).to(tl.float32), softcap,
                               inv_temperature, HAS_SOFTCAP)
        if HAS_MIX:
            m_t = mix(a_t, b_t, coef)
    return a_t, b_t, m_t


@triton.jit
def _store_row_stats(stats_ptr, lse_ptr, row, N, is_valid, a_t, b_t, m_t,
                     max_a, sum_a, ent_a, kl_a, max_b, sum_b, max_m, sum_m,
                     HAS_TARGETS: tl.constexpr, HAS_REF: tl.constexpr, HAS_MIX: tl.constexpr):
    """Finalise one row from its reduced accumulators and store ``stats[:, row]``, ``lse[:, row]``
    (fields not computed and ignored rows get 0)."""
    log_sum_a = tl.log(sum_a)
    lse_a = finite_shift(max_a) + log_sum_a
    entropy = log_sum_a - ent_a / sum_a
    logprobs = 0.0
    ref_logprobs = 0.0
    kl = 0.0
    mixture_logprobs = 0.0
    lse_b = 0.0
    lse_m = 0.0
    if HAS_TARGETS:
        logprobs = a_t - lse_a
    if HAS_REF:
        lse_b = finite_shift(max_b) + tl.log(sum_b)
        kl = kl_a / sum_a - (lse_a - lse_b)
        if HAS_TARGETS:
            ref_logprobs = b_t - lse_b
        if HAS_MIX:
            lse_m = finite_shift(max_m) + tl.log(sum_m)
            mixture_logprobs = m_t - lse_m
    tl.store(stats_ptr + LOGPROBS * N + row, tl.where(is_valid, logprobs, 0.0))
    tl.store(stats_ptr + ENTROPY * N + row, tl.where(is_valid, entropy, 0.0))
    tl.store(stats_ptr + REF_LOGPROBS * N + row, tl.where(is_valid, ref_logprobs, 0.0))
    tl.store(stats_ptr + KL * N + row, tl.where(is_valid, kl, 0.0))
    tl.store(stats_ptr + MIXTURE_LOGPROBS * N + row, tl.where(is_valid, mixture_logprobs, 0.0))
    tl.store(lse_ptr + LSE_POLICY * N + row, tl.where(is_valid, lse_a, 0.0))
    tl.store(lse_ptr + LSE_REF * N + row, tl.where(is_valid, lse_b, 0.0))
    tl.store(lse_ptr + LSE_MIXTURE * N + row, tl.where(is_valid, lse_m, 0.0))


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _token_stats_fwd_kernel(
    logits_ptr,          # [G, R, V] policy logits z (fp32/bf16/fp16, unit stride over V)
    logits_stride_g,     # element stride of logits over G
    logits_stride_r,     # element stride of logits over R
    ref_ptr,             # [G, R, V] reference logits r (HAS_REF), own dtype and strides
    ref_stride_g,        # element stride of ref over G
    ref_stride_r,        # element stride of ref over R
    targets_ptr,         # [N] int64 targets (HAS_TARGETS)
    stats_ptr,           # [5, N] fp32 out: statistics (not IS_SPLIT)
    lse_ptr,             # [3, N] fp32 out: L_a, L_b, L_m (not IS_SPLIT)
    partial_ptr,         # [NUM_PARTIALS, num_splits, N] fp32 out: layout.split_workspace (IS_SPLIT)
    N,                   # rows, G * R
    R,                   # rows per group (dim 1 of the views)
    V,                   # vocabulary size
    chunk_size,          # vocabulary columns per split, a multiple of BLOCK_V
    num_splits,          # programs per row (grid dim 1)
    coef,                # mixture weight of the reference in [0, 1] (HAS_MIX; common.mix)
    inv_temperature,     # 1 / T
    softcap,             # s > 0 (HAS_SOFTCAP)
    ignore_index,        # target value of rows that get no statistics
    HAS_TARGETS: tl.constexpr,  # targets given: log-prob fields and ignore_index rows
    HAS_REF: tl.constexpr,      # reference given: ref log-probs and KL
    HAS_MIX: tl.constexpr,      # mixture log-probs (needs HAS_REF, HAS_TARGETS)
    HAS_SOFTCAP: tl.constexpr,  # apply s * tanh(x / s)
    IS_SPLIT: tl.constexpr,     # several programs per row: write partials for the merge kernel
    BLOCK_V: tl.constexpr,      # vocabulary tile width
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    z_row_ptr = _row_ptr(logits_ptr, row, R, logits_stride_g, logits_stride_r)
    r_row_ptr = z_row_ptr
    if HAS_REF:
        r_row_ptr = _row_ptr(ref_ptr, row, R, ref_stride_g, ref_stride_r)

    v_start = split * chunk_size
    v_end = tl.minimum(v_start + chunk_size, V)
    target = 0
    is_valid = True
    if HAS_TARGETS:
        target = tl.load(targets_ptr + row)
        is_valid = target != ignore_index
        v_end = tl.where(is_valid, v_end, v_start)  # ignored rows: no iteration, no reads

    cols_in_tile = tl.arange(0, BLOCK_V)
    max_a = float("-inf")
    max_b = float("-inf")
    max_m = float("-inf")
    sum_a = tl.zeros([BLOCK_V], dtype=tl.float32)
    ent_a = tl.zeros([BLOCK_V], dtype=tl.float32)
    kl_a = tl.zeros([BLOCK_V], dtype=tl.float32)
    sum_b = tl.zeros([BLOCK_V], dtype=tl.float32)
    sum_m = tl.zeros([BLOCK_V], dtype=tl.float32)
    for v_tile in range(v_start, v_end, BLOCK_V):
        cols = v_tile + cols_in_tile
        mask = cols < v_end
        z = tl.load(z_row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        a, _ = softcap_temper(z, softcap, inv_temperature, HAS_SOFTCAP)
        new_max_a = tl.maximum(max_a, tl.max(a, axis=0))
        shift_a = finite_shift(new_max_a)
        step_a = shift_step(max_a, shift_a)
        alpha_a = tl.exp(step_a)
        exp_a = tl.exp(a - shift_a)
        has_p = exp_a > 0.0  # select, never multiply, the p == 0 terms (a = -inf gives NaN)
        ent_a = (ent_a + step_a * sum_a) * alpha_a + tl.where(has_p, exp_a * (a - shift_a), 0.0)
        sum_a = sum_a * alpha_a + exp_a
        max_a = new_max_a
        if HAS_REF:
            r = tl.load(r_row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
            b, _ = softcap_temper(r, softcap, inv_temperature, HAS_SOFTCAP)
            kl_a = kl_a * alpha_a + tl.where(has_p, exp_a * (a - b), 0.0)
            new_max_b = tl.maximum(max_b, tl.max(b, axis=0))
            shift_b = finite_shift(new_max_b)
            sum_b = sum_b * tl.exp(shift_step(max_b, shift_b)) + tl.exp(b - shift_b)
            max_b = new_max_b
            if HAS_MIX:
                m = mix(a, b, coef)
                new_max_m = tl.maximum(max_m, tl.max(m, axis=0))
                shift_m = finite_shift(new_max_m)
                sum_m = sum_m * tl.exp(shift_step(max_m, shift_m)) + tl.exp(m - shift_m)
                max_m = new_max_m

    sum_a = tl.sum(sum_a, axis=0)
    ent_a = tl.sum(ent_a, axis=0)
    kl_a = tl.sum(kl_a, axis=0)
    sum_b = tl.sum(sum_b, axis=0)
    sum_m = tl.sum(sum_m, axis=0)
    if IS_SPLIT:
        partial_row_ptr = partial_ptr + split * N + row  # layout.split_workspace
        plane = num_splits * N
        tl.store(partial_row_ptr + PART_MAX_A * plane, max_a)
        tl.store(partial_row_ptr + PART_SUM_A * plane, sum_a)
        tl.store(partial_row_ptr + PART_ENT_A * plane, ent_a)
        tl.store(partial_row_ptr + PART_KL_A * plane, kl_a)
        tl.store(partial_row_ptr + PART_MAX_B * plane, max_b)
        tl.store(partial_row_ptr + PART_SUM_B * plane, sum_b)
        tl.store(partial_row_ptr + PART_MAX_M * plane, max_m)
        tl.store(partial_row_ptr + PART_SUM_M * plane, sum_m)
    else:
        a_t = 0.0
        b_t = 0.0
        m_t = 0.0
        if HAS_TARGETS:
            a_t, b_t, m_t = _target_logits(z_row_ptr, r_row_ptr, target, is_valid, coef,
                                           inv_temperature, softcap, HAS_REF, HAS_MIX,
                                           HAS_SOFTCAP)
        _store_row_stats(stats_ptr, lse_ptr, row, N, is_valid, a_t, b_t, m_t,
                         max_a, sum_a, ent_a, kl_a, max_b, sum_b, max_m, sum_m,
                         HAS_TARGETS, HAS_REF, HAS_MIX)


@triton.jit
def _token_stats_merge_kernel(
    partial_ptr,         # [NUM_PARTIALS, num_splits, N] fp32 partials of the forward kernel
    logits_ptr,          # [G, R, V] policy logits (target logit loads)
    logits_stride_g,     # element stride of logits over G
    logits_stride_r,     # element stride of logits over R
    ref_ptr,             # [G, R, V] reference logits (HAS_REF)
    ref_stride_g,        # element stride of ref over G
    ref_stride_r,        # element stride of ref over R
    targets_ptr,         # [N] int64 targets (HAS_TARGETS)
    stats_ptr,           # [5, N] fp32 out: statistics
    lse_ptr,             # [3, N] fp32 out: L_a, L_b, L_m
    N,                   # rows
    R,                   # rows per group
    num_splits,          # partials per row
    coef,                # mixture weight of the reference in [0, 1] (HAS_MIX; common.mix)
    inv_temperature,     # 1 / T
    softcap,             # s > 0 (HAS_SOFTCAP)
    ignore_index,        # target value of rows that get no statistics
    HAS_TARGETS: tl.constexpr,  # as in the forward kernel
    HAS_REF: tl.constexpr,      # as in the forward kernel
    HAS_MIX: tl.constexpr,      # as in the forward kernel
    HAS_SOFTCAP: tl.constexpr,  # as in the forward kernel
    BLOCK_SPLITS: tl.constexpr,  # power of two >= num_splits
):
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, BLOCK_SPLITS)
    mask = splits < num_splits
    partial_row_ptr = partial_ptr + splits * N + row  # layout.split_workspace
    plane = num_splits * N
    part_max_a = tl.load(partial_row_ptr + PART_MAX_A * plane, mask=mask, other=float("-inf"))
    part_sum_a = tl.load(partial_row_ptr + PART_SUM_A * plane, mask=mask, other=0.0)
    part_ent_a = tl.load(partial_row_ptr + PART_ENT_A * plane, mask=mask, other=0.0)
    part_kl_a = tl.load(partial_row_ptr + PART_KL_A * plane, mask=mask, other=0.0)

    max_a = tl.max(part_max_a, axis=0)
    step_a = shift_step(part_max_a, finite_shift(max_a))
    alpha_a = tl.exp(step_a)
    sum_a = tl.sum(alpha_a * part_sum_a, axis=0)
    ent_a = tl.sum(alpha_a * (part_ent_a + step_a * part_sum_a), axis=0)
    kl_a = tl.sum(alpha_a * part_kl_a, axis=0)
    max_b = float("-inf")
    max_m = float("-inf")
    sum_b = 0.0
    sum_m = 0.0
    if HAS_REF:
        part_max_b = tl.load(partial_row_ptr + PART_MAX_B * plane, mask=mask, other=float("-inf"))
        part_sum_b = tl.load(partial_row_ptr + PART_SUM_B * plane, mask=mask, other=0.0)
        max_b = tl.max(part_max_b, axis=0)
        sum_b = tl.sum(tl.exp(shift_step(part_max_b, finite_shift(max_b))) * part_sum_b, axis=0)
        if HAS_MIX:
            part_max_m = tl.load(partial_row_ptr + PART_MAX_M * plane, mask=mask, other=float("-inf"))
            part_sum_m = tl.load(partial_row_ptr + PART_SUM_M * plane, mask=mask, other=0.0)
            max_m = tl.max(part_max_m, axis=0)
            sum_m = tl.sum(tl.exp(shift_step(part_max_m, finite_shift(max_m))) * part_sum_m,
                           axis=0)

    a_t = 0.0
    b_t = 0.0
    m_t = 0.0
    is_valid = True
    if HAS_TARGETS:
        target = tl.load(targets_ptr + row)
        is_valid = target != ignore_index
        z_row_ptr = _row_ptr(logits_ptr, row, R, logits_stride_g, logits_stride_r)
        r_row_ptr = z_row_ptr
        if HAS_REF:
            r_row_ptr = _row_ptr(ref_ptr, row, R, ref_stride_g, ref_stride_r)
        a_t, b_t, m_t = _target_logits(z_row_ptr, r_row_ptr, target, is_valid, coef,
                                       inv_temperature, softcap, HAS_REF, HAS_MIX, HAS_SOFTCAP)
    _store_row_stats(stats_ptr, lse_ptr, row, N, is_valid, a_t, b_t, m_t,
                     max_a, sum_a, ent_a, kl_a, max_b, sum_b, max_m, sum_m,
                     HAS_TARGETS, HAS_REF, HAS_MIX)


@triton.jit
def _token_stats_bwd_kernel(
    grad_stats_ptr,      # [5, N] fp32 upstream gradients of the statistics
    logits_ptr,          # [G, R, V] policy logits z
    logits_stride_g,     # element stride of logits over G
    logits_stride_r,     # element stride of logits over R
    ref_ptr,             # [G, R, V] reference logits r (HAS_REF)
    ref_stride_g,        # element stride of ref over G
    ref_stride_r,        # element stride of ref over R
    targets_ptr,         # [N] int64 targets (HAS_TARGETS)
    stats_ptr,           # [5, N] fp32 forward statistics (entropy and KL are read)
    lse_ptr,             # [3, N] fp32 forward L_a, L_b, L_m
    grad_logits_ptr,     # [N, V] out: dz, contiguous, dtype of logits (HAS_GRAD_LOGITS)
    grad_ref_ptr,        # [N, V] out: dr, contiguous, dtype of ref (HAS_GRAD_REF)
    N,                   # rows
    R,                   # rows per group
    V,                   # vocabulary size
    coef,                # mixture weight of the reference in [0, 1] (HAS_MIX; common.mix)
    inv_temperature,     # 1 / T
    softcap,             # s > 0 (HAS_SOFTCAP)
    ignore_index,        # target value of rows that get no gradient
    HAS_TARGETS: tl.constexpr,      # log-prob terms (delta_t) and ignore_index rows
    HAS_REF: tl.constexpr,          # KL and ref log-prob terms
    HAS_MIX: tl.constexpr,          # mixture log-prob terms
    HAS_SOFTCAP: tl.constexpr,      # chain rule through s * tanh(x / s)
    HAS_GRAD_LOGITS: tl.constexpr,  # write dz
    HAS_GRAD_REF: tl.constexpr,     # write dr (needs HAS_REF)
    BLOCK_V: tl.constexpr,          # vocabulary tile width
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V

    is_valid = True
    g_ent = tl.load(grad_stats_ptr + ENTROPY * N + row)
    if HAS_TARGETS:
        target = tl.load(targets_ptr + row)
        is_valid = target != ignore_index
        delta = (cols == target).to(tl.float32)
        g_ent = tl.where(is_valid, g_ent, 0.0)
    load_mask = cols < tl.where(is_valid, V, 0)  # ignored rows read nothing, write zeros
    entropy = tl.load(stats_ptr + ENTROPY * N + row)
    lse_a = tl.load(lse_ptr + LSE_POLICY * N + row)
    z = tl.load(_row_ptr(logits_ptr, row, R, logits_stride_g, logits_stride_r) + cols,
                mask=load_mask, other=float("-inf")).to(tl.float32)
    a, da_dz = softcap_temper(z, softcap, inv_temperature, HAS_SOFTCAP)
    log_p = a - lse_a
    p = tl.exp(log_p)
    has_p = p > 0.0  # p == 0 terms contribute exactly 0 (log p = -inf there)

    grad_a = tl.where(g_ent != 0.0, -g_ent * tl.where(has_p, p * (log_p + entropy), 0.0), 0.0)
    if HAS_TARGETS:
        g_lp = tl.where(is_valid, tl.load(grad_stats_ptr + LOGPROBS * N + row), 0.0)
        grad_a += tl.where(g_lp != 0.0, g_lp * (delta - p), 0.0)
    if HAS_REF:
        g_kl = tl.where(is_valid, tl.load(grad_stats_ptr + KL * N + row), 0.0)
        kl = tl.load(stats_ptr + KL * N + row)
        lse_b = tl.load(lse_ptr + LSE_REF * N + row)
        r = tl.load(_row_ptr(ref_ptr, row, R, ref_stride_g, ref_stride_r) + cols,
                    mask=load_mask, other=float("-inf")).to(tl.float32)
        b, db_dr = softcap_temper(r, softcap, inv_temperature, HAS_SOFTCAP)
        log_q = b - lse_b
        q = tl.exp(log_q)
        grad_a += tl.where(g_kl != 0.0,
                           g_kl * tl.where(has_p, p * (log_p - log_q - kl), 0.0), 0.0)
        grad_b = tl.where(g_kl != 0.0, g_kl * (q - p), 0.0)
        if HAS_TARGETS:
            g_rlp = tl.where(is_valid, tl.load(grad_stats_ptr + REF_LOGPROBS * N + row), 0.0)
            grad_b += tl.where(g_rlp != 0.0, g_rlp * (delta - q), 0.0)
        if HAS_MIX:
            g_mix = tl.where(is_valid, tl.load(grad_stats_ptr + MIXTURE_LOGPROBS * N + row), 0.0)
            lse_m = tl.load(lse_ptr + LSE_MIXTURE * N + row)
            pi = tl.exp(mix(a, b, coef) - lse_m)
            grad_m = tl.where(g_mix != 0.0, g_mix * (delta - pi), 0.0)
            grad_a += (1.0 - coef) * grad_m
            grad_b += coef * grad_m
        if HAS_GRAD_REF:
            tl.store(grad_ref_ptr + row * V + cols,
                     (grad_b * db_dr).to(grad_ref_ptr.dtype.element_ty), mask=col_mask)
    if HAS_GRAD_LOGITS:
        tl.store(grad_logits_ptr + row * V + cols,
                 (grad_a * da_dz).to(grad_logits_ptr.dtype.element_ty), mask=col_mask)


# --------------------------------------------------------------------------------------------
# Host wrappers
# --------------------------------------------------------------------------------------------
def _ref_args(ref_logits: Optional[torch.Tensor]) -> Tuple:
    if ref_logits is None:
        return None, 0, 0
    return ref_logits, ref_logits.stride(0), ref_logits.stride(1)


def _flags(targets, ref_logits, scalars: layout.Scalars):
    """The compile-time flags of the forward and backward kernels."""
    return dict(HAS_TARGETS=targets is not None, HAS_REF=ref_logits is not None,
                HAS_MIX=targets is not None and scalars.coef is not None,
                HAS_SOFTCAP=scalars.softcap is not None)


def token_stats_forward(
    logits: torch.Tensor,
    targets: Optional[torch.Tensor],
    ref_logits: Optional[torch.Tensor],
    scalars: layout.Scalars,
    *,
    config,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed float32 ``stats [5, N]`` and ``lse [3, N]`` of ``[G, R, V]`` logits (DESIGN.md).
    ``config``: a ``nashkern.tuning.TokenStatsTriton`` (``tuning.config_for``)."""
    check_token_stats_inputs(logits, targets, ref_logits, scalars.coef)
    G, R, V = logits.shape
    N = G * R
    device = logits.device
    block_v = min(config.BLOCK_V_FWD, triton.next_power_of_2(V))
    num_splits, tiles_per_split = plan_vocab_splits(N, triton.cdiv(V, block_v), device,
                                                    config.programs_per_sm)
    is_split = num_splits > 1

    stats = torch.empty((NUM_STATS, N), dtype=torch.float32, device=device)
    lse = torch.empty((NUM_LSE, N), dtype=torch.float32, device=device)
    partials = split_workspace(num_splits, N, device) if is_split else None

    ref, ref_stride_g, ref_stride_r = _ref_args(ref_logits)
    args = scalars.kernel_args()
    flags = _flags(targets, ref_logits, scalars)
    with layout.device_guard(device):
        _token_stats_fwd_kernel[(N, num_splits)](
            logits, logits.stride(0), logits.stride(1), ref, ref_stride_g, ref_stride_r, targets,
            stats, lse, partials, N, R, V, tiles_per_split * block_v, num_splits,
            **args, **flags, IS_SPLIT=is_split, BLOCK_V=block_v, num_warps=config.num_warps,
        )
        if is_split:
            _token_stats_merge_kernel[(N,)](
                partials, logits, logits.stride(0), logits.stride(1), ref, ref_stride_g,
                ref_stride_r, targets, stats, lse, N, R, num_splits, **args, **flags,
                BLOCK_SPLITS=triton.next_power_of_2(num_splits), num_warps=1,
            )
    return stats, lse


def token_stats_backward(
    grad_stats: torch.Tensor,
    logits: torch.Tensor,
    targets: Optional[torch.Tensor],
    ref_logits: Optional[torch.Tensor],
    stats: torch.Tensor,
    lse: torch.Tensor,
    scalars: layout.Scalars,
    *,
    needs_grad_logits: bool,
    needs_grad_ref: bool,
    config,
    out: Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients w.r.t. ``logits`` and ``ref_logits`` (``[G, R, V]``, contiguous, input dtype)
    from the upstream ``grad_stats [5, N]`` and the forward's ``stats`` and ``lse``.

    ``out``: optional (grad_logits, grad_ref) destinations, contiguous ``[G, R, V]`` in the
    inputs' dtypes; they may be the inputs themselves (the chunked linear strategy turns its
    logits buffer into gradients in place: each program reads its tile before writing it)."""
    check_token_stats_inputs(logits, targets, ref_logits, scalars.coef)
    G, R, V = logits.shape
    N = G * R
    for name, x, rows in (("grad_stats", grad_stats, NUM_STATS), ("stats", stats, NUM_STATS),
                          ("lse", lse, NUM_LSE)):
        if x.shape != (rows, N) or x.dtype != torch.float32 or x.device != logits.device:
            raise ValueError(f"{name} must be a float32 [{rows}, {N}] tensor on the logits' device")
    needs_grad_ref = needs_grad_ref and ref_logits is not None
    if not (needs_grad_logits or needs_grad_ref):
        return None, None
    grad_logits, grad_ref = layout.grad_outputs(logits, ref_logits, needs_grad_logits,
                                                needs_grad_ref, out)

    block_v = min(config.BLOCK_V_BWD, triton.next_power_of_2(V))
    ref, ref_stride_g, ref_stride_r = _ref_args(ref_logits)
    with layout.device_guard(logits.device):
        _token_stats_bwd_kernel[(N, triton.cdiv(V, block_v))](
            grad_stats.contiguous(), logits, logits.stride(0), logits.stride(1), ref,
            ref_stride_g, ref_stride_r, targets, stats.contiguous(), lse.contiguous(),
            grad_logits, grad_ref, N, R, V,
            **scalars.kernel_args(),
            **_flags(targets, ref_logits, scalars),
            HAS_GRAD_LOGITS=needs_grad_logits,
            HAS_GRAD_REF=needs_grad_ref,
            BLOCK_V=block_v,
            num_warps=config.num_warps,
        )
    return grad_logits, grad_ref
