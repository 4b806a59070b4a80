"""Per-token log-probs (and entropy / exact KL) of completions under the policy and the
reference from the models' final hidden states and output embedding, through
:func:`nashkern.ops.linear_token_stats`: no ``[B, T, V]`` logits, forward or backward.

The model runs once through its own ``forward`` (so DDP / PEFT wrappers see the call) with
``output_hidden_states=True`` and ``logits_to_keep=1``: ``hidden_states[-1]`` is the input of the
head (after the final norm). The head is ``get_output_embeddings()`` (tied embeddings are the same
tensor); config ``logit_scale`` (Cohere: logits · s), ``logits_scaling`` (Granite: logits / s) and
``final_logit_softcapping`` (Gemma-2) are honoured. On the first call per model the last-position
logits the model returned are compared with the head applied to ``hidden_states[-1]``; a model
whose head cannot be separated this way (no output embedding, unknown post-processing) falls
back, with a warning, to its own logits, run in row chunks and fed to ``ops.token_stats``.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch
from torch import Tensor

from .. import ops


@dataclass
class HeadSpec:
    weight: Tensor
    bias: Optional[Tensor]
    scale: float = 1.0          # logits = scale · (h W^T + b)
    softcap: Optional[float] = None


def _unwrap(model):
    while hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model


class HeadNotFusable(Exception):
    """The output head carries something the fused path cannot fold into ``(W, b)`` this step
    (e.g. LoRA dropout in training mode, DoRA): the caller falls back, loudly."""


def _lora_head(head):
    """``(W_eff, b_eff)`` of a PEFT LoRA layer on the output head: ``W + Σ_a s_a·B_a A_a`` (and
    ``b + Σ_a s_a·b_B,a`` with ``lora_bias``) over the active adapters, differentiable in A and B
    (an extra ``[V, D]`` tensor per call); the base ``(W, b)`` when the adapters are disabled
    (the PEFT reference) or merged. Read at every call, so it follows the training."""
    base = head.get_base_layer()
    w, b = base.weight, getattr(base, "bias", None)
    if getattr(head, "disable_adapters", False) or getattr(head, "merged", False):
        return w, b
    for a in head.active_adapters:
        if a not in head.lora_A:
            continue
        if getattr(head, "use_dora", {}).get(a) or getattr(head, "lora_variant", {}).get(a):
            raise HeadNotFusable(f"adapter {a!r} on the output head is a LoRA variant (DoRA, ...)")
        if getattr(head, "fan_in_fan_out", False):
            raise HeadNotFusable("fan_in_fan_out LoRA on the output head")
        drop = head.lora_dropout[a]
        if isinstance(drop, torch.nn.Dropout) and drop.p > 0 and drop.training:
            raise HeadNotFusable(f"lora_dropout={drop.p} on the output head in training mode")
        A, B, scale = head.lora_A[a].weight, head.lora_B[a].weight, head.scaling[a]
        w = w + (B @ A).to(w.dtype) * scale
        b_B = getattr(head.lora_B[a], "bias", None)
        if b_B is not None:
            b = (b_B * scale).to(w.dtype) if b is None else b + (b_B * scale).to(b.dtype)
    return w, b


def output_head(model) -> Optional[HeadSpec]:
    """The output head as ``logits = scale · (h W^T + b)`` (+ softcap), or None. A PEFT LoRA
    layer on the head is folded in (:func:`_lora_head`, may raise :class:`HeadNotFusable`); a
    ``modules_to_save`` head resolves to the trained copy, or to the original one when it is read
    inside ``disable_adapter()`` (read the reference's head inside its context)."""
    m = _unwrap(model)
    try:
        head = m.get_output_embeddings()
    except Exception:  # noqa: BLE001
        return None
    if hasattr(head, "lora_A") and hasattr(head, "get_base_layer"):
        w, bias = _lora_head(head)
    else:
        w, bias = getattr(head, "weight", None), getattr(head, "bias", None)
    if w is None or w.dim() != 2:
        return None
    cfg = getattr(m, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    scale = 1.0
    if cfg is not None:
        if getattr(cfg, "logit_scale", None) not in (None, 1.0):
            scale *= float(cfg.logit_scale)
        if getattr(cfg, "logits_scaling", None) not in (None, 1.0):
            scale /= float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None) if cfg is not None else None
    return HeadSpec(w, bias, scale, float(softcap) if softcap else None)


def _head_logits(h: Tensor, spec: HeadSpec) -> Tensor:
    z = torch.nn.functional.linear(h, spec.weight, spec.bias) * spec.scale
    if spec.softcap:
        z = spec.softcap * torch.tanh(z / spec.softcap)
    return z


def _run_body(model, input_ids, attention_mask):
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
              output_hidden_states=True, use_cache=False)
    try:
        out = model(**kw, logits_to_keep=1)
    except TypeError:  # no logits_to_keep: the check below then fails -> chunked fallback
        out = model(**kw)
    return out.hidden_states[-1], out.logits


def _logits_tolerance(logits: Tensor):
    """``(rtol, atol)`` of the head check. Logits that are all exactly representable in bf16
    (fp16) were computed in it, e.g. by a model run under mixed precision (accelerate's autocast
    wraps ``forward`` and returns fp32 copies, TRL's default ``bf16=True``), while the head is
    re-applied here in float32: allow a few units of that dtype's rounding, relative to the
    largest logit. Otherwise float32 tolerances."""
    for dtype in (torch.bfloat16, torch.float16):
        if torch.equal(logits, logits.to(dtype).float()):
            eps = 4 * torch.finfo(dtype).eps
            return eps, eps * float(logits.abs().max())
    return 1e-3, 1e-3


def _separable(model, spec, hidden, logits) -> bool:
    m = _unwrap(model)
    if getattr(m, "_nashkern_separable", None) is None:
        ok = spec is not None and logits is not None and logits.shape[-1] == spec.weight.shape[0]
        if ok:
            with torch.no_grad():
                got = _head_logits(hidden[:, -1].detach(), spec).float()
                want = logits[:, -1].detach().float()
                rtol, atol = _logits_tolerance(want)
                ok = got.shape == want.shape and torch.allclose(got, want, rtol=rtol, atol=atol)
        if not ok:
            warnings.warn(f"{type(_unwrap(model)).__name__}: the output head could not be "
                          "separated from the model body; falling back to chunked logits "
                          "(materialises [rows, T, V] per chunk)", RuntimeWarning)
        m._nashkern_separable = ok  # decided once per model
    return m._nashkern_separable


@dataclass
class CompletionStats:
    logprobs: Tensor       # [B, C] policy, with grad
    ref_logprobs: Tensor   # [B, C] no grad
    kl: Tensor             # [B, C] exact per-token KL(π‖μ), with grad
    entropy: Tensor        # [B, C] exact per-token policy entropy


def completion_stats(model, input_ids: Tensor, attention_mask: Tensor, context_length: int, *,
                     ref_model, ref_context: Optional[Callable[[], ContextManager]] = None,
                     chunk_rows: int = 4) -> CompletionStats:
    """Token statistics of ``input_ids[:, context_length:]`` (masked by ``attention_mask``)."""
    ref_ctx = ref_context or contextlib.nullcontext
    targets = input_ids[:, context_length:].masked_fill(
        attention_mask[:, context_length:] == 0, -100)
    hidden, logits = _run_body(model, input_ids, attention_mask)
    try:
        spec = output_head(model)
        with torch.no_grad(), ref_ctx():
            ref_hidden, ref_logits = _run_body(ref_model, input_ids, attention_mask)
            # inside the context: under PEFT the reference's head is the ORIGINAL one (a
            # modules_to_save head resolves to its trained copy outside disable_adapter())
            ref_spec = output_head(ref_model)
    except HeadNotFusable as e:  # decided at every call: the adapters change while training
        warnings.warn(f"{type(_unwrap(model)).__name__}: {e}; the fused path cannot include it, "
                      "falling back to chunked logits (materialises [rows, T, V] per chunk)",
                      RuntimeWarning)
        return _chunked_logits_stats(model, ref_model, ref_ctx, input_ids, attention_mask,
                                     context_length, targets, chunk_rows)
    if (_separable(model, spec, hidden, logits) and ref_spec is not None
            and _separable(ref_model, ref_spec, ref_hidden, ref_logits)
            and spec.softcap == ref_spec.softcap):
        h = hidden[:, context_length - 1:-1]
        rh = ref_hidden[:, context_length - 1:-1].detach()
        w, b = spec.weight, spec.bias
        if spec.scale != 1.0:
            h = h * spec.scale
            b = None if b is None else b * spec.scale
        rb = None if ref_spec.bias is None else ref_spec.bias.detach() * ref_spec.scale
        rh = rh * ref_spec.scale if ref_spec.scale != 1.0 else rh
        rw = ref_spec.weight.detach()
        if rh.dtype != h.dtype:
            rh = rh.to(h.dtype)
        if rw.dtype != rh.dtype:
            rw = rw.to(rh.dtype)
        if rb is not None:
            rb = rb.to(rh.dtype)
        st = ops.linear_token_stats(h, w, targets, bias=b, ref_hidden=rh, ref_weight=rw,
                                    ref_bias=rb, softcap=spec.softcap)
        return CompletionStats(st.logprobs, st.ref_logprobs.detach(), st.kl, st.entropy)
    return _chunked_logits_stats(model, ref_model, ref_ctx, input_ids, attention_mask,
                                 context_length, targets, chunk_rows)


def _chunked_logits_stats(model, ref_model, ref_ctx, input_ids, attention_mask, ctx, targets,
                          chunk_rows):
    parts = []
    for i in range(0, input_ids.shape[0], chunk_rows):
        ids, mask = input_ids[i:i + chunk_rows], attention_mask[i:i + chunk_rows]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        z = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        with torch.no_grad(), ref_ctx():
            r = ref_model(input_ids=ids, attention_mask=mask, position_ids=pos,
                          use_cache=False).logits
        parts.append(ops.token_stats(z[:, ctx - 1:-1], targets[i:i + chunk_rows],
                                     r[:, ctx - 1:-1].detach()))
    cat = lambda f: torch.cat([getattr(p, f) for p in parts], 0)  # noqa: E731
    return CompletionStats(cat("logprobs"), cat("ref_logprobs").detach(), cat("kl"),
                           cat("entropy"))
