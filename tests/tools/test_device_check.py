"""scripts/device_check.py, the one command of a lent GPU runner: its dry run (each part's Python
on the CPU at tiny sizes, every import of the real run, the benchmark selection) passes here, and
the run fits the runner: the summed deadlines, the files it returns, the size of the carry.

The dry run is also run by the minimum-versions job (``min_versions``: the GPU image's
transformers / accelerate / peft), so that a drift between the image and CI fails CI, not the
device. Its CUDA build shares test_cuda_backend's cache (build_cuda.build_cached() defaults:
archs 80;90 in the temporary directory), so the suite builds the library once.
"""
import json
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_trainers  # noqa: E402  (benchmarks/bench_trainers.py)
import device_check  # noqa: E402  (scripts/device_check.py)

PASSING = device_check.PASSING


@pytest.mark.min_versions
def test_dry_run_runs_every_part(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "device_check.py"), "--dry-run", "--out",
         str(out), "--cuda-archs", "80;90", "--cuda-cache", tempfile.gettempdir(),
         "--budget-scale", "4"],  # a loaded 2-core CI machine, the interpreter: not the device
        cwd=REPO, capture_output=True, text=True, timeout=1500)
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert proc.returncode == 0, (proc.stdout[-4000:] + proc.stderr[-2000:]
                                  + (out / "logs.txt").read_text()[-6000:])
    for step in ("wheels", "nashkern", "imports", "cuda-build", "tests-collect",
                 "bench-linear_token_stats-select", "bench-token_stats-select", "bench-tiny",
                 "sanitizer-case", "trainer-bf16", "trainer-fp32"):
        assert step in steps, (step, sorted(steps))
    assert steps["nashkern"]["status"] == "ok" and steps["imports"]["status"] in PASSING
    assert summary["facts"]["torch"] and summary["facts"]["transformers"]
    # Every returned file is one of the declared ones, and they fit the runner's 8.
    assert {p.name for p in out.iterdir()} <= set(device_check.OUT_FILES)
    # The test selection is collected; the headline selection has a case for every provider.
    assert "tests collected" in steps["tests-collect"]["detail"]
    for suite in ("linear_token_stats", "token_stats"):
        detail = steps[f"bench-{suite}-select"]["detail"]
        assert "NO CASE" not in detail and "N8192" in detail, detail
    assert "forward+backward-nashkern-triton-fused" in steps[
        "bench-linear_token_stats-select"]["detail"]
    # The harness wrote the tiny rows; the trainer driver one row per dtype of nashkern.
    rows = device_check.read_csv(out / "bench.csv")
    assert any(r["provider"] == "nashkern-torch" and r["status"] == "ok" for r in rows), rows
    trainers = device_check.read_csv(out / "trainers.csv")
    assert {(r["impl"], r["dtype"]) for r in trainers} >= {("nashkern", "bf16"),
                                                           ("nashkern", "fp32")}, trainers
    text = (out / "summary.md").read_text()
    assert "## Benchmarks" in text and "## Trainer step vs TRL" in text


def test_budgets_fit_the_runner():
    """<= 480 s in all (the runner stops a call at 600 s, start-up and transfer included), each
    part's deadline after the previous one, a grace period shorter than any part, <= 8 files."""
    assert sum(device_check.BUDGET_S.values()) <= device_check.TOTAL_LIMIT_S <= 480
    assert list(device_check.BUDGET_S) == list(device_check.PARTS)
    ends = list(device_check.deadlines().values())
    assert ends == sorted(ends) and ends[-1] == sum(device_check.BUDGET_S.values())
    assert all(b > 2 * device_check.GRACE_S for b in device_check.BUDGET_S.values())
    assert device_check.SHAPES_LIMIT_S < device_check.BUDGET_S["correctness"]
    assert len(set(device_check.OUT_FILES)) == len(device_check.OUT_FILES) <= 8
    assert device_check.MAX_OUT_FILES == 8


def test_carry_is_the_trimmed_set_and_the_readme_says_its_size():
    pins = device_check.pinned_wheels()
    assert all(size > 0 for _, _, size in pins), pins  # every pin has its recorded size
    total = device_check.carry_bytes()
    assert total <= device_check.CARRY_LIMIT_BYTES, total
    names = {device_check._norm(n) for n, _, _ in pins}
    assert {"trl", "datasets", "liger_kernel", "cut_cross_entropy"} <= names
    assert not names & {"pyarrow", "pandas", "torch", "transformers"}  # on the image
    readme = (REPO / "README.md").read_text()
    assert f"{total / 2 ** 20:.1f} MiB" in readme, f"README must state the carry: {total} bytes"
    if (REPO / ".whl").is_dir():  # what `make device-wheels` left here
        assert device_check.verify_wheels() == []


def test_every_test_file_is_classified_for_the_device():
    """A new test file must say whether it runs kernels on the device (GPU_TESTS) or not."""
    on_disk = {p.relative_to(REPO).as_posix() for p in (REPO / "tests").rglob("test_*.py")}
    groups = [set(device_check.SHAPE_TESTS), set(device_check.GPU_TESTS),
              set(device_check.CPU_ONLY_TESTS)]
    assert sum(len(g) for g in groups) == len(set().union(*groups)), "listed twice"
    listed = set().union(*groups)
    assert listed == on_disk, (f"classify in scripts/device_check.py (GPU_TESTS or "
                               f"CPU_ONLY_TESTS): {sorted(on_disk - listed)}; "
                               f"gone: {sorted(listed - on_disk)}")


def test_deadline_stops_a_command_and_keeps_what_it_wrote(tmp_path):
    check = device_check.Check(tmp_path / "out", sys.executable, True, [], tmp_path)
    try:
        check.deadline["bench"] = time.monotonic() + 12  # SIGINT after 6 s
        code = ("import time\ntry:\n    print('started', flush=True); time.sleep(60)\n"
                "except KeyboardInterrupt:\n    print('wrote partial rows', flush=True)")
        start = time.monotonic()
        rc = check.run("slow", [sys.executable, "-c", code], "bench")
        assert rc == 124 and time.monotonic() - start < 12
        assert check.steps[-1]["status"].startswith("deadline")
        assert "wrote partial rows" in (tmp_path / "out" / "logs.txt").read_text()
        assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"]
        check.deadline["trainer"] = time.monotonic() + 5  # too little left: not started
        assert check.run("late", [sys.executable, "-c", "pass"], "trainer") is None
        assert check.steps[-1]["status"] == "skipped"
    finally:
        import shutil
        shutil.rmtree(check.work, ignore_errors=True)


def test_summary_tables_show_the_floor_and_memory():
    row = {"op": "linear_token_stats", "model": "llama-3-8b", "N": "8192", "workload": "policy",
           "mode": "forward+backward", "provider": "nashkern-triton-fused",
           "time_median_s": "0.05", "floor_fraction": "0.61", "floor_kind": "flop",
           "peak_memory_bytes": str(3 * 2 ** 30), "status": "ok", "message": ""}
    line = device_check.bench_table([row])[-1]
    assert "| 50.0 | 61.0 | FLOP roofline | 3.00 | ok |" in line
    t = device_check.trainer_table([{"dtype": "bf16", "impl": "trl", "median_step_s": "1.5",
                                     "gpu_peak_bytes": str(2 ** 31), "device": "H100"}])[-1]
    assert "| bf16 | trl | 1.500 |" in t and "| 2.00 |" in t


def test_trainer_workers_see_the_gpu_unless_on_the_cpu(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert bench_trainers.worker_env(1, "cpu")["CUDA_VISIBLE_DEVICES"] == ""
    assert "CUDA_VISIBLE_DEVICES" not in bench_trainers.worker_env(1, "cuda")


def _wheel(path: Path, files: dict) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


def test_wheels_install_by_unpacking_and_missing_pins_are_named(tmp_path, monkeypatch):
    whl = _wheel(tmp_path / "fakepkg-1.0-py3-none-any.whl", {
        "fakepkg/__init__.py": "X = 1\n", "fakemod.py": "", "fakepkg-1.0.dist-info/RECORD": "",
        "fakepkg-1.0.data/purelib/extra_mod.py": "", "fakepkg-1.0.data/scripts/tool": "#!",
    })
    assert device_check.wheel_modules(whl) == ["extra_mod", "fakemod", "fakepkg"]
    target = tmp_path / "site"
    device_check.install_wheel(whl, target)
    assert (target / "fakepkg" / "__init__.py").read_text() == "X = 1\n"
    assert (target / "extra_mod.py").is_file() and not (target / "tool").exists()
    pins = tmp_path / "wheels.txt"
    size = whl.stat().st_size
    pins.write_text(f"# comment\nfakepkg==1.0  # {size} bytes, why\nother-pkg==2.0  # 7 bytes\n")
    monkeypatch.setattr(device_check, "WHEEL_LIST", pins)
    found, missing = device_check.carried_wheels(tmp_path)
    assert found == [whl] and missing == ["other-pkg==2.0"]
    assert device_check.carry_bytes() == size + 7
    (tmp_path / "stale-0.1-py3-none-any.whl").write_text("x")
    problems = device_check.verify_wheels(tmp_path)
    assert any("missing: other-pkg" in p for p in problems)
    assert any("not pinned" in p and "stale" in p for p in problems)
    assert not any("fakepkg" in p for p in problems)


def test_every_pinned_wheel_is_pinned_exactly():
    pins = device_check.pinned_wheels()
    assert all(v and re.match(r"\d", v) for _, v, _ in pins), pins
