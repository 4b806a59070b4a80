"""Every kernel and strategy at the production shapes against the float64 oracle.

The other kernel tests use tiny shapes and, on a GPU, often tiny tile configs; here the real
heads run with the frozen per-architecture configs (``tuning.config_for`` on the device: the
sm_90 entries on an H100 / H200): Llama-3-8B's ``D = 4096, V = 128256`` and Qwen2.5's
``V = 151936`` in bf16, an odd token count (partial row blocks, vocabulary splits), with a
reference model and the geometric mixture (every statistic and gradient kernel variant).
Forward and every gradient go through ``tests/helpers/oracle.py`` (float64 reference, budget set by
PyTorch's own float32 / bf16 error); the sampler through a chi-square test of its frequencies.

On a CUDA device (``scripts/device_check.py``, part 1): the model shapes. Without one (CI): the
same checks at a small shape in the Triton interpreter (the cuda backend skipped), so that the
checking code itself is exercised and fails when the kernels are wrong. On the device the cases
run one at a time in one xdist worker (``--dist loadgroup``): a float64 oracle of a 128256 x
4096 head needs ~25 GiB.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels

from nashkern import ops, tuning  # noqa: E402
from nashkern.backends.cuda import library as cuda_lib  # noqa: E402
from nashkern.naive import naive_linear_token_stats, naive_mixture_logits, naive_token_stats  # noqa: E402
from nashkern.ops.linear_token_stats import FAMILY as LINEAR_FAMILY  # noqa: E402
from nashkern.ops.mixture_sample import FAMILY as SAMPLE_FAMILY  # noqa: E402
from nashkern.ops.token_stats import FAMILY as TOKEN_STATS_FAMILY  # noqa: E402

from oracle import compare  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
#: (N tokens, D, V): Llama-3-8B's head on the device; small in the interpreter.
LINEAR_SHAPE = (333, 4096, 128256) if CUDA else (37, 40, 1031)
#: (rows, V) of logits input: Qwen2.5's vocabulary on the device.
LOGITS_SHAPE = (517, 151936) if CUDA else (9, 1031)
#: (draws, V) of the sampler's frequency test (the interpreter takes ~0.1-0.7 s a row).
SAMPLE_SHAPE = (4096, 151936) if CUDA else (120, 97)
COEF, SOFTCAP = 0.5, 30.0
pytestmark = [pytest.mark.xdist_group("device_shapes"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]  # interpreter padding lanes


def _runnable(backend: str) -> bool:
    if backend == "cuda":
        return CUDA and cuda_lib.unavailable_reason() is None
    if backend == "triton":
        return any(b == "triton" for b in TOKEN_STATS_FAMILY.backends)
    return True


def _skip_unless_runnable(backend: str) -> None:
    if backend == "cuda" and not CUDA:
        pytest.skip("backend='cuda' runs on the device only (its CPU emulation is tested by "
                    "test_cuda_backend.py)")
    if not _runnable(backend):
        reason = cuda_lib.unavailable_reason() if backend == "cuda" else "no triton"
        pytest.fail(f"backend={backend!r} cannot run on this CUDA device: {reason}")


def _record_config(record_property, kernel: str) -> None:
    """The config the kernels took (the frozen sm_90 one on an H100 / H200), in the JUnit XML."""
    cfg = tuning.config_for(kernel, torch.device(DEVICE))
    record_property(f"config_{kernel}", repr(cfg).split(", reason=")[0])
    if CUDA:
        assert tuning.arch_of(torch.device(DEVICE)) != "default"


def _randn(*shape, scale=1.0, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(*shape, generator=gen, device=DEVICE) * scale).to(dtype)


def _targets(n: int, V: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    t = torch.randint(0, V, (n,), generator=gen, device=DEVICE)
    t[1] = -100  # one ignored position
    t[2], t[3] = 0, V - 1  # the first and last vocabulary tiles
    return t


# ----------------------------------------------------------------------------------------------
# linear_token_stats: every (strategy, backend) the registry declares
# ----------------------------------------------------------------------------------------------
LINEAR_IMPLS = [(s, b) for s, table in LINEAR_FAMILY.strategies.items() for b in table]


@pytest.mark.parametrize("strategy,backend", LINEAR_IMPLS,
                         ids=[f"{s}-{b}" for s, b in LINEAR_IMPLS])
def test_linear_token_stats_at_model_shape(strategy, backend, record_property):
    _skip_unless_runnable(backend)
    if backend == "torch" and CUDA and strategy == "fused":
        pytest.skip("the torch fused path is the CPU's; on the device its chunked twin runs")
    N, D, V = LINEAR_SHAPE
    _record_config(record_property, "linear_token_stats" if strategy == "fused"
                   else "token_stats")
    record_property("shape", f"N={N} D={D} V={V} bf16, reference, coef={COEF}")
    inputs = dict(hidden=_randn(N, D), weight=_randn(V, D, scale=D ** -0.5, seed=2),
                  targets=_targets(N, V), ref_hidden=_randn(N, D, seed=3),
                  ref_weight=_randn(V, D, scale=D ** -0.5, seed=4))

    def run(**kw):
        return ops.linear_token_stats(**kw, coef=COEF, backend=backend, strategy=strategy)

    def naive(**kw):
        return naive_linear_token_stats(**kw, coef=COEF)

    # The gradients a trainer takes: the policy's hidden states and head; the reference frozen.
    compare(run, naive, inputs, grad_names=("hidden", "weight"), native=naive)


# ----------------------------------------------------------------------------------------------
# token_stats over logits: every backend
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("softcap", [None, SOFTCAP], ids=["plain", "softcap"])
@pytest.mark.parametrize("backend", list(TOKEN_STATS_FAMILY.backends))
def test_token_stats_at_model_shape(backend, softcap, record_property):
    _skip_unless_runnable(backend)
    N, V = LOGITS_SHAPE
    _record_config(record_property, "token_stats")
    inputs = dict(logits=_randn(N, V, scale=3.0), targets=_targets(N, V),
                  ref_logits=_randn(N, V, scale=3.0, seed=5))
    inputs["logits"][4, 7] = float("-inf")  # a masked vocabulary entry

    def run(**kw):
        return ops.token_stats(**kw, coef=COEF, temperature=0.9, softcap=softcap,
                               backend=backend)

    def naive(**kw):
        return naive_token_stats(**kw, coef=COEF, temperature=0.9, softcap=softcap)

    compare(run, naive, inputs, grad_names=("logits", "ref_logits"))


# ----------------------------------------------------------------------------------------------
# mixture_sample: frequencies at the model vocabulary
# ----------------------------------------------------------------------------------------------
#: Columns that carry the mass: both ends, tile and split boundaries of any power-of-two tiling.
HOT = (0, 1, 2047, 2048, 4095, 4096, 65535, 65536, -2, -1)


def sample_counts(backend: str, draws: int, V: int, seed: int = 0):
    """Observed and expected counts of ``draws`` rows of one mixture whose mass sits on the
    ``HOT`` columns (every other column 30 nats below): -> (observed [len(HOT) + 1], expected)
    with the last bucket "any other column"."""
    hot = torch.tensor([h % V for h in HOT], device=DEVICE).unique()
    z = torch.full((V,), -30.0, device=DEVICE)
    r = torch.full((V,), -30.0, device=DEVICE)
    # mixture logits 0.5 (z + r) / 0.9 from -1.1 to 2.2: probabilities 1% to 30%
    z[hot] = torch.linspace(-2.0, 3.0, len(hot), device=DEVICE)
    r[hot] = torch.linspace(0.0, 1.0, len(hot), device=DEVICE)
    z, r = z.to(torch.bfloat16), r.to(torch.bfloat16)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    ids = ops.mixture_sample(z.expand(draws, V).contiguous(), r.expand(draws, V).contiguous(),
                             coef=COEF, temperature=0.9, generator=gen, backend=backend)
    p = torch.softmax(naive_mixture_logits(z.float(), r.float(), coef=COEF, temperature=0.9), -1)
    observed = torch.stack([(ids == h).sum() for h in hot] + [(~torch.isin(ids, hot)).sum()])
    expected = torch.cat([p[hot], (1 - p[hot].sum()).reshape(1)]) * draws
    return observed.double().cpu(), expected.double().cpu()


def chi_square(observed, expected) -> float:
    keep = expected >= 5
    return float((((observed[keep] - expected[keep]) ** 2) / expected[keep]).sum())


@pytest.mark.parametrize("backend", list(SAMPLE_FAMILY.backends))
def test_mixture_sample_frequencies_at_model_vocab(backend, record_property):
    _skip_unless_runnable(backend)
    draws, V = SAMPLE_SHAPE
    _record_config(record_property, "mixture_sample")
    observed, expected = sample_counts(backend, draws, V)
    assert observed.sum() == draws
    stat = chi_square(observed, expected)
    record_property("chi2", f"{stat:.2f}")
    # 9 degrees of freedom (10 hot columns, the tail's expectation ~1e-8 is below 5): P(chi2 >
    # 33.7) = 1e-4; the tail is never hit.
    assert stat < 33.7, (stat, observed.tolist(), expected.tolist())
    assert observed[-1] == 0, observed.tolist()


def test_chi_square_flags_a_wrong_sampler():
    """The frequency check is not vacuous: counts drawn from another mixture fail it."""
    V = SAMPLE_SHAPE[1]
    observed, expected = sample_counts("torch", 2000, V)
    assert chi_square(observed, expected) < 33.7
    assert chi_square(observed.flip(0).roll(-1), expected) > 33.7  # the hot columns permuted
