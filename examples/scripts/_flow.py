"""The flow TRL 1.13's example scripts (``examples/scripts/{nash_md,xpo,online_dpo}.py``) follow,
written for nashkern's trainers: parse ``ScriptArguments`` + the method's config +
``ModelArguments`` from the command line, load the policy, a reference copy (none under LoRA:
the base model with the adapters disabled is the reference), the reward model or a judge, the
tokenizer and the data set, train, save, and push to the Hub with the data set named in the
model card. The same command lines as TRL's scripts (``--model_name_or_path``,
``--reward_model_path``, ``--dataset_name``, ``--push_to_hub``, ``--use_peft`` …); on a machine
without a bf16 GPU add ``--use_cpu`` (the configs default to bf16, as TRL 1.13's do).

Usage (TRL's documented command; ``<method>`` is ``nash_md``, ``xpo`` or ``online_dpo``, and the
output folder ``pythia-1b-tldr-nash-md``, ``-xpo`` or ``-online-dpo``)::

    python examples/scripts/<method>.py \\
        --model_name_or_path trl-lib/pythia-1b-deduped-tldr-sft \\
        --reward_model_path trl-lib/pythia-1b-deduped-tldr-rm \\
        --dataset_name trl-lib/tldr \\
        --learning_rate 5.0e-7 \\
        --output_dir pythia-1b-tldr-<method> \\
        --per_device_train_batch_size 4 \\
        --gradient_accumulation_steps 32 \\
        --num_train_epochs 3 \\
        --max_new_tokens 64 \\
        --warmup_ratio 0.1 \\
        --missing_eos_penalty 1.0 \\
        --push_to_hub

LoRA: add ``--use_peft --lora_r 16 --lora_alpha 32``. Under accelerate: ``accelerate launch
--config_file examples/accelerate/<engine>.yaml examples/scripts/<method>.py ...``.
TRL's PairRM commands replace ``--reward_model_path`` with ``--judge pair_rm`` (needs
``pip install llm-blender``). tests/rl/test_user_paths.py runs these commands on tiny local
checkpoints (the PairRM ones with a local stand-in for llm-blender's ranker)."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import List, Optional

#: chat template for a tokenizer without one (one turn per line, the assistant's turn open)
PLAIN_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}assistant: {% endif %}")


@dataclass
class ScriptArguments:
    dataset_name: str = field(metadata={"help": "Hub data set, or a local directory / file."})
    dataset_config: Optional[str] = field(default=None)
    dataset_train_split: str = field(default="train")
    dataset_test_split: str = field(default="test")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Policy checkpoint (Hub id or path)."})
    model_revision: str = field(default="main")
    dtype: Optional[str] = field(default=None, metadata={
        "help": "auto, bfloat16, float16 or float32 (default: the checkpoint's)."})
    attn_implementation: Optional[str] = field(default=None)
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters."})
    lora_r: int = field(default=16)
    lora_alpha: int = field(default=32)
    lora_dropout: float = field(default=0.05)
    lora_target_modules: Optional[List[str]] = field(default=None)


def run(Trainer, Config, argv: Optional[List[str]] = None):
    """Parse ``argv`` (default ``sys.argv[1:]``), train with ``Trainer``, save, push."""
    import torch
    from datasets import load_dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer, HfArgumentParser)

    from nashkern.rl.callbacks import LogCompletionsCallback
    from nashkern.rl.judges import PairRMJudge, RandomPairwiseJudge

    parser = HfArgumentParser((ScriptArguments, Config, ModelArguments))
    script, args, model_args = parser.parse_args_into_dataclasses(
        args=sys.argv[1:] if argv is None else argv)
    dtype = model_args.dtype
    if dtype not in (None, "auto"):
        dtype = getattr(torch, dtype)
    load = dict(revision=model_args.model_revision, dtype=dtype,
                trust_remote_code=args.trust_remote_code)
    if model_args.attn_implementation is not None:
        load["attn_implementation"] = model_args.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **load)
    peft_config = ref_model = None
    if model_args.use_peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                                 lora_dropout=model_args.lora_dropout, task_type="CAUSAL_LM",
                                 target_modules=model_args.lora_target_modules or "all-linear")
    else:
        ref_model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **load)
    scorer = {}
    if args.reward_model_path is not None:
        scorer["reward_funcs"] = AutoModelForSequenceClassification.from_pretrained(
            args.reward_model_path, num_labels=1, **load)
    if args.judge is not None:
        scorer["judge"] = {"pair_rm": PairRMJudge, "random": RandomPairwiseJudge}[args.judge]()
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, padding_side="left",
                                              trust_remote_code=args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    data = load_dataset(script.dataset_name, name=script.dataset_config)
    evaluating = args.eval_strategy != "no"
    trainer = Trainer(model=model, ref_model=ref_model, args=args,
                      train_dataset=data[script.dataset_train_split],
                      eval_dataset=data[script.dataset_test_split] if evaluating else None,
                      processing_class=tokenizer, peft_config=peft_config, **scorer)
    if evaluating:
        trainer.add_callback(LogCompletionsCallback(trainer, num_prompts=8))
    trainer.train()
    trainer.save_model(args.output_dir)
    if args.push_to_hub:
        trainer.push_to_hub(dataset_name=script.dataset_name)
    return trainer
