"""Fused vocabulary ops: log-probs, entropy, KL and the geometric mixture, streamed over the
vocabulary so that no ``tokens x vocab`` tensor is ever created by the fast paths.

Shapes: logits ``[..., V]`` (any leading dims), hidden states ``[..., D]`` with an lm_head
weight ``[V, D]``; every per-token result is float32 of the leading shape ``[...]``. Inputs may
be float32, bfloat16 or float16; arithmetic accumulates in float32. Gradients flow to every
floating input that requires grad (first order only: double backward raises).

Semantics (DESIGN.md): softcap ``z <- s * tanh(z / s)`` is applied to each model's logits first
(``-inf`` entries stay masked), then the mixture ``(1 - coef) * z + coef * z_ref`` (``coef`` is
the weight of the reference), then the temperature. Backends: ``"torch"`` (streaming PyTorch,
the CPU path), ``"triton"`` (GPU, or the CPU interpreter with ``TRITON_INTERPRET=1``),
``"cuda"`` (the optional nvcc-built kernels of ``csrc/``) and ``"auto"``.

Layout: one file per op family (``stats.py``: token_stats / logprobs / entropy / kl /
mixture_logprobs; ``linear_stats.py``: linear_token_stats; ``sampling.py``: mixture_sample),
each declaring its custom ops and its backend table; ``registry.py`` holds the shared scalar
schema (:class:`Scalars`) and the backend choice; :data:`FAMILIES` lists them all.
"""
from ..types import TokenStats
from . import linear_stats, sampling, stats
from .linear_stats import linear_token_stats
from .registry import BACKENDS, Family, Implementation, Scalars, resolve_backend
from .sampling import mixture_sample
from .stats import entropy, kl, logprobs, mixture_logprobs, token_stats

#: Every op family, in one tuple: the memory recorder and the benchmarks read it.
FAMILIES = (stats.FAMILY, linear_stats.FAMILY, sampling.FAMILY)

__all__ = [
    "TokenStats", "logprobs", "entropy", "kl", "mixture_logprobs", "mixture_sample",
    "token_stats", "linear_token_stats", "FAMILIES", "Scalars", "BACKENDS",
]
