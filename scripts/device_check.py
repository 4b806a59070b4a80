#!/usr/bin/env python3
"""The one command for a lent GPU runner: ``make device-check`` (no network, ~15 minutes of
device time in all, machine start included; at most 10 minutes and 8 returned files per call).

    make device-check            # on the GPU machine, with .whl/ carried: one call, <= 480 s
    make device-check-dry-run    # here, no GPU: every step that needs none (CI runs it)

It uses the machine's own python3 (torch, triton, transformers, accelerate, peft, pytest,
pytest-benchmark, pytest-xdist and nvcc are on the image) and spends the device time in value
order, each part under its own deadline (``BUDGET_S``; a part that finishes early leaves its
time to the next ones, and every command is stopped at its part's deadline after writing what
it has: pytest its JUnit XML, the benchmarks their CSV rows):

setup        the ``.whl/`` wheels the image lacks unpacked into a temporary directory on
             ``PYTHONPATH`` (only those whose modules python3 cannot import); nashkern put on
             ``PYTHONPATH`` as the editable install maps it (``PYTHONSAFEPATH=1``); every module
             the parts import, imported once (``IMPORTS``); the CUDA kernels built for sm_90
             (``csrc/build_cuda.py``, ~40 s) into ``build/device-check/``; ``TRITON_INTERPRET``
             unset.
correctness  (1) every kernel and strategy against the float64 oracle at the model shapes
             with the production (sm_90) configs, ``tests/ops/test_device_shapes.py``, one case at
             a time; then the other test files that run kernels on the device (``GPU_TESTS``;
             the CPU-only files never spend device time: ``CPU_ONLY_TESTS``).
bench        (2) the headline benchmark: Llama-3-8B head, N=8192, bf16, log-probs and
             log-probs + entropy, forward + backward: nashkern fused / chunked (Triton, CUDA)
             vs Liger FLCE and CCE, % of the 8NDV roofline and peak GPU memory; then from
             logits (token_stats, [8192, 151936] bf16) against the HBM floor.
sanitizer    (3) ``compute-sanitizer --tool memcheck`` over one small case of every kernel
             (``scripts/device_sanitizer_case.py``).
trainer      (4) Nash-MD step time and peak GPU memory, nashkern vs TRL 1.13, on a
             Qwen2.5-0.5B-shaped model with random weights, bf16 then fp32 (warm-up + timed
             steps), with what time is left; then, if any is left, nashkern bf16 with
             ``compile_decode="reduce-overhead"`` (unmeasured so far).

``$OUT`` (default ``./out``) gets at most the ``OUT_FILES`` (the runner returns 8): a summary
(Markdown with the headline tables, and JSON), the JUnit XML of the tests, the benchmark and
trainer CSV rows and every log in one file; both summaries are rewritten after every step, so
a call cut short still returns what it had. ``--dry-run`` runs each part's Python on the CPU at
tiny sizes (the wheels, the imports, test collection, the benchmark selection and harness, the
sanitizer case in the interpreter, a tiny trainer step of each implementation that imports) and
is what CI runs (tests/tools/test_device_check.py, also in the minimum-versions job).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
WHEEL_DIR = REPO / ".whl"
WHEEL_LIST = REPO / "scripts" / "device_wheels.txt"
CACHE = REPO / "build" / "device-check"

#: Seconds of each part, in the order they run. A part's deadline is the start of the run plus
#: the budgets up to and including it, so time a part leaves goes to the next; the sum is the
#: longest the command can take (the runner allows 600 s a call; the rest is the margin for
#: the machine's start-up of python and the transfer of $OUT).
BUDGET_S = {"setup": 75, "correctness": 125, "bench": 140, "sanitizer": 45, "trainer": 95}
TOTAL_LIMIT_S = 480
PARTS = tuple(BUDGET_S)
#: Within "correctness": the model-shape checks may take this much before the other files run.
SHAPES_LIMIT_S = 80
#: Within a command's limit: SIGINT this long before it (pytest then writes its JUnit XML, the
#: benchmarks their CSV rows, the trainer driver the rows it has), SIGKILL at the limit.
GRACE_S = 12
#: What goes to $OUT (the runner brings back at most 8 files).
OUT_FILES = ("summary.md", "summary.json", "correctness.xml", "tests.xml", "bench.csv",
             "trainers.csv", "logs.txt")
MAX_OUT_FILES = 8
#: The carried wheels (scripts/device_wheels.txt, sizes recorded there) may not exceed this.
CARRY_LIMIT_BYTES = 4 << 20
#: Statuses that do not fail the run.
PASSING = ("ok", "skipped", "warning")

# -- part 1: tests -----------------------------------------------------------------------------
SHAPE_TESTS = ("tests/ops/test_device_shapes.py",)
#: Test files whose kernels run on the device when there is one (tests/conftest.py's DEVICE).
GPU_TESTS = ("tests/ops/test_kernels_linear_token_stats.py", "tests/ops/test_linear_chunked.py",
             "tests/ops/test_kernels_token_stats.py", "tests/ops/test_cuda_backend.py",
             "tests/ops/test_kernels_mixture_sample.py", "tests/ops/test_ops.py",
             "tests/ops/test_errors.py")
#: Every other test file, and why it proves nothing on the device: CPU trainers on tiny models,
#: subprocess launches with the GPU hidden, the AOT compile gate, the nvcc build (setup built
#: the library), the CPU benchmark shapes, fake-CUDA registry logic, this script's dry run.
CPU_ONLY_TESTS = ("tests/ops/test_benchmarks_smoke.py", "tests/ops/test_compile.py",
                  "tests/ops/test_compile_gate.py", "tests/ops/test_cuda_build.py",
                  "tests/ops/test_linear_mixture_sample.py", "tests/ops/test_memory.py",
                  "tests/ops/test_registry.py",
                  "tests/ops/test_tuning.py", "tests/rl/test_callbacks.py",
                  "tests/rl/test_compiled_decode.py", "tests/rl/test_generation.py",
                  "tests/rl/test_generation_fused_decode.py",
                  "tests/rl/test_losses.py",
                  "tests/rl/test_nash_ema.py", "tests/rl/test_nash_ema_sharded.py",
                  "tests/rl/test_nash_equilibrium_lm.py", "tests/rl/test_nash_md_trainer.py",
                  "tests/rl/test_online_dpo_trainer.py", "tests/rl/test_reliability.py",
                  "tests/rl/test_sharded.py", "tests/rl/test_tabular.py",
                  "tests/rl/test_tensor_parallel.py", "tests/rl/test_trl_compat_nash_md.py",
                  "tests/rl/test_trl_compat_online_dpo.py", "tests/rl/test_trl_compat_xpo.py",
                  "tests/rl/test_user_paths.py", "tests/rl/test_xpo_trainer.py",
                  "tests/tools/test_bench_trainers_smoke.py", "tests/tools/test_cli.py",
                  "tests/tools/test_device_check.py")
PER_TEST_TIMEOUT_S = 60
TEST_WORKERS = 6

# -- part 2: the headline benchmark --------------------------------------------------------------
#: (suite, options) in value order: the fused-linear comparison first, then from logits.
BENCH_RUNS = (
    ("benchmarks/test_bench_linear_token_stats.py",
     ("--bench-models", "llama-3-8b", "--bench-n", "8192", "--bench-dtype", "bf16",
      "--bench-modes", "forward+backward", "--bench-workloads", "logprobs,policy",
      "--bench-providers", "nashkern-triton-fused,nashkern-triton-chunked,"
                           "nashkern-cuda-chunked,liger-flce,cce")),
    ("benchmarks/test_bench_token_stats.py",
     ("--bench-models", "qwen2.5-0.5b", "--bench-n", "8192", "--bench-dtype", "bf16",
      "--bench-modes", "forward+backward", "--bench-workloads", "logprobs,policy",
      "--bench-providers", "nashkern-triton,nashkern-cuda,liger-ce")),
)

# -- part 4: trainers ----------------------------------------------------------------------------
#: Qwen2.5-0.5B's shape (config.json of Qwen/Qwen2.5-0.5B), random weights built on the device.
TRAINER_SHAPE = ("--vocab", "151936", "--hidden", "896", "--layers", "24", "--heads", "14",
                 "--kv-heads", "2", "--intermediate", "4864", "--batch-size", "8",
                 "--max-new-tokens", "32", "--warmup", "1", "--steps", "3")
#: The dry run's trainer: the same script and code path at a tiny shape on the CPU.
TRAINER_SHAPE_DRY = ("--vocab", "300", "--hidden", "32", "--layers", "1", "--heads", "2",
                     "--kv-heads", "1", "--batch-size", "2", "--max-new-tokens", "3",
                     "--warmup", "1", "--steps", "1")
TRAINER_DTYPES = ("bf16", "fp32")

#: Every module a part imports (setup imports them once: a version drift fails here, in
#: seconds, and in the dry run in CI, not deep inside a part). "carried": from .whl/.
IMPORTS = {
    "image": ("torch", "triton", "transformers", "accelerate", "peft", "pytest",
              "pytest_benchmark", "xdist", "numpy", "tokenizers"),
    "nashkern": ("nashkern", "nashkern.ops", "nashkern.rl", "nashkern.kernels.token_stats",
                 "nashkern.kernels.linear_token_stats",
                 "nashkern.kernels.linear_token_stats_backward", "nashkern.kernels.mixture_sample",
                 "nashkern.backends.cuda.library", "nashkern.backends.linear_token_stats_chunked"),
    "carried": ("datasets", "trl", "trl.experimental.nash_md", "liger_kernel.transformers",
                "liger_kernel.transformers.fused_linear_cross_entropy",
                "liger_kernel.transformers.cross_entropy", "cut_cross_entropy",
                "pytest_timeout"),
}


# ------------------------------------------------------------------------------------------
# Wheels
# ------------------------------------------------------------------------------------------
def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def pinned_wheels() -> List[Tuple[str, str, int]]:
    """``(name, version, bytes)`` of every pin in scripts/device_wheels.txt (``name==version  #
    <bytes> bytes, why``: the size of the wheel ``make device-wheels`` downloads)."""
    out = []
    for line in WHEEL_LIST.read_text().splitlines():
        spec, _, comment = line.partition("#")
        spec = spec.strip()
        if spec:
            name, _, version = spec.partition("==")
            size = re.match(r"\s*(\d+) bytes", comment)
            out.append((name.strip(), version.strip(), int(size.group(1)) if size else -1))
    return out


def carry_bytes() -> int:
    """What the carried wheels weigh, from the sizes recorded in scripts/device_wheels.txt."""
    return sum(size for _, _, size in pinned_wheels())


def carried_wheels(wheel_dir: Path) -> Tuple[List[Path], List[str]]:
    """The wheels of ``wheel_dir`` matching the pins, and the pins without a wheel there."""
    files = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    found, missing = [], []
    for name, version, _ in pinned_wheels():
        match = [f for f in files if _norm(f.name.split("-")[0]) == _norm(name)
                 and f.name.split("-")[1] == version]
        if match:
            found.append(match[0])
        else:
            missing.append(f"{name}=={version}")
    return found, missing


def unpinned_wheels(wheel_dir: Path) -> List[str]:
    """Files of ``wheel_dir`` that are not a pinned wheel (carried for nothing)."""
    found, _ = carried_wheels(wheel_dir)
    return sorted(f.name for f in wheel_dir.glob("*") if f not in found) if wheel_dir.is_dir() else []


def wheel_modules(wheel: Path) -> List[str]:
    """Top-level importable names of a wheel (packages and modules)."""
    names = set()
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            top = member.split("/", 1)[0]
            if top.endswith((".dist-info", ".data")):
                if "/purelib/" in member or "/platlib/" in member:
                    top = member.split("/")[2]
                else:
                    continue
            if "/" in member or top.endswith(".py"):
                names.add(top[:-3] if top.endswith(".py") else top)
    return sorted(n for n in names if n.isidentifier())


def importable(python: str, modules: Sequence[str], env: Dict[str, str]) -> Dict[str, bool]:
    """Which of ``modules`` ``python`` finds (without importing them)."""
    code = ("import importlib.util, json, sys; print(json.dumps({m: importlib.util.find_spec(m)"
            " is not None for m in sys.argv[1:]}))")
    out = subprocess.run([python, "-c", code, *modules], env=env, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def install_wheel(wheel: Path, target: Path) -> None:
    """Unpack a wheel into ``target`` (what pip does for purelib/platlib; scripts, headers and
    data are not needed here). No pip, no tag check, no network."""
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            dest = target.joinpath(*parts)
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(dest, mode)


def find_sanitizer() -> Optional[str]:
    """compute-sanitizer on PATH, else next to nvcc / under CUDA_HOME (the CUDA toolkit's
    bin/ and compute-sanitizer/ folders)."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.insert(0, str(Path(nvcc).resolve().parent.parent))
    for root in filter(None, roots):
        for sub in ("bin", "compute-sanitizer"):
            path = Path(root) / sub / "compute-sanitizer"
            if path.is_file():
                return str(path)
    return None


def deadlines(start: float = 0.0) -> Dict[str, float]:
    """Each part's deadline: ``start`` plus the budgets up to and including it."""
    out, t = {}, start
    for part, budget in BUDGET_S.items():
        t += budget
        out[part] = t
    return out


# ------------------------------------------------------------------------------------------
# Reading what the parts wrote (for the summary)
# ------------------------------------------------------------------------------------------
def junit_counts(path: Path) -> Optional[Dict[str, object]]:
    """passed / failed / skipped of a JUnit XML file, and the failing tests' ids."""
    if not path.is_file():
        return None
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"error": f"unreadable: {exc}"}
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failing": []}
    for case in root.iter("testcase"):
        tags = {child.tag for child in case}
        if tags & {"failure", "error"}:
            counts["failed"] += 1
            counts["failing"].append(f"{case.get('classname')}::{case.get('name')}")
        elif "skipped" in tags:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def read_csv(path: Path) -> List[Dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(value: str, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    try:
        return fmt.format(float(value) * scale)
    except (TypeError, ValueError):
        return "-"


def bench_table(rows: List[Dict[str, str]]) -> List[str]:
    """The headline table: time, % of the floor (FLOP roofline for the linear op, HBM bytes for
    logits input), peak GPU memory."""
    lines = ["| op | model | N | workload | mode | provider | median ms | % of floor | floor | "
             "peak GiB | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        floor = {"flop": "FLOP roofline", "bytes": "HBM bytes"}.get(r.get("floor_kind"), "-")
        status = r.get("status", "")
        if status != "ok" and r.get("message"):
            status += ": " + r["message"][:120].replace("|", "/")
        lines.append(
            f"| {r.get('op')} | {r.get('model')} | {r.get('N')} | {r.get('workload')} | "
            f"{r.get('mode')} | {r.get('provider')} | {_num(r.get('time_median_s'), 1e3)} | "
            f"{_num(r.get('floor_fraction'), 100)} | {floor} | "
            f"{_num(r.get('peak_memory_bytes'), 2 ** -30, '{:.2f}')} | {status} |")
    return lines


def trainer_table(rows: List[Dict[str, str]]) -> List[str]:
    lines = ["| dtype | impl | median s/step | steps (s) | peak GPU GiB | peak RSS GiB | "
             "TRL / nashkern time | device |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.get('dtype')} | {r.get('impl')} | {_num(r.get('median_step_s'), 1, '{:.3f}')} "
            f"| {r.get('step_times_s')} | {_num(r.get('gpu_peak_bytes'), 2 ** -30, '{:.2f}')} | "
            f"{_num(r.get('peak_rss_bytes'), 2 ** -30, '{:.2f}')} | "
            f"{_num(r.get('speedup_trl_over_nashkern'), 1, '{:.2f}')} | {r.get('device')} |")
    return lines


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------
def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default. A shell without job control starts
    background commands (`cmd &`, a runner's detached job) with SIGINT ignored, the children
    inherit that, and Python then installs no KeyboardInterrupt handler: the graceful stop
    ``GRACE_S`` before a deadline did nothing and every part ran into its SIGKILL (measured: the
    deadline test took the full 12 s under `.ci/run &`)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Check:
    """Runs the parts under their deadlines, logs every step, and keeps $OUT's summary current."""

    def __init__(self, out: Path, python: str, dry_run: bool, cuda_archs: Sequence[str],
                 cuda_cache: Path, budget_scale: float = 1.0):
        self.start = time.monotonic()
        self.deadline = {part: self.start + t * budget_scale for part, t in deadlines().items()}
        self.out = out
        self.python = python
        self.dry_run = dry_run
        self.cuda_archs = list(cuda_archs)
        self.cuda_cache = cuda_cache
        self.steps: List[Dict] = []
        self.facts: Dict[str, object] = {}
        out.mkdir(parents=True, exist_ok=True)
        for name in OUT_FILES:  # a rerun into the same folder starts clean
            (out / name).unlink(missing_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="nashkern-device-check-"))
        self.logs = self.work / "logs"
        self.logs.mkdir()
        self.site = self.work / "site"
        self.site.mkdir()
        self.env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        self.env.update(PYTHONSAFEPATH="1", TRL_EXPERIMENTAL_SILENCE="1",
                        TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join(
                            [str(self.site)] + [p for p in os.environ.get("PYTHONPATH", "")
                                                .split(os.pathsep) if p]))
        if dry_run:  # the CPU: the Triton interpreter, as the tests run it
            self.env["TRITON_INTERPRET"] = "1"

    # -- bookkeeping -------------------------------------------------------------------------
    def left(self, part: str) -> float:
        return self.deadline[part] - time.monotonic()

    def record(self, step: str, status: str, seconds: float, detail: str = "") -> None:
        self.steps.append({"step": step, "status": status, "seconds": round(seconds, 1),
                           "detail": detail})
        tail = f" - {detail}" if detail else ""
        print(f"[device-check] {step}: {status} ({seconds:.0f} s){tail}", flush=True)
        self.write_summary()

    def run(self, step: str, cmd: Sequence[str], part: str, limit: Optional[float] = None,
            ok_codes: Sequence[int] = (0,)) -> Optional[int]:
        """Run ``cmd`` in the repository until ``part``'s deadline (or ``limit`` seconds, if
        sooner): SIGINT ``GRACE_S`` before, SIGKILL at it (the whole process group). Output to
        ``<step>.log``. None: no time was left to start it."""
        limit = min(self.left(part), limit if limit is not None else float("inf"))
        if limit < 10:
            self.record(step, "skipped", 0.0, f"no time left in part '{part}'")
            return None
        return self.reap(self.spawn(step, cmd), limit, ok_codes)

    def spawn(self, step: str, cmd: Sequence[str]) -> Tuple[str, subprocess.Popen, float]:
        """Start ``cmd`` in the repository (its own process group), output to ``<step>.log``."""
        with open(self.logs / f"{step}.log", "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(list(cmd), cwd=REPO, env=self.env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_default_sigint)
        return step, proc, time.perf_counter()

    def reap(self, spawned: Tuple[str, subprocess.Popen, float], limit: float,
             ok_codes: Sequence[int] = (0,)) -> int:
        """Wait for a spawned command at most ``limit`` more seconds (SIGINT ``GRACE_S`` before,
        SIGKILL at it); record its status."""
        step, proc, start = spawned
        try:
            rc = proc.wait(timeout=max(limit - GRACE_S, limit / 2))
            status = "ok" if rc in ok_codes else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=min(GRACE_S, limit / 2))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = 124
            status = f"deadline ({limit:.0f} s): stopped, partial results kept"
        except BaseException:  # this script interrupted or killed: take the command with it
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        self.record(step, status, time.perf_counter() - start, f"log: {step}.log")
        return rc

    def python_json(self, code: str, *args: str, part: str = "setup") -> Tuple[int, str]:
        """``python -c code args`` until ``part``'s deadline (at least 30 s): (status, output)."""
        try:
            proc = subprocess.run([self.python, "-c", code, *args], cwd=REPO, env=self.env,
                                  capture_output=True, text=True,
                                  timeout=max(30.0, self.left(part)))
        except subprocess.TimeoutExpired as exc:
            return 124, f"timed out: {exc}"
        return proc.returncode, proc.stdout + proc.stderr

    # -- setup -------------------------------------------------------------------------------
    def install_wheels(self) -> None:
        start = time.perf_counter()
        wheels, missing = carried_wheels(WHEEL_DIR)
        modules = {w: wheel_modules(w) for w in wheels}
        found = importable(self.python, sorted({m for ms in modules.values() for m in ms}),
                           self.env)
        installed, present = [], []
        for wheel, mods in modules.items():
            if mods and all(found[m] for m in mods):
                present.append(wheel.name)
            else:
                install_wheel(wheel, self.site)
                installed.append(wheel.name)
        extra = unpinned_wheels(WHEEL_DIR)
        detail = (f"installed {len(installed)}: {', '.join(installed) or '-'}; "
                  f"already importable: {', '.join(present) or '-'}")
        if extra:
            detail += f"; carried but not pinned (make device-wheels cleans .whl/): {', '.join(extra)}"
        if missing:
            detail += (f"; MISSING from {WHEEL_DIR.name}/ (run `make device-wheels` and carry "
                       f".whl): {', '.join(missing)}")
        status = "ok" if not missing else "warning" if self.dry_run else "missing wheels"
        self.record("wheels", status, time.perf_counter() - start, detail)
        self.missing_wheels = {_norm(m.split("==")[0]) for m in missing}

    def link_nashkern(self) -> None:
        """``site/nashkern``: the package's entries and ``kernels`` as symlinks (the layout of
        setup.py's ``package_dir``), so that ``import nashkern.kernels`` works from PYTHONPATH."""
        start = time.perf_counter()
        pkg = self.site / "nashkern"
        pkg.mkdir()
        for entry in (REPO / "nashkern").iterdir():
            if entry.name not in ("kernels", "__pycache__"):
                (pkg / entry.name).symlink_to(entry)
        (pkg / "kernels").symlink_to(REPO / "kernels")
        self.record("nashkern", "ok", time.perf_counter() - start, f"linked into {pkg}")

    def probe_imports(self) -> None:
        """Import every module a part imports (``IMPORTS``), each in the same interpreter as
        the parts, and fail here rather than deep inside a part. In the dry run a carried
        module whose wheel is not in .whl/ is a warning."""
        start = time.perf_counter()
        code = ("import importlib, sys, traceback\nfor m in sys.argv[1:]:\n    try:\n"
                "        importlib.import_module(m)\n        print('IMPORT', m, 'ok')\n"
                "    except BaseException as e:\n"
                "        print('IMPORT', m, 'FAILED', type(e).__name__, str(e)[:300])")
        code += ("\nimport json, nashkern, torch, triton, transformers\n"
                 "print('NASHKERN', nashkern.__file__)\nprint('FACTS', json.dumps({"
                 "'torch': torch.__version__, 'triton': triton.__version__, 'transformers': "
                 "transformers.__version__, 'cuda': torch.version.cuda, 'device': "
                 "torch.cuda.get_device_name() if torch.cuda.is_available() else None, "
                 "'capability': torch.cuda.get_device_capability() if "
                 "torch.cuda.is_available() else None, 'python': sys.version.split()[0]}))")
        modules = [m for group in IMPORTS.values() for m in group]
        rc, out = self.python_json(code, *modules)
        facts = re.findall(r"^FACTS (.+)$", out, flags=re.M)
        if facts:
            self.facts = json.loads(facts[-1])
        (self.logs / "imports.log").write_text(out)
        failed = {line.split()[1]: line for line in out.splitlines()
                  if line.startswith("IMPORT") and "FAILED" in line}
        if rc != 0 or len([l for l in out.splitlines() if l.startswith("IMPORT")]) < len(modules):
            failed.setdefault("(interpreter)", out[-500:])
        excused = set()
        if self.dry_run:  # a carried module whose wheel is not here may be absent
            carried = {"datasets": "datasets", "trl": "trl", "liger_kernel": "liger_kernel",
                       "cut_cross_entropy": "cut_cross_entropy", "pytest_timeout": "pytest_timeout"}
            excused = {m for m in failed if m in IMPORTS["carried"]
                       and carried.get(m.split(".")[0]) in self.missing_wheels}
        where = re.findall(r"^NASHKERN (.+)$", out, flags=re.M)
        if where and not where[-1].startswith(str(self.site)):  # the checkout's, not the link
            failed["nashkern"] = f"nashkern imported from {where[-1]}, not from {self.site}"
        hard = [failed[m] for m in failed if m not in excused]
        status = "failed" if hard else "warning" if failed else "ok"
        detail = "; ".join(hard or [failed[m] for m in failed])[:800] or f"{len(modules)} modules"
        self.imports_ok = {m for m in modules if m not in failed}
        self.record("imports", status, time.perf_counter() - start, detail)
        if not self.dry_run and not self.facts.get("device"):
            self.record("facts", "failed", 0.0, f"no CUDA device: {self.facts or out[-300:]}")

    def start_cuda_build(self):
        """The CUDA kernels for ``cuda_archs`` into the digest-keyed cache (nvcc, ~40 s on the
        runner), in the background while the wheels and imports are set up."""
        code = ("import sys; sys.path.insert(0, 'csrc'); import build_cuda\n"
                "if build_cuda.find_nvcc() is None: print('NO-NVCC'); sys.exit(3)\n"
                "from pathlib import Path\n"
                "print('LIB', build_cuda.build_cached(Path(sys.argv[1]), archs=sys.argv[2:]))")
        return self.spawn("cuda-build", [self.python, "-c", code, str(self.cuda_cache),
                                         *self.cuda_archs])

    def finish_cuda_build(self, spawned) -> None:
        # may borrow 30 s of part 1 (its CUDA cases need the library); the dry run checks that
        # it builds, on a CPU that may be slow or busy (or waiting for another build's lock)
        limit = max(self.left("setup") + 30, 1200 if self.dry_run else 10)
        rc = self.reap(spawned, limit, ok_codes=(0, 3))
        log = (self.logs / "cuda-build.log").read_text()
        if rc == 3:
            self.steps[-1].update(status="skipped" if self.dry_run else "failed",
                                  detail="nvcc not found: backend='cuda' untested")
            return
        lib = re.findall(r"^LIB (.+)$", log, flags=re.M)
        if rc == 0 and lib:
            self.env["NASHKERN_CUDA_LIB"] = lib[-1]
            self.steps[-1]["detail"] = f"sm_{', sm_'.join(self.cuda_archs)}: {lib[-1]}"

    def part_setup(self) -> None:
        build = self.start_cuda_build()
        self.install_wheels()
        self.link_nashkern()
        self.probe_imports()
        self.finish_cuda_build(build)

    # -- part 1: correctness -------------------------------------------------------------------
    def pytest_cmd(self, files: Sequence[str], *extra: str) -> List[str]:
        return [self.python, "-m", "pytest", *files, "-p", "no:cacheprovider", "-q", "-rfE",
                *extra]

    def per_test_timeout(self) -> List[str]:
        if "pytest_timeout" in getattr(self, "imports_ok", ()):
            return [f"--timeout={PER_TEST_TIMEOUT_S}"]
        return ["-o", f"faulthandler_timeout={PER_TEST_TIMEOUT_S}"]  # stacks only, no stop

    def part_correctness(self) -> None:
        if self.dry_run:
            rc = self.run("tests-collect", self.pytest_cmd(SHAPE_TESTS + GPU_TESTS,
                                                           "--collect-only"), "correctness")
            if rc == 0:
                text = (self.logs / "tests-collect.log").read_text()
                n = len(re.findall(r"^tests/\S+::", text, flags=re.M))
                self.steps[-1]["detail"] = f"{n} tests collected ({self.steps[-1]['detail']})"
            return
        xml = lambda name: [f"--junitxml={self.out / name}", "-o", "junit_family=xunit2"]
        limit = min(SHAPES_LIMIT_S, self.left("correctness") - 20)
        self.run("correctness", self.pytest_cmd(SHAPE_TESTS, *self.per_test_timeout(),
                                                *xml("correctness.xml")),
                 "correctness", limit=limit)
        self.run("tests", self.pytest_cmd(GPU_TESTS, "-n", str(TEST_WORKERS), "--dist",
                                          "loadgroup", *self.per_test_timeout(),
                                          *xml("tests.xml")), "correctness")

    # -- part 2: the headline benchmark --------------------------------------------------------
    def part_bench(self) -> None:
        csv_path = self.out / "bench.csv"
        if self.dry_run:
            for suite, options in BENCH_RUNS:
                name = Path(suite).stem.replace("test_bench_", "bench-")
                self.bench_select(name, self.pytest_cmd([suite]) + list(options), options)
            # The harness, CSV rows and summary at the tiny shape on the CPU, both suites in one
            # run: the selected workloads and mode, the CPU's provider beside the selected ones.
            opts = [dict(zip(o[::2], o[1::2])) for _, o in BENCH_RUNS]
            providers = ["nashkern-torch"] + [p for o in opts
                                              for p in o["--bench-providers"].split(",")]
            workloads = {w for o in opts for w in o["--bench-workloads"].split(",")}
            self.run("bench-tiny", self.pytest_cmd([suite for suite, _ in BENCH_RUNS]) + [
                "--bench-shapes", "tiny", "--bench-dtype", "fp32", "--bench-modes",
                ",".join(sorted({o["--bench-modes"] for o in opts})), "--bench-workloads",
                ",".join(sorted(workloads)), "--bench-providers", ",".join(providers),
                f"--bench-csv={csv_path}"], "bench")
            return
        for i, (suite, options) in enumerate(BENCH_RUNS):
            name = Path(suite).stem.replace("test_bench_", "bench-")
            base = self.pytest_cmd([suite])
            self.run(name, base + list(options) + [
                f"--bench-csv={csv_path}", "--benchmark-columns=median,iqr,min,rounds"],
                "bench", limit=self.left("bench") - (20 if i + 1 < len(BENCH_RUNS) else 0))

    def bench_select(self, name: str, cmd: List[str], options: Sequence[str]) -> None:
        """Collect the device's selection; every selected provider and workload must have a
        case (a misspelt provider would select nothing, silently)."""
        rc = self.run(f"{name}-select", cmd + ["--collect-only"], "bench")
        if rc != 0:
            return
        cases = re.findall(r"^\S+::\S+\[(\S+)\]$",
                           (self.logs / f"{name}-select.log").read_text(), flags=re.M)
        opt = dict(zip(options[::2], options[1::2]))
        want = [(w, p) for w in opt["--bench-workloads"].split(",")
                for p in opt["--bench-providers"].split(",")]
        absent = [p for p in opt["--bench-providers"].split(",")
                  if not any(c.endswith("-" + p) for c in cases)]
        bad = [c for c in cases if f"-N{opt['--bench-n']}-" not in c
               or not c.startswith(opt["--bench-models"])]
        status = "failed" if absent or bad or not cases else "ok"
        self.steps[-1].update(status=status, detail=(
            f"{len(cases)} cases of {len(want)} (workload, provider) pairs: " + ", ".join(cases)
            + (f"; NO CASE for {absent}" if absent else "") + (f"; off-shape {bad}" if bad else "")))
        self.write_summary()

    # -- part 3: compute-sanitizer -------------------------------------------------------------
    def part_sanitizer(self) -> None:
        case = [self.python, "scripts/device_sanitizer_case.py"]
        if self.dry_run:  # the case itself, on the CPU (interpreter)
            self.run("sanitizer-case", case, "sanitizer")
            return
        sanitizer = find_sanitizer()
        if sanitizer is None:
            self.record("sanitizer", "failed", 0.0, "compute-sanitizer not found")
            return
        self.run("sanitizer", [sanitizer, "--tool", "memcheck", "--error-exitcode", "9",
                               "--target-processes", "all", "--print-limit", "50", *case],
                 "sanitizer")

    # -- part 4: trainers ----------------------------------------------------------------------
    def part_trainer(self) -> None:
        impls = ["nashkern"] + (["trl"] if "trl.experimental.nash_md" in
                                getattr(self, "imports_ok", ()) else [])
        if "trl" not in impls:
            self.record("trainer-impls", "skipped" if self.dry_run else "failed", 0.0,
                        "trl does not import: nashkern alone")
        shape = TRAINER_SHAPE_DRY if self.dry_run else TRAINER_SHAPE
        device = "cpu" if self.dry_run else "cuda"
        models = (self.work if self.dry_run else CACHE) / "models"
        for i, dtype in enumerate(TRAINER_DTYPES):
            cmd = [self.python, "benchmarks/bench_trainers.py", "--compare", "--method",
                   "nash_md", "--impls", *impls, *shape, "--device", device, "--dtype", dtype,
                   "--nashkern-python", self.python, "--trl-python", self.python,
                   "--model-dir", str(models), "--csv", str(self.out / "trainers.csv"),
                   "--note", "device-check dry run" if self.dry_run else "device-check"]
            if not self.dry_run and i == 0:
                self.run("trainer-args", cmd + ["--check-args"], "trainer", limit=60)
            left = self.left("trainer") - (0 if i + 1 == len(TRAINER_DTYPES) else 10)
            self.run(f"trainer-{dtype}", cmd + ["--timeout", str(max(int(left) - GRACE_S, 10))],
                     "trainer", limit=left if i == 0 else None)
        # Last, with what time is left (never measured yet: compile time unknown): nashkern's
        # opt-in compiled decode, CUDA graphs, bf16. The dry run checks its arguments only (the
        # CPU compile is tests/rl/test_compiled_decode.py's, 20-70 s here).
        cmd = [self.python, "benchmarks/bench_trainers.py", "--compare", "--method", "nash_md",
               "--impls", "nashkern", *shape, "--device", device, "--dtype", "bf16",
               "--compile-decode", "reduce-overhead", "--nashkern-python", self.python,
               "--model-dir", str(models), "--csv", str(self.out / "trainers.csv"),
               "--note", "device-check compile_decode (unmeasured before this run)"]
        if self.dry_run:
            self.run("trainer-compiled-args", cmd + ["--check-args"], "trainer", limit=60)
        else:
            self.run("trainer-bf16-compiled",
                     cmd + ["--timeout", str(max(int(self.left("trainer")) - GRACE_S, 10))],
                     "trainer")

    # -- $OUT ----------------------------------------------------------------------------------
    def write_summary(self) -> None:
        """summary.json, summary.md and logs.txt, rewritten after every step."""
        elapsed = time.monotonic() - self.start
        stray = sorted(p.name for p in self.out.iterdir() if p.name not in OUT_FILES)
        summary = {"dry_run": self.dry_run, "python": self.python, "facts": self.facts,
                   "elapsed_s": round(elapsed, 1), "budget_s": BUDGET_S, "steps": self.steps,
                   "stray_out_files": stray,
                   "updated": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        lines = [f"# device-check{' (dry run)' if self.dry_run else ''}", "",
                 f"{json.dumps(self.facts)}; {elapsed:.0f} s of {TOTAL_LIMIT_S} s", "",
                 "| step | status | seconds | detail |", "|---|---|---|---|"]
        lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | "
                  f"{s['detail'][:400].replace('|', '/')} |" for s in self.steps]
        for name in ("correctness.xml", "tests.xml"):
            counts = junit_counts(self.out / name)
            if counts is not None:
                summary[name] = counts
                lines += ["", f"## {name}", "", json.dumps(counts)[:3000]]
        bench = read_csv(self.out / "bench.csv")
        if bench:
            lines += ["", "## Benchmarks", ""] + bench_table(bench)
        trainers = read_csv(self.out / "trainers.csv")
        if trainers:
            lines += ["", "## Trainer step vs TRL", ""] + trainer_table(trainers)
        if stray:
            lines += ["", f"STRAY files in $OUT (not returned past 8): {stray}"]
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")
        with open(self.out / "logs.txt", "w") as f:
            for log in sorted(self.logs.glob("*.log"), key=lambda p: p.stat().st_mtime):
                text = log.read_text(errors="replace")
                if len(text) > 300_000:  # the end says what went wrong
                    text = text[:20_000] + "\n[... cut ...]\n" + text[-280_000:]
                f.write(f"\n===== {log.name} =====\n{text}")

    def result(self) -> int:
        self.write_summary()
        failed = [s for s in self.steps if s["status"] not in PASSING]
        return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "out",
                        help="summaries, JUnit XML, CSV rows, logs (default $OUT or ./out)")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter to test with (default: this one)")
    parser.add_argument("--dry-run", action="store_true",
                        help="each part's Python on the CPU at tiny sizes (CI)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)} (setup always runs)")
    parser.add_argument("--cuda-archs", default="90",
                        help='architectures of the CUDA build (default "90": H100 / H200)')
    parser.add_argument("--cuda-cache", default=str(CACHE),
                        help="cache root of the CUDA build (default build/device-check)")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="scale every part's budget (the dry run on a slow CPU: > 1)")
    parser.add_argument("--verify-wheels", action="store_true",
                        help="only check .whl/ against scripts/device_wheels.txt (make "
                             "device-wheels runs it)")
    args = parser.parse_args(argv)
    if args.verify_wheels:
        problems = verify_wheels()
        print("\n".join(problems) or f"{WHEEL_DIR}: {carry_bytes()} bytes, as pinned")
        return 1 if problems else 0
    parts = [p for p in args.parts.split(",") if p]
    for p in parts:
        if p not in PARTS:
            parser.error(f"--parts: {p!r} not in {PARTS}")
    check = Check(Path(args.out).resolve(), args.python, args.dry_run,
                  [a for a in re.split(r"[;,\s]+", args.cuda_archs) if a], Path(args.cuda_cache),
                  args.budget_scale)
    # SIGTERM (the runner's own limit) as an exception: the running command's group is killed
    # and the summary is written in `finally`
    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    rc = 1
    try:
        check.part_setup()
        for part in PARTS[1:]:
            if part in parts:
                getattr(check, f"part_{part}")()
    finally:
        rc = check.result()  # before the logs go
        shutil.rmtree(check.work, ignore_errors=True)
    return rc


def verify_wheels(wheel_dir: Path = WHEEL_DIR) -> List[str]:
    """What is wrong with the carry in ``wheel_dir``: a pin without its wheel, a wheel whose size
    differs from the one recorded in scripts/device_wheels.txt, a file nobody pinned, a total over
    ``CARRY_LIMIT_BYTES``. Empty: the carry is what the README says."""
    problems = []
    found, missing = carried_wheels(wheel_dir)
    problems += [f"missing: {m}" for m in missing]
    sizes = {(_norm(n), v): b for n, v, b in pinned_wheels()}
    for wheel in found:
        name, version = _norm(wheel.name.split("-")[0]), wheel.name.split("-")[1]
        if wheel.stat().st_size != sizes[(name, version)]:
            problems.append(f"{wheel.name}: {wheel.stat().st_size} bytes, "
                            f"{sizes[(name, version)]} recorded in {WHEEL_LIST.name}")
    problems += [f"not pinned (delete it): {name}" for name in unpinned_wheels(wheel_dir)]
    total = sum(f.stat().st_size for f in wheel_dir.glob("*") if f.is_file()) \
        if wheel_dir.is_dir() else 0
    if total > CARRY_LIMIT_BYTES:
        problems.append(f"{total} bytes carried, over the {CARRY_LIMIT_BYTES} limit")
    return problems


if __name__ == "__main__":
    sys.exit(main())
