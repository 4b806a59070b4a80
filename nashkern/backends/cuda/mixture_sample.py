"""``mixture_sample`` on the CUDA backend: the Gumbel-max kernels of ``csrc/mixture_sample.cu``
through the ctypes library (``library.py``)."""
from __future__ import annotations

import ctypes

import torch

from ...kernels import layout
from ...kernels.layout import Scalars
from .library import DTYPE_CODES, Launch, MixtureSampleArgs, check_rc, loaded, ptr


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def mixture_sample(logits, ref_logits, seed, scalars: Scalars):
    """Gumbel-max sample of each row of mix(z / T, r / T, coef): ``[B, V]`` -> int64 ``[B]``
    (-1 for rows with no finite mixture logit or with a NaN). ``seed``: int64 ``[1]`` on the
    logits' device, read by the kernel (no host synchronisation)."""
    layout.check_logits_view("logits", logits, 2)
    layout.check_logits_view("ref_logits", ref_logits, 2)
    if ref_logits.shape != logits.shape or ref_logits.device != logits.device:
        raise ValueError("ref_logits must match logits in shape and device")
    if (seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != logits.device):
        raise ValueError("seed must be an int64 tensor of one element on the logits' device")
    seed = seed.reshape(1).contiguous()
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    launch = Launch(logits.device)
    ws_bytes = loaded().nashkern_mixture_sample_workspace(B, V, launch.num_sms, launch.splits)
    workspace = (torch.empty(ws_bytes, dtype=torch.uint8, device=logits.device)
                 if ws_bytes > 0 else None)
    args = MixtureSampleArgs(
        logits=logits.data_ptr(), logits_dtype=DTYPE_CODES[logits.dtype],
        logits_stride=logits.stride(0), ref=ref_logits.data_ptr(),
        ref_dtype=DTYPE_CODES[ref_logits.dtype], ref_stride=ref_logits.stride(0),
        seed=seed.data_ptr(), out=out.data_ptr(), workspace=ptr(workspace),
        workspace_bytes=ws_bytes, B=B, V=V, coef=float(scalars.coef),
        temperature=float(scalars.temperature), launch=launch.args())
    with launch.guard():
        rc = loaded().nashkern_mixture_sample(ctypes.byref(args))
    check_rc(rc, "mixture_sample")
    return out
