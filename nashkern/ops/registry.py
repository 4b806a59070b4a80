"""The op registry: the declared backend tables and the one rule that picks a backend (the
scalar schema every op shares, :class:`Scalars`, is defined in ``kernels/layout.py``, below
every backend, which receive it whole).

Each op family (``token_stats.py``, ``linear_token_stats.py``, ``mixture_sample.py`` beside this file) declares a
:class:`Family`: its ``torch.library`` custom ops and a table ``{backend: Implementation}`` of
the functions that implement it, imported normally. Nothing is looked up by name: the import
graph is the data path. ``"auto"`` picks, per op, the fastest backend that implements THAT op on
the inputs' device (CUDA device: ``cuda`` > ``triton`` > ``torch``; elsewhere ``torch``); asking
for a backend that lacks the op is a ``ValueError`` naming the backends that have it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from .. import tuning
from ..backends.cuda import library as cuda_library
from ..kernels.layout import Scalars  # noqa: F401  (the scalar schema: nashkern.ops.Scalars)

#: What ``backend=`` accepts.
BACKENDS = ("auto", "torch", "triton", "cuda")
#: ``"auto"`` on a CUDA device: the first of these that implements the op and can run here.
AUTO_ORDER_CUDA = ("cuda", "triton", "torch")

# ----------------------------------------------------------------------------------------------
# Backend tables
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Implementation:
    """The functions one backend implements an op family with (DESIGN.md, backend contract).

    ``tuning``: the kernel name whose config (``tuning.config_for(tuning, device)``) the
    functions take as ``config=``; None for backends without one."""

    forward: Callable
    backward: Optional[Callable] = None
    tuning: Optional[str] = None

    def config_kwargs(self, device: torch.device) -> Dict[str, object]:
        return {} if self.tuning is None else {"config": tuning.config_for(self.tuning, device)}

    def launch(self, which: str, device: torch.device, dims: Dict[str, int], *args, **kwargs):
        """``forward`` / ``backward`` (``which``) called with its config: the frozen
        ``tuning.config_for(self.tuning, device)``, or with ``NASHKERN_AUTOTUNE=1`` on a CUDA
        device the autotuned winner of the shape bucket of ``dims`` (:func:`tuning.choose`; the
        candidates are timed by calling the function itself, which returns new tensors)."""
        fn = self.forward if which == "forward" else self.backward
        if self.tuning is None:
            return fn(*args, **kwargs)
        config = tuning.choose(self.tuning, which, device, dims,
                               lambda cfg: fn(*args, config=cfg, **kwargs))
        return fn(*args, config=config, **kwargs)


@dataclass(frozen=True)
class Family:
    """One op family: its name, its custom ops (forward first) and its declared backend table.

    A family with several algorithms (``linear_token_stats``: "fused", "chunked") declares one
    backend table per strategy in ``strategies`` instead; ``backends`` is then derived: every
    backend that implements the op with some strategy (the first declared strategy's function)."""

    name: str
    custom_ops: Tuple
    backends: Mapping[str, Implementation] = field(default_factory=dict)
    strategies: Mapping[str, Mapping[str, Implementation]] = field(default_factory=dict)

    def __post_init__(self):
        if self.strategies and not self.backends:
            union: Dict[str, Implementation] = {}
            for table in self.strategies.values():
                for backend, impl in table.items():
                    union.setdefault(backend, impl)
            object.__setattr__(self, "backends", union)

    def implementation(self, backend: str, strategy: Optional[str] = None) -> Implementation:
        """The implementation of a resolved backend (see :func:`resolve_backend`) and, for a
        family with strategies, a resolved strategy."""
        if strategy is None:
            return self.backends[backend]
        return self.strategies[strategy][backend]

    def strategy_backends(self, strategy: str) -> Tuple[str, ...]:
        """The backends that implement ``strategy`` (declared order)."""
        return tuple(self.strategies.get(strategy, ()))


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cuda_emulated(device: torch.device) -> bool:
    """CPU tensors with ``backend="cuda"`` run the library's host emulation when the tests ask
    for it (``cuda_library.EMULATE_ON_CPU``)."""
    return device.type == "cpu" and cuda_library.EMULATE_ON_CPU


def _cuda_backend_reason(device: torch.device) -> Optional[str]:
    """None when the CUDA backend (csrc/, nashkern/_nashkern_cuda.so) runs here, else why not
    (never raises: a broken build must not break `import nashkern` or the other backends)."""
    try:
        if _cuda_emulated(device):
            return None if cuda_library.load_library() is not None else cuda_library.unavailable_reason()
        return cuda_library.unavailable_reason()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


def _usable(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return True
    if device.type != "cuda":
        return False
    if backend == "triton":
        return triton_importable()
    return _cuda_backend_reason(device) is None


def resolve_backend(family: Family, backend: str, device: torch.device) -> str:
    """Map the user's ``backend`` argument to the concrete backend that runs ``family`` on
    ``device``; a clear ValueError if that backend cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            for name in AUTO_ORDER_CUDA:
                if name in family.backends and _usable(name, device):
                    return name
        return "torch"
    if backend not in family.backends:
        raise ValueError(f"backend={backend!r} does not implement {family.name}; backends that "
                         f"do: {', '.join(sorted(family.backends))} (or backend='auto')")
    if backend == "triton":
        if not triton_importable():
            raise ValueError("backend='triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and not _interpreted():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device.type}); on the CPU set "
                "TRITON_INTERPRET=1 before importing nashkern to run the Triton interpreter"
            )
    if backend == "cuda":
        reason = _cuda_backend_reason(device)
        if reason is not None:
            raise ValueError(
                "backend='cuda' needs the CUDA kernels of csrc/ (nashkern/_nashkern_cuda.so), "
                f"which are not usable here: {reason}. Build it with nvcc and a CUDA-enabled "
                "torch: NASHKERN_BUILD_CUDA=1 pip install -e . or make cuda "
                "(or use backend='triton' / 'torch')"
            )
        if device.type != "cuda" and not _cuda_emulated(device):
            raise ValueError(f"backend='cuda' needs CUDA tensors, got {device.type}")
    return backend


def empty_like_nothing(like: torch.Tensor) -> torch.Tensor:
    """Placeholder for an absent output (custom ops cannot return None)."""
    return like.new_empty(0)


def double_backward_unsupported(op_name: str):
    """An autograd formula for a backward custom op that raises: nashkern's backward kernels
    are not themselves differentiable (double backward is not supported, DESIGN.md)."""
    def backward(ctx, *grads):
        raise RuntimeError(
            f"double backward is not supported by nashkern ops ({op_name}): the fused backward "
            "kernels are not differentiable. Compute higher-order gradients with the eager "
            "definitions in nashkern.naive instead.")
    return backward


def _no_context(ctx, inputs, output):
    return None
