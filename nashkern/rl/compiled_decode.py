"""The opt-in compiled decode step of nashkern's generation (config field ``compile_decode``).

What is compiled: each model's **one-token forward** of the decode loop (``[R, 1]`` token ids ->
``[R, V]`` float32 last-position logits, the KV cache a transformers ``StaticCache`` updated in
place), with ``torch.compile(dynamic=False, fullgraph=True, mode=...)``; ``mode=
"reduce-overhead"`` records it as a CUDA graph on a GPU (one launch per token instead of one per
kernel). The prefill (variable prompt width), the sampler, the logits processors and the loop's
bookkeeping stay eager.

Fixed shapes, so that the loop never recompiles while it runs and a later step does not either:

* the static cache holds ``max_length`` positions (the config's prompt + completion limit; a
  prompt is cut to ``max_length − max_new_tokens``), whatever the batch's prompt width;
* the 2-D attention mask handed to the compiled forward is ``[R, max_length]`` (the prompt's
  padding, ones after it; the causal mask hides the slots not written yet), not the growing
  ``[R, P + t]`` of the eager loop;
* the position (``position_ids [R, 1]``, the cache's ``cumulative_length``) changes as tensor
  **values**, never as Python ints (transformers marks the cache tensors static), so guards do not
  see it;
* each model's cache is allocated once and reset (zeroed) by later calls with the same rows and
  length (stable addresses: CUDA graphs replay without re-recording).

What recompiles (a new graph per model, ``torch._dynamo`` counts it): the first call for each
model (policy, reference, a PEFT model with its adapters disabled, Nash-EMA's average), a new
row count ``R`` (a last, smaller batch; ``generate_pair`` runs the policy on ``2B`` rows and the
reference on ``B``), a new cache length (``max_length``; without ``max_length`` it is the prompt
width + ``max_new_tokens``, so every new width recompiles), a new dtype or autocast state.
torch's ``recompile_limit`` (8 graphs per code object, all models and trainers of the process
together) bounds the set; past it the call raises rather than running eagerly.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor

from . import engines
from .checks import COMPILE_DECODE_MODES


def _base_model(model):
    inner = engines.inner_module(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def compile_problem(model) -> Optional[str]:
    """Why ``model``'s one-token forward cannot take a static cache under ``torch.compile``
    (None when it can): transformers' own flag ``_can_compile_fullgraph`` (False for the
    architectures whose cache or attention code is not compilable)."""
    base = _base_model(model)
    if not getattr(base, "_can_compile_fullgraph", False):
        return (f"{type(base).__name__} does not support a static KV cache under torch.compile "
                f"(transformers' _can_compile_fullgraph is False for it)")
    return None


def _one_token_logits(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                      cache, cache_name: str) -> Tensor:
    """``[R, V]`` float32 logits of the one new token per row (the compiled function)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, **{cache_name: cache})
    return out.logits[:, -1].float()


class CompiledDecode:
    """The compiled one-token forward and the static caches of the models it decodes; held by
    the trainer for its whole life (compiled at the first step, reused by the next ones)."""

    def __init__(self, mode: str = "default"):
        if mode not in COMPILE_DECODE_MODES or mode is None:
            raise ValueError(f"compile_decode must be one of {COMPILE_DECODE_MODES[1:]}, got "
                             f"{mode!r}")
        self.mode = mode
        self._step = torch.compile(_one_token_logits, dynamic=False, fullgraph=True, mode=mode)
        self._caches = {}  # (id(model), role) -> (weakref(model), rows, length, StaticCache)
        self._lengths = weakref.WeakKeyDictionary()  # StaticCache -> its positions

    @staticmethod
    def cache_length(prompt_width: int, max_new_tokens: int, max_length: Optional[int]) -> int:
        """The static cache's positions: ``max_length`` (fixed across steps), else the prompt
        width + ``max_new_tokens``."""
        return max_length if max_length is not None else prompt_width + max_new_tokens

    def cache(self, model, role: str, rows: int, length: int):
        """``model``'s static cache for ``rows`` rows and ``length`` positions, reset: the one of
        the previous call when its rows and length match (same tensors), else a new one."""
        from .generation import _new_cache

        key = (id(model), role)
        held = self._caches.get(key)
        if held is not None and held[0]() is model and held[1:3] == (rows, length):
            held[3].reset()
            return held[3]
        cache = _new_cache(model, "static", length)
        self._caches[key] = (weakref.ref(model), rows, length, cache)
        self._lengths[cache] = length
        return cache

    def __call__(self, model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                 cache) -> Tensor:
        """``[R, V]`` float32 logits of ``input_ids [R, 1]`` at ``position_ids [R, 1]``;
        ``cache`` one of :meth:`cache`'s; ``attention_mask [R, P + t]`` (the loop's growing
        mask) is padded with ones to the cache's length first."""
        length = self._lengths.get(cache)
        if length is None:
            raise ValueError("CompiledDecode: the cache was not made by CompiledDecode.cache")
        mask = torch.nn.functional.pad(attention_mask, (0, length - attention_mask.shape[1]),
                                       value=1)
        from .generation import cache_argument

        graphs = self.mode == "reduce-overhead"
        if graphs:
            # Each call its own CUDA-graph generation: the policy's and the reference's graphs
            # alternate, and a reference that decodes on alone (its policy rows all finished)
            # would otherwise grow a chain of new recordings in cudagraph trees.
            torch.compiler.cudagraph_mark_step_begin()
        # past torch's recompile limit dynamo would run the forward eagerly, with a warning
        # only: raise instead (nothing silent)
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            logits = self._step(model, input_ids, mask, position_ids, cache,
                                cache_argument(_base_model(model)))
        # a CUDA graph's output is overwritten by its next replay (the next mark_step_begin):
        # the sampler reads the policy's and the reference's logits together, so copy
        # ([R, V] float32: 4.9 MB for R = 8, V = 151936)
        return logits.clone() if graphs else logits


def check_usable(compiled: Optional[CompiledDecode], cache_implementation, sharded_head: bool,
                 synced_gpus: bool) -> None:
    """Raise when ``compile_decode`` is combined with what it does not support (generation
    checks it at every call; the trainers at construction)."""
    if compiled is None:
        return
    if cache_implementation not in (None, "static"):
        raise ValueError(f"compile_decode={compiled.mode!r} decodes with a static KV cache: "
                         f"cache_implementation must be None or 'static', got "
                         f"{cache_implementation!r}")
    if sharded_head:
        raise ValueError(f"compile_decode={compiled.mode!r} is not supported with tensor "
                         f"parallelism (a vocabulary-sharded head): set compile_decode=None")
    if synced_gpus:
        raise ValueError(f"compile_decode={compiled.mode!r} is not supported under a sharded "
                         f"engine (FSDP, DeepSpeed ZeRO-3: every forward gathers weights): set "
                         f"compile_decode=None")
