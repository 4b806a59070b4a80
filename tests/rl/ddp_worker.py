"""Run by test_ddp_two_processes under `accelerate launch` (2 CPU processes, gloo)."""
import json
import os
import sys

import torch
import torch.distributed as dist
from datasets import Dataset

sys.path.insert(0, os.path.dirname(__file__))
from nashkern import NashMDConfig, NashMDTrainer  # noqa: E402
from nashkern.apps.tiny import make_tokenizer, tiny_causal_lm  # noqa: E402


def reward(prompts, completions, completion_ids=None, **kw):
    return [float(sum(ch in "aeiou" for ch in c)) for c in completions]


def nan_on_rank_1(prompts, completions, completion_ids=None, **kw):
    """Finite scores, except one NaN on the second process."""
    return [float("nan") if dist.get_rank() == 1 and i == 0 else 1.0
            for i in range(len(completions))]


def nan_on_one_rank_raises_everywhere(out, args):
    """nonfinite_scores='raise' with a NaN seen by one process only: every process raises the
    ValueError at the same check (none is left blocked in the step's next collective)."""
    ds = Dataset.from_dict({"prompt": [f"prompt {i}" for i in range(4)]})
    tr = NashMDTrainer(model=tiny_causal_lm(), reward_funcs=nan_on_rank_1, args=args,
                       processing_class=make_tokenizer(), train_dataset=ds)
    try:
        tr.train()
        message = ""
    except ValueError as e:
        message = str(e)
    with open(os.path.join(out, f"nan_rank{dist.get_rank()}.txt"), "w") as f:
        f.write(message)
    dist.barrier()


def main(out):
    torch.set_num_threads(1)
    args = NashMDConfig(output_dir=out, per_device_train_batch_size=2, max_steps=3,
                        max_new_tokens=4, learning_rate=1e-2, logging_steps=1, report_to="none",
                        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, bf16=False,
                        ddp_backend="gloo", ddp_find_unused_parameters=False)
    ds = Dataset.from_dict({"prompt": [f"prompt {i}" for i in range(12)]})
    tr = NashMDTrainer(model=tiny_causal_lm(), reward_funcs=reward, args=args,
                       processing_class=make_tokenizer(), train_dataset=ds)
    tr.train()
    flat = torch.cat([p.detach().reshape(-1) for p in tr.model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if dist.get_rank() == 0:
        logs = [h for h in tr.state.log_history if "loss/kl" in h]
        with open(os.path.join(out, "ddp.json"), "w") as f:
            json.dump({"world": dist.get_world_size(),
                       "max_diff": max((g - flat).abs().max().item() for g in gathered),
                       "n_logs": len(logs), "keys": sorted(logs[0])}, f)
    dist.barrier()
    args.max_steps = 1
    nan_on_one_rank_raises_everywhere(out, args)


if __name__ == "__main__":
    main(sys.argv[1])
    # Leave without running destructors. torch 2.13's ProcessGroupGloo destructor joins
    # its worker thread while the freeing thread holds the GIL, and the worker may need
    # the GIL to release the last collective's tensors: a deadlock (py-spy showed
    # ~ProcessGroupGloo -> std::thread::join vs AsyncBarrierWork dtor -> gil_scoped_acquire),
    # or "terminate called without an active exception" when left to interpreter exit.
    # Roughly 1 run in 5 hit one of them here. Everything this test checks is on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
