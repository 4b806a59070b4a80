"""Sharded engines through `accelerate launch` on the CPU (2 processes, gloo): FSDP1, FSDP2,
DeepSpeed ZeRO-3 (stage3_param_persistence_threshold=0: no weight kept whole), and DDP. One
launch runs every check of tests/rl/sharded_worker.py for every engine, one after the other
(a launch costs ~15-25 s of start-up alone: _launched_engines), in float32 and in bf16 mixed
precision (the configs' default bf16=True), with a LoRA step on FSDP2 and ZeRO-3, and skip mode
under ZeRO-3.

Compared with one process on the same data (the 4 prompts of both ranks in one batch, the same
initial models, greedy samples, one SGD step at lr 1 so that the update is the gradient):
the logged loss and metrics, the updated parameters, and completion_stats after the step.
Tolerance: float32 with a different reduction order (the gradient reduced as a mean of two
half-batch means instead of one mean; the prompts left-padded to a different width). Measured
here (FSDP1, ZeRO-3): the logged loss equal, the parameter updates within 1.4e-7 (largest update
1.17), completion_stats within 1e-6 (values ~4). rtol 1e-4 / atol 1e-6 (stats: 1e-5) leaves
margin and stays far below any real error (a missing or doubled gradient reduction is a factor
of 2, a reference that is not the given one shows in every log-prob).
"""
import json
import math
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

HERE = os.path.dirname(__file__)
#: bf16 mixed precision against one process in bf16 (CPU autocast): the engine rounds other
#: intermediates to bf16 (FSDP's bf16 parameters / reduce dtype, DDP's half-batch reductions;
#: DeepSpeed's bf16 is no autocast but the whole model in bf16 with fp32 master weights, so the
#: updated weights come back rounded to bf16). Measured here (FSDP1, FSDP2, DDP, ZeRO-3): the
#: logged loss within 1.1e-3 relative (ZeRO-3 8.7e-4; KL 4.2e-4, log-probs 4e-5), the parameter
#: updates within 4.1e-3 of the largest update (1.17; ZeRO-3 4.05e-3, DDP 8.4e-4).
#: Tolerances: 2 bf16 epsilons (2 * 2^-8) relative on the logs, 4 epsilons of the largest update
#: on the updates: margin over the measured values, and still far below a missing or doubled
#: gradient reduction (a factor of 2) or a reference that is not the given one (every log-prob).
BF16_RTOL, BF16_ATOL = 2 * 2.0 ** -8, 1e-3
BF16_UPDATE_ATOL = 4 * 2.0 ** -8
#: s; a deadlocked generation fails the test instead of hanging CI (the launch of all four
#: engines took 94 s at load 7.9 on this 2-core machine)
LAUNCH_TIMEOUT = 600


def _launch(engine, out, worker="sharded_worker.py"):
    with socket.socket() as s:  # a free port, so parallel runs cannot collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               DS_ACCELERATOR="cpu")
    # --multi_gpu: accelerate's torch.distributed launcher (MULTI_CPU + gloo without CUDA); the
    # worker forces the engine itself (see force_engine there).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(port),
           os.path.join(HERE, worker), *([engine] if engine else []), str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
        log, _ = proc.communicate()
        pytest.fail(f"{engine}: no result after {LAUNCH_TIMEOUT} s (a generation deadlock?)\n"
                    + log[-3000:])
    errors = [line for line in log.splitlines() if "Error" in line and "rank" in line]
    assert proc.returncode == 0, "\n".join(errors[:20]) + "\n" + log[-3000:]


def _launched_engines() -> str:
    """All engines' checks run in one launch, one engine after the other in the same two
    processes: a launch's start-up is most of its cost (measured here: the two workers import
    torch, transformers, datasets, peft for ~7 s CPU each, the launcher accelerate for ~2 s,
    against ~5 s of training per engine). DDP first (no plugin: no forced FSDP state can leak
    into it; each run asserts the engine it got), ZeRO-3 last (DeepSpeed's communication is set
    up just before it), each skipped where its test is (no peft: FSDP2, ZeRO-3; no
    deepspeed: ZeRO-3)."""
    import importlib.util

    names = ["ddp", "fsdp1"]
    if importlib.util.find_spec("peft") is not None:
        names.append("fsdp2")
        if importlib.util.find_spec("deepspeed") is not None:
            names.append("zero3")
    return "+".join(names)


@pytest.fixture(scope="module")
def engine_results(tmp_path_factory):
    """``get(engine) -> (result, params, params_bf16)``: the worker's output for ``engine``,
    from one launch of every engine (:func:`_launched_engines`) at the first call."""
    done = {}

    def get(engine):
        if not done:
            done["out"] = tmp_path_factory.mktemp("engines")
            _launch(_launched_engines(), done["out"])
        out = done["out"]
        res = json.loads((out / f"result_{engine}.json").read_text())
        if (out / f"params_skip_{engine}.pt").exists():
            res["params_skip"] = torch.load(out / f"params_skip_{engine}.pt")
        return res, torch.load(out / f"params_{engine}.pt"), \
            torch.load(out / f"params_bf16_{engine}.pt")

    return get


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same step in one process, no engine: logs, parameters before / after, stats."""
    from sharded_worker import EQUIVALENCE, STATS_CONTEXT, make_trainer, stats_inputs

    from nashkern import NashMDTrainer
    from nashkern.rl.completion_stats import completion_stats

    out = tmp_path_factory.mktemp("one_process")
    tr = make_trainer(NashMDTrainer, None, str(out), ref=True, per_device_train_batch_size=4,
                      **EQUIVALENCE)
    before = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
    tr.train()
    with torch.no_grad():
        st = completion_stats(tr.model, *stats_inputs(tr.processing_class), STATS_CONTEXT,
                              ref_model=tr.ref_model)
    bf16 = make_trainer(NashMDTrainer, None, str(out), ref=True, per_device_train_batch_size=4,
                        bf16=True, **EQUIVALENCE)
    bf16.train()
    return dict(logs=[h for h in tr.state.log_history if "loss/kl" in h], before=before,
                after={k: v.detach().clone() for k, v in tr.model.state_dict().items()},
                stats={k: getattr(st, k) for k in ("logprobs", "ref_logprobs", "kl", "entropy")},
                bf16_logs=[h for h in bf16.state.log_history if "loss/kl" in h],
                bf16_after={k: v.detach().clone() for k, v in bf16.model.state_dict().items()})


@pytest.mark.parametrize("engine", ["fsdp2", "fsdp1", "zero3", "ddp"])
def test_sharded_engine_matches_one_process(engine, engine_results, one_process):
    if engine == "zero3":
        pytest.importorskip("deepspeed", reason="ZeRO-3 needs deepspeed (make install has it)")
    if engine in ("fsdp2", "zero3"):
        pytest.importorskip("peft", reason="the LoRA step needs peft (make install has it)")
    res, params, params_bf16 = engine_results(engine)
    # the engine really ran (accelerate on the CPU would silently fall back to DDP)
    ref_engine = "single" if engine == "ddp" else engine  # DDP: the frozen reference as is
    assert res["world"] == 2 and res["engine"] == engine and res["ref_engine"] == ref_engine
    # the fused head ran, nothing fell back
    assert res["fused"] and res["fallback_warnings"] == []
    # the same loss and metrics as one process on the same data
    base = one_process["logs"][0]
    got = res["logs"][0]
    for k in ("loss", "loss/kl", "loss/score", "logps/chosen", "logps/rejected",
              "rewards/probabilities"):
        assert got[k] == pytest.approx(base[k], rel=1e-4, abs=1e-6), k
    assert base["loss/score"] != 0  # the step has a preference signal, not only the KL term
    # the same update (SGD at lr 1: the averaged gradient)
    before, after = one_process["before"], one_process["after"]
    assert params.keys() == after.keys()
    for k in after:
        torch.testing.assert_close(params[k] - before[k], after[k] - before[k], rtol=1e-4,
                                   atol=1e-6, msg=lambda m: f"{k}: {m}")
    # completion_stats through the engine = one process, on every rank
    for rank_stats in res["stats"]:
        for k, v in one_process["stats"].items():
            torch.testing.assert_close(torch.tensor(rank_stats[k]), v, rtol=1e-4, atol=1e-5)
    _check_bf16(engine, res["bf16"], params_bf16, one_process)
    if engine == "zero3":
        _check_skip_mode(res["skip"], res["params_skip"], one_process["before"])
    if engine == "ddp":
        return  # the rest is about sharded generation and a sharded reference
    # the regression run: ranks finished their generations at different steps (unsynchronised
    # stepping deadlocked there), and every step completed
    lengths = res["lengths"]
    assert any(a != b for a, b in zip(*lengths)), lengths
    assert res["steps"] == {"NashMDTrainer": 1, "XPOTrainer": 1}
    # the default reference is the policy's copy (KL 0 at the first step; under ZeRO-3 copied
    # shard by shard from the zero.Init policy) and sharded: this rank holds about half of it
    assert res["first_kl"] == pytest.approx(0.0, abs=1e-6)
    assert res["ref_local_numel"] < 0.6 * res["full_numel"]


def _check_bf16(engine, res, params, one_process):
    """bf16 mixed precision (the configs' default bf16=True, CPU autocast / the engine's bf16
    policy) through the engine: the equivalence step and an XPO step ran fused on the engine,
    and the step matches one process in bf16 within bf16 tolerance (see BF16_* below); on FSDP2
    and ZeRO-3 the LoRA step trained the adapters against the base model as the reference."""
    assert res["mixed_precision"] == "bf16" and res["engine"] == engine
    assert res["fused"] and res["xpo_steps"] == 1 and math.isfinite(res["xpo_loss"])
    got = res["logs"][0]
    assert all(math.isfinite(got[k]) for k in ("loss", "loss/kl", "loss/score")), got
    base = one_process["bf16_logs"][0]
    for k in ("loss", "loss/kl", "loss/score", "logps/chosen", "logps/rejected",
              "rewards/probabilities"):
        assert got[k] == pytest.approx(base[k], rel=BF16_RTOL, abs=BF16_ATOL), k
    before, after = one_process["before"], one_process["bf16_after"]
    scale = max(float((after[k] - before[k]).abs().max()) for k in after)
    for k in after:
        torch.testing.assert_close(params[k] - before[k], after[k] - before[k],
                                   rtol=BF16_RTOL, atol=BF16_UPDATE_ATOL * scale,
                                   msg=lambda m: f"bf16 {k}: {m}")
    if engine in ("fsdp2", "zero3"):
        peft = res["peft"]
        assert peft["engine"] == engine and peft["is_peft"] and peft["ref_is_base"], peft
        assert peft["steps"] == 1 and math.isfinite(peft["loss"]), peft
        # LoRA B starts at 0: the policy is the base model, so the reference (the base with the
        # adapters disabled) gives KL 0 at the first step
        assert peft["first_kl"] == pytest.approx(0.0, abs=1e-6), peft
        assert peft["lora_local"] > 0 and peft["lora_moved"] > 0, peft


def _check_skip_mode(res, params, before):
    """ZeRO-3, nonfinite_scores="skip": each rank's second micro-batch had every prompt dropped;
    the update and the logged loss equal the step without those micro-batches (accumulation 1):
    the engine's gradient was rescaled between its backward and its step, and the loss was not
    divided by the accumulation steps twice (either is a factor of 2: float32 tolerance as
    above). ZeRO-2 refuses skip mode at construction."""
    plain, dropped = res["plain"], res["dropped"]
    # per micro-batch, summed over the ranks (0, then 2 + 2), averaged over the 2 micro-batches
    assert dropped["nonfinite"] == pytest.approx(2.0)
    assert plain["nonfinite"] == 0.0
    # the Trainer's loss log (rounded to 4 digits by transformers) and the loss/* metrics
    assert abs(plain["loss"]) > 1e-2, plain
    assert dropped["loss"] == pytest.approx(plain["loss"], rel=1e-4, abs=2e-4)
    assert dropped["loss_score"] == pytest.approx(plain["loss_score"], rel=1e-4, abs=1e-6)
    ref, got = params["plain"], params["dropped"]
    assert ref.keys() == got.keys() == before.keys()
    assert max(float((ref[k] - before[k]).abs().max()) for k in ref) > 0.1  # a real update
    for k in ref:
        torch.testing.assert_close(got[k] - before[k], ref[k] - before[k], rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"skip mode {k}: {m}")
    assert "nonfinite_scores='skip' is not supported under DeepSpeed ZeRO stage 2" \
        in res["zero2_error"], res["zero2_error"]


def test_single_process_engine_helpers():
    """Without a process group: nothing is synchronised or sharded, the reference copy is a
    deep copy, and synced generation draws exactly what unsynced generation draws."""
    from nashkern.apps.tiny import tiny_causal_lm
    from nashkern.rl import engines
    from nashkern.rl.generation import SamplingParams, generate

    model = tiny_causal_lm()
    assert engines.engine_of(model) == "single" and engines.inner_module(model) is model
    assert not engines.needs_synced_generation(model) and engines.all_ranks_done(True, True, "cpu")
    ref = engines.copy_reference(model)
    assert ref is not model and all(torch.equal(a, b) for a, b in
                                    zip(ref.parameters(), model.parameters()))
    ids = torch.randint(5, 40, (2, 5))
    kw = dict(eos_token_id=1, pad_token_id=0, params=SamplingParams(max_new_tokens=5))
    outs = [generate(model, ids, torch.ones_like(ids), generator=torch.Generator().manual_seed(0),
                     synced_gpus=synced, gather_context=lambda: engines.generation_context(model),
                     **kw)
            for synced in (False, True)]
    assert torch.equal(outs[0].completion_ids, outs[1].completion_ids)


def test_vocab_parallel_linear_token_stats(tmp_path):
    """ops.linear_token_stats(..., process_group=...) on 2 processes, each holding its rows of an
    odd vocabulary (37 = 19 + 18), one launch for every case of vocab_parallel_worker.CASES
    (logprobs only; + entropy; entropy without targets; + reference log-probs and KL; the
    mixture at coef 0.3, 0 and 1; the reference on the policy's head; softcap, temperature,
    bias with a -inf column per shard, a shard with no finite logit; bf16 inputs; an ignored row,
    a target in each shard), against the float64 oracle on the full head: every statistic, the gradients of
    the hidden states (all-reduced) and of each rank's weight / bias rows (and the reference's
    when it is trainable); and against the unsharded op on the same float32 head. float32
    tolerance: 1e-5 relative to the largest value (measured: within 2.4e-6 at values up to 11;
    a missing shard or rescale is off by O(1)). A NaN hidden row stays in its row; N = 0."""
    from vocab_parallel_worker import CASES

    _launch(None, tmp_path, worker="vocab_parallel_worker.py")
    res = json.loads((tmp_path / "vocab_parallel.json").read_text())
    assert res["world"] == 2
    for rank_res in res["ranks"]:
        for name in CASES:
            err, scale = rank_res[name]["err"], rank_res[name]["scale"]
            want = {"d_hidden", "d_weight"} | ({"d_bias"} if CASES[name].get("bias", True)
                                               else set())
            if CASES[name].get("ref_grad"):
                want |= {"d_ref_hidden", "d_ref_weight", "d_ref_bias"}
            assert want <= set(err), (name, sorted(err))
            for k, e in err.items():
                # bf16 gradients: rounded once to bf16 (2^-8 relative)
                tol = 8e-3 if k.startswith("d_") and "dtype" in CASES[name] else 1e-5
                assert e <= tol * max(1.0, scale[k.replace("_vs_unsharded", "")]), (name, k, e)
        nan = rank_res["nan_row"]
        for k in ("logprobs", "entropy", "kl"):
            assert nan[f"{k}_nan_in_row"] and nan[f"{k}_others_equal"], (k, nan)
        assert not nan["ref_logprobs_nan_in_row"] and nan["ref_logprobs_others_equal"], nan
        assert rank_res["empty"] == {"shape": [0], "d_hidden": [0, 16], "d_weight_zero": True}
    # ranks passing different N: a nashkern error on both ranks, the group usable afterwards
    for rank, rank_res in enumerate(res["ranks"]):
        diff = rank_res["different_tokens"]
        assert "every rank must pass the same tokens" in diff["message"], diff
        assert f"N = {rank + 2} on rank {rank}" in diff["message"], diff
        assert "the ranks passed N = [2, 3]" in diff["message"], diff
        assert diff["after_shape"] == [3], diff


def _head(V=7, D=4, N=3):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(N, D, generator=g), torch.randn(V, D, generator=g),
            torch.randint(0, V, (N,), generator=g))


def test_vocab_parallel_argument_errors(world_of_one):
    """The checks of ops.linear_token_stats hold with a process_group, the targets' range is
    the global vocabulary, and what only torch / Triton implement says so; a group of one
    process is the unsharded op."""
    from nashkern import ops

    h, w, t = _head()
    group = world_of_one
    st = ops.linear_token_stats(h, w, t, process_group=group)
    full = ops.linear_token_stats(h, w, t)
    torch.testing.assert_close(st.logprobs, full.logprobs)
    with pytest.raises(ValueError, match="only torch(, triton)? implement the vocabulary-"):
        ops.linear_token_stats(h, w, t, backend="cuda", process_group=group)
    with pytest.raises(ValueError, match="strategy='chunked' with a process_group"):
        ops.linear_token_stats(h, w, t, strategy="chunked", process_group=group)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 7\)"):
        ops.linear_token_stats(h, w, torch.tensor([0, 7, 1]), process_group=group)
    with pytest.raises(ValueError, match="ref_weight must have the vocabulary size of weight "
                                         r"\(this rank's shard\) \(7\)"):
        ops.linear_token_stats(h, w, t, ref_hidden=h, ref_weight=w[:5], process_group=group)
    with pytest.raises(ValueError, match="hidden's last dim"):
        ops.linear_token_stats(h[:, :3], w, t, process_group=group)
    with pytest.raises(ValueError, match="coef was given but ref_hidden is None"):
        ops.linear_token_stats(h, w, t, coef=0.5, process_group=group)


def test_vocab_parallel_needs_an_initialised_group():
    from nashkern import ops

    h, w, t = _head()
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        ops.linear_token_stats(h, w, t, process_group=object())


def test_vocab_parallel_never_allocates_tokens_x_vocab(world_of_one):
    """The vocabulary-parallel path streams its shard in the torch backend's tiles: nothing of
    N x V_r elements, forward or backward (the allocation recorder, nashkern/memory.py)."""
    from nashkern import ops
    from nashkern.memory import AllocationRecorder

    N, V, D = 1024, 8192, 8
    h, w, t = _head(V, D, N)
    h.requires_grad_(), w.requires_grad_()
    with AllocationRecorder() as rec:
        s = ops.linear_token_stats(h, w, t, ref_hidden=h.detach(), coef=0.5,
                                   process_group=world_of_one)
        (s.logprobs.sum() + s.entropy.sum() + s.kl.sum() + s.mixture_logprobs.sum()).backward()
    largest, op = rec.largest()
    # a 512 x 2048 float32 tile is N*V/8 here (and the largest: the recorder saw the tiles);
    # the fp32 dW accumulator V x D is far below
    assert N * V // 64 <= largest <= N * V // 8, f"{op} allocated {largest} elements (N*V = {N * V})"
    assert len(rec.sizes) > 100  # the recorder saw the backend's ops
