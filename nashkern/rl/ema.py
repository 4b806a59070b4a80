"""An exponential moving average of a policy's parameters, kept where the policy keeps them:
the opponent of Nash-EMA-PG (:mod:`nashkern.rl.nash_ema`).

``θ̄ ← β·θ̄ + (1−β)·θ`` after every optimizer step, ``θ̄_0 = θ_0``, over the **trainable**
parameters only (frozen ones equal their own average): with PEFT that is the adapter weights, the
base model being shared. The average is stored as float32 (float64 for a float64 parameter)
copies of **this rank's local shards** of the engine-wrapped model's parameters, so it is sharded
exactly like the policy:

=================  =========================================================================
engine             local shard of a trainable parameter ``p`` (what is averaged and swapped)
=================  =========================================================================
single, DDP        ``p`` itself (DDP replicates the policy: so is the average)
FSDP2              ``p.to_local()`` (``p`` is a DTensor; the all-gather reads this storage)
tensor parallel    ``p.to_local()`` (a DTensor sharded by transformers' ``tp_plan``: this
                   rank's rows / columns; replicated DTensors whole)
FSDP1              the ``FlatParameter``'s local shard (``use_orig_params=True``: each
                   original parameter's view of it), as the wrapper's ``parameters()`` are
                   between forwards
ZeRO-3             ``p.ds_tensor`` (the rank's partition; a persistent parameter, kept whole
                   on every rank by ``stage3_param_persistence_threshold``, its full ``p.data``)
=================  =========================================================================

The opponent's samples come from the policy module itself with the average swapped in
(:meth:`ParameterEMA.swapped_in`): each local shard is copied to a transient backup (one buffer
of the trainable local shards, in the parameters' dtype), overwritten with ``θ̄`` (cast to that
dtype), and restored bit for bit afterwards. There is no second model: the engine gathers the
swapped shards in the opponent's forwards as it gathers the policy's, and the KV-cached sampler
(:func:`~nashkern.rl.generation.generate`) runs unchanged. Whatever an engine keeps gathered
between forwards (the FSDP2 root unit, which does not reshard after its forward; FSDP1's root
after an evaluation forward; ZeRO-3's parameter cache) is released before the swap and again
before the restore, so neither model ever sees the other's weights.

Why float32: with a bf16 / fp16 policy the increment ``(1−β)(θ − θ̄)`` is below half an ulp of
``θ̄`` for the decays the paper uses (β ≥ 0.99), so an average kept in the model's dtype would
not move. For a float32 policy the average costs exactly one copy of the trainable local shards.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, List, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from . import engines


def check_decay(decay) -> float:
    """``decay`` (the paper's β) as a float in ``[0, 1]``; a ``ValueError`` otherwise."""
    try:
        value = float(decay)
    except (TypeError, ValueError):
        raise ValueError(f"ema_decay must be a number in [0, 1], got {decay!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"ema_decay must be in [0, 1] (0: self-play, 1: the opponent stays at "
                         f"the initial policy), got {decay!r}")
    return value


def local_shards(model: nn.Module) -> List[Tuple[str, Tensor]]:
    """``(name, tensor)`` for every trainable parameter of ``model`` (the engine wrapper, or a
    plain / FSDP2 module): the tensor this rank holds, which in-place writes update (module
    docstring's table). Order and names are those of ``model.named_parameters()``."""
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_tensor"):  # ZeRO-3
            t = p.data if getattr(p, "ds_persist", False) else p.ds_tensor
        elif hasattr(p, "to_local"):  # FSDP2: a DTensor parameter
            t = p.to_local()
        else:  # single process, DDP, FSDP1 (between forwards: the local shard)
            t = p.data
        out.append((name, t))
    return out


def release_gathered(model: nn.Module) -> None:
    """Free whatever the engine keeps gathered between forwards, so that the next forward
    gathers the local shards as they are now: every FSDP2 unit resharded (``FSDPModule.reshard``;
    the root does not reshard after its forward), every unsharded FSDP1 handle resharded (the
    root after a forward that no backward followed: evaluation), ZeRO-3's parameter cache
    emptied. A no-op for a single process and DDP."""
    kind = engines.engine_of(model)
    if kind == "fsdp2":
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
    elif kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # FSDP1 has no public reshard; its own post-backward uses this one (torch >= 2.0)
        from torch.distributed.fsdp._runtime_utils import _reshard

        for m in FSDP.fsdp_modules(model):
            handle = getattr(m, "_handle", None)
            if handle is not None and not handle.is_sharded(handle.flat_param) \
                    and handle.uses_sharded_strategy:
                _reshard(m, handle, True)
    elif kind == "zero3":
        empty = getattr(model, "empty_partition_cache", None)
        if empty is not None:
            empty()


class ParameterEMA:
    """``θ̄`` of the trainable parameters of ``model`` as this rank's local shards (see the
    module docstring). ``model`` is the module whose parameters the optimizer updates (the
    trainer's ``model_wrapped``: the engine wrapper, or the plain / FSDP2 module); ``θ̄_0`` is
    the parameters at construction."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.engine = engines.engine_of(model)
        release_gathered(model)  # (an unsharded FSDP2 unit registers its full parameters)
        shards = local_shards(model)
        if not shards:
            raise ValueError(f"{type(model).__name__} has no trainable parameter to average")
        self.names = [n for n, _ in shards]
        self.shadow = [t.detach().to(torch.promote_types(t.dtype, torch.float32), copy=True)
                       for _, t in shards]
        self.num_updates = 0
        #: each rank holds its own part (a sharded engine, or DTensor parameters: FSDP2,
        #: tensor parallelism): checkpoints keep one file per rank
        self.per_rank = self.engine in engines.SHARDED or any(
            hasattr(p, "to_local") for p in model.parameters() if p.requires_grad)

    def _shards(self) -> List[Tensor]:
        """This rank's local shards now, after :func:`release_gathered` (while an FSDP2 unit is
        unsharded its module holds the full parameters, whose storage its reshard frees)."""
        with torch.no_grad():
            release_gathered(self.model)
        shards = local_shards(self.model)
        names = [n for n, _ in shards]
        if names != self.names:
            raise RuntimeError(f"the trainable parameters of {type(self.model).__name__} changed "
                               f"since the EMA was made ({len(self.names)} then, {len(names)} "
                               f"now): the EMA must be rebuilt")
        return [t for _, t in shards]

    @property
    def numel(self) -> int:
        """Elements of the average this rank holds (its local shards of trainable parameters)."""
        return sum(s.numel() for s in self.shadow)

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """``θ̄ ← decay·θ̄ + (1−decay)·θ`` on every local shard (``decay = 0``: ``θ̄ = θ``
        exactly; ``decay = 1``: unchanged)."""
        decay = check_decay(decay)
        for s, t in zip(self.shadow, self._shards()):
            if decay == 0.0:
                s.copy_(t)
            elif decay < 1.0:
                s.mul_(decay).add_(t.to(s.dtype), alpha=1.0 - decay)
        self.num_updates += 1

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The policy's trainable local shards hold ``θ̄`` (cast to their dtype) for the duration
        and their own values, bit for bit, afterwards (on every rank: the engine's gathers are
        collectives, every rank must enter)."""
        with torch.no_grad():
            shards = self._shards()
            backup = [t.clone() for t in shards]
            for t, s in zip(shards, self.shadow):
                t.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, b in zip(self._shards(), backup):
                    t.copy_(b)
            del backup

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        return {"names": list(self.names), "shadow": [s.detach().cpu() for s in self.shadow],
                "num_updates": self.num_updates, "engine": self.engine}

    def load_state_dict(self, state: Dict, source: str = "the EMA state") -> None:
        """Restore a :meth:`state_dict` of the same parameters, sharded the same way (the same
        engine and number of processes); a ``ValueError`` naming what differs otherwise."""
        if state.get("engine") != self.engine or list(state.get("names", [])) != self.names:
            raise ValueError(f"{source} was saved for other parameters (engine "
                             f"{state.get('engine')!r}, {len(state.get('names', []))} tensors) "
                             f"than this model's ({self.engine!r}, {len(self.names)}): resume "
                             f"with the same model, PEFT config, engine and number of processes")
        for name, s, saved in zip(self.names, self.shadow, state["shadow"]):
            if tuple(saved.shape) != tuple(s.shape):
                raise ValueError(f"{source}: {name} has shape {tuple(saved.shape)}, this rank's "
                                 f"shard {tuple(s.shape)}: resume with the same engine and "
                                 f"number of processes")
            s.copy_(saved.to(s.device, s.dtype))
        self.num_updates = int(state.get("num_updates", 0))
