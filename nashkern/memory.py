"""Allocation recording: prove that a computation never creates a tokens x vocab tensor.

``AllocationRecorder`` is a ``TorchDispatchMode`` that records the size of every tensor an op
returns in fresh storage, forward and backward. It sees through nashkern's custom ops by
running their Python implementation under the mode, so the allocations of every backend are
recorded too. It is deterministic: it counts tensors, not allocator statistics.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

from .ops import FAMILIES

_CUSTOM_OPS = {op._opoverload: op for family in FAMILIES for op in family.custom_ops}


def _plain(values):
    """The plain tensors among ``values``, a tensor subclass (a ``DTensor`` of a tensor-parallel
    model) replaced by its inner tensors: the local shard is what this rank allocates."""
    for t in values:
        if not isinstance(t, torch.Tensor):
            continue
        if is_traceable_wrapper_subclass(t):
            yield from _plain(getattr(t, name) for name in t.__tensor_flatten__()[0])
        else:
            yield t


class AllocationRecorder(TorchDispatchMode):
    """Usage::

        with AllocationRecorder() as rec:
            loss = ops.linear_token_stats(h, w, t).logprobs.sum()
            loss.backward()
        elements, op = rec.largest()
    """

    def __init__(self):
        super().__init__()
        self.sizes: List[Tuple[int, str]] = []  # (elements of the new storage, op name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        custom = _CUSTOM_OPS.get(func)
        if custom is not None:
            with self:  # run the op's own implementation under the recorder
                return custom._init_fn(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in _plain(tree_flatten((args, kwargs))[0])}
        out = func(*args, **kwargs)
        for t in _plain(tree_flatten(out)[0]):
            if t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append((t.untyped_storage().nbytes() // t.element_size(), str(func)))
        return out

    def largest(self) -> Tuple[int, str]:
        """(elements, op) of the largest tensor created, or (0, '') if none."""
        return max(self.sizes, default=(0, ""))
