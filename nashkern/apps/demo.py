"""``nashkern demo``: a real (tiny) Nash-MD training run on the CPU, no hub, no downloads.

A tiny Qwen2-style model (random init) and a character-level tokenizer are built locally; the
built-in prompts are short instructions; the built-in rule reward is ``10 × (fraction of vowels
in the completion)``, so P(policy ≻ mixture) = σ(r(y) − r(y′)) pushes the policy towards vowels.
It prints a metrics table, writes ``metrics.jsonl``, ``completions.jsonl`` (prompts with policy
and mixture completions and their scores) and, when matplotlib is installed, ``reward_kl.png``.
"""
from __future__ import annotations

import json
import os
import time

PROMPTS = [
    "write a poem", "say hello", "tell me a story", "name a colour", "sing a song",
    "describe the sea", "what is love?", "give me advice", "count to five", "a haiku:",
    "explain rain", "greet a friend", "name an animal", "talk about food", "the weather is",
    "my favourite word", "once upon a time", "answer briefly", "ideas for lunch", "why is the sky",
]


def vowel_reward(prompts, completions, completion_ids=None, **kwargs):
    """Rule reward: 10 × the fraction of vowels among the completion's characters."""
    return [10.0 * sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def run(args) -> int:
    import torch
    from datasets import Dataset

    from ..rl.callbacks import LogCompletionsCallback
    from ..rl.nash_md import NashMDConfig, NashMDTrainer
    from .tiny import make_tokenizer, tiny_causal_lm

    torch.set_num_threads(1)  # tiny model: thread-pool overhead dominates
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    for f in ("completions.jsonl", "metrics.jsonl"):
        if os.path.exists(os.path.join(out, f)):
            os.remove(os.path.join(out, f))
    tok = make_tokenizer()
    model = tiny_causal_lm(seed=args.seed, hidden=args.hidden, layers=2)
    ds = Dataset.from_dict({"prompt": PROMPTS * 4})
    cfg = NashMDConfig(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", logging_steps=1,
        max_new_tokens=args.max_new_tokens, temperature=1.0, beta=args.beta,
        mixture_coef=args.mixture_coef, report_to="none", save_strategy="no", use_cpu=True,
        bf16=False,  # a float32 CPU demo (the configs default to bf16, as TRL 1.13)
        seed=args.seed, disable_tqdm=False, log_level="warning")
    trainer = NashMDTrainer(model=model, reward_funcs=vowel_reward, args=cfg,
                            processing_class=tok, train_dataset=ds)
    trainer.add_callback(LogCompletionsCallback(trainer, num_prompts=4))
    print(f"nashkern demo: Nash-MD on a tiny Qwen2-style model ({sum(p.numel() for p in model.parameters()):,} "
          f"parameters, vocabulary {len(tok)}), {args.steps} steps of {args.batch_size} prompts, "
          f"{args.max_new_tokens} new tokens, beta {args.beta}, mixture_coef {args.mixture_coef}; "
          f"reward = 10 x vowel fraction\n")
    if args.steps == 0:  # max_steps=0 would mean "train for num_train_epochs" to Trainer
        print("--steps 0: no training step taken")
        return 0
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "rewards/chosen" in h]
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for h in logs:
            f.write(json.dumps(h) + "\n")
    cols = [("step", "step"), ("rewards/chosen", "reward(policy)"),
            ("rewards/rejected", "reward(mixture)"), ("rewards/probabilities", "P(pol>mix)"),
            ("loss/kl", "kl"), ("objective/entropy", "entropy"), ("loss", "loss")]
    print("\n" + "".join(f"{name:>16s}" for _, name in cols))
    every = max(1, len(logs) // 15)
    for i, h in enumerate(logs):
        if i % every == 0 or i == len(logs) - 1:
            print("".join(f"{h.get(k, float('nan')):16.0f}" if k == "step" else
                          f"{h.get(k, float('nan')):16.4f}" for k, _ in cols))
    k = max(1, len(logs) // 5)
    first = sum(h["rewards/chosen"] for h in logs[:k]) / k
    last = sum(h["rewards/chosen"] for h in logs[-k:]) / k
    print(f"\npolicy reward: first {k} steps {first:.3f} -> last {k} steps {last:.3f} "
          f"({elapsed:.0f} s)")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [h["step"] for h in logs]
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
        ax[0].plot(steps, [h["rewards/chosen"] for h in logs], label="policy")
        ax[0].plot(steps, [h["rewards/rejected"] for h in logs], label="mixture")
        ax[0].set_title("reward"), ax[0].set_xlabel("step"), ax[0].legend()
        ax[1].plot(steps, [h["loss/kl"] for h in logs])
        ax[1].set_title("KL(policy || reference), sample estimate"), ax[1].set_xlabel("step")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "reward_kl.png"), dpi=100)
        print(f"plot: {os.path.join(out, 'reward_kl.png')}")
    except ImportError:
        print("(matplotlib not installed: no plot; pip install matplotlib)")
    print(f"metrics: {os.path.join(out, 'metrics.jsonl')}\n"
          f"sample completions: {os.path.join(out, 'completions.jsonl')}")
    samples = trainer.last_samples[:3]
    for s in samples:
        print(f"  {s['prompt']!r} -> policy {s['policy']!r} | mixture {s['mixture']!r}")
    return 0
