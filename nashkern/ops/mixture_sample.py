"""Op family ``mixture_sample``: sample token ids from the geometric mixture of two models,
``softmax(((1 - coef) * z + coef * z_ref) / T)``.

Public op: :func:`mixture_sample`, funnelled into the custom op ``nashkern::mixture_sample``
(logits ``[B, V]`` -> int64 ``[B]``; not differentiable). :data:`FAMILY` declares the backends.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends.cuda import mixture_sample as cuda_mixture_sample
from ..backends.torch import mixture_sample as torch_mixture_sample
from .checks import check_float, check_same_device
from .registry import Family, Implementation, Scalars, resolve_backend

try:
    from ..kernels import mixture_sample as triton_mixture_sample
except ImportError:  # triton is optional
    triton_mixture_sample = None


@torch.library.custom_op("nashkern::mixture_sample", mutates_args=())
def mixture_sample_op(
    logits: Tensor, ref_logits: Tensor, seed: Tensor, coef: float, temperature: float, backend: str,
) -> Tensor:
    """logits/ref_logits ``[B, V]``, seed int64 ``[1]`` drawn from the caller's generator -> int64 ``[B]``."""
    if logits.shape[0] == 0:
        return logits.new_empty(0, dtype=torch.long)
    impl = FAMILY.implementation(backend)
    return impl.launch("forward", logits.device, dict(N=logits.shape[0], V=logits.shape[1]),
                       logits, ref_logits, seed, Scalars(coef, temperature))


@mixture_sample_op.register_fake
def _(logits, ref_logits, seed, coef, temperature, backend):
    return logits.new_empty(logits.shape[0], dtype=torch.long)


_BACKENDS = {
    "torch": Implementation(torch_mixture_sample.mixture_sample_from_seed),
    "cuda": Implementation(cuda_mixture_sample.mixture_sample),
}
if triton_mixture_sample is not None:
    _BACKENDS["triton"] = Implementation(triton_mixture_sample.mixture_sample,
                                         tuning="mixture_sample")

FAMILY = Family("mixture_sample", (mixture_sample_op,), _BACKENDS)


def mixture_sample(logits: Tensor, ref_logits: Tensor, *, coef: float, temperature: float = 1.0,
                   generator: Optional[torch.Generator] = None, backend: str = "auto") -> Tensor:
    """Sample token ids from ``softmax(((1 - coef) * z + coef * z_ref) / T)``.

    logits, ref_logits: ``[..., V]`` (typically the last position, ``[B, V]``) -> int64 ``[...]``
    in ``[0, V)``, or -1 for a row with no finite mixture logit or with a NaN. A ``+inf`` mixture
    logit takes all the mass: the sample is that entry (one of them if several); at a
    temperature so small that ``m / T`` overflows, the torch backend samples among the
    maxima of the mixture (the T -> 0 limit). Gumbel-max on GPU backends, inverse CDF on the torch backend;
    reproducible for a given ``generator`` state (GPU backends draw one seed from it per call,
    on the device).
    """
    check_float("logits", logits)
    check_float("ref_logits", ref_logits)
    if coef is None:
        raise ValueError("coef must be a float in [0, 1], got None")
    scalars = Scalars.checked(coef, temperature)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits must have the shape of logits, {tuple(logits.shape)}, "
                         f"got {tuple(ref_logits.shape)}")
    check_same_device("ref_logits", ref_logits, "logits", logits)
    if generator is not None and generator.device.type != logits.device.type:
        raise ValueError(f"generator is on {generator.device} but logits is on {logits.device}")
    backend = resolve_backend(FAMILY, backend, logits.device)
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    seed = torch.randint(0, 2**62, (1,), device=logits.device, generator=generator)
    z = logits.reshape(-1, vocab)
    r = ref_logits.reshape(-1, vocab)
    if z.stride(-1) != 1:
        z = z.contiguous()
    if r.stride(-1) != 1:
        r = r.contiguous()
    out = mixture_sample_op(z, r, seed, scalars.coef, scalars.temperature, backend)
    return out.view(lead)
