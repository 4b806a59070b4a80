"""What every backend (torch, Triton, CUDA) agrees on, in plain Python: no Triton needed.

The bottom layer of nashkern: the ops layer (``nashkern/ops/``) and the backends import this,
never the other way round.

* Rows of the packed outputs: ``stats [NUM_STATS, N]`` and ``lse [NUM_LSE, N]`` (float32).
* The ONE split workspace layout of the Triton stats kernels, ``[NUM_PARTIALS, splits, N]``
  float32 (row ``PART_*`` of split ``s`` of token ``n`` at ``(PART_* * splits + s) * N + n``):
  per model the online ``(max, sum exp, sum exp * shifted, sum exp * (a - b), target logit)``.
* Split planning: how many programs share one row's vocabulary (:func:`plan_vocab_splits`).
* :class:`Scalars` ``(coef, temperature, softcap, ignore_index)``: validated once by the op
  (``Scalars.checked``), then passed whole to every backend, strategy and kernel host wrapper.
* The coef end-point rule: the mixture ``(1 - c) a + c b`` is the
  policy exactly at ``c == 0`` and the reference exactly at ``c == 1`` (never ``0 * -inf``).
  Triton applies it in-kernel (``kernels/common.py: mix``), CUDA through its ``MixMode``
  (``csrc/common.cuh``), the torch backend and the naive definition through
  ``nashkern.naive.mix_logits``.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import astuple, dataclass
from typing import Dict, Optional, Tuple

import torch

#: Row indices of the packed ``[5, N]`` float32 statistics tensor shared by every backend.
LOGPROBS, ENTROPY, REF_LOGPROBS, KL, MIXTURE_LOGPROBS = range(5)
NUM_STATS = 5
#: Row indices of the packed ``[3, N]`` log-sum-exp tensor saved for the backward.
LSE_POLICY, LSE_REF, LSE_MIXTURE = range(3)
NUM_LSE = 3

#: Rows of the split workspace ``[NUM_PARTIALS, splits, N]`` (policy a, reference b, mixture m):
#: running max, sum exp(x - max), sum exp(a - max) (a - max), sum exp(a - max) (a - b), and the
#: target's logit (kernels that reload the target logit at the merge leave TGT_* unused).
(PART_MAX_A, PART_SUM_A, PART_ENT_A, PART_KL_A, PART_TGT_A,
 PART_MAX_B, PART_SUM_B, PART_TGT_B,
 PART_MAX_M, PART_SUM_M, PART_TGT_M) = range(11)
NUM_PARTIALS = 11

# ----------------------------------------------------------------------------------------------
# The scalar schema every op shares (``nashkern.ops.Scalars``)
# ----------------------------------------------------------------------------------------------
_NUMBER = (int, float, torch.SymInt, torch.SymFloat)


def _is_number(x) -> bool:
    return isinstance(x, _NUMBER) and not isinstance(x, bool)


def _shown(x):
    """``x`` for an error message; under ``torch.compile`` a constant (dynamo cannot format a
    SymFloat into a string; the compile error then carries the message)."""
    return "a value traced by torch.compile" if torch.compiler.is_compiling() else x


def _finite_positive(x) -> bool:
    """``0 < x < inf`` (False for NaN); plain comparisons, so that it traces under
    ``torch.compile(dynamic=True)`` where ``x`` is a SymFloat (``math.isfinite`` is not)."""
    return bool(x > 0) and bool(x < math.inf)


@dataclass(frozen=True)
class Scalars:
    """The scalar parameters of every op, validated once per call (:meth:`checked`).

    coef: weight of the reference in the geometric mixture ``(1 - coef) z + coef z_ref``, in
    [0, 1] (0 = the policy exactly, 1 = the reference exactly), or None (no mixture);
    temperature: T > 0; softcap: s > 0 or None; ignore_index: target value of skipped positions.
    """

    coef: Optional[float] = None
    temperature: float = 1.0
    softcap: Optional[float] = None
    ignore_index: int = -100

    @classmethod
    def checked(cls, coef=None, temperature=1.0, softcap=None, ignore_index=-100) -> "Scalars":
        """Validate the user's scalars (TypeError / ValueError naming the argument) and return
        them as Python floats / int (SymFloats / SymInts under ``torch.compile`` stay symbolic)."""
        if coef is not None:
            if not _is_number(coef):
                raise TypeError(f"coef must be a Python float in [0, 1], got {type(coef).__name__}")
            if not (bool(coef >= 0) and bool(coef <= 1)):  # False for NaN
                raise ValueError(f"coef must be in [0, 1] (0 = policy, 1 = reference), got {_shown(coef)}")
        if not _is_number(temperature):
            raise TypeError(f"temperature must be a Python float > 0, got {type(temperature).__name__}")
        if not _finite_positive(temperature):
            raise ValueError(f"temperature must be a finite float > 0, got {_shown(temperature)}")
        if softcap is not None:
            if not _is_number(softcap):
                raise TypeError(f"softcap must be None or a Python float > 0, got {type(softcap).__name__}")
            if not _finite_positive(softcap):
                raise ValueError(f"softcap must be None or a finite float > 0, got {_shown(softcap)}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, torch.SymInt)):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        return cls(None if coef is None else _as_float(coef), _as_float(temperature),
                   None if softcap is None else _as_float(softcap), ignore_index)

    def as_args(self) -> Tuple:
        """``(coef, temperature, softcap, ignore_index)``: how the custom ops' schemas take them
        (below the custom ops every backend, strategy and kernel host wrapper receives the
        ``Scalars`` whole)."""
        return astuple(self)

    def kernel_args(self) -> Dict[str, object]:
        """The scalar arguments of the Triton kernels: absent values as 0 (their ``HAS_*``
        flags say absent), the temperature as its inverse."""
        return dict(coef=0.0 if self.coef is None else float(self.coef),
                    inv_temperature=1.0 / self.temperature,
                    softcap=0.0 if self.softcap is None else float(self.softcap),
                    ignore_index=self.ignore_index)


def _as_float(x):
    return x if isinstance(x, torch.SymFloat) else float(x)



#: Floating dtypes every kernel accepts (arithmetic is fp32 whatever the input dtype).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the CPU interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def num_vocab_splits(n_rows: int, n_tiles: int, device: torch.device, programs_per_sm: int) -> int:
    """Wanted vocabulary chunks per row (program): enough ``(row, chunk)`` programs to reach
    ``programs_per_sm`` per SM, at most one chunk per tile. Many rows: 1 (no workspace, no merge).
    The tests patch this one function to reach the split paths on small shapes."""
    return max(1, min(n_tiles, programs_per_sm * num_sms(device) // max(n_rows, 1)))


def plan_vocab_splits(n_rows: int, n_tiles: int, device: torch.device,
                      programs_per_sm: int) -> Tuple[int, int]:
    """``(splits, tiles_per_split)`` for ``n_rows`` row programs over ``n_tiles`` vocabulary
    tiles: every split gets ``tiles_per_split`` tiles, the last one fewer, none empty."""
    wanted = max(1, min(n_tiles, num_vocab_splits(n_rows, n_tiles, device, programs_per_sm)))
    tiles_per_split = -(-n_tiles // wanted)
    return -(-n_tiles // tiles_per_split), tiles_per_split


def split_workspace(splits: int, n_rows: int, device: torch.device) -> torch.Tensor:
    """The split workspace ``[NUM_PARTIALS, splits, N]`` float32 (uninitialised)."""
    return torch.empty((NUM_PARTIALS, splits, n_rows), dtype=torch.float32, device=device)


def device_guard(device: torch.device):
    """The context every launch (Triton and CUDA) runs in: ``torch.cuda.device(device)`` for a
    CUDA device, so kernels run on their inputs' device and not on the current one (multi-GPU);
    nothing elsewhere. Launch sites call it as ``layout.device_guard`` (tests record it)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def check_logits_view(name: str, x: torch.Tensor, dims: int) -> None:
    """Launch contract of a logits operand: a ``dims``-D view (``[G, R, V]`` or ``[B, V]``)
    with V >= 1, unit stride over the vocabulary and a dtype of :data:`FLOAT_DTYPES`."""
    if x.dim() != dims or x.shape[-1] < 1:
        raise ValueError(f"{name} must be a {dims}-D view with V >= 1, got shape {tuple(x.shape)}")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride over the vocabulary, got {x.stride()}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")


def check_token_stats_inputs(logits: torch.Tensor, targets: Optional[torch.Tensor],
                             ref_logits: Optional[torch.Tensor], coef: Optional[float]) -> None:
    """Launch contract of the token_stats kernels (Triton and CUDA): ``[G, R, V]`` views, int64
    contiguous ``[N]`` targets, everything on one device. The scalars were validated once, by
    the op (``nashkern.ops``' ``Scalars``)."""
    check_logits_view("logits", logits, 3)
    n_rows = logits.shape[0] * logits.shape[1]
    if ref_logits is not None:
        check_logits_view("ref_logits", ref_logits, 3)
        if ref_logits.shape != logits.shape or ref_logits.device != logits.device:
            raise ValueError("ref_logits must match logits in shape and device")
    elif coef is not None:
        raise ValueError("coef needs ref_logits")
    if targets is not None and (targets.shape != (n_rows,) or targets.dtype != torch.int64
                                or not targets.is_contiguous()
                                or targets.device != logits.device):
        raise ValueError("targets must be a contiguous int64 [N] tensor on the logits' device")


GradPair = Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]


def grad_outputs(logits: torch.Tensor, ref_logits: Optional[torch.Tensor], needs_grad_logits: bool,
                 needs_grad_ref: bool, out: Optional[GradPair] = None) -> GradPair:
    """The (grad_logits, grad_ref) tensors every backend's ``token_stats_backward`` writes:
    contiguous ``[G, R, V]`` in the inputs' dtypes, None where not needed. ``out`` supplies them
    instead of allocating (the chunked linear strategy passes its logits buffers, which the
    kernels overwrite in place: every program / thread reads its columns before it writes
    them)."""
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
