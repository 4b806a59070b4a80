"""Every tuning constant of nashkern, in one place.

Each kernel receives a frozen config from :func:`config_for` (the one lookup); nothing else in the package hard-codes a
block size.
Comments carry the reason for each choice; figures marked "untuned" still await a GPU run
(see BENCHMARKS.md for the device each figure was measured on).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch


@dataclass(frozen=True)
class TorchChunking:
    """Chunk sizes of the plain-PyTorch streaming backend (``backend="torch"``)."""

    #: Max float32 elements of one temporary ``[rows, V]`` tile over logits input
    #: (2**22 elements = 16 MiB: large enough to amortise PyTorch op overhead on CPU).
    logits_tile_elements: int = 1 << 22
    #: Rows per block and vocabulary columns per tile of the hidden-state path. The largest
    #: temporary is ``[rows, vocab_tile]`` float32 (512 x 2048 = 4 MiB). Measured on the CPU
    #: (AMD EPYC, 1 thread, N=1024, D=896, V=151936, fp32 log-probs forward+backward): peak
    #: malloc'd bytes beyond the 519 MiB fp32 dW 40 MiB vs 148 MiB at 1024 x 4096, same time
    #: (13.7 s vs 13.1 / 14.1 s); the [512, 896] x [896, 2048] products still amortise overhead.
    linear_rows: int = 512
    linear_vocab_tile: int = 2048
    #: Vocabulary block of the torch sampler's two-level inverse CDF (block sums, then a prefix
    #: sum inside one block per row): ~sqrt(V) keeps both levels small.
    sample_block: int = 1024


@dataclass(frozen=True)
class TokenStatsTriton:
    """Triton kernels over logits input (kernels/token_stats.py). Untuned."""

    #: Vocabulary tiles. The forward keeps 5 fp32 per-lane accumulators of the tile width (a
    #: tile costs 3 max reductions; the sums are reduced once per row). ptxas for sm_90, bf16,
    #: every feature on, 8 warps: forward 109 / backward 116 registers at 2048, no spills
    #: (204 / 211 at 4096, i.e. one CTA per SM).
    BLOCK_V_FWD: int = 2048
    BLOCK_V_BWD: int = 2048
    num_warps: int = 8
    #: The forward splits a row's vocabulary over several programs (partials merged by a small
    #: kernel) until rows x splits reaches this many programs per SM: few long rows still fill
    #: the device, many rows (>= this x SMs) run one program per row and skip the merge.
    programs_per_sm: int = 4


@dataclass(frozen=True)
class LinearTokenStatsTriton:
    """Fused hidden @ weight.T streaming kernels (kernels/linear_token_stats.py). Untuned.

    Rows per program, vocabulary columns per tile and the hidden-size chunk of each ``tl.dot``
    (every one a power of two >= 16). ptxas for sm_90, every feature on, 8 warps, 3 stages:
    forward 64 x 128 x 64: bf16 255 registers, 16 B spilled, 72 KiB shared memory (fp32 as
    3xTF32: 688 B spilled, 160 KiB). The backward keeps more fp32 tiles live (p, q, pi, ga, gb)
    and pipelines up to 6 dot loops: at 64 x 64 x 64 bf16 198 registers, no spills, 96 KiB (fp32:
    72 B spilled, 160 KiB); at 64 x 128 bf16 spills 288 B and fp32 needs 288 KiB, more than the
    227 KiB an H100 block may use.
    """

    BLOCK_N: int = 64
    BLOCK_V_FWD: int = 128
    BLOCK_V_BWD: int = 64
    BLOCK_D: int = 64
    #: Backward program order: this many row blocks sweep the vocabulary together, so their
    #: fp32 d_hidden rows (16 x 64 x D x 4 B = 16 MiB at D=4096, a third of an H100's L2) stay
    #: resident while each weight / d_weight tile is reused by 16 row blocks. Estimated from the
    #: L2 size, not measured; 1 restores row-block-fastest order.
    GROUP_N_BWD: int = 16
    num_warps: int = 8
    num_stages: int = 3
    #: The forward splits the vocabulary across programs until row blocks x splits reaches this
    #: many programs per SM (a program fills an SM's register file: two waves), so that a small
    #: N still fills all 132 SMs of an H100.
    programs_per_sm: int = 2


@dataclass(frozen=True)
class MixtureSampleTriton:
    """Fused Gumbel-max mixture sampler (kernels/mixture_sample.py). Untuned."""

    #: Vocabulary columns per tile: 4 segments of BLOCK_V / 4 columns sharing one Philox call
    #: per lane (4 columns per lane per segment at 8 warps). ptxas for sm_90, bf16, 8 warps:
    #: 73 registers at 4096 (40 at 2048, 169 at 8192), no spills.
    BLOCK_V: int = 4096
    num_warps: int = 8
    #: As TokenStatsTriton.programs_per_sm: rows x vocabulary splits to aim for per SM.
    programs_per_sm: int = 4


@dataclass(frozen=True)
class ChunkedLinear:
    """The chunked strategy of ``linear_token_stats`` (nashkern/backends/chunked.py): rows per
    chunk from a memory budget. Estimated, not measured on a GPU."""

    #: Bytes of the reusable ``[C, V]`` logits buffers (policy, plus the reference's when given,
    #: in the models' dtypes). 256 MiB holds C = 1024 bf16 rows of a 128256-token vocabulary:
    #: the GEMMs' M = 1024 keeps cuBLAS at its large-tile rate (estimated) while the buffer is
    #: ~3% of an 8192-token batch's [N, V] logits.
    max_chunk_bytes: int = 256 << 20
    #: C is a multiple of this many rows (cuBLAS / CUTLASS tiles are 128 rows tall; the last
    #: chunk takes the remainder), and at least one such block even when it exceeds the budget.
    row_align: int = 128


TORCH = TorchChunking()
TOKEN_STATS = TokenStatsTriton()
LINEAR_TOKEN_STATS = LinearTokenStatsTriton()
MIXTURE_SAMPLE = MixtureSampleTriton()
CHUNKED_LINEAR = ChunkedLinear()


_CONFIGS = {
    "torch": TORCH,
    "token_stats": TOKEN_STATS,
    "linear_token_stats": LINEAR_TOKEN_STATS,
    "mixture_sample": MIXTURE_SAMPLE,
    "chunked_linear": CHUNKED_LINEAR,
}


def config_for(kernel: str, device: Union[torch.device, str, None] = None):
    """The frozen config a kernel launches with on ``device``: ``kernel`` is ``"torch"``,
    ``"token_stats"``, ``"linear_token_stats"``, ``"mixture_sample"`` or ``"chunked_linear"`` (the
    chunk budget of linear_token_stats' chunked strategy). The one entry point
    the ops use (the kernels receive the result as their ``config`` argument). Today one config
    per kernel for every device; per-architecture tables plug in here."""
    try:
        return _CONFIGS[kernel]
    except KeyError:
        raise ValueError(f"no tuning config for kernel {kernel!r}; known: {sorted(_CONFIGS)}") from None
