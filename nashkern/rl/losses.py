"""The trainers' losses as plain functions (usable in any training loop): :func:`nash_md_loss`,
:func:`dpo_loss` (Online DPO) and :func:`xpo_loss` (XPO).

Nash-MD:

With per-token log-probs ``logπ`` (with grad) and ``logμ`` (reference, no grad) of the *policy's*
completions, and ``P`` the probability that the policy completion beats the mixture completion:

    score = (P - 1/2) · Σ_t logπ_t                      (REINFORCE, 1/2 is a control variate)
    kl    = Σ_t sg(logπ_t - logμ_t) · logπ_t            (REINFORCE surrogate of KL(π‖μ))
    loss  = mean_batch(β · kl - score)

Padding positions (``mask == 0``) contribute nothing. ``token_kl`` (per-token exact KL(π‖μ) over the
vocabulary, differentiable, e.g. ``TokenStats.kl``) replaces the surrogate when given
(``kl_estimator="full"``): ``kl = Σ_t token_kl_t``.

DPO / XPO, on per-sequence sums of completion log-probs (policy ``π``, reference ``μ``; the
reference terms are treated as constants):

    h        = (log π(y_c) − log π(y_r)) − (log μ(y_c) − log μ(y_r))
    sigmoid:   dpo = −log σ(β·h)
    ipo:       dpo = (h − 1/(2β))²          (on the sums, not length-normalised, as the original
                                             Online DPO / XPO trainers)
    xpo      = α · log π(ỹ)                 (ỹ ~ μ, the reference's completion: the exploration
                                             term, minimised, pushes π away from μ's samples)
    loss     = mean_batch(dpo [+ xpo])
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import LOSS_TYPES


def _finite_nonneg(x) -> bool:
    return bool(x >= 0) and math.isfinite(float(x))


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
    if not _finite_nonneg(beta):
        raise ValueError(f"beta must be a finite float >= 0, got {beta}")
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


def _check_pair_inputs(named, beta: float, loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not _finite_nonneg(beta):
        raise ValueError(f"beta must be a finite float >= 0, got {beta}")
    if loss_type == "ipo" and beta == 0:
        raise ValueError("the ipo loss needs beta > 0 (its target is 1/(2·beta))")
    (name0, first), *rest = named
    if not isinstance(first, Tensor) or first.dim() != 1:
        raise ValueError(f"{name0} must be a 1-D tensor [B] of per-sequence log-prob sums, got "
                         f"{tuple(first.shape) if isinstance(first, Tensor) else type(first)}")
    for name, t in rest:
        if not isinstance(t, Tensor) or t.shape != first.shape:
            raise ValueError(f"{name} must have the shape of {name0} {tuple(first.shape)}, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")


def _dpo_losses(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float,
                loss_type: str) -> Tensor:
    logits = (pc - pr) - (rc.detach() - rr.detach()).to(pc.dtype)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * logits)
    return (logits - 1 / (2 * beta)) ** 2


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *, beta: float,
             loss_type: str = "sigmoid") -> Tuple[Tensor, Tensor]:
    """The DPO loss of Online DPO: ``(loss, losses)``, ``losses`` per pair ``[B]``, ``loss`` their
    mean. Inputs: per-sequence sums of completion log-probs ``[B]`` under the policy (with grad)
    and the reference (constants). ``loss_type``: ``"sigmoid"`` (DPO) or ``"ipo"``."""
    _check_pair_inputs((("policy_chosen_logps", policy_chosen_logps),
                        ("policy_rejected_logps", policy_rejected_logps),
                        ("ref_chosen_logps", ref_chosen_logps),
                        ("ref_rejected_logps", ref_rejected_logps)), beta, loss_type)
    losses = _dpo_losses(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                         ref_rejected_logps, beta, loss_type)
    return losses.mean(), losses


def xpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             policy_ref_sample_logps: Tensor, *, beta: float, alpha: float,
             loss_type: str = "sigmoid") -> Tuple[Tensor, Tensor, Tensor]:
    """The XPO loss: ``(loss, dpo_losses, xpo_losses)`` with ``xpo_losses = alpha ·
    policy_ref_sample_logps`` and ``loss = mean(dpo_losses + xpo_losses)``.

    ``policy_ref_sample_logps`` ``[B]``: Σ log π(ỹ) of the reference's completion ỹ (one of the
    chosen / rejected pair, so no extra forward is needed). ``alpha`` ≥ 0."""
    _check_pair_inputs((("policy_chosen_logps", policy_chosen_logps),
                        ("policy_rejected_logps", policy_rejected_logps),
                        ("ref_chosen_logps", ref_chosen_logps),
                        ("ref_rejected_logps", ref_rejected_logps),
                        ("policy_ref_sample_logps", policy_ref_sample_logps)), beta, loss_type)
    if not _finite_nonneg(alpha):
        raise ValueError(f"alpha must be a finite float >= 0, got {alpha}")
    dpo_losses = _dpo_losses(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, beta, loss_type)
    xpo_losses = alpha * policy_ref_sample_logps
    return (dpo_losses + xpo_losses).mean(), dpo_losses, xpo_losses
