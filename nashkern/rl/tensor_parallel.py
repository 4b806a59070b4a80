"""Tensor-parallel policies and references: a head sharded by vocabulary rows inside the trainers.

A model loaded with ``transformers``' tensor parallelism (``from_pretrained(..., tp_plan="auto")``
under ``torchrun`` / ``accelerate launch``; the ``Trainer`` then sets accelerate's
``ParallelismConfig(tp_size=...)`` itself) holds its ``lm_head`` weight as a ``DTensor`` placed
``Shard(0)`` on the tensor-parallel mesh dimension, and its ``colwise_gather_output`` forward
all-gathers the ``[..., V]`` logits on every rank. :func:`shard_lm_head` gives the same layout to
a model of one's own (an explicit process group). Here:

* :func:`head_shard` reads the shard from the sharding itself (the DTensor's mesh, placements and
  ``compute_local_shape_and_global_offset``), checks once per weight that the shards tile
  ``[0, V)`` in the group's rank order (the order ``ops.linear_token_stats(process_group=...)``
  assumes), and refuses any other placement (``Partial``, a strided shard, columns) by name;
* :func:`local_head` replaces the head's forward, while the statistics or the generation run,
  by the local shard's ``h W_r^T + b_r`` (no all-gather of logits);
* :func:`align_reference` gives the reference's rows matching the policy's shard (a reference
  sharded the same way: its local rows; an unsharded one: a view of the same rows) and refuses a
  reference sharded differently, or a sharded reference next to an unsharded policy;
* :class:`GenerationShards` runs the sampler on the shards
  (``nashkern/backends/mixture_sample_vocab_parallel.py``: O(B·P) values per token instead
  of two ``[B, V]`` all-gathers), falling back to all-gathering the rows for logits processors and
  greedy decoding (they need whole rows; documented in DESIGN.md);
* :func:`sampler_rank`: the ranks of a tensor-parallel group draw the same samples (their
  sampler key is the group's lowest global rank), since their forwards are one computation.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..backends import mixture_sample_vocab_parallel
from . import engines


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows ``[start, start + rows)`` of a head of ``vocab`` rows, sharded across
    ``group`` (global ranks ``ranks``, in the group's rank order)."""
    group: object
    start: int
    rows: int
    vocab: int
    ranks: Tuple[int, ...]


def _dtensor_class():
    return engines.optional_class("torch.distributed.tensor", "DTensor")


def is_dtensor(t) -> bool:
    return isinstance(t, _dtensor_class())


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """The local part of a DTensor (differentiable: its gradient flows to the DTensor with the
    same placements), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def head_shard(weight: Tensor) -> Optional[VocabShard]:
    """The vocabulary shard of a head ``weight`` ``[V, D]``: None for a plain tensor or a
    replicated DTensor; a :class:`VocabShard` for a DTensor placed ``Shard(0)`` on exactly one
    mesh dimension and ``Replicate()`` on the others (any other placement on a dimension of
    size 1 counts as replicated). Anything else raises, naming the placements (e.g. FSDP sharding the
    head's rows further: the op needs each rank's rows whole). The layout is checked once per weight (one all-gather of 3 integers)."""
    if not is_dtensor(weight):
        return None
    cached = getattr(weight, "_nashkern_vocab_shard", None)
    if cached is not None:
        return cached if cached != "replicated" else None
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements, mesh = tuple(weight.placements), weight.device_mesh
    sharded, trivial = [], []
    for dim, p in enumerate(placements):
        if type(p) is Shard and p.dim % weight.dim() == 0:
            (sharded if mesh.size(dim) > 1 else trivial).append(dim)
        elif mesh.size(dim) == 1:  # e.g. the size-1 FSDP dimension of transformers' TP x DP mesh
            continue
        elif type(p) is not Replicate:
            raise ValueError(
                f"the output head's weight is a DTensor placed {placements}: the fused statistics "
                "support a head sharded by vocabulary rows (Shard(0) on one mesh dimension, "
                "Replicate() on the others) or replicated")
    if len(sharded) > 1:
        raise ValueError(f"the output head's weight is sharded by rows on {len(sharded)} mesh "
                         f"dimensions ({placements}): one tensor-parallel dimension is supported")
    sharded = sharded or trivial[:1]  # rows "sharded" over one rank: the whole head, P = 1
    if not sharded:
        object.__setattr__(weight, "_nashkern_vocab_shard", "replicated")
        return None
    group = mesh.get_group(sharded[0])
    shape, offset = compute_local_shape_and_global_offset(weight.shape, mesh, placements)
    shard = VocabShard(group=group, start=int(offset[0]), rows=int(shape[0]),
                       vocab=int(weight.shape[0]),
                       ranks=tuple(dist.get_process_group_ranks(group)))
    _check_contiguous(shard, weight.to_local().device)
    object.__setattr__(weight, "_nashkern_vocab_shard", shard)
    return shard


def _check_contiguous(shard: VocabShard, device) -> None:
    """The shards must tile ``[0, V)`` in the group's rank order, each with >= 1 row: the
    vocabulary-parallel op places this rank's rows after the lower ranks' (``vocab_start``)."""
    mine = torch.tensor([shard.start, shard.rows], dtype=torch.long, device=device)
    every = [torch.empty_like(mine) for _ in shard.ranks]
    dist.all_gather(every, mine, group=shard.group)
    layout = [tuple(int(x) for x in t) for t in every]
    expected, ok = 0, True
    for start, rows in layout:
        ok &= start == expected and rows >= 1
        expected += rows
    if not ok or expected != shard.vocab:
        raise ValueError(f"the output head's vocabulary shards (start, rows) per rank of its "
                         f"group are {layout}: the fused statistics need shards of >= 1 row "
                         f"tiling [0, {shard.vocab}) in the group's rank order")


def shard_lm_head(model, process_group=None) -> VocabShard:
    """Shard ``model``'s output head by vocabulary rows across ``process_group`` (default: the
    world), for a model without a transformers ``tp_plan`` (the explicit-process-group path):
    its weight (and bias) become ``DTensor`` parameters placed ``Shard(0)`` on a 1-D mesh over
    the group (rows split as ``torch.chunk``: uneven vocabularies allowed), and its forward
    all-gathers the logits like transformers' ``colwise_gather_output`` (the fused statistics and
    the sampler never call it). Every rank must hold the same full head before the call.
    Returns the shard."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    group = process_group or dist.group.WORLD
    inner = engines.inner_module(model)
    head = inner.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None or head.weight.dim() != 2:
        raise ValueError(f"{type(inner).__name__} has no 2-D output head to shard")
    if head.weight is getattr(inner.get_input_embeddings(), "weight", None):
        raise ValueError("the output head is tied to the input embedding: untie it "
                         "(tie_word_embeddings=False) before sharding it by vocabulary rows")
    mesh = DeviceMesh.from_group(group, head.weight.device.type)
    for name in ("weight", "bias"):
        p = getattr(head, name, None)
        if p is not None:
            setattr(head, name, torch.nn.Parameter(
                distribute_tensor(p.detach(), mesh, [Shard(0)], src_data_rank=None),
                requires_grad=p.requires_grad))

    def gathered_forward(h):
        z = torch.nn.functional.linear(h, local(head.weight), local(head.bias))
        return _gather_columns(z, head_shard(head.weight))

    head.forward = gathered_forward
    return head_shard(head.weight)


def _fsdp2_rows(model, weight) -> bool:
    """True when ``weight``'s row sharding is FSDP2's: between forwards FSDP2 leaves its
    parameters as DTensors placed Shard(0) on the data-parallel mesh (gathered by the engine's
    own context), which is no vocabulary shard. Under FSDP2 only a mesh dimension named as
    tensor-parallel ("tp", as transformers' TP x DP mesh names it) shards the vocabulary."""
    if not is_dtensor(weight) or not any(isinstance(m, engines._fsdp2_class())
                                         for m in engines.inner_module(model).modules()):
        return False
    from torch.distributed.tensor import Shard

    names = weight.device_mesh.mesh_dim_names
    row_dims = [d for d, p in enumerate(weight.placements)
                if type(p) is Shard and p.dim % weight.dim() == 0 and weight.device_mesh.size(d) > 1]
    return not any(names is not None and "tp" in str(names[d]).lower() for d in row_dims)


def model_shard(model) -> Optional[VocabShard]:
    """The vocabulary shard of ``model``'s output head (None: not sharded, or no head)."""
    if model is None:
        return None
    try:
        head = engines.inner_module(model).get_output_embeddings()
    except Exception:  # noqa: BLE001
        return None
    weight = getattr(head, "weight", None)
    if weight is None and hasattr(head, "get_base_layer"):
        weight = getattr(head.get_base_layer(), "weight", None)
    if weight is not None and _fsdp2_rows(model, weight):
        return None
    return head_shard(weight) if weight is not None else None


@contextlib.contextmanager
def local_head(head) -> Iterator[None]:
    """While held, a vocabulary-sharded ``head`` returns this rank's logit columns
    ``h W_r^T + b_r`` (``[..., V_r]``, differentiable in the shard) instead of all-gathering
    ``[..., V]``. A head that is not sharded is left alone."""
    weight = getattr(head, "weight", None) if head is not None else None
    if hasattr(head, "get_base_layer") and hasattr(head, "lora_A") and is_dtensor(
            getattr(head.get_base_layer(), "weight", None)):
        raise ValueError("an adapter (PEFT) on a vocabulary-sharded output head is not "
                         "supported: adapt the attention / MLP modules only")
    if weight is None or head_shard(weight) is None:
        yield
        return

    def shard_forward(h, *_, **__):
        return torch.nn.functional.linear(h, local(head.weight), local(getattr(head, "bias",
                                                                               None)))

    with engines.patched_forward(head, shard_forward):
        yield


def all_agree(flag: bool, shard: Optional[VocabShard], device) -> bool:
    """``flag`` on every rank of the shard's group (one MIN all-reduce), so the ranks of a
    tensor-parallel group take the same branch before their next collective."""
    if shard is None:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=shard.group)
    return bool(t.item())


def align_reference(shard: Optional[VocabShard], ref_weight: Tensor, ref_bias: Optional[Tensor],
                    ref_shard: Optional[VocabShard]):
    """The reference head's rows matching the policy's ``shard``: ``(weight [V_r, Dr], bias)``.
    A reference sharded like the policy: its local rows; an unsharded one: a view of the policy's
    rows. A reference sharded differently, or a sharded reference with an unsharded policy,
    raises."""
    if shard is None:
        if ref_shard is not None:
            raise ValueError("the reference's output head is sharded by vocabulary rows but the "
                             "policy's is not: shard both the same way (load both with the "
                             "same tp_plan / device mesh), or neither")
        return ref_weight, ref_bias
    if ref_shard is None:
        if ref_weight.shape[0] != shard.vocab:
            raise ValueError(f"the reference's output head has {ref_weight.shape[0]} rows, the "
                             f"policy's vocabulary {shard.vocab}")
        rows = slice(shard.start, shard.start + shard.rows)
        return ref_weight[rows], None if ref_bias is None else ref_bias[rows]
    same = (ref_shard.start, ref_shard.rows, ref_shard.vocab, ref_shard.ranks) == \
        (shard.start, shard.rows, shard.vocab, shard.ranks)
    if not same:
        raise ValueError(
            f"policy and reference heads are sharded differently (policy rows "
            f"[{shard.start}, {shard.start + shard.rows}) of {shard.vocab} on ranks "
            f"{shard.ranks}, reference [{ref_shard.start}, {ref_shard.start + ref_shard.rows}) of "
            f"{ref_shard.vocab} on ranks {ref_shard.ranks}): load the reference with the "
            "policy's tp_plan and device mesh, or unsharded")
    return ref_weight, ref_bias


def _gather_columns(z: Tensor, shard: VocabShard) -> Tensor:
    """All-gather the column shards ``[..., V_r]`` into ``[..., V]`` (uneven widths padded)."""
    width = -(-shard.vocab // len(shard.ranks))
    widths = None
    pad = torch.nn.functional.pad(z, (0, max(0, width - z.shape[-1])))
    if pad.shape[-1] != width:  # a layout other than torch.chunk's: pad to the widest
        sizes = [torch.empty(1, dtype=torch.long, device=z.device) for _ in shard.ranks]
        dist.all_gather(sizes, torch.tensor([z.shape[-1]], device=z.device), group=shard.group)
        widths = [int(s) for s in sizes]
        width = max(widths)
        pad = torch.nn.functional.pad(z, (0, width - z.shape[-1]))
    parts = [torch.empty_like(pad) for _ in shard.ranks]
    dist.all_gather(parts, pad.contiguous(), group=shard.group)
    if widths is None:
        widths = []
        left = shard.vocab
        for _ in shard.ranks:
            widths.append(min(width, left))
            left -= widths[-1]
    return torch.cat([p[..., :w] for p, w in zip(parts, widths)], -1)


def sampler_rank(model, process_index: int) -> int:
    """The rank a sampler key uses: the lowest global rank of the tensor-parallel group of
    ``model``'s head (every rank of the group draws the same samples), else ``process_index``."""
    shard = model_shard(model)
    return min(shard.ranks) if shard is not None else process_index


class GenerationShards:
    """What :func:`~nashkern.rl.generation.generate` needs for vocabulary-sharded heads:
    ``context()`` (both heads return their local columns), ``reference(r)`` (the reference's
    columns matching the policy's), ``vocab`` and ``sample(...)``. ``active`` is False when the
    generating model's head is not sharded."""

    def __init__(self, model, ref_model=None):
        self.model, self.ref_model = model, ref_model
        self.shard = model_shard(model)
        self.ref_shard = model_shard(ref_model)
        if self.shard is None and self.ref_shard is not None:
            align_reference(None, None, None, self.ref_shard)  # raises
        self.active = self.shard is not None

    @contextlib.contextmanager
    def context(self):
        with contextlib.ExitStack() as stack:
            if self.active:
                for m in (self.model, self.ref_model):
                    if m is not None:
                        stack.enter_context(local_head(
                            engines.inner_module(m).get_output_embeddings()))
            yield

    def reference(self, r: Optional[Tensor]) -> Optional[Tensor]:
        if r is None or not self.active or self.ref_shard is not None:
            if r is not None and self.ref_shard is not None:
                align_reference(self.shard, r.new_empty(self.shard.vocab, 0), None,
                                self.ref_shard)  # same sharding, or raises
            return r
        return r[:, self.shard.start:self.shard.start + self.shard.rows]  # unsharded reference

    def vocab(self, z: Tensor) -> int:
        return self.shard.vocab if self.active else z.shape[-1]

    def sample(self, z: Tensor, r: Optional[Tensor], coef: float, params, seen,
               generator, whole_rows: Callable) -> Tensor:
        """Global ids ``[B]``: the sharded two-pass sampler for plain sampling; ``whole_rows``
        (the one-process ``sample_next``) on all-gathered rows for greedy decoding and logits
        processors (they need whole rows). Not sharded: ``whole_rows`` on ``z``, ``r``."""
        if not self.active:
            return whole_rows(z, r, coef, params, seen, generator)
        if params.do_sample and not params.has_processors:
            return mixture_sample_vocab_parallel.mixture_sample(
                z, z if r is None else r, coef=0.0 if r is None else coef,
                temperature=params.temperature, generator=generator,
                process_group=self.shard.group, vocab_start=self.shard.start)
        full_r = None if r is None else _gather_columns(r, self.shard)
        return whole_rows(_gather_columns(z, self.shard), full_r, coef, params, seen, generator)
