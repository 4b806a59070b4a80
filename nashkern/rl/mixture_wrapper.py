"""``GeometricMixtureWrapper``: TRL 1.13's model wrapper whose forward returns the log-softmax of
the geometric mixture of two models, ``log_softmax((1 − c)·z + c·z_ref)`` ``[B, T, V]``, so that
``transformers``' ``generate`` samples from ``π^(1−c)·μ^c``.

Same constructor and outputs as TRL's. The normaliser ``logsumexp((1 − c)·z + c·z_ref)`` comes
from :func:`nashkern.ops.mixture_logprobs` (one streaming pass over the vocabulary per position,
fp32 accumulation); the ``[B, T, V]`` output is the wrapper's contract, so it is materialised.

nashkern's trainers do not use it: :func:`nashkern.rl.generation.generate` samples the mixture
with one KV cache per model and only last-position logits, where this wrapper (like TRL's) runs
both models over the whole sequence at every token (``use_cache=False``).
"""
from __future__ import annotations

import torch
from transformers import GenerationMixin

from .. import naive, ops


def mixture_log_softmax(logits: torch.Tensor, ref_logits: torch.Tensor, coef: float) -> torch.Tensor:
    """``log_softmax((1 − coef)·logits + coef·ref_logits)`` over the last dim, float32.

    The mixture's log-normaliser is read off :func:`nashkern.ops.mixture_logprobs` at each
    row's most likely token (finite unless the whole row is -inf):
    ``L = m[t] − log π_mix(t)``. The mixture follows the ops' end-point rule
    (:func:`nashkern.naive.mix_logits`): at ``coef`` 0 / 1 a -inf in the unused model is ignored."""
    mixed = naive.mix_logits(logits.float(), ref_logits.float(), coef)
    target = mixed.argmax(-1)
    lp = ops.mixture_logprobs(logits, ref_logits, target, coef=float(coef))
    lse = mixed.gather(-1, target[..., None])[..., 0] - lp
    return mixed - lse[..., None]


class GeometricMixtureWrapper(GenerationMixin):
    """Wraps ``model`` and ``ref_model`` (same vocabulary) so that ``forward`` returns
    ``model``'s output with ``logits`` replaced by the mixture's log-probabilities and
    ``generate`` samples from the mixture (``generation_config`` as given; the cache is off).

    Args: ``model``, ``ref_model``, ``generation_config``, ``mixture_coef`` (``c``, the reference's
    weight, default 0.5), ``device``."""

    main_input_name = "input_ids"
    _supports_cache_class = False
    _supports_static_cache = False
    _is_stateful = False

    def __init__(self, model, ref_model, generation_config, mixture_coef: float = 0.5,
                 device=None):
        super().__init__()
        if not 0 <= mixture_coef <= 1:
            raise ValueError(f"mixture_coef must be in [0, 1], got {mixture_coef}")
        self.model, self.ref_model = model, ref_model
        self.config = model.config
        self.generation_config = generation_config
        self.mixture_coef = mixture_coef
        self.device = torch.device(device) if device is not None else getattr(model, "device", None)
        self._is_stateful = getattr(model, "_is_stateful", False)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    @torch.inference_mode()
    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        ref_logits = self.ref_model(*args, **kwargs).logits
        out.logits = mixture_log_softmax(out.logits, ref_logits, self.mixture_coef).to(
            out.logits.dtype)
        return out

    def prepare_inputs_for_generation(self, *args, **kwargs):
        kwargs["use_cache"] = False  # one cache cannot serve two models
        inputs = self.model.prepare_inputs_for_generation(*args, **kwargs)
        self.ref_model.prepare_inputs_for_generation(*args, **kwargs)
        return inputs

    # the rest of GenerationMixin's model interface is the policy's
    def _validate_model_class(self):
        self.model._validate_model_class()

    def _validate_model_kwargs(self, model_kwargs):
        return self.model._validate_model_kwargs(model_kwargs)

    def get_experts_implementation(self):
        return self.model.get_experts_implementation()

    def set_experts_implementation(self, experts_implementation):
        self.model.set_experts_implementation(experts_implementation)
