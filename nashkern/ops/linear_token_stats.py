"""Op family ``linear_token_stats``: the per-token statistics of ``hidden @ weight.T + bias``
without ever materialising the ``[N, V]`` logits, forward or backward.

Public op: :func:`linear_token_stats`, funnelled into the custom op
``nashkern::linear_token_stats`` (hidden ``[N, D]``, weight ``[V, D]`` -> ``stats [5, N]``,
``lse [3, N]``) and its backward op. :data:`FAMILY` declares one backend table per strategy
(:data:`STRATEGIES`): ``"fused"``, the streaming torch path and the Triton kernels of
``kernels/linear_token_stats.py``; ``"chunked"``, cuBLAS GEMMs into a budgeted ``[C, V]`` buffer
plus each backend's logits-input ``token_stats`` implementation (``nashkern/backends/linear_token_stats_chunked.py``)
for torch, Triton and CUDA (the only way the CUDA backend of ``csrc/`` implements this op).
:func:`resolve_strategy` holds the ``"auto"`` rule. With ``process_group=`` (a head sharded by
vocabulary rows) the op runs :data:`VOCAB_PARALLEL` (``backends/linear_token_stats_vocab_parallel.py``) through its
own autograd instead of the custom op.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..backends import linear_token_stats_vocab_parallel as vocab_parallel
from ..backends.linear_token_stats_chunked import ChunkedLinearTokenStats
from ..backends.torch import linear_token_stats as torch_linear_token_stats
from ..kernels.layout import NUM_LSE, NUM_STATS
from .. import tuning
from ..types import TokenStats
from .token_stats import FAMILY as TOKEN_STATS_FAMILY
from .checks import check_float, check_same_device, check_targets, unpack_stats
from .registry import (
    BACKENDS, Family, Implementation, Scalars, double_backward_unsupported, empty_like_nothing,
    resolve_backend, _no_context,
)

try:
    from ..kernels.linear_token_stats import linear_token_stats_forward as triton_forward
    from ..kernels.linear_token_stats_backward import linear_token_stats_backward as triton_backward
except ImportError:  # triton is optional
    triton_forward = triton_backward = None

#: Positions of (hidden, weight, bias, ref_hidden, ref_weight, ref_bias) among the op's inputs.
_GRAD_INPUTS = (0, 1, 3, 4, 5, 6)


# ----------------------------------------------------------------------------------------------
# Custom ops: schema, fake implementation, autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("nashkern::linear_token_stats", mutates_args=())
def linear_token_stats_op(
    hidden: Tensor, weight: Tensor, targets: Optional[Tensor], bias: Optional[Tensor],
    ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor], ref_bias: Optional[Tensor],
    coef: Optional[float], temperature: float, softcap: Optional[float], ignore_index: int,
    backend: str, strategy: str,
) -> Tuple[Tensor, Tensor]:
    """hidden ``[N, D]``, weight ``[V, D]`` -> (stats ``[5, N]``, lse ``[3, N]``); ``backend``
    and ``strategy`` resolved (:func:`resolve_backend`, :func:`resolve_strategy`)."""
    if hidden.shape[0] == 0:
        backend, strategy = "torch", "fused"
    impl = FAMILY.implementation(backend, strategy)
    return impl.launch("forward", hidden.device, _dims(hidden, weight),
                       hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias,
                       Scalars(coef, temperature, softcap, ignore_index))


def _dims(hidden: Tensor, weight: Tensor):
    """The autotuning shape key of a launch (:meth:`Implementation.launch`)."""
    return dict(N=hidden.shape[0], V=weight.shape[0], D=weight.shape[1])


@linear_token_stats_op.register_fake
def _(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, coef, temperature, softcap,
      ignore_index, backend, strategy):
    n = hidden.shape[0]
    return (hidden.new_empty((NUM_STATS, n), dtype=torch.float32),
            hidden.new_empty((NUM_LSE, n), dtype=torch.float32))


@torch.library.custom_op("nashkern::linear_token_stats_backward", mutates_args=())
def linear_token_stats_backward_op(
    grad_stats: Tensor, hidden: Tensor, weight: Tensor, targets: Optional[Tensor],
    bias: Optional[Tensor], ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor],
    ref_bias: Optional[Tensor], stats: Tensor, lse: Tensor, coef: Optional[float],
    temperature: float, softcap: Optional[float], ignore_index: int, backend: str, strategy: str,
    needs_input_grad: List[bool],
) -> List[Tensor]:
    """-> [d_hidden, d_weight, d_bias, d_ref_hidden, d_ref_weight, d_ref_bias] (empty if absent)."""
    if hidden.shape[0] == 0:
        backend, strategy = "torch", "fused"
    impl = FAMILY.implementation(backend, strategy)
    grads = impl.launch(
        "backward", hidden.device, _dims(hidden, weight),
        grad_stats, hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, stats, lse,
        Scalars(coef, temperature, softcap, ignore_index), needs_input_grad=tuple(needs_input_grad),
    )
    return [empty_like_nothing(hidden) if g is None else g for g in grads]


@linear_token_stats_backward_op.register_fake
def _(grad_stats, hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, stats, lse,
      coef, temperature, softcap, ignore_index, backend, strategy, needs_input_grad):
    inputs = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    return [x.new_empty(x.shape) if need and x is not None else empty_like_nothing(hidden)
            for x, need in zip(inputs, needs_input_grad)]


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias = inputs[:7]
    stats, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, stats, lse)
    ctx.params = inputs[7:]  # coef, temperature, softcap, ignore_index, backend, strategy


def _backward(ctx, grad_stats, grad_lse):
    hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, stats, lse = ctx.saved_tensors
    inputs = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    needs = [bool(ctx.needs_input_grad[i]) and x is not None
             for i, x in zip(_GRAD_INPUTS, inputs)]
    grads = linear_token_stats_backward_op(
        grad_stats.contiguous(), hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias,
        stats, lse, *ctx.params, needs,
    )
    d = [g if need else None for g, need in zip(grads, needs)]
    return (d[0], d[1], None, d[2], d[3], d[4], d[5], None, None, None, None, None, None)


linear_token_stats_op.register_autograd(_backward, setup_context=_setup_context)
linear_token_stats_backward_op.register_autograd(
    double_backward_unsupported("nashkern::linear_token_stats_backward"), setup_context=_no_context)


# ----------------------------------------------------------------------------------------------
# The declared backend tables, one per strategy
# ----------------------------------------------------------------------------------------------
#: What ``strategy=`` accepts (DESIGN.md, "Cost model of linear_token_stats").
STRATEGIES = ("auto", "chunked", "fused")

#: "fused": one streaming pass over row blocks x vocabulary tiles, no [C, V] buffer (the memory
#: floor). Torch: its own 512-row x 2048-column tiles; Triton: kernels/linear_token_stats.py.
#: No "cuda": csrc/ has no fused-linear kernels.
_FUSED = {
    "torch": Implementation(torch_linear_token_stats.linear_token_stats_forward,
                            torch_linear_token_stats.linear_token_stats_backward),
}
if triton_forward is not None:
    _FUSED["triton"] = Implementation(triton_forward, triton_backward, tuning="linear_token_stats")


def _chunked(backend: str) -> Implementation:
    """"chunked" with ``backend``'s logits-input token_stats implementation as its epilogue."""
    strategy = ChunkedLinearTokenStats(TOKEN_STATS_FAMILY.implementation(backend))
    return Implementation(strategy.linear_token_stats_forward,
                          strategy.linear_token_stats_backward, tuning="chunked_linear")


#: "chunked": cuBLAS GEMMs into a budgeted [C, V] buffer + one epilogue launch per chunk, for
#: every backend that implements token_stats (torch, Triton, CUDA).
_CHUNKED = {backend: _chunked(backend) for backend in TOKEN_STATS_FAMILY.backends}

FAMILY = Family("linear_token_stats", (linear_token_stats_op, linear_token_stats_backward_op),
                strategies={"fused": _FUSED, "chunked": _CHUNKED})


#: ``process_group=`` given: the head sharded by vocabulary rows across the group
#: (``backends/linear_token_stats_vocab_parallel.py``: each rank streams its shard, O(N) all-reduces merge the
#: partial statistics). Not a strategy of the custom op: a process group cannot enter a
#: ``torch.library`` schema, so :class:`_VocabParallelLinearTokenStats` is its autograd (graph
#: break under ``torch.compile``). Torch and Triton (the fused kernels over the shard); no CUDA
#: shard pass (the CUDA backend has no fused linear kernel).
VOCAB_PARALLEL = {
    "torch": Implementation(vocab_parallel.linear_token_stats_forward,
                            vocab_parallel.linear_token_stats_backward),
}
if vocab_parallel.triton_kernels is not None:  # the fused kernels over the shard
    VOCAB_PARALLEL["triton"] = Implementation(
        vocab_parallel.triton_linear_token_stats_forward,
        vocab_parallel.triton_linear_token_stats_backward, tuning="linear_token_stats")


class _VocabParallelLinearTokenStats(torch.autograd.Function):
    """The vocabulary-parallel op: inputs in the custom op's order (so :data:`_GRAD_INPUTS`
    holds), then ``process_group``, ``vocab_start``; -> stats ``[5, N]``."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, coef,
                temperature, softcap, ignore_index, backend, process_group, vocab_start):
        ctx.impl = VOCAB_PARALLEL[backend]
        ctx.scalars = Scalars(coef, temperature, softcap, ignore_index)
        ctx.kwargs = dict(process_group=process_group, vocab_start=vocab_start,
                          **ctx.impl.config_kwargs(hidden.device))
        stats, lse = ctx.impl.forward(hidden, weight, targets, bias, ref_hidden, ref_weight,
                                      ref_bias, ctx.scalars, **ctx.kwargs)
        ctx.save_for_backward(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias,
                              stats, lse)
        return stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_stats):
        hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, stats, lse = \
            ctx.saved_tensors
        inputs = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
        needs = tuple(bool(ctx.needs_input_grad[i]) and x is not None
                      for i, x in zip(_GRAD_INPUTS, inputs))
        d = ctx.impl.backward(grad_stats.contiguous(), hidden, weight, targets, bias, ref_hidden,
                              ref_weight, ref_bias, stats, lse, ctx.scalars,
                              needs_input_grad=needs, **ctx.kwargs)
        d = [g if need else None for g, need in zip(d, needs)]
        return (d[0], d[1], None, d[2], d[3], d[4], d[5]) + (None,) * 7


def _vocab_shards(process_group, rows: int, device: torch.device,
                  tokens: int = 0) -> Tuple[int, int]:
    """(global vocabulary size, this rank's first row): one all-gather of the shard sizes and
    of each rank's number of tokens ``N``, which must agree (every rank computes the same
    tokens' statistics over its rows; different N would leave the ranks' all-reduces of
    different sizes, an abort inside the collective library)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group was given but torch.distributed is not initialised; "
                         "call torch.distributed.init_process_group first (or pass "
                         "process_group=None for an unsharded head)")
    mine = torch.tensor([rows, tokens], dtype=torch.long, device=device)  # NCCL: a CUDA tensor
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, mine, group=process_group)
    sizes = [int(x[0]) for x in gathered]
    counts = [int(x[1]) for x in gathered]
    if len(set(counts)) > 1:  # every rank sees the same gathered values: all raise, none hangs
        raise ValueError(f"process_group: every rank must pass the same tokens (hidden's leading "
                         f"dims, N = {tokens} on rank {dist.get_rank(process_group)}); the "
                         f"ranks passed N = {counts}")
    if min(sizes) < 1:
        raise ValueError(f"process_group: every rank's weight shard needs >= 1 row, got shard "
                         f"sizes {sizes}")
    return sum(sizes), sum(sizes[: dist.get_rank(process_group)])


def _vocab_parallel_backend(backend: str, strategy: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend not in ("auto", *VOCAB_PARALLEL):
        raise ValueError(
            f"backend={backend!r} with a process_group: only {', '.join(VOCAB_PARALLEL)} "
            "implement the vocabulary-parallel linear_token_stats (the fused shard pass); use "
            "one of them or 'auto'")
    if strategy not in ("auto", "fused"):
        raise ValueError(f"strategy={strategy!r} with a process_group: the vocabulary-parallel "
                         "head streams its shard (the fused pass); use 'auto' or 'fused'")
    if backend == "auto":  # the fused Triton pass on a GPU, the torch pass elsewhere
        return "triton" if device.type == "cuda" and "triton" in VOCAB_PARALLEL else "torch"
    return backend


def predicted_seconds(strategy: str, device_type: str, N: int, D: int, V: int, *,
                      models: int = 1, backward: bool = True, threads: int = 1) -> float:
    """The cost model's time of one call (DESIGN.md, "Cost model"; constants
    ``tuning.LINEAR_STRATEGY_COSTS``): ``models`` heads in the forward (2 with a reference),
    the backward (when ``backward``) recomputing the policy's logits and forming dhidden and
    dweight (6·N·D·V). CPU: matmul FLOPs at ``threads`` x the per-thread rate, plus the
    epilogue's per-logit cost; GPU: the FLOPs at the strategy's fraction of the roofline, in
    units of the device's matmul rate (only ratios are meaningful there)."""
    costs = tuning.LINEAR_STRATEGY_COSTS
    flops = 2 * models * N * D * V + (6 * N * D * V if backward else 0)
    logits = N * V * (models + (1 if backward else 0))
    if device_type == "cuda":
        fraction = costs.gpu_chunked_fraction if strategy == "chunked" else costs.gpu_fused_fraction
        return flops / fraction
    per_logit = costs.cpu_chunked_ns_per_logit if strategy == "chunked" else costs.cpu_fused_ns_per_logit
    return (flops / costs.cpu_matmul_flops + logits * per_logit * 1e-9) / max(1, threads)


def resolve_strategy(strategy: str, backend: str, device: torch.device, D: int = 1, V: int = 1,
                     models: int = 1) -> str:
    """Map the user's ``strategy`` to "chunked" or "fused" for the resolved ``backend``.

    "auto": the strategy with the lower :func:`predicted_seconds` for this head (``models``: 2
    with a reference) among those ``backend`` implements (the CUDA backend has chunked only).
    With today's constants the CPU picks fused (its epilogue passes stay in cache: 4.5 vs 11 ns
    per logit at equal matmuls) and a GPU chunked (~0.9 vs ~0.2 of the matmul roofline). A
    strategy the backend does not implement is a ValueError."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "auto":
        # every term of the model is proportional to N and divided by the thread count, so the
        # choice depends on neither: evaluated at N = 1 on one thread (under torch.compile N may
        # be symbolic and torch.get_num_threads() cannot be traced). A plain loop, not
        # min(key=...): dynamo cannot trace min with a key function.
        best = None
        for s in ("fused", "chunked"):
            if backend in FAMILY.strategies[s]:
                t = predicted_seconds(s, device.type, 1, D, V, models=models)
                if best is None or t < best[0]:
                    best = (t, s)
        strategy = best[1]
    if backend not in FAMILY.strategies[strategy]:
        have = [s for s, table in FAMILY.strategies.items() if backend in table]
        other = [b for b in FAMILY.strategy_backends(strategy) if b != "torch"]
        raise ValueError(
            f"backend={backend!r} implements linear_token_stats with "
            f"{' / '.join(f'strategy={s!r}' for s in have)} only; use one of those or 'auto'"
            + (f", or backend={other[0]!r} for the {strategy} strategy" if other else ""))
    return strategy


# ----------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------
def _check_head(prefix: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    check_float(f"{prefix}hidden", hidden)
    check_float(f"{prefix}weight", weight)
    if hidden.dim() < 1:
        raise ValueError(f"{prefix}hidden must have shape [..., D], got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"{prefix}weight must have shape [V, D], got {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"{prefix}weight must have V >= 1 rows, got {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{prefix}hidden's last dim ({hidden.shape[-1]}) must equal "
                         f"{prefix}weight's D ({weight.shape[1]}); weight is [V, D] = "
                         f"{tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{prefix}hidden ({hidden.dtype}) and {prefix}weight ({weight.dtype}) "
                         "must have the same dtype")
    check_same_device(f"{prefix}weight", weight, f"{prefix}hidden", hidden)
    if bias is not None:
        check_float(f"{prefix}bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{prefix}bias must have shape [V] = ({weight.shape[0]},), "
                             f"got {tuple(bias.shape)}")
        check_same_device(f"{prefix}bias", bias, f"{prefix}hidden", hidden)


def linear_token_stats(
    hidden: Tensor, weight: Tensor, targets: Optional[Tensor], *, bias: Optional[Tensor] = None,
    ref_hidden: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
    ref_bias: Optional[Tensor] = None, coef: Optional[float] = None, temperature: float = 1.0,
    softcap: Optional[float] = None, ignore_index: int = -100, backend: str = "auto",
    strategy: str = "auto", process_group=None,
) -> TokenStats:
    """:func:`token_stats` of ``logits = hidden @ weight.T + bias`` without ever materialising
    the ``[N, V]`` logits, forward or backward.

    ``strategy``: ``"chunked"`` (cuBLAS GEMMs into a reusable ``[C, V]`` buffer of at most
    ``tuning.CHUNKED_LINEAR.max_chunk_bytes``, then the backend's logits kernels; bf16/fp16
    logits are rounded once to the model dtype, as in eager PyTorch), ``"fused"`` (one streaming
    kernel, no ``[C, V]`` buffer: the memory floor, fp32 logits; not on ``backend="cuda"``) or
    ``"auto"`` (the lower time of the cost model, :func:`predicted_seconds`: chunked on CUDA
    devices, fused on the CPU). DESIGN.md has the cost model.

    hidden: ``[..., D]``; weight: ``[V, D]``; bias: ``[V]``; targets: ``[...]`` (or None);
    ref_hidden: ``[..., Dr]`` (the reference model's final hidden states); ref_weight
    ``[V, Dr]`` and ref_bias ``[V]`` default to the policy's head when ``ref_hidden`` is given
    without them. Returns :class:`TokenStats` of float32 ``[...]`` tensors.

    ``process_group`` (a ``torch.distributed`` group, or None): the head is sharded by
    vocabulary rows across it (tensor-parallel, as Megatron's): ``weight``, ``bias``,
    ``ref_weight``, ``ref_bias`` are this rank's rows, the shards in rank order (any sizes >= 1),
    ``hidden`` / ``ref_hidden`` and ``targets`` (global ids) are the same on every rank, and so
    are the returned statistics; ``d_hidden`` is summed over the group, ``d_weight`` / ``d_bias``
    stay this rank's rows. Torch path only (``backends/linear_token_stats_vocab_parallel.py``; DESIGN.md says what
    it communicates and when it pays). Every rank must call it, with the same N and the
    same inputs requiring grad (the backward all-reduces d_hidden).
    """
    _check_head("", hidden, weight, bias)
    scalars = Scalars.checked(coef, temperature, softcap, ignore_index)
    lead, vocab = hidden.shape[:-1], weight.shape[0]
    if ref_hidden is None:
        if ref_weight is not None or ref_bias is not None:
            raise ValueError("ref_weight / ref_bias were given but ref_hidden is None")
        if coef is not None:
            raise ValueError("coef was given but ref_hidden is None: the mixture needs both models")
    else:
        if ref_weight is None:
            ref_weight, ref_bias = weight, bias if ref_bias is None else ref_bias
        _check_head("ref_", ref_hidden, ref_weight, ref_bias)
        if ref_hidden.shape[:-1] != lead:
            raise ValueError(f"ref_hidden must have the leading shape of hidden, {tuple(lead)}, "
                             f"got {tuple(ref_hidden.shape[:-1])}")
        if ref_weight.shape[0] != vocab:
            shard = " (this rank's shard)" if process_group is not None else ""
            raise ValueError(f"ref_weight must have the vocabulary size of weight{shard} "
                             f"({vocab}), got {tuple(ref_weight.shape)}")
        check_same_device("ref_hidden", ref_hidden, "hidden", hidden)
    if process_group is not None:
        backend = _vocab_parallel_backend(backend, strategy, hidden.device)
        vocab, vocab_start = _vocab_shards(process_group, vocab, hidden.device,
                                           tokens=math.prod(lead))
    else:
        backend = resolve_backend(FAMILY, backend, hidden.device)
        strategy = resolve_strategy(strategy, backend, hidden.device, weight.shape[1], vocab,
                                    1 if ref_hidden is None else 2)
    flat_targets = None
    if targets is not None:
        flat_targets = check_targets(targets, lead, vocab, scalars.ignore_index, hidden.device,
                                     "hidden")

    def rows(x):
        return None if x is None else x.reshape(-1, x.shape[-1]).contiguous()

    def contig(x):
        return None if x is None else x.contiguous()

    inputs = (rows(hidden), contig(weight), flat_targets, contig(bias), rows(ref_hidden),
              contig(ref_weight), contig(ref_bias), *scalars.as_args(), backend)
    if process_group is not None:
        stats = _VocabParallelLinearTokenStats.apply(*inputs, process_group, vocab_start)
    else:
        stats, _ = linear_token_stats_op(*inputs, strategy)
    return unpack_stats(stats, lead, targets is not None, ref_hidden is not None, coef is not None)
