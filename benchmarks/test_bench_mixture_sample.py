"""``mixture_sample``: one token per row from the geometric mixture of the policy's and the
reference's last-position logits ``[B, V]`` (coef 0.5, temperature 0.9), as in Nash-MD's
generation step.

Providers: nashkern's torch / triton / cuda backends (Gumbel-max, one pass, no ``[B, V]``
temporaries in the kernels); eager PyTorch as a sampler in ``generate`` does it (mixture
logits in float32, ``softmax``, ``torch.multinomial``) and ``torch.compile`` of it. The CSV's
N column holds B. Floor: reading both ``[B, V]`` inputs once over the measured copy bandwidth.
Back-to-back calls reuse the same inputs, so on a GPU inputs smaller than its L2 cache are read
from L2, as in a decoding loop that samples logits it has just written.
"""
from types import SimpleNamespace

import bench_config as cfg
from bench_harness import DTYPES, Case, OpSpec, Provider, compiled, nashkern_providers, run_case


def make_inputs(case: Case, device: str):
    import torch

    B, V, dtype = case.N, case.model.V, DTYPES[case.dtype]
    g = torch.Generator(device=device).manual_seed(0)
    x = SimpleNamespace(
        logits=(torch.randn(B, V, generator=g, device=device) * 2).to(dtype),
        ref_logits=(torch.randn(B, V, generator=g, device=device) * 2).to(dtype),
        generator=torch.Generator(device=device).manual_seed(1),
    )
    return x, []


def floor(case: Case, itemsize: int):
    return "bytes", 2 * case.N * case.model.V * itemsize


def estimate(case: Case, itemsize: int) -> int:
    bv = case.N * case.model.V
    extra = 3 * bv * 4 if case.provider.name in ("eager", "torch-compile") else 0
    return 2 * bv * itemsize + extra


def build_nashkern(backend: str):
    def build(case: Case):
        from nashkern import ops

        return lambda x: [ops.mixture_sample(x.logits, x.ref_logits, coef=cfg.COEF,
                                             temperature=cfg.TEMPERATURE, generator=x.generator,
                                             backend=backend)]
    return build


def eager_sample(logits, ref_logits):
    """The global RNG: torch.compile(fullgraph=True) cannot take a torch.Generator argument."""
    import torch

    mixed = (1 - cfg.COEF) * logits.float() + cfg.COEF * ref_logits.float()
    probs = torch.softmax(mixed / cfg.TEMPERATURE, dim=-1)
    return [torch.multinomial(probs, 1).squeeze(-1)]


def build_eager(case: Case, fn=eager_sample):
    return lambda x: fn(x.logits, x.ref_logits)


def build_compiled(case: Case):
    return build_eager(case, compiled(eager_sample))


SPEC = OpSpec(
    name="mixture_sample",
    providers=nashkern_providers("mixture_sample", build_nashkern) + (
        Provider("eager", build_eager),
        Provider("torch-compile", build_compiled),
    ),
    workloads=cfg.SAMPLE_WORKLOADS,
    modes=("forward",),
    make_inputs=make_inputs,
    floor=floor,
    estimate=estimate,
)


def test_mixture_sample(benchmark, bench_session, case):
    run_case(benchmark, bench_session, case)
