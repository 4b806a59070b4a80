"""Checkpoint save / resume of a policy sharded at load time by transformers' tensor parallelism
(``from_pretrained(..., tp_plan=...)`` / ``DistributedConfig``).

``transformers`` 5.x saves such a model (``save_pretrained`` gathers the DTensors into full
weights on the main process) but refuses to checkpoint its optimizer (``Trainer.__init__``
raises unless ``save_only_model=True``): its optimizer file is one ``torch.save`` of the main
process's state, whose DTensor moments hold only that rank's shards. Here each rank saves its
own optimizer state (``optimizer-rank{r}-of-{w}.pt``: every DTensor state as its local tensor)
and reloads it into DTensors with its parameter's mesh and placements; the scheduler is saved
once; the model's full weights are loaded back by slicing each rank's part out of the saved
tensors (:func:`load_model`: no communication). :class:`TensorParallelCheckpoints` is the
trainer mixin (``OnlinePreferenceTrainer``); tests/rl/test_tensor_parallel.py resumes Nash-EMA
(AdamW, its EMA saved per rank) under TP and compares it with the uninterrupted run.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Optional

import torch

from . import engines
from .tensor_parallel import is_dtensor

OPTIMIZER_FILE = "optimizer-rank{rank}-of-{world}.pt"
SCHEDULER_FILE = "scheduler.pt"  # transformers' SCHEDULER_NAME


def sharded_at_load(model) -> bool:
    """True for a model sharded at load time by transformers' tensor parallelism (PEFT: its
    base model)."""
    return bool(getattr(model, "is_distributed_loading_by_transformers", False))


@contextlib.contextmanager
def optimizer_checkpoints_allowed(model, args):
    """Around ``Trainer.__init__``: with checkpoints requested for a model sharded at load time,
    transformers' refusal (it cannot save the sharded optimizer state) is passed by holding
    ``save_only_model=True`` during the check; this module saves the state per rank instead."""
    lift = sharded_at_load(model) and args.save_strategy != "no" and not args.save_only_model
    if lift:
        args.save_only_model = True
    try:
        yield
    finally:
        if lift:
            args.save_only_model = False


def _local_state(value):
    return value.to_local() if is_dtensor(value) else value


def save_optimizer(optimizer, scheduler, output_dir: str, rank: int, world: int,
                   main_process: bool) -> None:
    """This rank's optimizer state (DTensor states as their local tensors) as
    ``optimizer-rank{r}-of-{w}.pt``; the scheduler once, by the main process."""
    os.makedirs(output_dir, exist_ok=True)
    state = optimizer.state_dict()
    state["state"] = {i: {k: _local_state(v) for k, v in s.items()}
                      for i, s in state["state"].items()}
    torch.save(state, os.path.join(output_dir, OPTIMIZER_FILE.format(rank=rank, world=world)))
    if main_process and scheduler is not None:
        torch.save(scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_FILE))


def load_optimizer(optimizer, scheduler, checkpoint: str, rank: int, world: int) -> None:
    """Inverse of :func:`save_optimizer`: every saved local tensor of a DTensor parameter's state
    (the parameter's local shape) becomes a DTensor with the parameter's mesh and placements.
    A checkpoint written by another number of processes raises, naming the file."""
    from torch.distributed.tensor import DTensor

    path = os.path.join(checkpoint, OPTIMIZER_FILE.format(rank=rank, world=world))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"resuming a tensor-parallel model from {checkpoint}: no {os.path.basename(path)} "
            "(each rank's optimizer state; the checkpoint was written by another number of "
            "processes, or without tensor parallelism)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, s in state["state"].items():
        p = params[int(index)]
        for k, v in s.items():
            if is_dtensor(p) and isinstance(v, torch.Tensor) and v.dim() \
                    and tuple(v.shape) == tuple(p.to_local().shape):
                s[k] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements,
                                          run_check=False, shape=p.shape, stride=p.stride())
    optimizer.load_state_dict(state)
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_FILE),
                                             weights_only=True))


def load_model(model, checkpoint: str) -> None:
    """The saved full weights (``model.safetensors`` or its sharded index) into a model sharded
    at load time: each DTensor takes its own part (``distribute_tensor`` with
    ``src_data_rank=None``: sliced locally, no communication), plain tensors whole. Every
    parameter and buffer of the model must be in the checkpoint (else a ValueError naming
    them)."""
    from safetensors.torch import load_file
    from torch.distributed.tensor import distribute_tensor

    single = os.path.join(checkpoint, "model.safetensors")
    index = single + ".index.json"
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            files = sorted({os.path.join(checkpoint, v)
                            for v in json.load(f)["weight_map"].values()})
    else:
        raise FileNotFoundError(f"resuming a tensor-parallel model from {checkpoint}: no "
                                "model.safetensors (or its index)")
    saved = {}
    for f in files:
        saved.update(load_file(f))
    inner = engines.inner_module(model)
    targets = dict(inner.named_parameters())
    targets.update(dict(inner.named_buffers()))
    missing = [n for n, t in targets.items() if n not in saved and t.requires_grad]
    if missing:
        raise ValueError(f"{checkpoint} holds no weights for {missing[:5]} "
                         f"({len(missing)} parameters): not a checkpoint of this model")
    with torch.no_grad():
        for name, t in targets.items():
            if name not in saved:
                continue  # a frozen buffer the checkpoint does not keep (rotary inv_freq)
            full = saved[name]
            if is_dtensor(t):
                part = distribute_tensor(full.to(t.device, t.dtype), t.device_mesh,
                                         t.placements, src_data_rank=None).to_local()
                t.to_local().copy_(part)
            else:
                t.copy_(full.to(t.device, t.dtype))


class TensorParallelCheckpoints:
    """Trainer mixin: the checkpoint hooks of ``transformers.Trainer`` for a policy sharded at
    load time (tensor parallelism) go through this module; any other model, to the Trainer's."""

    def _tp_loaded(self) -> bool:
        return sharded_at_load(self.model)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._tp_loaded():
            return super()._save_optimizer_and_scheduler(output_dir)
        save_optimizer(self.optimizer, self.lr_scheduler, output_dir, self.args.process_index,
                       self.args.world_size, self.args.should_save)

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        if checkpoint is None or not self._tp_loaded():
            return super()._load_optimizer_and_scheduler(checkpoint)
        load_optimizer(self.optimizer, self.lr_scheduler, checkpoint, self.args.process_index,
                       self.args.world_size)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = self.model if model is None else model
        if not self._tp_loaded() or hasattr(engines.inner_module(target), "peft_config"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_model(target, resume_from_checkpoint)
