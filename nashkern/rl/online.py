"""What the online preference trainers share: :class:`OnlinePreferenceConfig` and
:class:`OnlinePreferenceTrainer`, a thin ``transformers.Trainer`` subclass.

The base class sets up the models (a path is loaded with ``trust_remote_code`` off; PEFT from
``peft_config`` or a ``PeftModel``; the reference is ``ref_model``, else the PEFT base with the
adapters disabled, else a frozen copy), the tokenizer (pad = EOS when it has no pad token), the
scorer (exactly one of ``reward_model``, ``judge``, ``reward_funcs``; the reward tokenizer is kept
only when it differs from the policy's), the prompt collator, the sampling generator (re-seeded
from (seed, rank, step, micro-batch) at every step, so a resumed run draws what the uninterrupted
run drew), decoding, scoring, metric gathering and logging, and ``training_step``.

A method subclass (:class:`~nashkern.rl.nash_md.NashMDTrainer`, :class:`~nashkern.rl.xpo.XPOTrainer`,
:class:`~nashkern.rl.online_dpo.OnlineDPOTrainer`) implements ``compute_loss``: generation →
scoring → fused log-probs (:func:`~nashkern.rl.completion_stats.completion_stats`, no ``[B, T, V]``
logits) → its loss (:mod:`nashkern.rl.losses`) → ``self._record_metrics``.
"""
from __future__ import annotations

import importlib.util
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer, PreTrainedTokenizerBase, Trainer,
                          TrainingArguments)

from . import engines
from .generation import GenerationOutput, SamplingParams
from .judges import BasePairwiseJudge
from .pairs import first_preferred
from .scoring import (apply_missing_eos_penalty, reward_funcs_scores, reward_model_scores,
                      same_tokenizer)


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------
@dataclass
class OnlinePreferenceConfig(TrainingArguments):
    """Training arguments shared by the online preference trainers (the generation, scoring and
    ``beta`` fields of the original configs). Fields named in ``_schedules`` take a float or a
    list (one value per epoch; the last value is kept after the list ends)."""

    _schedules: ClassVar[Tuple[str, ...]] = ("beta",)

    learning_rate: float = field(default=5e-7, metadata={"help": "Initial learning rate."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X updates steps."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per completion."})
    max_length: int = field(default=512, metadata={
        "help": "Maximum prompt + completion length; prompts are truncated from the left."})
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature."})
    top_k: Optional[int] = field(default=None, metadata={"help": "Top-k filtering (None: off)."})
    top_p: Optional[float] = field(default=None, metadata={"help": "Top-p filtering (None: off)."})
    min_p: Optional[float] = field(default=None, metadata={"help": "Min-p filtering (None: off)."})
    repetition_penalty: Optional[float] = field(default=None, metadata={
        "help": "Repetition penalty (None or 1: off)."})
    missing_eos_penalty: Optional[float] = field(default=None, metadata={
        "help": "Subtracted from the scores of completions without EOS."})
    beta: List[float] = field(default_factory=lambda: [0.1], metadata={
        "help": "KL weight: a float or one value per epoch (last one kept)."})
    disable_dropout: bool = field(default=True, metadata={"help": "Disable dropout in the models."})
    reward_model_path: Optional[str] = field(default=None, metadata={"help": "Reward model path."})
    judge: Optional[str] = field(default=None, metadata={"help": "Judge name (pair_rm)."})
    model_init_kwargs: Optional[Dict[str, Any]] = field(default=None, metadata={
        "help": "kwargs of AutoModelForCausalLM.from_pretrained when the model is a path."})
    reward_weights: Optional[List[float]] = field(default=None, metadata={
        "help": "Weights of the reward functions (default: all 1)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False."})
    ds3_gather_for_generation: bool = field(default=True, metadata={
        "help": "DeepSpeed ZeRO-3: gather the policy's weights once for generation (faster); "
                "off, every generation forward gathers layer by layer (fits models larger "
                "than one device)."})
    allow_unfused_head: bool = field(default=False, metadata={
        "help": "When the output head cannot be separated from the model (so the fused "
                "log-probs cannot run): False raises; True runs the model's own logits in row "
                "chunks, with a warning."})
    warmup_ratio: Optional[float] = field(default=None, metadata={
        "help": "Linear warmup over this fraction of the steps (sets warmup_steps; the "
                "original script's argument)."})

    def __post_init__(self):
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = float(self.warmup_ratio)
        for name in self._schedules:
            setattr(self, name, _as_list(name, getattr(self, name)))
        if any(b < 0 for b in self.beta):
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.max_new_tokens < 1 or self.max_length <= self.max_new_tokens:
            raise ValueError("need 1 <= max_new_tokens < max_length")
        if self.reward_weights is not None:
            self.reward_weights = [float(w) for w in self.reward_weights]
        super().__post_init__()


def _as_list(name, value) -> List[float]:
    if isinstance(value, (int, float)):
        return [float(value)]
    value = [float(v) for v in value]
    if not value:
        raise ValueError(f"{name} must be a float or a non-empty list of floats")
    return value


def _per_epoch(values: List[float], epoch: float) -> float:
    # The original indexed the list with the float ``state.epoch`` (a TypeError for a list);
    # the documented behaviour is one value per epoch, the last one kept.
    return values[min(int(epoch or 0), len(values) - 1)]


def _is_conversational(prompt) -> bool:
    return isinstance(prompt, list) and len(prompt) > 0 and isinstance(prompt[0], dict) \
        and "role" in prompt[0]


def _disable_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


class PromptCollator:
    """Prompt-only examples -> left-padded ``input_ids`` / ``attention_mask`` + prompt texts
    (the chat template applied to conversational prompts) + the raw prompts and the other
    columns (passed to reward functions as keyword arguments)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, features):
        texts = []
        for f in features:
            p = f["prompt"]
            if _is_conversational(p):
                p = self.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            texts.append(p)
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            self.tokenizer.padding_side = side
        columns = {k: [f[k] for f in features] for k in features[0] if k != "prompt"}
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "prompts": texts, "raw_prompts": [f["prompt"] for f in features],
                "columns": columns}


# ------------------------------------------------------------------------------------------------
# trainer
# ------------------------------------------------------------------------------------------------
def model_load_kwargs(model_init_kwargs: Optional[Dict[str, Any]] = None, *,
                      trust_remote_code: bool = False) -> Dict[str, Any]:
    """``from_pretrained`` kwargs of a policy / reference loaded from a path.

    ``trust_remote_code`` stays off unless asked. flash-attention is used when it can be and is
    never required: with no ``attn_implementation`` given, ``"flash_attention_2"`` is chosen
    when the ``flash_attn`` package is installed, a GPU is present and the model is loaded in
    bf16/fp16 (flash-attention's dtypes); otherwise transformers' default (SDPA) stays."""
    kw = dict(model_init_kwargs or {})
    kw.setdefault("trust_remote_code", trust_remote_code)
    if "attn_implementation" not in kw:
        dtype = kw.get("dtype", kw.get("torch_dtype"))
        half = dtype in (torch.bfloat16, torch.float16, "bfloat16", "float16", "bf16", "fp16")
        if half and torch.cuda.is_available() and importlib.util.find_spec("flash_attn"):
            kw["attn_implementation"] = "flash_attention_2"
    return kw


class OnlinePreferenceTrainer(Trainer):
    """Base class of the online preference trainers (see the module docstring). Subclasses set
    ``config_class`` and implement ``compute_loss``."""

    config_class = OnlinePreferenceConfig
    _tag_names = ["nashkern"]
    _default_output_dir = "online-preference"

    def __init__(self, model: Union[str, nn.Module], ref_model: Optional[nn.Module] = None,
                 reward_model: Optional[Union[str, nn.Module]] = None,
                 judge: Optional[BasePairwiseJudge] = None,
                 reward_funcs: Optional[Union[Callable, List[Callable]]] = None,
                 args: Optional[OnlinePreferenceConfig] = None, data_collator=None,
                 train_dataset=None, eval_dataset=None,
                 processing_class: Optional[PreTrainedTokenizerBase] = None,
                 peft_config=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), preprocess_logits_for_metrics=None,
                 reward_processing_class: Optional[PreTrainedTokenizerBase] = None):
        args = args if args is not None else self.config_class(output_dir=self._default_output_dir)
        if not isinstance(args, self.config_class):
            raise TypeError(f"args must be a {self.config_class.__name__}, got "
                            f"{type(args).__name__}")
        reward_funcs = self._check_scorers(args, reward_model, judge, reward_funcs)
        model, model_path = self._load_policy(model, args)
        if ref_model is not None and ref_model is model:
            raise ValueError("model and ref_model cannot be the same object: omit ref_model to "
                             "use a frozen copy (or the PEFT base) as the reference")
        tok = self._load_tokenizer(processing_class, model_path)
        model = self._wrap_peft(model, peft_config)
        self.ref_model = self._make_reference(model, ref_model)
        self.reward_model, reward_processing_class = self._load_reward_model(
            reward_model, reward_processing_class)
        self.reward_processing_class = (None if same_tokenizer(tok, reward_processing_class)
                                        else reward_processing_class)
        self.judge = judge
        self.reward_funcs = reward_funcs
        if args.disable_dropout:
            _disable_dropout(model)
            if self.ref_model is not None:
                _disable_dropout(self.ref_model)
        self._check_datasets(train_dataset=train_dataset, eval_dataset=eval_dataset)
        args.remove_unused_columns = False
        super().__init__(model=model, args=args,
                         data_collator=data_collator or PromptCollator(tok),
                         train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=tok, compute_metrics=compute_metrics,
                         callbacks=callbacks, optimizers=optimizers,
                         preprocess_logits_for_metrics=preprocess_logits_for_metrics)
        self._prepare_reference()
        if self.reward_model is not None:
            self.reward_model.to(self.accelerator.device)
        self.stats: Dict[str, List[float]] = defaultdict(list)
        self.last_samples: List[Dict[str, Any]] = []
        self._generator = None
        self._micro_step, self._micro = None, 0  # (optimizer step, micro-batch) of the last draw

    # -- set-up steps (called once, in this order, by __init__) ----------------------------------
    def _check_scorers(self, args, reward_model, judge, reward_funcs):
        """Exactly one of reward_model / judge / reward_funcs; returns reward_funcs as a list."""
        if isinstance(reward_funcs, Callable) and not isinstance(reward_funcs, nn.Module):
            reward_funcs = [reward_funcs]
        given = [n for n, v in (("reward_model", reward_model), ("judge", judge),
                                ("reward_funcs", reward_funcs)) if v]
        if len(given) != 1:
            raise ValueError(f"{type(self).__name__} needs exactly one of reward_model, judge or "
                             f"reward_funcs; got {given or 'none'}")
        if args.reward_weights is not None and (
                not reward_funcs or len(args.reward_weights) != len(reward_funcs)):
            raise ValueError(f"reward_weights ({len(args.reward_weights)}) needs one weight per "
                             f"reward function ({len(reward_funcs or [])})")
        return reward_funcs

    def _load_policy(self, model, args):
        """The policy (loaded when ``model`` is a path) -> (model, path or None)."""
        model_path = model if isinstance(model, str) else None
        if model_path is not None:
            kw = model_load_kwargs(args.model_init_kwargs)
            model = AutoModelForCausalLM.from_pretrained(model_path, **kw)
        if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
            raise ValueError(f"model must be a causal language model with an output embedding "
                             f"(an AutoModelForCausalLM), got {type(model).__name__}")
        return model, model_path

    @staticmethod
    def _load_tokenizer(processing_class, model_path):
        """The policy's tokenizer, with a pad token (EOS when it has none) and an EOS token."""
        if processing_class is None:
            if model_path is None:
                raise ValueError("processing_class (the tokenizer) is required when model is "
                                 "not a path")
            processing_class = AutoTokenizer.from_pretrained(model_path)
        tok = processing_class
        if tok.pad_token is None:
            warnings.warn("the tokenizer has no pad token: using the EOS token as padding")
            tok.pad_token = tok.eos_token
        if tok.eos_token_id is None:
            raise ValueError("the tokenizer needs an EOS token")
        return tok

    def _wrap_peft(self, model, peft_config):
        """Wrap the policy in PEFT adapters when ``peft_config`` is given; sets ``is_peft``."""
        self.is_peft = False
        if peft_config is not None:
            try:
                from peft import get_peft_model
            except ImportError as e:
                raise ImportError("peft_config needs the `peft` package: pip install peft") from e
            model = get_peft_model(model, peft_config)
            self.is_peft = True
        elif type(model).__name__.startswith("Peft"):
            self.is_peft = True
        return model

    def _make_reference(self, model, ref_model):
        """The frozen reference: ``ref_model``, else None under PEFT (the base with adapters
        disabled), else a frozen copy of the policy."""
        if ref_model is None and not self.is_peft:
            ref_model = engines.copy_reference(model)  # a ZeRO-3-initialised one shard by shard
        if ref_model is not None:
            ref_model.eval()
            ref_model.requires_grad_(False)
        return ref_model

    def _prepare_reference(self):
        """(After ``Trainer.__init__``, which made the accelerator.) The reference prepared by
        the training engine: sharded under FSDP1 / FSDP2 / ZeRO-3 (frozen, no optimizer), never
        a full copy per rank; on the device otherwise."""
        if self.ref_model is not None:
            self.ref_model = engines.prepare_reference(self.accelerator, self.ref_model)

    @staticmethod
    def _load_reward_model(reward_model, reward_processing_class):
        """The frozen reward model (loaded when a path) -> (model or None, its tokenizer)."""
        if isinstance(reward_model, str):
            path = reward_model
            reward_model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, trust_remote_code=False)
            if reward_processing_class is None:
                reward_processing_class = AutoTokenizer.from_pretrained(path)
        if reward_model is not None:
            reward_model.eval()
            reward_model.requires_grad_(False)
        return reward_model, reward_processing_class

    @staticmethod
    def _check_datasets(**datasets):
        """Every given dataset has a 'prompt' column and at least one row."""
        for split, ds in datasets.items():
            if ds is None:
                continue
            cols = getattr(ds, "column_names", None)
            if cols is not None and "prompt" not in cols:
                raise ValueError(f"{split} needs a 'prompt' column, got columns {cols}")
            if len(ds) == 0:
                raise ValueError(f"{split} is empty")

    # -- schedules ----------------------------------------------------------------------------
    def _scheduled(self, name: str) -> float:
        return _per_epoch(getattr(self.args, name), self.state.epoch)

    @property
    def beta(self) -> float:
        return self._scheduled("beta")

    # -- step pieces --------------------------------------------------------------------------
    def _sampling_params(self) -> SamplingParams:
        a = self.args
        return SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                              top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                              repetition_penalty=a.repetition_penalty)

    def _generation_kwargs(self, generator: torch.Generator) -> Dict[str, Any]:
        """Keyword arguments of :func:`~nashkern.rl.generation.generate` for this step."""
        tok = self.processing_class
        return dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                    params=self._sampling_params(), max_length=self.args.max_length,
                    generator=generator, **self._engine_generation_kwargs())

    def _engine_generation_kwargs(self) -> Dict[str, Any]:
        """Rank-synchronised stepping and the gathering the training engine needs
        (:mod:`nashkern.rl.engines`)."""
        policy, ref = self.model_wrapped, self.ref_model
        gather = self.args.ds3_gather_for_generation
        return dict(synced_gpus=engines.needs_synced_generation(policy, ref),
                    gather_context=lambda: engines.generation_context(policy, ref,
                                                                      gather_zero3=gather))

    def _ref(self, unwrapped):
        """``(reference model, context factory)``: the given / copied reference, or the PEFT
        model itself under ``disable_adapter`` (the base model)."""
        if self.ref_model is not None:
            return self.ref_model, None
        return unwrapped, unwrapped.disable_adapter  # PEFT base, adapters disabled

    def _gen(self, device) -> torch.Generator:
        """The sampling generator, re-seeded from (seed, process, optimizer step, micro-batch)
        at every call: samples depend only on where training is, so a run resumed from a
        checkpoint draws exactly what the uninterrupted run drew, and ranks draw differently."""
        step = int(self.state.global_step)
        self._micro = self._micro + 1 if self._micro_step == step else 0
        self._micro_step = step
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device)
        key = [self.args.seed, self.args.process_index, step, self._micro]
        self._generator.manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0]
                                        >> np.uint64(1)))
        return self._generator

    def _decode(self, ids, mask) -> List[str]:
        return [self.processing_class.decode(row[m.bool()], skip_special_tokens=True)
                for row, m in zip(ids, mask)]

    def _scores(self, inputs, gen: GenerationOutput, completions: List[str]) -> torch.Tensor:
        """Scores ``[N]`` (reward model or reward functions, ``missing_eos_penalty`` applied) of
        ``N`` completions, ``N`` a multiple of the batch: the prompts repeat in order (the
        stacked samples of :func:`~nashkern.rl.pairs.concat_generations`)."""
        tok = self.processing_class
        reps = len(completions) // len(inputs["prompts"])
        if self.reward_model is not None:
            full = [p + c for p, c in zip(inputs["prompts"] * reps, completions)]
            scores = reward_model_scores(
                self.reward_model, gen.input_ids, gen.attention_mask,
                pad_token_id=tok.pad_token_id, texts=full,
                reward_tokenizer=self.reward_processing_class)
        else:
            raw = inputs["raw_prompts"] * reps
            comps = completions
            if _is_conversational(raw[0]):
                comps = [[{"role": "assistant", "content": c}] for c in completions]
            ids = [row[m.bool()].tolist() for row, m in zip(gen.completion_ids,
                                                              gen.completion_mask)]
            columns = {k: list(v) * reps for k, v in inputs.get("columns", {}).items()}
            scores = reward_funcs_scores(self.reward_funcs, raw, comps, ids,
                                         weights=self.args.reward_weights, **columns)
        scores = scores.to(gen.completion_ids.device)
        return apply_missing_eos_penalty(scores, gen.completion_ids, tok.eos_token_id,
                                         self.args.missing_eos_penalty)

    def _judge_choices(self, prompts: List[str], pairs: List[Tuple[str, str]]) -> List[int]:
        choices = self.judge.judge(prompts, pairs)
        if len(choices) != len(pairs):
            raise ValueError(f"the judge returned {len(choices)} choices for {len(pairs)} pairs")
        return [int(c) for c in choices]

    def _preference(self, inputs, samples: GenerationOutput, texts: List[str]):
        """For stacked ``first ‖ second`` samples (``2B`` rows): ``(first_chosen [B] bool,
        scores [2B] or None)`` from the judge, or from one scoring pass over the ``2B`` rows."""
        B = len(inputs["prompts"])
        device = samples.completion_ids.device
        if self.judge is not None:
            choices = self._judge_choices(inputs["prompts"], list(zip(texts[:B], texts[B:])))
            return first_preferred(judge_choices=choices, device=device), None
        scores = self._scores(inputs, samples, texts)
        return first_preferred(scores=scores[:B], other_scores=scores[B:]), scores

    # -- metrics ------------------------------------------------------------------------------
    def _record_metrics(self, metrics: Dict[str, Union[torch.Tensor, float]]) -> None:
        """Append one value per metric to ``self.stats``: tensors (per prompt, ``[B]``) are
        gathered across processes and averaged; floats (schedules) are kept as they are."""
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor):
                v = self.accelerator.gather_for_metrics(
                    v.detach().float().reshape(-1)).mean().item()
            self.stats[k].append(float(v))

    # -- Trainer hooks ------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss")

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        loss = loss / self.args.gradient_accumulation_steps
        self.accelerator.backward(loss)
        return loss.detach()

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        if self.stats and self.model is not None and "loss" in logs:
            for k, v in self.stats.items():
                logs[k] = sum(v) / len(v)
            self.stats.clear()
        return super().log(logs, start_time)
