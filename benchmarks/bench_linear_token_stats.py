#!/usr/bin/env python
"""Per-token statistics from hidden states and the lm_head weight: time and peak memory.

Compares nashkern's fused ``linear_token_stats`` with what a trainer does without it (eager
PyTorch that materialises the ``[N, V]`` logits, and ``torch.compile`` of the same function) and
with the fused linear cross-entropy kernels of Liger-Kernel and Cut Cross-Entropy, which give
the log-probs (as ``-loss`` with ``reduction="none"``) but no entropy, KL or mixture.

Workloads (``--workloads``), each a list of per-token float32 fields:
  logprobs   log-probs of the targets                    (the only one Liger / CCE compute)
  policy     log-probs + entropy
  reference  log-probs + entropy + KL(policy || reference) + mixture log-probs, against a
             frozen reference model with its own hidden states and lm_head (coef = 0.5)
Modes (``--modes``): ``forward`` (no autograd) and ``forward+backward`` (backward of the sum of
the workload's fields w.r.t. the policy's hidden states and weight).

Every measurement runs in a fresh subprocess, so that one provider's allocations, compiled
code or out-of-memory failure cannot affect another's. Peak memory is
  CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before the timed calls;
  CPU:  the peak-RSS increase: the RSS high-water mark after the timed calls minus the RSS
        before them (inputs created and touched, high-water mark reset first), with the
        child's address space capped at --mem-limit-gb so that the eager peer fails with
        out-of-memory instead of swapping.

Examples:
  python benchmarks/bench_linear_token_stats.py --quick
  python benchmarks/bench_linear_token_stats.py --N 8192 --D 4096 --V 128256 --dtype bf16 \
      --csv benchmarks/results/gpu.csv
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import gc
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

REPO = Path(__file__).resolve().parent.parent
RESULT_TAG = "@@bench-result@@ "
COEF = 0.5  # weight of the reference in the geometric mixture

WORKLOAD_FIELDS = {
    "logprobs": ("logprobs",),
    "policy": ("logprobs", "entropy"),
    "reference": ("logprobs", "entropy", "kl", "mixture_logprobs"),
}
MODES = ("forward", "forward+backward")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUICK_SHAPE = dict(N=64, D=32, V=1024)
DEFAULT_SHAPE = {  # Llama-3-8B head on a GPU; Qwen2.5-0.5B head on the CPU
    "cuda": dict(N=8192, D=4096, V=128256),
    "cpu": dict(N=8192, D=896, V=151936),
}


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
class Inputs(NamedTuple):
    hidden: torch.Tensor                 # [N, D]
    weight: torch.Tensor                 # [V, D]
    targets: torch.Tensor                # [N] int64
    ref_hidden: Optional[torch.Tensor]   # [N, D], reference workload only (never needs grad)
    ref_weight: Optional[torch.Tensor]   # [V, D]


def make_inputs(N: int, D: int, V: int, dtype, device: str, with_ref: bool, grad: bool) -> Inputs:
    """Random inputs whose logits are O(1), written in full (so their pages are resident)."""
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    hidden = randn(N, D).requires_grad_(grad)
    weight = randn(V, D, scale=D ** -0.5).requires_grad_(grad)
    targets = torch.randint(0, V, (N,), generator=g, device=device)
    ref_hidden = randn(N, D) if with_ref else None
    ref_weight = randn(V, D, scale=D ** -0.5) if with_ref else None
    return Inputs(hidden, weight, targets, ref_hidden, ref_weight)


# ----------------------------------------------------------------------------------------------
# Providers: build() runs in the measuring subprocess (lazy imports) and returns
# fn(inputs, fields) -> list of float32 [N] tensors, one per requested field.
# ----------------------------------------------------------------------------------------------
def _gather(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def eager_token_stats(hidden, weight, targets, ref_hidden, ref_weight, fields):
    """The statistics computed the plain PyTorch way, as trainers do without a fused kernel:
    full ``[N, V]`` logits in the input dtype, ``.float()``, ``log_softmax``, ``gather``."""
    logits = (hidden @ weight.T).float()
    logp = logits.log_softmax(-1)
    out = {"logprobs": _gather(logp, targets)}
    p = logp.exp() if "entropy" in fields or "kl" in fields else None
    if "entropy" in fields:
        out["entropy"] = -(p * logp).sum(-1)
    if "kl" in fields:
        ref_logits = (ref_hidden @ ref_weight.T).float()
        logq = ref_logits.log_softmax(-1)
        out["kl"] = (p * (logp - logq)).sum(-1)
        mixture = ((1 - COEF) * logits + COEF * ref_logits).log_softmax(-1)
        out["mixture_logprobs"] = _gather(mixture, targets)
    return [out[f] for f in fields]


def build_eager():
    return lambda x, fields: eager_token_stats(*x, fields)


def build_compiled():
    compiled = torch.compile(eager_token_stats)
    return lambda x, fields: compiled(*x, fields)


def build_nashkern(backend: str):
    def build():
        from nashkern import ops

        def run(x: Inputs, fields):
            coef = COEF if x.ref_hidden is not None else None
            s = ops.linear_token_stats(x.hidden, x.weight, x.targets, ref_hidden=x.ref_hidden,
                                       ref_weight=x.ref_weight, coef=coef, backend=backend)
            return [getattr(s, f) for f in fields]
        return run
    return build


def build_liger():
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss,
    )
    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="none")
    return lambda x, fields: [-loss_fn(x.weight, x.hidden, x.targets)]


def build_cce():
    from cut_cross_entropy import linear_cross_entropy
    return lambda x, fields: [-linear_cross_entropy(x.hidden, x.weight, x.targets,
                                                    reduction="none")]


@dataclass(frozen=True)
class Provider:
    build: Callable[[], Callable]
    needs_cuda: bool = False
    logprobs_only: bool = False
    package: Optional[str] = None  # import name; skipped when it is not installed


PROVIDERS: Dict[str, Provider] = {
    "nashkern-torch": Provider(build_nashkern("torch")),
    "nashkern-triton": Provider(build_nashkern("triton"), needs_cuda=True, package="triton"),
    "nashkern-auto": Provider(build_nashkern("auto")),
    "eager": Provider(build_eager),
    "torch-compile": Provider(build_compiled),
    "liger-flce": Provider(build_liger, needs_cuda=True, logprobs_only=True, package="liger_kernel"),
    "cce": Provider(build_cce, needs_cuda=True, logprobs_only=True, package="cut_cross_entropy"),
}


def skip_reason(name: str, workload: str, device: str) -> Optional[str]:
    p = PROVIDERS[name]
    if p.package and importlib.util.find_spec(p.package) is None:
        return f"not installed (no module {p.package!r})"
    if p.needs_cuda and device != "cuda":
        return "needs CUDA" + (" (the Triton CPU interpreter is for tests, not timing)"
                               if name == "nashkern-triton" else "")
    if p.logprobs_only and workload != "logprobs":
        return "computes log-probs only (no entropy / KL / mixture)"
    return None


# ----------------------------------------------------------------------------------------------
# Measuring subprocess
# ----------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def release_free_heap() -> None:
    """Return the heap memory glibc keeps after frees to the OS, so that memory cached from the
    warm-up neither hides in the baseline nor is reused unseen by the timed calls."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class CpuMeter:
    """Peak-RSS increase over the timed calls (Linux).

    The high-water mark is VmHWM, the per-process counter behind getrusage's ru_maxrss, reset
    through /proc/self/clear_refs first. ru_maxrss itself would be wrong here: Linux also folds
    into it the RSS of the process that forked this one (kept across exec), i.e. the parent's.
    """

    def start(self) -> None:
        release_free_heap()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
        self.base = _status_kib("VmHWM") * 1024

    def time(self, step) -> float:
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0

    def peak(self) -> int:
        return max(0, _status_kib("VmHWM") * 1024 - self.base)

    def method(self) -> str:
        return ("CPU peak-RSS increase: RSS high-water mark (VmHWM, reset before the timed "
                "calls) minus the RSS before them, after the warm-up and malloc_trim; one fresh "
                "process per measurement")


class CudaMeter:
    def start(self) -> None:
        torch.cuda.synchronize()
        self.base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    def time(self, step) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def peak(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.base

    def method(self) -> str:
        return ("CUDA torch.cuda.max_memory_allocated() minus memory_allocated() before the timed "
                "calls, one fresh process per measurement")


def make_step(fn, x: Inputs, fields, backward: bool):
    """One call; gradients are dropped after it, so every call starts from the same state."""
    def step():
        if not backward:
            with torch.no_grad():
                fn(x, fields)
            return
        sum(t.sum() for t in fn(x, fields)).backward()
        x.hidden.grad = x.weight.grad = None
    return step


def is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return (isinstance(exc, (MemoryError, torch.OutOfMemoryError))
            or "out of memory" in text or "can't allocate memory" in text)


def measure(spec: dict) -> dict:
    """Run one (provider, workload, mode, shape) measurement in this process."""
    cuda = spec["device"] == "cuda"
    limit = torch.cuda.get_device_properties(0).total_memory if cuda else spec["mem_limit_bytes"]
    if not cuda:  # CUDA reserves a huge address space, so the cap is for the CPU only
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    meter = CudaMeter() if cuda else CpuMeter()
    result = {"limit_bytes": limit, "backend": spec["provider"]}
    try:
        fn = PROVIDERS[spec["provider"]].build()
        fields = WORKLOAD_FIELDS[spec["workload"]]
        backward = spec["mode"] == "forward+backward"
        x = make_inputs(spec["N"], spec["D"], spec["V"], DTYPES[spec["dtype"]], spec["device"],
                        with_ref=spec["workload"] == "reference", grad=backward)
        if spec["provider"].startswith("nashkern-"):
            from nashkern import _library
            result["backend"] = "nashkern-" + _library.resolve_backend(
                spec["provider"].split("-", 1)[1], x.hidden.device)
        step = make_step(fn, x, fields, backward)
        for _ in range(spec["warmup"]):
            step()
        meter.start()
        times = [meter.time(step) for _ in range(spec["repeats"])]
        result.update(status="ok", times=times, peak_bytes=meter.peak())
    except Exception as exc:  # reported to the parent, which prints it in the table
        result.update(status="oom" if is_oom(exc) else "error",
                      message=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")
    result["memory_method"] = meter.method()
    return result


# ----------------------------------------------------------------------------------------------
# Parent: one subprocess per measurement, then one table
# ----------------------------------------------------------------------------------------------
@dataclass
class Row:
    provider: str
    workload: str
    mode: str
    status: str                      # ok | oom | timeout | error | crashed
    times: List[float] = field(default_factory=list)
    peak_bytes: Optional[int] = None
    limit_bytes: Optional[int] = None
    message: str = ""
    backend: str = ""
    memory_method: str = ""
    mem_ratio: Optional[float] = None    # peak / eager's peak (upper bound if eager OOMed)
    ratio_is_bound: bool = False
    roofline: Optional[float] = None

    @classmethod
    def from_result(cls, provider: str, workload: str, mode: str, result: dict) -> "Row":
        known = {k: v for k, v in result.items() if k in cls.__dataclass_fields__}
        return cls(provider, workload, mode, **known)

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.times) if self.times else None

    @property
    def iqr(self) -> Optional[float]:
        if len(self.times) < 2:
            return 0.0 if self.times else None
        q1, _, q3 = statistics.quantiles(self.times, n=4, method="inclusive")
        return q3 - q1


def run_subprocess(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "message": f"exceeded the {timeout:.0f} s timeout"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    if proc.returncode < 0:  # killed by a signal, e.g. the kernel's OOM killer
        return {"status": "crashed", "message": f"killed by signal {-proc.returncode}"}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": "error", "message": f"exit code {proc.returncode}: {tail[:200]}"}


def nominal_flops(workload: str, mode: str, N: int, D: int, V: int) -> int:
    """Matmul FLOPs of the fused algorithm: 2NDV per model forward; the backward recomputes each
    model's logits and computes dhidden and dweight of the policy (8NDV policy, 12NDV with a
    reference for forward+backward). The same count for every provider."""
    models = 2 if workload == "reference" else 1
    flops = 2 * models * N * D * V
    if mode == "forward+backward":
        flops += (2 * models + 4) * N * D * V
    return flops


def matmul_rate(n: int = 8192, iters: int = 20) -> float:
    """Measured dense bf16 torch.mm rate of the current CUDA device (FLOP/s)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    end.synchronize()
    del a, b
    torch.cuda.empty_cache()  # leave the device to the measuring subprocesses
    return 2 * n ** 3 * iters / (start.elapsed_time(end) / 1e3)


def add_derived(rows: List[Row], args, mm_rate: Optional[float]) -> None:
    """Memory ratio to eager (same workload and mode) and the FLOP roofline fraction."""
    eager = {(r.workload, r.mode): r for r in rows if r.provider == "eager"}
    for r in rows:
        e = eager.get((r.workload, r.mode))
        if r.peak_bytes is not None and e is not None:
            if e.status == "ok" and e.peak_bytes:
                r.mem_ratio = r.peak_bytes / e.peak_bytes
            elif e.status == "oom" and e.limit_bytes:
                r.mem_ratio, r.ratio_is_bound = r.peak_bytes / e.limit_bytes, True
        if mm_rate and r.median:
            r.roofline = nominal_flops(r.workload, r.mode, args.N, args.D, args.V) / r.median / mm_rate


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    return f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.2f} ms"


def fmt_bytes(b: Optional[int]) -> str:
    if b is None:
        return "-"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(b) >= size:
            return f"{b / size:.2f} {unit}"
    return f"{b} B"


def fmt_ratio(r: Row) -> str:
    if r.mem_ratio is None:
        return "-"
    if r.provider == "eager":
        return "1"
    if r.mem_ratio > 1:
        return f"{r.mem_ratio:.3f} ({r.mem_ratio:.1f}x more)"
    bound = ("< ", "> ") if r.ratio_is_bound else ("", "")
    less = f" ({bound[1]}{1 / r.mem_ratio:.1f}x less)" if r.mem_ratio > 0 else ""
    return f"{bound[0]}{r.mem_ratio:.3f}{less}"


def fmt_status(r: Row) -> str:
    if r.status == "ok":
        return "ok" if r.backend in ("", r.provider) else f"ok ({r.backend})"
    if r.status == "oom":
        return f"out of memory (limit {fmt_bytes(r.limit_bytes)}): {r.message}"
    return f"{r.status}: {r.message}"


def print_table(rows: List[Row], cuda: bool) -> None:
    header = ["provider", "workload", "mode", "time median", "IQR", "peak memory",
              "memory / eager"] + (["roofline"] if cuda else []) + ["status"]
    table = [header]
    for r in rows:
        cells = [r.provider, r.workload, r.mode, fmt_time(r.median), fmt_time(r.iqr),
                 fmt_bytes(r.peak_bytes), fmt_ratio(r)]
        if cuda:
            cells.append("-" if r.roofline is None else f"{100 * r.roofline:.1f}%")
        table.append(cells + [fmt_status(r)])
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        if i == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * len(header[-1]))


def environment(device: str) -> dict:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name")), platform.processor() or "cpu")
        name = f"{name} ({os.cpu_count()} cores)"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "n/a"
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return {"device": name, "torch": torch.__version__, "triton": triton_version,
            "git_commit": commit}


CSV_FIELDS = ["timestamp", "device", "torch", "triton", "git_commit", "provider", "workload",
              "mode", "N", "D", "V", "dtype", "repeats", "time_median_s", "time_iqr_s",
              "peak_memory_bytes", "memory_ratio_vs_eager", "roofline_fraction", "status",
              "memory_method"]


def append_csv(path: str, rows: List[Row], args, env: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({
                "timestamp": now, **env, "provider": r.provider, "workload": r.workload,
                "mode": r.mode, "N": args.N, "D": args.D, "V": args.V, "dtype": args.dtype,
                "repeats": len(r.times), "time_median_s": r.median, "time_iqr_s": r.iqr,
                "peak_memory_bytes": r.peak_bytes,
                "memory_ratio_vs_eager": ("<" if r.ratio_is_bound else "") + (
                    f"{r.mem_ratio:.5f}" if r.mem_ratio is not None else ""),
                "roofline_fraction": r.roofline, "status": fmt_status(r),
                "memory_method": r.memory_method,
            })


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Defaults: N=8192 D=4096 V=128256 bf16 on CUDA; N=8192 D=896 V=151936 fp32 on "
               "the CPU. See the module docstring for workloads and the memory method.",
    )
    p.add_argument("--N", type=int, help="tokens (batch x sequence)")
    p.add_argument("--D", type=int, help="hidden size")
    p.add_argument("--V", type=int, help="vocabulary size")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS))
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOAD_FIELDS),
                   default=list(WORKLOAD_FIELDS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before them")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    p.add_argument("--mem-limit-gb", type=float, default=18,
                   help="CPU only: address-space cap of each measuring process (GiB)")
    p.add_argument("--csv", metavar="PATH", help="append one row per measurement to PATH")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: N={QUICK_SHAPE['N']} D={QUICK_SHAPE['D']} "
                        f"V={QUICK_SHAPE['V']}, 2 repeats (overrides the shape)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: JSON spec of one measurement
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = QUICK_SHAPE if args.quick else DEFAULT_SHAPE[device]
    for k in ("N", "D", "V"):
        if args.quick or getattr(args, k) is None:
            setattr(args, k, shape[k])
    if args.quick:
        args.repeats = min(args.repeats, 2)
    args.dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    args.device = device
    return args


def run_all(args) -> Tuple[List[Row], Dict[Tuple[str, str], List[str]]]:
    """Every applicable (workload, mode, provider), one subprocess each, one at a time.
    Returns the rows and the skip reasons, {(provider, reason): [workloads]}."""
    rows, skipped = [], {}
    for workload in args.workloads:
        for mode in args.modes:
            for name in args.providers:
                reason = skip_reason(name, workload, args.device)
                if reason:
                    cases = skipped.setdefault((name, reason), [])
                    if workload not in cases:
                        cases.append(workload)
                    continue
                spec = dict(provider=name, workload=workload, mode=mode, N=args.N, D=args.D,
                            V=args.V, dtype=args.dtype, device=args.device,
                            repeats=args.repeats, warmup=args.warmup,
                            mem_limit_bytes=int(args.mem_limit_gb * 2 ** 30))
                print(f"  running {name:16s} {workload:9s} {mode:16s} ...", end=" ", flush=True)
                row = Row.from_result(name, workload, mode, run_subprocess(spec, args.timeout))
                print(row.status, fmt_time(row.median), fmt_bytes(row.peak_bytes), flush=True)
                rows.append(row)
    return rows, skipped


def print_notes(rows: List[Row], args, mm_rate: Optional[float]) -> None:
    for method in sorted({r.memory_method for r in rows if r.memory_method}):
        print(f"peak memory: {method}")
    if args.device == "cpu":
        print(f"CPU out-of-memory guard: RLIMIT_AS = {args.mem_limit_gb:g} GiB per measuring process")
    if mm_rate:
        print(f"roofline: nominal matmul FLOPs (8NDV policy / 12NDV reference fwd+bwd, 2NDV per "
              f"model fwd) / median time / measured bf16 torch.mm rate {mm_rate / 1e12:.1f} TFLOP/s")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(measure(json.loads(args.worker))), flush=True)
        return 0
    env = environment(args.device)
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"commit {env['git_commit']}", flush=True)
    print(f"shape: N={args.N} D={args.D} V={args.V} {args.dtype} | repeats {args.repeats} "
          f"(+{args.warmup} warm-up) | one subprocess per measurement", flush=True)
    mm_rate = matmul_rate() if args.device == "cuda" else None
    rows, skipped = run_all(args)
    for (name, reason), workloads in skipped.items():
        print(f"skipped {name} ({', '.join(workloads)}): {reason}")
    add_derived(rows, args, mm_rate)
    print()
    print_table(rows, cuda=args.device == "cuda")
    print_notes(rows, args, mm_rate)
    if args.csv:
        append_csv(args.csv, rows, args, env)
        print(f"appended {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
