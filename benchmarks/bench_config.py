"""What the kernel benchmarks measure: model heads, token counts, workloads, modes, timing
defaults and the CSV columns. Every benchmark constant lives here. No torch import:
``benchmarks/render.py`` reads it too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class Model:
    """An lm_head: hidden size, vocabulary size, final-logit softcap (Gemma-2)."""

    D: int
    V: int
    softcap: Optional[float] = None


MODELS: Dict[str, Model] = {
    "qwen2.5-0.5b": Model(D=896, V=151936),
    "llama-3-8b": Model(D=4096, V=128256),
    "gemma-2-2b": Model(D=2304, V=256000, softcap=30.0),
    # Smoke only: a small head that still has a softcap and a V that is not a power of two.
    "tiny": Model(D=64, V=1000, softcap=30.0),
}


@dataclass(frozen=True)
class ShapeSet:
    """Models x token counts, and the default selection of a run. ``tokens`` is N (rows of
    hidden states / logits) for the log-prob ops; ``rows`` is B (last-position logits rows) for
    ``mixture_sample``. ``providers`` / ``workloads`` / ``modes``: None = all (the --bench-*
    options override them)."""

    models: Tuple[str, ...]
    tokens: Tuple[int, ...]
    rows: Tuple[int, ...]
    dtype: str
    providers: Optional[Tuple[str, ...]] = None
    workloads: Optional[Tuple[str, ...]] = None
    modes: Optional[Tuple[str, ...]] = None
    threads: Optional[int] = None  # CPU: torch.set_num_threads (None: torch's default)


SHAPE_SETS: Dict[str, ShapeSet] = {
    # `pytest benchmarks` without a GPU, and the smoke test of `make test`: seconds in all.
    "tiny": ShapeSet(("tiny",), tokens=(64,), rows=(4,), dtype="fp32"),
    # `make bench` without a GPU: the Qwen2.5-0.5B head in float32, the streaming torch backend
    # against eager PyTorch, ~8 min. A CPU core does ~0.1 TFLOP/s and a forward + backward of this
    # head is 8 * N * 136 MFLOP, so N stays small; memory is the figure here. One thread: per-core
    # figures that stay reproducible when other jobs share the machine (with 2 threads on 2 busy
    # cores the streaming backend's many small OpenMP regions were erratically 5-50x slower).
    "cpu": ShapeSet(("qwen2.5-0.5b",), tokens=(256, 1024), rows=(8, 64), dtype="fp32",
                    providers=("nashkern-torch", "nashkern-torch-chunked", "nashkern-torch-fused",
                               "eager"),
                    workloads=("policy", "reference", "sample"),
                    modes=("forward", "forward+backward"), threads=1),
    # GPU: the three heads, N where memory allows (cases estimated not to fit are skipped).
    "models": ShapeSet(("qwen2.5-0.5b", "llama-3-8b", "gemma-2-2b"),
                       tokens=(4096, 8192, 16384, 65536), rows=(8, 64, 512), dtype="bf16"),
}
#: --bench-shapes default: "models" on a CUDA device, "tiny" otherwise; "auto" (make bench)
#: means "models" on a CUDA device and "cpu" otherwise.
AUTO_SHAPES = {"cuda": "models", "cpu": "cpu"}
DEFAULT_SHAPES = {"cuda": "models", "cpu": "tiny"}

#: Per-token fields of each workload (the names of nashkern's TokenStats fields).
LOGPROB_WORKLOADS: Dict[str, Tuple[str, ...]] = {
    "logprobs": ("logprobs",),                                      # what Liger / CCE compute
    "policy": ("logprobs", "entropy"),
    "kl": ("kl",),                                                  # Liger's fused linear JSD
    "reference": ("logprobs", "entropy", "kl", "mixture_logprobs"),
}
REFERENCE_WORKLOADS = ("kl", "reference")  # a second (frozen) model's hidden states / logits
SAMPLE_WORKLOADS: Dict[str, Tuple[str, ...]] = {"sample": ()}
MODES = ("forward", "backward", "forward+backward")
COEF = 0.5          # weight of the reference in the geometric mixture
TEMPERATURE = 0.9   # mixture_sample only (the log-prob workloads use T = 1)


@dataclass(frozen=True)
class Timing:
    warmup: int        # untimed calls first (compilation, autotuning, lazy imports)
    rounds: int        # timed rounds (CPU: fixed; CUDA: the minimum)
    max_rounds: int
    max_time: float    # CUDA: seconds of timed calls to aim for per case
    min_round: float   # CUDA: loop a call within a round until the round lasts this long


TIMING = {
    "cuda": Timing(warmup=2, rounds=5, max_rounds=100, max_time=1.0, min_round=1e-3),
    "cpu": Timing(warmup=1, rounds=3, max_rounds=3, max_time=0.0, min_round=0.0),
}
#: Eager PyTorch's peak in float32 [N, V] tensors (measured on the CPU, float32, N = 2048; exact
#: multiples there, see BENCHMARKS.md; "kl" is inferred). Used to skip cases that cannot fit.
EAGER_PEAK_NV = {
    "logprobs": {"forward": 2, "backward": 3, "forward+backward": 3},
    "policy": {"forward": 4, "backward": 5, "forward+backward": 5},
    "kl": {"forward": 6, "backward": 7, "forward+backward": 7},
    "reference": {"forward": 8, "backward": 9, "forward+backward": 9},
}
#: Fraction of free memory (CUDA: free device memory; CPU: MemAvailable) a case may be
#: estimated to need before it is skipped; on the CPU also the address-space cap per case.
MEMORY_FRACTION = {"cuda": 0.92, "cpu": 0.6}

CSV_FIELDS = [
    "timestamp", "device", "device_type", "torch", "triton", "cuda", "git_commit", "threads",
    "op", "model", "provider", "workload", "mode", "N", "D", "V", "softcap", "dtype",
    "rounds", "iterations", "time_median_s", "time_iqr_s", "time_stddev_s", "time_min_s",
    "peak_memory_bytes", "floor_kind", "floor_work", "floor_rate", "floor_fraction",
    "status", "message", "memory_method",
]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_slug(device: str, device_type: str) -> str:
    """File stem of a device's CSV under benchmarks/results/."""
    return slug(device) if device_type == "cuda" else "cpu-" + slug(device)


def model_name(D: int, V: int, softcap: Optional[float]) -> str:
    for name, m in MODELS.items():
        if (m.D, m.V, m.softcap) == (D, V, softcap):
            return name
    return f"D={D} V={V}" + (f" softcap={softcap:g}" if softcap else "")
