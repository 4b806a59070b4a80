"""The chunked strategy of ``linear_token_stats``: cuBLAS GEMMs + a logits-input epilogue.

Forward, over chunks of C rows (C from :class:`nashkern.tuning.ChunkedLinear`'s budget):
``buf = hidden_c @ weight.T + bias`` (and ``ref_buf`` for the reference) by one ``torch.mm`` /
``torch.addmm`` in the model's dtype into a reusable ``[C, V]`` buffer (cuBLAS accumulates in
fp32 and rounds each logit once to the model's dtype, exactly as eager PyTorch's ``F.linear``),
then ONE epilogue launch, the backend's ``token_stats_forward`` over that ``[1, C, V]`` view,
which applies softcap / temperature / mixture and writes the chunk's ``stats [5, N]`` and
``lse [3, N]`` columns. The statistics need whole rows, hence row chunks.

Backward, over chunks of Cv vocabulary columns: the gradient of a column needs only per-row
values the forward saved (``lse``, entropy, KL), so the backward can chunk the vocabulary
instead of the rows, which is what makes ``d_weight`` cheap: ``buf = hidden @ weight[v0:v1].T``
(``[N, Cv]``, budgeted like the forward's buffer), ONE epilogue launch, the backend's
``token_stats_backward`` with ``out=`` the buffers themselves, turns the logits into the logit
gradients ``dz`` / ``dr`` in place (model dtype: one rounding of the fp32 gradient, as eager
PyTorch and the fused kernel's default), then by cuBLAS
``d_weight[v0:v1] = dz.T @ hidden`` (the whole N reduction in one GEMM with fp32 accumulation:
each entry of ``d_weight`` is written once and rounded once, no ``[V, D]`` accumulator and no
read-modify-write of it per chunk), ``d_hidden += dz @ weight[v0:v1]`` and
``d_bias[v0:v1] = dz.sum(0)`` (fp32 sum). ``d_hidden`` is accumulated in fp32: in place for
float32 models or a single chunk, else a float32 ``[N, D]`` accumulator fed with each chunk's
model-dtype product in row slices of at most ``max_chunk_bytes / 4`` (``[N, D]`` is small
next to ``[V, D]``: 16x smaller at N=8192, V=128256). Targets are passed relative to the
chunk (``t - v0``, a column past the chunk when the target lies elsewhere, ``-1`` with
``ignore_index=-1`` for ignored rows).

Memory beyond the inputs, ``d_hidden`` (with its fp32 accumulator), ``d_weight`` and the O(N)
statistics: the ``[C, V]`` / ``[N, Cv]`` buffers plus, for a bf16/fp16 ``d_hidden`` over several
chunks, one row slice of the ``[N, D]`` product: at most ``max_chunk_bytes`` together, unless
one ``row_align`` block of rows / columns alone is larger (then exactly one block). The Triton
and CUDA epilogues add only O(N) statistics; the torch epilogue adds its own float32 tiles
(:class:`nashkern.tuning.TorchChunking`).

Gradients of fields whose upstream gradient is zero everywhere cost nothing; the reference's
logits are not recomputed when nothing needs them (no reference gradient, no KL / mixture
gradient): the usual frozen reference of Nash-MD / XPO / Online DPO losses built on log-probs.

The epilogue is a backend's implementation of the logits-input ``token_stats`` op (the
``token_stats`` family's table entry, ``nashkern/ops/token_stats.py``: ``forward``, ``backward`` with
``out=``, ``config_kwargs(device)``): ``backends/torch/token_stats.py`` (the CPU path), the Triton kernels of
``kernels/token_stats.py`` and the CUDA kernels of ``csrc/token_stats.cu``
(``backends/cuda/token_stats.py``).
``nashkern/ops/linear_token_stats.py`` declares one chunked implementation per such backend.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from .. import tuning
from ..kernels.layout import NUM_LSE, NUM_STATS, Scalars
from .torch.common import active_fields, needs_ref_tiles, upstream


def chunk_rows(N: int, V: int, itemsizes: Sequence[int], budget: int, row_align: int) -> int:
    """Rows per chunk: the largest multiple of ``row_align`` whose ``[C, V]`` buffers (one per
    entry of ``itemsizes``) fit in ``budget`` bytes, at least ``row_align``, at most ``N``.
    (The backward's vocabulary chunks are ``chunk_rows(V, N, ...)``.)"""
    per_row = max(1, V * sum(itemsizes))
    rows = budget // per_row // row_align * row_align
    return max(1, min(N, max(row_align, rows)))


@dataclass
class _Head:
    """One model's lm_head: ``logits = hidden @ weight.T + bias`` (bias cast once to the
    weight's dtype, as ``F.linear`` needs)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]

    @staticmethod
    def of(hidden, weight, bias) -> Optional["_Head"]:
        if hidden is None:
            return None
        if bias is not None and bias.dtype != weight.dtype:
            bias = bias.to(weight.dtype)
        return _Head(hidden, weight, bias)

    def logits_into(self, buf: torch.Tensor, n0: int, n1: int) -> torch.Tensor:
        """The ``[n1 - n0, V]`` logits of rows ``n0:n1``, computed into the first rows of
        ``buf`` (one GEMM; the bias is fused into it)."""
        out = buf[: n1 - n0]
        h = self.hidden[n0:n1]
        if self.bias is None:
            return torch.mm(h, self.weight.T, out=out)
        return torch.addmm(self.bias, h, self.weight.T, out=out)

    def columns_into(self, buf: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
        """The ``[N, v1 - v0]`` logits of vocabulary columns ``v0:v1`` for every row, computed
        into the front of the flat buffer ``buf`` (one GEMM, bias fused)."""
        out = buf[: self.hidden.shape[0] * (v1 - v0)].view(self.hidden.shape[0], v1 - v0)
        w = self.weight[v0:v1].T
        if self.bias is None:
            return torch.mm(self.hidden, w, out=out)
        return torch.addmm(self.bias[v0:v1], self.hidden, w, out=out)


class _HiddenGrad:
    """``d_hidden = Σ_vocabulary chunks dz_c @ weight_c`` with float32 accumulation: float32
    models (and a single chunk) accumulate in place in the output; bf16/fp16 with several
    chunks add each chunk's model-dtype product, in row slices of at most ``slice_rows`` (a
    ``[slice_rows, D]`` temporary), into a float32 accumulator, cast at the end."""

    def __init__(self, hidden: torch.Tensor, single_chunk: bool, slice_rows: int):
        self.dtype = hidden.dtype
        self.direct = hidden.dtype == torch.float32 or single_chunk
        self.acc = torch.zeros(hidden.shape, device=hidden.device,
                               dtype=hidden.dtype if self.direct else torch.float32)
        self.slice_rows = max(1, slice_rows)

    def add(self, d_logits: torch.Tensor, weight: torch.Tensor) -> None:
        if self.direct:
            self.acc.addmm_(d_logits, weight)
            return
        for n0 in range(0, self.acc.shape[0], self.slice_rows):
            n1 = min(self.acc.shape[0], n0 + self.slice_rows)
            self.acc[n0:n1] += torch.mm(d_logits[n0:n1], weight)

    def result(self) -> torch.Tensor:
        return self.acc.to(self.dtype)


class ChunkedLinearTokenStats:
    """``linear_token_stats_forward`` / ``_backward`` (the backend contract of DESIGN.md) by the
    chunked strategy, with the logits-input ``epilogue``: the ``token_stats`` implementation of
    one backend (``forward``, ``backward`` accepting ``out=``, ``config_kwargs(device)``; see the
    module docstring). The chunk budget is the call's ``config=`` (the op passes
    ``tuning.config_for("chunked_linear", device)``), else the ``config`` given here, else
    :data:`nashkern.tuning.CHUNKED_LINEAR`."""

    def __init__(self, epilogue, config: Optional[tuning.ChunkedLinear] = None):
        self.epilogue = epilogue
        self.config = config

    def _cfg(self, config: Optional[tuning.ChunkedLinear]) -> tuning.ChunkedLinear:
        if config is not None:
            return config
        return self.config if self.config is not None else tuning.CHUNKED_LINEAR

    def _chunks(self, N: int, V: int, heads: Sequence[Optional[_Head]],
                cfg: tuning.ChunkedLinear
                ) -> Iterator[Tuple[int, int, List[Optional[torch.Tensor]]]]:
        """``(n0, n1, [policy logits, reference logits or None])`` per chunk, each a contiguous
        ``[1, n1 - n0, V]`` view of a buffer allocated once for the whole pass."""
        budget = cfg.max_chunk_bytes
        live = [h for h in heads if h is not None]
        C = chunk_rows(N, V, [h.weight.element_size() for h in live], budget, cfg.row_align)
        bufs = [None if h is None else
                torch.empty((C, V), dtype=h.weight.dtype, device=h.weight.device) for h in heads]
        for n0 in range(0, N, C):
            n1 = min(N, n0 + C)
            yield n0, n1, [None if h is None else h.logits_into(b, n0, n1).unsqueeze(0)
                           for h, b in zip(heads, bufs)]

    def linear_token_stats_forward(self, hidden, weight, targets, bias, ref_hidden, ref_weight,
                                   ref_bias, scalars: Scalars, *,
                                   config: Optional[tuning.ChunkedLinear] = None):
        N, V = hidden.shape[0], weight.shape[0]
        stats = torch.zeros(NUM_STATS, N, device=hidden.device)
        lse = torch.zeros(NUM_LSE, N, device=hidden.device)
        heads = [_Head.of(hidden, weight, bias), _Head.of(ref_hidden, ref_weight, ref_bias)]
        epilogue_config = self.epilogue.config_kwargs(hidden.device)
        for n0, n1, (z, r) in self._chunks(N, V, heads, self._cfg(config)):
            stats[:, n0:n1], lse[:, n0:n1] = self.epilogue.forward(
                z, None if targets is None else targets[n0:n1], r, scalars, **epilogue_config)
        return stats, lse

    def linear_token_stats_backward(self, grad_stats, hidden, weight, targets, bias, ref_hidden,
                                    ref_weight, ref_bias, stats, lse, scalars: Scalars, *,
                                    needs_input_grad: Sequence[bool],
                                    config: Optional[tuning.ChunkedLinear] = None):
        inputs = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
        need = [bool(n) and x is not None for n, x in zip(needs_input_grad, inputs)]
        if not any(need):
            return (None,) * 6
        N, V = hidden.shape[0], weight.shape[0]
        has_ref = ref_hidden is not None
        grad = upstream(grad_stats, targets, scalars, has_ref)
        active = active_fields(grad)
        use_ref = needs_ref_tiles(has_ref, any(need[3:]), active)
        heads = [_Head.of(hidden, weight, bias),
                 _Head.of(ref_hidden, ref_weight, ref_bias) if use_ref else None]

        cfg = self._cfg(config)
        live = [h for h in heads if h is not None]
        # bf16/fp16 d_hidden over several chunks: a model-dtype product per chunk, in row slices
        # of at most a quarter of the budget.
        temp, slice_rows = 0, N
        for h, n in ((heads[0], need[0]), (heads[1], need[3])):
            if n and h is not None and h.hidden.dtype != torch.float32:
                row_bytes = h.hidden.shape[1] * h.hidden.element_size()
                slice_rows = min(slice_rows, max(1, cfg.max_chunk_bytes // 4 // row_bytes))
                temp = max(temp, slice_rows * row_bytes)
        budget = max(0, cfg.max_chunk_bytes - temp)
        Cv = chunk_rows(V, N, [h.weight.element_size() for h in live], budget, cfg.row_align)
        d_hidden = [_HiddenGrad(x, Cv >= V, slice_rows) if n else None
                    for x, n in ((hidden, need[0]), (ref_hidden, need[3]))]
        d_weight = [torch.zeros_like(w) if n else None
                    for w, n in ((weight, need[1]), (ref_weight, need[4]))]
        d_bias = [torch.zeros_like(b) if n else None for b, n in ((bias, need[2]),
                                                                  (ref_bias, need[5]))]
        if N and any(active):
            epilogue_config = self.epilogue.config_kwargs(hidden.device)
            bufs = [None if h is None else torch.empty(N * Cv, dtype=h.weight.dtype,
                                                       device=h.weight.device) for h in heads]
            valid = None if targets is None else targets != scalars.ignore_index
            # targets local to each chunk, ignored rows at -1 (see _local_targets); without the
            # reference's tiles no mixture term is computed
            local = replace(scalars, coef=scalars.coef if use_ref else None, ignore_index=-1)
            for v0 in range(0, V, Cv):
                v1 = min(V, v0 + Cv)
                z, r = [None if h is None else h.columns_into(b, v0, v1).unsqueeze(0)
                        for h, b in zip(heads, bufs)]
                dz, dr = self.epilogue.backward(
                    grad, z, _local_targets(targets, valid, v0, v1), r, stats, lse, local,
                    needs_grad_logits=any(need[:3]),
                    needs_grad_ref=any(need[3:]), out=(z, r), **epilogue_config)
                for k, (d_logits, head) in enumerate(((dz, heads[0]), (dr, heads[1]))):
                    if d_logits is None:
                        continue
                    d_logits = d_logits[0]  # [N, v1 - v0]
                    if d_hidden[k] is not None:
                        d_hidden[k].add(d_logits, head.weight[v0:v1])
                    if d_weight[k] is not None:  # the whole N reduction in one GEMM
                        torch.mm(d_logits.T, head.hidden, out=d_weight[k][v0:v1])
                    if d_bias[k] is not None:
                        d_bias[k][v0:v1] = d_logits.sum(0, dtype=torch.float32)
        return (None if d_hidden[0] is None else d_hidden[0].result(), d_weight[0], d_bias[0],
                None if d_hidden[1] is None else d_hidden[1].result(), d_weight[1], d_bias[1])


def _local_targets(targets: Optional[torch.Tensor], valid: Optional[torch.Tensor], v0: int,
                   v1: int) -> Optional[torch.Tensor]:
    """Targets relative to the vocabulary chunk ``[v0, v1)``: ``t - v0`` inside it, ``v1 - v0``
    (a column the chunk does not have: no one-hot term) outside it, -1 for ignored rows (the
    epilogue is called with ``ignore_index=-1``, which no local target can equal)."""
    if targets is None:
        return None
    local = targets - v0
    inside = (local >= 0) & (local < v1 - v0)
    return torch.where(valid, torch.where(inside, local, v1 - v0), -1)

