"""Naive, fully materialising PyTorch implementation of every op.

This is the float64 oracle the tests share and the "eager PyTorch" peer of the benchmarks. It
builds full ``[N, V]`` tensors on purpose: it is the definition, not a fast path. The streaming
implementations live in :mod:`nashkern.backends` (``torch``) and ``kernels/`` (``triton``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .types import TokenStats


def softcap_logits(z: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """``s * tanh(z / s)``; ``-inf`` entries (masked vocabulary) stay ``-inf``."""
    if softcap is None:
        return z
    return torch.where(z == float("-inf"), z, softcap * torch.tanh(z / softcap))


def mix_logits(a: torch.Tensor, b: torch.Tensor, coef: float) -> torch.Tensor:
    """Geometric mixture in log space, ``(1 - coef) * a + coef * b``, exact at the end points
    (so ``-inf`` in the unused model never produces ``0 * -inf``)."""
    if coef == 0:
        return a
    if coef == 1:
        return b
    return (1.0 - coef) * a + coef * b


def _gather(logp: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    return logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)


def naive_token_stats(
    logits: torch.Tensor,
    targets: Optional[torch.Tensor],
    ref_logits: Optional[torch.Tensor] = None,
    *,
    coef: Optional[float] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
) -> TokenStats:
    """Token statistics computed in the dtype of ``logits`` (pass float64 for an oracle).

    logits, ref_logits: ``[..., V]``; targets: ``[...]`` int64 or None. Returns a
    :class:`TokenStats` of ``[...]`` tensors in the input dtype.
    """
    a = softcap_logits(logits, softcap) / temperature
    logp = torch.log_softmax(a, dim=-1)
    p = logp.exp()
    # Terms with p == 0 contribute 0 (and no NaN gradient): mask before multiplying.
    pos = p > 0
    logp_safe = torch.where(pos, logp, torch.zeros_like(logp))
    entropy = -(p * logp_safe).sum(-1)
    if targets is not None:
        valid = targets != ignore_index
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    else:
        valid = torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
        zero = None

    def masked(x):
        return x if zero is None else torch.where(valid, x, zero)

    logprobs = masked(_gather(logp, targets, valid)) if targets is not None else None
    ref_logprobs = kl = mixture_logprobs = None
    if ref_logits is not None:
        b = softcap_logits(ref_logits.to(logits.dtype), softcap) / temperature
        logq = torch.log_softmax(b, dim=-1)
        diff = torch.where(pos, logp - logq, torch.zeros_like(logp))
        kl = masked((p * diff).sum(-1))
        if targets is not None:
            ref_logprobs = masked(_gather(logq, targets, valid))
        if coef is not None:
            logpi = torch.log_softmax(mix_logits(a, b, coef), dim=-1)
            if targets is not None:
                mixture_logprobs = masked(_gather(logpi, targets, valid))
    elif coef is not None:
        raise ValueError("coef needs ref_logits")
    return TokenStats(logprobs, masked(entropy), ref_logprobs, kl, mixture_logprobs)


def naive_linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: Optional[torch.Tensor],
    *,
    bias: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    coef: Optional[float] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
) -> TokenStats:
    """:func:`naive_token_stats` of ``hidden @ weight.T + bias`` (materialises the logits)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    ref_logits = None
    if ref_hidden is not None:
        rw = weight if ref_weight is None else ref_weight
        rb = (bias if ref_weight is None else ref_bias)
        ref_logits = torch.nn.functional.linear(ref_hidden, rw, rb)
    return naive_token_stats(
        logits, targets, ref_logits, coef=coef, temperature=temperature, softcap=softcap,
        ignore_index=ignore_index,
    )


def naive_mixture_logits(
    logits: torch.Tensor, ref_logits: torch.Tensor, *, coef: float, temperature: float = 1.0
) -> torch.Tensor:
    """The ``[..., V]`` logits of the geometric mixture the samplers draw from."""
    return mix_logits(logits.double() / temperature, ref_logits.double() / temperature, coef)
