"""tuning.py: the per-architecture config lookup and the opt-in autotuner's logic, on the CPU
(a fake launch and timer stand in for the device)."""
import dataclasses

import pytest
import torch

from nashkern import tuning


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.setattr(tuning, "_AUTOTUNE_CACHE", {})


def _fake_cuda(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("kernel", sorted(tuning.KERNELS))
def test_config_for_cpu_and_none_is_the_default(kernel):
    default = tuning.config_for_arch(kernel, "default")
    assert isinstance(default, tuning.KERNELS[kernel])
    assert tuning.config_for(kernel) is default
    assert tuning.config_for(kernel, torch.device("cpu")) is default


@pytest.mark.parametrize("kernel", sorted(tuning.KERNELS))
def test_every_architecture_has_a_frozen_config_with_its_reason(kernel):
    for arch in ("default", *tuning.ARCHS):
        cfg = tuning.config_for_arch(kernel, arch)
        assert isinstance(cfg, tuning.KERNELS[kernel])
        assert dataclasses.is_dataclass(cfg) and cfg.__dataclass_params__.frozen
        assert "estimated" in cfg.reason or "measured" in cfg.reason, (arch, cfg.reason)


def test_config_for_cuda_picks_the_architecture(monkeypatch):
    _fake_cuda(monkeypatch, (9, 0))
    cuda = torch.device("cuda", 0)
    assert tuning.arch_of(cuda) == "sm_90"
    assert tuning.config_for("linear_token_stats", cuda) is tuning.config_for_arch(
        "linear_token_stats", "sm_90")
    _fake_cuda(monkeypatch, (8, 6))  # an sm_86 gets the sm_80 config, an sm_100 the sm_90 one
    assert tuning.config_for("token_stats", cuda) is tuning.config_for_arch("token_stats", "sm_80")
    _fake_cuda(monkeypatch, (10, 0))
    assert tuning.arch_of(cuda) == "sm_100"
    assert tuning.config_for("token_stats", cuda) is tuning.config_for_arch("token_stats", "sm_90")
    _fake_cuda(monkeypatch, (7, 5))  # older than every listed architecture: the default
    assert tuning.config_for("token_stats", cuda) is tuning.config_for_arch("token_stats",
                                                                            "default")


def test_interpreter_gets_the_default_config(monkeypatch):
    _fake_cuda(monkeypatch, (9, 0))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tuning.arch_of(torch.device("cuda", 0)) == "default"


def test_config_for_rejects_unknown_names():
    with pytest.raises(ValueError, match="kernel must be one of"):
        tuning.config_for("softmax")
    with pytest.raises(ValueError, match="arch must be"):
        tuning.config_for_arch("token_stats", "hopper")


def test_shape_bucket_rounds_up_to_powers_of_two():
    assert tuning.shape_bucket(N=8000, V=151936) == (("N", 8192), ("V", 262144))
    assert tuning.shape_bucket(N=8192, V=131072) == (("N", 8192), ("V", 131072))
    assert tuning.shape_bucket(N=1) == (("N", 1),)
    assert tuning.shape_bucket(N=0) == (("N", 1),)


@pytest.mark.parametrize("kernel, launch", sorted(tuning.SEARCH_SPACES))
def test_candidates_start_with_the_frozen_config_and_are_distinct(kernel, launch):
    base = tuning.config_for_arch(kernel, "sm_90")
    cands = tuning.candidates(kernel, launch, base)
    assert cands[0] is base
    assert len(cands) == len(set(cands)) >= 2
    space = tuning.SEARCH_SPACES[(kernel, launch)]
    assert len(cands) <= 1 + len(list(__import__("itertools").product(*space.values())))


def test_autotune_picks_the_fastest_candidate_and_caches_it_per_bucket(monkeypatch):
    _fake_cuda(monkeypatch, (9, 0))
    cuda = torch.device("cuda", 0)
    timed = []

    def timer(launch, cfg):  # fake device: BLOCK_V 4096 with 4 warps is the fastest
        timed.append(cfg)
        launch(cfg)
        return abs(cfg.BLOCK_V_FWD - 4096) / 1024 + cfg.num_warps / 8

    launched = []
    best = tuning.autotune("token_stats", "forward", cuda, {"N": 8000, "V": 151936},
                           launched.append, timer=timer)
    assert (best.BLOCK_V_FWD, best.num_warps) == (4096, 4)
    assert launched == timed and len(timed) == len(tuning.candidates(
        "token_stats", "forward", tuning.config_for_arch("token_stats", "sm_90")))
    # Same bucket (N 8000 and 8192): cached, nothing timed again; another bucket is timed.
    n_timed = len(timed)
    assert tuning.autotune("token_stats", "forward", cuda, {"N": 8192, "V": 150000},
                           launched.append, timer=timer) is best
    assert len(timed) == n_timed
    tuning.autotune("token_stats", "forward", cuda, {"N": 100, "V": 151936}, launched.append,
                    timer=timer)
    assert len(timed) == 2 * n_timed


def test_autotune_skips_failing_candidates_and_raises_if_all_fail(monkeypatch, caplog):
    _fake_cuda(monkeypatch, (9, 0))
    cuda = torch.device("cuda", 0)

    def timer(launch, cfg):
        if cfg.BLOCK_N == 128:
            raise RuntimeError("out of resources: shared memory")
        return cfg.num_stages

    best = tuning.autotune("linear_token_stats", "forward", cuda, {"N": 64}, lambda c: None,
                           timer=timer)
    assert best.BLOCK_N == 64 and best.num_stages == 2
    assert "out of resources" in caplog.text

    def broken(launch, cfg):
        raise RuntimeError("no kernel image")

    with pytest.raises(RuntimeError, match="every candidate failed"):
        tuning.autotune("linear_token_stats", "backward", cuda, {"N": 64}, lambda c: None,
                        timer=broken)


def test_choose_autotunes_only_on_request_and_only_on_cuda(monkeypatch):
    calls = []

    def launch(cfg):
        calls.append(cfg)

    monkeypatch.delenv("NASHKERN_AUTOTUNE", raising=False)
    _fake_cuda(monkeypatch, (9, 0))
    cuda = torch.device("cuda", 0)
    assert tuning.choose("mixture_sample", "forward", cuda, {"B": 8}, launch) is \
        tuning.config_for("mixture_sample", cuda)
    monkeypatch.setenv("NASHKERN_AUTOTUNE", "1")
    assert tuning.choose("mixture_sample", "forward", torch.device("cpu"), {"B": 8}, launch) is \
        tuning.config_for("mixture_sample")
    assert calls == []
    monkeypatch.setattr(tuning, "cuda_event_timer", lambda launch, cfg: (launch(cfg),
                                                                         cfg.BLOCK_V)[1])
    best = tuning.choose("mixture_sample", "forward", cuda, {"B": 8}, launch)
    assert best.BLOCK_V == 2048 and len(calls) >= 2


@pytest.mark.parametrize("op", ["token_stats", "linear_token_stats", "mixture_sample"])
def test_every_triton_launch_goes_through_choose(monkeypatch, op):
    """NASHKERN_AUTOTUNE reaches the kernels: every Triton forward and backward of the ops asks
    ``tuning.choose`` for its config (with a launch callable that runs the kernel with a given
    config), here on the interpreter with a stand-in that runs each launch once."""
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    from nashkern import ops

    asked = []

    def choose(kernel, launch_name, device, dims, launch):
        cfg = tuning.config_for(kernel, device)
        launch(cfg)  # a candidate launch must run
        asked.append((kernel, launch_name, tuple(sorted(dims))))
        return cfg

    monkeypatch.setattr(tuning, "choose", choose)
    z = torch.randn(3, 37, requires_grad=True)
    if op == "token_stats":
        ops.token_stats(z, torch.tensor([1, 2, 3]), backend="triton").logprobs.sum().backward()
        want = [("token_stats", "forward", ("N", "V")), ("token_stats", "backward", ("N", "V"))]
    elif op == "linear_token_stats":
        h, w = torch.randn(3, 16, requires_grad=True), torch.randn(37, 16, requires_grad=True)
        ops.linear_token_stats(h, w, torch.tensor([1, 2, 3]), backend="triton",
                               strategy="fused").logprobs.sum().backward()
        want = [("linear_token_stats", "forward", ("D", "N", "V")),
                ("linear_token_stats", "backward", ("D", "N", "V"))]
    else:
        ops.mixture_sample(z.detach(), z.detach(), coef=0.5, backend="triton")
        want = [("mixture_sample", "forward", ("N", "V"))]
    assert asked == want
