"""The training engines the trainers run under (one process, DDP, FSDP1, FSDP2, DeepSpeed
ZeRO-1/2/3 through accelerate) and what each needs from nashkern.

* **Forward redirection** (:func:`redirect`): a function runs *as the forward* of the wrapped
  model, through the wrapper's own ``forward`` (the approach of Lightning, Liger and TRL). FSDP1 /
  FSDP2 gather the root unit (embeddings, final norm, ``lm_head``) for that forward and again for
  the backward; ZeRO-3 gathers every module's weights in that module's forward, so the fused head
  statistics run as ``lm_head``'s forward (:func:`patched_forward`), and gradients are reduced as
  for any parameter.
* **Generation** (:func:`generation_context`): the generation loop calls the unwrapped model once
  per token. FSDP1 needs the root unit summoned (``summon_full_params(recurse=False)``; nested
  units gather in their own forwards); ZeRO-3 gathers all weights once when
  ``ds3_gather_for_generation`` is on (TRL's semantics; the per-module hooks are removed while
  gathered), else every forward gathers layer by layer. Every sharded forward is a collective, so
  all ranks step together until all are done (``synced_gpus``; :func:`all_ranks_done`).
* **A sharded reference** (:func:`copy_reference`, :func:`prepare_reference`): the frozen
  reference is prepared by the same engine (FSDP1 / FSDP2 units, a ZeRO-3 engine without an
  optimizer), never a full copy per rank; a ZeRO-3-initialised policy (``zero.Init``: its
  parameters are empty placeholders) is copied shard by shard, not with ``deepcopy``.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
from typing import Any, Callable, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

SHARDED = ("fsdp1", "fsdp2", "zero3")


# ------------------------------------------------------------------------------------------------
# what is what
# ------------------------------------------------------------------------------------------------
def optional_class(module: str, name: str):
    """``module.name``, or ``()`` (which ``isinstance`` matches with nothing) where this torch
    lacks it (e.g. built without distributed)."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # pragma: no cover - torch without distributed
        return ()


def _fsdp1_class():
    return optional_class("torch.distributed.fsdp", "FullyShardedDataParallel")


def _fsdp2_class():
    return optional_class("torch.distributed.fsdp", "FSDPModule")


def _is_deepspeed_engine(model) -> bool:
    return type(model).__name__ == "DeepSpeedEngine" and hasattr(model, "module")


def is_zero3_partitioned(model: nn.Module) -> bool:
    """True when the parameters are ZeRO-3 partitioned (``zero.Init`` or a ZeRO-3 engine)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def inner_module(model: nn.Module) -> nn.Module:
    """The model inside DDP / FSDP1 / DeepSpeed wrappers (FSDP2 shards in place: itself)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, _fsdp1_class())) \
            or _is_deepspeed_engine(model):
        model = model.module
    return model


def engine_of(model: nn.Module) -> str:
    """'fsdp1', 'fsdp2', 'zero3', 'deepspeed' (ZeRO 0-2), 'ddp' or 'single' for a (wrapped)
    model. A reference registered with :func:`register_wrapper` answers for its wrapper."""
    model = wrapper_of(model)
    if isinstance(model, _fsdp1_class()):
        return "fsdp1"
    if isinstance(model, _fsdp2_class()):
        return "fsdp2"
    if _is_deepspeed_engine(model) or is_zero3_partitioned(model):
        return "zero3" if is_zero3_partitioned(model) else "deepspeed"
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "ddp"
    return "single"


def engine_of_accelerator(accelerator) -> str:
    """The engine accelerate set up: 'fsdp1', 'fsdp2', 'zero3', 'deepspeed', 'ddp' or 'single'."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp2" if accelerator.state.fsdp_plugin.fsdp_version == 2 else "fsdp1"
    if kind == DistributedType.DEEPSPEED:
        return "zero3" if accelerator.state.deepspeed_plugin.zero_stage == 3 else "deepspeed"
    return "single" if kind == DistributedType.NO or accelerator.num_processes == 1 else "ddp"


def register_wrapper(inner: nn.Module, wrapper: nn.Module) -> None:
    """Remember the engine wrapper of ``inner`` (a prepared reference), so that callers holding
    the inner module (generation) and callers that need the wrapper (:func:`redirect`) share
    one handle. A plain attribute (not a submodule: ``state_dict`` and ``modules()`` do not see
    it) holding the only strong reference to the wrapper."""
    if wrapper is not inner:
        object.__setattr__(inner, "_nashkern_wrapper", wrapper)


def wrapper_of(model: nn.Module) -> nn.Module:
    """The engine wrapper registered for ``model``, else ``model``."""
    return model.__dict__.get("_nashkern_wrapper", model)


# ------------------------------------------------------------------------------------------------
# forward redirection
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def patched_forward(module: nn.Module, fn: Callable) -> Iterator[None]:
    """``module.forward = fn`` for the duration (an instance attribute: the module's hooks, e.g.
    ZeRO-3's gather / release, still run around it)."""
    had = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    module.forward = fn
    try:
        yield
    finally:
        if had:
            module.forward = old
        else:
            del module.forward


def redirect(wrapper: nn.Module, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """``fn(inner, forward, *args, **kwargs)`` run as the forward of
    ``inner = inner_module(wrapper)``, called through ``wrapper(*args, **kwargs)``: the engine's
    forward hooks (gather, reshard, pre-backward registration on the outputs, DDP's reducer) see
    the call. ``forward`` is the inner model's real forward, to be called directly by ``fn``
    (not ``inner(...)``: under FSDP2 that would re-enter the root's hooks)."""
    inner = inner_module(wrapper)
    original = inner.forward

    def forward(*a, **k):
        return fn(inner, original, *a, **k)

    with patched_forward(inner, forward):
        return wrapper(*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------------
def all_ranks_done(local_done: bool, synced: bool, device) -> bool:
    """``local_done`` on every rank (an all-reduce of the flag) when ``synced``, else the local
    flag. A finished rank keeps stepping (on padding) until all are finished: the forwards of a
    sharded model are collectives and must match across ranks."""
    if not synced or not (dist.is_available() and dist.is_initialized()) \
            or dist.get_world_size() == 1:
        return local_done
    flag = torch.tensor([1 if local_done else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def needs_synced_generation(*models: Optional[nn.Module]) -> bool:
    """True when any model is sharded (its forward is a collective) and several ranks run."""
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return multi and any(m is not None and engine_of(m) in SHARDED for m in models)


def _zero3_offload(engine):
    opt = getattr(engine, "optimizer", None)
    offload = getattr(opt, "parameter_offload", None) or opt
    if offload is None or not hasattr(offload, "forward_hooks"):
        return None
    return offload


@contextlib.contextmanager
def _zero3_gathered(engine) -> Iterator[None]:
    """All the weights of a ZeRO-3 engine gathered, its per-module gather/release hooks removed
    (they would release the gathered weights after each module), restored afterwards."""
    import deepspeed

    offload = _zero3_offload(engine)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        if offload is not None:
            for h in offload.forward_hooks + offload.backward_hooks:
                h.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            if offload is not None:
                coordinator = getattr(offload, "param_coordinator", None)
                if coordinator is not None and not coordinator.is_invalid_trace():
                    coordinator._invalidate_trace()
                offload._register_deepspeed_module(offload.module)


@contextlib.contextmanager
def generation_context(policy: nn.Module, ref: Optional[nn.Module] = None, *,
                       gather_zero3: bool = True) -> Iterator[None]:
    """Held around a generation loop that calls ``inner_module(policy)`` (and the reference's
    inner module): FSDP1 root units summoned (``recurse=False``: nested units gather in their
    own forwards), a ZeRO-3 policy gathered when ``gather_zero3`` (``ds3_gather_for_generation``;
    the reference is never gathered whole: its layers gather in their forwards). Plain models,
    DDP and FSDP2 (whose hooks live on the module itself) need nothing."""
    with contextlib.ExitStack() as stack:
        for i, m in enumerate((policy, ref)):
            if m is None:
                continue
            w = wrapper_of(m)
            if isinstance(w, _fsdp1_class()):
                stack.enter_context(w.summon_full_params(w, recurse=False, writeback=False))
            elif i == 0 and gather_zero3 and _is_deepspeed_engine(w) and is_zero3_partitioned(w):
                stack.enter_context(_zero3_gathered(w))
        yield


# ------------------------------------------------------------------------------------------------
# the reference
# ------------------------------------------------------------------------------------------------
def copy_reference(model: nn.Module) -> nn.Module:
    """A frozen copy of the policy. A ZeRO-3-initialised policy (``zero.Init``: every parameter
    an empty placeholder, its data in ``ds_tensor`` shards) gets a new ZeRO-3-initialised model
    of its class and config, and each rank copies its own shards (no gather, no full copy)."""
    if any(hasattr(p, "device_mesh") for p in model.parameters()):  # DTensor parameters
        raise ValueError(
            f"cannot copy the tensor-parallel {type(model).__name__} as the reference (its "
            "DTensor parameters and TP forwards do not deep-copy): pass ref_model= loaded with "
            "the policy's tp_plan / device mesh (or unsharded), or use peft_config (the "
            "reference is then the base model with the adapters disabled)")
    if not is_zero3_partitioned(model):
        return copy.deepcopy(model)
    from_config = getattr(type(model), "_from_config", None)
    if from_config is None or getattr(model, "config", None) is None:
        raise ValueError(f"cannot copy the ZeRO-3-initialised {type(model).__name__} as the "
                         "reference: pass ref_model= (built under the same DeepSpeed config)")
    dtype = next(model.parameters()).dtype
    ref = from_config(model.config, dtype=dtype)  # zero.Init while the HF DeepSpeed config lives
    src, dst = dict(model.named_parameters()), dict(ref.named_parameters())
    if src.keys() != dst.keys() or not is_zero3_partitioned(ref):
        raise RuntimeError("the ZeRO-3 reference copy did not come out partitioned like the "
                           "policy: pass ref_model= explicitly")
    with torch.no_grad():
        for name, p in src.items():
            dst[name].ds_tensor.data.copy_(p.ds_tensor.data)
        rbufs = dict(ref.named_buffers())
        for name, b in model.named_buffers():
            rbufs[name].copy_(b)
    return ref


def _deepspeed_config(accelerator, model) -> dict:
    cfg = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):  # inference engine: no optimizer, no scheduler
        cfg.pop(key, None)
    zero = cfg.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    defaults = {} if hidden is None else {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden}
    for k, v in list(zero.items()):
        if v == "auto":
            if k not in defaults:
                raise ValueError(f"DeepSpeed config zero_optimization.{k} is 'auto': set it")
            zero[k] = defaults[k]
    if zero.get("stage", 0) != 3:
        zero["stage"] = 0  # ZeRO 1/2 shard optimizer state only: a frozen model is replicated
    for k, v in list(cfg.items()):
        if v == "auto":
            cfg.pop(k)
    cfg.setdefault("train_micro_batch_size_per_gpu", 1)
    return cfg


def prepare_reference(accelerator, ref: nn.Module) -> nn.Module:
    """The frozen reference prepared by the engine of ``accelerator``; returns the module to
    call (the inner module; its wrapper is registered, see :func:`wrapper_of`)."""
    engine = engine_of_accelerator(accelerator)
    if engine in ("fsdp1", "fsdp2"):
        wrapper = _prepare_fsdp(accelerator, ref, engine)
    elif engine in ("zero3", "deepspeed"):
        import deepspeed

        wrapper, *_ = deepspeed.initialize(model=ref, config=_deepspeed_config(accelerator, ref))
    else:
        return ref.to(accelerator.device)
    wrapper.eval()
    inner = inner_module(wrapper)
    register_wrapper(inner, wrapper)
    return inner


def _prepare_fsdp(accelerator, model: nn.Module, engine: str) -> nn.Module:
    plugin = accelerator.state.fsdp_plugin
    if engine == "fsdp2":
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, model)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    plugin.set_auto_wrap_policy(model)
    return FSDP(model, sharding_strategy=plugin.sharding_strategy,
                cpu_offload=plugin.cpu_offload, auto_wrap_policy=plugin.auto_wrap_policy,
                mixed_precision=plugin.mixed_precision_policy,
                sync_module_states=plugin.sync_module_states,
                backward_prefetch=plugin.backward_prefetch,
                forward_prefetch=plugin.forward_prefetch, use_orig_params=plugin.use_orig_params,
                limit_all_gathers=plugin.limit_all_gathers,
                device_id=_fsdp1_device(accelerator.device))


def _fsdp1_device(device: torch.device) -> torch.device:
    # FSDP1 cannot guess a CPU device (it asks for an accelerator) and compares "cpu" with an
    # indexed "cpu:0" as different devices: the bare CPU device, else the given one.
    return torch.device("cpu") if device.type == "cpu" else device


def head_weight_owned_by_engine(model: nn.Module) -> bool:
    """True when the head weight seen inside the forward is only valid during that forward
    (a gathered shard): anything that must outlive it takes a copy."""
    return engine_of(model) in SHARDED


__all__: Tuple[str, ...] = (
    "SHARDED", "inner_module", "engine_of", "engine_of_accelerator", "register_wrapper",
    "wrapper_of", "patched_forward", "redirect", "all_ranks_done", "needs_synced_generation",
    "generation_context", "copy_reference", "prepare_reference", "is_zero3_partitioned",
    "head_weight_owned_by_engine")
