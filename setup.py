"""nashkern: the build steps pyproject.toml cannot declare (metadata lives there).

The Triton kernels live in the top-level ``kernels/`` folder and install as ``nashkern.kernels``.
The optional CUDA kernels (``csrc/``) are compiled by nvcc into ``nashkern/_nashkern_cuda.so``
(loaded with ctypes by ``nashkern/backends/cuda/library.py``; no torch C++ extension) by the
``build_cuda`` step below, when a CUDA toolchain is found and torch has CUDA:

  NASHKERN_BUILD_CUDA=1       build even without a CUDA-enabled torch (and fail if it cannot)
  NASHKERN_SKIP_CUDA_BUILD=1  never build
  NASHKERN_CUDA_ARCHS="80;90" SM architectures (csrc/build_cuda.py)

Otherwise the step is skipped, with a log line saying why (``pip install -v`` shows it).
``make cuda`` builds the library in place without pip.
"""
import logging
import os
import sys
from pathlib import Path

from setuptools import Command, Distribution, find_packages, setup
from setuptools.command.build import build

ROOT = Path(__file__).resolve().parent
CUDA_LIBRARY = Path("nashkern") / "_nashkern_cuda.so"


def _build_cuda_module():
    sys.path.insert(0, str(ROOT / "csrc"))
    try:
        import build_cuda  # csrc/build_cuda.py
    finally:
        sys.path.pop(0)
    return build_cuda


_DECISION = None


def cuda_build_decision():
    """(build?, forced?, reason), decided once per setup.py run."""
    global _DECISION
    if _DECISION is None:
        _DECISION = _decide()
    return _DECISION


def _decide():
    if os.environ.get("NASHKERN_SKIP_CUDA_BUILD", "0") == "1":
        return False, False, "NASHKERN_SKIP_CUDA_BUILD=1"
    forced = os.environ.get("NASHKERN_BUILD_CUDA", "0") == "1"
    if not (ROOT / "csrc" / "build_cuda.py").is_file():
        return False, forced, "csrc/ is not part of this source tree"
    nvcc = _build_cuda_module().find_nvcc()
    if nvcc is None:
        return False, forced, "no nvcc found (set NVCC or CUDA_HOME, or put nvcc on PATH)"
    if forced:
        return True, True, f"NASHKERN_BUILD_CUDA=1 ({nvcc})"
    try:
        import torch
    except ImportError:
        return False, False, ("torch is not importable at build time (build isolation?); "
                              "use --no-build-isolation or NASHKERN_BUILD_CUDA=1")
    if not torch.cuda.is_available():
        return False, False, "torch.cuda is not available (set NASHKERN_BUILD_CUDA=1 to build anyway)"
    return True, False, f"nvcc ({nvcc}) and torch.cuda found"


class BuildCuda(Command):
    """Compile csrc/*.cu with nvcc into nashkern/_nashkern_cuda.so (in the source tree for
    editable installs, in build_lib otherwise)."""

    description = "build the CUDA kernels (csrc/) into nashkern/_nashkern_cuda.so with nvcc"
    user_options = []
    editable_mode = False  # set by setuptools' editable_wheel

    def initialize_options(self):
        self.build_lib = None
        self.editable_mode = False
        self._outputs = []

    def finalize_options(self):
        self.set_undefined_options("build", ("build_lib", "build_lib"))

    def _target(self) -> Path:
        if self.editable_mode:
            return ROOT / CUDA_LIBRARY
        return Path(self.build_lib) / CUDA_LIBRARY

    def run(self):
        do_build, forced, reason = cuda_build_decision()
        if not do_build:
            if forced:
                raise RuntimeError(f"NASHKERN_BUILD_CUDA=1 but the CUDA kernels cannot be built: "
                                   f"{reason}")
            self.announce(f"nashkern: skipping the CUDA kernels (backend='cuda'): {reason}",
                          level=logging.INFO)
            return
        target = self._target()
        self.announce(f"nashkern: building the CUDA kernels into {target}: {reason}", level=logging.INFO)
        try:
            _build_cuda_module().build(target, verbose=True)
        except Exception as e:  # noqa: BLE001 - an optional backend must not break the install
            if forced:
                raise
            self.announce(f"nashkern: WARNING: building the CUDA kernels failed; backend='cuda' "
                          f"stays unavailable: {e}", level=logging.WARNING)
            return
        if not self.editable_mode:
            self._outputs = [str(target)]

    def get_outputs(self):
        return self._outputs

    def get_output_mapping(self):
        return {}


class BuildWithCuda(build):
    sub_commands = build.sub_commands + [("build_cuda", None)]


class NashkernDistribution(Distribution):
    def has_ext_modules(self):
        # A wheel carrying the shared library is platform-specific.
        return cuda_build_decision()[0]


def nashkern_packages():
    """Every package under nashkern/ (found, never listed by hand: a new subpackage cannot be left
    out of the wheel) plus the top-level kernels/ folder installed as ``nashkern.kernels``.

    kernels/ has no ``__init__.py`` on purpose: a folder without one is only a namespace portion,
    which Python's path finder passes over in favour of any regular ``kernels`` package later on
    ``sys.path`` (the Hugging Face ``kernels`` that transformers imports), so running from the
    repository root can never shadow it."""
    found = find_packages(where=str(ROOT), include=["nashkern", "nashkern.*"])
    return sorted(found) + ["nashkern.kernels"]


setup(
    # Metadata, dependencies, extras and the console script: pyproject.toml (PEP 621).
    packages=nashkern_packages(),
    package_dir={"nashkern": "nashkern", "nashkern.kernels": "kernels"},
    cmdclass={"build": BuildWithCuda, "build_cuda": BuildCuda},
    distclass=NashkernDistribution,
)
