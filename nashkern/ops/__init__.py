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

Layout: one file per op family, named after it (``token_stats.py``: token_stats / logprobs /
entropy / kl / mixture_logprobs; ``linear_token_stats.py``; ``mixture_sample.py``; ``linear_mixture_sample.py``), each
declaring its custom ops and its backend table; ``registry.py`` holds the shared scalar schema
(:class:`Scalars`) and the backend choice; :data:`FAMILIES` lists them all. The public functions
share their modules' names: ``nashkern.ops.token_stats`` is the function; the module is
``sys.modules["nashkern.ops.token_stats"]`` (``from nashkern.ops.token_stats import FAMILY``).
"""
from ..types import TokenStats
from .linear_token_stats import FAMILY as _LINEAR_TOKEN_STATS
from .linear_token_stats import linear_token_stats
from .linear_mixture_sample import FAMILY as _LINEAR_MIXTURE_SAMPLE
from .linear_mixture_sample import linear_mixture_sample
from .mixture_sample import FAMILY as _MIXTURE_SAMPLE
from .mixture_sample import mixture_sample
from .registry import BACKENDS, Family, Implementation, Scalars, resolve_backend
from .token_stats import FAMILY as _TOKEN_STATS
from .token_stats import entropy, kl, logprobs, mixture_logprobs, token_stats

#: Every op family, in one tuple: the memory recorder and the benchmarks read it.
FAMILIES = (_TOKEN_STATS, _LINEAR_TOKEN_STATS, _MIXTURE_SAMPLE, _LINEAR_MIXTURE_SAMPLE)

__all__ = [
    "TokenStats", "logprobs", "entropy", "kl", "mixture_logprobs", "mixture_sample",
    "token_stats", "linear_token_stats", "linear_mixture_sample", "FAMILIES", "Scalars", "BACKENDS",
]
