#!/usr/bin/env python3
"""The one command for a lent GPU runner (no network, ~15 minutes of device time in all).

    make device-check PHASE=all|tests|bench|trainer [OUT=out]      # on the GPU machine
    make device-check-dry-run                                      # here: what needs no GPU

It uses the machine's own python3 (torch, triton, transformers, accelerate, peft, pytest,
pytest-benchmark, pytest-xdist are there) and reaches no network:

setup (every phase)
    * installs the wheels carried in ``.whl/`` (``make device-wheels``; the list and why in
      ``scripts/device_wheels.txt``) into a temporary target directory on ``PYTHONPATH``, only
      those whose modules this python cannot import already (nothing of the image is shadowed);
    * puts nashkern itself on ``PYTHONPATH`` the way the editable install maps it (``nashkern/``
      plus the top-level ``kernels/`` as ``nashkern.kernels``, as symlinks: nothing is built or
      written in the tree), with ``PYTHONSAFEPATH=1`` so that the checkout's own ``nashkern/``
      directory is never imported from the working directory instead;
    * builds the CUDA kernels for sm_90 only (``csrc/build_cuda.py``) into a cache keyed by the
      sources' digest (``build/device-check/``; not in place) and points ``NASHKERN_CUDA_LIB``
      at it;
    * unsets ``TRITON_INTERPRET``: the Triton kernels are compiled for the device.

phases (each runs under a wall-clock limit well below 5 minutes; all three within 10)
    tests    the test suite on the device (``-n`` workers, per-test timeout, JUnit XML), then
             ``compute-sanitizer --tool memcheck`` on one small run of each CUDA kernel;
    bench    the kernel benchmarks at one model shape: the Llama-3-8B head, N = 8192, bf16,
             forward and forward+backward, every provider (nashkern triton / cuda, eager,
             torch.compile, Liger-Kernel, Cut Cross-Entropy) -> CSV rows + JUnit XML;
    trainer  one training step of nashkern's NashMDTrainer and TRL 1.13's on a Qwen2.5-0.5B-
             shaped model built here with random weights, bf16 -> CSV row + JSON.

Everything goes to ``$OUT`` (default ``./out``): ``<phase>.log``, ``<phase>.xml``, CSV rows,
``summary.json`` and ``summary.md``. ``--dry-run`` runs every step that needs no GPU (wheel
install, the PYTHONPATH set-up and an import of nashkern, the sm_90 nvcc build, test collection,
benchmark case selection, the trainer benchmark's argument parsing) and is what CI runs
(tests/test_device_check.py).
"""
from __future__ import annotations

import argparse
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
PHASES = ("tests", "bench", "trainer")
#: Wall-clock limit of each phase's main command, seconds (all three: under 10 minutes).
PHASE_LIMIT_S = {"tests": 170, "sanitizer": 50, "bench": 180, "trainer": 160}
#: Past its limit a command gets SIGINT (pytest still writes its JUnit XML and the benchmarks
#: their CSV rows), then SIGKILL this many seconds later.
GRACE_S = 20
#: Statuses that do not fail the run.
PASSING = ("ok", "skipped", "warning")
#: Tests that prove nothing more on a GPU and only cost device time: the AOT compile gate and
#: the nvcc build (setup has built the library), and this script's own dry run.
DEVICE_IGNORED_TESTS = ("tests/test_compile_gate.py", "tests/test_cuda_build.py",
                        "tests/test_device_check.py")
PER_TEST_TIMEOUT_S = 120
TEST_WORKERS = 8
BENCH_SUITES = ("benchmarks/test_bench_linear_token_stats.py",
                "benchmarks/test_bench_token_stats.py")
#: The streaming torch backend (a CPU path) is left out; on logits input only the full
#: workload is timed (the log-prob-only one is the linear suite's comparison with the peers).
BENCH_ARGS = ("--bench-shapes", "models", "--bench-models", "llama-3-8b", "--bench-n", "8192",
              "--bench-dtype", "bf16", "--bench-modes", "forward,forward+backward",
              "--bench-workloads", "logprobs,reference",
              "--bench-providers", "nashkern-triton,nashkern-cuda,eager,torch-compile,liger-flce,"
                                   "liger-fljsd,liger-ce,cce",
              "-k", "not (test_token_stats and logprobs)")
#: Qwen2.5-0.5B's shape (config.json of Qwen/Qwen2.5-0.5B), random weights built on the device.
TRAINER_ARGS = ("--method", "nash_md", "--vocab", "151936", "--hidden", "896", "--layers", "24",
                "--heads", "14", "--kv-heads", "2", "--intermediate", "4864", "--device", "cuda",
                "--dtype", "bf16", "--batch-size", "8", "--max-new-tokens", "64", "--warmup", "0",
                "--steps", "1")
#: One small run of each CUDA kernel (token_stats forward + backward, mixture_sample), for
#: compute-sanitizer.
SANITIZER_CASE = """
import torch
from nashkern import ops
torch.manual_seed(0)
z = torch.randn(2, 3, 1001, device="cuda", dtype=torch.bfloat16, requires_grad=True)
r = torch.randn(2, 3, 1001, device="cuda", dtype=torch.bfloat16, requires_grad=True)
t = torch.randint(0, 1001, (2, 3), device="cuda")
s = ops.token_stats(z, t, r, coef=0.5, temperature=0.9, softcap=30.0, backend="cuda")
(s.logprobs + s.entropy + s.ref_logprobs + s.kl + s.mixture_logprobs).sum().backward()
ops.mixture_sample(z[:, -1].detach(), r[:, -1].detach(), coef=0.5, temperature=0.9,
                   backend="cuda")
torch.cuda.synchronize()
print("sanitizer case ran")
"""


# ------------------------------------------------------------------------------------------
# Wheels
# ------------------------------------------------------------------------------------------
def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def pinned_wheels() -> List[Tuple[str, str]]:
    """``(name, version)`` of every pin in scripts/device_wheels.txt."""
    out = []
    for line in WHEEL_LIST.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out.append((name.strip(), version.strip()))
    return out


def carried_wheels(wheel_dir: Path) -> Tuple[List[Path], List[str]]:
    """The wheels of ``wheel_dir`` matching the pins, and the pins without a wheel there."""
    files = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    found, missing = [], []
    for name, version in pinned_wheels():
        match = [f for f in files if _norm(f.name.split("-")[0]) == _norm(name)
                 and f.name.split("-")[1] == version]
        if match:
            found.append(match[0])
        else:
            missing.append(f"{name}=={version}")
    return found, missing


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


# ------------------------------------------------------------------------------------------
# Set-up
# ------------------------------------------------------------------------------------------
class Check:
    """Runs the steps, logs them to ``out``, and records each step's status for the summary."""

    def __init__(self, out: Path, python: str, dry_run: bool, cuda_archs: Sequence[str],
                 cuda_cache: Path):
        self.out = out
        self.python = python
        self.dry_run = dry_run
        self.cuda_archs = list(cuda_archs)
        self.cuda_cache = cuda_cache
        self.steps: List[Dict] = []
        out.mkdir(parents=True, exist_ok=True)
        self.site = Path(tempfile.mkdtemp(prefix="nashkern-device-site-"))
        self.env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        self.env.update(PYTHONSAFEPATH="1", TRL_EXPERIMENTAL_SILENCE="1",
                        TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join(
                            [str(self.site)] + [p for p in os.environ.get("PYTHONPATH", "")
                                                .split(os.pathsep) if p]))

    def record(self, step: str, status: str, seconds: float, detail: str = "") -> None:
        self.steps.append({"step": step, "status": status, "seconds": round(seconds, 1),
                           "detail": detail})
        tail = f" - {detail}" if detail else ""
        print(f"[device-check] {step}: {status} ({seconds:.0f} s){tail}", flush=True)

    def run(self, step: str, cmd: Sequence[str], limit_s: float, log: Optional[Path] = None,
            ok_codes: Sequence[int] = (0,)) -> int:
        """Run ``cmd`` in the repository under ``limit_s`` seconds (its process group is killed
        past it), its output to ``log`` (default ``$OUT/<step>.log``)."""
        log = log or self.out / f"{step}.log"
        start = time.perf_counter()
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(list(cmd), cwd=REPO, env=self.env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=limit_s)
                status = "ok" if rc in ok_codes else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=GRACE_S)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                rc = 124
                status = f"timed out after {limit_s:.0f} s"
        self.record(step, status, time.perf_counter() - start, f"log: {log.name}")
        return rc

    # -- set-up steps --------------------------------------------------------------------
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
        detail = (f"installed {len(installed)} into {self.site}: {', '.join(installed) or '-'}; "
                  f"already importable: {', '.join(present) or '-'}")
        if missing:
            detail += (f"; MISSING from {WHEEL_DIR.name}/ (run `make device-wheels` and carry "
                       f".whl): {', '.join(missing)}")
        status = "ok" if not missing else "warning" if self.dry_run else "missing wheels"
        self.record("wheels", status,
                    time.perf_counter() - start, detail)

    def probe_imports(self) -> None:
        """Whether the peers, TRL and datasets import (a phase that needs a missing one fails or
        skips those cases; this says why up front)."""
        start = time.perf_counter()
        code = ("import importlib, sys\nfor m in sys.argv[1:]:\n    try:\n"
                "        importlib.import_module(m)\n        print(m, 'ok')\n"
                "    except Exception as e:\n        print(m, 'FAILED', type(e).__name__, e)")
        modules = ["datasets", "trl", "trl.experimental.nash_md", "liger_kernel.transformers",
                   "cut_cross_entropy", "pytest_timeout"]
        proc = subprocess.run([self.python, "-c", code, *modules], cwd=REPO, env=self.env,
                              capture_output=True, text=True)
        failed = [line for line in proc.stdout.splitlines() if "FAILED" in line]
        (self.out / "imports.log").write_text(proc.stdout + proc.stderr)
        self.record("imports", "warning" if failed or proc.returncode else "ok",
                    time.perf_counter() - start, "; ".join(failed)[:600] or "all import")

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
        code = ("import nashkern, nashkern.kernels.linear_token_stats as k, nashkern.tuning; "
                "print(nashkern.__file__, k.__file__)")
        proc = subprocess.run([self.python, "-c", code], cwd=REPO, env=self.env,
                              capture_output=True, text=True)
        ok = proc.returncode == 0 and str(self.site) in proc.stdout
        self.record("nashkern", "ok" if ok else "failed", time.perf_counter() - start,
                    (proc.stdout.strip() or proc.stderr.strip()[-500:]))

    def build_cuda(self) -> None:
        start = time.perf_counter()
        sys.path.insert(0, str(REPO / "csrc"))
        try:
            import build_cuda  # csrc/build_cuda.py
        finally:
            sys.path.pop(0)
        if build_cuda.find_nvcc() is None:
            self.record("cuda-build", "skipped", 0.0, "nvcc not found: backend='cuda' untested")
            return
        try:
            lib = build_cuda.build_cached(self.cuda_cache, archs=self.cuda_archs)
        except Exception as exc:  # noqa: BLE001 - reported, the phases run without it
            self.record("cuda-build", "failed", time.perf_counter() - start, str(exc)[-500:])
            return
        self.env["NASHKERN_CUDA_LIB"] = str(lib)
        self.record("cuda-build", "ok", time.perf_counter() - start,
                    f"sm_{', sm_'.join(self.cuda_archs)}: {lib}")

    def device_facts(self) -> None:
        start = time.perf_counter()
        code = ("import json, torch, triton; print(json.dumps({'torch': torch.__version__, "
                "'triton': triton.__version__, 'cuda': torch.version.cuda, 'device': "
                "torch.cuda.get_device_name() if torch.cuda.is_available() else None}))")
        proc = subprocess.run([self.python, "-c", code], cwd=REPO, env=self.env,
                              capture_output=True, text=True)
        facts = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else proc.stderr[-300:]
        self.record("facts", "ok" if proc.returncode == 0 else "failed",
                    time.perf_counter() - start, facts)

    # -- phases --------------------------------------------------------------------------
    def phase_tests(self) -> None:
        ignore = [a for t in DEVICE_IGNORED_TESTS for a in ("--ignore", t)]
        base = [self.python, "-m", "pytest", "tests", "-p", "no:cacheprovider", *ignore]
        if self.dry_run:
            self.run("tests-collect", base + ["--collect-only", "-q"], 120)
            return
        if importable(self.python, ["pytest_timeout"], self.env)["pytest_timeout"]:
            per_test = [f"--timeout={PER_TEST_TIMEOUT_S}"]
        else:  # pytest's own: dumps every thread's stack, does not stop the test
            per_test = ["-o", f"faulthandler_timeout={PER_TEST_TIMEOUT_S}"]
            self.record("per-test-timeout", "warning", 0.0, "pytest-timeout missing: "
                        "faulthandler_timeout only (the phase limit still applies)")
        self.run("tests", base + ["-q", "-n", str(TEST_WORKERS), *per_test,
                                  f"--junitxml={self.out / 'tests.xml'}", "-o",
                                  "junit_family=xunit2"], PHASE_LIMIT_S["tests"])
        sanitizer = find_sanitizer()
        if sanitizer is None or "NASHKERN_CUDA_LIB" not in self.env:
            self.record("sanitizer", "skipped", 0.0, "no compute-sanitizer or no CUDA library")
            return
        self.run("sanitizer", [sanitizer, "--tool", "memcheck", "--error-exitcode", "1",
                               "--target-processes", "all", self.python, "-c", SANITIZER_CASE],
                 PHASE_LIMIT_S["sanitizer"])

    def phase_bench(self) -> None:
        cmd = [self.python, "-m", "pytest", *BENCH_SUITES, "-p", "no:cacheprovider", *BENCH_ARGS]
        if self.dry_run:
            self.run("bench-select", cmd + ["--collect-only", "-q"], 120)
            log = (self.out / "bench-select.log").read_text()
            cases = re.findall(r"^\S+::\S+", log, flags=re.M)
            (self.out / "bench_cases.txt").write_text("\n".join(cases) + "\n")
            self.record("bench-cases", "ok" if cases else "failed", 0.0,
                        f"{len(cases)} cases (bench_cases.txt)")
            return
        self.run("bench", cmd + ["-q", f"--bench-csv={self.out / 'bench.csv'}",
                                 "--benchmark-columns=median,iqr,min,rounds",
                                 f"--junitxml={self.out / 'bench.xml'}"], PHASE_LIMIT_S["bench"])

    def phase_trainer(self) -> None:
        cmd = [self.python, "benchmarks/bench_trainers.py", "--compare", *TRAINER_ARGS,
               "--nashkern-python", self.python, "--trl-python", self.python,
               "--model-dir", str(CACHE / "models"),
               "--timeout", str(PHASE_LIMIT_S["trainer"]),
               "--csv", str(self.out / "trainers.csv"), "--json", str(self.out / "trainers.json"),
               "--note", "device-check"]
        if self.dry_run:
            self.run("trainer-args", cmd + ["--check-args"], 120)
            return
        self.run("trainer", cmd, PHASE_LIMIT_S["trainer"])

    def summary(self) -> int:
        failed = [s for s in self.steps if s["status"] not in PASSING]
        (self.out / "summary.json").write_text(json.dumps(
            {"dry_run": self.dry_run, "python": self.python, "steps": self.steps,
             "finished": datetime.datetime.now(datetime.timezone.utc).isoformat()}, indent=1))
        lines = ["| step | status | seconds | detail |", "|---|---|---|---|"]
        lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['detail']} |"
                  for s in self.steps]
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase", choices=("all",) + PHASES, default="all")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"),
                        help="logs, JUnit XML, CSV rows, summary (default $OUT or ./out)")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter to test with (default: this one)")
    parser.add_argument("--dry-run", action="store_true",
                        help="every step that needs no GPU: set-up, collection, selection")
    parser.add_argument("--cuda-archs", default="90",
                        help='architectures of the CUDA build (default "90": the H200 runner)')
    parser.add_argument("--cuda-cache", default=str(CACHE),
                        help="cache root of the CUDA build (default build/device-check)")
    args = parser.parse_args(argv)
    check = Check(Path(args.out).resolve(), args.python, args.dry_run,
                  [a for a in re.split(r"[;,\s]+", args.cuda_archs) if a], Path(args.cuda_cache))
    try:
        check.install_wheels()
        check.link_nashkern()
        if not args.dry_run:  # here the carried cp312 wheels may not match this python
            check.probe_imports()
        check.build_cuda()
        check.device_facts()
        for phase in PHASES if args.phase == "all" else (args.phase,):
            getattr(check, f"phase_{phase}")()
    finally:
        shutil.rmtree(check.site, ignore_errors=True)
    return check.summary()


if __name__ == "__main__":
    sys.exit(main())
