"""Small public types."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

#: Row indices of the packed ``[5, N]`` float32 statistics tensor shared by every backend.
LOGPROBS, ENTROPY, REF_LOGPROBS, KL, MIXTURE_LOGPROBS = range(5)
NUM_STATS = 5
#: Row indices of the packed ``[3, N]`` log-sum-exp tensor saved for the backward.
LSE_POLICY, LSE_REF, LSE_MIXTURE = range(3)
NUM_LSE = 3


class TokenStats(NamedTuple):
    """Per-token float32 statistics, each of shape ``[...]`` (the leading dims of the input).

    Fields that were not asked for (no reference, no ``coef``) are ``None``.
    """

    logprobs: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]
    ref_logprobs: Optional[torch.Tensor] = None
    kl: Optional[torch.Tensor] = None
    mixture_logprobs: Optional[torch.Tensor] = None
