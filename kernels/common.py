"""Triton device helpers shared by every kernel file (one version of each helper).

* the packed-output and split-workspace rows of :mod:`kernels.layout` as ``tl.constexpr``;
* :func:`tanh_sech2` and :func:`softcap_temper` (``cap(x) / T`` and its derivative);
* :func:`mix`, the coef end-point rule: exactly ``a`` at coef 0, exactly ``b`` at coef 1;
* the online log-sum-exp merge (:func:`rescale`, :func:`merge_lse`, :func:`merge_entropy`) and
  the shift helpers of per-lane accumulators (:func:`finite_shift`, :func:`shift_step`).
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import layout

# Rows of the packed outputs, as compile-time constants for the kernels.
LOGPROBS = tl.constexpr(layout.LOGPROBS)
ENTROPY = tl.constexpr(layout.ENTROPY)
REF_LOGPROBS = tl.constexpr(layout.REF_LOGPROBS)
KL = tl.constexpr(layout.KL)
MIXTURE_LOGPROBS = tl.constexpr(layout.MIXTURE_LOGPROBS)
LSE_POLICY = tl.constexpr(layout.LSE_POLICY)
LSE_REF = tl.constexpr(layout.LSE_REF)
LSE_MIXTURE = tl.constexpr(layout.LSE_MIXTURE)
# Rows of the split workspace [NUM_PARTIALS, splits, N].
PART_MAX_A = tl.constexpr(layout.PART_MAX_A)
PART_SUM_A = tl.constexpr(layout.PART_SUM_A)
PART_ENT_A = tl.constexpr(layout.PART_ENT_A)
PART_KL_A = tl.constexpr(layout.PART_KL_A)
PART_TGT_A = tl.constexpr(layout.PART_TGT_A)
PART_MAX_B = tl.constexpr(layout.PART_MAX_B)
PART_SUM_B = tl.constexpr(layout.PART_SUM_B)
PART_TGT_B = tl.constexpr(layout.PART_TGT_B)
PART_MAX_M = tl.constexpr(layout.PART_MAX_M)
PART_SUM_M = tl.constexpr(layout.PART_SUM_M)
PART_TGT_M = tl.constexpr(layout.PART_TGT_M)


@triton.jit
def tanh_sech2(x):
    """``(tanh(x), 1 - tanh(x)**2)`` to fp32 accuracy (Cephes ``tanhf``), NaN-propagating,
    exact at +-inf.

    ``tl`` has no portable tanh (libdevice is not available in the interpreter), and
    ``(1 - e) / (1 + e)`` loses relative accuracy as ``x -> 0``, so ``|x| < 0.625`` uses the odd
    Cephes polynomial (relative error < 1e-7 there); elsewhere ``1 - u`` with
    ``u = 2 / (exp(2|x|) + 1)``, which also gives ``1 - tanh**2 = u (2 - u)`` without
    cancellation."""
    ax = tl.abs(x)
    x2 = x * x
    poly = ((((-5.70498872745e-3 * x2 + 2.06390887954e-2) * x2 - 5.37397155531e-2) * x2
             + 1.33314422036e-1) * x2 - 3.33332819422e-1) * x2 * x + x
    u = 2.0 / (tl.exp(2.0 * ax) + 1.0)
    small = ax < 0.625
    t = tl.where(small, poly, tl.where(x < 0, u - 1.0, 1.0 - u))
    sech2 = tl.where(small, 1.0 - poly * poly, u * (2.0 - u))
    return t, sech2


@triton.jit
def softcap_temper(x, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """``cap(x) / T`` and its derivative ``cap'(x) / T`` for fp32 ``x`` (``-inf`` stays
    ``-inf``, with derivative 0). A forward uses only the first result; the second is then
    eliminated by the compiler."""
    if HAS_SOFTCAP:
        t, sech2 = tanh_sech2(x / softcap)
        capped = tl.where(x == float("-inf"), x, softcap * t)
        return capped * inv_temperature, sech2 * inv_temperature
    else:
        return x * inv_temperature, inv_temperature


@triton.jit
def mix(a, b, coef):
    """Geometric mixture ``(1 - coef) * a + coef * b``: exactly ``a`` at coef 0 and exactly
    ``b`` at coef 1 (the coef end-point rule: a column masked only in the unused model never
    becomes ``0 * -inf``)."""
    return tl.where(coef == 0, a, tl.where(coef == 1, b, (1 - coef) * a + coef * b))


@triton.jit
def finite_shift(running_max):
    """The shift accumulators are taken relative to: the running max, or 0 while it is -inf."""
    return tl.where(running_max == float("-inf"), 0.0, running_max)


@triton.jit
def shift_step(old_max, new_shift):
    """``log`` of the factor rescaling accumulators from ``old_max`` to ``new_shift`` (<= 0).
    0 while ``old_max`` is -inf: those accumulators are exactly 0 and must not meet exp(+big)."""
    return tl.where(old_max == float("-inf"), 0.0, old_max - new_shift)


@triton.jit
def rescale(old_max, new_max):
    """``exp(old_max - new_max)``; 0 while every logit so far is -inf (nothing accumulated)."""
    return tl.exp(old_max - finite_shift(new_max))


@triton.jit
def merge_lse(max1, sum1, max2, sum2):
    """Merge two partial ``(max, sum exp(x - max))`` into one."""
    new_max = tl.maximum(max1, max2)
    return new_max, rescale(max1, new_max) * sum1 + rescale(max2, new_max) * sum2


@triton.jit
def merge_entropy(max1, sum1, ent1, kl1, max2, sum2, ent2, kl2):
    """Merge two partial ``(max, sum e, sum e * (a - max), sum e * (a - b))`` with
    ``e = exp(a - max)``. A part whose weight underflows to 0 contributes exactly 0 (it may hold
    an infinite KL sum); NaN propagates through ``sum``."""
    new_max = tl.maximum(max1, max2)
    w1 = rescale(max1, new_max)
    w2 = rescale(max2, new_max)
    sum_ = w1 * sum1 + w2 * sum2
    ent = (tl.where(w1 > 0, w1 * (ent1 + (max1 - new_max) * sum1), 0.0)
           + tl.where(w2 > 0, w2 * (ent2 + (max2 - new_max) * sum2), 0.0))
    kl = tl.where(w1 > 0, w1 * kl1, 0.0) + tl.where(w2 > 0, w2 * kl2, 0.0)
    return new_max, sum_, ent, kl
