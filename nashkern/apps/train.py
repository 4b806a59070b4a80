"""``nashkern train``: the original example scripts (``examples/scripts/nash_md.py``,
``xpo.py``, ``online_dpo.py``) on nashkern's trainers. ``--method
nash_md|nash_ema|xpo|online_dpo`` (hyphens accepted: ``nash-ema``; default ``nash_md``) picks
the trainer and its config; the rest is parsed by ``HfArgumentParser`` over
:class:`ScriptArguments` and that config. Runs under ``accelerate launch`` as well as plain
``python -m nashkern train``."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "Policy model (hub name or local path)."})
    dataset_name: str = field(metadata={
        "help": "Hub dataset name, or a local .json/.jsonl/.parquet file with a 'prompt' column."})
    dataset_config: Optional[str] = field(default=None)
    dataset_train_split: str = field(default="train")
    dataset_test_split: str = field(default="test")
    ref_model_path: Optional[str] = field(default=None)
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters."})
    lora_r: int = field(default=16)
    lora_alpha: int = field(default=32)
    lora_dropout: float = field(default=0.05)
    lora_target_modules: Optional[List[str]] = field(default=None)
    dtype: Optional[str] = field(default=None, metadata={
        "help": "Model dtype: auto, bfloat16, float16 or float32 (default: the checkpoint's)."})
    attn_implementation: Optional[str] = field(default=None, metadata={
        "help": "eager, sdpa or flash_attention_2 (default: flash_attention_2 when flash_attn "
                "is installed, on a GPU, in bf16/fp16; else transformers' default)."})


def load_prompts(name: str, config: Optional[str], split: str):
    from datasets import load_dataset

    ext = os.path.splitext(name)[1].lower()
    if os.path.isfile(name) and ext in (".json", ".jsonl", ".parquet"):
        kind = "parquet" if ext == ".parquet" else "json"
        return load_dataset(kind, data_files={split: name}, split=split)
    return load_dataset(name, config, split=split)


METHODS = {"nash_md": ("nash_md", "NashMDConfig", "NashMDTrainer"),
           "nash_ema": ("nash_ema", "NashEMAConfig", "NashEMATrainer"),
           "xpo": ("xpo", "XPOConfig", "XPOTrainer"),
           "online_dpo": ("online_dpo", "OnlineDPOConfig", "OnlineDPOTrainer")}


def split_method(argv) -> tuple:
    """``(method, remaining argv)``: ``--method X`` / ``--method=X`` taken out (default
    ``nash_md``)."""
    import argparse

    pre = argparse.ArgumentParser(prog="nashkern train", add_help=False)
    # nash-ema / nash_ema (and nash-md, online-dpo) name the same method
    pre.add_argument("--method", default="nash_md", choices=sorted(METHODS),
                     type=lambda name: name.replace("-", "_"))
    known, rest = pre.parse_known_args(argv)
    return known.method, rest


def main(argv=None) -> int:
    import importlib
    import sys

    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer, HfArgumentParser)

    import torch

    from ..rl.callbacks import LogCompletionsCallback
    from ..rl.trainer_setup import model_load_kwargs
    from ..rl.judges import PairRMJudge, RandomPairwiseJudge

    method, argv = split_method(sys.argv[1:] if argv is None else list(argv))
    module, config_name, trainer_name = METHODS[method]
    module = importlib.import_module(f"nashkern.rl.{module}")
    Config, Trainer = getattr(module, config_name), getattr(module, trainer_name)
    parser = HfArgumentParser(
        (ScriptArguments, Config), prog=f"nashkern train --method {method}",
        description=f"--method {{{','.join(METHODS)}}} (default nash_md) picks the trainer; "
                    f"the arguments below are those of {config_name}.")
    script, args = parser.parse_args_into_dataclasses(args=argv)
    init = dict(args.model_init_kwargs or {})
    if script.dtype is not None:
        dtypes = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16,
                  "float32": torch.float32}
        if script.dtype not in dtypes:
            raise ValueError(f"--dtype must be one of {sorted(dtypes)}, got {script.dtype!r}")
        init["dtype"] = dtypes[script.dtype]
    if script.attn_implementation is not None:
        init["attn_implementation"] = script.attn_implementation
    kw = model_load_kwargs(init, trust_remote_code=args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(script.model_name_or_path, **kw)
    tok = AutoTokenizer.from_pretrained(script.model_name_or_path, padding_side="left",
                                        trust_remote_code=args.trust_remote_code)
    ref = (AutoModelForCausalLM.from_pretrained(script.ref_model_path, **kw)
           if script.ref_model_path else None)
    reward_model = reward_tok = judge = None
    if args.reward_model_path:
        reward_model = AutoModelForSequenceClassification.from_pretrained(
            args.reward_model_path, num_labels=1, trust_remote_code=args.trust_remote_code)
        reward_tok = AutoTokenizer.from_pretrained(args.reward_model_path)
    if args.judge:
        judges = {"pair_rm": PairRMJudge, "random": RandomPairwiseJudge}
        if args.judge not in judges:
            raise ValueError(f"--judge must be one of {sorted(judges)}, got {args.judge!r}")
        judge = judges[args.judge]()
    peft_config = None
    if script.use_peft:
        from peft import LoraConfig
        peft_config = LoraConfig(r=script.lora_r, lora_alpha=script.lora_alpha,
                                 lora_dropout=script.lora_dropout,
                                 target_modules=script.lora_target_modules or "all-linear",
                                 task_type="CAUSAL_LM")
    args.model_init_kwargs = None  # used above: the trainer receives the loaded models
    train = load_prompts(script.dataset_name, script.dataset_config, script.dataset_train_split)
    trainer = Trainer(model=model, ref_model=ref, reward_model=reward_model, judge=judge,
                      args=args, train_dataset=train, processing_class=tok,
                      peft_config=peft_config, reward_processing_class=reward_tok)
    trainer.add_callback(LogCompletionsCallback(trainer, num_prompts=8))
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    if args.push_to_hub:
        trainer.push_to_hub(dataset_name=script.dataset_name)
    return 0
