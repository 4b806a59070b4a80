"""Op family ``token_stats``: per-token statistics over logits ``[..., V]``.

Public ops: :func:`token_stats`, :func:`logprobs`, :func:`entropy`, :func:`kl`,
:func:`mixture_logprobs`. All of them funnel into the custom op ``nashkern::token_stats``
(logits ``[G, R, V]`` -> ``stats [5, N]``, ``lse [3, N]``) and its backward op; :data:`FAMILY`
declares which backend implements them with which function.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..backends.cuda import token_stats as cuda_token_stats
from ..backends.torch import token_stats as torch_token_stats
from ..kernels.layout import NUM_LSE, NUM_STATS
from ..types import TokenStats
from .checks import check_float, check_same_device, check_targets, unpack_stats
from .registry import (
    Family, Implementation, Scalars, double_backward_unsupported, empty_like_nothing,
    resolve_backend, _no_context,
)

try:
    from ..kernels import token_stats as triton_token_stats
except ImportError:  # triton is optional
    triton_token_stats = None


# ----------------------------------------------------------------------------------------------
# Custom ops: schema, fake implementation, autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("nashkern::token_stats", mutates_args=())
def token_stats_op(
    logits: Tensor, targets: Optional[Tensor], ref_logits: Optional[Tensor], coef: Optional[float],
    temperature: float, softcap: Optional[float], ignore_index: int, backend: str,
) -> Tuple[Tensor, Tensor]:
    """logits/ref_logits ``[G, R, V]``, targets ``[N]`` -> (stats ``[5, N]``, lse ``[3, N]``)."""
    if logits.shape[0] * logits.shape[1] == 0:
        backend = "torch"  # nothing to launch; the torch path returns empty results
    impl = FAMILY.implementation(backend)
    return impl.launch("forward", logits.device, _dims(logits), logits, targets, ref_logits,
                       Scalars(coef, temperature, softcap, ignore_index))


def _dims(logits: Tensor):
    """The autotuning shape key of a launch (:meth:`Implementation.launch`)."""
    return dict(N=logits.shape[0] * logits.shape[1], V=logits.shape[2])


@token_stats_op.register_fake
def _(logits, targets, ref_logits, coef, temperature, softcap, ignore_index, backend):
    n = logits.shape[0] * logits.shape[1]
    return (logits.new_empty((NUM_STATS, n), dtype=torch.float32),
            logits.new_empty((NUM_LSE, n), dtype=torch.float32))


@torch.library.custom_op("nashkern::token_stats_backward", mutates_args=())
def token_stats_backward_op(
    grad_stats: Tensor, logits: Tensor, targets: Optional[Tensor], ref_logits: Optional[Tensor],
    stats: Tensor, lse: Tensor, coef: Optional[float], temperature: float,
    softcap: Optional[float], ignore_index: int, backend: str, needs_grad_logits: bool,
    needs_grad_ref: bool,
) -> Tuple[Tensor, Tensor]:
    """-> (grad_logits ``[G, R, V]`` or empty, grad_ref_logits or empty)."""
    if logits.shape[0] * logits.shape[1] == 0:
        backend = "torch"
    impl = FAMILY.implementation(backend)
    d_logits, d_ref = impl.launch(
        "backward", logits.device, _dims(logits), grad_stats, logits, targets, ref_logits, stats,
        lse, Scalars(coef, temperature, softcap, ignore_index),
        needs_grad_logits=needs_grad_logits, needs_grad_ref=needs_grad_ref,
    )
    return (empty_like_nothing(logits) if d_logits is None else d_logits,
            empty_like_nothing(logits) if d_ref is None else d_ref)


@token_stats_backward_op.register_fake
def _(grad_stats, logits, targets, ref_logits, stats, lse, coef, temperature, softcap,
      ignore_index, backend, needs_grad_logits, needs_grad_ref):
    d_logits = logits.new_empty(logits.shape) if needs_grad_logits else empty_like_nothing(logits)
    d_ref = (ref_logits.new_empty(ref_logits.shape)
             if needs_grad_ref and ref_logits is not None else empty_like_nothing(logits))
    return d_logits, d_ref


def _setup_context(ctx, inputs, output):
    logits, targets, ref_logits, coef, temperature, softcap, ignore_index, backend = inputs
    stats, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, targets, ref_logits, stats, lse)
    ctx.params = (coef, temperature, softcap, ignore_index, backend)


def _backward(ctx, grad_stats, grad_lse):
    logits, targets, ref_logits, stats, lse = ctx.saved_tensors
    need_logits, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    need_ref = need_ref and ref_logits is not None
    d_logits, d_ref = token_stats_backward_op(
        grad_stats.contiguous(), logits, targets, ref_logits, stats, lse, *ctx.params,
        need_logits, need_ref,
    )
    return (d_logits if need_logits else None, None, d_ref if need_ref else None,
            None, None, None, None, None)


token_stats_op.register_autograd(_backward, setup_context=_setup_context)
token_stats_backward_op.register_autograd(
    double_backward_unsupported("nashkern::token_stats_backward"), setup_context=_no_context)


# ----------------------------------------------------------------------------------------------
# The declared backend table
# ----------------------------------------------------------------------------------------------
_BACKENDS = {
    "torch": Implementation(torch_token_stats.token_stats_forward, torch_token_stats.token_stats_backward),
    "cuda": Implementation(cuda_token_stats.token_stats_forward, cuda_token_stats.token_stats_backward),
}
if triton_token_stats is not None:
    _BACKENDS["triton"] = Implementation(triton_token_stats.token_stats_forward,
                                         triton_token_stats.token_stats_backward,
                                         tuning="token_stats")

FAMILY = Family("token_stats", (token_stats_op, token_stats_backward_op), _BACKENDS)


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------
def _as_rows(x: Tensor) -> Tensor:
    """View ``[..., V]`` as ``[G, R, V]`` with stride(-1) == 1 without copying when the layout
    allows (e.g. ``logits[:, :-1]``); copy otherwise."""
    V = x.shape[-1]
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 2:
        return x.unsqueeze(0)
    lead = x.shape[:-1]
    try:
        return x.view(-1, lead[-1], V) if x.dim() > 3 else x
    except RuntimeError:
        return x.reshape(-1, lead[-1], V)


def _token_stats(logits, targets, ref_logits, scalars: Scalars, backend) -> TokenStats:
    check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    if ref_logits is not None:
        check_float("ref_logits", ref_logits)
        if ref_logits.shape != logits.shape:
            raise ValueError(f"ref_logits must have the shape of logits, {tuple(logits.shape)}, "
                             f"got {tuple(ref_logits.shape)}")
        check_same_device("ref_logits", ref_logits, "logits", logits)
    elif scalars.coef is not None:
        raise ValueError("coef was given but ref_logits is None: the mixture needs both models")
    flat_targets = None
    if targets is not None:
        flat_targets = check_targets(targets, lead, vocab, scalars.ignore_index, logits.device,
                                     "logits")
    backend = resolve_backend(FAMILY, backend, logits.device)
    stats, _ = token_stats_op(
        _as_rows(logits), flat_targets, None if ref_logits is None else _as_rows(ref_logits),
        *scalars.as_args(), backend,
    )
    return unpack_stats(stats, lead, targets is not None, ref_logits is not None,
                        scalars.coef is not None)


def token_stats(
    logits: Tensor, targets: Optional[Tensor], ref_logits: Optional[Tensor] = None, *,
    coef: Optional[float] = None, temperature: float = 1.0, softcap: Optional[float] = None,
    ignore_index: int = -100, backend: str = "auto",
) -> TokenStats:
    """All per-token statistics in one streaming pass over the vocabulary.

    logits, ref_logits: ``[..., V]``; targets: ``[...]`` integer (or None: entropy/KL only).
    Returns :class:`TokenStats` of float32 ``[...]`` tensors: ``logprobs``, ``entropy``,
    ``ref_logprobs`` and ``kl`` (with ``ref_logits``), ``mixture_logprobs`` (with ``coef``).
    Positions whose target equals ``ignore_index`` get 0 in every field and no gradient.
    """
    return _token_stats(logits, targets, ref_logits,
                        Scalars.checked(coef, temperature, softcap, ignore_index), backend)


def logprobs(logits: Tensor, targets: Tensor, *, temperature: float = 1.0,
             softcap: Optional[float] = None, ignore_index: int = -100,
             backend: str = "auto") -> Tensor:
    """``log_softmax(logits / T)[target]``: ``[..., V], [...] -> [...]`` float32 (0 where ignored)."""
    if targets is None:
        raise ValueError("targets must be a tensor of token ids, got None")
    scalars = Scalars.checked(None, temperature, softcap, ignore_index)
    return _token_stats(logits, targets, None, scalars, backend).logprobs


def entropy(logits: Tensor, *, temperature: float = 1.0, softcap: Optional[float] = None,
            backend: str = "auto") -> Tensor:
    """Entropy ``-Σ p log p`` of ``softmax(logits / T)``: ``[..., V] -> [...]`` float32."""
    scalars = Scalars.checked(None, temperature, softcap)
    return _token_stats(logits, None, None, scalars, backend).entropy


def kl(logits: Tensor, ref_logits: Tensor, *, temperature: float = 1.0,
       softcap: Optional[float] = None, backend: str = "auto") -> Tensor:
    """Full-vocabulary ``KL(softmax(logits / T) ‖ softmax(ref_logits / T))``: ``[..., V] -> [...]``."""
    if ref_logits is None:
        raise ValueError("ref_logits must be a tensor, got None")
    scalars = Scalars.checked(None, temperature, softcap)
    return _token_stats(logits, None, ref_logits, scalars, backend).kl


def mixture_logprobs(logits: Tensor, ref_logits: Tensor, targets: Tensor, *, coef: float,
                     temperature: float = 1.0, softcap: Optional[float] = None,
                     ignore_index: int = -100, backend: str = "auto") -> Tensor:
    """``log_softmax(((1 - coef) * z + coef * z_ref) / T)[target]``: ``[..., V] -> [...]``."""
    if ref_logits is None:
        raise ValueError("ref_logits must be a tensor, got None")
    if coef is None:
        raise ValueError("coef must be a float in [0, 1], got None")
    if targets is None:
        raise ValueError("targets must be a tensor of token ids, got None")
    scalars = Scalars.checked(coef, temperature, softcap, ignore_index)
    return _token_stats(logits, targets, ref_logits, scalars, backend).mixture_logprobs
