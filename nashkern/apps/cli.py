"""``nashkern`` command line: ``nashkern demo`` (a tiny Nash-MD training run),
``nashkern nash-demo`` (does Nash-MD find the Nash equilibrium? tabular and LM) and
``nashkern ops-demo`` (the fused ops, fused vs eager)."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .. import ops
from ..memory import AllocationRecorder
from ..naive import naive_linear_token_stats


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _fused_step(hidden, weight, ref_hidden, targets, coef):
    stats = ops.linear_token_stats(hidden, weight, targets, ref_hidden=ref_hidden, coef=coef)
    loss = stats.logprobs.sum() + stats.entropy.sum() + stats.kl.sum()
    loss.backward()
    return stats


def _eager_step(hidden, weight, ref_hidden, targets, coef):
    stats = naive_linear_token_stats(hidden, weight, targets, ref_hidden=ref_hidden, coef=coef)
    loss = stats.logprobs.sum() + stats.entropy.sum() + stats.kl.sum()
    loss.backward()
    return stats


def demo(args) -> int:
    """Fused vs eager token statistics on a small Qwen-like head, with allocation accounting."""
    torch.manual_seed(0)
    N, D, V, coef = args.tokens, args.hidden, args.vocab, 0.5
    print(f"nashkern demo: {N} tokens, hidden {D}, vocabulary {V}, mixture coef {coef} (CPU)\n")
    hidden0 = torch.randn(N, D)
    weight0 = torch.randn(V, D) * D ** -0.5
    ref_hidden = hidden0 + 0.1 * torch.randn(N, D)
    targets = torch.randint(0, V, (N,))
    results = {}
    for name, step in (("nashkern (streaming)", _fused_step), ("eager PyTorch", _eager_step)):
        hidden = hidden0.clone().requires_grad_()
        weight = weight0.clone().requires_grad_()
        with AllocationRecorder() as rec:
            stats, seconds = _timed(lambda: step(hidden, weight, ref_hidden, targets, coef))
        results[name] = (stats, seconds, rec.largest()[0], hidden.grad)
    (fs, ft, fmem, fgrad), (es, et, emem, egrad) = results.values()
    print(f"{'':24s}{'fwd+bwd time':>14s}{'largest tensor':>18s}")
    for name, (_, seconds, largest, _) in results.items():
        print(f"{name:24s}{seconds * 1e3:11.1f} ms{largest * 4 / 2**20:14.1f} MiB")
    print(f"\nlargest tensor ratio (eager / nashkern): {emem / max(fmem, 1):.1f}x; "
          f"N x V = {N * V * 4 / 2**20:.1f} MiB in float32")
    for field in ("logprobs", "entropy", "kl", "mixture_logprobs"):
        diff = (getattr(fs, field) - getattr(es, field)).abs().max().item()
        print(f"max |nashkern - eager| {field:17s} {diff:.2e}")
    print(f"max |nashkern - eager| d hidden          {(fgrad - egrad).abs().max().item():.2e}")
    z, r = torch.randn(4, V), torch.randn(4, V)
    gen = torch.Generator().manual_seed(0)
    print("\nmixture_sample (4 rows, coef 0.5):",
          ops.mixture_sample(z, r, coef=coef, temperature=0.9, generator=gen).tolist())
    return 0


def _train_demo(args) -> int:
    from .demo import run

    return run(args)


def _nash_demo(args) -> int:
    from .nash_demo import run

    return run(args)


def _int_at_least(low: int):
    """argparse ``type``: an int >= ``low`` (argparse names the option in its message)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {value}")
        return value
    return parse


def _positive_float(text: str) -> float:
    """argparse ``type``: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def main(argv=None) -> int:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="nashkern")
    parser.add_argument("--version", action="version", version=f"nashkern {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ops-demo", help=demo.__doc__)
    p.add_argument("--tokens", type=_int_at_least(1), default=2048)
    p.add_argument("--hidden", type=_int_at_least(1), default=256)
    p.add_argument("--vocab", type=_int_at_least(1), default=32000)
    p.set_defaults(func=demo)
    t = sub.add_parser("demo", help="a tiny Nash-MD training run on the CPU (built-in model, "
                                    "prompts and rule reward)")
    t.add_argument("--steps", type=_int_at_least(0), default=60,
                   help="optimizer steps (0: build the model and trainer, take no step)")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--max-new-tokens", type=int, default=16)
    t.add_argument("--learning-rate", type=float, default=3e-3)
    t.add_argument("--beta", type=float, default=0.02)
    t.add_argument("--mixture-coef", type=float, default=0.5)
    t.add_argument("--hidden", type=int, default=64)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--output-dir", default="nashkern_demo")
    t.set_defaults(func=_train_demo)
    n = sub.add_parser("nash-demo", help="Nash-MD and Nash-EMA vs self-play, best response and "
                                         "RLHF on a non-transitive preference: tabular and the "
                                         "LM trainers; prints a table, writes exploitability.png")
    n.add_argument("--beta", type=_positive_float, default=0.1,
                   help="tau (the KL weight) of the LM and of the first tabular game (the "
                        "second: tau/2)")
    n.add_argument("--mixture-coef", type=float, default=0.5, help="c = eta * tau")
    n.add_argument("--ema-decay", type=float, default=0.9,
                   help="Nash-EMA's beta (tabular and LM): the opponent's parameters are the "
                        "EMA of the policy's with this decay (0: self-play)")
    n.add_argument("--tabular-steps", type=int, default=300)
    n.add_argument("--lm-steps", type=int, default=150)
    n.add_argument("--batch-size", type=int, default=16)
    n.add_argument("--learning-rate", type=float, default=0.005)
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--output-dir", default="nashkern_nash_demo")
    n.set_defaults(func=_nash_demo)
    sub.add_parser("train", help="Nash-MD / Nash-EMA / XPO / Online DPO training (`--method "
                                 "nash_md|nash-ema|xpo|"
                                 "online_dpo`; the original example scripts' arguments; "
                                 "`nashkern train --method xpo --help`)", add_help=False)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        from .train import main as train_main

        return train_main(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
