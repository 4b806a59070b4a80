"""The CUDA kernels build without a GPU: every csrc/*.cu compiles with nvcc to an object, the
objects link into the shared library, and the library exports exactly the C interface of
csrc/nashkern_cuda.h (and hides the static CUDA runtime's symbols). Skipped when nvcc is missing.

The library's host-side pieces that need no GPU are checked here too: it loads with ctypes,
reports its ABI version and error strings, and its Philox4x32-10 matches the Random123
known-answer vectors. (The kernels' arithmetic, through their host emulation, is checked against
the float64 oracle in tests/ops/test_cuda_backend.py.)
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "csrc"))
import build_cuda  # noqa: E402  (csrc/build_cuda.py)

NVCC = build_cuda.find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")

# Random123 kat_vectors: philox4x32 10 <counter x4> <key x2> <expected x4>
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    ((0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff),
     (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
]


def _dynamic_symbols(lib: Path):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not found")
    out = subprocess.run([nm, "-D", "--defined-only", str(lib)], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def test_every_source_compiles_and_the_library_links(tmp_path):
    """One test (not a fixture shared by several) so that parallel workers compile once."""
    sources = build_cuda.sources()
    assert {p.name for p in sources} >= {"token_stats.cu", "mixture_sample.cu", "api.cu"}
    objects = build_cuda.compile_objects(tmp_path / "obj", NVCC)
    assert [o.stem for o in objects] == [s.stem for s in sources]
    for obj in objects:
        assert obj.is_file() and obj.stat().st_size > 0, obj
    lib = build_cuda.link(objects, tmp_path / build_cuda.LIBRARY_NAME, NVCC)
    assert lib.is_file()

    # Exactly the header's functions are exported; the static CUDA runtime stays hidden.
    declared = set(build_cuda.exported_symbols())
    assert len(declared) >= 9, declared  # 4 diagnostics + 3 token_stats + 2 sampler
    exported = _dynamic_symbols(lib)
    assert declared <= exported, f"declared but not exported: {sorted(declared - exported)}"
    ours = {s for s in exported if s.startswith("nashkern_")}
    assert ours == declared, f"exported but not declared: {sorted(ours - declared)}"
    leaked = {s for s in exported if s.startswith(("cuda", "__cuda"))}
    assert not leaked, f"CUDA runtime symbols exported: {sorted(leaked)[:10]}"

    # It loads without a GPU (the runtime is only initialised by a CUDA call).
    c = ctypes.CDLL(str(lib))
    assert c.nashkern_abi_version() == 2
    build_cuda.publish_cached(lib)  # tests/ops/test_cuda_backend.py can reuse this build


@pytest.fixture(scope="module")
def lib():
    return ctypes.CDLL(str(build_cuda.build_cached()))


def test_abi_version_matches_the_binding(lib):
    from nashkern.backends.cuda import library as cuda_lib
    header = build_cuda.HEADER.read_text()
    assert f"#define NASHKERN_CUDA_ABI_VERSION {cuda_lib.ABI_VERSION}" in header
    assert lib.nashkern_abi_version() == cuda_lib.ABI_VERSION


def test_error_strings(lib):
    lib.nashkern_error_string.restype = ctypes.c_char_p
    assert lib.nashkern_error_string(0) == b"success"
    assert b"dtype" in lib.nashkern_error_string(-1)
    assert b"workspace" in lib.nashkern_error_string(-5)
    # A cudaError_t is named by the runtime (cudaErrorInvalidValue = 1), no GPU needed.
    assert lib.nashkern_error_string(1).startswith(b"cudaErrorInvalidValue")


@pytest.mark.parametrize("ctr,key,expected", PHILOX_KAT)
def test_philox4x32_10_known_answers(lib, ctr, key, expected):
    c = (ctypes.c_uint32 * 4)(*ctr)
    k = (ctypes.c_uint32 * 2)(*key)
    out = (ctypes.c_uint32 * 4)()
    lib.nashkern_philox4x32_10(c, k, out)
    assert tuple(out) == expected


def test_workspace_plans(lib):
    """Few rows are split (workspace = 32 bytes per row and split), many rows are not."""
    f = lib.nashkern_token_stats_forward_workspace
    f.restype = ctypes.c_longlong
    f.argtypes = [ctypes.c_longlong, ctypes.c_longlong, ctypes.c_int, ctypes.c_int]
    assert f(16384, 151936, 132, 0) == 0
    small = f(4, 151936, 132, 0)
    assert small > 0 and small % (32 * 4) == 0
    assert f(4, 257, 132, 0) == 0      # too narrow to split
    assert f(4, 257, 132, 3) == 32 * 4 * 3  # forced
    g = lib.nashkern_mixture_sample_workspace
    g.restype = ctypes.c_longlong
    g.argtypes = f.argtypes
    assert g(64, 151936, 132, 0) > 0
    assert g(4096, 151936, 132, 0) == 0
