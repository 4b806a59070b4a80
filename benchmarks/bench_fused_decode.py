"""Per-token cost of Nash-MD's decoding loop (``generation.generate_pair``: the policy over 2B
rows, the reference over the B mixture rows), the fused decode (model bodies +
``ops.linear_mixture_sample``) against the logits path (each model's ``[rows, V]`` last-position
logits + ``ops.mixture_sample``), interleaved in one process, process CPU time, with the
completions of both compared. Defaults: the trainer benchmark's model (Qwen2, hidden 128, 2
layers, V = 151936, fp32, random weights), batch 8, 64 new tokens, 1 thread.

    .venv/bin/python benchmarks/bench_fused_decode.py [--reps 5] [--batch 8] [--tokens 64]
"""
import argparse
import os
import time

import torch

from nashkern.apps.tiny import tiny_qwen2_config
from nashkern.rl import fused_decode
from nashkern.rl.generation import SamplingParams, generate_pair


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    cfg = tiny_qwen2_config(vocab_size=args.vocab, hidden=args.hidden, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    torch.manual_seed(1)
    ref = AutoModelForCausalLM.from_config(cfg)
    ids = torch.randint(3, 1000, (args.batch, 24), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_new_tokens=args.tokens, temperature=0.9)
    fused_reason = fused_decode.fused_decode_reason

    def run(fused: bool, seed: int):
        fused_decode.fused_decode_reason = fused_reason if fused else (
            lambda p, d: "bench_fused_decode.py: the logits path")
        t = time.process_time()
        out = generate_pair(model, ids, torch.ones_like(ids), ref_model=ref, coef=0.5,
                            params=params, eos_token_id=-1, pad_token_id=0,
                            generator=torch.Generator().manual_seed(seed))
        return time.process_time() - t, torch.cat([o.completion_ids for o in out])

    run(True, 0), run(False, 0)  # warm-up (and the heads' separability check)
    times = {"logits path": [], "fused decode": []}
    same = True
    for rep in range(args.reps):
        t0, a = run(False, rep)
        t1, b = run(True, rep)
        times["logits path"].append(t0)
        times["fused decode"].append(t1)
        same &= torch.equal(a, b)
    print(f"load average {os.getloadavg()[0]:.2f}; {args.threads} thread(s); batch {args.batch}, "
          f"{args.tokens} tokens, V {args.vocab}, hidden {args.hidden}; same completions: {same}")
    for name, ts in times.items():
        ts.sort()
        print(f"{name}: per token min {ts[0] / args.tokens * 1e3:.1f} ms, median "
              f"{ts[len(ts) // 2] / args.tokens * 1e3:.1f} ms (process CPU)")


if __name__ == "__main__":
    main()
