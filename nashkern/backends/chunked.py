"""The chunked strategy of ``linear_token_stats``: cuBLAS GEMMs + a logits-input epilogue.

For each chunk of C rows (C from :class:`nashkern.tuning.ChunkedLinear`'s memory budget):

* forward: ``buf = hidden_c @ weight.T + bias`` (and ``ref_buf`` for the reference) by one
  ``torch.mm`` / ``torch.addmm`` in the model's dtype into a reusable ``[C, V]`` buffer
  (cuBLAS accumulates in fp32 and rounds each logit once to the model's dtype, exactly as eager
  PyTorch's ``F.linear``), then ONE epilogue launch, the backend's ``token_stats_forward`` over
  that ``[1, C, V]`` view, which applies softcap / temperature / mixture and writes the chunk's
  columns of ``stats [5, N]`` and ``lse [3, N]``;
* backward: recompute the chunk's logits into the buffer(s), then ONE epilogue launch, the
  backend's ``token_stats_backward`` with ``out=`` the buffers themselves: it turns the logits
  into the logit gradients ``dz`` / ``dr`` in place (model dtype, one rounding of the fp32
  gradient, as the fused kernel's default and eager PyTorch); then by cuBLAS
  ``d_hidden_c = dz @ weight`` (written straight into ``d_hidden``'s rows, fp32 accumulation
  over V inside the GEMM) and ``d_weight += dz.T @ hidden_c``; ``d_bias += dz.sum(0)`` in fp32.

``d_weight`` precision: float32 weights accumulate in place (``addmm_``, fp32 throughout).
bf16/fp16 weights with a single chunk (N <= C) get one GEMM straight into a model-dtype
``d_weight`` (fp32 accumulation over all N rows inside cuBLAS, one rounding). With several
chunks each chunk's product is rounded once to the model dtype in vocabulary slices of at most
``max_chunk_bytes / 8`` and summed into a float32 ``[V, D]`` accumulator (like the torch
backend's and the fused kernel's fp32 dW), cast to the model dtype at the end: the error is one
model-dtype rounding per chunk's partial sum plus the final rounding.

Memory beyond the inputs, ``d_hidden``, ``d_weight`` (its fp32 accumulator for bf16/fp16 with
several chunks) and the O(N) statistics: the ``[C, V]`` buffers, at most ``max_chunk_bytes``
(7/8 of it when a low-precision ``d_weight`` slice temporary needs the other 1/8), unless one
``row_align`` block of rows alone is larger (then exactly one block). The Triton and CUDA
epilogues add only O(C) statistics; the torch epilogue adds its own float32 tiles
(:class:`nashkern.tuning.TorchChunking`).

Gradients of fields whose upstream gradient is zero everywhere cost nothing; the reference's
logits are not recomputed when nothing needs them (no reference gradient, no KL / mixture
gradient): the usual frozen reference of Nash-MD / XPO / Online DPO losses built on log-probs.

The epilogue is any backend module with the logits-input contract of DESIGN.md whose
``token_stats_backward`` accepts ``out=``: ``torch_impl`` (the CPU path), the Triton kernels of
``kernels/token_stats.py`` and the CUDA kernels of ``csrc/token_stats.cu`` (``cuda_impl``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from .. import tuning
from ..types import (
    LOGPROBS, MIXTURE_LOGPROBS, NUM_LSE, NUM_STATS, REF_LOGPROBS,
)
from . import torch_impl
from .torch_impl import _active_fields, _needs_ref_tiles, _upstream

_EPILOGUE_MODULES = {
    "torch": "nashkern.backends.torch_impl",
    "triton": "nashkern.kernels.token_stats",
    "cuda": "nashkern.backends.cuda_impl",
}


def chunk_rows(N: int, V: int, itemsizes: Sequence[int], budget: int, row_align: int) -> int:
    """Rows per chunk: the largest multiple of ``row_align`` whose ``[C, V]`` buffers (one per
    entry of ``itemsizes``) fit in ``budget`` bytes, at least ``row_align``, at most ``N``."""
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


class _WeightGrad:
    """``d_weight = Σ_chunks dz_c.T @ hidden_c`` with float32 accumulation (module docstring)."""

    def __init__(self, weight: torch.Tensor, single_chunk: bool, slice_bytes: int):
        self.dtype = weight.dtype
        self.direct = weight.dtype == torch.float32 or single_chunk
        self.acc = (torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
                    if self.direct else
                    torch.zeros(weight.shape, dtype=torch.float32, device=weight.device))
        V, D = weight.shape
        self.slice_rows = max(1, min(V, slice_bytes // max(1, D * weight.element_size())))

    def add(self, d_logits: torch.Tensor, hidden: torch.Tensor) -> None:
        if self.direct:
            self.acc.addmm_(d_logits.T, hidden)
            return
        for v0 in range(0, self.acc.shape[0], self.slice_rows):
            v1 = min(self.acc.shape[0], v0 + self.slice_rows)
            self.acc[v0:v1] += torch.mm(d_logits[:, v0:v1].T, hidden)

    def result(self) -> torch.Tensor:
        return self.acc.to(self.dtype)


class ChunkedLinearTokenStats:
    """``linear_token_stats_forward`` / ``_backward`` (the backend contract of DESIGN.md) by the
    chunked strategy, with the logits-input ``epilogue`` backend module. ``config`` defaults to
    :data:`nashkern.tuning.CHUNKED_LINEAR` (read at each call)."""

    def __init__(self, epilogue, config: Optional[tuning.ChunkedLinear] = None):
        self.epilogue = epilogue
        self.config = config

    def _cfg(self) -> tuning.ChunkedLinear:
        return self.config if self.config is not None else tuning.CHUNKED_LINEAR

    def _chunks(self, N: int, V: int, heads: Sequence[Optional[_Head]], budget: int
                ) -> Iterator[Tuple[int, int, List[Optional[torch.Tensor]]]]:
        """``(n0, n1, [policy logits, reference logits or None])`` per chunk, each a contiguous
        ``[1, n1 - n0, V]`` view of a buffer allocated once for the whole pass."""
        cfg = self._cfg()
        live = [h for h in heads if h is not None]
        C = chunk_rows(N, V, [h.weight.element_size() for h in live], budget, cfg.row_align)
        bufs = [None if h is None else
                torch.empty((C, V), dtype=h.weight.dtype, device=h.weight.device) for h in heads]
        for n0 in range(0, N, C):
            n1 = min(N, n0 + C)
            yield n0, n1, [None if h is None else h.logits_into(b, n0, n1).unsqueeze(0)
                           for h, b in zip(heads, bufs)]

    def linear_token_stats_forward(self, hidden, weight, targets, bias, ref_hidden, ref_weight,
                                   ref_bias, *, coef, temperature, softcap, ignore_index):
        N, V = hidden.shape[0], weight.shape[0]
        stats = torch.zeros(NUM_STATS, N, device=hidden.device)
        lse = torch.zeros(NUM_LSE, N, device=hidden.device)
        heads = [_Head.of(hidden, weight, bias), _Head.of(ref_hidden, ref_weight, ref_bias)]
        for n0, n1, (z, r) in self._chunks(N, V, heads, self._cfg().max_chunk_bytes):
            stats[:, n0:n1], lse[:, n0:n1] = self.epilogue.token_stats_forward(
                z, None if targets is None else targets[n0:n1], r, coef=coef,
                temperature=temperature, softcap=softcap, ignore_index=ignore_index)
        return stats, lse

    def linear_token_stats_backward(self, grad_stats, hidden, weight, targets, bias, ref_hidden,
                                    ref_weight, ref_bias, stats, lse, *, coef, temperature,
                                    softcap, ignore_index, needs_input_grad: Sequence[bool]):
        inputs = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
        need = [bool(n) and x is not None for n, x in zip(needs_input_grad, inputs)]
        if not any(need):
            return (None,) * 6
        N, V = hidden.shape[0], weight.shape[0]
        has_ref = ref_hidden is not None
        grad = _upstream(grad_stats, targets, ignore_index)
        if has_ref and targets is not None and coef in (0.0, 1.0):
            # The mixture end points are the policy / the reference: fold its gradient in, so
            # that a policy-only loss at coef 0 never recomputes the reference.
            grad = grad.clone()
            grad[LOGPROBS if coef == 0 else REF_LOGPROBS] += grad[MIXTURE_LOGPROBS]
            grad[MIXTURE_LOGPROBS] = 0.0
        active = _active_fields(grad)
        use_ref = _needs_ref_tiles(has_ref, any(need[3:]), active)

        cfg = self._cfg()
        low_precision = any(n and x.dtype != torch.float32
                            for n, x in ((need[1], weight), (need[4], ref_weight)))
        slice_bytes = cfg.max_chunk_bytes // 8 if low_precision else 0
        budget = cfg.max_chunk_bytes - slice_bytes
        heads = [_Head.of(hidden, weight, bias), _Head.of(ref_hidden, ref_weight, ref_bias)
                 if use_ref else None]
        C = chunk_rows(N, V, [h.weight.element_size() for h in heads if h is not None], budget,
                       cfg.row_align)
        d_hidden = [torch.zeros_like(x) if n else None for x, n in ((hidden, need[0]),
                                                                    (ref_hidden, need[3]))]
        d_weight = [_WeightGrad(w, N <= C, slice_bytes) if n else None
                    for w, n in ((weight, need[1]), (ref_weight, need[4]))]
        d_bias = [torch.zeros(V, device=hidden.device) if n else None
                  for n in (need[2], need[5])]
        if N and any(active):
            for n0, n1, (z, r) in self._chunks(N, V, heads, budget):
                dz, dr = self.epilogue.token_stats_backward(
                    grad[:, n0:n1], z, None if targets is None else targets[n0:n1], r,
                    stats[:, n0:n1], lse[:, n0:n1], coef=coef if use_ref else None,
                    temperature=temperature, softcap=softcap, ignore_index=ignore_index,
                    needs_grad_logits=any(need[:3]), needs_grad_ref=any(need[3:]), out=(z, r))
                for k, (d_logits, head) in enumerate(((dz, heads[0]), (dr, heads[1]))):
                    if d_logits is None:
                        continue
                    d_logits = d_logits[0]  # [n1 - n0, V]
                    if d_hidden[k] is not None:
                        torch.mm(d_logits, head.weight, out=d_hidden[k][n0:n1])
                    if d_weight[k] is not None:
                        d_weight[k].add(d_logits, head.hidden[n0:n1])
                    if d_bias[k] is not None:
                        d_bias[k] += d_logits.sum(0, dtype=torch.float32)
        return (
            d_hidden[0], None if d_weight[0] is None else d_weight[0].result(),
            None if d_bias[0] is None else d_bias[0].to(bias.dtype),
            d_hidden[1], None if d_weight[1] is None else d_weight[1].result(),
            None if d_bias[1] is None else d_bias[1].to(ref_bias.dtype),
        )


def implementation(epilogue_backend: str,
                   config: Optional[tuning.ChunkedLinear] = None) -> ChunkedLinearTokenStats:
    """The chunked strategy with the ``"torch"``, ``"triton"`` or ``"cuda"`` epilogue."""
    if epilogue_backend not in _EPILOGUE_MODULES:
        raise ValueError(f"the chunked strategy's epilogue backend must be one of "
                         f"{tuple(_EPILOGUE_MODULES)}, got {epilogue_backend!r}")
    module = (torch_impl if epilogue_backend == "torch"
              else importlib.import_module(_EPILOGUE_MODULES[epilogue_backend]))
    return ChunkedLinearTokenStats(module, config)
