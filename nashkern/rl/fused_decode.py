"""Decoding without last-position logits: each model runs its body only (its output head's
forward is bypassed: the head's input, the final hidden state of the last position, is kept),
and the next tokens come from :func:`nashkern.ops.linear_mixture_sample`, which streams the
heads' weights over vocabulary tiles and never builds ``[rows, V]``. For the same generator it
draws the ids that ``ops.mixture_sample`` draws on the heads' logits (up to the GEMMs' last-bit
rounding), so :mod:`~nashkern.rl.generation` gives the same completions either way.

Used only where it can be exact (:func:`fused_decode_reason`, :func:`fused_head`): sampling
without logits processors (penalty / top-k / top-p / min-p and greedy decoding need whole
rows), on the CPU (no fused GPU kernel: there the Triton / CUDA samplers read the logits in one
pass), without autocast, with float32 heads (a bf16 / fp16 head rounds its own logits to that
dtype; the op accumulates in float32), heads that are plain tensors (no vocabulary shard, no
ZeRO-3 / FSDP2 parameter), no user hook on the model or its head, and a head that
:func:`~nashkern.rl.completion_stats` finds separable (checked on the first prefill of each
model: its own logits against the head applied to its final hidden state). Anything else keeps
the logits path and says why, once per reason (a ``logging`` warning).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import ops
from . import engines, tensor_parallel
from .completion_stats import HeadNotFusable, _head_spec, _separable, user_hooks

_LOGGER = logging.getLogger(__name__)
_LOGGED: set = set()


def log_fallback_once(reason: str) -> None:
    """Say (once per distinct reason) that decoding uses the logits path."""
    if reason not in _LOGGED:
        _LOGGED.add(reason)
        _LOGGER.warning("generation: the fused head sampler (ops.linear_mixture_sample) is not "
                        "used: %s; decoding builds each model's [rows, V] last-position logits",
                        reason)


@dataclass
class FusedHead:
    """One model's output head for the fused sampler: logits ``cap(scale·(h Wᵀ + b))``."""

    inner: torch.nn.Module     # the model (wrappers removed): its separability flag
    module: torch.nn.Module    # the head module, whose forward is bypassed while decoding
    weight: Tensor             # [V, D] float32
    bias: Optional[Tensor]     # [V] scaled, or None
    scale: float
    softcap: Optional[float]

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    def hidden(self, h: Tensor) -> Tensor:
        """The head's input ``[rows, D]`` scaled as the logits are (``scale·(h Wᵀ + b)``)."""
        return h if self.scale == 1.0 else h * self.scale


def fused_decode_reason(params, device: torch.device) -> Optional[str]:
    """Why the sampling settings / device need whole logit rows (None: they do not)."""
    if not params.do_sample:
        return "greedy decoding (do_sample=False) takes the argmax of whole rows"
    if params.has_processors:
        return ("logits processors (repetition_penalty / top_k / top_p / min_p) act on whole "
                "rows")
    if device.type != "cpu":
        return (f"no fused {device.type} kernel: the device's sampler reads the last-position "
                "logits in one pass")
    if torch.is_autocast_enabled(device.type):
        return "autocast is on: the model's head computes its logits in the autocast dtype"
    return None


def fused_head(model) -> Tuple[Optional[FusedHead], Optional[str]]:
    """``(head, None)`` for a model whose decoding can bypass its head, else ``(None, why)``.
    Read inside the model's context (a PEFT reference: adapters disabled)."""
    inner = engines.inner_module(model)
    name = type(inner).__name__
    if user_hooks(inner):
        return None, f"a forward hook on {name} (it would not see the bypassed head's logits)"
    try:
        head = inner.get_output_embeddings()
    except Exception:  # noqa: BLE001
        head = None
    if not isinstance(head, torch.nn.Module):
        return None, f"{name} has no output embedding module"
    if user_hooks(head):
        return None, f"a forward hook on {name}'s output head acts on its logits"
    if getattr(inner, "_nashkern_separable", None) is False:
        return None, f"{name}'s head is not separable from its body (checked once)"
    for p in head.parameters():
        if tensor_parallel.is_dtensor(p) or hasattr(p, "ds_id"):
            return None, (f"{name}'s head weight is sharded by an engine or tensor parallelism "
                          "(DTensor / ZeRO-3 parameter)")
    try:
        spec = _head_spec(inner, head)
    except HeadNotFusable as e:
        return None, f"{name}'s head: {e}"
    if spec is None or spec.shard is not None:
        return None, f"{name}'s head is not a whole 2-D weight"
    if spec.weight.dtype != torch.float32 or (spec.bias is not None
                                              and spec.bias.dtype != torch.float32):
        return None, (f"{name}'s head is {spec.weight.dtype}: its own logits are rounded to "
                      "that dtype, the fused sampler accumulates in float32")
    bias = spec.bias.detach() if spec.bias is not None else None
    if bias is not None and spec.scale != 1.0:
        bias = bias * spec.scale
    return FusedHead(inner, head, spec.weight.detach(), bias, spec.scale, spec.softcap), None


def checked(head: FusedHead, hidden: Tensor, logits: Tensor) -> bool:
    """Whether the model's last-position ``logits [B, V]`` are its head applied to ``hidden``
    (``[B, T, D]``, the head's input at the prefill); decided once per model (cached on it)."""
    spec = _head_spec(head.inner, head.module)
    return _separable(head.inner, spec, hidden, logits[:, None])


def separability_known(head: FusedHead) -> bool:
    return getattr(head.inner, "_nashkern_separable", None) is not None


def keep_head_input(kept: list):
    """A replacement forward for the head: keeps its input's last position ``[B, D]`` in
    ``kept`` and returns no logit columns (``[..., 0]``)."""
    def forward(x, *args, **kwargs):
        kept.append(x[:, -1] if x.dim() == 3 else x)
        return x.new_empty(*x.shape[:-1], 0)
    return forward


def sample(policy: Optional[FusedHead], h: Optional[Tensor], ref: Optional[FusedHead],
           hr: Optional[Tensor], *, coefs: Sequence[float], group_rows: Sequence[int],
           generators: Sequence[Optional[torch.Generator]], temperature: float) -> Tensor:
    """One token per row from the heads' mixture, groups of rows as
    :func:`ops.linear_mixture_sample` takes them (``policy`` None: the reference alone, coef 0
    on its rows)."""
    if policy is None:
        policy, h, ref, hr = ref, hr, None, None
    return ops.linear_mixture_sample(
        policy.hidden(h), policy.weight, None if ref is None else ref.hidden(hr),
        None if ref is None else ref.weight, coef=list(coefs), temperature=temperature,
        bias=policy.bias, ref_bias=None if ref is None else ref.bias, softcap=policy.softcap,
        generator=list(generators), group_rows=list(group_rows))
