"""Run by tests/rl/test_tensor_parallel.py under torchrun (P = 2 or 4 CPU processes, gloo), and as
one plain process (the baseline, which first saves the checkpoints to CKPT):
``python tp_worker.py CKPT OUT``. Policy and reference are tiny Llamas (odd vocabulary 71: uneven
shards) loaded with transformers' own tensor parallelism (``from_pretrained(tp_plan="auto")``:
every linear layer and the ``lm_head`` DTensor-sharded, the Trainer then sets accelerate's
``ParallelismConfig(tp_size=P)``); P = 1 loads them plainly (the one-process baseline).

One launch (start-up dominates) records, per rank and per run of :data:`RUNS` (2 ranks: Nash-MD,
XPO, Online DPO, Nash-EMA with its checkpoint resumed, Nash-MD with LoRA; 4 ranks: Nash-MD;
TP x DDP: greedy Nash-MD): the logs, the full parameters after the steps, the completions of
every generation call and its collectives outside the model forwards; the shape of every allocation whose last dimension is V or this rank's V_r
(nashkern.memory.AllocationRecorder, torch-backend tiles shrunk to 8 x 8 so that a tile cannot
pass for materialised logits); the collectives of the head's statistics (torch.distributed's
collectives wrapped while ops.linear_token_stats runs); the sharded sampler against the
one-process sampler on whole rows (P > 1).
"""
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (the Triton shard pass)

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from nashkern.memory import AllocationRecorder  # noqa: E402
from nashkern.rl import completion_stats as cs_module  # noqa: E402
from nashkern.rl import tensor_parallel  # noqa: E402
from sharded_worker import PROMPTS, in_order, start_worker  # noqa: E402
VOCAB, HIDDEN = 71, 32  # shards (36/35, 18/18/18/17) unlike any other width here
MAX_NEW = 6


def reward(prompts, completions, completion_ids=None, **kw):
    return [float(sum(map(ord, c)) % 13) for c in completions]


def save_checkpoints(root):
    """Two tiny Llamas (policy seed 0, reference seed 1), untied heads, saved under ``root``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    for name, seed in (("policy", 0), ("ref", 1)):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                          max_position_embeddings=512, tie_word_embeddings=False,
                          pad_token_id=0, eos_token_id=1, bos_token_id=None)
        LlamaForCausalLM(cfg).save_pretrained(os.path.join(root, name))


class ShapeRecorder(AllocationRecorder):
    """The allocation recorder, keeping the shape of every new tensor whose last dimension is
    the vocabulary or this rank's shard of it (the candidates for a [N, V] / [B, T, V])."""

    def __init__(self, widths):
        super().__init__()
        self.widths, self.vocab_shaped = set(widths), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        n = len(self.sizes)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if len(self.sizes) > n:
            from torch.utils._pytree import tree_flatten
            for t in tree_flatten(out)[0]:
                # floating tensors (logits are; causal masks are bool), not square [.., T, T]
                # attention scores whose T happens to equal a width
                if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] in self.widths \
                        and t.is_floating_point() \
                        and not (t.dim() >= 2 and t.shape[-2] == t.shape[-1]):
                    self.vocab_shaped.append((list(t.shape), str(func)))
        return out


def small_tiles():
    """Tiles of 8 rows x 8 columns in the torch backend (and sampler blocks of 8), so that a
    tile is far smaller than [N, V_r] at this size and an allocation of that size can only be
    materialised logits."""
    import dataclasses

    from nashkern import tuning

    tuning.TORCH = dataclasses.replace(tuning.TORCH, linear_rows=8, linear_vocab_tile=8,
                                       sample_block=8, logits_tile_elements=64)


class Counting:
    """Wraps torch.distributed's collectives: elements moved per call, while ``on``."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
             "broadcast", "all_to_all_single")

    def __init__(self):
        self.on, self.calls = False, []
        for name in self.NAMES:
            real = getattr(dist, name)

            def wrapped(*a, _real=real, _name=name, **k):
                if self.on:
                    t = a[1] if _name == "all_gather" else a[0]
                    self.calls.append((_name, int(t.numel())))
                return _real(*a, **k)
            setattr(dist, name, wrapped)


def allow_cpu_tensor_parallelism():
    """accelerate 1.16 refuses ``ParallelismConfig(tp_size>1)`` on ``MULTI_CPU``
    (``ParallelismConfig._validate_accelerator`` accepts FSDP2, DeepSpeed and the multi-GPU
    types only); nothing else in its TP path needs a GPU. The check runs with MULTI_CPU
    counted as a multi-device type."""
    from accelerate import Accelerator
    from accelerate.parallelism_config import ParallelismConfig

    validate = ParallelismConfig._validate_accelerator

    def lenient(self, accelerator):
        prop = Accelerator.multi_device
        Accelerator.multi_device = property(lambda s: s.use_distributed)
        try:
            return validate(self, accelerator)
        finally:
            Accelerator.multi_device = prop

    ParallelismConfig._validate_accelerator = lenient


def sampler_checks(world, rank):
    """The sharded sampler against ``ops.mixture_sample`` (torch backend) on the whole rows, same
    generator state: per case the number of rows that differ and the ids seen."""
    from nashkern import ops
    from nashkern.backends import mixture_sample_vocab_parallel as vocab_parallel

    B = 64
    bounds = [0]
    for width in torch.arange(VOCAB).chunk(world):
        bounds.append(bounds[-1] + len(width))
    lo, hi = bounds[rank], bounds[rank + 1]
    inf, nan = float("inf"), float("nan")
    cases = {}
    for name, coef, temp in (("mixture", 0.3, 0.7), ("policy", 0.0, 1.0), ("reference", 1.0, 1.3),
                             ("special_rows", 0.5, 1.0), ("tiny_temperature", 0.5, 1e-30)):
        g = torch.Generator().manual_seed(len(name))
        z, r = torch.randn(B, VOCAB, generator=g) * 3, torch.randn(B, VOCAB, generator=g) * 3
        if name == "special_rows":
            z[0, 3] = inf                      # +inf in the first shard
            z[1, VOCAB - 2] = inf              # +inf in the last shard
            z[2, [3, VOCAB - 2]] = inf         # +inf in two shards: one of them
            z[3, VOCAB - 1] = nan              # NaN in the last shard: -1
            z[4], r[4] = -inf, -inf            # no finite logit: -1
            z[5, :bounds[1]] = -inf            # the first shard holds nothing finite
            r[5, :bounds[1]] = -inf
            z[6, VOCAB - 1] = r[6, VOCAB - 1] = 1e4  # one overwhelming column in the last shard
        gen = torch.Generator().manual_seed(11)
        want = ops.mixture_sample(z, r, coef=coef, temperature=temp, generator=gen,
                                  backend="torch")
        gen = torch.Generator().manual_seed(11)
        got = vocab_parallel.mixture_sample(
            z[:, lo:hi].contiguous(), r[:, lo:hi].contiguous(), coef=coef, temperature=temp,
            generator=gen, process_group=dist.group.WORLD, vocab_start=lo)
        cases[name] = dict(differ=int((got != want).sum()), max_id=int(got.max()),
                           ids=got[:8].tolist(), want=want[:8].tolist())
    return cases


def nan_for_one_prompt(prompts, completions, completion_ids=None, **kw):
    """:func:`reward`, NaN for the prompt "a" (dropped under nonfinite_scores="skip": the
    logged scores/nonfinite_count must count it once, not once per tensor-parallel rank)."""
    return [float("nan") if p == "a" else r
            for p, r in zip(prompts, reward(prompts, completions))]


#: name -> (trainer, config, fields of the config, reward): one SGD step at lr 1 (the update is
#: the gradient). "greedy" (top_k=1): samples that do not depend on the per-group sampler key.
#: XPO (y ~ π and ỹ ~ μ in one generate_pair loop), Online DPO (a joint draw of 2B policy
#: rows), Nash-EMA (two generate calls, the second with the EMA swapped in; β = 0.5).
RUNS = {
    "sampled": ("NashMDTrainer", "NashMDConfig", {"mixture_coef": 0.4}, reward),
    "greedy": ("NashMDTrainer", "NashMDConfig", {"mixture_coef": 0.4, "top_k": 1}, reward),
    "xpo": ("XPOTrainer", "XPOConfig", {"alpha": 0.4, "nonfinite_scores": "skip"},
            nan_for_one_prompt),
    "online_dpo": ("OnlineDPOTrainer", "OnlineDPOConfig", {}, reward),
    # 4 steps of AdamW (a state to checkpoint; epsilon 1 keeps the update a smooth function of
    # the gradient, so one process and TP stay within float32 rounding); TP: a checkpoint every
    # 2 steps, then resumed from step 2 (:func:`resumed_steps`)
    "nash_ema": ("NashEMATrainer", "NashEMAConfig",
                 {"ema_decay": 0.5, "max_steps": 4, "optim": "adamw_torch", "learning_rate": 0.1,
                  "adam_epsilon": 1.0}, reward),
    # LoRA on attention (q/v) and MLP (gate/up), column-parallel layers; the head not adapted;
    # the reference is the PEFT base (adapters disabled). Row-parallel targets (o_proj,
    # down_proj) fail inside peft 0.21.2's DTensor LoRA as soon as autograd records ("shape
    # '[5, 16]' is invalid for input of size 160" in lora_A: a plain PeftModel forward + backward
    # under tp_plan="auto", nashkern not involved)
    "lora": ("NashMDTrainer", "NashMDConfig", {"mixture_coef": 0.4}, reward),
}
#: the runs of the 2-process TP launch (one launch: start-up dominates)
TP_RUNS = ("sampled", "xpo", "online_dpo", "nash_ema", "lora")
SAVE_STEPS = 2


def make_trainer(ckpt, out, world, dp, run="sampled", save=0):
    """``RUNS[run]`` on the saved tiny Llamas; ``world // dp`` tensor-parallel ranks per
    data-parallel replica (transformers' ``DistributedConfig(tp_size, dp_replicate_size)``
    when ``dp > 1``: TP x HSDP-replication, i.e. TP x DDP). ``save``: a checkpoint every
    ``save`` steps (0: none)."""
    import nashkern
    from transformers import LlamaForCausalLM

    tp = dict(tp_plan="auto") if world > 1 else {}
    if dp > 1:
        from transformers.distributed import DistributedConfig
        tp = dict(distributed_config=DistributedConfig(tp_size=world // dp, dp_replicate_size=dp))
    policy = LlamaForCausalLM.from_pretrained(os.path.join(ckpt, "policy"), **tp)
    ref, peft_config = None, None
    if run == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"])
    else:
        ref = LlamaForCausalLM.from_pretrained(os.path.join(ckpt, "ref"), **tp)
    trainer, config, fields, scorer = RUNS[run]
    Config = getattr(nashkern, config)
    fields = dict(dict(max_steps=1, optim="sgd", learning_rate=1.0), **fields)
    args = Config(output_dir=out, report_to="none", use_cpu=True,
                  save_strategy="steps" if save else "no", save_steps=save or 1,
                  bf16=False, gradient_checkpointing=False, disable_tqdm=True, seed=0,
                  logging_steps=1, max_new_tokens=MAX_NEW, max_grad_norm=0.0,
                  lr_scheduler_type="constant", per_device_train_batch_size=len(PROMPTS) // dp,
                  **fields, **({"ddp_backend": "gloo"} if world > 1 else {}))
    tr = in_order(getattr(nashkern, trainer), model=policy, ref_model=ref,
                  reward_funcs=scorer, args=args, peft_config=peft_config)
    if peft_config is not None:
        seed_adapters(tr.model)
    return tr


def seed_adapters(model):
    """Every LoRA A and B matrix set from a generator seeded by its name (the same full values in
    one process and under TP, each rank taking its part): peft draws its initial A from the
    global RNG, which loading a TP model advances differently; B non-zero, so the adapters
    change the step's forward and every adapter gets a gradient."""
    import zlib

    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" not in name:
                continue
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            full = torch.randn(p.shape, generator=g) * 0.1
            if isinstance(p, DTensor):
                p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements,
                                                     src_data_rank=None).to_local())
            else:
                p.copy_(full)


def full_params(tr):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().float().clone()
            for k, v in tr.model.state_dict().items()}


GENERATING_MODULES = ("nash_md", "nash_ema", "xpo", "online_dpo")


def recorded_step(tr, **train_kw):
    """Train recording the allocations, the collectives of the head's statistics and of every
    generation call outside the models' forwards (the sampler's, the finished flags', any
    all-gather of logit rows; the body's row-parallel all-reduces of [rows, t, D] hidden
    states inside the forwards are not counted), and the completions of every generation
    call."""
    import importlib

    from nashkern.rl import generation

    shard = tensor_parallel.model_shard(tr.model)
    result = dict(sharded=shard is not None,
                  shard=None if shard is None else [shard.start, shard.rows, shard.vocab])
    counting = Counting()
    completions, generation_calls = [], []
    real_fused = cs_module.ops.linear_token_stats

    def counted_fused(*a, **k):  # the head's statistics, forward: its collectives counted
        counting.on = True
        try:
            return real_fused(*a, **k)
        finally:
            counting.on = False

    def recording(real):
        def generating(*a, **k):
            first = len(counting.calls)
            counting.on = True
            try:
                out = real(*a, **k)
            finally:
                counting.on = False
            generation_calls.append(counting.calls[first:])
            del counting.calls[first:]
            outs = out if isinstance(out, tuple) else (out,)
            completions.append([o.completion_ids.tolist() for o in outs])
            return out
        return generating

    real_forward = generation._forward_last_logits

    def uncounted_forward(*a, **k):  # a model forward inside generation: its collectives not
        was, counting.on = counting.on, False
        try:
            return real_forward(*a, **k)
        finally:
            counting.on = was

    patched = [(generation, "_forward_last_logits", real_forward)]
    generation._forward_last_logits = uncounted_forward
    for name in GENERATING_MODULES:
        module = importlib.import_module(f"nashkern.rl.{name}")
        for fn in ("generate", "generate_pair"):
            if hasattr(module, fn):
                patched.append((module, fn, getattr(module, fn)))
                setattr(module, fn, recording(getattr(generation, fn)))
    cs_module.ops.linear_token_stats = counted_fused
    widths = {VOCAB} | ({shard.rows} if shard is not None else set())
    try:
        with ShapeRecorder(widths) as rec:
            tr.train(**train_kw)
    finally:
        cs_module.ops.linear_token_stats = real_fused
        for module, fn, real in patched:
            setattr(module, fn, real)
    result.update(vocab_shaped=rec.vocab_shaped, collectives=counting.calls,
                  generation_collectives=generation_calls, completions=completions,
                  logs=[{k: v for k, v in h.items() if not k.startswith("time/")}
                        for h in tr.state.log_history if "loss" in h])
    # the recorder does see a gathered [B, T, V]: the model's own forward (colwise_gather_output)
    with ShapeRecorder(widths) as check:
        tr.model(input_ids=torch.tensor([[5, 6, 7, 8, 9]]))
    result["own_forward_vocab_shaped"] = check.vocab_shaped
    return result


def full_ema(tr):
    """Nash-EMA's average as full tensors, by parameter name (each rank holds its local
    shards of the DTensor parameters: assembled with the parameter's mesh and placements)."""
    from torch.distributed.tensor import DTensor

    ema = tr.ema
    params = dict(ema.model.named_parameters())
    out = {}
    for name, shadow in zip(ema.names, ema.shadow):
        p = params[name]
        if isinstance(p, DTensor):
            shadow = DTensor.from_local(shadow, p.device_mesh, p.placements,
                                        shape=p.shape, stride=p.stride()).full_tensor()
        out[f"ema.{name}"] = shadow.detach().float().clone()
    return out


def resumed_steps(ckpt, out, world, rank):
    """Nash-EMA under TP resumed from the checkpoint written after step 2 of its uninterrupted
    run (model, AdamW state, EMA; samples keyed on the step): steps 3 and 4 recorded, the
    parameters and the EMA after them written as ``params_resumed.pt`` (rank 0); the
    checkpoint's files."""
    folder = os.path.join(out, "nash_ema", f"checkpoint-{SAVE_STEPS}")
    files = sorted(os.listdir(folder))
    tr = make_trainer(ckpt, os.path.join(out, "resumed"), world, 1, "nash_ema")
    steps = recorded_step(tr, resume_from_checkpoint=folder)
    params = full_params(tr)
    params.update(full_ema(tr))
    if rank == 0:
        torch.save(params, os.path.join(out, "params_resumed.pt"))
    return dict(logs=steps["logs"], completions=steps["completions"], files=files)


def termination_check(tr, group):
    """Data-parallel group ``group`` generates greedily from its own prompt; group 0 with its
    first token as EOS (done after 1 step, then stepping on padding), the others without an EOS
    they produce (8 steps): the groups finish at different steps
    (each forward of a TP model is a collective of its group; the finished flags are
    all-reduced over the world). -> (length, expected length)."""
    from nashkern.rl import generation

    tok = tr.processing_class
    ids = tok([PROMPTS[group]], return_tensors="pt").input_ids
    params = generation.SamplingParams(max_new_tokens=8, do_sample=False)
    first = generation.generate(tr.model, ids, torch.ones_like(ids), eos_token_id=VOCAB + 7,
                                pad_token_id=0, params=params)
    row = first.completion_ids[0].tolist()
    # group 0 stops at its first token; the others never see their EOS (all 8 steps)
    eos = row[0] if group == 0 else VOCAB + 7
    again = generation.generate(tr.model, ids, torch.ones_like(ids), eos_token_id=eos,
                                pad_token_id=0, params=params)
    return int(again.completion_mask.sum()), 1 if group == 0 else len(row)


def triton_shard_checks(rank):
    """The Triton shard pass of ops.linear_token_stats(process_group=...): every case of
    vocab_parallel_worker (2 ranks) against the float64 oracle (as the torch pass is tested)."""
    os.environ["NASHKERN_VP_BACKEND"] = "triton"
    import vocab_parallel_worker as vpw

    assert vpw.BACKEND == "triton"
    res = {name: vpw.check(name, opts, rank, 2, torch.Generator().manual_seed(i))
           for i, (name, opts) in enumerate(vpw.CASES.items())}
    res["nan_row"] = vpw.check_nan_row(rank, torch.Generator().manual_seed(99))
    res["empty"] = vpw.check_empty()
    return res


def refused_placements():
    """A head placed other than by rows on 2+ ranks: head_shard's ValueError names the
    placement. -> the placements named."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    w = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(0))
    named = []
    for weight in (distribute_tensor(w, mesh, [Shard(1)]),
                   DTensor.from_local(w, mesh, [Partial()], run_check=False)):
        try:
            tensor_parallel.head_shard(weight)
        except ValueError as e:
            named.append(next(p for p in ("Shard(dim=1)", "Partial(sum)") if p in str(e)))
    return named


def main(ckpt, out):
    start_worker(300)
    small_tiles()
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    dp = int(os.environ.get("NASHKERN_TP_DP", 1))  # data-parallel replicas of the TP groups
    if world == 1 and not os.path.exists(os.path.join(ckpt, "ref", "config.json")):
        save_checkpoints(ckpt)  # the one-process run writes them (one start-up less)
    if world > 1:
        dist.init_process_group("gloo")
        allow_cpu_tensor_parallelism()
    result = dict(rank=rank, world=world, dp=dp)
    if world > 1:
        result["sampler"] = sampler_checks(world, rank)
    if world == 2:
        result["triton_shard"] = triton_shard_checks(rank)
    if world > 1:
        result["refused_placements"] = refused_placements()
    # sampled (TP: one data-parallel group draws with the one-process key) and the other
    # trainers on 2 ranks, sampled on 4, greedy under TP x DDP; every run in one process
    runs = ["greedy"] if dp > 1 else list(TP_RUNS) if world == 2 else ["sampled"] \
        if world > 2 else list(RUNS)
    for name in runs:
        checkpointed = name == "nash_ema" and world > 1
        tr = make_trainer(ckpt, os.path.join(out, name), world, dp, name,
                          save=SAVE_STEPS if checkpointed else 0)
        result[name] = recorded_step(tr)
        params = full_params(tr)
        if name == "nash_ema":
            params.update(full_ema(tr))
        if rank == 0:
            torch.save(params, os.path.join(out, f"params_{name}.pt"))
        if checkpointed:
            result["resumed"] = resumed_steps(ckpt, out, world, rank)
    if dp > 1:
        group = tensor_parallel.sampler_rank(tr.model, rank) // (world // dp)
        result["termination"] = termination_check(tr, group)
    with open(os.path.join(out, f"result{rank}.json"), "w") as f:
        json.dump(result, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
