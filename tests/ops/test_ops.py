"""Every public op and field, forward and every gradient, against the float64 reference, for
every backend available here (``torch`` always; ``triton`` on a GPU or in the CPU interpreter).
test_cuda_backend.py imports the token_stats cases that hold for every backend and runs them for
``backend="cuda"``.
"""
import dataclasses
from functools import partial

import pytest
import torch

from nashkern import ops
from nashkern.naive import naive_linear_token_stats, naive_token_stats

from nashkern import tuning
from nashkern.backends.torch import token_stats as torch_token_stats
from nashkern.ops.token_stats import FAMILY as TOKEN_STATS_FAMILY
from nashkern.tuning import TorchChunking

from oracle import assert_close, assert_samples_follow, compare, logit_inputs


@pytest.fixture(autouse=True)
def small_torch_tiles(monkeypatch):
    """Tiny row blocks and vocabulary tiles, so that the torch backend's online merging across
    tiles and blocks is exercised by these small shapes."""
    monkeypatch.setattr(tuning, "TORCH", TorchChunking(
        logits_tile_elements=1024, linear_rows=4, linear_vocab_tile=64))


def _run_token_stats(backend, **kw):
    return ops.token_stats(backend=backend, **kw)


# Each case covers several features at once to keep the interpreter-run suite short.
LOGIT_CASES = [
    # lead, V, dtype, kwargs
    ((5,), 257, torch.float32, dict(coef=0.3)),
    ((2, 3), 4099, torch.bfloat16, dict(coef=0.5, temperature=0.7)),
    ((1,), 1, torch.float32, dict(coef=0.3)),
    ((4,), 257, torch.float16, dict(coef=1.0, softcap=5.0)),
    ((3,), 101, torch.float32, dict(coef=0.0, softcap=2.0, temperature=1.3)),
]


@pytest.mark.parametrize("lead,V,dtype,kw", LOGIT_CASES)
def test_token_stats_matches_reference(backend, device, lead, V, dtype, kw):
    inputs = logit_inputs(lead, V, dtype, device)
    inputs.update(kw)
    compare(partial(_run_token_stats, backend), naive_token_stats, inputs, ["logits", "ref_logits"])


def test_token_stats_large_vocab(device):
    """Qwen2's 151936-entry vocabulary (torch backend; the Triton path is covered on GPU)."""
    inputs = logit_inputs((2,), 151936, torch.bfloat16, device, ignore=False)
    inputs.update(coef=0.5)
    compare(partial(_run_token_stats, "torch"), naive_token_stats, inputs, ["logits", "ref_logits"])


@pytest.mark.parametrize("ref,targets", [(False, True), (True, False), (False, False)])
def test_token_stats_optional_fields(backend, device, ref, targets):
    inputs = logit_inputs((4,), 129, torch.float32, device, ref=ref, targets=targets)
    stats = compare(partial(_run_token_stats, backend), naive_token_stats, inputs,
                    ["logits"] + (["ref_logits"] if ref else []))
    assert (stats.logprobs is None) == (not targets)
    assert (stats.kl is None) == (not ref)
    assert stats.mixture_logprobs is None


def test_strided_leading_dims_without_copy(backend, device, monkeypatch):
    """``logits[:, :-1]`` (the usual shift) works on the strided view."""
    full = logit_inputs((3, 6), 131, torch.bfloat16, device)
    inputs = {"logits": full["logits"][:, :-1], "ref_logits": full["ref_logits"][:, 1:],
              "targets": full["targets"][:, 1:], "coef": 0.25}
    assert not inputs["logits"].is_contiguous()
    seen = []
    if backend == "torch":  # the backend must receive the strided [G, R, V] view itself
        original = torch_token_stats.token_stats_forward

        def spy(logits, *args, **kwargs):
            seen.append(logits.is_contiguous())
            return original(logits, *args, **kwargs)

        monkeypatch.setitem(TOKEN_STATS_FAMILY.backends, "torch", dataclasses.replace(
            TOKEN_STATS_FAMILY.backends["torch"], forward=spy))
    out = compare(partial(_run_token_stats, backend), naive_token_stats, inputs,
                  ["logits", "ref_logits"])
    assert out.logprobs.shape == (3, 5)
    assert backend != "torch" or seen == [False]


def test_single_field_ops(backend, device):
    inp = logit_inputs((2, 3), 211, torch.float32, device)
    z, r, t = inp["logits"], inp["ref_logits"], inp["targets"]
    ref = naive_token_stats(z.double(), t, r.double(), coef=0.4, temperature=0.9, softcap=4.0)
    t32 = naive_token_stats(z, t, r, coef=0.4, temperature=0.9, softcap=4.0)
    kw = dict(temperature=0.9, softcap=4.0, backend=backend)
    assert_close("logprobs", ops.logprobs(z, t, **kw), ref.logprobs, t32.logprobs)
    assert_close("mixture", ops.mixture_logprobs(z, r, t, coef=0.4, **kw), ref.mixture_logprobs,
                 t32.mixture_logprobs)
    # entropy and kl take no targets: the "ignored" position is a real token for them.
    ref = naive_token_stats(z.double(), None, r.double(), temperature=0.9, softcap=4.0)
    t32 = naive_token_stats(z, None, r, temperature=0.9, softcap=4.0)
    assert_close("entropy", ops.entropy(z, **kw), ref.entropy, t32.entropy)
    assert_close("kl", ops.kl(z, r, **kw), ref.kl, t32.kl)


@pytest.mark.parametrize("coef", [0.0, 1.0])
def test_mixture_end_points(backend, device, coef):
    """coef = 0 is the policy and coef = 1 the reference, bit for bit, even with -inf entries
    in the model that is weighted 0."""
    inp = logit_inputs((6,), 97, torch.float32, device, ignore=False)
    z, r, t = inp["logits"], inp["ref_logits"], inp["targets"]
    masked = r if coef == 0 else z
    masked[:, 3] = float("-inf")
    s = ops.token_stats(z, t, r, coef=coef, backend=backend)
    same = s.logprobs if coef == 0 else s.ref_logprobs
    assert torch.equal(s.mixture_logprobs, same)


def test_inf_entries_exact_for_the_rest(backend, device):
    """Masked (-inf) vocabulary entries, in both models at the same columns, and a softcap."""
    inp = logit_inputs((5,), 300, torch.float32, device, ignore=False)
    for k in ("logits", "ref_logits"):
        inp[k][:, 250:] = float("-inf")
        inp[k][2, :100] = float("-inf")
    inp["targets"] = torch.randint(100, 250, (5,), device=device)
    inp.update(coef=0.6, softcap=10.0)
    stats = compare(partial(_run_token_stats, backend), naive_token_stats, inp,
                    ["logits", "ref_logits"])
    # Removing the masked columns altogether gives the same numbers.
    cut = {k: (v[:, :250].clone() if k.endswith("logits") else v) for k, v in inp.items()}
    short = ops.token_stats(backend=backend, **cut)
    for f in ("logprobs", "entropy", "kl", "mixture_logprobs"):
        torch.testing.assert_close(getattr(stats, f), getattr(short, f), rtol=1e-5, atol=1e-5)


def test_nan_row_stays_in_its_row(backend, device):
    inp = logit_inputs((4,), 77, torch.float32, device, ignore=False)
    z = inp["logits"].clone().requires_grad_()
    z.data[1, 5] = float("nan")
    s = ops.token_stats(z, inp["targets"], inp["ref_logits"], coef=0.5, backend=backend)
    for f in ("logprobs", "entropy", "kl", "mixture_logprobs"):
        v = getattr(s, f)
        assert torch.isnan(v[1]), f
        assert torch.isfinite(v[[0, 2, 3]]).all(), f
    sum(v.sum() for v in s if v is not None).backward()
    assert torch.isfinite(z.grad[[0, 2, 3]]).all()
    clean = ops.token_stats(z.detach()[[0, 2, 3]], inp["targets"][[0, 2, 3]],
                            inp["ref_logits"][[0, 2, 3]], coef=0.5, backend=backend)
    torch.testing.assert_close(s.logprobs[[0, 2, 3]], clean.logprobs)


def test_infinite_kl_does_not_poison_logprob_gradient(backend, device):
    """KL = inf when the reference masks a token the policy allows; the gradient of the
    log-probs alone must stay finite and exact."""
    inp = logit_inputs((3,), 50, torch.float32, device, ignore=False)
    z = inp["logits"].clone().requires_grad_()
    r = inp["ref_logits"].clone()
    r[:, 0] = float("-inf")
    s = ops.token_stats(z, inp["targets"], r, backend=backend)
    assert torch.isinf(s.kl).all()
    s.logprobs.sum().backward()
    z64 = z.detach().double().requires_grad_()
    torch.log_softmax(z64, -1).gather(1, inp["targets"][:, None]).sum().backward()
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-5, atol=1e-6)


def test_ignored_rows_are_zero_with_zero_gradient(backend, device):
    inp = logit_inputs((6,), 64, torch.float32, device, ignore=False)
    t = inp["targets"].clone()
    t[[0, 4]] = -7
    z = inp["logits"].clone().requires_grad_()
    r = inp["ref_logits"].clone().requires_grad_()
    s = ops.token_stats(z, t, r, coef=0.2, ignore_index=-7, backend=backend)
    for f in s._fields:
        assert (getattr(s, f)[[0, 4]] == 0).all(), f
    sum(v.sum() for v in s).backward()
    assert (z.grad[[0, 4]] == 0).all() and (r.grad[[0, 4]] == 0).all()
    assert (z.grad[[1, 2, 3, 5]] != 0).any()


def test_empty_and_single_row(backend, device):
    for lead in [(0,), (2, 0), ()]:
        inp = logit_inputs(lead, 33, torch.float32, device, ignore=False)
        z = inp["logits"].clone().requires_grad_()
        s = ops.token_stats(z, inp["targets"], inp["ref_logits"], coef=0.5, backend=backend)
        assert s.logprobs.shape == lead and s.kl.shape == lead
        sum(v.sum() for v in s).backward()
        assert z.grad.shape == z.shape
    compare(partial(_run_token_stats, backend), naive_token_stats,
            logit_inputs((1,), 33, torch.float32, device), ["logits", "ref_logits"])


# ----------------------------------------------------------------------------------------------
# Hidden states + lm_head
# ----------------------------------------------------------------------------------------------
def _linear_inputs(N, D, V, dtype, device, ref=True, Dr=None, bias=True, ref_bias=True):
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).to(device)
    out = {"hidden": rnd(N, D), "weight": rnd(V, D, scale=D ** -0.5 * 2),
           "targets": torch.randint(0, V, (N,)).to(device)}
    if N > 2:
        out["targets"][2] = -100
    if bias:
        out["bias"] = rnd(V, scale=0.5)
    if ref:
        Dr = Dr or D
        out["ref_hidden"] = rnd(N, Dr)
        out["ref_weight"] = rnd(V, Dr, scale=Dr ** -0.5 * 2)
        if ref_bias:
            out["ref_bias"] = rnd(V, scale=0.5)
    return out


def _run_linear(backend, **kw):
    return ops.linear_token_stats(backend=backend, **kw)


def native_linear_token_stats(hidden, weight, targets, *, bias=None, ref_hidden=None,
                              ref_weight=None, ref_bias=None, **kw):
    """Eager PyTorch as a bf16/fp16 model trains: the lm_head matmul in the model's dtype,
    then float32 log-softmax; the logit gradient is rounded to the model's dtype."""
    linear = torch.nn.functional.linear
    logits = linear(hidden, weight, bias).float()
    ref_logits = None
    if ref_hidden is not None:
        rw, rb = (weight, bias) if ref_weight is None else (ref_weight, ref_bias)
        ref_logits = linear(ref_hidden, rw, rb).float()
    return naive_token_stats(logits, targets, ref_logits, **kw)


LINEAR_CASES = [
    # N, D, V, Dr, dtype, kwargs
    (7, 24, 257, 40, torch.float32, dict(coef=0.3)),
    (5, 32, 1031, None, torch.bfloat16, dict(coef=0.5, softcap=6.0, temperature=0.8)),
    (1, 16, 37, None, torch.float16, dict(coef=1.0)),
    (9, 40, 200, 24, torch.float32, dict(coef=0.0, temperature=1.5)),
]


@pytest.mark.parametrize("N,D,V,Dr,dtype,kw", LINEAR_CASES)
def test_linear_token_stats_matches_reference(backend, device, N, D, V, Dr, dtype, kw):
    inputs = _linear_inputs(N, D, V, dtype, device, Dr=Dr)
    inputs.update(kw)
    compare(partial(_run_linear, backend), naive_linear_token_stats, inputs,
            ["hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias"],
            native=native_linear_token_stats)


# The torch backend's fast tile paths (no softcap, no mixture: in-place forward; log-probs /
# entropy-only backward) on one worker and on two (vocabulary-range items merged per row), with
# a masked vocabulary (-inf bias columns: the row dots' NaN fallbacks and the backward's
# non-finite tile fallback) and a NaN row.
FAST_CASES = [
    # N, V, dtype, ref, kwargs, grad_fields
    (7, 301, torch.float32, True, dict(temperature=0.8), ["logprobs"]),
    (6, 257, torch.bfloat16, False, dict(), ["logprobs", "entropy"]),
    (5, 263, torch.float32, True, dict(), ["entropy"]),
]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("N,V,dtype,ref,kw,grad_fields", FAST_CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_linear_torch_fast_paths(monkeypatch, workers, N, V, dtype, ref, kw, grad_fields, masked):
    monkeypatch.setattr(tuning, "TORCH", dataclasses.replace(
        tuning.TORCH, linear_workers=workers, linear_items_per_worker=2))
    inputs = _linear_inputs(N, 16, V, dtype, "cpu", ref=ref)
    inputs.update(kw)
    if masked:  # a masked vocabulary: -inf bias columns, no target among them
        cols = torch.tensor([c for c in range(0, V, 7) if c not in inputs["targets"].tolist()])
        inputs["bias"][cols] = float("-inf")
    compare(partial(_run_linear, "torch"), naive_linear_token_stats, inputs,
            ["hidden", "weight", "bias"], native=native_linear_token_stats,
            grad_fields=grad_fields)


def test_linear_torch_workers_nan_row(monkeypatch):
    """Two workers: a NaN row stays NaN after the items' merge, the other rows exact."""
    monkeypatch.setattr(tuning, "TORCH", dataclasses.replace(
        tuning.TORCH, linear_workers=2, linear_items_per_worker=2))
    inputs = _linear_inputs(4, 16, 300, torch.float32, "cpu")
    inputs["hidden"][1, 3] = float("nan")
    s = ops.linear_token_stats(backend="torch", **inputs)
    clean = {k: (v[[0, 2, 3]] if k in ("hidden", "ref_hidden", "targets") else v)
             for k, v in inputs.items()}
    c = ops.linear_token_stats(backend="torch", **clean)
    assert torch.isnan(s.entropy[1]) and torch.isnan(s.kl[1])
    for f in ("logprobs", "entropy", "kl", "ref_logprobs"):
        assert torch.allclose(getattr(s, f)[[0, 2, 3]], getattr(c, f), rtol=1e-5, atol=1e-5), f


def test_linear_policy_only_with_leading_dims(backend, device):
    inputs = _linear_inputs(6, 16, 111, torch.bfloat16, device, ref=False)
    inputs["hidden"] = inputs["hidden"].view(2, 3, 16)
    inputs["targets"] = inputs["targets"].view(2, 3)
    stats = compare(partial(_run_linear, backend), naive_linear_token_stats, inputs,
                    ["hidden", "weight", "bias"], native=native_linear_token_stats)
    assert stats.logprobs.shape == (2, 3) and stats.kl is None


def test_linear_reference_shares_policy_head(backend, device):
    """ref_weight/ref_bias default to the policy's head; only the hidden states differ."""
    inputs = _linear_inputs(5, 16, 73, torch.float32, device, ref=False)
    inputs["ref_hidden"] = torch.randn(5, 16, device=device)
    inputs["coef"] = 0.5
    compare(partial(_run_linear, backend), naive_linear_token_stats, inputs,
            ["hidden", "weight", "bias", "ref_hidden"])


def test_linear_gradient_subset(backend, device):
    """A frozen head (weight without grad) gets no gradient, and hidden's is still exact."""
    inputs = _linear_inputs(4, 16, 50, torch.float32, device)
    compare(partial(_run_linear, backend), naive_linear_token_stats, inputs, ["hidden"])


def test_linear_nan_row_and_empty(backend, device):
    inputs = _linear_inputs(4, 16, 45, torch.float32, device)
    inputs["hidden"][1, 3] = float("nan")
    s = ops.linear_token_stats(backend=backend, **inputs)
    assert torch.isnan(s.entropy[1]) and torch.isfinite(s.entropy[[0, 2, 3]]).all()
    h = torch.zeros(0, 16, device=device, requires_grad=True)
    w = torch.randn(45, 16, device=device, requires_grad=True)
    e = ops.linear_token_stats(h, w, torch.zeros(0, dtype=torch.long, device=device),
                               backend=backend)
    (e.logprobs.sum() + e.entropy.sum()).backward()
    assert h.grad.shape == (0, 16) and (w.grad == 0).all()


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def test_mixture_sample_reproducible(backend, device):
    z = torch.randn(8, 301, device=device)
    r = torch.randn(8, 301, device=device)
    def draw(seed):
        g = torch.Generator(device=device).manual_seed(seed)
        return ops.mixture_sample(z, r, coef=0.5, temperature=0.8, generator=g, backend=backend)
    a, b, c = draw(1), draw(1), draw(2)
    assert a.dtype == torch.long and a.shape == (8,)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert ((a >= 0) & (a < 301)).all()


@pytest.mark.parametrize("coef", [0.0, 0.35, 1.0])
def test_mixture_sample_distribution(backend, device, coef):
    """Chi-square test of the sampled frequencies against softmax of the mixture."""
    V, draws = 13, 1500
    z = torch.randn(V, device=device) * 1.5
    r = torch.randn(V, device=device) * 1.5
    z[4] = float("-inf")  # masked in the policy: never sampled unless coef == 1
    if coef == 1.0:
        r[4] = float("-inf")
    g = torch.Generator(device=device).manual_seed(123)
    out = ops.mixture_sample(z.expand(draws, V), r.expand(draws, V), coef=coef, temperature=0.7,
                             generator=g, backend=backend)
    from nashkern.naive import naive_mixture_logits
    probs = torch.softmax(naive_mixture_logits(z.cpu(), r.cpu(), coef=coef, temperature=0.7), -1)
    assert_samples_follow(out, probs, never=4)


def test_mixture_sample_invalid_rows(backend, device):
    z = torch.randn(3, 20, device=device)
    r = torch.randn(3, 20, device=device)
    z[0] = float("-inf")
    r[0] = float("-inf")
    z[2, 7] = float("nan")
    out = ops.mixture_sample(z, r, coef=0.5, backend=backend)
    assert out[0] == -1 and out[2] == -1 and 0 <= out[1] < 20


# Gradients through a subset of the fields: backends skip the terms of fields whose upstream
# gradient is zero everywhere, so every subset must still give the exact gradient.
GRAD_SUBSETS = [("logprobs",), ("entropy",), ("kl",), ("ref_logprobs",), ("mixture_logprobs",),
                ("logprobs", "kl"), ("entropy", "mixture_logprobs")]


@pytest.mark.parametrize("fields", GRAD_SUBSETS, ids="+".join)
def test_gradient_through_field_subsets(backend, device, fields):
    inputs = logit_inputs((6,), 263, torch.float32, device)
    inputs.update(coef=0.35, temperature=0.8, softcap=5.0)
    compare(partial(_run_token_stats, backend), naive_token_stats, inputs,
            ["logits", "ref_logits"], grad_fields=fields)
    lin = _linear_inputs(5, 24, 263, torch.float32, device)
    lin.update(coef=0.35, temperature=0.8)
    compare(partial(_run_linear, backend), naive_linear_token_stats, lin,
            ["hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias"],
            grad_fields=fields)
    if fields == ("ref_logprobs",):
        return  # with a frozen reference nothing is differentiable
    # a frozen reference: the torch backend then skips the reference tiles unless a policy
    # term (KL, mixture) reads them
    compare(partial(_run_linear, backend), naive_linear_token_stats, lin,
            ["hidden", "weight", "bias"], grad_fields=fields)
    compare(partial(_run_token_stats, backend), naive_token_stats, inputs, ["logits"],
            grad_fields=fields)


def test_mixture_sample_never_picks_masked_entries_at_the_row_ends(backend, device):
    """-inf entries first and last in the row (where an inverse-CDF search could slip) and a
    finite entry 30 nats below the head: only the finite entries are ever drawn."""
    z = torch.full((3000, 9), float("-inf"), device=device)
    z[:, 3], z[:, 5] = 0.0, -30.0
    g = torch.Generator(device=device).manual_seed(7)
    out = ops.mixture_sample(z, z.clone(), coef=0.5, generator=g, backend=backend)
    assert set(out.unique().tolist()) <= {3, 5}
    assert (out == 3).sum() >= 2990


def test_mixture_sample_never_returns_ids_past_the_vocabulary(backend, device):
    """Issue 13's reproducer: a +inf mixture logit takes all the mass (it used to give id 200
    = V + 100 on the torch backend); a temperature so small that m / T overflows gives the
    T -> 0 limit, the argmax of the mixture (torch), and a valid id on every backend."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 100, generator=gen).to(device)
    z[0, 17] = float("inf")
    for coef in (0.0, 0.4):
        out = ops.mixture_sample(z, z, coef=coef, backend=backend)
        assert out[0] == 17 and 0 <= out[1] < 100
    z = torch.randn(4, 100, generator=gen).to(device)
    out = ops.mixture_sample(z, z, coef=0.0, temperature=1e-40, backend=backend)
    assert bool(((out >= 0) & (out < 100)).all()), out
    if backend == "torch":
        assert torch.equal(out, z.argmax(1))
