"""Fused vocabulary ops: log-probs, entropy, KL and the geometric mixture, streamed over the
vocabulary so that no ``tokens x vocab`` tensor is ever created by the fast paths.

Shapes: logits ``[..., V]`` (any leading dims), hidden states ``[..., D]`` with an lm_head
weight ``[V, D]``; every per-token result is float32 of the leading shape ``[...]``. Inputs may
be float32, bfloat16 or float16; arithmetic accumulates in float32. Gradients flow to every
floating input that requires grad.

Semantics (DESIGN.md): softcap ``z <- s * tanh(z / s)`` is applied to each model's logits first
(``-inf`` entries stay masked), then the mixture ``(1 - coef) * z + coef * z_ref`` (``coef`` is
the weight of the reference), then the temperature. Backends: ``"torch"`` (streaming PyTorch,
the CPU path), ``"triton"`` (GPU, or the CPU interpreter with ``TRITON_INTERPRET=1``),
``"cuda"`` (the optional nvcc-built kernels of ``csrc/``) and ``"auto"``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _library
from .types import (
    ENTROPY, KL, LOGPROBS, MIXTURE_LOGPROBS, REF_LOGPROBS, TokenStats,
)

__all__ = [
    "TokenStats", "logprobs", "entropy", "kl", "mixture_logprobs", "mixture_sample",
    "token_stats", "linear_token_stats",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# Argument checks: every error names the argument and what was expected
# ----------------------------------------------------------------------------------------------
def _check_float(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")


def _check_same_device(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; "
                         "move them to the same device")


def _check_scalars(coef, temperature, softcap, ignore_index) -> None:
    if coef is not None:
        if isinstance(coef, Tensor) or not isinstance(coef, (int, float)) or isinstance(coef, bool):
            raise TypeError(f"coef must be a Python float in [0, 1], got {type(coef).__name__}")
        if not (0.0 <= coef <= 1.0):
            raise ValueError(f"coef must be in [0, 1] (0 = policy, 1 = reference), got {coef}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a Python float > 0, got {type(temperature).__name__}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be None or a Python float > 0, got {type(softcap).__name__}")
        if not (softcap > 0 and math.isfinite(softcap)):
            raise ValueError(f"softcap must be None or a finite float > 0, got {softcap}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def _check_targets(targets: Tensor, lead: torch.Size, vocab: int, ignore_index: int,
                   device: torch.device, what: str) -> Tensor:
    """Validate ``targets`` against the leading shape and the vocabulary; return int64 ``[N]``.

    Costs at most one host synchronisation (one ``.item()``); under ``torch.compile`` the
    check becomes an asynchronous assert instead."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor of token ids, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor of token ids, got {targets.dtype}")
    if targets.shape != lead:
        raise ValueError(f"targets must have the leading shape of {what}, {tuple(lead)}, "
                         f"got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"targets is on {targets.device} but {what} is on {device}")
    flat = targets.reshape(-1).to(torch.long).contiguous()
    if flat.numel():
        bad = (flat != ignore_index) & ((flat < 0) | (flat >= vocab))
        if torch.compiler.is_compiling():
            torch._assert_async(~bad.any(), "nashkern: targets out of range [0, V) and not ignore_index")
        elif bool(bad.any().item()):
            value = int(flat[bad.nonzero()[0, 0]].item())
            raise ValueError(f"targets must be in [0, {vocab}) or equal ignore_index={ignore_index}, "
                             f"found {value}")
    return flat


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


def _unpack(stats: Tensor, lead: torch.Size, has_targets: bool, has_ref: bool,
            has_mix: bool) -> TokenStats:
    """Views of the packed ``[5, N]`` statistics as ``[...]``; fields not computed are None."""
    fields = {ENTROPY}
    if has_targets:
        fields.add(LOGPROBS)
    if has_ref:
        fields.add(KL)
        if has_targets:
            fields.add(REF_LOGPROBS)
            if has_mix:
                fields.add(MIXTURE_LOGPROBS)
    out = [stats[k].view(lead) if k in fields else None for k in range(5)]
    return TokenStats(*out)


# ----------------------------------------------------------------------------------------------
# Logits input
# ----------------------------------------------------------------------------------------------
def _token_stats(logits, targets, ref_logits, coef, temperature, softcap, ignore_index, backend):
    _check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    _check_scalars(coef, temperature, softcap, ignore_index)
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    if ref_logits is not None:
        _check_float("ref_logits", ref_logits)
        if ref_logits.shape != logits.shape:
            raise ValueError(f"ref_logits must have the shape of logits, {tuple(logits.shape)}, "
                             f"got {tuple(ref_logits.shape)}")
        _check_same_device("ref_logits", ref_logits, "logits", logits)
    elif coef is not None:
        raise ValueError("coef was given but ref_logits is None: the mixture needs both models")
    flat_targets = None
    if targets is not None:
        flat_targets = _check_targets(targets, lead, vocab, ignore_index, logits.device, "logits")
    backend = _library.resolve_backend(backend, logits.device)
    stats, _ = _library.token_stats(
        _as_rows(logits), flat_targets, None if ref_logits is None else _as_rows(ref_logits),
        None if coef is None else float(coef), float(temperature),
        None if softcap is None else float(softcap), int(ignore_index), backend,
    )
    return _unpack(stats, lead, targets is not None, ref_logits is not None, coef is not None)


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
    return _token_stats(logits, targets, ref_logits, coef, temperature, softcap, ignore_index,
                        backend)


def logprobs(logits: Tensor, targets: Tensor, *, temperature: float = 1.0,
             softcap: Optional[float] = None, ignore_index: int = -100,
             backend: str = "auto") -> Tensor:
    """``log_softmax(logits / T)[target]``: ``[..., V], [...] -> [...]`` float32 (0 where ignored)."""
    if targets is None:
        raise ValueError("targets must be a tensor of token ids, got None")
    return _token_stats(logits, targets, None, None, temperature, softcap, ignore_index,
                        backend).logprobs


def entropy(logits: Tensor, *, temperature: float = 1.0, softcap: Optional[float] = None,
            backend: str = "auto") -> Tensor:
    """Entropy ``-Σ p log p`` of ``softmax(logits / T)``: ``[..., V] -> [...]`` float32."""
    return _token_stats(logits, None, None, None, temperature, softcap, -100, backend).entropy


def kl(logits: Tensor, ref_logits: Tensor, *, temperature: float = 1.0,
       softcap: Optional[float] = None, backend: str = "auto") -> Tensor:
    """Full-vocabulary ``KL(softmax(logits / T) ‖ softmax(ref_logits / T))``: ``[..., V] -> [...]``."""
    if ref_logits is None:
        raise ValueError("ref_logits must be a tensor, got None")
    return _token_stats(logits, None, ref_logits, None, temperature, softcap, -100, backend).kl


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
    return _token_stats(logits, targets, ref_logits, coef, temperature, softcap, ignore_index,
                        backend).mixture_logprobs


# ----------------------------------------------------------------------------------------------
# Hidden states + lm_head
# ----------------------------------------------------------------------------------------------
def _check_head(prefix: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    _check_float(f"{prefix}hidden", hidden)
    _check_float(f"{prefix}weight", weight)
    if hidden.dim() < 1:
        raise ValueError(f"{prefix}hidden must have shape [..., D], got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"{prefix}weight must have shape [V, D], got {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"{prefix}weight must have V >= 1 rows, got {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{prefix}hidden's last dim ({hidden.shape[-1]}) must equal "
                         f"{prefix}weight's D ({weight.shape[1]}); weight is [V, D] = "
                         f"{tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{prefix}hidden ({hidden.dtype}) and {prefix}weight ({weight.dtype}) "
                         "must have the same dtype")
    _check_same_device(f"{prefix}weight", weight, f"{prefix}hidden", hidden)
    if bias is not None:
        _check_float(f"{prefix}bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{prefix}bias must have shape [V] = ({weight.shape[0]},), "
                             f"got {tuple(bias.shape)}")
        _check_same_device(f"{prefix}bias", bias, f"{prefix}hidden", hidden)


def linear_token_stats(
    hidden: Tensor, weight: Tensor, targets: Optional[Tensor], *, bias: Optional[Tensor] = None,
    ref_hidden: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
    ref_bias: Optional[Tensor] = None, coef: Optional[float] = None, temperature: float = 1.0,
    softcap: Optional[float] = None, ignore_index: int = -100, backend: str = "auto",
    strategy: str = "auto",
) -> TokenStats:
    """:func:`token_stats` of ``logits = hidden @ weight.T + bias`` without ever materialising
    the ``[N, V]`` logits, forward or backward.

    ``strategy``: ``"chunked"`` (cuBLAS GEMMs into a reusable ``[C, V]`` buffer of at most
    ``tuning.CHUNKED_LINEAR.max_chunk_bytes``, then the backend's logits kernels; bf16/fp16
    logits are rounded once to the model dtype, as in eager PyTorch), ``"fused"`` (one streaming
    kernel, no ``[C, V]`` buffer: the memory floor, fp32 logits; not on ``backend="cuda"``) or
    ``"auto"`` (chunked on CUDA devices, fused elsewhere). DESIGN.md has the cost model.

    hidden: ``[..., D]``; weight: ``[V, D]``; bias: ``[V]``; targets: ``[...]`` (or None);
    ref_hidden: ``[..., Dr]`` (the reference model's final hidden states); ref_weight
    ``[V, Dr]`` and ref_bias ``[V]`` default to the policy's head when ``ref_hidden`` is given
    without them. Returns :class:`TokenStats` of float32 ``[...]`` tensors.
    """
    _check_head("", hidden, weight, bias)
    _check_scalars(coef, temperature, softcap, ignore_index)
    lead, vocab = hidden.shape[:-1], weight.shape[0]
    if ref_hidden is None:
        if ref_weight is not None or ref_bias is not None:
            raise ValueError("ref_weight / ref_bias were given but ref_hidden is None")
        if coef is not None:
            raise ValueError("coef was given but ref_hidden is None: the mixture needs both models")
    else:
        if ref_weight is None:
            ref_weight, ref_bias = weight, bias if ref_bias is None else ref_bias
        _check_head("ref_", ref_hidden, ref_weight, ref_bias)
        if ref_hidden.shape[:-1] != lead:
            raise ValueError(f"ref_hidden must have the leading shape of hidden, {tuple(lead)}, "
                             f"got {tuple(ref_hidden.shape[:-1])}")
        if ref_weight.shape[0] != vocab:
            raise ValueError(f"ref_weight must have the vocabulary size of weight ({vocab}), "
                             f"got {tuple(ref_weight.shape)}")
        _check_same_device("ref_hidden", ref_hidden, "hidden", hidden)
    flat_targets = None
    if targets is not None:
        flat_targets = _check_targets(targets, lead, vocab, ignore_index, hidden.device, "hidden")
    backend = _library.resolve_backend(backend, hidden.device)
    strategy = _library.resolve_strategy(strategy, backend, hidden.device)

    def rows(x):
        return None if x is None else x.reshape(-1, x.shape[-1]).contiguous()

    def contig(x):
        return None if x is None else x.contiguous()

    stats, _ = _library.linear_token_stats(
        rows(hidden), contig(weight), flat_targets, contig(bias), rows(ref_hidden),
        contig(ref_weight), contig(ref_bias), None if coef is None else float(coef),
        float(temperature), None if softcap is None else float(softcap), int(ignore_index),
        backend, strategy,
    )
    return _unpack(stats, lead, targets is not None, ref_hidden is not None, coef is not None)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def mixture_sample(logits: Tensor, ref_logits: Tensor, *, coef: float, temperature: float = 1.0,
                   generator: Optional[torch.Generator] = None, backend: str = "auto") -> Tensor:
    """Sample token ids from ``softmax(((1 - coef) * z + coef * z_ref) / T)``.

    logits, ref_logits: ``[..., V]`` (typically the last position, ``[B, V]``) -> int64 ``[...]``.
    Gumbel-max on GPU backends, inverse CDF on the torch backend; reproducible for a given
    ``generator`` state (GPU backends draw one seed from it per call, on the device). A row with no finite mixture logit, or with a NaN, gives -1.
    """
    _check_float("logits", logits)
    _check_float("ref_logits", ref_logits)
    if coef is None:
        raise ValueError("coef must be a float in [0, 1], got None")
    _check_scalars(coef, temperature, None, -100)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits must have the shape of logits, {tuple(logits.shape)}, "
                         f"got {tuple(ref_logits.shape)}")
    _check_same_device("ref_logits", ref_logits, "logits", logits)
    if generator is not None and generator.device.type != logits.device.type:
        raise ValueError(f"generator is on {generator.device} but logits is on {logits.device}")
    backend = _library.resolve_backend(backend, logits.device)
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    seed = torch.randint(0, 2**62, (1,), device=logits.device, generator=generator)
    z = logits.reshape(-1, vocab)
    r = ref_logits.reshape(-1, vocab)
    if z.stride(-1) != 1:
        z = z.contiguous()
    if r.stride(-1) != 1:
        r = r.contiguous()
    out = _library.mixture_sample(z, r, seed, float(coef), float(temperature), backend)
    return out.view(lead)
