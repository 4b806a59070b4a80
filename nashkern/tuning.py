"""Every tuning constant of nashkern, in one place.

Each kernel reads a frozen default config from here; nothing else in the package hard-codes a
block size. Autotuning is only done on request (``NASHKERN_AUTOTUNE=1``), never silently.
Comments carry the reason for each choice; figures marked "untuned" still await a GPU run
(see BENCHMARKS.md for the device each figure was measured on).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

AUTOTUNE = os.environ.get("NASHKERN_AUTOTUNE", "0") == "1"


@dataclass(frozen=True)
class TorchChunking:
    """Chunk sizes of the plain-PyTorch streaming backend (``backend="torch"``)."""

    #: Max float32 elements of one temporary ``[rows, V]`` tile over logits input
    #: (2**22 elements = 16 MiB: large enough to amortise PyTorch op overhead on CPU).
    logits_tile_elements: int = 1 << 22
    #: Rows per block and vocabulary columns per tile of the hidden-state path. The largest
    #: temporary is ``[rows, vocab_tile]`` float32 (1024 x 4096 = 16 MiB).
    linear_rows: int = 1024
    linear_vocab_tile: int = 4096


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
    (every one a power of two >= 16), shared by the forward and backward kernels.
    """

    BLOCK_N: int = 64
    BLOCK_V: int = 128
    BLOCK_D: int = 64
    num_warps: int = 8
    num_stages: int = 3
    #: The forward splits the vocabulary across programs until the grid holds at least this
    #: many programs per SM (two waves, so that a small N still fills all 132 SMs of an H100).
    MIN_PROGRAMS_PER_SM: int = 2


@dataclass(frozen=True)
class MixtureSampleTriton:
    """Fused Gumbel-max mixture sampler (kernels/mixture_sample.py). Untuned."""

    BLOCK_V: int = 4096
    num_warps: int = 8


TORCH = TorchChunking()
TOKEN_STATS = TokenStatsTriton()
LINEAR_TOKEN_STATS = LinearTokenStatsTriton()
MIXTURE_SAMPLE = MixtureSampleTriton()
