"""``torch.library`` custom ops, their fake (meta) implementations, autograd and backend dispatch.

Every public op in :mod:`nashkern.ops` funnels into one of three custom ops:

* ``nashkern::token_stats``        logits ``[G, R, V]`` -> (stats ``[5, N]``, lse ``[3, N]``)
* ``nashkern::linear_token_stats`` hidden ``[N, D]`` @ weight ``[V, D]``.T -> (stats, lse)
* ``nashkern::mixture_sample``     logits ``[B, V]`` -> int64 ``[B]``

plus one backward op for each of the first two. Being opaque custom ops with fake
implementations, they trace under ``torch.compile`` without graph breaks. Backends implement the
plain functions described in DESIGN.md; this module picks them by name.
"""
from __future__ import annotations

import importlib
import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .backends import chunked, torch_impl
from .types import NUM_LSE, NUM_STATS

BACKENDS = ("auto", "torch", "triton", "cuda")
#: Strategies of ``linear_token_stats`` (DESIGN.md, "Cost model"): "fused" streams logit tiles
#: through one kernel (the memory floor; the torch backend's own row-block x vocabulary-tile
#: loop), "chunked" runs cuBLAS GEMMs into a budgeted [C, V] buffer plus the backend's
#: logits-input kernels (nashkern/backends/chunked.py).
STRATEGIES = ("auto", "chunked", "fused")
_TRITON_MODULES = {
    "token_stats": "nashkern.kernels.token_stats",
    "linear_token_stats": "nashkern.kernels.linear_token_stats",
    "mixture_sample": "nashkern.kernels.mixture_sample",
}


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _cuda_extension():
    """The CUDA backend module (``nashkern.backends.cuda_impl``, a ctypes binding of the kernels
    built from ``csrc/`` into ``nashkern/_nashkern_cuda.so``) when that library loads, torch has
    CUDA and the kernels load on the current device; None otherwise (never raises)."""
    try:
        from .backends import cuda_impl
        return cuda_impl if cuda_impl.available() else None
    except Exception:  # a broken build must not break `import nashkern` or other backends
        return None


def _cuda_unavailable_reason() -> str:
    try:
        from .backends import cuda_impl
        return cuda_impl.unavailable_reason() or "unknown reason"
    except Exception as e:  # pragma: no cover - defensive
        return f"{type(e).__name__}: {e}"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a user's ``backend`` argument to the concrete backend for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            if _cuda_extension() is not None:
                return "cuda"
            if _triton_available():
                return "triton"
        return "torch"
    if backend == "triton":
        if not _triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton)")
        interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if device.type != "cuda" and not interpreted:
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device.type}); on the CPU set "
                "TRITON_INTERPRET=1 before importing nashkern to run the Triton interpreter"
            )
    if backend == "cuda":
        if _cuda_extension() is None:
            raise ValueError(
                "backend='cuda' needs the CUDA kernels of csrc/ (nashkern/_nashkern_cuda.so), "
                "which are not usable here: "
                f"{_cuda_unavailable_reason()}. Build it with nvcc and a CUDA-enabled torch: "
                "NASHKERN_BUILD_CUDA=1 pip install -e . or make cuda "
                "(or use backend='triton' / 'torch')"
            )
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got {device.type}")
    return backend


def resolve_strategy(strategy: str, backend: str, device: torch.device) -> str:
    """Map a user's ``strategy`` for ``linear_token_stats`` to "chunked" or "fused" for the
    concrete ``backend``. "auto": chunked on CUDA devices (tensor-core GEMMs by cuBLAS; the
    CUDA backend has no fused kernel), fused elsewhere: on the CPU the torch backend's own
    512-row x 2048-column tiles were faster than [C, V] chunks and hold less memory (measured,
    1 thread CPU time, D=896, V=151936, fp32 log-probs fwd+bwd, N=512: 7.7 s vs 9.4 s, eager
    6.3 s; a shared machine, DESIGN.md)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "auto":
        return "chunked" if device.type == "cuda" or backend == "cuda" else "fused"
    if strategy == "fused" and backend == "cuda":
        raise ValueError("backend='cuda' implements linear_token_stats with strategy='chunked' "
                         "only (cuBLAS GEMMs + its logits kernels); use strategy='chunked' or "
                         "'auto', or backend='triton' for the fused kernel")
    return strategy


def _linear_impl(backend: str, strategy: str, name: str):
    """The ``linear_token_stats`` backend function ``name`` of a strategy."""
    if strategy == "chunked":
        return getattr(chunked.implementation(backend), name)
    return _impl(backend, "linear_token_stats", name)


def _impl(backend: str, family: str, name: str):
    """The backend function ``name`` of an op ``family`` ('token_stats', ...)."""
    if backend == "torch":
        return getattr(torch_impl, name)
    if backend == "triton":
        return getattr(importlib.import_module(_TRITON_MODULES[family]), name)
    if backend == "cuda":
        return getattr(_cuda_extension(), name)
    raise ValueError(f"unknown backend {backend!r}")


def _empty(like: Tensor) -> Tensor:
    """Placeholder for an absent output (custom ops cannot return None)."""
    return like.new_empty(0)


# ----------------------------------------------------------------------------------------------
# Token statistics over logits
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("nashkern::token_stats", mutates_args=())
def token_stats(
    logits: Tensor, targets: Optional[Tensor], ref_logits: Optional[Tensor], coef: Optional[float],
    temperature: float, softcap: Optional[float], ignore_index: int, backend: str,
) -> Tuple[Tensor, Tensor]:
    """logits/ref_logits ``[G, R, V]``, targets ``[N]`` -> (stats ``[5, N]``, lse ``[3, N]``)."""
    if logits.shape[0] * logits.shape[1] == 0:
        backend = "torch"  # nothing to launch; the torch path returns empty results
    fn = _impl(backend, "token_stats", "token_stats_forward")
    return fn(logits, targets, ref_logits, coef=coef, temperature=temperature, softcap=softcap,
              ignore_index=ignore_index)


@token_stats.register_fake
def _(logits, targets, ref_logits, coef, temperature, softcap, ignore_index, backend):
    n = logits.shape[0] * logits.shape[1]
    return (logits.new_empty((NUM_STATS, n), dtype=torch.float32),
            logits.new_empty((NUM_LSE, n), dtype=torch.float32))


@torch.library.custom_op("nashkern::token_stats_backward", mutates_args=())
def token_stats_backward(
    grad_stats: Tensor, logits: Tensor, targets: Optional[Tensor], ref_logits: Optional[Tensor],
    stats: Tensor, lse: Tensor, coef: Optional[float], temperature: float,
    softcap: Optional[float], ignore_index: int, backend: str, needs_grad_logits: bool,
    needs_grad_ref: bool,
) -> Tuple[Tensor, Tensor]:
    """-> (grad_logits ``[G, R, V]`` or empty, grad_ref_logits or empty)."""
    if logits.shape[0] * logits.shape[1] == 0:
        backend = "torch"
    fn = _impl(backend, "token_stats", "token_stats_backward")
    d_logits, d_ref = fn(
        grad_stats, logits, targets, ref_logits, stats, lse, coef=coef, temperature=temperature,
        softcap=softcap, ignore_index=ignore_index, needs_grad_logits=needs_grad_logits,
        needs_grad_ref=needs_grad_ref,
    )
    return (_empty(logits) if d_logits is None else d_logits,
            _empty(logits) if d_ref is None else d_ref)


@token_stats_backward.register_fake
def _(grad_stats, logits, targets, ref_logits, stats, lse, coef, temperature, softcap,
      ignore_index, backend, needs_grad_logits, needs_grad_ref):
    d_logits = logits.new_empty(logits.shape) if needs_grad_logits else _empty(logits)
    d_ref = (ref_logits.new_empty(ref_logits.shape)
             if needs_grad_ref and ref_logits is not None else _empty(logits))
    return d_logits, d_ref


def _token_stats_setup(ctx, inputs, output):
    logits, targets, ref_logits, coef, temperature, softcap, ignore_index, backend = inputs
    stats, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, targets, ref_logits, stats, lse)
    ctx.params = (coef, temperature, softcap, ignore_index, backend)


def _token_stats_backward(ctx, grad_stats, grad_lse):
    logits, targets, ref_logits, stats, lse = ctx.saved_tensors
    coef, temperature, softcap, ignore_index, backend = ctx.params
    need_logits, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    d_logits, d_ref = token_stats_backward(
        grad_stats.contiguous(), logits, targets, ref_logits, stats, lse, coef, temperature,
        softcap, ignore_index, backend, need_logits, need_ref and ref_logits is not None,
    )
    return (d_logits if need_logits else None, None,
            d_ref if need_ref and ref_logits is not None else None,
            None, None, None, None, None)


token_stats.register_autograd(_token_stats_backward, setup_context=_token_stats_setup)


# ----------------------------------------------------------------------------------------------
# Token statistics from hidden states and the lm_head weight
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("nashkern::linear_token_stats", mutates_args=())
def linear_token_stats(
    hidden: Tensor, weight: Tensor, targets: Optional[Tensor], bias: Optional[Tensor],
    ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor], ref_bias: Optional[Tensor],
    coef: Optional[float], temperature: float, softcap: Optional[float], ignore_index: int,
    backend: str, strategy: str = "fused",
) -> Tuple[Tensor, Tensor]:
    """hidden ``[N, D]``, weight ``[V, D]`` -> (stats ``[5, N]``, lse ``[3, N]``)."""
    if hidden.shape[0] == 0:
        backend, strategy = "torch", "fused"
    fn = _linear_impl(backend, strategy, "linear_token_stats_forward")
    return fn(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, coef=coef,
              temperature=temperature, softcap=softcap, ignore_index=ignore_index)


@linear_token_stats.register_fake
def _(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, coef, temperature, softcap,
      ignore_index, backend, strategy="fused"):
    n = hidden.shape[0]
    return (hidden.new_empty((NUM_STATS, n), dtype=torch.float32),
            hidden.new_empty((NUM_LSE, n), dtype=torch.float32))


_LINEAR_GRAD_INPUTS = (0, 1, 3, 4, 5, 6)  # hidden, weight, bias, ref_hidden, ref_weight, ref_bias


@torch.library.custom_op("nashkern::linear_token_stats_backward", mutates_args=())
def linear_token_stats_backward(
    grad_stats: Tensor, hidden: Tensor, weight: Tensor, targets: Optional[Tensor],
    bias: Optional[Tensor], ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor],
    ref_bias: Optional[Tensor], stats: Tensor, lse: Tensor, coef: Optional[float],
    temperature: float, softcap: Optional[float], ignore_index: int, backend: str,
    needs_input_grad: List[bool], strategy: str = "fused",
) -> List[Tensor]:
    """-> [d_hidden, d_weight, d_bias, d_ref_hidden, d_ref_weight, d_ref_bias] (empty if absent)."""
    if hidden.shape[0] == 0:
        backend, strategy = "torch", "fused"
    fn = _linear_impl(backend, strategy, "linear_token_stats_backward")
    grads = fn(
        grad_stats, hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, stats, lse,
        coef=coef, temperature=temperature, softcap=softcap, ignore_index=ignore_index,
        needs_input_grad=tuple(needs_input_grad),
    )
    return [_empty(hidden) if g is None else g for g in grads]


@linear_token_stats_backward.register_fake
def _(grad_stats, hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, stats, lse,
      coef, temperature, softcap, ignore_index, backend, needs_input_grad, strategy="fused"):
    inputs = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    return [x.new_empty(x.shape) if need and x is not None else _empty(hidden)
            for x, need in zip(inputs, needs_input_grad)]


def _linear_setup(ctx, inputs, output):
    (hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, coef, temperature, softcap,
     ignore_index, backend, strategy) = inputs
    stats, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, stats, lse)
    ctx.params = (coef, temperature, softcap, ignore_index, backend, strategy)


def _linear_backward(ctx, grad_stats, grad_lse):
    hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, stats, lse = ctx.saved_tensors
    coef, temperature, softcap, ignore_index, backend, strategy = ctx.params
    inputs = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    needs = [bool(ctx.needs_input_grad[i]) and x is not None
             for i, x in zip(_LINEAR_GRAD_INPUTS, inputs)]
    grads = linear_token_stats_backward(
        grad_stats.contiguous(), hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias,
        stats, lse, coef, temperature, softcap, ignore_index, backend, needs, strategy,
    )
    d = [g if need else None for g, need in zip(grads, needs)]
    return (d[0], d[1], None, d[2], d[3], d[4], d[5], None, None, None, None, None, None)


linear_token_stats.register_autograd(_linear_backward, setup_context=_linear_setup)


# ----------------------------------------------------------------------------------------------
# Sampling from the geometric mixture
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("nashkern::mixture_sample", mutates_args=())
def mixture_sample(
    logits: Tensor, ref_logits: Tensor, seed: Tensor, coef: float, temperature: float, backend: str,
) -> Tensor:
    """logits/ref_logits ``[B, V]``, seed int64 ``[1]`` drawn from the caller's generator -> int64 ``[B]``."""
    if logits.shape[0] == 0:
        return logits.new_empty(0, dtype=torch.long)
    if backend == "torch":
        # The torch path draws its uniforms from a generator seeded by `seed` (one host read).
        gen = torch.Generator(device=logits.device)
        gen.manual_seed(int(seed.item()))
        return torch_impl.mixture_sample(logits, ref_logits, coef=coef, temperature=temperature,
                                         generator=gen)
    fn = _impl(backend, "mixture_sample", "mixture_sample")
    return fn(logits, ref_logits, seed, coef=coef, temperature=temperature)


@mixture_sample.register_fake
def _(logits, ref_logits, seed, coef, temperature, backend):
    return logits.new_empty(logits.shape[0], dtype=torch.long)
