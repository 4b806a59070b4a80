"""``linear_token_stats``: per-token statistics from final hidden states ``[N, D]`` and the
lm_head weight ``[V, D]``, against what a trainer does without it.

Providers: nashkern's torch / triton / cuda backends; eager PyTorch (full ``[N, V]`` logits,
``.float()``, ``log_softmax``, ``gather``) and ``torch.compile`` of it; Liger-Kernel's fused
linear cross-entropy (log-probs = -loss, ``reduction="none"``) and fused linear JSD with
``jsd_beta=1`` (KL(policy || reference), reduced to a scalar); Cut Cross-Entropy's
``linear_cross_entropy(..., reduction="none")`` (log-probs = -loss, its default gradient
filtering). Floor: the FLOP roofline, 2NDV per model forward, 8NDV (12NDV with a reference)
forward+backward, at the measured matmul rate of the device in the benchmark dtype.
"""
from types import SimpleNamespace

import bench_config as cfg
from bench_harness import (DTYPES, Case, OpSpec, Provider, compiled, eager_stats,
                           nashkern_providers, run_case)


def make_inputs(case: Case, device: str):
    """Random inputs with O(1) logits; the reference (for "kl" / "reference") is a second head
    of the same shape with its own hidden states, frozen."""
    import torch

    m, N, dtype = case.model, case.N, DTYPES[case.dtype]
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    grad = case.mode != "forward"
    x = SimpleNamespace(
        hidden=randn(N, m.D).requires_grad_(grad),
        weight=randn(m.V, m.D, scale=m.D ** -0.5).requires_grad_(grad),
        targets=torch.randint(0, m.V, (N,), generator=g, device=device),
        ref_hidden=randn(N, m.D) if case.uses_reference else None,
        ref_weight=randn(m.V, m.D, scale=m.D ** -0.5) if case.uses_reference else None,
    )
    return x, [x.hidden, x.weight] if grad else []


def floor(case: Case, itemsize: int):
    """Nominal matmul FLOPs of the streaming algorithm (the same count for every provider):
    2NDV per model forward; the backward recomputes each model's logits (2NDV each) and forms
    dhidden and dweight of the policy (4NDV)."""
    m, models = case.model, 2 if case.uses_reference else 1
    ndv = case.N * m.D * m.V
    fwd, bwd = 2 * models * ndv, (2 * models + 4) * ndv
    return "flop", {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[case.mode]


def estimate(case: Case, itemsize: int) -> int:
    """Inputs and gradients, plus the ``[N, V]`` tensors a materialising provider holds (eager:
    the measured multiples of cfg.EAGER_PEAK_NV; torch.compile: at least the logits)."""
    m, N, models = case.model, case.N, 2 if case.uses_reference else 1
    need = models * (N + m.V) * m.D * itemsize + 8 * N
    if case.mode != "forward":
        need += (N + m.V) * m.D * 4
    nv = N * m.V
    if case.provider.name == "eager":
        need += cfg.EAGER_PEAK_NV[case.workload][case.mode] * nv * 4
        if itemsize < 4:  # the logits in the model's dtype, before .float()
            need += models * nv * itemsize
    elif case.provider.name == "torch-compile":
        need += models * nv * itemsize
    return need


# -- providers ---------------------------------------------------------------------------------
def build_nashkern(backend: str, strategy: str = "auto"):
    def build(case: Case):
        from nashkern import ops

        coef = cfg.COEF if case.workload == "reference" else None
        softcap = case.model.softcap
        with_targets = "logprobs" in case.fields or "mixture_logprobs" in case.fields

        def run(x):
            s = ops.linear_token_stats(x.hidden, x.weight, x.targets if with_targets else None,
                                       ref_hidden=x.ref_hidden, ref_weight=x.ref_weight,
                                       coef=coef, softcap=softcap, backend=backend,
                                       strategy=strategy)
            return [getattr(s, f) for f in case.fields]
        return run
    return build


def eager_linear(hidden, weight, targets, ref_hidden, ref_weight, fields, softcap):
    ref_logits = None if ref_hidden is None else ref_hidden @ ref_weight.T
    return eager_stats(hidden @ weight.T, ref_logits, targets, fields, softcap)


def build_eager(case: Case, fn=eager_linear):
    return lambda x: fn(x.hidden, x.weight, x.targets, x.ref_hidden, x.ref_weight, case.fields,
                        case.model.softcap)


def build_compiled(case: Case):
    return build_eager(case, compiled(eager_linear))


def build_liger_flce(case: Case):
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss,
    )
    kwargs = {"softcap": case.model.softcap} if case.model.softcap else {}
    loss = LigerFusedLinearCrossEntropyLoss(reduction="none", **kwargs)
    return lambda x: [-loss(x.weight, x.hidden, x.targets)]


def build_liger_fljsd(case: Case):
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

    jsd = LigerFusedLinearJSD(jsd_beta=1.0)  # beta = 1: KL(student || teacher), mean over tokens
    return lambda x: [jsd(x.hidden, x.weight, x.ref_hidden, x.ref_weight)]


def build_cce(case: Case):
    from cut_cross_entropy import linear_cross_entropy

    softcap = case.model.softcap
    return lambda x: [-linear_cross_entropy(x.hidden, x.weight, x.targets, softcap=softcap,
                                            reduction="none")]


SPEC = OpSpec(
    name="linear_token_stats",
    # nashkern-<backend> ("auto" strategy: chunked on CUDA) and, from the strategy tables,
    # nashkern-triton-chunked / -triton-fused / -cuda-chunked side by side (DESIGN.md, "Cost
    # model of linear_token_stats"): the chunked rows check the >= 65% (60% with a reference)
    # of-roofline targets, the fused row the memory floor's cost.
    providers=nashkern_providers("linear_token_stats", build_nashkern) + (
        Provider("eager", build_eager),
        Provider("torch-compile", build_compiled),
        Provider("liger-flce", build_liger_flce, package="liger_kernel", pip="liger-kernel",
                 needs_cuda=True, workloads=("logprobs",)),
        Provider("liger-fljsd", build_liger_fljsd, package="liger_kernel", pip="liger-kernel",
                 needs_cuda=True, workloads=("kl",), softcap=False),
        Provider("cce", build_cce, package="cut_cross_entropy", pip="cut-cross-entropy",
                 needs_cuda=True, workloads=("logprobs",)),
    ),
    workloads=cfg.LOGPROB_WORKLOADS,
    modes=cfg.MODES,
    make_inputs=make_inputs,
    floor=floor,
    estimate=estimate,
)


def test_linear_token_stats(benchmark, bench_session, case):
    run_case(benchmark, bench_session, case)
