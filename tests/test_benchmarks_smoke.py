"""The benchmark script runs end to end on a tiny shape (CPU providers; the CUDA-only peers must
be reported as skipped, not faked)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_linear_token_stats.py"


def test_quick_benchmark_prints_a_row_per_provider(tmp_path):
    out_csv = tmp_path / "bench.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU providers only, even on a GPU machine
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--providers", "nashkern-torch", "eager",
         "liger-flce", "--workloads", "reference", "--csv", str(out_csv)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = [line.split() for line in proc.stdout.splitlines()]
    for provider in ("nashkern-torch", "eager"):
        rows = [r for r in table if r and r[0] == provider]
        assert len(rows) == 2, f"expected forward and forward+backward for {provider}:\n{proc.stdout}"
        assert all(r[-1] == "ok" for r in rows), proc.stdout
    assert any(line.startswith("skipped liger-flce") for line in proc.stdout.splitlines())
    assert "peak memory:" in proc.stdout
    with open(out_csv) as f:
        written = list(csv.DictReader(f))
    assert {r["provider"] for r in written} == {"nashkern-torch", "eager"}
    assert all(int(r["peak_memory_bytes"]) >= 0 for r in written)
