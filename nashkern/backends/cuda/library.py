"""CUDA backend (``backend="cuda"``): a ctypes binding of the kernels in ``csrc/``.

The kernels are plain CUDA C++ compiled by nvcc into ``nashkern/_nashkern_cuda.so`` (no torch
headers: ``NASHKERN_BUILD_CUDA=1 pip install -e .`` or ``make cuda``); their C interface is
``csrc/nashkern_cuda.h``. This module implements the backend contract of DESIGN.md on top of it:
check the arguments, allocate outputs (and the small split workspaces) with torch, pass raw
pointers, element strides, dtype codes and ``torch.cuda.current_stream().cuda_stream`` to the C
launcher, and turn a non-zero return code into an exception. Nothing here synchronises with the
host.

The library also carries a host emulation of every kernel (the same per-thread code, run block
by block on the CPU). Tensors on the CPU are routed to it, which is how the kernels' arithmetic is
tested on machines without a GPU (tests/test_cuda_backend.py); it is slow and meant for tests.

``available()`` says whether the backend can run here (the library loads, torch has CUDA, and the
kernels load on the current device); ``unavailable_reason()`` says why not.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ...kernels import layout
from ...kernels.layout import NUM_LSE, NUM_STATS

#: ``csrc/nashkern_cuda.h``: NASHKERN_CUDA_ABI_VERSION.
ABI_VERSION = 1
LIBRARY_NAME = "_nashkern_cuda.so"
#: Where the build puts the library; ``NASHKERN_CUDA_LIB`` overrides it.
DEFAULT_LIBRARY_PATH = Path(__file__).resolve().parents[2] / LIBRARY_NAME
BUILD_HINT = "NASHKERN_BUILD_CUDA=1 pip install -e . (or make cuda)"

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

#: Plan of the host emulation (CPU tensors): the SM count its launch planning assumes, and
#: optional thread / split overrides (0 = planned). Tests change these to reach the split paths.
EMULATED_NUM_SMS = 4
PLAN_OVERRIDES = {"threads": 0, "splits": 0}
#: Tests set this: ``backend="cuda"`` then accepts CPU tensors and runs the host emulation
#: (``nashkern.ops.registry.resolve_backend``); False in normal use.
EMULATE_ON_CPU = False

_c_int, _c_ll, _c_ull, _c_double, _c_void_p = (
    ctypes.c_int, ctypes.c_longlong, ctypes.c_ulonglong, ctypes.c_double, ctypes.c_void_p)
_FWD_ARGS = [
    _c_void_p, _c_int, _c_ll, _c_ll,     # logits, dtype, stride_g, stride_r
    _c_void_p, _c_int, _c_ll, _c_ll,     # ref, dtype, stride_g, stride_r
    _c_void_p, _c_void_p, _c_void_p,     # targets, stats, lse
    _c_void_p, _c_ll,                    # workspace, workspace_bytes
    _c_ll, _c_ll, _c_ll,                 # R, N, V
    _c_int, _c_double, _c_double,        # has_coef, coef, temperature
    _c_int, _c_double, _c_ll,            # has_softcap, softcap, ignore_index
    _c_int, _c_int, _c_int,              # num_sms, threads_override, splits_override
    _c_int, _c_ull,                      # device, stream
]
_BWD_ARGS = [
    _c_void_p,                           # grad_stats
    _c_void_p, _c_int, _c_ll, _c_ll,     # logits, dtype, stride_g, stride_r
    _c_void_p, _c_int, _c_ll, _c_ll,     # ref, dtype, stride_g, stride_r
    _c_void_p, _c_void_p, _c_void_p,     # targets, stats, lse
    _c_void_p, _c_void_p,                # grad_logits, grad_ref
    _c_ll, _c_ll, _c_ll,                 # R, N, V
    _c_int, _c_double, _c_double,        # has_coef, coef, temperature
    _c_int, _c_double, _c_ll,            # has_softcap, softcap, ignore_index
    _c_int, _c_int, _c_ull,              # threads_override, device, stream
]
_SAMPLE_ARGS = [
    _c_void_p, _c_int, _c_ll,            # logits, dtype, row stride
    _c_void_p, _c_int, _c_ll,            # ref, dtype, row stride
    _c_void_p, _c_void_p,                # seed, out
    _c_void_p, _c_ll,                    # workspace, workspace_bytes
    _c_ll, _c_ll, _c_double, _c_double,  # B, V, coef, temperature
    _c_int, _c_int, _c_int,              # num_sms, threads_override, splits_override
    _c_int, _c_ull,                      # device, stream
]
_SIGNATURES = {
    "nashkern_abi_version": ([], _c_int),
    "nashkern_error_string": ([_c_int], ctypes.c_char_p),
    "nashkern_device_check": ([_c_int], _c_int),
    "nashkern_philox4x32_10": ([_c_void_p, _c_void_p, _c_void_p], None),
    "nashkern_token_stats_forward_workspace": ([_c_ll, _c_ll, _c_int, _c_int], _c_ll),
    "nashkern_token_stats_forward": (_FWD_ARGS, _c_int),
    "nashkern_emu_token_stats_forward": (_FWD_ARGS, _c_int),
    "nashkern_token_stats_backward": (_BWD_ARGS, _c_int),
    "nashkern_emu_token_stats_backward": (_BWD_ARGS, _c_int),
    "nashkern_mixture_sample_workspace": ([_c_ll, _c_ll, _c_int, _c_int], _c_ll),
    "nashkern_mixture_sample": (_SAMPLE_ARGS, _c_int),
    "nashkern_emu_mixture_sample": (_SAMPLE_ARGS, _c_int),
}

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_lib_error: Optional[str] = None
_lib_loaded = False
_device_ok: Dict[int, Optional[str]] = {}  # device index -> None (usable) or the reason not


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def library_path() -> Path:
    return Path(os.environ.get("NASHKERN_CUDA_LIB") or DEFAULT_LIBRARY_PATH)


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, (argtypes, restype) in _SIGNATURES.items():
        fn = getattr(lib, name)  # AttributeError: an old or foreign library
        fn.argtypes = argtypes
        fn.restype = restype
    version = lib.nashkern_abi_version()
    if version != ABI_VERSION:
        raise OSError(f"{path} has ABI version {version}, this nashkern needs {ABI_VERSION}; "
                      f"rebuild it: {BUILD_HINT}")
    return lib


def load_library(path: Optional[os.PathLike] = None) -> Optional[ctypes.CDLL]:
    """The loaded library (loading it on first use), or None (see :func:`unavailable_reason`).
    With ``path``, (re)load that file instead, e.g. a build made by the tests."""
    global _lib, _lib_error, _lib_loaded
    with _lock:
        if path is None and _lib_loaded:
            return _lib
        target = Path(path) if path is not None else library_path()
        _device_ok.clear()
        if not target.is_file():
            _lib, _lib_error = None, f"{target} is not built"
        else:
            try:
                _lib, _lib_error = _open(target), None
            except (OSError, AttributeError) as e:
                _lib, _lib_error = None, f"cannot load {target}: {e}"
        _lib_loaded = True
        return _lib


@contextlib.contextmanager
def use_library(path: os.PathLike):
    """Within the block, the backend uses the library at ``path`` (e.g. one the tests just
    built); the previous state is restored afterwards."""
    global _lib, _lib_error, _lib_loaded
    with _lock:
        saved = (_lib, _lib_error, _lib_loaded, dict(_device_ok))
    try:
        yield load_library(path)
    finally:
        with _lock:
            _lib, _lib_error, _lib_loaded = saved[:3]
            _device_ok.clear()
            _device_ok.update(saved[3])


def _device_reason(device: int) -> Optional[str]:
    """None when the kernels run on CUDA device ``device``, else why not (cached)."""
    if device not in _device_ok:
        rc = _lib.nashkern_device_check(device)
        _device_ok[device] = None if rc == 0 else (
            f"the kernels cannot run on cuda:{device}: {_error_string(rc)} (a driver older than "
            "the CUDA toolkit that built the library, or an architecture not in "
            "NASHKERN_CUDA_ARCHS?)")
    return _device_ok[device]


def unavailable_reason() -> Optional[str]:
    """None when ``backend="cuda"`` can run here, else a sentence saying why not."""
    if load_library() is None:
        return _lib_error
    if not torch.cuda.is_available():
        return "torch has no CUDA device here (a CPU-only torch build, or no GPU)"
    return _device_reason(torch.cuda.current_device())


def available() -> bool:
    return unavailable_reason() is None


def _library() -> ctypes.CDLL:
    lib = load_library()
    if lib is None:
        raise RuntimeError(f"nashkern CUDA kernels unavailable: {_lib_error}")
    return lib


def _error_string(rc: int) -> str:
    return _library().nashkern_error_string(rc).decode(errors="replace")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"nashkern CUDA {what} failed: {_error_string(rc)}")


# ----------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------
class _Launch:
    """Where and how a call runs: the device kernels on a CUDA tensor's device and current
    stream, or the host emulation for CPU tensors."""

    def __init__(self, device: torch.device):
        self.device = device
        self.emulate = device.type == "cpu"
        if not self.emulate and device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA (or, for the emulation, CPU) tensors, "
                             f"got {device.type}")
        self.threads, self.splits = PLAN_OVERRIDES["threads"], PLAN_OVERRIDES["splits"]
        if self.emulate:
            self.index, self.stream, self.num_sms = 0, 0, EMULATED_NUM_SMS
        else:
            _library()
            self.index = device.index if device.index is not None else torch.cuda.current_device()
            reason = _device_reason(self.index)
            if reason is not None:
                raise RuntimeError(f"nashkern CUDA kernels unavailable: {reason}")
            self.stream = torch.cuda.current_stream(self.index).cuda_stream
            self.num_sms = _num_sms(self.index)

    def fn(self, name: str):
        return getattr(_library(), f"nashkern_emu_{name}" if self.emulate else f"nashkern_{name}")

    def guard(self):
        """The launch's device guard (``kernels/layout.py: device_guard``): the C launcher
        also sets the device, this keeps torch's current device in step with it."""
        return layout.device_guard(self.device if self.emulate
                                   else torch.device("cuda", self.index))


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _ptr(x: Optional[torch.Tensor]) -> Optional[int]:
    return None if x is None else x.data_ptr()


def _rows_3d(x: torch.Tensor) -> Tuple[int, int]:
    """(stride_g, stride_r) of a [G, R, V] view in elements."""
    return x.stride(0), x.stride(1)


# ----------------------------------------------------------------------------------------------
# Token statistics over logits (contract: DESIGN.md)
# ----------------------------------------------------------------------------------------------
def _scalar_args(coef, temperature, softcap, ignore_index):
    return (int(coef is not None), float(coef or 0.0), float(temperature),
            int(softcap is not None), float(softcap or 0.0), int(ignore_index))


def _ref_args(ref_logits, logits):
    if ref_logits is None:
        return None, _DTYPE_CODES[logits.dtype], 0, 0
    return (ref_logits.data_ptr(), _DTYPE_CODES[ref_logits.dtype], *_rows_3d(ref_logits))


def token_stats_forward(logits, targets, ref_logits, *, coef, temperature, softcap, ignore_index):
    """stats ``[5, N]`` and lse ``[3, N]`` (float32) of ``[G, R, V]`` logits."""
    layout.check_token_stats_inputs(logits, targets, ref_logits, coef)
    G, R, V = logits.shape
    N = G * R
    launch = _Launch(logits.device)
    stats = torch.empty((NUM_STATS, N), dtype=torch.float32, device=logits.device)
    lse = torch.empty((NUM_LSE, N), dtype=torch.float32, device=logits.device)
    ws_bytes = _library().nashkern_token_stats_forward_workspace(N, V, launch.num_sms,
                                                                 launch.splits)
    workspace = (torch.empty(ws_bytes, dtype=torch.uint8, device=logits.device)
                 if ws_bytes > 0 else None)
    with launch.guard():
        rc = launch.fn("token_stats_forward")(
            logits.data_ptr(), _DTYPE_CODES[logits.dtype], *_rows_3d(logits),
            *_ref_args(ref_logits, logits), _ptr(targets), stats.data_ptr(), lse.data_ptr(),
            _ptr(workspace), ws_bytes, R, N, V,
            *_scalar_args(coef, temperature, softcap, ignore_index),
            launch.num_sms, launch.threads, launch.splits, launch.index, launch.stream)
    _check(rc, "token_stats_forward")
    return stats, lse


def token_stats_backward(grad_stats, logits, targets, ref_logits, stats, lse, *, coef,
                         temperature, softcap, ignore_index, needs_grad_logits, needs_grad_ref,
                         out=None):
    """(grad_logits, grad_ref_logits): contiguous ``[G, R, V]`` in the inputs' dtypes, or None.
    ``out``: optional destinations, possibly the inputs themselves (each thread reads its
    columns before writing their gradients)."""
    layout.check_token_stats_inputs(logits, targets, ref_logits, coef)
    G, R, V = logits.shape
    N = G * R
    needs_grad_ref = bool(needs_grad_ref) and ref_logits is not None
    if not (needs_grad_logits or needs_grad_ref):
        return None, None
    for name, x, rows in (("grad_stats", grad_stats, NUM_STATS), ("stats", stats, NUM_STATS),
                          ("lse", lse, NUM_LSE)):
        if x.shape != (rows, N) or x.device != logits.device:
            raise ValueError(f"{name} must be a [{rows}, {N}] tensor on the logits' device")
    grad_stats = grad_stats.to(torch.float32).contiguous()
    stats = stats.to(torch.float32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    grad_logits, grad_ref = layout.grad_outputs(logits, ref_logits, needs_grad_logits,
                                                needs_grad_ref, out)
    launch = _Launch(logits.device)
    with launch.guard():
        rc = launch.fn("token_stats_backward")(
            grad_stats.data_ptr(), logits.data_ptr(), _DTYPE_CODES[logits.dtype],
            *_rows_3d(logits), *_ref_args(ref_logits, logits), _ptr(targets),
            stats.data_ptr(), lse.data_ptr(), _ptr(grad_logits), _ptr(grad_ref), R, N, V,
            *_scalar_args(coef, temperature, softcap, ignore_index),
            launch.threads, launch.index, launch.stream)
    _check(rc, "token_stats_backward")
    return grad_logits, grad_ref


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def mixture_sample(logits, ref_logits, seed, *, coef, temperature):
    """Gumbel-max sample of each row of mix(z / T, r / T, coef): ``[B, V]`` -> int64 ``[B]``
    (-1 for rows with no finite mixture logit or with a NaN). ``seed``: int64 ``[1]`` on the
    logits' device, read by the kernel (no host synchronisation)."""
    layout.check_logits_view("logits", logits, 2)
    layout.check_logits_view("ref_logits", ref_logits, 2)
    if ref_logits.shape != logits.shape or ref_logits.device != logits.device:
        raise ValueError("ref_logits must match logits in shape and device")
    if (seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != logits.device):
        raise ValueError("seed must be an int64 tensor of one element on the logits' device")
    seed = seed.reshape(1).contiguous()
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    launch = _Launch(logits.device)
    ws_bytes = _library().nashkern_mixture_sample_workspace(B, V, launch.num_sms, launch.splits)
    workspace = (torch.empty(ws_bytes, dtype=torch.uint8, device=logits.device)
                 if ws_bytes > 0 else None)
    with launch.guard():
        rc = launch.fn("mixture_sample")(
            logits.data_ptr(), _DTYPE_CODES[logits.dtype], logits.stride(0),
            ref_logits.data_ptr(), _DTYPE_CODES[ref_logits.dtype], ref_logits.stride(0),
            seed.data_ptr(), out.data_ptr(), _ptr(workspace), ws_bytes, B, V, float(coef),
            float(temperature), launch.num_sms, launch.threads, launch.splits, launch.index,
            launch.stream)
    _check(rc, "mixture_sample")
    return out


# ----------------------------------------------------------------------------------------------
# Test hooks
# ----------------------------------------------------------------------------------------------
def philox4x32_10(ctr, key) -> Tuple[int, int, int, int]:
    """Philox4x32-10 of one counter block, computed by the library's code (known-answer tests)."""
    c = (ctypes.c_uint32 * 4)(*ctr)
    k = (ctypes.c_uint32 * 2)(*key)
    out = (ctypes.c_uint32 * 4)()
    _library().nashkern_philox4x32_10(c, k, out)
    return tuple(out)
