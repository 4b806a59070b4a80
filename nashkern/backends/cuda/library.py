"""CUDA backend (``backend="cuda"``): a ctypes binding of the kernels in ``csrc/``.

The kernels are plain CUDA C++ compiled by nvcc into ``nashkern/_nashkern_cuda.so`` (no torch
headers: ``NASHKERN_BUILD_CUDA=1 pip install -e .`` or ``make cuda``); their C interface is
``csrc/nashkern_cuda.h``. This module loads it and plans launches; ``token_stats.py`` and ``mixture_sample.py``
beside it implement the backend contract of DESIGN.md on top of it: check the arguments, allocate outputs (and the small split workspaces) with torch, pass raw
pointers, element strides, dtype codes and ``torch.cuda.current_stream().cuda_stream`` to the C
launcher, and turn a non-zero return code into an exception. Nothing here synchronises with the
host.

The library also carries a host emulation of every kernel (the same per-thread code, run block
by block on the CPU). Tensors on the CPU are routed to it, which is how the kernels' arithmetic is
tested on machines without a GPU (tests/ops/test_cuda_backend.py); it is slow and meant for tests.

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
ABI_VERSION = 2
LIBRARY_NAME = "_nashkern_cuda.so"
#: Where the build puts the library; ``NASHKERN_CUDA_LIB`` overrides it.
DEFAULT_LIBRARY_PATH = Path(__file__).resolve().parents[2] / LIBRARY_NAME
BUILD_HINT = "NASHKERN_BUILD_CUDA=1 pip install -e . (or make cuda)"

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

#: Plan of the host emulation (CPU tensors): the SM count its launch planning assumes, and
#: optional thread / split overrides (0 = planned). Tests change these to reach the split paths.
EMULATED_NUM_SMS = 4
PLAN_OVERRIDES = {"threads": 0, "splits": 0}
#: Tests set this: ``backend="cuda"`` then accepts CPU tensors and runs the host emulation
#: (``nashkern.ops.registry.resolve_backend``); False in normal use.
EMULATE_ON_CPU = False

_c_int, _c_ll, _c_ull, _c_double, _c_void_p = (
    ctypes.c_int, ctypes.c_longlong, ctypes.c_ulonglong, ctypes.c_double, ctypes.c_void_p)


class LaunchArgs(ctypes.Structure):
    """``NashkernLaunch`` (csrc/nashkern_cuda.h): where and how a call runs."""
    _fields_ = [("num_sms", _c_int), ("threads_override", _c_int), ("splits_override", _c_int),
                ("emulate", _c_int), ("device", _c_int), ("stream", _c_ull)]


class TokenStatsArgs(ctypes.Structure):
    """``NashkernTokenStatsArgs``: the arguments of the token_stats forward and backward."""
    _fields_ = [
        ("logits", _c_void_p), ("logits_dtype", _c_int), ("logits_stride_g", _c_ll),
        ("logits_stride_r", _c_ll),
        ("ref", _c_void_p), ("ref_dtype", _c_int), ("ref_stride_g", _c_ll),
        ("ref_stride_r", _c_ll),
        ("targets", _c_void_p), ("R", _c_ll), ("N", _c_ll), ("V", _c_ll),
        ("has_coef", _c_int), ("coef", _c_double), ("temperature", _c_double),
        ("has_softcap", _c_int), ("softcap", _c_double), ("ignore_index", _c_ll),
        ("stats", _c_void_p), ("lse", _c_void_p), ("workspace", _c_void_p),
        ("workspace_bytes", _c_ll), ("grad_stats", _c_void_p), ("grad_logits", _c_void_p),
        ("grad_ref", _c_void_p), ("launch", LaunchArgs),
    ]


class MixtureSampleArgs(ctypes.Structure):
    """``NashkernMixtureSampleArgs``: the arguments of the sampler."""
    _fields_ = [
        ("logits", _c_void_p), ("logits_dtype", _c_int), ("logits_stride", _c_ll),
        ("ref", _c_void_p), ("ref_dtype", _c_int), ("ref_stride", _c_ll),
        ("seed", _c_void_p), ("out", _c_void_p), ("workspace", _c_void_p),
        ("workspace_bytes", _c_ll), ("B", _c_ll), ("V", _c_ll), ("coef", _c_double),
        ("temperature", _c_double), ("launch", LaunchArgs),
    ]


_SIGNATURES = {
    "nashkern_abi_version": ([], _c_int),
    "nashkern_error_string": ([_c_int], ctypes.c_char_p),
    "nashkern_device_check": ([_c_int], _c_int),
    "nashkern_philox4x32_10": ([_c_void_p, _c_void_p, _c_void_p], None),
    "nashkern_token_stats_forward_workspace": ([_c_ll, _c_ll, _c_int, _c_int], _c_ll),
    "nashkern_token_stats_forward": ([ctypes.POINTER(TokenStatsArgs)], _c_int),
    "nashkern_token_stats_backward": ([ctypes.POINTER(TokenStatsArgs)], _c_int),
    "nashkern_mixture_sample_workspace": ([_c_ll, _c_ll, _c_int, _c_int], _c_ll),
    "nashkern_mixture_sample": ([ctypes.POINTER(MixtureSampleArgs)], _c_int),
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


def loaded() -> ctypes.CDLL:
    lib = load_library()
    if lib is None:
        raise RuntimeError(f"nashkern CUDA kernels unavailable: {_lib_error}")
    return lib


def _error_string(rc: int) -> str:
    return loaded().nashkern_error_string(rc).decode(errors="replace")


def check_rc(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"nashkern CUDA {what} failed: {_error_string(rc)}")


# ----------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------
class Launch:
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
            loaded()
            self.index = device.index if device.index is not None else torch.cuda.current_device()
            reason = _device_reason(self.index)
            if reason is not None:
                raise RuntimeError(f"nashkern CUDA kernels unavailable: {reason}")
            self.stream = torch.cuda.current_stream(self.index).cuda_stream
            self.num_sms = _num_sms(self.index)

    def args(self) -> LaunchArgs:
        """The call's ``NashkernLaunch`` (``emulate`` set for CPU tensors)."""
        return LaunchArgs(self.num_sms, self.threads, self.splits, int(self.emulate), self.index,
                          self.stream)

    def guard(self):
        """The launch's device guard (``kernels/layout.py: device_guard``): the C launcher
        also sets the device, this keeps torch's current device in step with it."""
        return layout.device_guard(self.device if self.emulate
                                   else torch.device("cuda", self.index))


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def ptr(x: Optional[torch.Tensor]) -> Optional[int]:
    return None if x is None else x.data_ptr()


# ----------------------------------------------------------------------------------------------
# Test hooks
# ----------------------------------------------------------------------------------------------
def philox4x32_10(ctr, key) -> Tuple[int, int, int, int]:
    """Philox4x32-10 of one counter block, computed by the library's code (known-answer tests)."""
    c = (ctypes.c_uint32 * 4)(*ctr)
    k = (ctypes.c_uint32 * 2)(*key)
    out = (ctypes.c_uint32 * 4)()
    loaded().nashkern_philox4x32_10(c, k, out)
    return tuple(out)
