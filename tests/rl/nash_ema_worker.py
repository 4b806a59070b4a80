"""Run by tests/rl/test_nash_ema_sharded.py under `accelerate launch` (2 CPU processes, gloo):
``python nash_ema_worker.py ENGINES OUT_DIR`` with ENGINES a comma-separated list of ddp, fsdp2
(the test's), fsdp1, zero3 (one launch runs them in turn: a launch costs ~15-25 s of start-up).

Per engine: two Nash-EMA steps (ema_decay 0.5, so the second step's opponent is θ̄_1 ≠ θ_1) with
an explicit reference, greedy generation (top_k=1: the samples do not depend on the per-rank
generator) and SGD at lr 1, ranks holding different prompts (rank r: prompts 2r, 2r+1). Written
for the test to compare with one process on the 4 prompts: the logged metrics of both steps, the
full average gathered from the ranks' shards, and how much of it this rank holds.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from nashkern import NashEMAConfig, NashEMATrainer  # noqa: E402
from nashkern.apps.tiny import tiny_causal_lm  # noqa: E402
from nashkern.rl import engines  # noqa: E402
from sharded_worker import engine_args, force_engine, in_order, reward  # noqa: E402

STEPS = dict(max_steps=2, max_new_tokens=6, top_k=1, ema_decay=0.5, optim="sgd",
             learning_rate=1.0, max_grad_norm=0.0, lr_scheduler_type="constant")


def make_trainer(engine, out, **kw):
    """The models are built before the config (full weights, the same as one process), untied
    heads and a distinct reference (as sharded_worker.make_trainer)."""
    policy = tiny_causal_lm(seed=0, tie_word_embeddings=False)
    ref_model = tiny_causal_lm(seed=1, tie_word_embeddings=False)
    args = NashEMAConfig(output_dir=out, report_to="none", save_strategy="no", use_cpu=True,
                         bf16=False, gradient_checkpointing=False, disable_tqdm=True, seed=0,
                         logging_steps=1,
                         **({} if engine is None else {"ddp_backend": "gloo"}),
                         **engine_args(None if engine in (None, "ddp") else engine), **kw)
    return in_order(NashEMATrainer, model=policy, ref_model=ref_model, reward_funcs=reward,
                    args=args)


def full_average(tr):
    """``{name: full θ̄}`` from the ranks' local shards (a collective under FSDP2)."""
    ema = tr.ema
    params = dict(ema.model.named_parameters())
    out = {}
    for name, shard in zip(ema.names, ema.shadow):
        p = params[name]
        if hasattr(p, "device_mesh"):  # FSDP2: this rank's rows of a DTensor
            from torch.distributed.tensor import DTensor

            shard = DTensor.from_local(shard, p.device_mesh, p.placements, shape=p.shape,
                                       stride=p.stride()).full_tensor()
        out[name] = shard.detach().cpu().clone()
    return out


def run(engine, out):
    tr = make_trainer(engine, out, per_device_train_batch_size=2, **STEPS)
    tr.train()
    result = {"engine": engines.engine_of(tr.model_wrapped), "world": dist.get_world_size(),
              "logs": [h for h in tr.state.log_history if "loss/kl" in h],
              "ema_local_numel": tr.ema.numel,
              "full_numel": sum(p.numel() for p in
                                 tiny_causal_lm(tie_word_embeddings=False).parameters())}
    average = full_average(tr)
    if dist.get_rank() == 0:
        torch.save(average, os.path.join(out, f"ema_{engine}.pt"))
        with open(os.path.join(out, f"result_{engine}.json"), "w") as f:
            json.dump(result, f)
    dist.barrier()


def main(engine_list, out):
    torch.set_num_threads(1)
    force_engine()
    if "zero3" in engine_list:  # as sharded_worker.main: deepspeed.comm up, no JIT shm op
        import deepspeed
        import deepspeed.comm.torch  # noqa: F401

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo")
    from accelerate.state import AcceleratorState

    for i, engine in enumerate(engine_list.split(",")):
        if i:  # the next engine: a fresh accelerator state on the same process group
            AcceleratorState._reset_state(reset_partial_state=False)
        run(engine, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # torch 2.13's gloo teardown race (see ddp_worker.py)
