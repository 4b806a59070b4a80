"""Output allocation shared by every backend's ``token_stats_backward``."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

GradPair = Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]


def grad_outputs(logits: torch.Tensor, ref_logits: Optional[torch.Tensor], needs_grad_logits: bool,
                 needs_grad_ref: bool, out: Optional[GradPair] = None) -> GradPair:
    """The (grad_logits, grad_ref) tensors a backward writes: contiguous ``[G, R, V]`` in the
    inputs' dtypes, None where not needed. ``out`` supplies them instead of allocating (the
    chunked linear strategy passes its logits buffers, which the kernels overwrite in place:
    every program / thread reads its columns before it writes them)."""
    wanted = ((logits, needs_grad_logits), (ref_logits, needs_grad_ref and ref_logits is not None))
    given = out if out is not None else (None, None)
    result = []
    for (x, need), dest in zip(wanted, given):
        if not need:
            result.append(None)
        elif dest is None:
            result.append(torch.empty(x.shape, dtype=x.dtype, device=x.device))
        else:
            if dest.shape != x.shape or dest.dtype != x.dtype or not dest.is_contiguous() \
                    or dest.device != x.device:
                raise ValueError(f"out must hold contiguous {tuple(x.shape)} {x.dtype} tensors "
                                 f"on {x.device}, got {tuple(dest.shape)} {dest.dtype}")
            result.append(dest)
    return result[0], result[1]
