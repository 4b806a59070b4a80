"""Every tuning constant of nashkern, in one place.

Each kernel reads a frozen default config from here; nothing else in the package hard-codes a
block size. Autotuning is only done on request (``NASHKERN_AUTOTUNE=1``), never silently.
Configs are per GPU architecture (``config_for(kernel, device)``); each carries the reason it
was chosen, "estimated" (from the compile gate's registers, spills and shared memory,
``scripts/compile_gate.py``, benchmarks/results/compile_gate.md) until a GPU run measures it
(see BENCHMARKS.md for the device each figure was measured on).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

if TYPE_CHECKING:  # torch is imported where a device is looked at, not at import
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
    #: Threads of the hidden-state path's work items (vocabulary ranges), each running its
    #: torch ops single-threaded; None: ``torch.get_num_threads()``. Own threads instead of
    #: torch's OpenMP team per op: with one competing busy process on 2 cores the team's
    #: barrier spin-waits cost the fused loop 3.2 -> 11.2 s of process CPU (DESIGN.md).
    linear_workers: Optional[int] = None
    #: Work items per worker when several run: items are pulled in order, so a worker that a
    #: competing process deschedules takes fewer; 8 keeps each item >= ~4 tiles at V=151936.
    linear_items_per_worker: int = 8
    #: Vocabulary block of the torch sampler's two-level inverse CDF (block sums, then a prefix
    #: sum inside one block per row): both levels stay small (594 blocks of 256 at V = 151936).
    #: 256, not ~sqrt(V) = 1024: ``linear_mixture_sample`` recomputes each row's chosen block
    #: from its weight rows (gathered: block x D floats per row, 128 KiB at D = 128 vs 512 KiB);
    #: the logits sampler measured the same at 128-1024 (7.4-8.4 ms per [8 + 8, 151936] pair of
    #: calls, loaded machine, within noise).
    sample_block: int = 256
    #: float32 elements of the sampler's one reused ``[rows, width]`` buffer (2**18 = 1 MiB:
    #: a row block's mixed logits stay in cache between its mix, max, exp and block sums, and
    #: no ``[B, V]`` temporary is allocated: on the CPU each fresh multi-MB tensor costs page
    #: faults). Measured (1 thread, [8, 151936] fp32, process CPU time on the loaded shared
    #: 2-core machine, load ~12): 2.3-2.9 ms at 2**18 vs 3.7-4.1 ms at 2**15 (op overhead) and
    #: 19.6-21 ms for the previous whole-row passes.
    sample_chunk_elements: int = 1 << 18
    #: ``linear_mixture_sample`` (the sampler fed by ``hidden @ weight_tile.T``): rows per GEMM
    #: block; its vocabulary tiles are ``sample_chunk_elements // rows`` columns (block-aligned),
    #: one reused float32 ``[rows, tile]`` buffer per model (1 MiB). The lead measured (1 thread,
    #: quiet, fp32, h [rows, 128] x W [151936, 128]^T) 2048-column tiles into one reused buffer
    #: at 31 GFLOP/s for 16 rows vs 20 writing the whole fresh [16, V] output. Measured here on
    #: the loaded machine (load 5-10, process CPU time, best of 5, Nash-MD's decode step: 16
    #: policy rows in two groups + 8 reference rows, V = 151936, D = 128): the tile GEMMs alone
    #: are within noise of the whole GEMM at 2048-65536 columns, and the whole op took 49 / 47 /
    #: 45-52 / 49 / 50 / 46 ms at fixed tiles of 2048 / 4096 / 8192 / 16384 / 32768 / 65536
    #: columns: the ~20 torch calls per tile cost more than cache misses, so tiles as wide as
    #: the sampler's 1 MiB chunks (16384 columns at 16 rows).
    linear_sample_rows: int = 256


@dataclass(frozen=True)
class TokenStatsTriton:
    """Triton kernels over logits input (kernels/token_stats.py)."""

    #: Vocabulary tiles. The forward keeps 5 fp32 per-lane accumulators of the tile width (a
    #: tile costs 3 max reductions; the sums are reduced once per row). Compile gate (8 warps,
    #: every launch variant, Triton 3.9 / 3.6): forward at most 110 / 120 registers on sm_90,
    #: 105 / 102 on sm_80; backward 96 / 80 and 99 / 102; no spills, at most 4 KiB of shared
    #: memory (the reductions). (Earlier ptxas -v at 4096: 204 / 211 registers, one CTA per SM.)
    BLOCK_V_FWD: int = 2048
    BLOCK_V_BWD: int = 2048
    num_warps: int = 8
    #: The forward splits a row's vocabulary over several programs (partials merged by a small
    #: kernel) until rows x splits reaches this many programs per SM: few long rows still fill
    #: the device, many rows (>= this x SMs) run one program per row and skip the merge.
    programs_per_sm: int = 4
    reason: str = dataclasses.field(default="", compare=False)


@dataclass(frozen=True)
class LinearTokenStatsTriton:
    """Fused hidden @ weight.T streaming kernels (kernels/linear_token_stats.py).

    Rows per program, vocabulary columns per tile and the hidden-size chunk of each ``tl.dot``
    (every one a power of two >= 16). The default (64 x 128 x 64, 8 warps, 3 stages) is what the
    interpreter tests run; on GPUs it spills (compile gate, bf16, every feature on: forward 255
    registers and 16 B stack on sm_90, 176-224 B on sm_80), hence the per-architecture configs
    below. fp32 operands run as 3xTF32 (three tensor-core dots per product) and spill with a
    reference at every config tried (Triton 3.9 / 3.6: up to 376 / 120 B in the sm_90 forward,
    520 / 240 B in the sm_80 backward); as tf32 they do not: recorded, not gated
    (benchmarks/results/compile_gate.md, compile_gate_triton-3.6.md).
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
    reason: str = dataclasses.field(default="", compare=False)


@dataclass(frozen=True)
class MixtureSampleTriton:
    """Fused Gumbel-max mixture sampler (kernels/mixture_sample.py)."""

    #: Vocabulary columns per tile: 4 segments of BLOCK_V / 4 columns sharing one Philox call
    #: per lane (4 columns per lane per segment at 8 warps). Compile gate, 8 warps, Triton 3.9 /
    #: 3.6: at most 74 / 74 registers on sm_90, 74 / 80 on sm_80, no spills, no shared memory
    #: (earlier ptxas -v on sm_90: 40 at 2048, 169 at 8192).
    BLOCK_V: int = 4096
    num_warps: int = 8
    #: As TokenStatsTriton.programs_per_sm: rows x vocabulary splits to aim for per SM.
    programs_per_sm: int = 4
    reason: str = dataclasses.field(default="", compare=False)


@dataclass(frozen=True)
class LinearStrategyCosts:
    """The cost model of ``linear_token_stats``' strategies that ``strategy="auto"`` reads
    (``ops.linear_token_stats.predicted_seconds``; DESIGN.md, "Cost model"): seconds = the
    matmul FLOPs at the strategy's matmul efficiency + the logits elements (per model and
    direction) times the strategy's per-element epilogue cost."""

    #: CPU matmul rate per thread, float32 (AMD EPYC AVX2, torch 2.13 + MKL, 1 thread: the
    #: [512, 128] x [128, 2048] head tiles and square 1024^3 reach 73-80 GFLOP/s).
    cpu_matmul_flops: float = 75e9
    #: CPU epilogue ns per logit and model, fused (the torch loop's in-place passes over a
    #: cache-resident tile) and chunked (the logits-input torch backend over a [C, V] buffer
    #: out of cache). Measured (process CPU time, 1 thread, N=1024, D=128, V=151936, fp32,
    #: policy + reference forward, log-probs backward; load ~4.5): forward fused 2.39 s, chunked
    #: 4.38 s; backward fused 2.39 s, chunked 3.30 s; minus the matmuls at the rate above.
    cpu_fused_ns_per_logit: float = 4.5
    cpu_chunked_ns_per_logit: float = 11.0
    #: GPU fraction of the matmul roofline (DESIGN.md's estimates, never measured here):
    #: chunked ~0.9 (cuBLAS GEMMs + memory-bound epilogues), fused ~0.2 (16-29 % per the
    #: sm_90 SASS analysis of issue 11: the fp32 atomics of its backward).
    gpu_chunked_fraction: float = 0.9
    gpu_fused_fraction: float = 0.2


@dataclass(frozen=True)
class ChunkedLinear:
    """The chunked strategy of ``linear_token_stats`` (nashkern/backends/linear_token_stats_chunked.py): rows per
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
_INTERPRETER = ("estimated: the CPU interpreter's config (the tests' shapes); on a GPU "
                "architecture without its own entry the compile gate's figures apply")
TOKEN_STATS = TokenStatsTriton(reason=_INTERPRETER)
LINEAR_TOKEN_STATS = LinearTokenStatsTriton(reason=_INTERPRETER)
MIXTURE_SAMPLE = MixtureSampleTriton(reason=_INTERPRETER)
CHUNKED_LINEAR = ChunkedLinear()
LINEAR_STRATEGY_COSTS = LinearStrategyCosts()


# --------------------------------------------------------------------------------------------
# Per-architecture frozen configs: one lookup, config_for(kernel, device)
# --------------------------------------------------------------------------------------------
#: The kernel families that read a config, and the config class of each.
KERNELS: Dict[str, type] = {
    "token_stats": TokenStatsTriton,
    "linear_token_stats": LinearTokenStatsTriton,
    "mixture_sample": MixtureSampleTriton,
}
#: Architectures with their own frozen configs ("sm_<major><minor>"); any other gets the config
#: of the newest listed architecture not newer than it (sm_86 -> sm_80, sm_100 -> sm_90), an
#: older one the "default".
ARCHS = ("sm_80", "sm_90")

#: Frozen configs per kernel and architecture. "default" serves the CPU interpreter and any GPU
#: not listed. Every value is "estimated" (registers / spills / shared memory from the compile
#: gate, ``scripts/compile_gate.py``, table in benchmarks/results/compile_gate.md) until a GPU
#: run measures it; the reason of each choice is next to it.
_CONFIGS: Dict[str, Dict[str, object]] = {
    "token_stats": {
        "default": TOKEN_STATS,
        "sm_90": dataclasses.replace(TOKEN_STATS, reason=(
            "estimated: compile gate sm_90 (Triton 3.9 and 3.6), every variant <= 120 registers "
            "at 8 warps, no spills: 2 CTAs per SM; 2048-wide tiles amortise the 3 row max "
            "reductions")),
        "sm_80": dataclasses.replace(TOKEN_STATS, reason=(
            "estimated: compile gate sm_80 (Triton 3.9 and 3.6), every variant <= 105 registers "
            "at 8 warps, no spills: 2 CTAs per SM")),
    },
    "linear_token_stats": {
        "default": LINEAR_TOKEN_STATS,
        "sm_90": dataclasses.replace(LINEAR_TOKEN_STATS, BLOCK_V_FWD=64, reason=(
            "estimated: compile gate sm_90, bf16/fp16: forward 64 x 64 x 64 at most 185 "
            "registers with Triton 3.9, 226 with 3.6 (64 x 128 spilled 16 B at 255; 64 x 128 "
            "with 2 stages fit at 255, no margin), 48 KiB shared, HGMMA (wgmma); backward 64 x "
            "64 x 64, 3 stages: at most 220 / 216 registers, 80 / 88 KiB, no spills; one 8-warp "
            "CTA per SM either way")),
        "sm_80": dataclasses.replace(LINEAR_TOKEN_STATS, BLOCK_V_FWD=64, BLOCK_D=32, reason=(
            "estimated: compile gate sm_80, bf16/fp16 (Triton 3.9 / 3.6): forward 64 x 64 x 32 "
            "at most 225 / 228 registers (BLOCK_D 64 spilled 176-224 B), 16 KiB shared, HMMA; "
            "backward 64 x 64 x 32 at most 242 / 205 registers (BLOCK_D 64: 96 B spilled), "
            "32 / 40 KiB shared")),
    },
    "mixture_sample": {
        "default": MIXTURE_SAMPLE,
        "sm_90": dataclasses.replace(MIXTURE_SAMPLE, reason=(
            "estimated: compile gate sm_90, at most 74 registers at 8 warps, no spills, no "
            "shared memory: 3 CTAs per SM to hide the loads of a memory-bound pass")),
        "sm_80": dataclasses.replace(MIXTURE_SAMPLE, reason=(
            "estimated: compile gate sm_80, at most 80 registers at 8 warps, no spills")),
    },
    # a memory budget, not a kernel shape: one value for every device
    "chunked_linear": {"default": CHUNKED_LINEAR},
}


def arch_of(device: Optional["torch.device"]) -> str:
    """``"sm_<major><minor>"`` of a CUDA device; ``"default"`` for None, the CPU and the
    interpreter (``TRITON_INTERPRET=1``)."""
    if device is None:
        return "default"
    import torch

    device = torch.device(device)
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "default"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def config_for_arch(kernel: str, arch: str):
    """The frozen config of ``kernel`` for ``arch`` ("sm_90", "sm_80", "default", or any other
    "sm_XY": the newest listed architecture not newer than it, else "default")."""
    if kernel not in _CONFIGS:
        raise ValueError(f"kernel must be one of {sorted(_CONFIGS)}, got {kernel!r}")
    table = _CONFIGS[kernel]
    if arch in table:
        return table[arch]
    if not arch.startswith("sm_") or not arch[3:].isdigit():
        raise ValueError(f"arch must be 'default' or 'sm_<major><minor>', got {arch!r}")
    older = [a for a in ARCHS if int(a[3:]) <= int(arch[3:])]
    return table[max(older, key=lambda a: int(a[3:]))] if older else table["default"]


def config_for(kernel: str, device: Optional["torch.device"] = None):
    """The frozen config of ``kernel`` ("token_stats", "linear_token_stats", "mixture_sample",
    "chunked_linear": the chunk budget of linear_token_stats' chunked strategy) on ``device`` (a torch.device, or None: the default config, as on the CPU)."""
    return config_for_arch(kernel, arch_of(device))


# --------------------------------------------------------------------------------------------
# Opt-in autotuning (NASHKERN_AUTOTUNE=1): a small declared search space per kernel launch
# --------------------------------------------------------------------------------------------
#: Fields varied around the frozen config, per (kernel, launch); every combination is tried.
#: Small on purpose: each candidate is a compile (seconds) the first time a shape bucket is seen.
SEARCH_SPACES: Dict[Tuple[str, str], Dict[str, Tuple]] = {
    ("token_stats", "forward"): {"BLOCK_V_FWD": (1024, 2048, 4096), "num_warps": (4, 8)},
    ("token_stats", "backward"): {"BLOCK_V_BWD": (1024, 2048, 4096), "num_warps": (4, 8)},
    ("linear_token_stats", "forward"): {"BLOCK_N": (64, 128), "BLOCK_V_FWD": (64, 128),
                                        "num_stages": (2, 3)},
    ("linear_token_stats", "backward"): {"BLOCK_N": (32, 64), "BLOCK_V_BWD": (32, 64),
                                         "num_stages": (2, 3)},
    ("mixture_sample", "forward"): {"BLOCK_V": (2048, 4096, 8192), "num_warps": (4, 8)},
}


def autotune_enabled() -> bool:
    """``NASHKERN_AUTOTUNE=1`` (read at every call, so a test or a script may set it late)."""
    return os.environ.get("NASHKERN_AUTOTUNE", "0") == "1"


def candidates(kernel: str, launch_name: str, base) -> List[object]:
    """The frozen config ``base`` first, then every other point of the declared search space."""
    space = SEARCH_SPACES[(kernel, launch_name)]
    names = list(space)
    out = [base]
    for values in itertools.product(*(space[n] for n in names)):
        cand = dataclasses.replace(base, **dict(zip(names, values)))
        if cand not in out:
            out.append(cand)
    return out


def shape_bucket(**dims: int) -> Tuple[Tuple[str, int], ...]:
    """Autotuning cache key of a launch: each dimension rounded up to a power of two, so that
    nearby shapes (N = 8000 and 8192) share a winner."""
    return tuple(sorted((name, 1 << max(0, int(size) - 1).bit_length()) for name, size in
                        dims.items()))


def cuda_event_timer(launch: Callable[[object], None], config, warmup: int = 1,
                     reps: int = 5) -> float:
    """Median milliseconds of ``launch(config)`` timed with CUDA events on the current stream
    (the first ``warmup`` calls compile and are not timed)."""
    import torch

    for _ in range(warmup):
        launch(config)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch(config)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


#: Winners per (kernel, launch, arch, shape bucket), for the life of the process.
_AUTOTUNE_CACHE: Dict[Tuple, object] = {}
_log = logging.getLogger("nashkern.tuning")


def autotune(kernel: str, launch_name: str, device, dims: Dict[str, int],
             launch: Callable[[object], None], *,
             timer: Optional[Callable[[Callable, object], float]] = None):
    """The fastest config of the declared search space for this launch, timed once per shape
    bucket and cached. ``launch(config)`` must run the kernel with ``config`` and leave nothing
    the caller relies on (it is called several times per candidate; launch with the winner
    afterwards). A candidate that fails (e.g. out of shared memory) is skipped with a log line;
    if all fail, the first error is raised. ``timer(launch, config) -> seconds or ms`` defaults to
    CUDA events."""
    arch = arch_of(device)
    key = (kernel, launch_name, arch, shape_bucket(**dims))
    if key in _AUTOTUNE_CACHE:
        return _AUTOTUNE_CACHE[key]
    timer = timer or cuda_event_timer
    timings, errors = [], []
    for cand in candidates(kernel, launch_name, config_for_arch(kernel, arch)):
        try:
            timings.append((timer(launch, cand), len(timings), cand))
        except Exception as exc:  # noqa: BLE001 - any failing candidate is skipped, loudly
            _log.warning("nashkern autotune %s.%s: candidate %s failed: %s", kernel,
                         launch_name, cand, exc)
            errors.append(exc)
    if not timings:
        raise RuntimeError(f"nashkern autotune {kernel}.{launch_name}: every candidate "
                           f"failed") from errors[0]
    best_time, _, best = min(timings, key=lambda t: t[:2])
    _log.info("nashkern autotune %s.%s on %s at %s: %s (%.4g of %d candidates)", kernel,
              launch_name, arch, key[-1], best, best_time, len(timings))
    _AUTOTUNE_CACHE[key] = best
    return best


def choose(kernel: str, launch_name: str, device, dims: Dict[str, int],
           launch: Callable[[object], None]):
    """What a host wrapper launches with: the frozen ``config_for(kernel, device)``, or with
    ``NASHKERN_AUTOTUNE=1`` on a CUDA device the autotuned winner of its shape bucket."""
    if (autotune_enabled() and arch_of(device) != "default"
            and (kernel, launch_name) in SEARCH_SPACES):
        return autotune(kernel, launch_name, device, dims, launch)
    return config_for(kernel, device)
