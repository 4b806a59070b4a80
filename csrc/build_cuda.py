#!/usr/bin/env python3
"""Build the CUDA kernels of csrc/ into the shared library ``nashkern/_nashkern_cuda.so``.

The one place that knows how the library is compiled; used by ``setup.py`` (the ``build_cuda``
step of ``pip install``), ``make cuda`` and ``tests/ops/test_cuda_build.py``. Standard library only:
it runs without torch and without a GPU (nvcc alone is enough to compile and link).

Every ``csrc/*.cu`` is compiled to an object with nvcc, then the objects are linked into one
shared library with the CUDA runtime linked statically (``-cudart static``) and its symbols
hidden (``--exclude-libs,ALL``), so that the library neither needs a ``libcudart.so`` of its own
CUDA version at run time nor clashes with the one torch loads; only the ``nashkern_*`` functions
of ``csrc/nashkern_cuda.h`` are exported. The library needs a driver recent enough for the
toolkit that built it.

Environment:
  NVCC                 the nvcc to use (else $CUDA_HOME/bin/nvcc, nvcc on PATH, /usr/local/cuda)
  NASHKERN_CUDA_ARCHS  SM architectures, e.g. "80;90" (the default); PTX is embedded for the
                       last one, so newer GPUs can JIT it

Usage:
  python csrc/build_cuda.py [--output nashkern/_nashkern_cuda.so] [--archs "80;90"] [-j 2]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

CSRC = Path(__file__).resolve().parent
REPO = CSRC.parent
HEADER = CSRC / "nashkern_cuda.h"
LIBRARY_NAME = "_nashkern_cuda.so"
DEFAULT_OUTPUT = REPO / "nashkern" / LIBRARY_NAME
DEFAULT_ARCHS = ("80", "90")

# Compile flags. No --use_fast_math: the kernels pick their few approximate intrinsics
# themselves (exp2 of a pre-scaled argument, the Gumbel noise's outer log) where accuracy allows;
# everything else keeps IEEE division, sqrt and denormals.
COMPILE_FLAGS = (
    "-O3",
    "-std=c++17",
    "-lineinfo",
    "-Xcompiler", "-fPIC,-fvisibility=hidden,-Wall,-Wno-unknown-pragmas",
)
LINK_FLAGS = (
    "-shared",
    "-cudart", "static",
    "-Xlinker", "--exclude-libs,ALL",
)


def _pip_nvcc() -> Optional[str]:
    """nvcc of the ``nvidia-cuda-nvcc`` wheel (the ``cuda`` extra), if installed."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        nvcc = os.path.join(location, "bin", "nvcc")
        if os.path.isfile(nvcc):
            return nvcc
    return None


def find_nvcc() -> Optional[str]:
    """Path of nvcc, or None."""
    candidates = [os.environ.get("NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append(shutil.which("nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    candidates.append(_pip_nvcc())  # nashkern[cuda]: PyPI's nvidia-cuda-nvcc
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def sources() -> List[Path]:
    """Every CUDA translation unit of csrc/, sorted."""
    return sorted(CSRC.glob("*.cu"))


def headers() -> List[Path]:
    return sorted(list(CSRC.glob("*.cuh")) + list(CSRC.glob("*.h")))


def archs_from_env(archs: Optional[str] = None) -> List[str]:
    raw = archs if archs is not None else os.environ.get("NASHKERN_CUDA_ARCHS", "")
    parsed = [a.strip().replace("sm_", "").replace(".", "") for a in raw.replace(",", ";").split(";")]
    parsed = [a for a in parsed if a]
    return parsed or list(DEFAULT_ARCHS)


def gencode_flags(archs: Sequence[str]) -> List[str]:
    flags: List[str] = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX
    return flags


def compile_command(nvcc: str, source: Path, obj: Path, archs: Sequence[str]) -> List[str]:
    return [nvcc, *COMPILE_FLAGS, *gencode_flags(archs), f"-I{CSRC}", "-c", str(source),
            "-o", str(obj)]


def link_command(nvcc: str, objects: Iterable[Path], output: Path, archs: Sequence[str]) -> List[str]:
    return [nvcc, *LINK_FLAGS, *gencode_flags(archs), *map(str, objects), "-o", str(output)]


def _run(cmd: List[str], verbose: bool) -> None:
    if verbose:
        print(shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stdout}")
    if verbose and proc.stdout.strip():
        print(proc.stdout, flush=True)


def compile_objects(build_dir: Path, nvcc: Optional[str] = None, archs: Optional[Sequence[str]] = None,
                    jobs: int = 0, verbose: bool = False) -> List[Path]:
    """Compile every csrc/*.cu to build_dir/<name>.o (in parallel); return the objects."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set NVCC or CUDA_HOME, or put nvcc on PATH)")
    archs = list(archs or archs_from_env())
    build_dir.mkdir(parents=True, exist_ok=True)
    jobs = jobs or max(1, min(len(sources()), os.cpu_count() or 1))
    objects = [build_dir / (src.stem + ".o") for src in sources()]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_run, compile_command(nvcc, src, obj, archs), verbose)
                   for src, obj in zip(sources(), objects)]
        for f in futures:
            f.result()
    return objects


def link(objects: Sequence[Path], output: Path, nvcc: Optional[str] = None,
         archs: Optional[Sequence[str]] = None, verbose: bool = False) -> Path:
    """Link objects into the shared library `output` (written atomically)."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set NVCC or CUDA_HOME, or put nvcc on PATH)")
    archs = list(archs or archs_from_env())
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        _run(link_command(nvcc, objects, tmp, archs), verbose)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            tmp.unlink()
    return output


def build(output: Path = DEFAULT_OUTPUT, nvcc: Optional[str] = None,
          archs: Optional[Sequence[str]] = None, jobs: int = 0, verbose: bool = False) -> Path:
    """Compile and link the library to `output`; return its path."""
    with tempfile.TemporaryDirectory(prefix="nashkern-cuda-") as tmp:
        objects = compile_objects(Path(tmp), nvcc, archs, jobs, verbose)
        return link(objects, Path(output), nvcc, archs, verbose)


def source_digest(archs: Optional[Sequence[str]] = None, nvcc: Optional[str] = None) -> str:
    """Hash of everything the library is built from (sources, headers, flags, nvcc path)."""
    h = hashlib.sha256()
    for p in sources() + headers() + [Path(__file__).resolve()]:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(repr((list(archs or archs_from_env()), nvcc or find_nvcc())).encode())
    return h.hexdigest()[:16]


def cached_library_path(cache_root: Optional[Path] = None,
                        archs: Optional[Sequence[str]] = None) -> Path:
    """Where :func:`build_cached` keeps the library built from the current sources."""
    root = Path(cache_root or tempfile.gettempdir())
    return root / f"nashkern-cuda-{source_digest(archs)}" / LIBRARY_NAME


def build_cached(cache_root: Optional[Path] = None, archs: Optional[Sequence[str]] = None,
                 jobs: int = 0) -> Path:
    """The library built from the current sources, in a digest-named cache directory: built
    once, then reused (tests in parallel workers wait for one build under a file lock)."""
    import fcntl

    out = cached_library_path(cache_root, archs)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not out.exists():
                build(out, archs=archs, jobs=jobs)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


def publish_cached(library: Path, cache_root: Optional[Path] = None,
                   archs: Optional[Sequence[str]] = None) -> Path:
    """Copy a library just built from the current sources into the cache of
    :func:`build_cached` (atomically; a no-op when one is there already)."""
    out = cached_library_path(cache_root, archs)
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        shutil.copyfile(library, tmp)
        os.replace(tmp, out)
    return out


def exported_symbols() -> List[str]:
    """The functions the header declares (every one must be exported by the library)."""
    import re

    text = HEADER.read_text()
    return sorted(set(re.findall(r"NASHKERN_API\s+[\w\s\*]*?\b(nashkern_\w+)\s*\(", text)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", "-o", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--archs", default=None, help='e.g. "80;90" (NASHKERN_CUDA_ARCHS)')
    parser.add_argument("--jobs", "-j", type=int, default=0)
    parser.add_argument("--quiet", "-q", action="store_true")
    args = parser.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("build_cuda: nvcc not found (set NVCC or CUDA_HOME, or put nvcc on PATH)",
              file=sys.stderr)
        return 1
    archs = archs_from_env(args.archs)
    out = build(args.output, nvcc, archs, args.jobs, verbose=not args.quiet)
    print(f"build_cuda: wrote {out} (sm_{', sm_'.join(archs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
