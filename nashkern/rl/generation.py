"""KV-cached sampling of policy completions and geometric-mixture completions.

Per token the mixture samples from ``π_mix ∝ π^(1−c)·μ^c`` (``c`` = ``coef``, the reference's
weight): the policy and the reference each keep their own KV cache and each runs one forward per
new token over that token only; the next token comes from :func:`nashkern.ops.mixture_sample`
on the two models' last-position logits. ``coef=0`` (or no reference) is plain policy sampling
through the same path, without running the reference at all; ``coef=1`` is plain reference
sampling (XPO's ỹ ~ μ), without running the policy.

Logits processors (repetition penalty, temperature, top-k, top-p, min-p) act on the **mixture**
logits ``(1−c)·z + c·z_ref``, in the order of ``transformers``' ``generate`` (penalty, then
temperature, then top-k, top-p, min-p): the filters truncate the distribution that is actually
sampled, which is what the original trainer did (it wrapped the mixture as a model and ran
``generate`` over it), and top-p / min-p are not meaningful per model (the intersection of two
nucleus sets is not the nucleus of the mixture). Without penalty/filters the two last-position
logit rows go straight to ``mixture_sample`` (the temperature is applied inside it, no extra
``[B, V]`` mixed tensor); with any of them one ``[B, V]`` row of mixed logits per step is built,
processed, and sampled by ``mixture_sample`` with ``coef=0``.

Without processors, greedy decoding or a device / head that needs them, the models run their
bodies only and :func:`nashkern.ops.linear_mixture_sample` samples from their heads' weights
streamed over vocabulary tiles (no ``[rows, V]`` logits; the same ids for the same generator):
:mod:`nashkern.rl.fused_decode` says when, and logs once why not.

``do_sample=False`` takes the most likely token of the processed mixture logits (greedy).
``cache_implementation`` picks each model's KV cache: transformers' ``DynamicCache`` (default),
``StaticCache`` (``"static"``, prompt + ``max_new_tokens`` slots) or an offloaded dynamic cache.
``compiled_decode`` (a :class:`~nashkern.rl.compiled_decode.CompiledDecode`, the config field
``compile_decode``): the one-token forward of the decode loop runs compiled, on static caches of
``max_length`` positions (that module says what is compiled and what recompiles).

Prompts are left-padded; a prompt longer than ``max_length − max_new_tokens`` is truncated from
the left. Each row stops at its first EOS (the EOS is kept, then padding follows); the loop ends
when every row has stopped (on every rank, with ``synced_gpus``). Models run in eval mode under
``torch.no_grad`` (dropout off, and gradient checkpointing, which is only active in training
mode, does not turn the cache off), and their previous mode is restored afterwards.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import naive, ops
from . import engines, fused_decode
from .checks import check_fields
from .compiled_decode import CompiledDecode, check_usable
from .engines import all_ranks_done
from .tensor_parallel import GenerationShards


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    do_sample: bool = True  # False: greedy (argmax of the processed mixture logits)

    def __post_init__(self):
        check_fields(self)  # the rules of nashkern.rl.checks.FIELD_RULES, shared with the configs

    @property
    def has_processors(self) -> bool:
        return bool(self.top_k) or (self.top_p is not None and self.top_p < 1) \
            or bool(self.min_p) or (self.repetition_penalty not in (None, 1.0))


@dataclass
class GenerationOutput:
    prompt_ids: Tensor        # [B, P] left-padded (after left truncation)
    prompt_mask: Tensor       # [B, P]
    completion_ids: Tensor    # [B, C] right-padded with pad_token_id after the first EOS
    completion_mask: Tensor   # [B, C] 1 up to and including the first EOS

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], 1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], 1)


def mix_logits(z: Tensor, r: Optional[Tensor], coef: float) -> Tensor:
    """``(1−c)·z + c·r`` in float32 (``r`` None: ``z``), a fresh tensor the logits processors
    may write into. The end-point rule (exact at ``c = 0`` / ``1``: a masked -inf stays -inf) is
    :func:`nashkern.naive.mix_logits`, the ops' own."""
    if r is None:
        return z.float().clone()
    mixed = naive.mix_logits(z.float(), r.float(), coef)
    return mixed.clone() if coef in (0, 1) else mixed  # an end point returns an input itself


def process_logits(logits: Tensor, seen: Optional[Tensor], params: SamplingParams) -> Tensor:
    """Repetition penalty (``seen``: bool ``[B, V]``, tokens already in the row), temperature,
    top-k, top-p, min-p, as ``transformers``' processors do. ``logits``: float32 ``[B, V]``."""
    x = logits
    p = params.repetition_penalty
    if p not in (None, 1.0) and seen is not None:
        x = torch.where(seen, torch.where(x < 0, x * p, x / p), x)
    x = x / params.temperature
    neg = float("-inf")
    if params.top_k:
        k = min(int(params.top_k), x.shape[-1])
        kth = torch.topk(x, k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, neg)
    if params.top_p is not None and params.top_p < 1:
        sorted_x, idx = torch.sort(x, dim=-1, descending=False)
        cum = sorted_x.softmax(-1).cumsum(-1)
        remove = cum <= 1 - params.top_p
        remove[..., -1] = False  # keep at least one token
        x = x.masked_fill(remove.scatter(-1, idx, remove), neg)
    if params.min_p:
        probs = x.softmax(-1)
        thresh = params.min_p * probs.max(-1, keepdim=True).values
        x = x.masked_fill(probs < thresh, neg)
    return x


def sample_next(z: Tensor, r: Optional[Tensor], coef: float, params: SamplingParams,
                seen: Optional[Tensor], generator: Optional[torch.Generator]) -> Tensor:
    """One token per row from the (processed) mixture of last-position logits ``z``, ``r``
    (the most likely one with ``do_sample=False``; -1 for a row with no finite logit)."""
    if not params.do_sample:
        return greedy_next(process_logits(mix_logits(z, r, coef), seen, params))
    if not params.has_processors:
        tok = ops.mixture_sample(z, z if r is None else r, coef=0.0 if r is None else coef,
                                 temperature=params.temperature, generator=generator)
    else:
        m = process_logits(mix_logits(z, r, coef), seen, params)
        tok = ops.mixture_sample(m, m, coef=0.0, temperature=1.0, generator=generator)
    return tok


def _raise_sampled_out_of_range(tok: Tensor, bad: Tensor, vocab: int) -> None:
    """Sampled ids must lie in ``[0, V)``: -1 is the sampler's "no finite logit / NaN row"; an id
    ``>= V`` (a +inf logit on some backends) would index past the embedding."""
    row = int(bad.nonzero()[0, 0])
    raise RuntimeError(f"generation: sampled token id {int(tok[row])} in row {row} is outside "
                       f"[0, {vocab}): the row's (processed) logits have no finite entry, a "
                       "NaN or a +inf")


def greedy_next(logits: Tensor) -> Tensor:
    """argmax per row of float32 ``[B, V]`` logits; -1 where the row has a NaN or no finite
    entry (the convention of :func:`nashkern.ops.mixture_sample`)."""
    best = logits.max(-1)
    bad = torch.isnan(logits).any(-1) | ~torch.isfinite(best.values)
    return torch.where(bad, torch.full_like(best.indices, -1), best.indices)


def truncate_prompts_left(input_ids: Tensor, attention_mask: Tensor, max_prompt: int):
    """Keep the last ``max_prompt`` columns of left-padded prompts; drop all-padding columns."""
    if max_prompt < 1:
        raise ValueError("max_length must exceed max_new_tokens (no room left for the prompt)")
    input_ids, attention_mask = input_ids[:, -max_prompt:], attention_mask[:, -max_prompt:]
    if attention_mask.shape[1] and bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be left-padded (padding_side='left')")
    keep = attention_mask.any(0).nonzero()
    start = int(keep[0]) if keep.numel() else attention_mask.shape[1] - 1
    return input_ids[:, start:], attention_mask[:, start:]


CACHE_IMPLEMENTATIONS = (None, "dynamic", "static", "offloaded")


def _values_in_their_own_dtype(layer) -> None:
    """Static cache layers of transformers < 5.2x allocate the values in the keys' dtype; under
    autocast the keys come out of RoPE in float32 and the values in bf16, and the first update
    fails (``index_copy_(): self and source expected to have the same dtype``; found by the
    minimum-versions job on 5.17). Re-allocate the values in their own dtype (newer releases do)."""
    original = getattr(layer, "lazy_initialization", None)
    if original is None:
        return

    def lazy_initialization(key_states, value_states, *args, **kwargs):
        original(key_states, value_states, *args, **kwargs)
        values = getattr(layer, "values", None)
        if isinstance(values, torch.Tensor) and values.dtype != value_states.dtype:
            layer.values = torch.zeros_like(values, dtype=value_states.dtype)

    layer.lazy_initialization = lazy_initialization


def _new_cache(model, implementation: Optional[str] = None, max_cache_len: int = 0):
    """The KV cache of one model's generation: transformers' ``DynamicCache`` (default,
    ``"dynamic"``), ``DynamicCache(offloading=True)`` (``"offloaded"``: layers kept on the CPU
    between uses) or ``StaticCache`` (``"static"``: ``max_cache_len`` slots up front)."""
    if implementation not in CACHE_IMPLEMENTATIONS:
        raise ValueError(f"cache_implementation must be one of {CACHE_IMPLEMENTATIONS}, got "
                         f"{implementation!r}")
    if implementation == "static":
        from transformers import StaticCache
        cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        for layer in getattr(cache, "layers", ()):
            _values_in_their_own_dtype(layer)
        return cache
    if implementation == "offloaded":
        if next(model.parameters()).device.type == "cpu":
            raise ValueError("cache_implementation='offloaded' moves the cache from an "
                             "accelerator to the CPU: the model is already on the CPU")
        from transformers import DynamicCache
        return DynamicCache(config=model.config, offloading=True)
    try:
        from transformers import DynamicCache
        return DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - older transformers
        from transformers import DynamicCache
        return DynamicCache()


def cache_argument(model) -> str:
    """The name under which ``model``'s forward takes its KV cache: ``cache`` where its forward
    names it (transformers renames ``past_key_values``, the old name deprecated and scheduled for
    removal), else ``past_key_values`` (older releases; a forward of ``**kwargs`` only). Read once
    per model class from the forward's signature."""
    cls = type(model)
    name = _CACHE_ARGUMENT.get(cls)
    if name is None:
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        # the new name where the forward knows it (it may still list the old one, deprecated)
        name = "cache" if "cache" in params else "past_key_values"
        _CACHE_ARGUMENT[cls] = name
    return name


_CACHE_ARGUMENT: dict = {}


def _generation_cache(model, implementation, slots, compiled: Optional[CompiledDecode],
                      rows: int, role: str):
    """A model's KV cache for one generation: :func:`_new_cache`, or with ``compiled`` its
    static cache held across calls (``role``: "policy" / "reference", two caches of one PEFT
    model)."""
    if compiled is None:
        return _new_cache(model, implementation, slots)
    return compiled.cache(model, role, rows, slots)


def _decode_forward(compiled: Optional[CompiledDecode], model, tok, mask, pos, cache,
                    head=None):
    """The decode loop's one-token forward: ``(logits [R, V] float32, cache)`` of ``tok [R]``
    at ``pos [R, 1]``, eager or compiled; with a fused ``head`` (eager only) the head's input
    ``[R, D]`` instead of the logits (:func:`_forward_last_logits`)."""
    if compiled is None:
        return _forward_last_logits(model, tok[:, None], mask, pos, cache, head)
    return compiled(model, tok[:, None], mask, pos, cache), cache


def _prefill_reference(ref_model, ref_ctx, input_ids, attention_mask, pos, cache_implementation,
                       slots, compiled: Optional[CompiledDecode] = None, head=None, check=False):
    """The reference's prefill, run inside ``ref_ctx()`` (e.g. the PEFT base with the adapters
    disabled): as :func:`_prefill`, with its new KV cache."""
    cache = _generation_cache(ref_model, cache_implementation, slots, compiled,
                              input_ids.shape[0], "reference")
    with ref_ctx():
        return _prefill(ref_model, input_ids, attention_mask, pos, cache, head, check)


def _prefill(model, ids, mask, pos, cache, head, check):
    """``(last-position output, cache, head input or None)``: the logits ``[B, V]`` (no fused
    ``head``), the head's input ``[B, D]`` (a fused head known separable), or with ``check`` the
    logits AND the head's whole input ``[B, T, D]`` (the first prefill of a model: its
    separability is decided from both, :func:`fused_decode.checked`)."""
    if head is None or not check:
        out, cache = _forward_last_logits(model, ids, mask, pos, cache, head)
        return out, cache, None
    kept = []
    handle = head.module.register_forward_hook(lambda m, args, out: kept.append(args[0]))
    try:
        out, cache = _forward_last_logits(model, ids, mask, pos, cache)
    finally:
        handle.remove()
    return out, cache, kept[-1] if kept else None


def _fused_heads(model, ref_model, ref_ctx, params, device, sharded: bool, compiled):
    """``(policy head, reference head or None)`` for :mod:`fused_decode`'s sampler, or
    ``(None, None)`` with the reason logged once."""
    why = fused_decode.fused_decode_reason(params, device)
    if why is None and sharded:
        why = "vocabulary-sharded heads (tensor parallelism: the sharded sampler)"
    if why is None and compiled is not None:
        why = "compile_decode: the compiled forward computes the logits"
    pol = ref = None
    if why is None:
        pol, why = fused_decode.fused_head(model)
    if why is None and ref_model is not None:
        with ref_ctx():
            ref, why = fused_decode.fused_head(ref_model)
        if why is None and ref.softcap != pol.softcap:
            why = "the policy's and the reference's heads have different softcaps"
    if why is not None:
        fused_decode.log_fallback_once(why)
        return None, None
    return pol, ref


def _use_checked(pol, ref, ref_ctx, z, zin, r, rin):
    """After a checking prefill: ``(z, r, fused)``, the head inputs' last positions when both
    heads are separable, else the logits (logged)."""
    ok = zin is not None and fused_decode.checked(pol, zin, z)
    if ok and ref is not None:
        with ref_ctx():
            ok = rin is not None and fused_decode.checked(ref, rin, r)
    if not ok:
        fused_decode.log_fallback_once("a head is not separable from its model's body")
        return z, r, False
    return zin[:, -1], None if ref is None else rin[:, -1], True


def _cache_slots(prompt_width: int, max_new_tokens: int, max_length: Optional[int],
                 compiled: Optional[CompiledDecode]) -> int:
    """Positions of each KV cache: the prompt width + ``max_new_tokens``; with ``compiled``
    ``max_length`` (one cache length, hence one compiled graph, whatever the prompt width)."""
    if compiled is None:
        return prompt_width + max_new_tokens
    return compiled.cache_length(prompt_width, max_new_tokens, max_length)


def _prompt_tokens(params, input_ids, attention_mask, vocab) -> Optional[Tensor]:
    """``[B, V]`` bool, the tokens present in each (unpadded) prompt, for the repetition penalty
    (the sampler adds each sampled token); None when the penalty is off."""
    if params.repetition_penalty in (None, 1.0):
        return None
    return torch.zeros(input_ids.shape[0], vocab, dtype=torch.long,
                       device=input_ids.device).scatter_add_(
        1, input_ids.clamp(0, vocab - 1), attention_mask) > 0


def _forward_last_logits(model, ids, mask, pos, cache, head=None):
    """``(last-position logits [B, V] float32, cache)``; with a fused ``head``
    (:class:`fused_decode.FusedHead`) its forward is bypassed and the head's input ``[B, D]`` (the
    final hidden state) comes back instead of the logits."""
    if head is not None:
        kept = []
        with engines.patched_forward(head.module, fused_decode.keep_head_input(kept)):
            _, cache = _forward_last_logits(model, ids, mask, pos, cache)
        return kept[-1], cache
    kw = dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    inner = engines.inner_module(model)
    if hasattr(inner, "get_base_model"):  # PEFT passes the cache on to the base model's forward
        inner = inner.get_base_model()
    kw[cache_argument(inner)] = cache
    try:
        out = model(**kw, logits_to_keep=1)
    except TypeError:
        out = model(**kw)
    returned = getattr(out, "cache", None)  # the new name first: reading the old one warns
    if returned is None:
        returned = getattr(out, "past_key_values", None)
    return out.logits[:, -1].float(), cache if returned is None else returned


@contextlib.contextmanager
def _eval_mode(*models):
    modes = [(m, m.training) for m in models if m is not None]
    try:
        for m, _ in modes:
            m.eval()
        yield
    finally:
        for m, was in modes:
            m.train(was)


@torch.no_grad()
def generate(model, input_ids: Tensor, attention_mask: Tensor, *, eos_token_id: int,
             pad_token_id: int, params: SamplingParams, ref_model=None, coef: float = 0.0,
             max_length: Optional[int] = None, generator: Optional[torch.Generator] = None,
             ref_context: Optional[Callable[[], ContextManager]] = None,
             cache_implementation: Optional[str] = None, synced_gpus: bool = False,
             gather_context: Optional[Callable[[], ContextManager]] = None,
             compiled_decode: Optional[CompiledDecode] = None) -> GenerationOutput:
    """Sample completions of left-padded prompts from the policy (``ref_model`` None or
    ``coef == 0``), from the geometric mixture of ``model`` and ``ref_model``, or from the
    reference alone (``coef == 1``: ``model`` is then not run at all).

    ``ref_context``: a context-manager factory entered around every reference forward (e.g.
    ``model.disable_adapter`` when the reference is the PEFT base, then ``ref_model is model``).
    ``cache_implementation``: the KV cache of each model (see :func:`_new_cache`).
    ``compiled_decode``: the compiled one-token forward (:mod:`nashkern.rl.compiled_decode`;
    static caches of ``max_length`` positions; not with tensor parallelism or a sharded engine).

    Under a sharded engine (FSDP, ZeRO-3) every forward is a collective: ``synced_gpus`` keeps
    this rank stepping (on padding) until every rank has finished (an all-reduce of the finished
    flag per token, as ``transformers``' ``synced_gpus``), and ``gather_context`` (a
    context-manager factory, e.g. :func:`~nashkern.rl.engines.generation_context`) is held over
    the whole loop to gather what the engine needs gathered.
    """
    if not 0 <= coef <= 1:
        raise ValueError(f"coef (mixture_coef) must be in [0, 1], got {coef}")
    if ref_model is not None and coef == 1:
        # The mixture is the reference alone: sample from it without running the policy (the
        # same tokens as the two-model path at coef = 1, at half the forwards). With a PEFT
        # base as the reference (``ref_model is model``), ``ref_context`` (adapters disabled)
        # is held over the whole generation.
        with (ref_context or contextlib.nullcontext)():
            return generate(ref_model, input_ids, attention_mask, eos_token_id=eos_token_id,
                            pad_token_id=pad_token_id, params=params, max_length=max_length,
                            generator=generator, cache_implementation=cache_implementation,
                            synced_gpus=synced_gpus, gather_context=gather_context,
                            compiled_decode=compiled_decode)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if max_length is not None:
        input_ids, attention_mask = truncate_prompts_left(
            input_ids, attention_mask, max_length - params.max_new_tokens)
    attention_mask = attention_mask.to(torch.long)
    use_ref = ref_model is not None and coef > 0
    ref_ctx = ref_context or contextlib.nullcontext
    B, device = input_ids.shape[0], input_ids.device
    vocab = None
    # vocabulary-sharded heads (tensor parallelism): local logit columns, the sharded sampler
    tp = GenerationShards(model, ref_model if use_ref else None)
    synced_gpus = synced_gpus or tp.active  # every forward of a tensor-parallel model is a collective
    check_usable(compiled_decode, cache_implementation, tp.active, synced_gpus)
    with _eval_mode(model, ref_model if use_ref else None), \
            (gather_context or contextlib.nullcontext)(), tp.context():
        pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        slots = _cache_slots(input_ids.shape[1], params.max_new_tokens, max_length,
                             compiled_decode)
        cache = _generation_cache(model, cache_implementation, slots, compiled_decode, B,
                                  "policy")
        pol_head, ref_head = _fused_heads(model, ref_model if use_ref else None, ref_ctx, params,
                                          device, tp.active, compiled_decode)
        fused = pol_head is not None
        check = fused and not all(fused_decode.separability_known(h)
                                  for h in (pol_head, ref_head) if h is not None)
        z, cache, zin = _prefill(model, input_ids, attention_mask, pos, cache, pol_head, check)
        r = ref_cache = rin = None
        if use_ref:
            r, ref_cache, rin = _prefill_reference(ref_model, ref_ctx, input_ids, attention_mask,
                                                   pos, cache_implementation, slots,
                                                   compiled_decode, ref_head, check)
            r = tp.reference(r)
        if check:
            z, r, fused = _use_checked(pol_head, ref_head, ref_ctx, z, zin, r, rin)
        if not fused:
            pol_head = ref_head = None
        vocab = pol_head.vocab if fused else tp.vocab(z)
        seen = _prompt_tokens(params, input_ids, attention_mask, vocab)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        tokens, masks = [], []
        next_pos = pos[:, -1:]
        for step in range(params.max_new_tokens):
            c = coef if use_ref else 0.0
            if fused:
                sampled = fused_decode.sample(pol_head, z, ref_head, r, coefs=[c],
                                              group_rows=[B], generators=[generator],
                                              temperature=params.temperature)
            else:
                sampled = tp.sample(z, r, c, params, seen, generator, sample_next)
            bad = (sampled < 0) | (sampled >= vocab)
            tok = torch.where(finished, torch.full_like(sampled, pad_token_id), sampled)
            tokens.append(tok)
            masks.append(~finished)
            finished = finished | (tok == eos_token_id)
            # one host read per token for both flags (out-of-range id, every row finished)
            any_bad, all_finished = torch.stack([bad.any(), finished.all()]).tolist()
            if any_bad:
                _raise_sampled_out_of_range(sampled, bad, vocab)
            if seen is not None:
                seen[torch.arange(B, device=device), tok] = True
            if step == params.max_new_tokens - 1 or all_ranks_done(
                    all_finished, synced_gpus, device):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], 1)
            next_pos = next_pos + 1
            z, cache = _decode_forward(compiled_decode, model, tok, attention_mask, next_pos,
                                       cache, pol_head)
            if use_ref:
                with ref_ctx():
                    r, ref_cache = _decode_forward(compiled_decode, ref_model, tok,
                                                   attention_mask, next_pos, ref_cache, ref_head)
                r = tp.reference(r)
    completion_ids = torch.stack(tokens, 1)
    completion_mask = torch.stack(masks, 1).long()
    prompt_mask = attention_mask[:, : input_ids.shape[1]]
    return GenerationOutput(input_ids, prompt_mask, completion_ids, completion_mask)


def _repeat_cache(cache, index: Tensor):
    """Rows ``index`` of a prefilled KV cache (``[B] -> [len(index)]`` in the batch dimension,
    e.g. ``[0..B-1, 0..B-1]``: every prompt twice), through transformers' ``reorder_cache``
    (every layer's keys and values ``index_select``-ed; dynamic and static caches)."""
    reorder = getattr(cache, "reorder_cache", None)
    if reorder is None:
        raise ValueError(f"generate_pair: the KV cache {type(cache).__name__} cannot repeat its "
                         "rows (no reorder_cache)")
    reorder(index)
    return cache


def derived_generator(generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    """A second generator whose seed is a function of ``generator``'s current state, without
    advancing it (``None`` for ``None``: both samples then draw from the global RNG). Seeded
    through ``numpy.random.SeedSequence`` of (a word of the state, a constant), so its stream
    shares nothing with ``generator``'s (a seed drawn from ``generator`` itself would be the
    first seed its own sampler draws)."""
    if generator is None:
        return None
    state = generator.get_state().numpy().tobytes()
    words = np.frombuffer(state.ljust(-(-len(state) // 4) * 4, b"\0"), dtype=np.uint32)
    seed = int(np.random.SeedSequence(words.tolist() + [0x6E6B6D78])
               .generate_state(1, np.uint64)[0] >> np.uint64(1))
    second = torch.Generator(device=generator.device)
    second.manual_seed(seed)
    return second


@torch.no_grad()
def generate_pair(model, input_ids: Tensor, attention_mask: Tensor, *, eos_token_id: int,
                  pad_token_id: int, params: SamplingParams, ref_model=None, coef: float = 0.0,
                  max_length: Optional[int] = None, generator: Optional[torch.Generator] = None,
                  second_generator: Optional[torch.Generator] = None,
                  ref_context: Optional[Callable[[], ContextManager]] = None,
                  cache_implementation: Optional[str] = None, synced_gpus: bool = False,
                  gather_context: Optional[Callable[[], ContextManager]] = None,
                  compiled_decode: Optional[CompiledDecode] = None
                  ) -> Tuple[GenerationOutput, GenerationOutput]:
    """Two samples per prompt in ONE decoding loop: ``y ~ π`` (the policy) and ``y′`` from the
    geometric mixture ``π^(1−c)·μ^c`` (``coef`` = c; ``c = 1``: the reference alone, XPO's ỹ;
    ``ref_model`` None or ``c = 0``: a second policy sample, Online DPO's pair).

    Each prompt is prefilled once per model; the policy then decodes its ``2B`` rows (y rows,
    then y′ rows, the prefilled cache repeated) and the reference only the ``B`` y′ rows, so
    each model's weights are read once per token (two :func:`generate` calls read the
    policy's twice and prefill it twice). Arguments as :func:`generate`.

    Samples: ``y`` is what ``generate(model, ..., generator=generator)`` draws (the same
    generator calls, identical ids up to batch-size-dependent rounding of the forwards). ``y′``
    is what ``generate(..., ref_model, coef, generator=second_generator)`` draws;
    ``second_generator`` defaults to :func:`derived_generator` of ``generator`` (a separate
    stream: two back-to-back ``generate`` calls on one generator draw ``y′`` from where ``y``'s
    loop left it, which depends on how many tokens ``y`` took, so that exact sequence cannot be
    reproduced in one loop). A second *policy* sample (no reference in use) with no
    ``second_generator`` is drawn together with ``y`` over the ``2B`` rows by ``generator``:
    exactly ``generate(model, input_ids.repeat(2, 1), ...)``, both outputs then of the same
    length. Otherwise each output is as long as its own samples (up to each group's last
    unfinished step). ``cache_implementation="offloaded"`` runs the two :func:`generate`
    calls (its cache rows are not repeated in place)."""
    if not 0 <= coef <= 1:
        raise ValueError(f"coef (mixture_coef) must be in [0, 1], got {coef}")
    use_ref = ref_model is not None and coef > 0
    second_uses_policy = not use_ref or coef < 1
    joint = second_generator is None and not use_ref  # one sampler call over the 2B rows
    if second_generator is None and not joint:
        second_generator = derived_generator(generator)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    common = dict(eos_token_id=eos_token_id, pad_token_id=pad_token_id, params=params,
                  max_length=max_length, cache_implementation=cache_implementation,
                  synced_gpus=synced_gpus, gather_context=gather_context,
                  compiled_decode=compiled_decode)
    if cache_implementation == "offloaded":  # generate() checks compiled_decode
        if joint:
            both = generate(model, input_ids.repeat(2, 1), attention_mask.repeat(2, 1),
                            generator=generator, **common)
            return _split_rows(both, input_ids.shape[0])
        first = generate(model, input_ids, attention_mask, generator=generator, **common)
        second = generate(model, input_ids, attention_mask, ref_model=ref_model, coef=coef,
                          ref_context=ref_context, generator=second_generator, **common)
        return first, second
    if max_length is not None:
        input_ids, attention_mask = truncate_prompts_left(
            input_ids, attention_mask, max_length - params.max_new_tokens)
    attention_mask = attention_mask.to(torch.long)
    ref_ctx = ref_context or contextlib.nullcontext
    B, device = input_ids.shape[0], input_ids.device
    P = 2 * B if second_uses_policy else B  # the policy's rows
    twice = torch.cat([torch.arange(B, device=device)] * 2)
    # vocabulary-sharded heads (tensor parallelism): local logit columns, the sharded sampler
    # (every row of both samples; no [rows, V] all-gather per token)
    tp = GenerationShards(model, ref_model if use_ref else None)
    synced_gpus = synced_gpus or tp.active  # every forward of a tensor-parallel model is a collective
    check_usable(compiled_decode, cache_implementation, tp.active, synced_gpus)
    with _eval_mode(model, ref_model if use_ref else None), \
            (gather_context or contextlib.nullcontext)(), tp.context():
        pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        slots = _cache_slots(input_ids.shape[1], params.max_new_tokens, max_length,
                             compiled_decode)
        cache = _generation_cache(model, cache_implementation, slots, compiled_decode, P,
                                  "policy")
        pol_head, ref_head = _fused_heads(model, ref_model if use_ref else None, ref_ctx, params,
                                          device, tp.active, compiled_decode)
        fused = pol_head is not None
        check = fused and not all(fused_decode.separability_known(h)
                                  for h in (pol_head, ref_head) if h is not None)
        if (cache_implementation == "static" or compiled_decode is not None) and P > B:
            # a static cache sizes its tensors at the first forward: give it the 2B rows there
            z, cache, zin = _prefill(model, input_ids[twice], attention_mask[twice], pos[twice],
                                     cache, pol_head, check)
        else:
            z, cache, zin = _prefill(model, input_ids, attention_mask, pos, cache, pol_head,
                                     check)
            if P > B:
                cache = _repeat_cache(cache, twice)
                z = z[twice]
                zin = None if zin is None else zin[twice]
        r, ref_cache, rin = (_prefill_reference(ref_model, ref_ctx, input_ids, attention_mask,
                                                pos, cache_implementation, slots, compiled_decode,
                                                ref_head, check)
                             if use_ref else (None, None, None))
        r = tp.reference(r)
        if check:
            z, r, fused = _use_checked(pol_head, ref_head, ref_ctx, z, zin, r, rin)
        if not fused:
            pol_head = ref_head = None
        vocab = pol_head.vocab if fused else tp.vocab(z)
        seen = _prompt_tokens(params, input_ids, attention_mask, vocab)
        if seen is not None:
            seen = seen[twice]  # [2B]: y rows, then y′ rows
        finished = torch.zeros(2 * B, dtype=torch.bool, device=device)
        group_done = [False, False]
        lengths = [params.max_new_tokens, params.max_new_tokens]
        tokens, masks = [], []
        next_pos = pos[:, -1:]
        rows = (slice(0, B), slice(B, 2 * B))
        for step in range(params.max_new_tokens):
            if fused:
                sampled = _fused_pair_sample(pol_head, ref_head, z, r, B, coef, use_ref, joint,
                                             group_done, (generator, second_generator),
                                             params.temperature, pad_token_id)
            elif joint:
                sampled = tp.sample(z, None, 0.0, params, seen, generator, sample_next)
            else:
                parts = []
                for g, (sl, gen) in enumerate(((rows[0], generator), (rows[1], second_generator))):
                    if group_done[g]:  # its own loop would have stopped: no draw, padding
                        parts.append(torch.full((B,), pad_token_id, dtype=torch.long,
                                                device=device))
                        continue
                    if g == 0:
                        pz, pr, c = z[:B], None, 0.0
                    elif not use_ref:
                        pz, pr, c = z[B:], None, 0.0
                    elif coef == 1:
                        pz, pr, c = r, None, 0.0  # as generate(ref_model, ...) samples
                    else:
                        pz, pr, c = z[B:], r, coef
                    parts.append(tp.sample(pz, pr, c, params,
                                           None if seen is None else seen[sl], gen, sample_next))
                sampled = torch.cat(parts)
            bad = (sampled < 0) | (sampled >= vocab)
            tok = torch.where(finished, torch.full_like(sampled, pad_token_id), sampled)
            tokens.append(tok)
            masks.append(~finished)
            finished = finished | (tok == eos_token_id)
            # one host read per token: out-of-range id, each group finished
            any_bad, done0, done1 = torch.stack(
                [bad.any(), finished[:B].all(), finished[B:].all()]).tolist()
            if any_bad:
                _raise_sampled_out_of_range(sampled, bad, vocab)
            if seen is not None:
                seen[torch.arange(2 * B, device=device), tok] = True
            for g, done in enumerate((done0, done1)):
                if done and not group_done[g]:
                    group_done[g], lengths[g] = True, step + 1
            if step == params.max_new_tokens - 1 or all_ranks_done(
                    done0 and done1, synced_gpus, device):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], 1)
            next_pos = next_pos + 1
            pol_tok = tok if P > B else tok[:B]
            pol_rows = twice if P > B else slice(None)
            # A model whose rows have all finished stops (as its own generate loop would),
            # unless the ranks step together (every forward of a sharded model is a collective)
            policy_needed = not (group_done[0] and (P == B or group_done[1]))
            if policy_needed or synced_gpus:
                z, cache = _decode_forward(compiled_decode, model, pol_tok,
                                           attention_mask[pol_rows], next_pos[pol_rows], cache,
                                           pol_head)
            if use_ref and (not group_done[1] or synced_gpus):
                with ref_ctx():
                    r, ref_cache = _decode_forward(compiled_decode, ref_model, tok[B:],
                                                   attention_mask, next_pos, ref_cache, ref_head)
                r = tp.reference(r)
    completion_ids = torch.stack(tokens, 1)
    completion_mask = torch.stack(masks, 1).long()
    prompt_mask = attention_mask[:, : input_ids.shape[1]]
    both = GenerationOutput(input_ids[twice], prompt_mask[twice], completion_ids, completion_mask)
    if joint:
        return _split_rows(both, B)
    steps = completion_ids.shape[1]
    return tuple(GenerationOutput(input_ids, prompt_mask, completion_ids[sl, :min(n, steps)],
                                  completion_mask[sl, :min(n, steps)])
                 for sl, n in zip(rows, lengths))


def _fused_pair_sample(pol, ref, z, r, B, coef, use_ref, joint, group_done, generators,
                       temperature, pad_token_id):
    """:func:`generate_pair`'s draws from the head inputs ``z [2B or B, D]`` / ``r [B, Dr]``
    (:func:`fused_decode.sample`): what its logits path draws, group by group (y: the policy
    with ``generators[0]``; y′: the mixture with ``generators[1]``; a finished group draws
    nothing and gets padding), the policy's weight streamed once for both groups."""
    if joint:
        return fused_decode.sample(pol, z, None, None, coefs=[0.0], group_rows=[2 * B],
                                   generators=[generators[0]], temperature=temperature)
    out = torch.full((2 * B,), pad_token_id, dtype=torch.long, device=z.device)
    live = [not done for done in group_done]
    if use_ref and coef == 1:  # y′ from the reference alone (as generate(ref_model, ...))
        for g, (head, h) in enumerate(((pol, z[:B]), (ref, r))):
            if live[g]:
                out[g * B:(g + 1) * B] = fused_decode.sample(
                    head, h, None, None, coefs=[0.0], group_rows=[B], generators=[generators[g]],
                    temperature=temperature)
        return out
    groups = [g for g in (0, 1) if live[g]]
    if not groups:  # every row finished, this rank stepping on for the others (synced_gpus)
        return out
    coefs = [coef if g == 1 and use_ref else 0.0 for g in groups]
    h = z if groups == [0, 1] else z[groups[0] * B:(groups[0] + 1) * B]
    hr = None
    if any(coefs):  # the reference rows align with h's; the y rows' are never read
        hr = r if groups == [1] else torch.cat([r.new_zeros(B, r.shape[1]), r])
    got = fused_decode.sample(pol, h, ref if hr is not None else None, hr, coefs=coefs,
                              group_rows=[B] * len(groups),
                              generators=[generators[g] for g in groups], temperature=temperature)
    if groups == [0, 1]:
        return got
    out[groups[0] * B:(groups[0] + 1) * B] = got
    return out


def _split_rows(out: GenerationOutput, B: int) -> Tuple[GenerationOutput, GenerationOutput]:
    """The first and the last ``B`` rows of a ``2B``-row output."""
    return tuple(GenerationOutput(out.prompt_ids[sl], out.prompt_mask[sl],
                                  out.completion_ids[sl], out.completion_mask[sl])
                 for sl in (slice(0, B), slice(B, 2 * B)))

