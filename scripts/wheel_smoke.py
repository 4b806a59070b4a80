"""What a user of the installed wheel does, run from a directory outside the repository.

    python scripts/wheel_smoke.py --source /path/to/repo     (cwd: anywhere but the repo)

Checks, each failing with what was expected:
1. ``nashkern`` is imported from site-packages (not the source tree), and the wheel holds every
   package of the source tree (each ``nashkern/**/__init__.py`` folder) and every Triton kernel
   module of ``kernels/`` (as ``nashkern.kernels``): a subpackage left out of the wheel fails here.
2. ``nashkern --version`` and ``python -m nashkern --version`` print the package's version.
3. Every public op of ``nashkern.ops`` once, forward (and backward where it has one), against
   ``nashkern.naive`` in float64.
4. One ``NashMDTrainer`` step on a tiny model built locally (no hub).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path


# Imported only by modules that need an extra (pyproject.toml): their absence is no packaging bug.
OPTIONAL = {"triton", "peft", "deepspeed", "matplotlib", "tensorboard"}


def check_installed_layout(source: Path) -> None:
    import nashkern

    installed = Path(nashkern.__file__).resolve().parent
    if installed == (source / "nashkern").resolve():
        raise SystemExit(f"nashkern was imported from the source tree ({installed}), not the "
                         f"installed wheel: run this from outside {source}")
    expected = {p.parent.relative_to(source).as_posix().replace("/", ".")
                for p in (source / "nashkern").rglob("__init__.py")
                if "__pycache__" not in p.parts}
    expected |= {f"nashkern.kernels.{p.stem}" for p in (source / "kernels").glob("*.py")}
    present = {p.parent.relative_to(installed.parent).as_posix().replace("/", ".")
               for p in installed.rglob("__init__.py")}
    present |= {f"nashkern.kernels.{p.stem}" for p in (installed / "kernels").glob("*.py")}
    missing = sorted(expected - present)
    if missing:
        raise SystemExit(f"the installed wheel lacks {missing} (found in the source tree "
                         f"{source}); packages must be discovered by setup.py, not listed")
    import importlib
    needs_extra = []
    for name in sorted(expected):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name not in OPTIONAL:  # a dependency the wheel's metadata should have declared
                raise
            needs_extra.append(f"{name} ({e.name})")
    print(f"layout: {len(expected)} packages/modules present in {installed}; "
          f"importable but for those needing an extra not installed: {needs_extra or 'none'}")


def check_version() -> None:
    import nashkern

    for cmd in (["nashkern", "--version"], [sys.executable, "-m", "nashkern", "--version"]):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        if nashkern.__version__ not in out:
            raise SystemExit(f"{' '.join(cmd)} printed {out!r}, expected the version "
                             f"{nashkern.__version__}")
    print(f"version: {nashkern.__version__}")


def _close(name, got, want, atol=1e-4):
    import torch

    err = (got.double() - want.double()).abs().nan_to_num(0.0).max().item() if got.numel() else 0.0
    if not torch.equal(got.isfinite(), want.isfinite()) or err > atol:
        raise SystemExit(f"ops.{name}: differs from nashkern.naive by {err:.3g} (atol {atol})")
    return err


def check_ops() -> None:
    import torch

    from nashkern import naive, ops

    g = torch.Generator().manual_seed(0)
    N, D, V, coef = 7, 16, 37, 0.3
    logits = torch.randn(N, V, generator=g, dtype=torch.float64)
    ref = torch.randn(N, V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (N,), generator=g)
    want = naive.naive_token_stats(logits, targets, ref, coef=coef)
    x = logits.float().requires_grad_()
    errors = {
        "logprobs": _close("logprobs", ops.logprobs(x, targets), want.logprobs),
        "entropy": _close("entropy", ops.entropy(x), want.entropy),
        "kl": _close("kl", ops.kl(x, ref.float()), want.kl),
        "mixture_logprobs": _close("mixture_logprobs",
                                   ops.mixture_logprobs(x, ref.float(), targets, coef=coef),
                                   want.mixture_logprobs),
    }
    stats = ops.token_stats(x, targets, ref.float(), coef=coef)
    errors["token_stats"] = _close("token_stats", stats.logprobs, want.logprobs)
    stats.logprobs.sum().backward()
    xd = logits.clone().requires_grad_()
    naive.naive_token_stats(xd, targets).logprobs.sum().backward()
    errors["token_stats.backward"] = _close("token_stats backward", x.grad, xd.grad)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5
    h = hidden.float().requires_grad_()
    lin = ops.linear_token_stats(h, weight.float(), targets)
    errors["linear_token_stats"] = _close(
        "linear_token_stats", lin.logprobs, naive.naive_linear_token_stats(hidden, weight, targets).logprobs)
    lin.logprobs.sum().backward()
    hd = hidden.clone().requires_grad_()
    naive.naive_linear_token_stats(hd, weight, targets).logprobs.sum().backward()
    errors["linear_token_stats.backward"] = _close("linear_token_stats backward", h.grad, hd.grad)
    ids = ops.mixture_sample(logits.float(), ref.float(), coef=coef, generator=g)
    if ids.shape != (N,) or not bool(((ids >= 0) & (ids < V)).all()):
        raise SystemExit(f"ops.mixture_sample: expected {N} ids in [0, {V}), got {ids}")
    spike = torch.full((1, V), -30.0)
    spike[0, 5] = 30.0  # the mixture's mass is all on id 5
    if ops.mixture_sample(spike, spike, coef=coef, generator=g).item() != 5:
        raise SystemExit("ops.mixture_sample: a one-hot mixture must return its id")
    print("ops: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) + ", mixture_sample ok")


def check_trainer_step() -> None:
    import torch
    from datasets import Dataset

    from nashkern import NashMDConfig, NashMDTrainer
    from nashkern.apps.tiny import make_tokenizer, tiny_causal_lm

    torch.manual_seed(0)
    tok = make_tokenizer()
    model = tiny_causal_lm(seed=0, hidden=32, layers=1)
    before = [p.detach().clone() for p in model.parameters()]

    def reward(prompts, completions, **kwargs):  # varied, so that the preference has a gradient
        return [float(sum(ord(ch) * (i + 1) for i, ch in enumerate(c)) % 101) for c in completions]

    with tempfile.TemporaryDirectory() as out:
        cfg = NashMDConfig(output_dir=out, max_steps=1, per_device_train_batch_size=4,
                           max_new_tokens=4, learning_rate=1e-2, report_to="none",
                           save_strategy="no", use_cpu=True, bf16=False, logging_steps=1)
        trainer = NashMDTrainer(model=model, reward_funcs=reward, args=cfg,
                                processing_class=tok,
                                train_dataset=Dataset.from_dict({"prompt": ["ab", "cd", "ef", "gh"]}))
        trainer.train()
        trainer.save_model(out)  # the saved model reloads (what a user does next)
        reloaded = type(model).from_pretrained(out)
    moved = sum(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    if trainer.state.global_step != 1 or moved == 0:
        raise SystemExit(f"NashMDTrainer: expected one step that moves the weights, got "
                         f"{trainer.state.global_step} steps, {moved} tensors changed")
    if not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 reloaded.state_dict().values())):
        raise SystemExit("NashMDTrainer: the saved model does not reload to the trained weights")
    loss = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"trainer: one NashMDTrainer step, loss {loss[0]:.4f}, {moved} tensors updated")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="the repository root")
    args = parser.parse_args()
    if Path.cwd().resolve() == args.source.resolve() or args.source.resolve() in Path.cwd().resolve().parents:
        raise SystemExit("run wheel_smoke.py from a directory outside the repository")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check_installed_layout(args.source)
    check_version()
    check_ops()
    check_trainer_step()
    print("wheel smoke: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
