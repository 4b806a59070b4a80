"""benchmarks/bench_trainers.py (nashkern vs TRL 1.13) cannot rot: the nashkern worker runs one
training step at a tiny shape under this venv, and the driver's table / CSV code runs on a
synthetic pair of results (the TRL side needs its own venv, ``make bench-trl``)."""
import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_trainers.py"
TINY = ["--vocab", "64", "--hidden", "16", "--layers", "1", "--heads", "2", "--kv-heads", "1",
        "--batch-size", "2", "--max-new-tokens", "4", "--warmup", "0", "--steps", "1"]


def load_script():
    spec = importlib.util.spec_from_file_location("bench_trainers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("method", ["nash_md", "xpo"])
def test_nashkern_worker_one_step(tmp_path, method):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--impl", "nashkern", "--method", method, *TINY,
         "--model-dir", str(tmp_path), "--prepare"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    mod = load_script()
    line = next(x for x in proc.stdout.splitlines() if x.startswith(mod.RESULT_TAG))
    res = json.loads(line[len(mod.RESULT_TAG):])
    assert res["impl"] == "nashkern" and res["method"] == method
    assert len(res["step_times_s"]) == 1 and res["median_step_s"] > 0
    assert res["peak_rss_bytes"] >= res["rss_after_setup_bytes"] > 0
    assert res["shape"]["vocab"] == 64 and res["versions"]["nashkern"]
    assert any(k.startswith("generate") for k in res["phases_median_s"])
    assert "log-prob forward (policy+ref)" in res["phases_median_s"]
    assert len(res["eos_fraction_policy"]) == 1


def test_driver_table_and_csv(tmp_path, capsys):
    mod = load_script()

    def fake(impl, step, peak):
        return {"impl": impl, "method": "nash_md", "threads": 1,
                "versions": {"torch": "t", "transformers": "x", impl: "v"},
                "shape": {"vocab": 64, "hidden": 16, "layers": 1, "batch_size": 2,
                          "max_new_tokens": 4},
                "warmup": 1, "steps": 2, "step_times_s": [step] * 3, "median_step_s": step,
                "median_step_cpu_s": step, "rss_after_setup_bytes": 100 << 20,
                "peak_rss_bytes": peak, "phases_median_s": {"generate": step / 2},
                "eos_fraction_policy": [0.0], "eos_fraction_other": [0.0],
                "parameter_bytes": 10**6, "reward_parameter_bytes": 10**6,
                "copy_bandwidth": 1e9, "contended": 0}

    results = {"nashkern": fake("nashkern", 1.0, 200 << 20), "trl": fake("trl", 20.0, 1000 << 20)}
    summary = mod.print_table(results, "nash_md")
    assert summary["speedup"] == pytest.approx(20.0)
    assert summary["memory_ratio"] == pytest.approx(0.2)
    assert summary["time_target_met"] and summary["memory_target_met"]
    # floor: (4 tokens x 2 + 2 + 2 + 7) policy sizes + the reward model, at 1 GB/s
    assert summary["floor_s"] == pytest.approx((19 * 10**6 + 10**6) / 1e9)
    assert summary["nashkern_over_floor"] == pytest.approx(1.0 / summary["floor_s"])
    printed = capsys.readouterr().out
    assert "met" in printed and "x the floor" in printed
    out = tmp_path / "t.csv"
    mod.append_csv(str(out), results, summary, "note")
    rows = list(csv.DictReader(open(out)))
    assert [r["impl"] for r in rows] == ["nashkern", "trl"]
    assert rows[1]["trl"] == "v" and rows[0]["speedup_trl_over_nashkern"] == "20.000"


def test_contended_mode_and_copy_bandwidth():
    """The competing busy process runs while the context is held and is gone after it; the
    copy benchmark gives a plausible bandwidth."""
    mod = load_script()
    with mod.competing_processes(1) as procs:
        assert len(procs) == 1 and procs[0].poll() is None
    assert procs[0].poll() is not None
    assert 1e8 < mod.copy_bandwidth(1, megabytes=16, repeats=2) < 1e13
