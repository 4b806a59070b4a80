"""``linear_mixture_sample``: one token per row from the geometric mixture of the policy's and
the reference's heads, from their last-position hidden states ``[B, D]`` and head weights
``[V, D]`` (coef 0.5, temperature 0.9), as in Nash-MD's decoding step.

Providers: nashkern's torch backend (vocabulary tiles, no ``[B, V]`` logits); eager PyTorch as
a decoding loop does it (both heads' ``[B, V]`` logits, the float32 mixture, ``softmax``,
``torch.multinomial``) and ``torch.compile`` of it. The CSV's N column holds B. Floor: the FLOP
roofline, 2BDV per head, at the measured matmul rate. No softcap (as the mixture_sample suite).
"""
from types import SimpleNamespace

import bench_config as cfg
from bench_harness import DTYPES, Case, OpSpec, Provider, compiled, nashkern_providers, run_case


def make_inputs(case: Case, device: str):
    import torch

    m, B, dtype = case.model, case.N, DTYPES[case.dtype]
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    x = SimpleNamespace(hidden=randn(B, m.D), weight=randn(m.V, m.D, scale=m.D ** -0.5),
                        ref_hidden=randn(B, m.D), ref_weight=randn(m.V, m.D, scale=m.D ** -0.5),
                        generator=torch.Generator(device=device).manual_seed(1))
    return x, []


def floor(case: Case, itemsize: int):
    return "flop", 2 * 2 * case.N * case.model.D * case.model.V


def estimate(case: Case, itemsize: int) -> int:
    m, bv = case.model, case.N * case.model.V
    extra = 4 * bv * 4 if case.provider.name in ("eager", "torch-compile") else 0
    return 2 * (case.N + m.V) * m.D * itemsize + extra


def build_nashkern(backend: str):
    def build(case: Case):
        from nashkern import ops

        return lambda x: [ops.linear_mixture_sample(
            x.hidden, x.weight, x.ref_hidden, x.ref_weight, coef=cfg.COEF,
            temperature=cfg.TEMPERATURE, generator=x.generator,
            backend=backend)]
    return build


def eager_sample(hidden, weight, ref_hidden, ref_weight):
    """The global RNG: torch.compile(fullgraph=True) cannot take a torch.Generator argument."""
    import torch

    z = (hidden @ weight.T).float()
    r = (ref_hidden @ ref_weight.T).float()
    probs = torch.softmax(((1 - cfg.COEF) * z + cfg.COEF * r) / cfg.TEMPERATURE, dim=-1)
    return [torch.multinomial(probs, 1).squeeze(-1)]


def build_eager(case: Case, fn=eager_sample):
    return lambda x: fn(x.hidden, x.weight, x.ref_hidden, x.ref_weight)


def build_compiled(case: Case):
    return build_eager(case, compiled(eager_sample))


SPEC = OpSpec(
    name="linear_mixture_sample",
    providers=nashkern_providers("linear_mixture_sample", build_nashkern) + (
        Provider("eager", build_eager),
        Provider("torch-compile", build_compiled),
    ),
    workloads=cfg.SAMPLE_WORKLOADS,
    modes=("forward",),
    make_inputs=make_inputs,
    floor=floor,
    estimate=estimate,
)


def test_linear_mixture_sample(benchmark, bench_session, case):
    run_case(benchmark, bench_session, case)
