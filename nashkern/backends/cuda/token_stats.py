"""``token_stats`` on the CUDA backend: the kernels of ``csrc/token_stats.cu`` through the
ctypes library (``library.py``)."""
from __future__ import annotations

import ctypes

import torch

from ...kernels import layout
from ...kernels.layout import NUM_LSE, NUM_STATS, Scalars
from .library import DTYPE_CODES, Launch, TokenStatsArgs, check_rc, loaded, ptr


# ----------------------------------------------------------------------------------------------
# Token statistics over logits (contract: DESIGN.md)
# ----------------------------------------------------------------------------------------------
def _args(logits, targets, ref_logits, scalars: Scalars, launch: Launch, **fields
            ) -> TokenStatsArgs:
    """The call's ``NashkernTokenStatsArgs``: the inputs, the scalars, the launch, and the
    direction's own pointers (``fields``: stats, lse, workspace, grad_stats, grad_logits, ...)."""
    G, R, V = logits.shape
    ref = ref_logits if ref_logits is not None else logits  # ref NULL: the dtype is unused
    return TokenStatsArgs(
        logits=logits.data_ptr(), logits_dtype=DTYPE_CODES[logits.dtype],
        logits_stride_g=logits.stride(0), logits_stride_r=logits.stride(1),
        ref=ptr(ref_logits), ref_dtype=DTYPE_CODES[ref.dtype],
        ref_stride_g=ref.stride(0) if ref_logits is not None else 0,
        ref_stride_r=ref.stride(1) if ref_logits is not None else 0,
        targets=ptr(targets), R=R, N=G * R, V=V,
        has_coef=int(scalars.coef is not None), coef=float(scalars.coef or 0.0),
        temperature=float(scalars.temperature), has_softcap=int(scalars.softcap is not None),
        softcap=float(scalars.softcap or 0.0), ignore_index=int(scalars.ignore_index),
        launch=launch.args(), **{k: ptr(v) if isinstance(v, torch.Tensor) or v is None else v
                                 for k, v in fields.items()})


def token_stats_forward(logits, targets, ref_logits, scalars: Scalars):
    """stats ``[5, N]`` and lse ``[3, N]`` (float32) of ``[G, R, V]`` logits."""
    layout.check_token_stats_inputs(logits, targets, ref_logits, scalars.coef)
    G, R, V = logits.shape
    N = G * R
    launch = Launch(logits.device)
    stats = torch.empty((NUM_STATS, N), dtype=torch.float32, device=logits.device)
    lse = torch.empty((NUM_LSE, N), dtype=torch.float32, device=logits.device)
    ws_bytes = loaded().nashkern_token_stats_forward_workspace(N, V, launch.num_sms,
                                                                 launch.splits)
    workspace = (torch.empty(ws_bytes, dtype=torch.uint8, device=logits.device)
                 if ws_bytes > 0 else None)
    args = _args(logits, targets, ref_logits, scalars, launch, stats=stats, lse=lse,
                 workspace=workspace, workspace_bytes=ws_bytes)
    with launch.guard():
        rc = loaded().nashkern_token_stats_forward(ctypes.byref(args))
    check_rc(rc, "token_stats_forward")
    return stats, lse


def token_stats_backward(grad_stats, logits, targets, ref_logits, stats, lse, scalars: Scalars, *,
                         needs_grad_logits, needs_grad_ref, out=None):
    """(grad_logits, grad_ref_logits): contiguous ``[G, R, V]`` in the inputs' dtypes, or None.
    ``out``: optional destinations, possibly the inputs themselves (each thread reads its
    columns before writing their gradients)."""
    layout.check_token_stats_inputs(logits, targets, ref_logits, scalars.coef)
    G, R, V = logits.shape
    N = G * R
    needs_grad_ref = bool(needs_grad_ref) and ref_logits is not None
    if not (needs_grad_logits or needs_grad_ref):
        return None, None
    for name, x, rows in (("grad_stats", grad_stats, NUM_STATS), ("stats", stats, NUM_STATS),
                          ("lse", lse, NUM_LSE)):
        if x.shape != (rows, N) or x.device != logits.device:
            raise ValueError(f"{name} must be a [{rows}, {N}] tensor on the logits' device")
    grad_stats = grad_stats.to(torch.float32).contiguous()
    stats = stats.to(torch.float32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    grad_logits, grad_ref = layout.grad_outputs(logits, ref_logits, needs_grad_logits,
                                                needs_grad_ref, out)
    launch = Launch(logits.device)
    args = _args(logits, targets, ref_logits, scalars, launch, stats=stats, lse=lse,
                 grad_stats=grad_stats, grad_logits=grad_logits, grad_ref=grad_ref)
    with launch.guard():
        rc = loaded().nashkern_token_stats_backward(ctypes.byref(args))
    check_rc(rc, "token_stats_backward")
    return grad_logits, grad_ref
