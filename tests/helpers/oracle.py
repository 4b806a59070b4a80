"""Comparison against the float64 reference with tolerances set by what PyTorch itself achieves.

For every quantity we compute three things from the *same* (possibly bf16-rounded) inputs:
the float64 reference, PyTorch's own float32 computation of the same definition, and ours.
Ours must be within a small multiple of PyTorch-float32's error, plus the rounding of the
output dtype (gradients come back in the input dtype).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch

from nashkern.types import TokenStats

FIELDS = TokenStats._fields


def _max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    finite = torch.isfinite(ref)
    if not finite.any():
        return 0.0
    return (x.double() - ref)[finite].abs().max().item()


def assert_close(name: str, ours: torch.Tensor, ref64: torch.Tensor, torch32: torch.Tensor,
                 out_dtype: torch.dtype = torch.float32, factor: float = 8.0) -> None:
    """|ours − ref64| ≤ factor · max|torch32 − ref64| + 2·eps(out_dtype)·|ref64| + floor."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    # On the tensors' device: a [V, D] head gradient is GiBs in float64 (tests/ops/test_device_shapes.py)
    ours = ours.detach().double()
    ref64 = ref64.detach().double().to(ours.device)
    torch32 = torch32.detach().double().to(ours.device)
    # Non-finite reference entries must match exactly (inf, -inf, NaN positions).
    nonfinite = ~torch.isfinite(ref64)
    same = (ours[nonfinite] == ref64[nonfinite]) | (ours[nonfinite].isnan() & ref64[nonfinite].isnan())
    assert bool(same.all()), f"{name}: non-finite entries differ: {ours[nonfinite]} vs {ref64[nonfinite]}"
    if ref64.numel() == 0 or nonfinite.all():
        return
    finite = ~nonfinite
    scale = ref64[finite].abs().max().item()
    eps = torch.finfo(out_dtype).eps
    tol = (factor * _max_err(torch32, ref64) + 2 * eps * ref64.abs() + 1e-6 * (1.0 + scale))
    err = (ours - ref64).abs()
    bad = finite & (err > tol)
    assert not bool(bad.any()), (
        f"{name}: max err {err[finite].max().item():.3e} (torch fp32 err "
        f"{_max_err(torch32, ref64):.3e}, scale {scale:.3e}) at {bad.nonzero()[:5].tolist()}")


def assert_within(name: str, ours: torch.Tensor, ref: torch.Tensor,
                  out_dtype: torch.dtype = torch.float32, atol_scale: float = 2e-6,
                  rtol: float = 2e-5) -> None:
    """The kernel tests' check against a float64 ``ref`` alone (no PyTorch-float32 peer):
    identical non-finite entries; finite ones within ``atol_scale * max|ref| + rtol * |ref|``
    plus one rounding of the output dtype (gradients come back in the input dtype, and the
    Triton interpreter's fp32 -> bf16/fp16 cast truncates)."""
    ours = ours.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    finite = torch.isfinite(ref)
    same = (ours == ref) | (ours.isnan() & ref.isnan())
    assert bool(same[~finite].all()), f"{name}: non-finite entries differ"
    if not finite.any():
        return
    scale = ref[finite].abs().max().item()
    tol = atol_scale * max(scale, 1e-30) + (rtol + torch.finfo(out_dtype).eps) * ref.abs()
    err = (ours - ref).abs()
    bad = finite & ~(err <= tol)
    assert not bool(bad.any()), (
        f"{name}: max err {err[finite].max().item():.3e} (scale {scale:.3e}) "
        f"at {bad.nonzero()[:5].tolist()}")


def compare(run: Callable[..., TokenStats], naive: Callable[..., TokenStats],
            inputs: Dict[str, torch.Tensor], grad_names: Sequence[str], seed: int = 0,
            native: Optional[Callable[..., TokenStats]] = None,
            grad_fields: Optional[Sequence[str]] = None) -> TokenStats:
    """Run ``run(**inputs)`` (ours) and ``naive(**inputs)`` in float64 and float32 on the same
    values; compare every non-None field and the gradient of a random weighted sum of all
    fields (only of ``grad_fields`` when given; the others get no gradient) w.r.t. each tensor
    named in ``grad_names``.

    The error budget is set by PyTorch's own float32 computation of ``naive``; with ``native``
    (PyTorch computing in the inputs' own dtype, e.g. a bf16 lm_head matmul as eager training
    does), by the better of the two: ours must be within 2x PyTorch-in-that-dtype's error."""
    def prepared(cast):
        out = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor) and v.dtype.is_floating_point:
                v = cast(v.detach())
                if k in grad_names:
                    v.requires_grad_(True)
            out[k] = v
        return out

    ours_in = prepared(lambda v: v)  # no clone: strided views stay strided
    ref_in = prepared(lambda v: v.double())
    t32_in = prepared(lambda v: v.float())
    ours = run(**ours_in)
    ref = naive(**ref_in)
    t32 = naive(**t32_in)
    low_precision = any(isinstance(v, torch.Tensor) and v.dtype in (torch.bfloat16, torch.float16)
                        for v in inputs.values())
    nat_in = prepared(lambda v: v.clone()) if native is not None and low_precision else None
    nat = native(**nat_in) if nat_in is not None else None
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for f in FIELDS:
        o, r = getattr(ours, f), getattr(ref, f)
        assert (o is None) == (r is None), f"field {f}: ours is {o is None}, reference is {r is None}"
        if o is None:
            continue
        assert o.dtype == torch.float32, f"{f}: expected float32 output, got {o.dtype}"
        n = getattr(nat, f) if nat is not None else None
        if n is not None and _max_err(n, r) > _max_err(getattr(t32, f), r) * 8:
            # Low-precision logits (e.g. the chunked linear strategy rounds them to bf16 as
            # F.linear does): the budget is what PyTorch achieves in that dtype.
            assert_close(f, o, r, n, factor=2.0)
        else:
            assert_close(f, o, r, getattr(t32, f))
        w = torch.randn(r.shape, generator=gen, dtype=torch.float64)
        if grad_fields is None or f in grad_fields:
            weights[f] = w
    if grad_names and weights:
        def backward(stats, cast):
            loss = sum((getattr(stats, f).to(torch.float64) * w.to(getattr(stats, f).device)).sum()
                       for f, w in weights.items())
            loss.backward()
        for stats in (ours, ref, t32) + ((nat,) if nat is not None else ()):
            backward(stats, None)
        for k in grad_names:
            g, gr, g32 = ours_in[k].grad, ref_in[k].grad, t32_in[k].grad
            if gr is None:  # k does not influence the differentiated fields
                assert g is None or not g.any(), f"{k} does not influence the loss but got a gradient"
                continue
            assert g is not None, f"no gradient reached {k}"
            assert g.dtype == inputs[k].dtype, f"grad of {k}: dtype {g.dtype} != {inputs[k].dtype}"
            if nat is not None:
                gn = nat_in[k].grad
                if _max_err(gn, gr) > _max_err(g32, gr) * 8:
                    assert_close(f"d/d{k}", g, gr, gn, out_dtype=inputs[k].dtype, factor=2.0)
                    continue
            assert_close(f"d/d{k}", g, gr, g32, out_dtype=inputs[k].dtype)
    return ours


def logit_inputs(lead, V, dtype, device, ref=True, targets=True, ignore=True, scale=3.0):
    """Random logits ``[*lead, V]`` (and reference logits, and targets with one ignored
    position) in ``dtype``: the input dict of ``ops.token_stats``."""
    z = (torch.randn(*lead, V, dtype=torch.float64) * scale).to(dtype).to(device)
    out = {"logits": z}
    if ref:
        out["ref_logits"] = (torch.randn(*lead, V, dtype=torch.float64) * scale).to(dtype).to(device)
    if targets:
        t = torch.randint(0, V, lead)
        if ignore and t.numel() > 1:
            t.view(-1)[1] = -100
        out["targets"] = t.to(device)
    else:
        out["targets"] = None
    return out


def assert_samples_follow(samples: torch.Tensor, probs: torch.Tensor, never: int,
                          chi2_max: float = 40.0) -> None:
    """Chi-square test of the frequencies of ``samples`` (``[draws]`` ids) against ``probs``
    (``[V]``), and column ``never`` never drawn. The default bound is for at most 13 entries > 0
    (12 degrees of freedom: P(chi2 > 40) < 1e-4)."""
    counts = torch.bincount(samples.cpu(), minlength=probs.numel()).double()
    assert counts[never] == 0
    keep = probs > 0
    expected = probs[keep].double() * samples.numel()
    chi2 = (((counts[keep] - expected) ** 2) / expected).sum().item()
    assert chi2 < chi2_max, (chi2, counts, expected)
