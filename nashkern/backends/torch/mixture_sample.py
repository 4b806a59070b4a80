"""``mixture_sample`` on the torch backend: a two-level inverse CDF per row block."""
from __future__ import annotations

import torch

from ... import tuning
from ...kernels.layout import Scalars
from .common import NEG_INF, mix, temper


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def mixture_sample(logits, ref_logits, scalars: Scalars, *, generator):
    """Sample from softmax(mix(z / T, r / T, coef)) by a two-level inverse CDF, row block by
    row block. ``[B, V] -> [B]`` (-1 for a row with no finite entry or a NaN).

    One ``exp``; sums of vocabulary blocks (float32 inside a block, float64 across blocks), a
    uniform per row and a search over the block sums pick a block, then a float64 prefix sum
    inside that block picks the token: tail probabilities (~1e-12) keep their mass next to a
    large head, and only ``[B, sample_block]`` is ever prefix-summed. On the CPU this is a few
    ms per [8, 151936] call vs 15 ms for a float64 prefix sum over whole rows and 13-15 ms for
    Gumbel-max (a uniform and two logs per entry). The GPU kernels use Gumbel-max (one pass, no
    prefix sums across tiles)."""
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.long, device=logits.device)
    rows = max(1, tuning.TORCH.logits_tile_elements // max(V, 1))
    block = min(tuning.TORCH.sample_block, V)
    full = V // block * block
    cols = torch.arange(block, device=logits.device)
    for n0 in range(0, B, rows):
        n1 = min(B, n0 + rows)
        # mix, then temper: only the operand(s) with nonzero weight are touched
        mixed = mix(logits[n0:n1].float(), ref_logits[n0:n1].float(), scalars.coef)
        m = temper(mixed, scalars.temperature)
        top = m.amax(dim=1, keepdim=True)  # NaN if the row has a NaN
        valid = (top > NEG_INF) & ~torch.isnan(top)
        w = torch.exp(m - torch.where(valid, top, torch.zeros_like(top)))
        # A +inf tempered logit (a +inf mixture logit, or m / T overflowing at a tiny T) takes
        # all the mass: the limit distribution is uniform over the maxima of the untempered
        # mixture (exp(inf - inf) would be NaN and send the search past V).
        # On the CPU the rare case is looked for first (a [rows, 1] read; a full-row where costs
        # ~15 ms per [8, 151936] call there, nearly doubling the sampler); no host read on GPUs.
        saturated = top == float("inf")
        if m.device.type != "cpu" or bool(saturated.any()):
            w = torch.where(saturated, (mixed == mixed.amax(dim=1, keepdim=True)).float(), w)
        sums = w[:, :full].view(n1 - n0, -1, block).sum(2)
        if full < V:
            sums = torch.cat([sums, w[:, full:].sum(1, keepdim=True)], 1)
        u = torch.rand((n1 - n0, 1), dtype=torch.float64, device=m.device, generator=generator)
        k, u = _search(sums, u)  # the block, then u's residual inside it
        idx = k * block + cols[None, :]
        inner = torch.where(idx < V, w.gather(1, idx.clamp_max(V - 1)), torch.zeros((), device=w.device))
        j, _ = _search(inner, u, scaled=True)
        pick = (k * block + j).squeeze(1)
        out[n0:n1] = torch.where(valid.squeeze(1), pick, torch.full_like(pick, -1))
    return out



def mixture_sample_from_seed(logits, ref_logits, seed, scalars: Scalars):
    """The backend table's entry (the seed-taking signature of the GPU backends): uniforms from
    a generator seeded by ``seed`` (int64 ``[1]``; one host read: this is the CPU path)."""
    gen = torch.Generator(device=logits.device)
    gen.manual_seed(int(seed.item()))
    return mixture_sample(logits, ref_logits, scalars, generator=gen)


def _search(weights: torch.Tensor, u: torch.Tensor, scaled: bool = False):
    """Inverse CDF over ``weights [rows, n]`` (float64 prefix sum): the first index whose prefix
    sum exceeds ``u·total`` (``u`` uniform in [0, 1)), or ``u`` itself when ``scaled``. Zero
    weights are never picked: ``u`` stays strictly below the total. Returns (index [rows, 1],
    ``u`` minus the prefix sum before that index)."""
    cdf = weights.cumsum(1, dtype=torch.float64)
    total = cdf[:, -1:]
    u = u if scaled else u * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    idx = torch.searchsorted(cdf, u, right=True)
    before = torch.where(idx > 0, cdf.gather(1, (idx - 1).clamp_min(0)), torch.zeros_like(u))
    return idx, u - before
