"""scripts/device_check.py --dry-run: every step of the GPU runner's one command that needs no
GPU (wheel install from .whl/ into a temporary target, nashkern on PYTHONPATH, the CUDA build
into a cache, test collection, benchmark case selection, the trainer benchmark's arguments) runs
here, so that the command is known to start on the device.

The CUDA build shares test_cuda_backend's cache (build_cuda.build_cached() defaults: archs
80;90 in the temporary directory) so that the suite builds the library once; `make
device-check-dry-run` builds sm_90 only, as the device run does.
"""
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import device_check  # noqa: E402  (scripts/device_check.py)


def test_dry_run_starts_every_phase(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "device_check.py"), "--dry-run", "--out",
         str(out), "--cuda-archs", "80;90", "--cuda-cache", tempfile.gettempdir()],
        cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    steps = {s["step"]: s for s in json.loads((out / "summary.json").read_text())["steps"]}
    for step in ("wheels", "nashkern", "cuda-build", "facts", "tests-collect", "bench-select",
                 "bench-cases", "trainer-args"):
        assert step in steps, (step, steps)
    assert steps["nashkern"]["status"] == "ok"
    # The test phase collects the suite with the device's exclusions; the bench phase selects
    # one shape (Llama-3-8B head, N=8192, bf16) and both modes; the trainer phase parses.
    collected = (out / "tests-collect.log").read_text()
    assert "tests/test_ops.py::" in collected and "test_compile_gate.py::" not in collected
    cases = (out / "bench_cases.txt").read_text().split()
    assert cases and all("llama-3-8b-N8192" in c for c in cases)
    assert any("forward+backward-nashkern-triton" in c for c in cases)
    assert any("-forward-cce" in c for c in cases)
    argv = (out / "trainer-args.log").read_text()
    assert "--impl nashkern" in argv and "--impl trl" in argv and "--dtype bf16" in argv
    assert "--hidden 896" in argv and "--device cuda" in argv


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
    pins.write_text("# comment\nfakepkg==1.0\nother-pkg==2.0  # why\n")
    monkeypatch.setattr(device_check, "WHEEL_LIST", pins)
    found, missing = device_check.carried_wheels(tmp_path)
    assert found == [whl] and missing == ["other-pkg==2.0"]


def test_every_pinned_wheel_is_pinned_exactly():
    pins = device_check.pinned_wheels()
    names = {device_check._norm(n) for n, _ in pins}
    assert {"trl", "datasets", "liger_kernel", "cut_cross_entropy", "pytest_timeout"} <= names
    assert all(v and v[0].isdigit() for _, v in pins), pins
