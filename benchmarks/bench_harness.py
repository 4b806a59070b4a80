"""Harness of the kernel benchmarks (the ``test_bench_*.py`` pytest-benchmark suites).

Device facts, providers and the reason one is skipped, the eager / ``torch.compile`` peers,
peak-memory meters, timing through pytest-benchmark, the floors, and the CSV rows. See
BENCHMARKS.md ("Method") for what each figure means.
"""
from __future__ import annotations

import contextlib
import ctypes
import csv
import datetime
import gc
import importlib.util
import math
import os
import platform
import resource
import subprocess
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch

import bench_config as cfg

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GiB = 2 ** 30


# ----------------------------------------------------------------------------------------------
# Cases and providers
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Provider:
    """One implementation of an op. ``build(case)`` (called in the measuring test, so imports
    are lazy) returns ``fn(inputs) -> list of tensors``; a backward mode backpropagates the sum
    of their sums."""

    name: str
    build: Callable[["Case"], Callable]
    package: Optional[str] = None         # import name of a third-party peer
    pip: Optional[str] = None             # its pip name
    needs_cuda: bool = False
    backend: Optional[str] = None         # nashkern backend
    workloads: Optional[Tuple[str, ...]] = None  # the workloads it computes (None: all)
    softcap: bool = True                  # supports a final-logit softcap
    cpu_only: bool = False                # the torch backend's strategies side by side (CPU)


@dataclass(frozen=True)
class OpSpec:
    """An op family: its providers, workloads and modes, inputs, floor and memory estimate."""

    name: str
    providers: Tuple[Provider, ...]
    workloads: Dict[str, Tuple[str, ...]]
    modes: Tuple[str, ...]
    make_inputs: Callable[["Case", str], Tuple[SimpleNamespace, List[torch.Tensor]]]
    floor: Callable[["Case", int], Tuple[str, float]]   # ("flop" | "bytes", amount)
    estimate: Callable[["Case", int], int]               # bytes the case needs, roughly


@dataclass(frozen=True)
class Case:
    op: OpSpec
    provider: Provider
    workload: str
    mode: str
    model_name: str
    N: int            # tokens; rows B for mixture_sample
    dtype: str

    @property
    def model(self) -> cfg.Model:
        return cfg.MODELS[self.model_name]

    @property
    def fields(self) -> Tuple[str, ...]:
        return self.op.workloads[self.workload]

    @property
    def id(self) -> str:
        return f"{self.model_name}-N{self.N}-{self.workload}-{self.mode}-{self.provider.name}"

    @property
    def uses_reference(self) -> bool:
        return self.workload in cfg.REFERENCE_WORKLOADS


def nashkern_providers(family: str, build: Callable[..., Callable]) -> Tuple[Provider, ...]:
    """``nashkern-<backend>`` for every backend the op registry declares for ``family``
    (``nashkern.ops.FAMILIES``): ``build(backend)`` -> a provider's build. A family with
    strategies (linear_token_stats) adds ``nashkern-<backend>-<strategy>`` for each GPU backend
    of each strategy's table: ``build(backend, strategy)``."""
    from nashkern.ops import FAMILIES

    declared = {f.name: f for f in FAMILIES}[family]
    order = ("torch", "triton", "cuda")
    plain = tuple(Provider(f"nashkern-{b}", build(b), backend=b)
                  for b in order if b in declared.backends)
    return plain + tuple(Provider(f"nashkern-{b}-{s}", build(b, s), backend=b,
                                  cpu_only=b == "torch")
                         for b in order for s, table in declared.strategies.items()
                         if b in table)


def strategy_ratios(rows: List[dict]) -> List[str]:
    """Per linear_token_stats CPU case timed with both torch strategies: the measured
    chunked / fused time ratio beside the cost model's (``predicted_seconds``, the one
    ``strategy="auto"`` decides by), and the strategy ``auto`` picks."""
    from nashkern.ops.linear_token_stats import predicted_seconds, resolve_strategy

    timed = {}
    for r in rows:
        # no time: pytest-benchmark disables timing under xdist (the suite's smoke runs)
        if r["op"] == "linear_token_stats" and r["status"] == "ok" and r.get("time_median_s"):
            key = (r["model"], r["workload"], r["mode"], r["N"], r["D"], r["V"])
            timed.setdefault(key, {})[r["provider"]] = r["time_median_s"]
    lines = []
    for (model, workload, mode, N, D, V), t in sorted(timed.items()):
        if "nashkern-torch-chunked" not in t or "nashkern-torch-fused" not in t:
            continue
        models = 2 if workload in cfg.REFERENCE_WORKLOADS else 1
        kw = dict(models=models, backward=mode != "forward", threads=torch.get_num_threads())
        predicted = (predicted_seconds("chunked", "cpu", N, D, V, **kw)
                     / predicted_seconds("fused", "cpu", N, D, V, **kw))
        auto = resolve_strategy("auto", "torch", torch.device("cpu"), D, V, models)
        lines.append(f"{model} {workload} {mode} N={N}: chunked/fused measured "
                     f"{t['nashkern-torch-chunked'] / t['nashkern-torch-fused']:.2f}, "
                     f"cost model {predicted:.2f} (auto: {auto})")
    return lines


def skip_reason(case: Case, device: str) -> Optional[str]:
    """Why a provider does not run this case here (None: it runs)."""
    p = case.provider
    if p.workloads is not None and case.workload not in p.workloads:
        return f"not applicable: computes {' / '.join(p.workloads)} only"
    if case.model.softcap and not p.softcap:
        return (f"not applicable: has no final-logit softcap ({case.model_name} uses "
                f"{case.model.softcap:g})")
    if p.package and importlib.util.find_spec(p.package) is None:
        return f"not installed (pip install {p.pip or p.package})"
    if p.backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "not installed (pip install triton)"
        if device != "cuda":
            return "needs CUDA (the Triton CPU interpreter is for the tests, not for timing)"
    if p.backend == "cuda":
        from nashkern.backends.cuda import library as cuda_lib
        reason = cuda_lib.unavailable_reason()
        if reason is not None:
            return f"CUDA backend unavailable: {reason}"
    if p.needs_cuda and device != "cuda":
        return "needs CUDA"
    if p.cpu_only and device == "cuda":
        return "CPU only: the torch strategies' comparison for the CPU cost model"
    return None


# ----------------------------------------------------------------------------------------------
# Eager PyTorch and torch.compile: what a trainer does without a fused kernel
# ----------------------------------------------------------------------------------------------
def _softcap(z: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _gather(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def eager_stats(logits, ref_logits, targets, fields, softcap):
    """Per-token statistics the plain way: ``[N, V]`` logits ``.float()``, softcap,
    ``log_softmax``, ``gather``; entropy ``-(p * logp).sum(-1)``; KL and the geometric mixture
    (coef ``COEF``) the same way."""
    z = _softcap(logits.float(), softcap)
    logp = z.log_softmax(-1)
    out = {}
    if "logprobs" in fields:
        out["logprobs"] = _gather(logp, targets)
    p = logp.exp() if "entropy" in fields or "kl" in fields else None
    if "entropy" in fields:
        out["entropy"] = -(p * logp).sum(-1)
    if "kl" in fields or "mixture_logprobs" in fields:
        r = _softcap(ref_logits.float(), softcap)
        if "kl" in fields:
            out["kl"] = (p * (logp - r.log_softmax(-1))).sum(-1)
        if "mixture_logprobs" in fields:
            mixture = ((1 - cfg.COEF) * z + cfg.COEF * r).log_softmax(-1)
            out["mixture_logprobs"] = _gather(mixture, targets)
    return [out[f] for f in fields]


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn, fullgraph=True)`` from a clean Dynamo cache: every case compiles
    afresh (shape-specialised, as in a trainer with fixed shapes), and the recompile limit can
    never make it fall back to eager unnoticed; fullgraph fails loudly on a graph break."""
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False)


# ----------------------------------------------------------------------------------------------
# Device facts
# ----------------------------------------------------------------------------------------------
def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), name)
    return f"{name} ({os.cpu_count()} cores)"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO,
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or "unknown"


def _meminfo_bytes(key: str) -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) * 1024


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) * 1024


def synchronized_timer() -> float:
    """pytest-benchmark timer on CUDA: waits for the device, so a round spans its kernels."""
    torch.cuda.synchronize()
    return time.perf_counter()


def _best_seconds(fn: Callable[[], object], device: str, reps: int, inner: int = 1) -> float:
    fn()
    best = math.inf
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


# ----------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------
class CudaMeter:
    method = ("CUDA: torch.cuda.max_memory_allocated() during the call minus "
              "memory_allocated() just before it (max over the timed rounds)")

    def __init__(self):
        self.peak: Optional[int] = None

    def start(self) -> None:
        torch.cuda.synchronize()
        self.base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    def stop(self) -> None:
        torch.cuda.synchronize()
        self.peak = max(self.peak or 0, torch.cuda.max_memory_allocated() - self.base)


class CpuMeter:
    """Peak-RSS increase over a call (Linux): VmHWM, reset through /proc/self/clear_refs just
    before the call, minus the RSS then. Before the reset, glibc's malloc_trim(0) returns freed
    heap to the OS, so that memory freed earlier is neither in the baseline nor reused
    unseen. (getrusage's ru_maxrss cannot be reset and also carries the parent's RSS.)"""

    method = ("CPU: peak-RSS increase over the call: VmHWM (reset via /proc/self/clear_refs "
              "after malloc_trim) minus the RSS before it; in the pytest process, after "
              "the warm-up (max over the timed rounds)")

    def __init__(self):
        self.peak: Optional[int] = None
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            self._trim = None

    @staticmethod
    def available() -> bool:
        return os.access("/proc/self/clear_refs", os.W_OK)

    def start(self) -> None:
        if self._trim is not None:
            self._trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
        self.base = _status_bytes("VmHWM")

    def stop(self) -> None:
        self.peak = max(self.peak or 0, _status_bytes("VmHWM") - self.base)


class NoMeter:
    method = "not measured (no /proc/self/clear_refs on this system)"
    peak = None

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return (isinstance(exc, (MemoryError, torch.OutOfMemoryError))
            or "out of memory" in text or "can't allocate memory" in text
            or "cannot allocate memory" in text)


# ----------------------------------------------------------------------------------------------
# The session
# ----------------------------------------------------------------------------------------------
class Session:
    """What one pytest run of the suites shares: device, options, rates, and the rows."""

    def __init__(self, config):
        opt = config.getoption
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        shapes = opt("--bench-shapes") or cfg.DEFAULT_SHAPES[self.device]
        if shapes == "auto":
            shapes = cfg.AUTO_SHAPES[self.device]
        self.shapes_name = shapes
        self.shapes = cfg.SHAPE_SETS[shapes]
        self.dtype = opt("--bench-dtype") or self.shapes.dtype
        self.timing = cfg.TIMING[self.device]
        self.rounds = opt("--bench-rounds") or self.timing.rounds
        self.csv_path = opt("--bench-csv")
        threads = opt("--bench-threads")
        threads = self.shapes.threads if threads is None else threads
        if threads and self.device != "cuda":
            torch.set_num_threads(threads)
        self.rows: List[dict] = []
        self._rates: Dict[str, float] = {}
        self._floored: List[Tuple[dict, dict]] = []
        self.timestamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = ""
        self.name = device_name(self.device)
        self.facts = {
            "timestamp": self.timestamp, "device": self.name, "device_type": self.device,
            "torch": torch.__version__, "triton": triton_version,
            "cuda": (torch.version.cuda or "") if self.device == "cuda" else "",
            "git_commit": git_commit(), "threads": torch.get_num_threads(),
        }

    # -- options ----------------------------------------------------------------------------
    def selection(self, config) -> dict:
        def listed(name, cast=str):
            value = config.getoption(name)
            return None if not value else [cast(v) for v in value.split(",") if v]
        return {"models": listed("--bench-models") or list(self.shapes.models),
                "n": listed("--bench-n", int),
                "providers": listed("--bench-providers") or self.shapes.providers,
                "workloads": listed("--bench-workloads") or self.shapes.workloads,
                "modes": listed("--bench-modes") or self.shapes.modes}

    # -- floors: rates measured in the run ------------------------------------------------
    def _measure_rate(self, kind: str) -> float:
        """"flop": dense ``torch.mm`` rate in the benchmark dtype (FLOP/s); "bytes": a
        device-to-device copy, bytes read + written per second. Best of several calls."""
        cuda = self.device == "cuda"
        if kind == "flop":
            n = 8192 if cuda else 2048
            a = torch.randn(n, n, device=self.device).to(DTYPES[self.dtype])
            b = torch.randn(n, n, device=self.device).to(DTYPES[self.dtype])
            work, fn = 2 * n ** 3, lambda: a @ b
        else:
            nbytes = GiB if cuda else GiB // 4
            a = torch.empty(nbytes, dtype=torch.uint8, device=self.device).fill_(1)
            b = torch.empty_like(a)
            work, fn = 2 * nbytes, lambda: b.copy_(a)
        t = _best_seconds(fn, self.device, reps=10, inner=10 if cuda else 1)
        del a, b, fn
        self.release()
        return work / t

    def add_floor(self, case: Case, row: dict, extra_info: dict) -> None:
        """Floor kind, work, rate and fraction (floor time / median time) of a measured case,
        into its row and its pytest-benchmark extra_info."""
        kind, work = case.op.floor(case, DTYPES[self.dtype].itemsize)
        if kind not in self._rates:
            self._rates[kind] = self._measure_rate(kind)
        row.update(floor_kind=kind, floor_work=work)
        self._floored.append((row, extra_info))
        self._set_floor(row, extra_info)

    def _set_floor(self, row: dict, extra_info: dict) -> None:
        rate = self._rates[row["floor_kind"]]
        row.update(floor_rate=rate, floor_fraction=row["floor_work"] / rate / row["time_median_s"])
        extra_info.update({k: row[k] for k in ("floor_kind", "floor_work", "floor_rate",
                                               "floor_fraction")})

    def finalize(self) -> None:
        """Measure each rate once more at the end of the run and keep the best for every row: a
        rate measured while the machine was busier than during a case (a shared CPU) would
        overstate that case's floor fraction."""
        for kind in list(self._rates):
            self._rates[kind] = max(self._rates[kind], self._measure_rate(kind))
        for row, extra_info in self._floored:
            self._set_floor(row, extra_info)

    # -- memory -----------------------------------------------------------------------------
    def release(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def memory_budget(self) -> int:
        """Bytes a case may use: a fraction of the free device memory (CPU: of MemAvailable)."""
        if self.device == "cuda":
            free = torch.cuda.mem_get_info()[0]
        else:
            free = _meminfo_bytes("MemAvailable")
        return int(cfg.MEMORY_FRACTION[self.device] * free)

    @contextlib.contextmanager
    def memory_cap(self, budget: int):
        """CPU: cap the address space at its current size + budget for the duration of a case,
        so that a provider that needs more fails with an allocation error (reported as out of
        memory) instead of swapping or waking the OOM killer on a shared machine."""
        if self.device == "cuda":
            yield
            return
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = _status_bytes("VmSize") + budget
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

    def meter(self):
        if self.device == "cuda":
            return CudaMeter()
        return CpuMeter() if CpuMeter.available() else NoMeter()

    # -- rows -------------------------------------------------------------------------------
    def record(self, case: Case, status: str, message: str = "", **values) -> dict:
        m = case.model
        row = dict(self.facts, op=case.op.name, model=case.model_name, provider=case.provider.name,
                   workload=case.workload, mode=case.mode, N=case.N, D=m.D, V=m.V,
                   softcap="" if m.softcap is None else m.softcap, dtype=case.dtype,
                   status=status, message=message, **values)
        self.rows.append(row)
        return row

    def csv_file(self) -> Optional[Path]:
        if not self.csv_path:
            return None
        if self.csv_path == "auto":
            return RESULTS / f"{cfg.device_slug(self.name, self.device)}.csv"
        return Path(self.csv_path)

    def write_csv(self) -> Optional[Path]:
        path = self.csv_file()
        if path is None or not self.rows:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=cfg.CSV_FIELDS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows(self.rows)
        return path


# ----------------------------------------------------------------------------------------------
# Measuring one case
# ----------------------------------------------------------------------------------------------
class Call:
    """One call of a provider in one mode. ``prepare()`` (untimed) runs the forward for the
    backward mode; ``run()`` is the timed part. Gradients are dropped after every call, so each
    starts from the same state."""

    def __init__(self, fn: Callable, x: SimpleNamespace, leaves: List[torch.Tensor], mode: str):
        self.fn, self.x, self.leaves, self.mode = fn, x, leaves, mode

    def _loss(self) -> torch.Tensor:
        return sum(t.float().sum() for t in self.fn(self.x))

    def prepare(self):
        if self.mode == "backward":
            return (self._loss(),), {}
        return (None,), {}

    def run(self, loss: Optional[torch.Tensor] = None) -> None:
        if self.mode == "forward":
            with torch.no_grad():
                self.fn(self.x)
        else:
            (self._loss() if loss is None else loss).backward()
            for t in self.leaves:
                t.grad = None

    def once(self) -> None:
        args, _ = self.prepare()
        self.run(*args)


def _time(benchmark, session: Session, call: Call, meter) -> Tuple[int, int]:
    """Warm up, then time with pytest-benchmark; returns (rounds, iterations per round).

    CPU: a fixed number of rounds of one call. CUDA: rounds of ``iterations`` back-to-back
    calls (enough for ~1 ms, so launch latency does not dominate short kernels; 1 when the
    backward mode needs a fresh forward per call) for about ``max_time`` seconds, >= 5 rounds.
    Peak memory is taken over the timed rounds, or over one separate call when a round loops.
    """
    t = session.timing
    for _ in range(t.warmup):
        call.once()
    iterations, rounds = 1, session.rounds
    if session.device == "cuda":
        one = _best_seconds(call.once, "cuda", reps=1)
        if call.mode != "backward" and one < t.min_round:
            iterations = math.ceil(t.min_round / one)
        rounds = max(session.rounds, min(t.max_rounds, int(t.max_time / (one * iterations))))
    if iterations == 1:
        def setup():
            args = call.prepare()
            meter.start()
            return args

        benchmark.pedantic(call.run, setup=setup, teardown=lambda *a, **k: meter.stop(),
                           rounds=rounds, iterations=1)
    else:
        args, _ = call.prepare()
        meter.start()
        call.run(*args)
        meter.stop()
        benchmark.pedantic(call.run, rounds=rounds, iterations=iterations)
    return rounds, iterations


def run_case(benchmark, session: Session, case: Case) -> None:
    """Measure one case and record its row; skips (with the reason, also recorded) a provider
    that does not apply or is not installed here, and a case estimated not to fit in memory."""
    reason = skip_reason(case, session.device)
    if reason is None:
        itemsize = DTYPES[case.dtype].itemsize
        need, budget = case.op.estimate(case, itemsize), session.memory_budget()
        if need > budget:
            reason = (f"estimated to need {need / GiB:.1f} GiB, more than the "
                      f"{budget / GiB:.1f} GiB budget ({cfg.MEMORY_FRACTION[session.device]:g} "
                      "of the free memory)")
    if reason is not None:
        session.record(case, "skipped", reason)
        pytest.skip(reason)

    benchmark.group = (f"{case.op.name} {case.model_name} N={case.N} {case.dtype} "
                       f"{case.workload} {case.mode}")
    meter = session.meter()
    x = leaves = call = failure = None
    try:
        with session.memory_cap(budget):
            x, leaves = case.op.make_inputs(case, session.device)
            call = Call(case.provider.build(case), x, leaves, case.mode)
            if benchmark.disabled:  # --benchmark-disable: one untimed call
                call.once()
                session.record(case, "ok", "not timed (--benchmark-disable)",
                               memory_method=meter.method)
                return
            rounds, iterations = _time(benchmark, session, call, meter)
    except Exception as exc:
        status = "oom" if is_oom(exc) else "error"
        message = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
        if status == "oom":
            message = f"limit {budget / GiB:.2f} GiB: {message}"
        session.record(case, status, message, memory_method=meter.method)
        if status != "oom" and not case.provider.package:  # ours or eager: a failure
            raise
        failure = f"{status}: {message}"  # out of memory, or a third-party peer: reported
        traceback.clear_frames(exc.__traceback__)  # drop what the failed call still holds
    finally:
        x = leaves = call = None  # noqa: F841 - free the inputs and the provider's state
        session.release()
    if failure is not None:
        pytest.skip(failure)

    s = benchmark.stats.stats
    benchmark.extra_info.update(peak_memory_bytes=meter.peak, N=case.N, D=case.model.D,
                                V=case.model.V, dtype=case.dtype, device=session.name)
    row = session.record(case, "ok", rounds=rounds, iterations=iterations, time_median_s=s.median,
                         time_iqr_s=s.iqr, time_stddev_s=s.stddev, time_min_s=s.min,
                         peak_memory_bytes=meter.peak, memory_method=meter.method)
    session.add_floor(case, row, benchmark.extra_info)
