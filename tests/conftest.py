"""Shared test set-up: run Triton kernels in the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton decorates any kernel, so it is set here, before any
test module imports nashkern's kernels.

Layout: ``tests/ops`` (the kernel library: ops, backends, kernels, compile gate, memory, tuning),
``tests/rl`` (trainers, generation, scoring, sharded runs and the scripts they launch),
``tests/tools`` (CLI, device check, benchmark smoke) and ``tests/helpers`` (tiny models, the
float64 oracle, trainer and TRL-compat helpers), which is put on ``sys.path`` here so that every
folder imports them by module name (``from oracle import compare``).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _versions_line():
    """scripts/versions.py's one line (torch, transformers, accelerate, ... as installed)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "versions.py"
    spec = importlib.util.spec_from_file_location("_nashkern_versions", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.versions_line()


def pytest_report_header(config):
    return f"nashkern runs against: {_versions_line()}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # Also under -q (no header): a failure caused by a new release names the package and version.
    if hasattr(config, "workerinput"):
        return
    terminalreporter.write_line(f"nashkern ran against: {_versions_line()}")


# The part of the suite the minimum-versions job runs (make test-min-versions: the declared lower
# bounds, which are the GPU runner image's versions): everything that touches transformers,
# accelerate, datasets or peft through the trainers (torch is 2.13 in both jobs, so the ops'
# own tests would repeat themselves there; the wheel smoke script checks every op at the lower
# bounds). By file name, so that moving a file between test folders keeps it selected.
MIN_VERSIONS_FILES = {
    "test_generation.py", "test_compiled_decode.py", "test_generation_fused_decode.py",
    "test_callbacks.py", "test_losses.py",
    "test_nash_md_trainer.py", "test_xpo_trainer.py", "test_online_dpo_trainer.py",
    "test_trl_compat_nash_md.py", "test_trl_compat_xpo.py", "test_trl_compat_online_dpo.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in MIN_VERSIONS_FILES:
            item.add_marker(pytest.mark.min_versions)
