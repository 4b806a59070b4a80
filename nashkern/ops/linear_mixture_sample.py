"""Op family ``linear_mixture_sample``: sample token ids from the geometric mixture of two
models' heads, ``softmax(((1 - coef) * cap(h W^T + b) + coef * cap(h_r W_r^T + b_r)) / T)``,
streaming over vocabulary tiles: the ``[B, V]`` logits never exist.

Public op: :func:`linear_mixture_sample`, funnelled into the custom op
``nashkern::linear_mixture_sample`` (hidden ``[B, D]``, weight ``[V, D]`` -> int64 ``[B]``; not
differentiable). :data:`FAMILY` declares the backends: ``torch`` only (any device; the CPU is
where it is measured). There is no Triton / CUDA kernel: ``backend="auto"`` on a GPU runs the
torch backend (tile GEMMs and torch ops, one host read per row block) and draws the torch
sampler's ids, not the Triton Gumbel-max ones; ``backend="triton"`` / ``"cuda"`` raise.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..backends.torch import linear_mixture_sample as torch_linear_mixture_sample
from .checks import check_float, check_same_device
from .registry import Family, Implementation, Scalars, resolve_backend


@torch.library.custom_op("nashkern::linear_mixture_sample", mutates_args=())
def linear_mixture_sample_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ref_hidden: Optional[Tensor],
    ref_weight: Optional[Tensor], ref_bias: Optional[Tensor], seeds: Tensor,
    group_rows: List[int], coefs: List[float], temperature: float, softcap: Optional[float],
    backend: str,
) -> Tensor:
    """hidden ``[B, D]``, weight ``[V, D]``, seeds int64 ``[G]`` (one per group, drawn from its
    generator), ``group_rows`` / ``coefs`` per group -> int64 ``[B]``."""
    if hidden.shape[0] == 0:
        return hidden.new_empty(0, dtype=torch.long)
    impl = FAMILY.implementation(backend)
    scalars = [Scalars(c, temperature, softcap) for c in coefs]
    return impl.launch("forward", hidden.device, dict(N=hidden.shape[0], V=weight.shape[0]),
                       hidden, weight, bias, ref_hidden, ref_weight, ref_bias, seeds,
                       group_rows, scalars)


@linear_mixture_sample_op.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, seeds, group_rows, coefs,
      temperature, softcap, backend):
    return hidden.new_empty(hidden.shape[0], dtype=torch.long)


FAMILY = Family("linear_mixture_sample", (linear_mixture_sample_op,), {
    "torch": Implementation(torch_linear_mixture_sample.linear_mixture_sample),
})


def _check_head(prefix: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    check_float(f"{prefix}hidden", hidden)
    check_float(f"{prefix}weight", weight)
    if hidden.dim() != 2:
        raise ValueError(f"{prefix}hidden must have shape [B, D], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{prefix}weight must have shape [V, D] with V >= 1 and D = "
                         f"{prefix}hidden's {hidden.shape[1]}, got {tuple(weight.shape)}")
    check_same_device(f"{prefix}weight", weight, f"{prefix}hidden", hidden)
    if bias is not None:
        check_float(f"{prefix}bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{prefix}bias must have shape [V] = {tuple(weight.shape[:1])}, "
                             f"got {tuple(bias.shape)}")
        check_same_device(f"{prefix}bias", bias, f"{prefix}hidden", hidden)


def linear_mixture_sample(hidden: Tensor, weight: Tensor, ref_hidden: Optional[Tensor] = None,
                          ref_weight: Optional[Tensor] = None, *,
                          coef: Union[float, Sequence[float]], temperature: float = 1.0,
                          bias: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
                          softcap: Optional[float] = None,
                          generator: Union[None, torch.Generator,
                                           Sequence[Optional[torch.Generator]]] = None,
                          group_rows: Optional[Sequence[int]] = None,
                          backend: str = "auto") -> Tensor:
    """Sample one token id per row from ``softmax(mix(z, z_r, coef) / T)`` with
    ``z = cap(hidden @ weight.T + bias)`` and ``z_r = cap(ref_hidden @ ref_weight.T + ref_bias)``
    (``cap``: the softcap ``s·tanh(z / s)``, -inf kept, None: off; the mixture
    ``(1 - coef)·z + coef·z_r`` with the end-point rule of :func:`ops.mixture_sample`), without
    ever building ``[B, V]``: the vocabulary is streamed in tiles (``tuning.TorchChunking``).

    hidden ``[B, D]``, weight ``[V, D]``, bias ``[V]``; ref_hidden ``[B, Dr]``, ref_weight
    ``[V, Dr]``, ref_bias ``[V]`` (needed when some coef > 0); float32 / bfloat16 / float16,
    accumulated in float32. -> int64 ``[B]`` in ``[0, V)``, -1 for a row with no finite mixture
    logit or a NaN; a +inf logit takes all the mass (the conventions of ``mixture_sample``).

    Same ids: for the same ``generator`` state this draws what
    ``ops.mixture_sample(z, z_r, coef=coef, temperature=T, generator=generator,
    backend="torch")`` draws on the float32 logits (the same generator calls), up to the last
    bits of the logits' GEMM rounding (a sample moves only when its uniform falls within that
    rounding of a CDF boundary; see ``backends/torch/linear_mixture_sample.py``).

    ``group_rows``: consecutive groups of rows (counts summing to B), each with its own ``coef``
    and ``generator`` (then sequences of that length): each group draws what its own call would
    draw, while ``weight`` is streamed once for all rows (on this CPU a 16-row head GEMM costs
    about what an 8-row one does). Rows of groups with coef 0 never read ``ref_hidden`` (any
    values), rows with coef 1 never read ``hidden``.

    Backends: ``torch`` (every device). No Triton / CUDA kernel: ``"auto"`` on a GPU runs the
    torch backend (tile GEMMs + torch ops; its samples are the torch sampler's, not the
    Gumbel-max kernels'); asking for ``"triton"`` / ``"cuda"`` raises a ValueError.
    """
    _check_head("", hidden, weight, bias)
    B = hidden.shape[0]
    if group_rows is None:
        group_rows, coefs, generators = [B], [coef], [generator]
        if isinstance(coef, (list, tuple)) or isinstance(generator, (list, tuple)):
            raise ValueError("coef / generator are sequences only with group_rows=")
    else:
        group_rows = [int(n) for n in group_rows]
        if any(n < 0 for n in group_rows) or sum(group_rows) != B:
            raise ValueError(f"group_rows must be row counts >= 0 summing to hidden's B = {B}, "
                             f"got {group_rows}")
        if not isinstance(coef, (list, tuple)) or len(coef) != len(group_rows):
            raise ValueError(f"with group_rows, coef must be a sequence of {len(group_rows)} "
                             f"floats (one per group), got {coef!r}")
        if not isinstance(generator, (list, tuple)) or len(generator) != len(group_rows):
            raise ValueError(f"with group_rows, generator must be a sequence of "
                             f"{len(group_rows)} generators or None (one per group)")
        coefs, generators = list(coef), list(generator)
    scalars = [Scalars.checked(c, temperature, softcap) if c is not None else None
               for c in coefs]
    if any(s is None for s in scalars):
        raise ValueError("coef must be a float in [0, 1], got None")
    if any(s.coef > 0 for s in scalars):
        if ref_hidden is None or ref_weight is None:
            raise ValueError("coef > 0 mixes in the reference: ref_hidden and ref_weight are "
                             "required")
    if ref_hidden is not None:
        if ref_weight is None:
            raise ValueError("ref_hidden is given without ref_weight")
        _check_head("ref_", ref_hidden, ref_weight, ref_bias)
        if ref_hidden.shape[0] != B:
            raise ValueError(f"ref_hidden must have hidden's B = {B} rows, got "
                             f"{ref_hidden.shape[0]}")
        if ref_weight.shape[0] != weight.shape[0]:
            raise ValueError(f"ref_weight must have weight's V = {weight.shape[0]} rows, got "
                             f"{ref_weight.shape[0]}")
        check_same_device("ref_hidden", ref_hidden, "hidden", hidden)
    else:
        ref_weight = ref_bias = None
    for gen in generators:
        if gen is not None and gen.device.type != hidden.device.type:
            raise ValueError(f"generator is on {gen.device} but hidden is on {hidden.device}")
    backend = resolve_backend(FAMILY, backend, hidden.device)
    # one seed per group from its generator, as ops.mixture_sample draws one per call
    seeds = torch.cat([torch.randint(0, 2**62, (1,), device=hidden.device, generator=gen)
                       for gen in generators]) if generators else \
        torch.zeros(0, dtype=torch.long, device=hidden.device)
    return linear_mixture_sample_op(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, seeds, group_rows,
        [s.coef for s in scalars], scalars[0].temperature if scalars else 1.0,
        scalars[0].softcap if scalars else None, backend)
