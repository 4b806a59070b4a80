"""Compile gate (no GPU): every Triton kernel compiles ahead of time for sm_90 and sm_80 with
its frozen per-architecture config, for every launch variant of scripts/compile_gate.py, within
the per-block shared memory, without register spills in bf16/fp16, and the bf16 forward of
linear_token_stats runs on tensor cores (HGMMA on sm_90, HMMA on sm_80).

The gate runs in a subprocess without TRITON_INTERPRET (tests/conftest.py sets it, and the
interpreter's kernels cannot be compiled). Triton's cache (~/.triton/cache, or TRITON_CACHE_DIR)
keeps a rerun on unchanged kernels to seconds; a cold run is ~2-3 min on 2 idle cores. The same
run checks that the committed table of this Triton (benchmarks/results/compile_gate*.md) is
current: no second compilation.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import compile_gate  # noqa: E402  (scripts/compile_gate.py)

triton = pytest.importorskip("triton")
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(
    not ((_BIN / "cuobjdump").is_file() and (_BIN / "ptxas").is_file()),
    reason="this Triton ships no NVIDIA ptxas / cuobjdump")


def test_every_kernel_compiles_for_sm90_and_sm80_within_limits(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "1")
    out = tmp_path / "gate.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compile_gate.py"), "--jobs", "2",
         "--json", str(out), "--markdown", str(tmp_path / "gate.md")],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    rows = json.loads(out.read_text()) if out.is_file() else []
    report = "\n".join(line for line in proc.stdout.splitlines()
                       if line.startswith(("FAIL", "| sm")))
    assert rows, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Every declared launch for both architectures, all three dtypes where the inputs have one.
    seen = {(r["arch"], r["kernel"], r["dtype"]) for r in rows}
    for arch in compile_gate.ARCHS:
        for launch in compile_gate.LAUNCHES:
            for dtype in launch.dtypes:
                assert (arch, launch.kernel, dtype) in seen, (arch, launch.kernel, dtype)
    failing = {f"{r['arch']} {r['kernel']} {r['dtype']} {r['features']}": compile_gate.failures(r)
               for r in rows if compile_gate.failures(r)}
    assert not failing, failing
    # The tensor-core check is not vacuous: the bf16 forward rows exist and carry MMA.
    forward = [r for r in rows if r["kernel"] == "_fwd_kernel" and r["dtype"] == "bf16"]
    assert {r["arch"] for r in forward} == set(compile_gate.ARCHS)
    assert all(r["hgmma" if r["arch"] == "sm_90" else "hmma"] > 0 for r in forward), forward
    assert proc.returncode == 0, report + proc.stdout[-2000:] + proc.stderr[-2000:]
    # The committed table of this Triton is what the gate produces now (registers move with
    # every kernel change): regenerate it with `make compile-gate`.
    committed = compile_gate.table_path(triton.__version__)
    text = committed.read_text()
    if not compile_gate.table_is_for(text, triton.__version__):
        pytest.skip(f"no committed table for Triton {triton.__version__} ({committed.name} is "
                    "for another version)")
    generated = (tmp_path / "gate.md").read_text()
    assert generated == text, (
        f"{committed.relative_to(REPO)} is stale (run `make compile-gate` with Triton "
        f"{triton.__version__}): " + "; ".join(
            f"{old!r} -> {new!r}" for old, new in zip(text.splitlines(), generated.splitlines())
            if old != new)[:3000])


def test_gate_flags_spills_and_missing_mma():
    """failures() catches what it is meant to catch (a row that would pass is not enough)."""
    good = {"arch": "sm_90", "family": "linear_token_stats", "kernel": "_fwd_kernel",
            "dtype": "bf16", "features": "all", "error": None, "shared_bytes": 48 * 1024,
            "stack_bytes": 0, "local_bytes": 0, "spill_stores": 0, "registers": 180,
            "hgmma": 8, "hmma": 0}
    assert compile_gate.failures(good) == []
    assert "spills" in compile_gate.failures({**good, "stack_bytes": 16, "spill_stores": 4})[0]
    assert compile_gate.failures({**good, "dtype": "fp32", "stack_bytes": 16}) == []
    assert "HGMMA" in compile_gate.failures({**good, "hgmma": 0, "hmma": 8})[0]
    assert "HMMA" in compile_gate.failures({**good, "arch": "sm_80", "hgmma": 8})[0]
    assert "shared memory" in compile_gate.failures({**good, "arch": "sm_80",
                                                     "shared_bytes": 164 * 1024, "hmma": 1})[0]
    assert "does not compile" in compile_gate.failures({**good, "error": "OutOfResources"})[0]
