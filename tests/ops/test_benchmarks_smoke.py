"""The kernel benchmark suites (``benchmarks/test_bench_*.py``) run once each at the tiny shape so
that they cannot rot: every op produces timed rows with peak memory and a floor fraction, and
the peers that cannot run here are skipped with a reason and a CSV row, never faked. Then
``benchmarks/render.py`` rewrites only its section of a document, idempotently."""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
SUITES = sorted(str(p) for p in BENCH.glob("test_bench_*.py"))
OPS = {"linear_token_stats", "token_stats", "mixture_sample", "linear_mixture_sample"}
# torch.compile costs seconds per case on a CPU: compile one case per op, run eager elsewhere.
ONE_COMPILE_PER_OP = ("not torch-compile or logprobs-forward-torch-compile "
                      "or sample-forward-torch-compile")


def _clean_env() -> dict:
    """No Triton interpreter, no GPU, no xdist worker identity (pytest-benchmark would disable
    timing), one thread (the smoke must not depend on how busy the machine is)."""
    env = {k: v for k, v in os.environ.items()
           if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return env


def test_benchmark_suites_run_once_at_the_tiny_shape(tmp_path):
    out_csv = tmp_path / "bench.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *SUITES, "-q", "-p", "no:cacheprovider",
         "--bench-shapes", "tiny", "--bench-rounds", "1", "--bench-csv", str(out_csv),
         "--benchmark-columns=median,rounds", "-k", ONE_COMPILE_PER_OP],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=_clean_env(),
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "GPU figures" in proc.stdout and "need a GPU" in proc.stdout
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert {r["op"] for r in rows} == OPS
    assert not [r for r in rows if r["status"] not in ("ok", "skipped")], rows

    ok = [r for r in rows if r["status"] == "ok"]
    for op in OPS:
        for provider in ("nashkern-torch", "eager", "torch-compile"):
            assert any(r["op"] == op and r["provider"] == provider for r in ok), (op, provider)
    modes = {r["mode"] for r in ok if r["op"] == "linear_token_stats" and r["provider"] == "eager"}
    assert modes == {"forward", "backward", "forward+backward"}
    for r in ok:
        assert float(r["time_median_s"]) > 0 and int(r["rounds"]) == 1
        assert int(r["peak_memory_bytes"]) >= 0 and r["memory_method"]
        assert float(r["floor_fraction"]) > 0 and r["floor_kind"] in ("flop", "bytes")
        assert r["device"] and r["torch"] == torch.__version__ and r["git_commit"]

    skipped = [r for r in rows if r["status"] == "skipped"]
    assert all(r["message"] for r in skipped)
    never_here = {"nashkern-triton", "liger-flce", "liger-fljsd", "liger-ce", "cce"}
    assert not [r for r in ok if r["provider"] in never_here]  # no GPU: never "measured"
    assert {r["provider"] for r in skipped} >= never_here


def test_render_rewrites_only_its_section(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(BENCH / "results" / "cpu.csv", results)  # the first recorded CPU rows
    (results / "other.csv").write_text("step,seconds\n1,2.0\n")  # another benchmark's file
    doc = tmp_path / "BENCHMARKS.md"
    head, tail = "# Benchmarks\n\nhand-written\n\n", "\n## Trainers\n\nalso hand-written\n"
    doc.write_text(head + "<!-- BEGIN GENERATED: kernels -->\nold\n"
                   "<!-- END GENERATED: kernels -->" + tail)
    render = [sys.executable, str(BENCH / "render.py"), "--results", str(results),
              "--doc", str(doc)]
    subprocess.run(render, check=True, capture_output=True, timeout=300, cwd=ROOT)
    text = doc.read_text()
    assert text.startswith(head) and text.endswith(tail) and "\nold\n" not in text
    assert "qwen2.5-0.5b" in text and "GPU figures: pending" in text
    pngs = sorted((results / "plots").glob("*.png"))
    assert pngs and all(f"plots/{p.name}" in text for p in pngs)
    check = subprocess.run(render + ["--check"], capture_output=True, text=True, timeout=300,
                           cwd=ROOT)
    assert check.returncode == 0, check.stdout  # idempotent
