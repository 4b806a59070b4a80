"""Per-token log-probs (and entropy / exact KL) of completions under the policy and the
reference from the models' final hidden states and output embedding, through
:func:`nashkern.ops.linear_token_stats`: no ``[B, T, V]`` logits, forward or backward.

Each model runs once, as its own ``forward`` called through its engine wrapper (DDP, FSDP1,
FSDP2, a DeepSpeed engine; :func:`~nashkern.rl.engines.redirect`), with ``logits_to_keep=1``;
the input of the head (after the final norm) is the base model's output, read by a forward hook
(no ``output_hidden_states``: the other layers' hidden states are not kept; the first call per
model checks it against ``hidden_states[-1]``, :func:`_run_body`), and the fused statistics
then run as the output head's forward, so every engine has the head's weight whole for them
(and again for the backward) and reduces its gradient as usual. The head is ``get_output_embeddings()`` (tied embeddings are the same tensor);
config ``logit_scale`` (Cohere: logits · s), ``logits_scaling`` (Granite: logits / s) and
``final_logit_softcapping`` (Gemma-2) are honoured. On the first call per model the last-position
logits the model returned are compared with the head applied to the final hidden states; a model
whose head cannot be separated this way (no output embedding, unknown post-processing) raises,
unless ``allow_unfused`` (the config's ``allow_unfused_head``): then its own logits run in row
chunks, fed to ``ops.token_stats``, with a warning.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch
from torch import Tensor

from .. import ops
from . import engines, tensor_parallel


@dataclass
class HeadSpec:
    weight: Tensor
    bias: Optional[Tensor]
    scale: float = 1.0          # logits = scale · (h W^T + b)
    softcap: Optional[float] = None
    shard: Optional[tensor_parallel.VocabShard] = None  # sharded by vocabulary rows: W, b local


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
    """The output head of a causal LM (wrappers removed) as a :class:`HeadSpec`, or None when
    it has no 2-D output embedding here (e.g. a sharded weight outside the model's forward). A
    PEFT LoRA layer on the head is folded in (:func:`_lora_head`, may raise
    :class:`HeadNotFusable`); a ``modules_to_save`` head resolves to the trained copy, or to the
    original one when it is read inside ``disable_adapter()`` (the reference's head is read inside
    its context)."""
    m = engines.inner_module(model)
    try:
        head = m.get_output_embeddings()
    except Exception:  # noqa: BLE001
        return None
    return _head_spec(m, head)


def _head_spec(m, head) -> Optional[HeadSpec]:
    if hasattr(head, "lora_A") and hasattr(head, "get_base_layer"):
        w, bias = _lora_head(head)
    else:
        w, bias = getattr(head, "weight", None), getattr(head, "bias", None)
    if w is None or w.dim() != 2:
        return None
    shard = tensor_parallel.head_shard(w)  # a DTensor head (tensor parallelism): its local rows
    w, bias = tensor_parallel.local(w), tensor_parallel.local(bias)
    cfg = getattr(m, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    scale = 1.0
    if cfg is not None:
        if getattr(cfg, "logit_scale", None) not in (None, 1.0):
            scale *= float(cfg.logit_scale)
        if getattr(cfg, "logits_scaling", None) not in (None, 1.0):
            scale /= float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None) if cfg is not None else None
    return HeadSpec(w, bias, scale, float(softcap) if softcap else None, shard)


def _head_logits(h: Tensor, spec: HeadSpec) -> Tensor:
    """The head applied to ``h [..., D]`` in float32 (``[..., V]``): the model may hold its
    weight in bf16/fp16 while its hidden states come out of an autocast region in float32, or
    the reverse, so both sides are brought to float32 (the head check only: one ``V × D`` copy,
    once per model)."""
    bias = None if spec.bias is None else spec.bias.float()
    z = torch.nn.functional.linear(h.float(), spec.weight.float(), bias) * spec.scale
    if spec.softcap:
        z = spec.softcap * torch.tanh(z / spec.softcap)
    return z


#: Packages whose forward hooks are part of the engine or the model's own machinery (ZeRO-3's
#: gather / release, FSDP's, transformers' output recording, accelerate's, PEFT's), not logit
#: post-processing a user added.
_ENGINE_HOOK_PACKAGES = ("torch", "deepspeed", "transformers", "accelerate", "peft", "nashkern")


def user_hooks(module) -> list:
    """The forward (pre-)hooks on ``module`` that were not registered by an engine or by
    transformers / PEFT (see ``_ENGINE_HOOK_PACKAGES``): e.g. a user's vocabulary mask on
    ``lm_head``. The fused path never builds the logits such a hook would act on."""
    found = []
    for hooks in (module._forward_hooks, module._forward_pre_hooks):
        for fn in hooks.values():
            inner = fn
            while isinstance(inner, functools.partial):
                inner = inner.func
            inner = getattr(inner, "__func__", inner)  # a bound method
            owner = getattr(inner, "__module__", None) or type(inner).__module__ or ""
            if owner.split(".")[0] not in _ENGINE_HOOK_PACKAGES:
                found.append(fn)
    return found


def _decoder_of(inner) -> Optional[torch.nn.Module]:
    """The base model (``get_decoder()``, else the ``base_model_prefix`` attribute) whose output
    ``last_hidden_state`` is the head's input in transformers' causal LMs, or None."""
    dec = None
    try:
        dec = inner.get_decoder()
    except Exception:  # noqa: BLE001 - no decoder accessor
        pass
    if not isinstance(dec, torch.nn.Module):
        prefix = getattr(inner, "base_model_prefix", None)
        dec = getattr(inner, prefix, None) if isinstance(prefix, str) and prefix else None
    return dec if isinstance(dec, torch.nn.Module) and dec is not inner else None


def _run_body(inner, forward, input_ids, attention_mask):
    """``(final hidden states [B, T, D], last-position logits)`` of one forward.

    The final hidden states are read from the base model's output by a forward hook, so the
    model is called without ``output_hidden_states`` (which keeps every layer's hidden states,
    ``(L + 1)·B·T·D`` values, alive for the step; with activation checkpointing those are
    exactly what checkpointing frees). The first call per model also asks for
    ``output_hidden_states`` and uses the hook from then on only if its tensor is
    ``hidden_states[-1]``; a model without a separate base model, or whose base output is not
    the head's input, keeps ``output_hidden_states=True`` (decided once per model)."""
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
              use_cache=False)
    hooked = getattr(inner, "_nashkern_final_hidden_hook", None)  # None: not decided yet
    decoder = _decoder_of(inner) if hooked is not False else None
    captured = []

    def keep_output(module, args, output):
        h = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state",
                                                                None)
        captured.append(h)

    handle = decoder.register_forward_hook(keep_output) if decoder is not None else None
    try:
        if not hooked:  # undecided or not usable: the model's own hidden states
            kw["output_hidden_states"] = True
        try:
            out = forward(**kw, logits_to_keep=1)
        except TypeError:  # no logits_to_keep: the check below then fails -> not separable
            out = forward(**kw)
    finally:
        if handle is not None:
            handle.remove()
    one = len(captured) == 1 and isinstance(captured[0], Tensor)
    if hooked:
        if not one:
            raise RuntimeError(f"{type(inner).__name__}: the forward hook on its base model "
                               f"({type(decoder).__name__}) fired {len(captured)} times, expected "
                               "once per forward")
        return captured[0], out.logits
    if hooked is None:
        last = out.hidden_states[-1] if getattr(out, "hidden_states", None) else None
        usable = one and last is not None and (
            captured[0] is last or (captured[0].shape == last.shape
                                    and torch.equal(captured[0], last)))
        object.__setattr__(inner, "_nashkern_final_hidden_hook", bool(usable))
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


def _separable(m, spec, hidden, logits) -> bool:
    """Whether ``logits`` are the head applied to ``hidden`` (checked on the last position, once
    per model; ``m`` the inner model)."""
    if getattr(m, "_nashkern_separable", None) is None:
        ok = spec is not None and logits is not None and logits.shape[-1] == spec.weight.shape[0]
        if ok:
            with torch.no_grad():
                got = _head_logits(hidden[:, -1].detach(), spec)
                want = logits[:, -1].detach().float()
                rtol, atol = _logits_tolerance(want)
                ok = got.shape == want.shape and torch.allclose(got, want, rtol=rtol, atol=atol)
        shard = spec.shard if spec is not None else None
        ok = tensor_parallel.all_agree(ok, shard, hidden.device)  # the group branches together
        object.__setattr__(m, "_nashkern_separable", ok)  # decided once per model
    return m._nashkern_separable


def _through_head(inner, forward, input_ids, attention_mask, head_fn, *args):
    """Inside the (redirected) forward of ``inner``: the body (final hidden states and the
    last-position logits), then ``head_fn(inner, spec, hidden, logits, *args)`` run as the output
    head's forward, so an engine that gathers weights per module (ZeRO-3) has the head's weight
    whole while it runs (and again for its backward)."""
    head = inner.get_output_embeddings()
    with tensor_parallel.local_head(head):  # a vocabulary-sharded head: no logits all-gather
        hidden, logits = _run_body(inner, forward, input_ids, attention_mask)
    if head is None or user_hooks(head):
        # a hook on the head (e.g. a vocabulary mask) acts on logits the fused path never
        # builds: not separable, and the head is not called (the hook would get no logits)
        return None

    def head_forward(h, z):
        return head_fn(inner, _head_spec(inner, head), h, z, *args)

    with engines.patched_forward(head, head_forward):
        return head(hidden, logits)


def _reference_head(inner, spec, hidden, logits, ctx, owned):
    """The reference's ``(hidden [B, C, Dr], weight, bias, scale, softcap)`` (no grad), or None
    when its head is not separable. A weight the engine only gathered for this forward is
    copied (the head only: ``V × D``)."""
    if not _separable(inner, spec, hidden, logits):
        return None
    w, b = spec.weight.detach(), None if spec.bias is None else spec.bias.detach()
    if owned:
        w, b = w.clone(), None if b is None else b.clone()
    return hidden[:, ctx - 1:-1].detach(), w, b, spec.scale, spec.softcap, spec.shard


def _policy_head(inner, spec, hidden, logits, ctx, targets, ref):
    """The fused statistics ``(logprobs, ref_logprobs, kl, entropy)`` of the completion tokens,
    or None when the head is not separable or differs in kind from the reference's."""
    rh, rw, rb, rscale, rsoftcap, rshard = ref
    if not _separable(inner, spec, hidden, logits) or spec.softcap != rsoftcap:
        return None
    # tensor parallelism: the reference's rows matching the policy's shard (or a clear error)
    rw, rb = tensor_parallel.align_reference(spec.shard, rw, rb, rshard)
    h = hidden[:, ctx - 1:-1]
    w, b = spec.weight, spec.bias
    if h.dtype != w.dtype:
        # mixed precision: the body's output can come out of autocast in float32 while the head
        # is bf16 / fp16 (or the reverse); the head computes in its weight's dtype, as the
        # model's own head under autocast would (a [B, C, D] cast, differentiable)
        h = h.to(w.dtype)
    if spec.scale != 1.0:
        h = h * spec.scale
        b = None if b is None else b * spec.scale
    rb = None if rb is None else rb * rscale
    rh = rh * rscale if rscale != 1.0 else rh
    if rh.dtype != h.dtype:
        rh = rh.to(h.dtype)
    if rw.dtype != rh.dtype:
        rw = rw.to(rh.dtype)
    if rb is not None:
        rb = rb.to(rh.dtype)
    st = ops.linear_token_stats(h, w, targets, bias=b, ref_hidden=rh, ref_weight=rw,
                                ref_bias=rb, softcap=spec.softcap,
                                process_group=None if spec.shard is None else spec.shard.group)
    return st.logprobs, st.ref_logprobs.detach(), st.kl, st.entropy


@dataclass
class CompletionStats:
    logprobs: Tensor       # [B, C] policy, with grad
    ref_logprobs: Tensor   # [B, C] no grad
    kl: Tensor             # [B, C] exact per-token KL(π‖μ), with grad
    entropy: Tensor        # [B, C] exact per-token policy entropy


def completion_stats(model, input_ids: Tensor, attention_mask: Tensor, context_length: int, *,
                     ref_model, ref_context: Optional[Callable[[], ContextManager]] = None,
                     chunk_rows: int = 4, allow_unfused: bool = False) -> CompletionStats:
    """Token statistics of ``input_ids[:, context_length:]`` (masked by ``attention_mask``).

    ``model`` is the policy as the engine wrapped it (DDP, FSDP1, FSDP2, a DeepSpeed engine, or
    the bare model); ``ref_model`` the reference (a prepared one answers for its wrapper; the
    policy's own inner model under ``ref_context`` for a PEFT base). Each runs once through its
    wrapper's forward (:func:`~nashkern.rl.engines.redirect`) with the fused head statistics as
    its output head's forward. A head that cannot be separated from the model raises, unless
    ``allow_unfused``: then the models' own logits run in row chunks (with a warning)."""
    ref_ctx = ref_context or contextlib.nullcontext
    targets = input_ids[:, context_length:].masked_fill(
        attention_mask[:, context_length:] == 0, -100)
    ref_wrapper = engines.wrapper_of(ref_model)
    if engines.inner_module(ref_wrapper) is engines.inner_module(model):
        ref_wrapper = model  # the PEFT base: the policy's wrapper, adapters disabled
    owned = engines.head_weight_owned_by_engine(ref_wrapper)
    hooked = [f"the {role} ({type(m).__name__})" for role, m in (
        ("policy", engines.inner_module(model)), ("reference", engines.inner_module(ref_wrapper)))
        if user_hooks(m)]
    out, why = None, ("the output head could not be separated from the model body (no 2-D "
                      "output embedding, unknown logit post-processing such as a forward hook "
                      "on the head, or policy and reference heads of different kinds)")
    if hooked:  # the model-level hook would receive the fused statistics, not the model's output
        why = (f"a forward hook on {' and '.join(hooked)} post-processes the model's output, "
               "which the fused path does not build")
    try:  # the head is read at every call: adapters on it change while training
        if not hooked:
            with torch.no_grad(), ref_ctx():
                ref = engines.redirect(ref_wrapper, _through_head, input_ids, attention_mask,
                                       _reference_head, context_length, owned)
            if ref is not None:
                out = engines.redirect(model, _through_head, input_ids, attention_mask,
                                       _policy_head, context_length, targets, ref)
    except HeadNotFusable as e:
        why = f"the fused path cannot include the output head this step: {e}"
    if out is not None:
        return CompletionStats(*out)
    names = f"{type(engines.inner_module(model)).__name__} / " \
            f"{type(engines.inner_module(ref_wrapper)).__name__}"
    if not allow_unfused:
        raise ValueError(
            f"{names} (engine: {engines.engine_of(model)}): {why}, so the fused statistics "
            "cannot run. Fix the model's head (get_output_embeddings(); for a LoRA head: no "
            "dropout, plain LoRA), or opt in to the model's own logits in row chunks "
            "(materialises [rows, T, V] per chunk): allow_unfused_head=True in the config "
            "(allow_unfused=True here)")
    warnings.warn(f"{names}: {why}; allow_unfused_head is set: chunked logits (materialises "
                  "[rows, T, V] per chunk)", RuntimeWarning)
    return _chunked_logits_stats(model, ref_wrapper, ref_ctx, input_ids, attention_mask,
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
