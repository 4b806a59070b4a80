#!/usr/bin/env python
"""Side-by-side trainer benchmark: nashkern's ``NashMDTrainer`` / ``XPOTrainer`` against TRL
1.13's ``trl.experimental.nash_md.NashMDTrainer`` / ``trl.experimental.xpo.XPOTrainer`` (the last
TRL release that has them), same model, same data, same hyper-parameters, on the CPU.

One script, two roles:

* worker (``--impl nashkern|trl``): runs ``--warmup + --steps`` training steps of ``--method
  nash_md|xpo`` with one implementation and reports, as one JSON object, the wall time of every
  step (``TrainerCallback.on_step_begin`` -> ``on_step_end``: generation, scoring, log-prob pass,
  backward and optimizer step), a per-phase split of each step, and the process's memory
  (``VmRSS`` after the models and the trainer are built, ``VmHWM`` = peak RSS). It imports only
  what its implementation needs, so it runs under either virtualenv: nashkern's (``.venv``) or
  TRL's (``.venv-trl``, ``make bench-trl``; nashkern is not installed there).
* driver (``--compare``): runs one worker per implementation, each in a **fresh subprocess**
  under its own virtualenv's python, one after the other, prints a table with the ratios against
  the targets of issues 3 / 6 and appends one CSV row per implementation.

Both implementations load the same weights: the first worker builds a tiny Qwen2-style causal LM
(``--vocab`` 151936, ``--hidden`` 128, ``--layers`` 2, 4 heads / 2 KV heads, tied embeddings,
float32), a reward model (``Qwen2ForSequenceClassification``, same shape, one label) and a
character-level tokenizer padded with filler tokens to the full vocabulary, and saves them under
``--model-dir``; every worker then loads them with ``from_pretrained``. Prompts are 8 per step,
plain text (no chat template), drawn deterministically; both trainers shuffle them with the same
seed (``transformers.Trainer``'s sampler).

Full-length generation in both: the EOS token is an ordinary vocabulary entry (id 1) that the
random-init model samples with probability ~1/151936 per token, and both generators run until
every row of the batch has stopped, so a batch stops early only if all its 8 rows sample EOS
(never, in practice). No ``min_new_tokens``: nashkern's sampler has no such option, and a
logits processor would add work to one side only. The fraction of completions that contain an
EOS is reported per implementation (``val/*_contain_eos_token``, logged by both trainers) so
that the full-length assumption is checked, not assumed.

Examples::

  make bench-trl                                   # builds .venv-trl, then the Nash-MD comparison
  .venv/bin/python benchmarks/bench_trainers.py --compare --method nash_md \\
      --csv benchmarks/results/trainers_cpu.csv
  .venv/bin/python benchmarks/bench_trainers.py --impl nashkern --method nash_md   # one worker
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import functools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / "benchmarks" / ".cache" / "trainers"
RESULT_TAG = "@@bench-trainers@@ "
IMPLS = ("nashkern", "trl")
METHODS = ("nash_md", "xpo")
# TRL time / nashkern time >= x, nashkern peak / TRL peak <= y: Nash-MD from issue 24 (like for
# like in fp32: quiet >= 4x at <= 0.65x, >= 2x with one competing busy process), XPO issue 6
TARGETS = {"nash_md": {"time": 4.0, "memory": 0.65, "contended_time": 2.0},
           "xpo": {"time": 2.0, "memory": 0.5}}
DEFAULT_PYTHON = {"nashkern": REPO / ".venv" / "bin" / "python",
                  "trl": REPO / ".venv-trl" / "bin" / "python"}

# the character-level tokenizer of nashkern.apps.tiny (copied: the TRL venv has no nashkern)
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,!?'-:\n"
SPECIAL = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]
WORDS = ("the a story poem song about sea rain sky river city cat dog friend lunch weather music "
         "colour number morning night garden write tell describe explain give name short long "
         "why how what is my your one two three").split()


# ----------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------
def proc_status(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process, bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return -1


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0, ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# models, tokenizer, prompts
# ----------------------------------------------------------------------------------------------
def model_dir_for(args) -> Path:
    root = Path(args.model_dir) if args.model_dir else DEFAULT_CACHE
    return root / (f"qwen2-v{args.vocab}-h{args.hidden}-l{args.layers}-a{args.heads}"
                   f"-kv{args.kv_heads}-i{intermediate_size(args)}-s{args.seed}")


def intermediate_size(args) -> int:
    return args.intermediate or 2 * args.hidden


def qwen2_config(args, **kw):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=intermediate_size(args), num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=0,
                       eos_token_id=1, bos_token_id=None, **kw)


def make_tokenizer(vocab: int):
    """nashkern.apps.tiny's character-level tokenizer (pad 0, eos 1, no BOS), padded with filler
    tokens ``<|fN|>`` so that every id the model can sample decodes."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = SPECIAL + list(CHARS)
    if vocab < len(base):
        raise ValueError(f"--vocab must be >= {len(base)}")
    table = {t: i for i, t in enumerate(base)}
    table.update({f"<|f{i}|>": i for i in range(len(base), vocab)})
    tok = Tokenizer(models.WordLevel(vocab=table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="left")


def prepare(args) -> Path:
    """Build and save the policy, the reward model and the tokenizer once (both impls load
    them: identical weights)."""
    out = model_dir_for(args)
    if (out / "done").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tok = make_tokenizer(args.vocab)
    torch.manual_seed(args.seed)
    policy = AutoModelForCausalLM.from_config(qwen2_config(args))
    torch.manual_seed(args.seed + 1)
    reward = AutoModelForSequenceClassification.from_config(qwen2_config(args, num_labels=1))
    for name, m in (("policy", policy), ("reward", reward)):
        m.save_pretrained(out / name)
        tok.save_pretrained(out / name)
    (out / "done").write_text("ok\n")
    return out


def make_prompts(n: int, seed: int) -> List[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 5))) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
class Phases:
    """Per-step wall time of named phases (wrapped functions), accumulated within a step."""

    def __init__(self):
        self.current: Dict[str, float] = {}
        self.steps: List[Dict[str, float]] = []

    def add(self, name: str, seconds: float) -> None:
        self.current[name] = self.current.get(name, 0.0) + seconds

    def wrap(self, owner, attr: str, name, instance: bool = False) -> bool:
        """Time every call of ``owner.attr``; ``name``: a phase name, or a function of
        (args, kwargs) giving one."""
        fn = getattr(owner, attr, None)
        if fn is None:
            return False

        @functools.wraps(fn)
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.add(name(a, kw) if callable(name) else name, time.perf_counter() - t)

        setattr(owner, attr, timed)
        return True


def _sync_cuda() -> None:
    """On a GPU a step's time must include its queued kernels: wait for them at its ends."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def make_step_timer(phases: Phases, times: List[float], cpu_times: List[float],
                    profile_step: Optional[int] = None, profile_out: Optional[list] = None):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            _sync_cuda()
            if profile_step is not None and state.global_step == profile_step:
                import torch.profiler
                self._prof = torch.profiler.profile(activities=[
                    torch.profiler.ProfilerActivity.CPU])
                self._prof.__enter__()
            phases.current = {}
            self._c0 = time.process_time()
            self._t0 = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self._t_opt = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync_cuda()
            t = time.perf_counter()
            phases.add("optimizer step", t - getattr(self, "_t_opt", t))
            times.append(t - self._t0)
            cpu_times.append(time.process_time() - self._c0)
            phases.steps.append(dict(phases.current))
            if getattr(self, "_prof", None) is not None:
                self._prof.__exit__(None, None, None)
                profile_out.append(self._prof.key_averages().table(
                    sort_by="self_cpu_time_total", row_limit=30))
                self._prof = None

    return StepTimer()


# ----------------------------------------------------------------------------------------------
# trainers
# ----------------------------------------------------------------------------------------------
def common_config(args, out_dir: str) -> dict:
    return dict(output_dir=out_dir, max_steps=args.warmup + args.steps,
                per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate,
                lr_scheduler_type="constant", logging_steps=1, max_new_tokens=args.max_new_tokens,
                max_length=512, temperature=args.temperature, beta=args.beta,
                report_to="none", save_strategy="no", use_cpu=args.device == "cpu",
                # Both libraries' configs default to bf16=True and gradient checkpointing on (TRL
                # 1.13's defaults, which nashkern now shares): set both explicitly so that the two
                # trainers run the same math (--dtype) without recomputation.
                bf16=args.dtype == "bf16", gradient_checkpointing=False, seed=args.seed,
                disable_tqdm=True, dataloader_num_workers=0, log_level="warning")


def build_nashkern(args, method, model, reward, tok, dataset, out_dir, phases):
    import nashkern

    cfg = common_config(args, out_dir)
    if method == "nash_md":
        Config, Trainer = nashkern.NashMDConfig, nashkern.NashMDTrainer
        cfg.update(mixture_coef=args.mixture_coef)
    else:
        try:
            Config, Trainer = nashkern.XPOConfig, nashkern.XPOTrainer
        except AttributeError as e:
            raise SystemExit(f"nashkern {nashkern.__version__} has no XPOTrainer yet: {e}")
        cfg.update(alpha=args.alpha)
    cfg.update(top_k=None, top_p=None)  # no filters (TRL: top_k=0, top_p=1.0 -> off)
    if args.compile_decode:  # compiled at the first (warm-up) step
        cfg.update(compile_decode=args.compile_decode)
    trainer = Trainer(model=model, reward_model=reward, args=Config(**cfg), processing_class=tok,
                      train_dataset=dataset)

    def gen_name(a, kw):
        coef = kw.get("coef", 0) if kw.get("ref_model") is not None else 0
        return {0: "generate", 1: "generate (reference)"}.get(coef, "generate (mixture)")

    # the names the trainer's modules (its class and base classes) imported: timed where called
    mods = {sys.modules[c.__module__] for c in type(trainer).__mro__
            if c.__module__.split(".")[0] == "nashkern"}
    for mod in mods:
        phases.wrap(mod, "generate", gen_name)
        phases.wrap(mod, "generate_pair", "generate (all)")
        phases.wrap(mod, "reward_model_scores", "reward model")
        phases.wrap(mod, "completion_stats", "log-prob forward (policy+ref)")
    return trainer


def build_trl(args, method, model, reward, tok, dataset, out_dir, phases):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    cfg = common_config(args, out_dir)
    cfg.update(top_k=0, top_p=1.0, missing_eos_penalty=None)
    if method == "nash_md":
        from trl.experimental.nash_md import NashMDConfig, NashMDTrainer
        from trl.experimental.nash_md import nash_md_trainer as mod

        cfg.update(mixture_coef=args.mixture_coef)
        trainer = NashMDTrainer(model=model, reward_funcs=reward, args=NashMDConfig(**cfg),
                                processing_class=tok, train_dataset=dataset)
        phases.wrap(mod.GeometricMixtureWrapper, "generate", "generate (mixture)")
    else:
        from trl.experimental.xpo import XPOConfig, XPOTrainer

        cfg.update(alpha=args.alpha)
        trainer = XPOTrainer(model=model, reward_funcs=reward, args=XPOConfig(**cfg),
                             processing_class=tok, reward_processing_classes=tok,
                             train_dataset=dataset)
    # instance attributes shadow the bound methods: only this trainer is timed
    phases.wrap(trainer, "_generate_completions", "generate (all)")
    phases.wrap(trainer, "_compute_rewards", "reward model")
    phases.wrap(trainer, "_compute_logprobs", "log-prob forward (policy+ref)")
    return trainer


def run_worker(args) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rss_start = proc_status("VmRSS")
    import torch

    torch.set_num_threads(args.threads)
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    if args.impl == "trl":
        import trl
        versions["trl"] = trl.__version__
        build = build_trl
    else:
        import nashkern
        versions["nashkern"] = nashkern.__version__
        build = build_nashkern
    rss_import = proc_status("VmRSS")
    mdir = prepare(args) if args.prepare else model_dir_for(args)
    if not (mdir / "done").exists():
        raise SystemExit(f"{mdir} is not prepared (run with --prepare)")
    tok = AutoTokenizer.from_pretrained(mdir / "policy")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(mdir / "policy", dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(mdir / "reward", dtype=dtype)
    n_steps = args.warmup + args.steps
    dataset = Dataset.from_dict({"prompt": make_prompts(args.batch_size * n_steps, args.seed)})
    phases, times, cpu_times = Phases(), [], []
    with tempfile.TemporaryDirectory(prefix="bench-trainers-") as out_dir:
        trainer = build(args, args.method, model, reward, tok, dataset, out_dir, phases)
        phases.wrap(trainer.accelerator, "backward", "backward")
        profile_out: List[str] = []
        # --profile: torch.profiler around the last step (inflates that step's time)
        trainer.add_callback(make_step_timer(phases, times, cpu_times,
                                             n_steps - 1 if args.profile else None, profile_out))
        rss_setup, hwm_setup = proc_status("VmRSS"), proc_status("VmHWM")
        reset = reset_peak_rss()
        on_gpu = args.device == "cuda"
        if on_gpu:  # the models are on the device once the trainer is built
            torch.cuda.synchronize()
            gpu_setup = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t0
        load_after = os.getloadavg()[0]
        hwm_train = proc_status("VmHWM")
        gpu_peak = torch.cuda.max_memory_allocated() if on_gpu else None
    logs = [h for h in trainer.state.log_history if "val/model_contain_eos_token" in h]
    timed = times[args.warmup:]
    for s in phases.steps:  # TRL: policy generation = all generation - the mixture's
        if "generate (all)" in s:
            s["generate"] = s.pop("generate (all)") - s.get("generate (mixture)", 0.0)
    phase_medians = {}
    for name in sorted({k for s in phases.steps[args.warmup:] for k in s}):
        phase_medians[name] = statistics.median(s.get(name, 0.0)
                                                for s in phases.steps[args.warmup:])
    median = statistics.median(timed) if timed else float("nan")
    if timed:
        phase_medians["other"] = statistics.median(
            t - sum(s.values()) for t, s in zip(timed, phases.steps[args.warmup:]))
    return {
        "impl": args.impl, "method": args.method, "versions": versions, "dtype": args.dtype,
        "compile_decode": args.compile_decode,
        "device": torch.cuda.get_device_name() if on_gpu else device_name(),
        # GPU: torch.cuda.max_memory_allocated() over the training steps (models included)
        "gpu_after_setup_bytes": gpu_setup if on_gpu else None, "gpu_peak_bytes": gpu_peak,
        "threads": torch.get_num_threads(),
        "shape": {k: getattr(args, k) for k in ("vocab", "hidden", "layers", "heads", "kv_heads",
                                                 "batch_size", "max_new_tokens")},
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "reward_parameter_bytes": sum(p.numel() * p.element_size()
                                      for p in reward.parameters()),
        "warmup": args.warmup, "steps": args.steps, "step_times_s": times,
        "median_step_s": median, "step_cpu_s": cpu_times,
        "median_step_cpu_s": statistics.median(cpu_times[args.warmup:]) if timed else float("nan"),
        "train_s": total, "loadavg_1min": [load_before, load_after], "phases_median_s": phase_medians,
        "rss_start_bytes": rss_start, "rss_after_import_bytes": rss_import,
        "rss_after_setup_bytes": rss_setup, "hwm_setup_bytes": hwm_setup,
        "hwm_train_bytes": hwm_train if reset else None,
        "peak_rss_bytes": max(hwm_setup, hwm_train),
        "eos_fraction_policy": [h["val/model_contain_eos_token"] for h in logs],
        "eos_fraction_other": [h.get("val/ref_contain_eos_token") for h in logs],
        "loss": [h.get("loss") for h in trainer.state.log_history if "loss" in h],
        "profile": profile_out[0] if profile_out else None,
    }


# ----------------------------------------------------------------------------------------------
# contention and the memory-traffic floor
# ----------------------------------------------------------------------------------------------
BUSY_LOOP = "while True:\n    pass\n"


@contextlib.contextmanager
def competing_processes(n: int):
    """``n`` busy processes (a pure-Python spin loop each: one core's worth of work, no memory
    traffic) alive for the duration: the "contended" mode, one other busy process sharing the
    cores as a CI runner or a laptop's other work would. Killed (by pid) on exit."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(n)]
    try:
        time.sleep(0.5 if n else 0)
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def copy_bandwidth(threads: int, megabytes: int = 256, repeats: int = 5) -> float:
    """Memory bandwidth, bytes/s, of ``torch`` copying a ``megabytes`` float32 buffer (read +
    write counted) with ``threads`` intra-op threads: the best of ``repeats``. Measured in the
    same run (and under the same contention) as the steps it is compared with."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = megabytes * 2**20 // 4
        src, dst = torch.ones(n), torch.empty(n)
        dst.copy_(src)  # fault the pages in
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t)
        return 2 * n * 4 / best
    finally:
        torch.set_num_threads(old)


def step_floor_bytes(r: dict, method: str) -> Dict[str, float]:
    """Bytes one training step must move at least (fp32 weights; activations, KV caches and
    the tokenizer neglected: they are < 1 % here), by phase, from the worker's model sizes:

    * generation: every new token reads each sampling model's weights once (Nash-MD: the
      policy and the reference, once each for both samples: the one-pass floor; XPO: policy and
      reference, one sample each): ``T · 2 · W``;
    * scoring: the reward model over the ``2B`` completions: ``W_rm``;
    * statistics: the policy and the reference forward over the completions: ``2 · W``;
    * backward: the policy's weights read again (activation gradients) and their gradient
      written: ``2 · W``;
    * optimizer (AdamW): read parameters, gradients and both moments, write parameters and
      both moments: ``7 · W``.
    ``W`` = the policy's parameter bytes (the reference is a copy)."""
    W, W_rm = r["parameter_bytes"], r["reward_parameter_bytes"]
    T = r["shape"]["max_new_tokens"]
    return {"generation": T * 2 * W, "scoring": W_rm, "statistics": 2 * W, "backward": 2 * W,
            "optimizer": 7 * W}


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def worker_argv(args, impl: str, prepare_dir: bool) -> List[str]:
    argv = [str(Path(__file__).resolve()), "--impl", impl]
    for k in ("method", "vocab", "hidden", "layers", "heads", "kv_heads", "batch_size",
              "max_new_tokens", "warmup", "steps", "threads", "learning_rate", "temperature",
              "beta", "mixture_coef", "alpha", "seed", "device", "dtype"):
        argv += ["--" + k.replace("_", "-"), str(getattr(args, k))]
    if args.intermediate:
        argv += ["--intermediate", str(args.intermediate)]
    if args.compile_decode and impl == "nashkern":
        argv += ["--compile-decode", args.compile_decode]
    if args.model_dir:
        argv += ["--model-dir", str(args.model_dir)]
    if prepare_dir:
        argv.append("--prepare")
    return argv


def worker_env(threads: int, device: str) -> Dict[str, str]:
    """The worker's environment: ``threads`` intra-op threads; the GPU hidden on ``--device
    cpu`` only (so that neither library places anything there), visible on ``--device cuda``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1",
               PYTHONUNBUFFERED="1")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_subprocess(python: str, argv: List[str], threads: int, timeout: float,
                   device: str = "cpu") -> dict:
    env = worker_env(threads, device)
    env.pop("TRITON_INTERPRET", None)
    t = time.perf_counter()
    proc = subprocess.run([python] + argv, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            res["wall_s"] = time.perf_counter() - t
            return res
    raise RuntimeError(f"worker {python} {' '.join(argv)} failed (rc {proc.returncode}):\n"
                       f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")


def device_name() -> str:
    name = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name")), name)
    return f"{name} ({os.cpu_count()} cores)"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO,
                              capture_output=True, text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def fmt_bytes(n: Optional[float]) -> str:
    if n is None or n < 0:
        return "-"
    return f"{n / 2**20:,.0f} MiB"


def print_table(results: Dict[str, dict], method: str) -> dict:
    target = dict(TARGETS[method])
    if next(iter(results.values())).get("contended"):
        target["time"] = target.get("contended_time", target["time"])
    print(f"\n{method}: batch {next(iter(results.values()))['shape']['batch_size']}, "
          f"max_new_tokens {next(iter(results.values()))['shape']['max_new_tokens']}, "
          f"vocab {next(iter(results.values()))['shape']['vocab']}")
    hdr = ["impl", "time/step (median)", "steps (s)", "CPU s/step", "RSS after setup",
           "peak RSS",
           "peak - setup", "peak GPU", "EOS frac (policy/other)"]
    rows = [hdr]
    for impl, r in results.items():
        eos = (f"{statistics.mean(r['eos_fraction_policy'] or [0]):.3f}/"
               f"{statistics.mean([x or 0 for x in r['eos_fraction_other']] or [0]):.3f}")
        rows.append([impl, f"{r['median_step_s']:.3f} s",
                     " ".join(f"{t:.2f}" for t in r["step_times_s"]),
                     f"{r['median_step_cpu_s']:.3f} s",
                     fmt_bytes(r["rss_after_setup_bytes"]), fmt_bytes(r["peak_rss_bytes"]),
                     fmt_bytes(r["peak_rss_bytes"] - r["rss_after_setup_bytes"]),
                     fmt_bytes(r.get("gpu_peak_bytes")), eos])
    widths = [max(len(row[i]) for row in rows) for i in range(len(hdr))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("\nper-phase median (s):")
    names = []
    for r in results.values():
        names += [n for n in r["phases_median_s"] if n not in names]
    for n in names:
        print(f"  {n:32s}" + "".join(
            f"{impl:>10s} " + (f"{r['phases_median_s'][n]:8.3f}" if n in r["phases_median_s"]
                               else f"{'-':>8s}") for impl, r in results.items()))
    summary = {}
    bandwidth = next(iter(results.values())).get("copy_bandwidth")
    if bandwidth:
        floor = step_floor_bytes(next(iter(results.values())), method)
        floor_s = sum(floor.values()) / bandwidth
        summary["floor_s"] = floor_s
        print(f"\nmemory-traffic floor: {sum(floor.values()) / 1e9:.2f} GB per step ("
              + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in floor.items())
              + f") at {bandwidth / 1e9:.1f} GB/s (torch copy, this run, "
              f"{next(iter(results.values()))['threads']} thread(s)) = {floor_s:.3f} s/step")
        for impl, r in results.items():
            print(f"  {impl}: {r['median_step_s']:.3f} s/step = "
                  f"{r['median_step_s'] / floor_s:.1f}x the floor")
            summary[f"{impl}_over_floor"] = r["median_step_s"] / floor_s
    if "nashkern" in results and "trl" in results:
        nk, tr = results["nashkern"], results["trl"]
        speed = tr["median_step_s"] / nk["median_step_s"]
        cpu_speed = tr["median_step_cpu_s"] / nk["median_step_cpu_s"]
        mem = nk["peak_rss_bytes"] / tr["peak_rss_bytes"]
        if nk.get("gpu_peak_bytes") and tr.get("gpu_peak_bytes"):  # on a GPU: its memory
            mem = nk["gpu_peak_bytes"] / tr["gpu_peak_bytes"]
        inc = ((nk["peak_rss_bytes"] - nk["rss_after_setup_bytes"])
               / max(tr["peak_rss_bytes"] - tr["rss_after_setup_bytes"], 1))
        summary.update({"speedup": speed, "cpu_time_speedup": cpu_speed, "memory_ratio": mem,
                        "increment_ratio": inc, "time_target_met": speed >= target["time"],
                        "memory_target_met": mem <= target["memory"]})
        print(f"\ntime: TRL / nashkern = {speed:.2f}x (target >= {target['time']:g}x: "
              f"{'met' if summary['time_target_met'] else 'MISSED'}); "
              f"process CPU time per step: {cpu_speed:.2f}x")
        print(f"peak {'GPU memory' if nk.get('gpu_peak_bytes') else 'RSS'}: nashkern / TRL = {mem:.3f} (target <= {target['memory']:g}: "
              f"{'met' if summary['memory_target_met'] else 'MISSED'}); "
              f"peak increase over the post-setup RSS: {inc:.3f}")
    return summary


CSV_FIELDS = ["timestamp", "device", "threads", "torch", "transformers", "trl", "nashkern",
              "git_commit", "method", "impl", "vocab", "hidden", "layers", "batch_size",
              "max_new_tokens", "warmup", "steps", "median_step_s", "step_times_s",
              "median_step_cpu_s",
              "rss_after_setup_bytes", "peak_rss_bytes", "eos_fraction_policy", "loadavg_1min",
              "speedup_trl_over_nashkern", "memory_ratio_nashkern_over_trl", "contended",
              "copy_bandwidth_gbs", "floor_s", "note", "dtype", "gpu_after_setup_bytes",
              "gpu_peak_bytes"]


def append_csv(path: str, results: Dict[str, dict], summary: dict, note: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:  # rows written by an older version of this script: rewrite them under CSV_FIELDS
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old_fields, old_rows = reader.fieldnames, list(reader)
        if old_fields != CSV_FIELDS:
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
                w.writeheader()
                w.writerows(old_rows)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    dev, commit = device_name(), git_commit()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        for impl, r in results.items():
            v = r["versions"]
            w.writerow({
                "timestamp": now, "device": r.get("device") or dev, "threads": r["threads"], "torch": v["torch"],
                "transformers": v["transformers"], "trl": v.get("trl", ""),
                "nashkern": v.get("nashkern", ""), "git_commit": commit, "method": r["method"],
                "impl": (f"{impl} compile_decode={r['compile_decode']}"
                         if r.get("compile_decode") else impl), **{k: r["shape"][k] for k in ("vocab", "hidden", "layers",
                                                             "batch_size", "max_new_tokens")},
                "warmup": r["warmup"], "steps": r["steps"],
                "median_step_s": f"{r['median_step_s']:.4f}",
                "step_times_s": " ".join(f"{t:.3f}" for t in r["step_times_s"]),
                "median_step_cpu_s": f"{r['median_step_cpu_s']:.4f}",
                "rss_after_setup_bytes": r["rss_after_setup_bytes"],
                "peak_rss_bytes": r["peak_rss_bytes"],
                "loadavg_1min": " ".join(f"{x:.2f}" for x in r.get("loadavg_1min", [])),
                "eos_fraction_policy": f"{statistics.mean(r['eos_fraction_policy'] or [0]):.4f}",
                "speedup_trl_over_nashkern": (f"{summary['speedup']:.3f}"
                                              if "speedup" in summary else ""),
                "memory_ratio_nashkern_over_trl": (f"{summary['memory_ratio']:.4f}"
                                                   if "memory_ratio" in summary else ""),
                "contended": r.get("contended", 0),
                "copy_bandwidth_gbs": (f"{r['copy_bandwidth'] / 1e9:.2f}"
                                       if r.get("copy_bandwidth") else ""),
                "floor_s": f"{summary['floor_s']:.4f}" if summary.get("floor_s") else "",
                "note": note, "dtype": r.get("dtype", ""),
                "gpu_after_setup_bytes": r.get("gpu_after_setup_bytes") or "",
                "gpu_peak_bytes": r.get("gpu_peak_bytes") or ""})


def run_compare(args) -> int:
    pythons = {"nashkern": args.nashkern_python or str(DEFAULT_PYTHON["nashkern"]),
               "trl": args.trl_python or str(DEFAULT_PYTHON["trl"])}
    for impl in args.impls:
        if not Path(pythons[impl]).exists():
            print(f"{impl}: no python at {pythons[impl]} "
                  f"({'make bench-trl builds .venv-trl' if impl == 'trl' else 'make install'})",
                  file=sys.stderr)
            return 2
    results, failed = {}, False
    for i, impl in enumerate(args.impls):
        print(f"[{impl}] {pythons[impl]} ({args.warmup} warm-up + {args.steps} timed steps"
              + (f", {args.contended} competing busy process(es)" if args.contended else "")
              + ")", flush=True)
        try:
            with competing_processes(args.contended):
                bandwidth = copy_bandwidth(args.threads) if args.floor else None
                results[impl] = run_subprocess(pythons[impl], worker_argv(args, impl, i == 0),
                                               args.threads, args.timeout, args.device)
        except (KeyboardInterrupt, subprocess.TimeoutExpired, RuntimeError) as exc:
            # a failed worker (the next one still runs) or a deadline (SIGINT from
            # scripts/device_check.py, or --timeout: none does): the finished rows are written
            print(f"[{impl}] no result: {type(exc).__name__}: {str(exc)[-6000:]}", flush=True)
            failed = True
            if isinstance(exc, RuntimeError):
                continue
            break
        r = results[impl]
        r["copy_bandwidth"], r["contended"] = bandwidth, args.contended
        gpu = (f", peak GPU {fmt_bytes(r['gpu_peak_bytes'])}" if r.get("gpu_peak_bytes")
               else "")
        print(f"[{impl}] median {r['median_step_s']:.3f} s/step "
              f"(CPU {r['median_step_cpu_s']:.3f} s), peak RSS {fmt_bytes(r['peak_rss_bytes'])}"
              f"{gpu} "
              f"({r['wall_s']:.0f} s wall; 1-min load average {r['loadavg_1min'][0]:.2f} before "
              f"training, {r['loadavg_1min'][1]:.2f} after)", flush=True)
    if not results:
        return 1
    print(f"\ndevice: {next(iter(results.values())).get('device') or device_name()}, "
          f"{args.threads} intra-op thread(s); git {git_commit()}")
    for impl, r in results.items():
        print(f"  {impl}: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()))
    summary = print_table(results, args.method)
    if args.csv:
        append_csv(args.csv, results, summary, args.note)
        print(f"\nappended {len(results)} rows to {args.csv}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "summary": summary},
                                              indent=1))
    return 1 if failed else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    role = p.add_mutually_exclusive_group(required=True)
    role.add_argument("--impl", choices=IMPLS, help="worker: run one implementation here")
    role.add_argument("--compare", action="store_true",
                      help="driver: run --impls, each in its own venv, and compare")
    p.add_argument("--method", choices=METHODS, default="nash_md")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default 2 x hidden)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where both trainers run (TrainingArguments.use_cpu)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="weights as loaded; bf16 also sets TrainingArguments.bf16")
    p.add_argument("--check-args", action="store_true",
                   help="print the worker command lines and exit (scripts/device_check.py "
                        "--dry-run)")
    p.add_argument("--compile-decode", default=None,
                   choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
                   help="nashkern only: the config field compile_decode (the decode forward "
                        "compiled at the first warm-up step); its CSV rows' impl says so")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both impls)")
    p.add_argument("--learning-rate", type=float, default=1e-6)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--mixture-coef", type=float, default=0.5)
    p.add_argument("--alpha", type=float, default=1e-5, help="XPO exploration weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", default=None,
                   help=f"where the shared weights are saved (default {DEFAULT_CACHE})")
    p.add_argument("--profile", action="store_true",
                   help="worker: torch.profiler table of the last step on stderr (slows it)")
    p.add_argument("--prepare", action="store_true",
                   help="worker: build and save the models first if missing")
    p.add_argument("--nashkern-python", default=None, help="default .venv/bin/python")
    p.add_argument("--trl-python", default=None, help="default .venv-trl/bin/python")
    p.add_argument("--timeout", type=float, default=3600, help="per worker, seconds")
    p.add_argument("--csv", default=None, help="driver: append one row per impl")
    p.add_argument("--json", default=None, help="driver: write all results as JSON")
    p.add_argument("--note", default="", help="driver: free text stored in the CSV rows")
    p.add_argument("--contended", type=int, default=0, metavar="N",
                   help="driver: N competing busy processes (spin loops) run beside each worker "
                        "(the 'contended' mode; 0: none)")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="driver: skip the copy-bandwidth measurement and the floor")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check_args:
        for impl in args.impls:
            print(" ".join(worker_argv(args, impl, prepare_dir=False)))
        return 0
    if args.compare:
        return run_compare(args)
    res = run_worker(args)
    if res.get("profile"):
        print(res["profile"], file=sys.stderr)
    print(RESULT_TAG + json.dumps(res), flush=True)
    print(f"{args.impl} {args.method}: median {res['median_step_s']:.3f} s/step over "
          f"{args.steps} steps, peak RSS {fmt_bytes(res['peak_rss_bytes'])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
