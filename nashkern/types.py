"""Small public types."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

# The packed-output rows are declared once, at the bottom layer (kernels/layout.py).
from .kernels.layout import (  # noqa: F401  (re-exported)
    ENTROPY, KL, LOGPROBS, LSE_MIXTURE, LSE_POLICY, LSE_REF, MIXTURE_LOGPROBS, NUM_LSE, NUM_STATS,
    REF_LOGPROBS,
)


class TokenStats(NamedTuple):
    """Per-token float32 statistics, each of shape ``[...]`` (the leading dims of the input).

    Fields that were not asked for (no reference, no ``coef``) are ``None``.
    """

    logprobs: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]
    ref_logprobs: Optional[torch.Tensor] = None
    kl: Optional[torch.Tensor] = None
    mixture_logprobs: Optional[torch.Tensor] = None
