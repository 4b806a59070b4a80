"""Fused ``hidden @ weight.T`` token statistics (Triton): log-probs, entropy, KL, mixture log-probs.

The ``[N, V]`` logits are never written to memory, forward or backward (see DESIGN.md for the
math and the contract).

Forward (``_fwd_kernel``, grid ``(cdiv(N, BLOCK_N), splits)``)
    Each program owns ``BLOCK_N`` rows and a contiguous range of vocabulary tiles of
    ``BLOCK_V = BLOCK_V_FWD`` columns.
    For every tile it computes the policy logits ``z = H @ W.T + bias`` (a ``tl.dot`` loop over
    ``D`` in ``BLOCK_D`` chunks, fp32 accumulator) and, with a reference, the reference logits of
    the *same* columns, applies softcap and temperature (``a``, ``b``, and the mixture ``m``), then
    folds the tile into per-row online statistics, flash-attention style:

        max_a, sum_a = running max and  sum_j exp(a_j - max_a)
        ent_a        =                  sum_j exp(a_j - max_a) * (a_j - max_a)
        kl           =                  sum_j exp(a_j - max_a) * (a_j - b_j)
        max_b, sum_b, max_m, sum_m      (log-sum-exp of the reference and of the mixture)
        a_t, b_t, m_t                   (the target column, picked out of the tile that holds it)

    so one sweep serves all five fields. Then ``L_a = max_a + log(sum_a)``,
    ``entropy = log(sum_a) - ent_a / sum_a`` and ``kl = kl / sum_a - L_a + L_b``.
    When ``cdiv(N, BLOCK_N)`` programs alone would leave SMs idle, the vocabulary is split across
    ``splits`` programs per row block (chosen on the host, ``programs_per_sm``); each writes its
    partial statistics to a ``[NUM_PARTIALS, splits, N] (``layout.split_workspace``)`` buffer and ``_merge_kernel`` combines
    them with the same associative merge and writes ``stats [5, N]`` and ``lse [3, N]`` (the only
    state saved for the backward).

Backward: ``linear_token_stats_backward.py`` (recomputes the logit tiles with the helpers here).

Cost (D = hidden size of a model, Dr = the reference's)
    FLOPs: forward ``2*N*D*V`` per model (``+ 2*N*Dr*V`` with a reference); backward ``2*N*D*V``
    per model to recompute the logits (the reference tile is recomputed whenever there is one: KL
    and the mixture need ``q``) ``+ 2*N*D*V`` for each of ``d_hidden`` and ``d_weight`` that is
    needed, i.e. ``6*N*D*V`` per model needing both; ``10*N*D*V`` for bf16/fp16 models with
    ``split_grad_operand`` (each gradient product is two tensor-core dots, see Numerics).
    Bytes: ``weight`` is streamed once per row block (``cdiv(N, BLOCK_N)`` times, mostly from L2:
    the concurrently running programs of one wave sweep the same tiles) and each ``hidden`` block
    once per vocabulary tile (from L2). Besides the inputs, the forward writes only ``O(N)``
    floats (``11 * splits * N`` partials, ``8 * N`` outputs). The backward allocates fp32
    ``d_hidden`` / ``d_weight`` / ``d_bias`` (sizes of the inputs) and issues
    ``N*D*cdiv(V, BLOCK_V) + V*D*cdiv(N, BLOCK_N)`` fp32 atomic adds per model.

Numerics: fp32 logits and statistics; bf16/fp16 operands go to the tensor cores as they are, fp32
ones as tf32 if ``torch.get_float32_matmul_precision() != "highest"`` (PyTorch's TF32 switch),
else as 3xTF32 (about fp32 accuracy, still on tensor cores: IEEE fp32 ``tl.dot`` runs on the FMA
units and ptxas spills it heavily). The fp32 logit gradient ``dz`` of a bf16/fp16 model is rounded
once to the model's dtype before its products with ``W`` and ``H``, as in Cut Cross-Entropy and
Liger (errors of ~eps(dtype) times the largest gradient entry); the backward's
``split_grad_operand=True`` feeds it as ``hi + lo`` instead (two dots each, ~16 mantissa bits:
gradients agree with float32 math up to their final rounding).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import layout
from .common import (
    ENTROPY, KL, LOGPROBS, LSE_MIXTURE, LSE_POLICY, LSE_REF, MIXTURE_LOGPROBS, PART_ENT_A,
    PART_KL_A, PART_MAX_A, PART_MAX_B, PART_MAX_M, PART_SUM_A, PART_SUM_B, PART_SUM_M, PART_TGT_A,
    PART_TGT_B, PART_TGT_M, REF_LOGPROBS, merge_entropy, merge_lse, mix, softcap_temper,
)
from .layout import FLOAT_DTYPES, NUM_LSE, NUM_STATS, plan_vocab_splits, split_workspace

# Read by @triton.jit at decoration, as here: whether these kernels run in the CPU interpreter.
_INTERPRETED = tl.constexpr(triton.knobs.runtime.interpret)


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def scaled_logits(z, col_mask, inv_temperature, softcap, HAS_SOFTCAP: tl.constexpr):
    """``(cap(z) / T, cap'(z) / T)`` of an fp32 tile; columns outside the vocabulary get -inf
    (so they drop out of every sum). ``cap(-inf) = -inf`` with ``cap'(-inf) = 0``."""
    z, dz = softcap_temper(z, softcap, inv_temperature, HAS_SOFTCAP)
    return tl.where(col_mask[None, :], z, float("-inf")), dz


@triton.jit
def tile_dot(x, y, acc, IS_TF32: tl.constexpr):
    """``x @ y (+ acc)`` in fp32; fp32 operands as tf32 (IS_TF32) or 3xTF32 (see Numerics)."""
    if _INTERPRETED:
        # The interpreter holds bf16 as uint16 and its tl.dot would multiply the bit patterns
        # (triton-lang/triton#11584); the exact fp32 values give the GPU's bf16 products.
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    return tl.dot(x, y, acc, input_precision="tf32" if IS_TF32 else "tf32x3")


@triton.jit
def logits_tile(
    hidden_ptr,  # [N, D] hidden states of one model
    weight_ptr,  # [V, D] its lm_head
    bias_ptr,  # [V] its bias (read only if HAS_BIAS)
    rows,  # [BLOCK_N] row indices of the tile
    cols,  # [BLOCK_V] vocabulary indices of the tile
    row_mask,  # [BLOCK_N] rows < N
    col_mask,  # [BLOCK_V] cols < V
    D,  # hidden size
    HAS_BIAS: tl.constexpr,
    IS_TF32: tl.constexpr,  # fp32 operands as tf32, else 3xTF32
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """fp32 ``hidden[rows] @ weight[cols].T + bias[cols]`` (0 outside the matrix)."""
    offs_d = tl.arange(0, BLOCK_D)
    h_ptrs = hidden_ptr + rows.to(tl.int64)[:, None] * D + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    w_ptrs = weight_ptr + cols.to(tl.int64)[None, :] * D + offs_d[:, None]  # [BLOCK_D, BLOCK_V]
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_mask = offs_d < D - d0
        h = tl.load(h_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=d_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tile_dot(h, w, acc, IS_TF32)
        h_ptrs += BLOCK_D
        w_ptrs += BLOCK_D
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _tile_lse(x):
    """Per-row ``max`` of a tile, ``x - max``, ``e = exp(x - max)`` and ``sum e`` (the shift is
    0 in rows that are all -inf, whose ``e`` is then 0)."""
    tile_max = tl.max(x, 1)
    shifted = x - tl.where(tile_max == float("-inf"), 0.0, tile_max)[:, None]
    e = tl.exp(shifted)
    return tile_max, shifted, e, tl.sum(e, 1)


@triton.jit
def _no_columns(zero):
    """The online statistics of no column yet, per row (``zero``: ``[BLOCK_N]`` fp32 zeros):
    ``max_a, sum_a, ent_a, kl_a, tgt_a, max_b, sum_b, tgt_b, max_m, sum_m, tgt_m``, the maxima
    at -inf and the sums at 0 (the identity of ``merge_entropy`` / ``merge_lse``)."""
    empty_max = zero + float("-inf")
    return (empty_max, zero, zero, zero, zero, empty_max, zero, zero, empty_max, zero, zero)


@triton.jit
def _merge_split_lse(max_x, sum_x, tgt_x, part, split_stride, row_mask,
                     MAX: tl.constexpr, SUM: tl.constexpr, TGT: tl.constexpr):
    """Folds one split's partial ``(max, sum, target logit)`` of one log-sum-exp (rows ``MAX``,
    ``SUM``, ``TGT`` of the workspace at ``part``) into the running ``[BLOCK_N]`` ones."""
    max_x, sum_x = merge_lse(max_x, sum_x,
                             tl.load(part + MAX * split_stride, mask=row_mask, other=0.0),
                             tl.load(part + SUM * split_stride, mask=row_mask, other=0.0))
    return max_x, sum_x, tgt_x + tl.load(part + TGT * split_stride, mask=row_mask, other=0.0)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(
    hidden_ptr,  # [N, D] policy hidden states (fp32/bf16/fp16)
    weight_ptr,  # [V, D] policy lm_head, same dtype as hidden
    bias_ptr,  # [V] policy bias (read only if HAS_BIAS)
    ref_hidden_ptr,  # [N, DR] reference hidden states (read only if HAS_REF)
    ref_weight_ptr,  # [V, DR] reference lm_head (read only if HAS_REF)
    ref_bias_ptr,  # [V] reference bias (read only if HAS_REF_BIAS)
    targets_ptr,  # [N] int64 targets (read only if HAS_TARGETS)
    partials_ptr,  # [NUM_PARTIALS, num_splits, N] fp32 output: this split's online statistics
    N,  # rows
    V,  # vocabulary size
    D,  # policy hidden size
    DR,  # reference hidden size
    num_splits,  # programs per row block along the vocabulary (grid axis 1)
    tiles_per_split,  # BLOCK_V tiles swept by each of them
    inv_temperature,  # 1 / T
    softcap,  # s (used only if HAS_SOFTCAP)
    coef,  # mixture weight of the reference in [0, 1] (used only if HAS_MIX)
    HAS_BIAS: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_REF_BIAS: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
    HAS_MIX: tl.constexpr,  # implies HAS_REF and HAS_TARGETS
    HAS_SOFTCAP: tl.constexpr,
    IS_TF32: tl.constexpr,  # fp32 operands as tf32, else 3xTF32
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    if HAS_TARGETS:
        target = tl.load(targets_ptr + rows, mask=row_mask, other=-1)

    zero = tl.zeros([BLOCK_N], dtype=tl.float32)
    max_a, sum_a, ent_a, kl_a, tgt_a, max_b, sum_b, tgt_b, max_m, sum_m, tgt_m = _no_columns(zero)

    tile_start = pid_s * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for tile in range(tile_start, tile_end):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        # Both models' logits first: only one tile is live across the other's tl.dot loop.
        a = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, D,
                         HAS_BIAS, IS_TF32, BLOCK_N, BLOCK_V, BLOCK_D)
        if HAS_REF:
            b = logits_tile(ref_hidden_ptr, ref_weight_ptr, ref_bias_ptr, rows, cols, row_mask,
                             col_mask, DR, HAS_REF_BIAS, IS_TF32, BLOCK_N, BLOCK_V, BLOCK_D)
            b, _ = scaled_logits(b, col_mask, inv_temperature, softcap, HAS_SOFTCAP)
        a, _ = scaled_logits(a, col_mask, inv_temperature, softcap, HAS_SOFTCAP)

        tile_max, shifted, e, tile_sum = _tile_lse(a)
        tile_ent = tl.sum(tl.where(e > 0, e * shifted, 0.0), 1)  # e == 0 where a == -inf
        if HAS_REF:
            tile_kl = tl.sum(tl.where(e > 0, e * (a - b), 0.0), 1)
        else:
            tile_kl = zero
        max_a, sum_a, ent_a, kl_a = merge_entropy(max_a, sum_a, ent_a, kl_a,
                                                   tile_max, tile_sum, tile_ent, tile_kl)
        if HAS_REF:
            tile_max, _, _, tile_sum = _tile_lse(b)
            max_b, sum_b = merge_lse(max_b, sum_b, tile_max, tile_sum)
        if HAS_TARGETS:
            is_target = cols[None, :] == target[:, None]
            tgt_a += tl.sum(tl.where(is_target, a, 0.0), 1)
            if HAS_REF:
                tgt_b += tl.sum(tl.where(is_target, b, 0.0), 1)
            if HAS_MIX:
                m = mix(a, b, coef)
                tile_max, _, _, tile_sum = _tile_lse(m)
                max_m, sum_m = merge_lse(max_m, sum_m, tile_max, tile_sum)
                tgt_m += tl.sum(tl.where(is_target, m, 0.0), 1)

    out = partials_ptr + pid_s * N + rows
    split_stride = num_splits * N
    tl.store(out + PART_MAX_A * split_stride, max_a, mask=row_mask)
    tl.store(out + PART_SUM_A * split_stride, sum_a, mask=row_mask)
    tl.store(out + PART_ENT_A * split_stride, ent_a, mask=row_mask)
    tl.store(out + PART_KL_A * split_stride, kl_a, mask=row_mask)
    tl.store(out + PART_TGT_A * split_stride, tgt_a, mask=row_mask)
    if HAS_REF:
        tl.store(out + PART_MAX_B * split_stride, max_b, mask=row_mask)
        tl.store(out + PART_SUM_B * split_stride, sum_b, mask=row_mask)
        tl.store(out + PART_TGT_B * split_stride, tgt_b, mask=row_mask)
    if HAS_MIX:
        tl.store(out + PART_MAX_M * split_stride, max_m, mask=row_mask)
        tl.store(out + PART_SUM_M * split_stride, sum_m, mask=row_mask)
        tl.store(out + PART_TGT_M * split_stride, tgt_m, mask=row_mask)


@triton.jit
def _merge_kernel(
    partials_ptr,  # [NUM_PARTIALS, num_splits, N] fp32 online statistics of every split
    targets_ptr,  # [N] int64 targets (read only if HAS_TARGETS)
    stats_ptr,  # [5, N] fp32 output statistics (every entry written)
    lse_ptr,  # [3, N] fp32 output log-sum-exps L_a, L_b, L_m (every entry written)
    N,  # rows
    num_splits,  # vocabulary splits to merge
    ignore_index,  # target value of rows that get all-zero statistics
    HAS_REF: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
    HAS_MIX: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    zero = tl.zeros([BLOCK_N], dtype=tl.float32)
    max_a, sum_a, ent_a, kl_a, tgt_a, max_b, sum_b, tgt_b, max_m, sum_m, tgt_m = _no_columns(zero)
    split_stride = num_splits * N
    for split in range(num_splits):
        part = partials_ptr + split * N + rows
        max_a, sum_a, ent_a, kl_a = merge_entropy(
            max_a, sum_a, ent_a, kl_a,
            tl.load(part + PART_MAX_A * split_stride, mask=row_mask, other=0.0),
            tl.load(part + PART_SUM_A * split_stride, mask=row_mask, other=0.0),
            tl.load(part + PART_ENT_A * split_stride, mask=row_mask, other=0.0),
            tl.load(part + PART_KL_A * split_stride, mask=row_mask, other=0.0))
        tgt_a += tl.load(part + PART_TGT_A * split_stride, mask=row_mask, other=0.0)
        if HAS_REF:
            max_b, sum_b, tgt_b = _merge_split_lse(
                max_b, sum_b, tgt_b, part, split_stride, row_mask, PART_MAX_B, PART_SUM_B, PART_TGT_B)
        if HAS_MIX:
            max_m, sum_m, tgt_m = _merge_split_lse(
                max_m, sum_m, tgt_m, part, split_stride, row_mask, PART_MAX_M, PART_SUM_M, PART_TGT_M)

    log_sum_a = tl.log(sum_a)
    lse_a = max_a + log_sum_a
    entropy = log_sum_a - ent_a / sum_a
    if HAS_REF:
        lse_b = max_b + tl.log(sum_b)
        kl = kl_a / sum_a - lse_a + lse_b
    else:
        lse_b = zero
        kl = zero
    lse_m = max_m + tl.log(sum_m) if HAS_MIX else zero

    if HAS_TARGETS:
        target = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
        keep = target != ignore_index
        logprobs = tl.where(keep, tgt_a - lse_a, 0.0)
        ref_logprobs = tl.where(keep, tgt_b - lse_b, 0.0) if HAS_REF else zero
        mixture_logprobs = tl.where(keep, tgt_m - lse_m, 0.0) if HAS_MIX else zero
        entropy = tl.where(keep, entropy, 0.0)
        kl = tl.where(keep, kl, 0.0)
    else:
        logprobs = zero
        ref_logprobs = zero
        mixture_logprobs = zero

    tl.store(stats_ptr + LOGPROBS * N + rows, logprobs, mask=row_mask)
    tl.store(stats_ptr + ENTROPY * N + rows, entropy, mask=row_mask)
    tl.store(stats_ptr + REF_LOGPROBS * N + rows, ref_logprobs, mask=row_mask)
    tl.store(stats_ptr + KL * N + rows, kl, mask=row_mask)
    tl.store(stats_ptr + MIXTURE_LOGPROBS * N + rows, mixture_logprobs, mask=row_mask)
    tl.store(lse_ptr + LSE_POLICY * N + rows, lse_a, mask=row_mask)
    tl.store(lse_ptr + LSE_REF * N + rows, lse_b, mask=row_mask)
    tl.store(lse_ptr + LSE_MIXTURE * N + rows, lse_m, mask=row_mask)


# ----------------------------------------------------------------------------------------------
# Host wrappers
# ----------------------------------------------------------------------------------------------
def check_inputs(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, coef):
    """The launch contract (shapes, dtypes, contiguity, devices). The scalars were validated
    once, by the op (``nashkern.ops``' ``Scalars``)."""
    def check_model(name, h, w, b):
        if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1]:
            raise ValueError(f"{name}: expected hidden [N, D] and weight [V, D], got "
                             f"{tuple(h.shape)} and {tuple(w.shape)}")
        if h.dtype not in FLOAT_DTYPES or w.dtype != h.dtype:
            raise ValueError(f"{name}: hidden and weight must share a dtype among {FLOAT_DTYPES},"
                             f" got {h.dtype} and {w.dtype}")
        if b is not None and (b.shape != (w.shape[0],) or not b.is_floating_point()):
            raise ValueError(f"{name}: expected a floating bias [{w.shape[0]}], got "
                             f"{tuple(b.shape)} {b.dtype}")
        for t in (h, w, b):
            if t is not None and (not t.is_contiguous() or t.device != hidden.device):
                raise ValueError(f"{name}: inputs must be contiguous and on {hidden.device}")

    check_model("policy", hidden, weight, bias)
    if (ref_hidden is None) != (ref_weight is None) or (ref_hidden is None
                                                        and ref_bias is not None):
        raise ValueError("ref_hidden and ref_weight come together (ref_bias optional with them)")
    if ref_hidden is not None:
        check_model("reference", ref_hidden, ref_weight, ref_bias)
        if ref_hidden.shape[0] != hidden.shape[0] or ref_weight.shape[0] != weight.shape[0]:
            raise ValueError("the reference must have the policy's N and V")
    elif coef is not None:
        raise ValueError("coef needs a reference")
    if targets is not None and (targets.shape != (hidden.shape[0],)
                                or targets.dtype != torch.int64 or not targets.is_contiguous()):
        raise ValueError("targets must be a contiguous int64 [N] tensor")
    if hidden.shape[0] == 0:
        raise ValueError("N == 0 is handled by the caller")


def is_tf32() -> bool:
    """fp32 operands may be rounded to tf32 exactly when PyTorch's matmuls may."""
    return torch.get_float32_matmul_precision() != "highest"


def linear_token_stats_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    ref_hidden: Optional[torch.Tensor],
    ref_weight: Optional[torch.Tensor],
    ref_bias: Optional[torch.Tensor],
    scalars: layout.Scalars,
    *,
    config,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed statistics ``[5, N]`` and log-sum-exps ``[3, N]`` (float32) of the logits
    ``hidden @ weight.T + bias`` (and the reference's), streamed over vocabulary tiles.
    ``config``: a ``nashkern.tuning.LinearTokenStatsTriton`` (``tuning.config_for``)."""
    n = hidden.shape[0]
    stats = torch.empty((NUM_STATS, n), dtype=torch.float32, device=hidden.device)
    lse = torch.empty((NUM_LSE, n), dtype=torch.float32, device=hidden.device)
    with layout.device_guard(hidden.device):
        partials, flags = _launch_forward(hidden, weight, targets, bias, ref_hidden, ref_weight,
                                          ref_bias, scalars, config=config)
        _merge_kernel[(triton.cdiv(n, config.BLOCK_N),)](
            partials, targets, stats, lse, n, partials.shape[1], scalars.ignore_index, **flags,
            BLOCK_N=config.BLOCK_N,
        )
    return stats, lse


def linear_token_stats_partials(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias,
                                scalars: layout.Scalars, *, config):
    """The forward kernel alone: the split workspace ``[NUM_PARTIALS, splits, N]`` (each split's
    online statistics over its vocabulary tiles, not merged) and the kernel flags. A
    vocabulary-parallel head (``nashkern/backends/linear_token_stats_vocab_parallel.py``) merges
    the splits and the shards itself; ``targets`` are then local to ``weight``'s rows (a target
    in another shard: any value outside ``[0, V_r)``, it matches no column)."""
    with layout.device_guard(hidden.device):
        return _launch_forward(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias,
                               scalars, config=config)


def _launch_forward(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias,
                    scalars: layout.Scalars, *, config):
    """Check, allocate the split workspace, launch the forward kernel (under the caller's
    device guard) -> (workspace, flags)."""
    coef, softcap = scalars.coef, scalars.softcap
    check_inputs(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, coef)
    cfg = config
    (n, d), v = hidden.shape, weight.shape[0]
    has_ref = ref_hidden is not None
    n_row_blocks = triton.cdiv(n, cfg.BLOCK_N)
    splits, tiles_per_split = plan_vocab_splits(n_row_blocks, triton.cdiv(v, cfg.BLOCK_V_FWD),
                                                hidden.device, cfg.programs_per_sm)
    partials = split_workspace(splits, n, hidden.device)
    flags = dict(
        HAS_REF=has_ref,
        HAS_TARGETS=targets is not None,
        HAS_MIX=coef is not None and targets is not None,  # only mixture log-probs need it
    )
    # launched under the caller's layout.device_guard(hidden.device)
    _fwd_kernel[(n_row_blocks, splits)](
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, partials,
        n, v, d, ref_hidden.shape[1] if has_ref else 0, splits, tiles_per_split,
        1.0 / scalars.temperature, softcap or 0.0, coef or 0.0,
        HAS_BIAS=bias is not None, HAS_REF_BIAS=ref_bias is not None,
        HAS_SOFTCAP=softcap is not None, IS_TF32=is_tf32(), **flags,
        BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V_FWD, BLOCK_D=cfg.BLOCK_D,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return partials, flags
