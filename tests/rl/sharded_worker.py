"""Run by tests/rl/test_sharded.py under `accelerate launch` (2 CPU processes, gloo):
``python sharded_worker.py ENGINES OUT_DIR`` with ENGINES one of ddp, fsdp1, fsdp2, zero3 or
several joined by "+" (test_sharded launches "ddp+fsdp1+fsdp2+zero3": one start-up for all).

Each engine gets all of these checks, one engine after the other in the same processes (a
launch costs ~15-25 s of start-up):
  1. one Nash-MD step with an explicit reference, greedy generation (top_k=1: the samples do not
     depend on the per-rank generator) and SGD, ranks holding different prompts: the loss, the
     updated parameters and completion_stats after the step are written for the test to compare
     with one process on the same data;
  2. the regression: different prompts per rank, long sampled generations (ranks finish at
     different steps; FSDP1 here with use_orig_params=True), the default reference (a copy of the policy: under ZeRO-3 of a
     zero.Init-ialised policy), 1 Nash-MD step and 1 XPO step; the reference must be sharded;
  3. bf16 mixed precision (``bf16=True``, TRL's default; CPU autocast and the engine's bf16
     policy): the equivalence step of 1. again (compared with one process in bf16), 1 XPO step
     with the default reference (the mixture / reference generation under the engine's bf16
     units crashed on FSDP1); on FSDP2 and ZeRO-3 also a LoRA (PEFT) Nash-MD step, the
     reference being the base model with the adapters disabled;
  4. ZeRO-3 only: ``nonfinite_scores="skip"`` with an all-dropped micro-batch per rank
     (:func:`skip_mode_run`), and ZeRO-2 refusing skip mode at construction;
  5. no fallback warning, the fused head used (``_nashkern_separable``) in every run.

ENGINE ``ddp``: no plugin (accelerate's MULTI_CPU DDP), the same checks.
"""
import faulthandler
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
from datasets import Dataset

sys.path.insert(0, os.path.dirname(__file__))
from nashkern import NashMDConfig, NashMDTrainer, XPOConfig, XPOTrainer  # noqa: E402
from nashkern.apps.tiny import make_tokenizer, tiny_causal_lm  # noqa: E402
from nashkern.rl import engines  # noqa: E402

PROMPTS = ["hi", "the quick brown fox", "a", "one two three four five"]


def in_order(Trainer, prompts=PROMPTS, **kw):
    """``Trainer(**kw)`` with the tiny tokenizer and ``prompts`` (:data:`PROMPTS`) read in order:
    with 2 prompts per device, rank r gets batches r, r + 2, ... (prompts [2r, 2r + 1] of
    PROMPTS: the halves of one process's batch)."""
    class Sequential(Trainer):
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    return Sequential(processing_class=make_tokenizer(),
                      train_dataset=Dataset.from_dict({"prompt": list(prompts)}), **kw)


def start_worker(timeout_s: float) -> None:
    """One thread per process; a deadlock prints every thread's stack and exits after
    ``timeout_s`` (or NASHKERN_WORKER_TIMEOUT) instead of waiting for the test's timeout."""
    faulthandler.dump_traceback_later(float(os.environ.get("NASHKERN_WORKER_TIMEOUT", timeout_s)),
                                      exit=True)
    torch.set_num_threads(1)


def reward(prompts, completions, completion_ids=None, **kw):
    return [float(sum(map(ord, c)) % 13) for c in completions]


# the equivalence step: greedy (top_k=1), SGD at lr 1 (the update is the gradient), no clipping
EQUIVALENCE = dict(max_steps=1, max_new_tokens=6, top_k=1, mixture_coef=0.9, optim="sgd",
                   learning_rate=1.0, max_grad_norm=0.0, lr_scheduler_type="constant")
STATS_TEXTS, STATS_CONTEXT = ["hello world", "ab cd ef"], 3


def stats_inputs(tok):
    ids = tok(STATS_TEXTS, return_tensors="pt", padding=True).input_ids
    return ids, torch.ones_like(ids)


def engine_args(engine, orig_params=False):
    """TrainingArguments fields selecting ``engine`` (None: one process, no engine); FSDP1 with
    flat parameters, or with ``orig_params`` (use_orig_params=True: outside the forward the head
    is a 1-D shard)."""
    if engine in (None, "ddp"):  # ddp: accelerate's own MULTI_CPU set-up (no plugin)
        return {}
    if engine == "zero2":  # only constructed (skip_mode_run: refused at construction)
        return dict(deepspeed={"zero_optimization": {"stage": 2},
                               "train_micro_batch_size_per_gpu": "auto",
                               "gradient_accumulation_steps": "auto"})
    if engine == "zero3":
        return dict(deepspeed={
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                  "stage3_gather_16bit_weights_on_model_save": True},
            "zero_allow_untested_optimizer": True, "gradient_clipping": "auto",
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto"})
    # reshard_after_forward=True on every unit, the root included: the head is gathered only
    # inside the root's forward (FSDP1: FULL_SHARD; flat parameters, use_orig_params=False).
    version = 2 if engine == "fsdp2" else 1
    cfg = {"version": version, "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"],
           "reshard_after_forward": True if version == 2 else "FULL_SHARD"}
    if version == 1:
        # sync_module_states needs an accelerator device in accelerate's plugin (the ranks
        # build the same seeded weights here anyway)
        cfg.update(use_orig_params=orig_params, sync_module_states=False)
    return dict(fsdp="full_shard auto_wrap", fsdp_config=cfg)


def force_engine():
    """accelerate 1.15 on the CPU does not set the engine up: with an FSDP plugin the state stays
    MULTI_CPU (the plugin is dropped and the model wrapped in DDP), and DeepSpeed is only taken
    when not ``cpu`` (and then reports num_processes=1). The engine is forced after
    AcceleratorState's own set-up: the distributed type and the plugin it was given."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def forced(self, *a, fsdp_plugin=None, deepspeed_plugin=None, **kw):
        init(self, *a, fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin, **kw)
        if self.distributed_type != DistributedType.MULTI_CPU:
            return
        if fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":  # what accelerate does on an accelerator
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            # FSDP1 compares its compute device "cpu" with accelerate's indexed "cpu:0"
            self.device = PartialState().device = torch.device("cpu")
        elif deepspeed_plugin is not None:
            self.distributed_type = DistributedType.DEEPSPEED
            deepspeed_plugin.set_mixed_precision(str(self.mixed_precision))
            deepspeed_plugin.select(_from_accelerator_state=True)
            self.deepspeed_plugins = deepspeed_plugin
        # as accelerate's own set-up ends: every later AcceleratorState() (e.g. the autocast
        # set-up of a bf16 run inside prepare_model) copies PartialState's fields back
        PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = forced


def make_trainer(cls, engine, out, *, ref=None, orig_params=False, bf16=False, peft=False,
                 prompts=PROMPTS, reward_funcs=reward, **kw):
    """With ``ref``: the models are built before the config (full weights, the same as one
    process: under ZeRO-3 the engine partitions them), untied heads (a tied tiny model greedily
    repeats its last token, policy and reference alike) and a distinct reference. Without: the
    default reference, and the policy built after the config (under ZeRO-3 by zero.Init, with
    empty placeholder parameters)."""
    config_cls = XPOConfig if cls is XPOTrainer else NashMDConfig
    if ref:
        # full weights even after an earlier ZeRO-3 run of this launch: a ZeRO-3
        # TrainingArguments still alive (an earlier trainer's) keeps transformers'
        # is_deepspeed_zero3_enabled() on, and from_config then builds the model under
        # zero.Init, with other initial weights than one process's (measured: the bf16
        # equivalence step, run after section 2, sampled other completions: loss 0.396 against
        # 0.638). The config made below sets its own again.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        policy = tiny_causal_lm(seed=0, tie_word_embeddings=False)
        ref_model = tiny_causal_lm(seed=1, tie_word_embeddings=False)
    # float32 without activation checkpointing (the configs default to TRL's bf16 + checkpointing):
    # the comparison with one process is about the engines, at float32 reduction-order tolerance
    args = config_cls(output_dir=out, report_to="none", save_strategy="no", use_cpu=True,
                      bf16=bf16, gradient_checkpointing=False,
                      disable_tqdm=True, seed=0, logging_steps=1,
                      **({} if engine is None else {"ddp_backend": "gloo"}),
                      **engine_args(engine, orig_params), **kw)
    # set the devices up now (TrainingArguments._setup_devices resets accelerate's state): with
    # bf16 it otherwise first runs inside train(), after the forced engine state was made
    assert args.device is not None
    if not ref:
        policy, ref_model = tiny_causal_lm(seed=0), None
    # the models were built as the docstring says (whole before the config, or zero.Init-ed
    # after a ZeRO-3 config)
    assert any(hasattr(p, "ds_id") for p in policy.parameters()) == (engine == "zero3"
                                                                      and not ref), engine

    peft_config = None
    if peft:  # LoRA on the attention projections; the reference is the base (adapters off)
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "v_proj"])
    return in_order(cls, prompts, model=policy, ref_model=ref_model, reward_funcs=reward_funcs,
                    args=args, peft_config=peft_config)


def _local(p):
    """This rank's values of parameter ``p`` (ZeRO-3 partition, FSDP2 DTensor shard, or p)."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor
    return p.to_local() if hasattr(p, "to_local") else p


def local_numel(model):
    """Elements of the model's parameters this rank holds."""
    wrapper = engines.wrapper_of(model)
    if isinstance(wrapper, torch.distributed.fsdp.FullyShardedDataParallel):
        return sum(p.numel() for p in wrapper.parameters())
    total = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            total += p.ds_tensor.numel()
        elif hasattr(p, "to_local"):
            total += p.to_local().numel()
        else:
            total += p.numel()
    return total


def full_params(tr):
    """The full parameters after the step (a collective; every rank calls it)."""
    wrapper = tr.model_wrapped
    FSDP = torch.distributed.fsdp.FullyShardedDataParallel
    if isinstance(wrapper, FSDP):
        with FSDP.summon_full_params(wrapper, writeback=False):
            return {k.replace("_fsdp_wrapped_module.", ""): v.detach().float().clone()
                    for k, v in wrapper.named_parameters()}
    sd = tr.accelerator.get_state_dict(wrapper)
    if sd is None:  # not the main process
        return None
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sd.items()}
    return {k: v.detach().float().cpu().clone() for k, v in full.items()}


def regression(engine, out, result):
    """Section 2 of main: fills result's steps, first_kl, ref_local_numel, full_numel, lengths
    and ANDs the runs' fused flags into result["fused"]."""
    import nashkern.rl.generation as generation

    lengths = []
    real_generate_pair = generation.generate_pair

    def recording_generate_pair(*a, **k):
        outputs = real_generate_pair(*a, **k)  # both samples of the step, one loop
        for o in outputs:
            lengths.append(int(o.completion_mask.sum(1).max()))  # this rank's own length
        return outputs

    import nashkern.rl.nash_md as nash_md
    import nashkern.rl.xpo as xpo
    nash_md.generate_pair = xpo.generate_pair = recording_generate_pair
    steps = {}
    for cls, n in ((NashMDTrainer, 1), (XPOTrainer, 1)):
        t2 = make_trainer(cls, engine, out, per_device_train_batch_size=1, max_steps=n,
                          max_new_tokens=32, temperature=2.0, learning_rate=1e-2,
                          orig_params=True)
        t2.train()
        result["fused"] = result["fused"] and bool(getattr(
            engines.inner_module(t2.model_wrapped), "_nashkern_separable", False))
        steps[cls.__name__] = t2.state.global_step
        # the default reference is the policy's copy (under ZeRO-3 copied shard by shard)
        if cls is NashMDTrainer:
            result["first_kl"] = [h for h in t2.state.log_history
                                  if "loss/kl" in h][0]["loss/kl"]
        result.setdefault("ref_local_numel", local_numel(t2.ref_model))
    result["steps"] = steps
    result["full_numel"] = sum(getattr(p, "ds_numel", p.numel())
                               for p in tiny_causal_lm().parameters())
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, lengths)
    result["lengths"] = gathered


def mixed_precision_run(engine, out):
    """Section 3 of main (see the module docstring): bf16 runs, every engine; PEFT on FSDP2 and
    ZeRO-3. Returns what the test compares (the bf16 equivalence step's logs and parameters)."""
    res = {}
    tr = make_trainer(NashMDTrainer, engine, out, ref=True, per_device_train_batch_size=2,
                      bf16=True, **EQUIVALENCE)
    tr.train()
    res["mixed_precision"] = str(tr.accelerator.mixed_precision)
    res["engine"] = engines.engine_of(tr.model_wrapped)
    res["logs"] = [h for h in tr.state.log_history if "loss/kl" in h]
    res["fused"] = bool(getattr(engines.inner_module(tr.model_wrapped), "_nashkern_separable",
                                False))
    res["params"] = full_params(tr)
    t2 = make_trainer(XPOTrainer, engine, out, per_device_train_batch_size=1, max_steps=1,
                      max_new_tokens=8, temperature=2.0, learning_rate=1e-2, bf16=True)
    t2.train()
    res["xpo_steps"] = t2.state.global_step
    res["xpo_loss"] = [h for h in t2.state.log_history if "loss/dpo" in h][0]["loss"]
    res["fused"] = res["fused"] and bool(getattr(engines.inner_module(t2.model_wrapped),
                                                 "_nashkern_separable", False))
    if engine in ("fsdp2", "zero3"):
        t3 = make_trainer(NashMDTrainer, engine, out, per_device_train_batch_size=1,
                          max_steps=1, max_new_tokens=8, temperature=2.0, learning_rate=1e-1,
                          bf16=True, peft=True)
        def lora_shards():  # this rank's piece of every LoRA B matrix (zero at the start)
            return {n: _local(p).detach().float().clone()
                    for n, p in t3.model.named_parameters() if "lora_B" in n}

        lora = lora_shards()
        t3.train()
        log = [h for h in t3.state.log_history if "loss/kl" in h][0]
        moved = [n for n, v in lora_shards().items() if v.numel() and not torch.equal(v, lora[n])]
        res["peft"] = dict(steps=t3.state.global_step, first_kl=log["loss/kl"],
                           loss=log["loss"], is_peft=bool(t3.is_peft),
                           ref_is_base=t3.ref_model is None,
                           lora_local=len(lora), lora_moved=len(moved),
                           engine=engines.engine_of(t3.model_wrapped))
    return res


#: skip_mode_run's prompts whose rewards are NaN (nonfinite_scores="skip" drops them)
DROPPED = ["xyz", "count 1 2 3", "zz top", "qq"]


def dropped_nan_reward(prompts, completions, completion_ids=None, **kw):
    return [float("nan") if p in DROPPED else r
            for p, r in zip(prompts, reward(prompts, completions))]


def skip_mode_run(engine, out):
    """nonfinite_scores="skip" with 2 micro-batches per step, each rank's second one having
    every prompt dropped (the dataset PROMPTS + DROPPED read in order: rank r gets PROMPTS'
    [2r, 2r + 1], then DROPPED's), against the same step without the dropped micro-batches
    (accumulation 1, PROMPTS): the update (SGD at lr 1: the gradient) and the logged loss must
    be the same. Under DeepSpeed this also checks the accumulation scaling (the engine's
    backward must not divide the loss by the accumulation steps again). ZeRO-3 only: ZeRO 0-2
    refuses skip mode at construction (the message is returned)."""
    res = {}
    for name, prompts, accumulation in (("plain", PROMPTS, 1),
                                        ("dropped", PROMPTS + DROPPED, 2)):
        tr = make_trainer(NashMDTrainer, engine, out, ref=True, per_device_train_batch_size=2,
                          prompts=prompts, reward_funcs=dropped_nan_reward,
                          nonfinite_scores="skip", gradient_accumulation_steps=accumulation,
                          **EQUIVALENCE)
        tr.train()
        log = [h for h in tr.state.log_history if "loss/kl" in h][0]
        res[name] = dict(loss=log["loss"], loss_score=log["loss/score"],
                         nonfinite=log.get("scores/nonfinite_count", 0.0),
                         params=full_params(tr))
    if engine == "zero3":
        try:
            make_trainer(NashMDTrainer, "zero2", out, nonfinite_scores="skip", max_steps=1)
            res["zero2_error"] = None
        except ValueError as e:
            res["zero2_error"] = str(e)
    return res


def main(engine_list, out):
    """Every check of each engine of ``engine_list`` ("fsdp2", or several joined by "+", e.g.
    "ddp+fsdp1": one launch's start-up, ~2/3 of a launch's CPU time, shared), one after the
    other; the results of ENGINE in OUT_DIR/result_ENGINE.json, params_ENGINE.pt,
    params_bf16_ENGINE.pt (ZeRO-3: params_skip_ENGINE.pt)."""
    start_worker(540)
    force_engine()
    for engine in engine_list.split("+"):
        run_engine(engine, out)


def run_engine(engine, out):
    """Sections 1-5 (the module docstring) on ``engine``; the results written into ``out``."""
    if engine == "zero3":
        # zero.Init (models built after a ZeRO-3 config) needs deepspeed.comm up; accelerate
        # starts it only on its non-CPU DeepSpeed path
        # (without DeepSpeed's shared-memory CPU all-reduce: a C++ op JIT-compiled at start-up,
        # minutes on a CI core; gloo does the collectives)
        import deepspeed
        import deepspeed.comm.torch  # noqa: F401

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ.get("RANK", 0))
    result = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # 1. equivalence with one process
        tr = make_trainer(NashMDTrainer, engine, out, ref=True, per_device_train_batch_size=2,
                          **EQUIVALENCE)
        tr.train()
        result["engine"] = engines.engine_of(tr.model_wrapped)
        result["ref_engine"] = engines.engine_of(tr.ref_model)
        result["world"] = dist.get_world_size()
        result["logs"] = [h for h in tr.state.log_history if "loss/kl" in h]
        with torch.no_grad():
            from nashkern.rl.completion_stats import completion_stats

            st = completion_stats(tr.model_wrapped, *stats_inputs(tr.processing_class),
                                  STATS_CONTEXT, ref_model=tr.ref_model)
        result["stats"] = {k: getattr(st, k).tolist() for k in ("logprobs", "ref_logprobs",
                                                                  "kl", "entropy")}
        result["fused"] = bool(getattr(engines.inner_module(tr.model_wrapped),
                                       "_nashkern_separable", False))
        params = {"params": full_params(tr)}
        # 2. the regression: different prompts per rank, long sampled generations, the
        # default reference (a copy of the policy), Nash-MD then XPO (sharded engines: DDP's
        # generation is not a collective)
        if engine != "ddp":
            regression(engine, out, result)
        # 3. bf16 mixed precision (TRL's default bf16=True; on the CPU: autocast, the engines'
        # bf16 parameter / compute policies): the equivalence step again, then 1 XPO step with
        # the default reference; with PEFT (FSDP2, ZeRO-3) a LoRA Nash-MD step
        result["bf16"] = mixed_precision_run(engine, out)
        params["params_bf16"] = result["bf16"].pop("params")
        # 4. nonfinite_scores="skip" with an all-dropped micro-batch (ZeRO-3: the engine steps
        # inside its backward, nashkern corrects the gradient there)
        if engine == "zero3":
            skip = skip_mode_run(engine, out)
            params["params_skip"] = {k: skip[k].pop("params") for k in ("plain", "dropped")}
            result["skip"] = skip
    result["fallback_warnings"] = [str(w.message) for w in caught
                                   if "chunked logits" in str(w.message)
                                   or "separated" in str(w.message)]
    stats = [None] * dist.get_world_size()
    dist.all_gather_object(stats, result["stats"])
    result["stats"] = stats
    if rank == 0:
        for name, value in params.items():
            torch.save(value, os.path.join(out, f"{name}_{engine}.pt"))
        with open(os.path.join(out, f"result_{engine}.json"), "w") as f:
            json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # Leave without running destructors: torch 2.13's gloo teardown race (see ddp_worker.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
