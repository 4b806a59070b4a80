"""Tensor argument checks shared by the op families: every error names the argument and what
was expected, and is raised before anything is launched."""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.layout import FLOAT_DTYPES, NUM_STATS
from ..types import TokenStats


def check_float(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")


def check_same_device(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; "
                         "move them to the same device")


def check_targets(targets: Tensor, lead: torch.Size, vocab: int, ignore_index: int,
                  device: torch.device, what: str) -> Tensor:
    """Validate ``targets`` against the leading shape and the vocabulary; return int64 ``[N]``.

    The range check never synchronises with a GPU. CPU tensors (no sync to pay): a ValueError
    naming the first bad value. CUDA tensors, and anything under ``torch.compile`` (hence CUDA
    graphs): ``torch._assert_async`` on the device, which fails the stream with the message
    below at its next synchronisation (a device-side assert, like PyTorch's own index checks
    in ``gather`` / ``cross_entropy``), so a whole training step stays capturable."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor of token ids, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor of token ids, got {targets.dtype}")
    if targets.shape != lead:
        raise ValueError(f"targets must have the leading shape of {what}, {tuple(lead)}, "
                         f"got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"targets is on {targets.device} but {what} is on {device}")
    flat = targets.reshape(-1).to(torch.long).contiguous()
    if flat.numel():
        bad = (flat != ignore_index) & ((flat < 0) | (flat >= vocab))
        if flat.device.type != "cpu" or torch.compiler.is_compiling():
            torch._assert_async(~bad.any(), f"nashkern: targets must be in [0, {vocab}) or "
                                            f"equal ignore_index={ignore_index}")
        elif bool(bad.any()):
            value = int(flat[bad.nonzero()[0, 0]])
            raise ValueError(f"targets must be in [0, {vocab}) or equal ignore_index={ignore_index}, "
                             f"found {value}")
    return flat


def unpack_stats(stats: Tensor, lead: torch.Size, has_targets: bool, has_ref: bool,
                 has_mix: bool) -> TokenStats:
    """Views of the packed ``[5, N]`` statistics as ``[...]``; fields not computed are None."""
    fields = TokenStats._fields
    present = {"entropy"}
    if has_targets:
        present.add("logprobs")
    if has_ref:
        present.add("kl")
        if has_targets:
            present.add("ref_logprobs")
            if has_mix:
                present.add("mixture_logprobs")
    assert len(fields) == NUM_STATS
    return TokenStats(*(stats[k].view(lead) if name in present else None
                        for k, name in enumerate(fields)))
