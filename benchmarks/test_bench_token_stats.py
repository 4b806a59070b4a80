"""``token_stats``: per-token statistics over materialised logits ``[N, V]`` (and the
reference's), the path of a trainer that already has logits.

Providers: nashkern's torch / triton / cuda backends; eager PyTorch (``.float()``,
``log_softmax``, ``gather``) and ``torch.compile`` of it; Liger-Kernel's cross-entropy over
logits (log-probs = -loss, ``reduction="none"``; it writes its gradient into the logits
buffer). The gradient is w.r.t. the policy logits. Floor: the bytes an op must move (read every
logit once, write the gradient once) over the measured device copy bandwidth.
"""
from types import SimpleNamespace

import bench_config as cfg
from bench_harness import (DTYPES, Case, OpSpec, Provider, compiled, eager_stats,
                           nashkern_providers, run_case)

WORKLOADS = {k: v for k, v in cfg.LOGPROB_WORKLOADS.items() if k != "kl"}


def make_inputs(case: Case, device: str):
    import torch

    m, N, dtype = case.model, case.N, DTYPES[case.dtype]
    g = torch.Generator(device=device).manual_seed(0)
    grad = case.mode != "forward"
    x = SimpleNamespace(
        logits=(torch.randn(N, m.V, generator=g, device=device) * 2).to(dtype).requires_grad_(grad),
        ref_logits=((torch.randn(N, m.V, generator=g, device=device) * 2).to(dtype)
                    if case.uses_reference else None),
        targets=torch.randint(0, m.V, (N,), generator=g, device=device),
    )
    return x, [x.logits] if grad else []


def floor(case: Case, itemsize: int):
    """Minimum traffic: every logit read once; the backward also writes the gradient. A
    forward+backward that fused both passes would read once, so its floor counts one read."""
    nv = case.N * case.model.V * itemsize
    reads = (2 if case.uses_reference else 1) * nv
    return "bytes", reads if case.mode == "forward" else reads + nv


def estimate(case: Case, itemsize: int) -> int:
    nv = case.N * case.model.V
    need = (2 if case.uses_reference else 1) * nv * itemsize
    if case.mode != "forward":
        need += nv * itemsize
    if case.provider.name in ("eager", "torch-compile"):
        need += cfg.EAGER_PEAK_NV[case.workload][case.mode] * nv * 4
    return need


# -- providers ---------------------------------------------------------------------------------
def build_nashkern(backend: str):
    def build(case: Case):
        from nashkern import ops

        coef = cfg.COEF if case.workload == "reference" else None
        softcap = case.model.softcap

        def run(x):
            s = ops.token_stats(x.logits, x.targets, x.ref_logits, coef=coef, softcap=softcap,
                                backend=backend)
            return [getattr(s, f) for f in case.fields]
        return run
    return build


def eager_logits(logits, ref_logits, targets, fields, softcap):
    return eager_stats(logits, ref_logits, targets, fields, softcap)


def build_eager(case: Case, fn=eager_logits):
    return lambda x: fn(x.logits, x.ref_logits, x.targets, case.fields, case.model.softcap)


def build_compiled(case: Case):
    return build_eager(case, compiled(eager_logits))


def build_liger_ce(case: Case):
    from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

    kwargs = {"softcap": case.model.softcap} if case.model.softcap else {}
    loss = LigerCrossEntropyLoss(reduction="none", **kwargs)
    return lambda x: [-loss(x.logits, x.targets)]


SPEC = OpSpec(
    name="token_stats",
    providers=nashkern_providers("token_stats", build_nashkern) + (
        Provider("eager", build_eager),
        Provider("torch-compile", build_compiled),
        Provider("liger-ce", build_liger_ce, package="liger_kernel", pip="liger-kernel",
                 needs_cuda=True, workloads=("logprobs",)),
    ),
    workloads=WORKLOADS,
    modes=cfg.MODES,
    make_inputs=make_inputs,
    floor=floor,
    estimate=estimate,
)


def test_token_stats(benchmark, bench_session, case):
    run_case(benchmark, bench_session, case)
