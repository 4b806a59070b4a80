"""Launch-shape helpers shared by the Triton kernels."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the CPU interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def num_vocab_splits(n_rows: int, n_tiles: int, device: torch.device, programs_per_sm: int) -> int:
    """Vocabulary chunks per row: enough ``(row, chunk)`` programs to fill the device, at most
    one chunk per tile. Many rows: 1 (no workspace, no merge)."""
    return max(1, min(n_tiles, programs_per_sm * num_sms(device) // n_rows))
