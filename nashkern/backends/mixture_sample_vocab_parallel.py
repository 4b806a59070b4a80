"""``mixture_sample`` over a vocabulary sharded across a process group (tensor parallelism: each
rank holds its columns of both models' last-position logits): the torch backend's inverse CDF as
a two-pass normaliser, O(B·P) values per call instead of all-gathering ``[B, V]`` rows
(DESIGN.md, "Tensor parallelism in the trainers"). Used by the trainers' generation
(``nashkern/rl/tensor_parallel.py``)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import tuning
from .torch.common import mix, temper
from .torch.mixture_sample import _search


def mixture_sample(logits, ref_logits, *, coef, temperature, generator, process_group,
                   vocab_start: int):
    """The torch backend's inverse-CDF sampler (``torch/mixture_sample.py``) over a vocabulary
    sharded across ``process_group``: ``logits`` / ``ref_logits`` are this rank's columns
    ``[vocab_start, vocab_start + V_r)`` ``[B, V_r]`` of both models (the same columns of both;
    shards in rank order), the generator holds the same state on every rank. -> int64 ``[B]`` global ids (-1: no finite mixture logit
    anywhere in the row, or a NaN in any shard), the same on every rank.

    Two-pass normaliser, 3 collectives of O(B·P) values instead of all-gathering 2 ``[B, V]``
    logit rows: (1) one MAX all-reduce of ``[3, B]`` (the tempered max, the untempered max for the
    +inf rule, a NaN flag); (2) every shard's ``exp(m − max)`` and its float64 total, one
    all-gather of the ``[B]`` totals; the row's uniform ``u`` (drawn as the one-process sampler
    draws it: one seed from ``generator``, one float64 uniform per row) picks the shard by an
    inverse CDF over the P totals; (3) that shard picks the token with the one-process sampler's
    two-level search on its residual, and one MAX all-reduce of the ids tells every rank. The
    weights are the one-process weights element for element (the same global max), so the sample
    equals ``ops.mixture_sample(..., backend="torch")`` on the gathered rows with the same
    generator state unless ``u`` lands within float rounding of a token boundary (the block
    sums are grouped differently: ~1e-7 of the mass per boundary)."""
    B, V_r = logits.shape
    device = logits.device
    seed = torch.randint(0, 2**62, (1,), device=device, generator=generator)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed.item()))
    u = torch.rand((B, 1), dtype=torch.float64, device=device, generator=gen)
    mixed = mix(logits.float(), ref_logits.float(), coef)
    m = temper(mixed, temperature)
    neg = torch.tensor(float("-inf"), device=device)
    has_nan = torch.isnan(m).any(1)
    top_local = torch.where(has_nan, neg, m.amax(1)) if V_r else neg.expand(B)
    mixed_top = torch.where(torch.isnan(mixed).any(1), neg, mixed.amax(1)) if V_r \
        else neg.expand(B)
    maxima = torch.stack([top_local, mixed_top, has_nan.float()])
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=process_group)
    top, mixed_max, any_nan = maxima[0:1].T, maxima[1:2].T, maxima[2] > 0
    valid = (top.squeeze(1) > float("-inf")) & ~any_nan
    w = torch.exp(m - torch.where(valid[:, None], top, torch.zeros_like(top)))
    saturated = top == float("inf")
    if bool(saturated.any()):  # a +inf mixture logit (or m / T overflowing): the maxima share it
        w = torch.where(saturated, (mixed == mixed_max).float(), w)
    w = torch.where(valid[:, None], w, torch.zeros_like(w))
    block = min(tuning.TORCH.sample_block, max(V_r, 1))
    full = V_r // block * block
    sums = w[:, :full].view(B, -1, block).sum(2)
    if full < V_r:
        sums = torch.cat([sums, w[:, full:].sum(1, keepdim=True)], 1)
    totals = [torch.empty(B, dtype=torch.float64, device=device)
              for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(totals, sums.sum(1, dtype=torch.float64), group=process_group)
    shard, resid = _search(torch.stack(totals, 1), u)
    mine = shard.squeeze(1) == dist.get_rank(process_group)
    k, resid = _search(sums, resid, scaled=True)
    cols = torch.arange(block, device=device)
    idx = k * block + cols[None, :]
    inner = torch.where(idx < V_r, w.gather(1, idx.clamp_max(V_r - 1)), torch.zeros((), device=device))
    j, _ = _search(inner, resid, scaled=True)
    pick = (k * block + j).squeeze(1).clamp_max(V_r - 1)
    ids = torch.where(mine & valid, pick + vocab_start, torch.full_like(pick, -1))
    dist.all_reduce(ids, op=dist.ReduceOp.MAX, group=process_group)
    return ids

