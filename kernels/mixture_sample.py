"""Fused Gumbel-max sampling from the geometric mixture of two models (see DESIGN.md).

For each row ``n`` of ``[B, V]`` policy / reference logits ``z`` / ``r``::

    m_j    = mix(z_j / T, r_j / T, c)        (1 - c) a + c b; exactly a at c = 0, b at c = 1
    g_j    = -log(-log u_j)                  u_j ~ U(0, 1), Philox (tl.rand4x)
    sample = argmax_j (m_j + g_j)            ~ softmax(m)

Algorithm: one pass over the vocabulary per row, reading each logits tensor once (only the model
with non-zero weight is read at the end points). The mixture logits and the noise live in
registers: no ``[B, V]`` tensor is ever written. Each lane keeps its best ``(score, column)``
across tiles; the lanes are reduced once per row.

Randomness: Philox (``tl.rand4x``) under a 64-bit seed that is drawn from the caller's
``torch.Generator`` on the device and read by the kernel through a pointer (no host
synchronisation). One Philox call gives 4 uniforms, so a row uses ``W = ceil(V / 4)`` counters
``n * W + k`` (int64: unique for any ``B * V``) and column ``q * W + k`` takes output ``q`` of
counter ``k``: a tile of ``BLOCK_K`` counters covers 4 contiguous ``BLOCK_K``-column segments.
This quarters the integer work that would otherwise dominate this memory-bound kernel, and the
noise of an entry depends only on ``(seed, n, V, column)``: the sample is the same for any
block size or split.

Few rows cannot fill a GPU with one program per row, so the host may split each row's vocabulary
into ``num_splits`` chunks (grid ``(B, num_splits)``): each program writes its partial best
``(score, column)`` to a ``[B, num_splits]`` workspace and a merge kernel picks the winner.

A row whose mixture contains a NaN, or has no entry above ``-inf``, returns -1 (a chunk with a
NaN reports a NaN score to the merge).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import layout
from .layout import plan_vocab_splits

#: Smallest normal float32: ``u`` from ``tl.rand`` lies in ``[0, 1)``; clamping it here keeps
#: the Gumbel noise finite (same clamp as the torch backend).
_U_MIN = tl.constexpr(torch.finfo(torch.float32).tiny)


@triton.jit
def _argmax_combine(score_a, col_a, score_b, col_b):
    """Combine for ``tl.reduce`` over ``(score, column)``: the larger score, ties to the
    smaller column (scores are never NaN here)."""
    take_b = (score_b > score_a) | ((score_b == score_a) & (col_b < col_a))
    return tl.where(take_b, score_b, score_a), tl.where(take_b, col_b, col_a)


@triton.jit
def _mixture_sample_kernel(
    logits_ptr,          # [B, V] policy logits z (fp32/bf16/fp16, unit stride over V; HAS_POLICY)
    logits_stride,       # element stride of logits over B
    ref_ptr,             # [B, V] reference logits r (HAS_REF), own dtype and stride
    ref_stride,          # element stride of ref over B
    seed_ptr,            # int64 [1] Philox seed drawn from the generator on the device
    out_ptr,             # int64 [B] out: sampled column or -1 (not IS_SPLIT)
    part_score_ptr,      # fp32 [B, num_splits] out: best score of the chunk, NaN if the chunk
                         # has a NaN (IS_SPLIT)
    part_col_ptr,        # int32 [B, num_splits] out: column of that score (IS_SPLIT)
    V,                   # vocabulary size
    W,                   # Philox counters per row, ceil(V / 4)
    chunk_size,          # counters per split, a multiple of BLOCK_K
    num_splits,          # programs per row (grid dim 1)
    coef,                # mixture weight of the reference (HAS_POLICY and HAS_REF)
    inv_temperature,     # 1 / T
    HAS_POLICY: tl.constexpr,  # coef < 1: the policy contributes (read logits)
    HAS_REF: tl.constexpr,     # coef > 0: the reference contributes (read ref)
    IS_SPLIT: tl.constexpr,    # several programs per row: write partials for the merge kernel
    BLOCK_K: tl.constexpr,     # counters per tile; a tile covers 4 segments of BLOCK_K columns
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    seed = tl.load(seed_ptr)
    z_row_ptr = logits_ptr + row * logits_stride
    r_row_ptr = ref_ptr + row * ref_stride
    k_start = split * chunk_size
    k_end = tl.minimum(k_start + chunk_size, W)

    best_score = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)
    best_col = tl.zeros([BLOCK_K], dtype=tl.int32)
    nan_count = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k_tile in range(k_start, k_end, BLOCK_K):
        k = k_tile + tl.arange(0, BLOCK_K)
        uniforms = tl.rand4x(seed, row * W + k)  # one Philox call, 4 uniforms in [0, 1)
        for q in tl.static_range(4):
            cols = q * W + k
            mask = (k < k_end) & (cols < V)
            if HAS_POLICY:
                a = tl.load(z_row_ptr + cols, mask=mask,
                            other=float("-inf")).to(tl.float32) * inv_temperature
            if HAS_REF:
                b = tl.load(r_row_ptr + cols, mask=mask,
                            other=float("-inf")).to(tl.float32) * inv_temperature
            if HAS_POLICY and HAS_REF:
                m = (1.0 - coef) * a + coef * b
            elif HAS_POLICY:
                m = a
            else:
                m = b
            u = tl.maximum(uniforms[q], _U_MIN)
            score = m - tl.log(-tl.log(u))  # masked columns: -inf, never selected
            is_better = score > best_score  # a NaN score never wins
            best_score = tl.where(is_better, score, best_score)
            best_col = tl.where(is_better, cols, best_col)
            nan_count += (m != m).to(tl.int32)

    score, col = tl.reduce((best_score, best_col), 0, _argmax_combine)
    has_nan = tl.max(nan_count, axis=0) > 0
    if IS_SPLIT:
        part = row * num_splits + split
        tl.store(part_score_ptr + part, tl.where(has_nan, float("nan"), score))
        tl.store(part_col_ptr + part, col)
    else:
        is_invalid = has_nan | (score == float("-inf"))
        tl.store(out_ptr + row, tl.where(is_invalid, -1, col.to(tl.int64)))


@triton.jit
def _mixture_sample_merge_kernel(
    part_score_ptr,      # fp32 [B, num_splits] best score per chunk (NaN: the chunk has a NaN)
    part_col_ptr,        # int32 [B, num_splits] column of that score
    out_ptr,             # int64 [B] out: sampled column or -1
    num_splits,          # partials per row
    BLOCK_SPLITS: tl.constexpr,  # power of two >= num_splits
):
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, BLOCK_SPLITS)
    mask = splits < num_splits
    part_score = tl.load(part_score_ptr + row * num_splits + splits, mask=mask,
                         other=float("-inf"))
    part_col = tl.load(part_col_ptr + row * num_splits + splits, mask=mask, other=0)
    is_nan = part_score != part_score
    has_nan = tl.max(is_nan.to(tl.int32), axis=0) > 0
    score, col = tl.reduce((tl.where(is_nan, float("-inf"), part_score), part_col), 0,
                           _argmax_combine)
    is_invalid = has_nan | (score == float("-inf"))
    tl.store(out_ptr + row, tl.where(is_invalid, -1, col.to(tl.int64)))


def mixture_sample(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    seed: Optional[torch.Tensor],
    scalars: layout.Scalars,
    *,
    generator: Optional[torch.Generator] = None,
    config,
) -> torch.Tensor:
    """One Gumbel-max sample per row from ``mix(logits / T, ref_logits / T, coef)``.

    logits, ref_logits: ``[B, V]``, unit stride over V, fp32/bf16/fp16 (may differ).
    seed: int64 ``[1]`` tensor on the logits' device, or None: then one is drawn from
    ``generator`` (the device's default generator when None) on the device, without a sync.
    Returns int64 ``[B]``: the sampled column, or -1 for a row with a NaN or no finite entry.
    ``config``: a ``nashkern.tuning.MixtureSampleTriton`` (``tuning.config_for``). The scalars
    were validated once, by the op.
    """
    layout.check_logits_view("logits", logits, 2)
    layout.check_logits_view("ref_logits", ref_logits, 2)
    if ref_logits.shape != logits.shape or ref_logits.device != logits.device:
        raise ValueError("ref_logits must match logits in shape and device")
    B, V = logits.shape
    device = logits.device
    if seed is None:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device,
                             generator=generator)
    elif seed.shape != (1,) or seed.dtype != torch.int64 or seed.device != device:
        raise ValueError("seed must be an int64 [1] tensor on the logits' device")
    out = torch.empty(B, dtype=torch.int64, device=device)
    if B == 0:
        return out

    cfg, coef = config, scalars.coef
    n_counters = triton.cdiv(V, 4)
    block_k = min(cfg.BLOCK_V // 4, triton.next_power_of_2(n_counters))
    num_splits, tiles_per_split = plan_vocab_splits(B, triton.cdiv(n_counters, block_k), device,
                                                    cfg.programs_per_sm)
    is_split = num_splits > 1
    part_score = part_col = None
    if is_split:
        part_score = torch.empty((B, num_splits), dtype=torch.float32, device=device)
        part_col = torch.empty((B, num_splits), dtype=torch.int32, device=device)

    with layout.device_guard(device):
        _mixture_sample_kernel[(B, num_splits)](
            logits, logits.stride(0), ref_logits, ref_logits.stride(0), seed, out, part_score,
            part_col, V, n_counters, tiles_per_split * block_k, num_splits, float(coef),
            1.0 / scalars.temperature, HAS_POLICY=coef < 1.0, HAS_REF=coef > 0.0, IS_SPLIT=is_split,
            BLOCK_K=block_k, num_warps=cfg.num_warps,
        )
        if is_split:
            _mixture_sample_merge_kernel[(B,)](
                part_score, part_col, out, num_splits,
                BLOCK_SPLITS=triton.next_power_of_2(num_splits), num_warps=1,
            )
    return out
