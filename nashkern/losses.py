"""Nash-MD loss as a plain function (usable in any training loop).

With per-token log-probs ``logπ`` (with grad) and ``logμ`` (reference, no grad) of the *policy's*
completions, and ``P`` the probability that the policy completion beats the mixture completion:

    score = (P - 1/2) · Σ_t logπ_t                      (REINFORCE, 1/2 is a control variate)
    kl    = Σ_t sg(logπ_t - logμ_t) · logπ_t            (REINFORCE surrogate of KL(π‖μ))
    loss  = mean_batch(β · kl - score)

Padding positions (``mask == 0``) contribute nothing. ``token_kl`` (per-token exact KL(π‖μ) over the
vocabulary, differentiable, e.g. ``TokenStats.kl``) replaces the surrogate when given
(``kl_estimator="full"``): ``kl = Σ_t token_kl_t``.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor


def nash_md_loss(logprobs: Tensor, ref_logprobs: Tensor, probability: Union[Tensor, float],
                 mask: Optional[Tensor], beta: float, *,
                 token_kl: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(loss, score, kl)``: ``loss`` a scalar, ``score`` and ``kl`` per sequence ``[B]``.

    logprobs, ref_logprobs: ``[B, T]`` per-token log-probs of the completion under the policy
    (with grad) and the reference; probability: ``[B]`` (or a float) P(policy completion ≻
    mixture completion); mask: ``[B, T]`` (1 for completion tokens, 0 for padding) or None;
    beta: KL weight ≥ 0; token_kl: optional ``[B, T]`` exact per-token KL (see module doc).
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got {tuple(logprobs.shape)}")
    if ref_logprobs.shape != logprobs.shape:
        raise ValueError(f"ref_logprobs must have the shape of logprobs {tuple(logprobs.shape)}, "
                         f"got {tuple(ref_logprobs.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if mask is None:
        mask = torch.ones_like(logprobs, dtype=torch.bool)
    elif mask.shape != logprobs.shape:
        raise ValueError(f"mask must have the shape of logprobs {tuple(logprobs.shape)}, "
                         f"got {tuple(mask.shape)}")
    mask = mask.to(torch.bool)
    zero = logprobs.new_zeros(())
    lp = torch.where(mask, logprobs, zero)
    ref = torch.where(mask, ref_logprobs.detach().to(lp.dtype), zero)
    probability = torch.as_tensor(probability, dtype=lp.dtype, device=lp.device).detach()
    score = (probability - 0.5) * lp.sum(1)
    if token_kl is not None:
        if token_kl.shape != logprobs.shape:
            raise ValueError(f"token_kl must have the shape of logprobs {tuple(logprobs.shape)}, "
                             f"got {tuple(token_kl.shape)}")
        kl = torch.where(mask, token_kl.to(lp.dtype), zero).sum(1)
    else:
        kl = ((lp - ref).detach() * lp).sum(1)
    loss = (beta * kl - score).mean()
    return loss, score, kl
