"""``backend="cuda"`` against the float64 oracle (tests/helpers/oracle.py), forward and every gradient.

Each test runs on two targets:

* ``gpu``: the CUDA kernels on the device (skipped without CUDA, or when the kernels cannot
  run on it);
* ``emu``: the same kernel code run on the host by the library's emulation (CPU tensors; no GPU
  needed, only nvcc to build the library). It runs each block's threads one after the other and
  reduces their states in the device's order, so it checks the kernels' arithmetic, row walk
  (alignment prologue, vector steps, tail, scalar fallback) and split/merge logic; what it cannot
  check is the hardware (shuffles, shared memory, real 16-byte loads, launch limits).

The library is the one built from the current sources (csrc/build_cuda.py, cached by digest),
or ``NASHKERN_CUDA_LIB``, or the in-place build when nvcc is missing.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from nashkern import ops
from nashkern.ops.token_stats import token_stats_op
from nashkern.backends.cuda import library as cuda_lib
from nashkern.backends.cuda import mixture_sample as cuda_mixture_sample
from nashkern.kernels.layout import Scalars
from nashkern.memory import AllocationRecorder
from nashkern.naive import naive_mixture_logits, naive_token_stats

from oracle import assert_close, assert_samples_follow, compare, logit_inputs

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "csrc"))
import build_cuda  # noqa: E402  (csrc/build_cuda.py)

TARGETS = ["emu", "gpu"]


@pytest.fixture(scope="module")
def cuda_library():
    path = os.environ.get("NASHKERN_CUDA_LIB")
    if not path:
        if build_cuda.find_nvcc() is not None:
            path = build_cuda.build_cached()
        elif cuda_lib.DEFAULT_LIBRARY_PATH.is_file():
            path = cuda_lib.DEFAULT_LIBRARY_PATH
        else:
            pytest.skip("nvcc not found and nashkern/_nashkern_cuda.so is not built")
    with cuda_lib.use_library(path) as lib:
        assert lib is not None, cuda_lib.unavailable_reason()
        yield lib


@pytest.fixture(params=TARGETS)
def device(request, cuda_library, monkeypatch):
    """The device the inputs live on: 'cpu' routes backend='cuda' to the host emulation."""
    if request.param == "gpu":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        reason = cuda_lib.unavailable_reason()
        if reason is not None:
            pytest.skip(reason)
        return "cuda"
    # CPU tensors: let backend='cuda' through to the CUDA backend, which runs the emulation.
    monkeypatch.setattr(cuda_lib, "EMULATE_ON_CPU", True)
    return "cpu"


@pytest.fixture(params=["planned", "split"])
def plan(request, monkeypatch):
    """'split': force 3 blocks per row and 32 threads per block (the split + merge kernels and
    multi-warp-free reductions, on small shapes); 'planned': the launch plan."""
    if request.param == "split":
        monkeypatch.setitem(cuda_lib.PLAN_OVERRIDES, "splits", 3)
        monkeypatch.setitem(cuda_lib.PLAN_OVERRIDES, "threads", 32)
    return request.param


@pytest.fixture
def backend(plan):
    """The backend of the cases shared with test_ops.py (imported below): "cuda", on both
    targets (``device``) and both launch plans (``plan``)."""
    return "cuda"


def _run(**kw):
    return ops.token_stats(backend="cuda", **kw)


# The token_stats cases that hold for every backend, written once in test_ops.py; pytest collects
# them here with this module's fixtures, i.e. for backend="cuda" x {emu, gpu} x {planned, split}.
from test_ops import (  # noqa: E402,F401
    test_ignored_rows_are_zero_with_zero_gradient,
    test_inf_entries_exact_for_the_rest,
    test_infinite_kl_does_not_poison_logprob_gradient,
    test_mixture_end_points,
    test_nan_row_stays_in_its_row,
    test_token_stats_optional_fields,
)


# ----------------------------------------------------------------------------------------------
# Token statistics
# ----------------------------------------------------------------------------------------------
CASES = [
    # lead, V, dtype, kwargs
    ((5,), 257, torch.float32, dict(coef=0.3)),
    ((2, 3), 4099, torch.bfloat16, dict(coef=0.3, temperature=0.7)),
    ((1,), 1, torch.float32, dict(coef=0.3)),
    ((3,), 1, torch.bfloat16, dict(coef=1.0)),
    ((4,), 257, torch.float16, dict(coef=1.0, softcap=5.0)),
    ((3,), 101, torch.float32, dict(coef=0.0, softcap=2.0, temperature=1.3)),
    ((2, 2), 4096, torch.float16, dict(coef=0.3, softcap=30.0, temperature=0.9)),
    ((3,), 1000, torch.bfloat16, dict(coef=0.0)),
]


@pytest.mark.parametrize("lead,V,dtype,kw", CASES)
def test_token_stats_matches_reference(device, plan, lead, V, dtype, kw):
    inputs = logit_inputs(lead, V, dtype, device)
    inputs.update(kw)
    compare(_run, naive_token_stats, inputs, ["logits", "ref_logits"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_token_stats_large_vocab(device, dtype):
    """Qwen2's 151936-entry vocabulary (few rows: the forward splits them across blocks)."""
    inputs = logit_inputs((2,), 151936, dtype, device, ignore=False)
    inputs.update(coef=0.3)
    compare(_run, naive_token_stats, inputs, ["logits", "ref_logits"])


def _compare_views(full_z, full_r, take_z, take_r, targets, seed=0, **kw):
    """Like oracle.compare, but ours runs on views (take_z(full_z), take_r(full_r)) of leaf
    tensors, so the kernels see the strided layout (compare() clones its inputs, and the clone
    of a view with gaps is contiguous). Gradients are checked on the views' parts of the leaves,
    and must be exactly 0 elsewhere."""
    z = full_z.clone().requires_grad_()
    r = full_r.clone().requires_grad_()
    zv, rv = take_z(z), take_r(r)
    assert not zv.is_contiguous() and not rv.is_contiguous()
    ours = ops.token_stats(zv, targets, rv, backend="cuda", **kw)
    leaves = {}
    outs = {}
    for name, cast in (("ref", torch.double), ("t32", torch.float)):
        zz = take_z(full_z).to(cast).requires_grad_()
        rr = take_r(full_r).to(cast).requires_grad_()
        leaves[name] = (zz, rr)
        outs[name] = naive_token_stats(zz, targets, rr, **kw)
    gen = torch.Generator().manual_seed(seed)
    losses = {"ours": 0, "ref": 0, "t32": 0}
    for f in ours._fields:
        o, ref, t32 = getattr(ours, f), getattr(outs["ref"], f), getattr(outs["t32"], f)
        if o is None:
            continue
        assert_close(f, o, ref, t32)
        w = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        losses["ours"] = losses["ours"] + (o.double() * w.to(o.device)).sum()
        losses["ref"] = losses["ref"] + (ref.double() * w.to(ref.device)).sum()
        losses["t32"] = losses["t32"] + (t32.double() * w.to(t32.device)).sum()
    for loss in losses.values():
        loss.backward()
    for k, (leaf, take) in enumerate(((z, take_z), (r, take_r))):
        grad = leaf.grad
        assert_close(f"d/d{'zr'[k]}", take(grad), leaves["ref"][k].grad, leaves["t32"][k].grad,
                     out_dtype=leaf.dtype)
        rest = grad.clone()
        take(rest).zero_()
        assert (rest == 0).all()
    return ours


@pytest.mark.parametrize("V", [131, 4099, 4096])
@pytest.mark.parametrize("ref_shift", [0, 1])
def test_strided_views_without_copy(device, plan, V, ref_shift):
    """[B, T, V][:, :-1]: rows start at odd offsets when V is odd (scalar prologue). With the
    reference shifted by one row its misalignment differs from the policy's (the scalar path)."""
    full = logit_inputs((3, 6), V, torch.bfloat16, device)
    stats = _compare_views(full["logits"], full["ref_logits"], lambda x: x[:, :-1],
                           lambda x: x[:, ref_shift:ref_shift + 5], full["targets"][:, 1:],
                           coef=0.25, softcap=20.0)
    assert stats.logprobs.shape == (3, 5)


def test_mixed_dtypes(device):
    """Policy and reference in different dtypes (and V not a multiple of either vector)."""
    inputs = logit_inputs((4,), 1027, torch.bfloat16, device)
    inputs["ref_logits"] = inputs["ref_logits"].float()
    inputs["coef"] = 0.6
    compare(_run, naive_token_stats, inputs, ["logits", "ref_logits"])


def test_matches_torch_backend_closely(device):
    """Same inputs through backend='torch' (fp32 streaming): statistics agree to fp32 rounding."""
    inp = logit_inputs((4, 8), 3001, torch.bfloat16, device)
    kw = dict(coef=0.4, temperature=0.8, softcap=20.0)
    ours = ops.token_stats(inp["logits"], inp["targets"], inp["ref_logits"], backend="cuda", **kw)
    theirs = ops.token_stats(inp["logits"], inp["targets"], inp["ref_logits"], backend="torch",
                             **kw)
    for f in ours._fields:
        torch.testing.assert_close(getattr(ours, f), getattr(theirs, f), rtol=2e-5, atol=2e-5)


def test_only_gradients_are_vocabulary_sized(device):
    """Forward: nothing near N x V is allocated; backward: exactly the requested gradients."""
    N, V = 64, 4099
    inp = logit_inputs((N,), V, torch.bfloat16, device)
    z = inp["logits"].requires_grad_()
    with AllocationRecorder() as rec:
        s = ops.token_stats(z, inp["targets"], inp["ref_logits"], coef=0.5, backend="cuda")
    assert rec.largest()[0] < N * V // 16, rec.largest()
    with AllocationRecorder() as rec:
        (s.logprobs.sum() + s.kl.sum() + s.mixture_logprobs.sum()).backward()
    big = [size for size, _ in rec.sizes if size >= N * V // 16]
    assert big == [N * V], rec.sizes


def test_opcheck(device):
    """torch.library.opcheck of the custom op with the cuda backend (schema, fake, autograd)."""
    z = torch.randn(2, 3, 17, device=device, requires_grad=True)
    r = torch.randn(2, 3, 17, device=device)
    t = torch.randint(0, 17, (6,), device=device)
    torch.library.opcheck(token_stats_op, (z, t, r, 0.5, 1.0, None, -100, "cuda"))


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def _sample(z, r, seed=1, coef=0.5, temperature=0.8):
    g = torch.Generator(device=z.device).manual_seed(seed)
    return ops.mixture_sample(z, r, coef=coef, temperature=temperature, generator=g,
                              backend="cuda")


def test_mixture_sample_reproducible(device):
    z = torch.randn(8, 301, device=device)
    r = torch.randn(8, 301, device=device)
    a, b, c = _sample(z, r, 1), _sample(z, r, 1), _sample(z, r, 2)
    assert a.dtype == torch.long and a.shape == (8,)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert ((a >= 0) & (a < 301)).all()


@pytest.mark.parametrize("coef", [0.0, 0.35, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixture_sample_distribution(device, coef, dtype):
    """Chi-square test of the sampled frequencies against softmax of the mixture."""
    V, draws = 13, 4000
    z = (torch.randn(V) * 1.5).to(dtype)
    r = (torch.randn(V) * 1.5).to(dtype)
    z[4] = float("-inf")  # masked in the policy: never sampled unless coef == 1
    if coef == 1.0:
        r[4] = float("-inf")
    out = _sample(z.to(device).expand(draws, V), r.to(device).expand(draws, V), seed=123,
                  coef=coef, temperature=0.7)
    probs = torch.softmax(naive_mixture_logits(z.float(), r.float(), coef=coef, temperature=0.7), -1)
    assert_samples_follow(out, probs, never=4)


def test_mixture_sample_large_vocab_distribution(device):
    """A peaked 151936-way mixture: the frequency of the top tokens matches their probability."""
    V, B = 151936, 512 if device == "cuda" else 64
    z = torch.randn(V) * 2.0
    r = torch.randn(V) * 2.0
    z[:3] += torch.tensor([9.0, 8.5, 8.0])
    r[:3] += torch.tensor([9.0, 8.5, 8.0])
    out = _sample(z.bfloat16().to(device).expand(B, V), r.bfloat16().to(device).expand(B, V),
                  seed=7, coef=0.5, temperature=1.0).cpu()
    assert ((out >= 0) & (out < V)).all()
    probs = torch.softmax(naive_mixture_logits(z.bfloat16().float(), r.bfloat16().float(),
                                               coef=0.5, temperature=1.0), -1)
    head = probs[:3].sum().item()
    observed = (out < 3).double().mean().item()
    sd = (head * (1 - head) / B) ** 0.5
    assert abs(observed - head) < 5 * sd + 1e-3, (observed, head)


def test_mixture_sample_invalid_rows(device):
    z = torch.randn(3, 20, device=device)
    r = torch.randn(3, 20, device=device)
    z[0] = float("-inf")
    r[0] = float("-inf")
    z[2, 7] = float("nan")
    out = ops.mixture_sample(z, r, coef=0.5, backend="cuda")
    assert out[0] == -1 and out[2] == -1 and 0 <= out[1] < 20
    # At the end points only the model of weight 1 counts.
    z2 = torch.randn(2, 20, device=device)
    r2 = torch.full((2, 20), float("nan"), device=device)
    assert (ops.mixture_sample(z2, r2, coef=0.0, backend="cuda") >= 0).all()
    assert (ops.mixture_sample(z2, r2, coef=1.0, backend="cuda") == -1).all()


def test_mixture_sample_independent_of_plan_and_layout(device, monkeypatch):
    """A sample depends on (seed, row, column) only: forcing splits / thread counts, or reading a
    strided (misaligned) view of the same values, gives the same draws."""
    B, V = 6, 4099
    z = torch.randn(B, V + 3, device=device)[:, 3:]  # misaligned rows, row stride V + 3
    r = torch.randn(B, V, device=device)
    base = _sample(z.contiguous(), r, seed=5)
    assert torch.equal(_sample(z, r, seed=5), base)
    for threads, splits in ((32, 1), (64, 5), (256, 2)):
        monkeypatch.setitem(cuda_lib.PLAN_OVERRIDES, "threads", threads)
        monkeypatch.setitem(cuda_lib.PLAN_OVERRIDES, "splits", splits)
        assert torch.equal(_sample(z, r, seed=5), base), (threads, splits)


def test_gpu_samples_match_the_emulation(cuda_library):
    """The device and the host emulation draw the same Gumbel noise: nearly all rows agree (a
    rare disagreement is possible where two scores differ by an ulp of the noise's log)."""
    if not torch.cuda.is_available() or cuda_lib.unavailable_reason() is not None:
        pytest.skip("needs a CUDA device")
    B, V = 64, 4099
    z = torch.randn(B, V) * 3
    r = torch.randn(B, V) * 3
    seed = torch.tensor([1234567890123], dtype=torch.int64)
    gpu = cuda_mixture_sample.mixture_sample(z.cuda().bfloat16(), r.cuda().bfloat16(), seed.cuda(),
                                                 Scalars(0.3, 0.9)).cpu()
    emu = cuda_mixture_sample.mixture_sample(z.bfloat16(), r.bfloat16(), seed,
                                             Scalars(0.3, 0.9))
    assert (gpu == emu).double().mean().item() >= 0.95, (gpu, emu)


def test_every_cuda_launch_runs_under_the_inputs_device_guard(cuda_library, monkeypatch):
    """The CUDA backend enters kernels/layout.py's device_guard with the inputs' device around each
    launch (recorded on the host emulation; on a GPU it is torch.cuda.device(index))."""
    import contextlib

    from nashkern.kernels import layout

    seen = []
    monkeypatch.setattr(layout, "device_guard",
                        lambda device: seen.append(device) or contextlib.nullcontext())
    monkeypatch.setattr(cuda_lib, "EMULATE_ON_CPU", True)
    z = torch.randn(2, 3, 37, requires_grad=True)
    r = torch.randn(2, 3, 37)
    t = torch.randint(0, 37, (2, 3))
    ops.token_stats(z, t, r, coef=0.5, backend="cuda").mixture_logprobs.sum().backward()
    ops.mixture_sample(z.detach()[0], r[0], coef=0.3, backend="cuda")
    assert seen == [torch.device("cpu")] * 3


def test_mixture_sample_with_an_infinite_logit_stays_in_the_vocabulary(device):
    """Issue 13's reproducer on the CUDA kernels: a +inf mixture logit is the sample; a tiny
    temperature still gives an id in [0, V)."""
    z = torch.randn(2, 100, generator=torch.Generator().manual_seed(0)).to(device)
    z[0, 17] = float("inf")
    out = ops.mixture_sample(z, z, coef=0.0, backend="cuda")
    assert out[0] == 17 and 0 <= out[1] < 100
    out = ops.mixture_sample(z[1:], z[1:], coef=0.4, temperature=1e-40, backend="cuda")
    assert bool(((out >= 0) & (out < 100)).all())
