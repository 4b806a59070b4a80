"""The op registry (nashkern/ops/registry.py): declared backend tables, the choice of "auto",
clear errors for a backend lacking an op, the scalar schema, and the device guard of every
launch."""
import contextlib
import types

import pytest
import torch

from nashkern import ops
from nashkern.backends import linear_token_stats_chunked as chunked
from nashkern.backends.cuda import library as cuda_lib
from nashkern.backends.torch import token_stats as torch_token_stats
from nashkern.kernels import layout
from nashkern.ops import registry
from nashkern.ops.linear_token_stats import FAMILY as LINEAR_FAMILY, STRATEGIES, resolve_strategy
from nashkern.ops.token_stats import FAMILY as TOKEN_STATS_FAMILY

HAS_TRITON = registry.triton_importable()
CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def fake_cuda_library(monkeypatch):
    """A loaded CUDA library as far as nashkern can tell: a stand-in module for the ctypes
    library, torch reporting a CUDA device, and the kernels loading on it."""
    stand_in = types.ModuleType("_nashkern_cuda_stand_in")
    monkeypatch.setattr(cuda_lib, "load_library", lambda path=None: stand_in)
    monkeypatch.setattr(cuda_lib, "_device_reason", lambda device: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert cuda_lib.unavailable_reason() is None
    return stand_in


def test_every_family_is_declared_once():
    names = [f.name for f in ops.FAMILIES]
    assert names == ["token_stats", "linear_token_stats", "mixture_sample",
                     "linear_mixture_sample"]
    custom = [op for f in ops.FAMILIES for op in f.custom_ops]
    assert len({op._qualname for op in custom}) == len(custom) == 6
    for family in ops.FAMILIES:
        assert "torch" in family.backends  # the CPU path and the oracle's peer, always there
        assert set(family.backends) <= set(registry.BACKENDS)


def test_auto_with_a_loaded_cuda_library_resolves_every_op_to_an_implementation(
        fake_cuda_library):
    """The GPU crash of issue 9: "auto" used to pick "cuda" for linear_token_stats, which the
    CUDA backend lacks. Every op must resolve to a backend that implements it."""
    for family in ops.FAMILIES:
        backend = registry.resolve_backend(family, "auto", CUDA0)
        impl = family.implementation(backend)
        assert callable(impl.forward), family.name
        if len(family.custom_ops) > 1:  # differentiable: a backward op too
            assert callable(impl.backward), family.name
    # linear_mixture_sample has no GPU kernel: "auto" runs its torch backend there
    expected = {"token_stats": "cuda", "mixture_sample": "cuda", "linear_token_stats": "cuda",
                "linear_mixture_sample": "torch"}
    assert {f.name: registry.resolve_backend(f, "auto", CUDA0) for f in ops.FAMILIES} == expected


def test_every_strategy_resolves_to_a_declared_implementation(fake_cuda_library):
    """linear_token_stats declares one table per strategy; for every backend that implements
    the op, "auto" and each strategy the backend has resolve to a callable implementation, on a
    CUDA device and on the CPU."""
    family = LINEAR_FAMILY
    assert set(family.strategies) == {"fused", "chunked"}
    assert set(family.backends) == {b for t in family.strategies.values() for b in t}
    for device in (CUDA0, torch.device("cpu")):
        for backend in family.backends:
            for strategy in STRATEGIES:
                if strategy != "auto" and backend not in family.strategies[strategy]:
                    continue
                resolved = resolve_strategy(strategy, backend, device)
                impl = family.implementation(backend, resolved)
                assert callable(impl.forward) and callable(impl.backward), (backend, strategy)
                if strategy == "auto":
                    assert resolved == ("chunked" if device.type == "cuda" or backend == "cuda"
                                        else "fused")


def test_cuda_backend_implements_linear_token_stats_through_the_chunked_strategy(
        fake_cuda_library, monkeypatch):
    """backend="cuda" has no fused-linear kernels: its table entry is the chunked strategy with
    the CUDA token_stats kernels as the epilogue; strategy="fused" with it is a clear error.
    The op routes backend="cuda" there (the epilogue swapped for a recording torch one)."""
    impl = LINEAR_FAMILY.implementation("cuda", "chunked")
    strategy = impl.forward.__self__
    assert isinstance(strategy, chunked.ChunkedLinearTokenStats)
    assert strategy.epilogue is TOKEN_STATS_FAMILY.implementation("cuda")
    assert "cuda" not in LINEAR_FAMILY.strategies["fused"]
    assert LINEAR_FAMILY.backends["cuda"] is impl
    with pytest.raises(ValueError, match=r"backend='cuda' implements linear_token_stats with "
                                         r"strategy='chunked' only"):
        resolve_strategy("fused", "cuda", CUDA0)

    calls = []

    def recording(fn):
        def run(*args, **kw):
            calls.append(fn.__name__)
            return fn(*args, **kw)
        return run

    monkeypatch.setattr(cuda_lib, "EMULATE_ON_CPU", True)
    monkeypatch.setattr(strategy, "epilogue", registry.Implementation(
        recording(torch_token_stats.token_stats_forward), recording(torch_token_stats.token_stats_backward)))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 16, generator=g, requires_grad=True)
    w = torch.randn(37, 16, generator=g)
    t = torch.randint(0, 37, (5,), generator=g)
    got = ops.linear_token_stats(h, w, t, backend="cuda")
    got.logprobs.sum().backward()
    want = ops.linear_token_stats(h.detach(), w, t, backend="torch", strategy="fused")
    torch.testing.assert_close(got.logprobs, want.logprobs)
    assert calls == ["token_stats_forward", "token_stats_backward"]
    with pytest.raises(ValueError, match="strategy='chunked' only"):
        ops.linear_token_stats(h, w, t, backend="cuda", strategy="fused")


def test_auto_without_cuda_library_prefers_triton_on_gpu(monkeypatch):
    monkeypatch.setattr(cuda_lib, "unavailable_reason", lambda: "not built")
    for family in ops.FAMILIES:
        assert registry.resolve_backend(family, "auto", CUDA0) == (
            "triton" if HAS_TRITON and "triton" in family.backends else "torch")
        assert registry.resolve_backend(family, "auto", torch.device("cpu")) == "torch"


def test_explicit_backend_lacking_the_op_is_a_clear_error(fake_cuda_library):
    torch_only = registry.Family("torch_only_op", (), {
        "torch": registry.Implementation(torch_token_stats.token_stats_forward)})
    with pytest.raises(ValueError, match=r"backend='cuda' does not implement torch_only_op; "
                                         r"backends that do: torch"):
        registry.resolve_backend(torch_only, "cuda", CUDA0)


def test_scalars_are_validated_once_and_traceable_types_pass():
    s = registry.Scalars.checked(0.5, 2, None, -1)
    assert s == registry.Scalars(0.5, 2.0, None, -1) and isinstance(s.temperature, float)
    assert s.as_args() == (0.5, 2.0, None, -1)
    for bad, match in ((dict(temperature=float("inf")), "temperature must be a finite"),
                       (dict(temperature=float("nan")), "temperature must be a finite"),
                       (dict(softcap=float("inf")), "softcap must be None or a finite"),
                       (dict(coef=float("nan")), r"coef must be in \[0, 1\]")):
        with pytest.raises(ValueError, match=match):
            registry.Scalars.checked(**bad)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        registry.Scalars.checked(ignore_index=1.0)


def _run_every_op(backend):
    g = torch.Generator().manual_seed(0)
    z, r = torch.randn(2, 3, 37, generator=g), torch.randn(2, 3, 37, generator=g)
    z.requires_grad_(True)
    t = torch.randint(0, 37, (2, 3), generator=g)
    ops.token_stats(z, t, r, coef=0.5, backend=backend).mixture_logprobs.sum().backward()
    h = torch.randn(5, 16, generator=g, requires_grad=True)
    w = torch.randn(37, 16, generator=g, requires_grad=True)
    ops.linear_token_stats(h, w, t.reshape(-1)[:5], backend=backend).logprobs.sum().backward()
    ops.mixture_sample(z.detach()[0], r[0], coef=0.3, backend=backend)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_every_triton_launch_runs_under_the_inputs_device_guard(monkeypatch):
    """Each Triton launch (forward, merge, backward, sampler) enters layout.device_guard with
    its inputs' device (recorded here on the CPU interpreter)."""
    seen = []

    def recording_guard(device):
        seen.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(layout, "device_guard", recording_guard)
    _run_every_op("triton")
    # token_stats forward + backward, linear forward + backward, sampler: 5 guarded launches
    assert len(seen) == 5 and all(d == torch.device("cpu") for d in seen)


def test_device_guard_selects_the_inputs_cuda_device():
    guard = layout.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(layout.device_guard(torch.device("cpu")), contextlib.nullcontext)


def _imports(path):
    import ast

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((a.name, 0) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module or "", node.level


def test_layers_import_downwards_only():
    """kernels/ is the bottom layer (it imports only itself, triton and torch); the ops layer
    reaches its backends through normal imports, never importlib strings."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for path in (root / "kernels").glob("*.py"):
        for module, level in _imports(path):
            assert level == 1 or not module.startswith("nashkern"), (path.name, module)
    for path in (root / "nashkern" / "ops").glob("*.py"):
        for module, level in _imports(path):
            assert module != "importlib" and not module.startswith(("rl", "nashkern.rl")), (
                path.name, module)
