"""Full curves of ``nashkern nash-demo``: every method's exploitability and KL(π*_τ‖π_t) per
iteration (tabular, τ = beta and beta/2) and per training step (the LM trainer, both routes,
several seeds), written to ``benchmarks/results/nash_curves.csv`` and plotted to
``benchmarks/results/plots/nash_curves.png``. Not a timing benchmark: it records what the
algorithms do, on the CPU, in about a minute per seed.

    python benchmarks/nash_curves.py [--seeds 0 1 2] [--lm-steps 300] [--tabular-steps 500]
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

import torch

from nashkern import tabular as tb
from nashkern.apps.nash_demo import collect_curves, demo_game, plot_curves

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--mixture-coef", type=float, default=0.5)
    p.add_argument("--tabular-steps", type=int, default=500)
    p.add_argument("--lm-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=0.005)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=os.path.join(HERE, "results", "nash_curves.csv"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for i, seed in enumerate(args.seeds):
        curves = collect_curves(beta=args.beta, mixture_coef=args.mixture_coef,
                                tabular_steps=args.tabular_steps, lm_steps=args.lm_steps,
                                batch_size=args.batch_size, learning_rate=args.learning_rate,
                                seed=seed)
        # the tabular methods are deterministic: recorded once
        curves = [c for c in curves if i == 0 or c.panel.startswith("tiny LM")]
        for c in curves:
            for t, (gap, dist, pi) in enumerate(zip(c.exploitability.tolist(),
                                                    c.kl_to_nash.tolist(), c.policies.tolist())):
                rows.append({"kind": "LM" if c.panel.startswith("tiny LM") else "tabular",
                             "method": c.method, "tau": c.tau, "seed": seed,
                             "step": t, "exploitability": f"{gap:.6g}",
                             "kl_to_nash": f"{dist:.6g}",
                             **{f"pi_{k}": f"{x:.6g}" for k, x in enumerate(pi)}})
        if i == 0:
            game = demo_game(args.beta)
            fixed = tb.solve_equilibrium(game, coef=args.mixture_coef).policy
            plot_curves(curves, float(game.exploitability(fixed)),
                        os.path.join(os.path.dirname(args.out), "plots", "nash_curves.png"))
        for c in curves:
            if c.panel.startswith("tiny LM"):
                print(f"seed {seed} {c.method}: exploitability {float(c.exploitability[0]):.4f}"
                      f" -> {float(c.exploitability[-1]):.4f}, KL(π*‖π) "
                      f"{float(c.kl_to_nash[0]):.4f} -> {float(c.kl_to_nash[-1]):.4f}"
                      f" ({c.seconds:.0f} s)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"{len(rows)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
