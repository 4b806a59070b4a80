"""What the online preference trainers share: :class:`OnlinePreferenceConfig` and
:class:`OnlinePreferenceTrainer`, a thin ``transformers.Trainer`` subclass.

The base class sets up the models (a path is loaded with ``trust_remote_code`` off; PEFT from
``peft_config`` or a ``PeftModel``; the reference is ``ref_model``, else the PEFT base with the
adapters disabled, else a frozen copy), the tokenizer (pad = EOS when it has no pad token), the
scorer (exactly one of ``reward_model``, ``judge``, ``reward_funcs``; the reward tokenizer is kept
only when it differs from the policy's), the prompt collator, the sampling generator (re-seeded
from (seed, rank, step, micro-batch) at every step, so a resumed run draws what the uninterrupted
run drew), decoding, scoring, metric gathering and logging, and ``training_step``.

The trainers accept TRL 1.13's arguments (positional order, ``reward_funcs`` as models / paths /
callables, ``reward_processing_classes``) and config fields with TRL's defaults next to nashkern's
own ``reward_model=`` / ``judge=`` keywords; ``COMPAT.md`` lists them and every difference.

A method subclass (:class:`~nashkern.rl.nash_md.NashMDTrainer`, :class:`~nashkern.rl.xpo.XPOTrainer`,
:class:`~nashkern.rl.online_dpo.OnlineDPOTrainer`) implements ``compute_loss``: generation →
scoring → fused log-probs (:func:`~nashkern.rl.completion_stats.completion_stats`, no ``[B, T, V]``
logits) → its loss (:mod:`nashkern.rl.losses`) → ``self._record_metrics``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer, PreTrainedTokenizerBase, Trainer, TrainerCallback,
                          TrainingArguments)

from . import engines, tensor_parallel
from .checks import (check_fields, check_finite_loss, check_prompt_dataset, check_prompts,
                     finite_rows, is_conversational, judge_choices, kept_mean,
                     nonfinite_parameters, scorer_name)
from .generation import CACHE_IMPLEMENTATIONS, GenerationOutput, SamplingParams
from .judges import BasePairwiseJudge
from .completion_stats import completion_stats
from .pairs import first_preferred, sequence_logps
from .scoring import (ModelRewardFunc, apply_missing_eos_penalty, reward_funcs_scores,
                      reward_model_scores, reward_texts, same_tokenizer)

#: TRL 1.13's reward function: a reward model, its path, or a callable
#: ``f(prompts, completions, completion_ids, **columns) -> list[float | None]``.
RewardFunc = Union[str, nn.Module, Callable[..., List[Optional[float]]]]


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
    top_k: Optional[int] = field(default=0, metadata={"help": "Top-k filtering (0 or None: off)."})
    top_p: Optional[float] = field(default=1.0, metadata={
        "help": "Top-p filtering, in (0, 1] (1 or None: off)."})
    min_p: Optional[float] = field(default=None, metadata={"help": "Min-p filtering (None: off)."})
    repetition_penalty: Optional[float] = field(default=1.0, metadata={
        "help": "Repetition penalty (1 or None: off)."})
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
    nonfinite_scores: str = field(default="raise", metadata={
        "help": "A NaN/inf reward, reward-model score or judge probability: 'raise' (an error "
                "naming the scorer and the rows, before any weight changes) or 'skip' (those "
                "prompts are dropped from the loss and counted in scores/nonfinite_count)."})
    allow_unfused_head: bool = field(default=False, metadata={
        "help": "When the output head cannot be separated from the model (so the fused "
                "log-probs cannot run): False raises; True runs the model's own logits in row "
                "chunks, with a warning."})
    warmup_ratio: Optional[float] = field(default=None, metadata={
        "help": "Linear warmup over this fraction of the steps (sets warmup_steps; the "
                "original script's argument)."})
    # -- TRL 1.13's remaining fields (see COMPAT.md): same names, defaults and meaning ---------
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow custom code shipped with a checkpoint: policy, reward model and reward "
                "tokenizer loads from a path."})
    generation_kwargs: Optional[Dict[str, Any]] = field(default=None, metadata={
        "help": "Overrides of the sampling fields (GenerationConfig names: do_sample, "
                "temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens); other "
                "keys are rejected (nashkern's sampler does not implement them)."})
    cache_implementation: Optional[str] = field(default=None, metadata={
        "help": "KV cache of nashkern's generation: None / 'dynamic', 'static' (prompt + "
                "max_new_tokens slots allocated up front) or 'offloaded' (accelerator only)."})
    use_vllm: bool = field(default=False, metadata={
        "help": "Not supported (the trainer raises): nashkern samples with its own KV-cached "
                "sampler, the mixture needing both models' logits at every token."})
    vllm_model_impl: str = field(default="vllm", metadata={"help": "Accepted, unused."})
    vllm_structured_outputs_regex: Optional[str] = field(default=None, metadata={
        "help": "Accepted, unused."})
    vllm_gpu_memory_utilization: Optional[float] = field(default=0.55, metadata={
        "help": "Accepted, unused."})
    vllm_mode: str = field(default="colocate", metadata={"help": "Accepted, unused."})
    vllm_server_base_url: Optional[str] = field(default=None, metadata={
        "help": "Accepted, unused."})
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "Accepted, unused."})
    vllm_server_port: int = field(default=8000, metadata={"help": "Accepted, unused."})
    vllm_server_timeout: float = field(default=240.0, metadata={"help": "Accepted, unused."})
    vllm_group_port: int = field(default=51216, metadata={"help": "Accepted, unused."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "Accepted, unused."})
    vllm_enable_sleep_mode: bool = field(default=False, metadata={"help": "Accepted, unused."})
    ds3_gather_for_generation: bool = field(default=True, metadata={
        "help": "DeepSpeed ZeRO-3: gather the policy's weights for generation."})
    # TRL's defaults that differ from TrainingArguments': bf16 unless fp16, checkpointing on
    bf16: Optional[bool] = field(default=None, metadata={
        "help": "bf16 mixed precision; unset: True unless fp16 (TRL's default)."})
    gradient_checkpointing: Optional[bool] = field(default=None, metadata={
        "help": "Deprecated alias of activation_checkpointing; unset: True (TRL's default)."})

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs",
                                                                 "generation_kwargs"]

    def __post_init__(self):
        for name in self._schedules:
            setattr(self, name, _as_list(name, getattr(self, name)))
        check_fields(self)  # every scalar field against nashkern.rl.checks.FIELD_RULES
        if self.warmup_ratio is not None:
            self.warmup_steps = float(self.warmup_ratio)
        if self.max_length is not None and self.max_new_tokens >= self.max_length:
            warnings.warn(  # TRL 1.13 warns here too
                f"max_new_tokens ({self.max_new_tokens}) >= max_length ({self.max_length}): every "
                f"prompt is cut to its last token. To keep prompts, make max_length > "
                f"max_new_tokens + the prompt length.", UserWarning, stacklevel=3)
        if self.reward_weights is not None:
            self.reward_weights = [float(w) for w in self.reward_weights]
        self._trl_defaults()
        super().__post_init__()
        for name in self._schedules:  # TRL 1.13: a single value is a float, not a list
            values = getattr(self, name)
            if len(values) == 1:
                setattr(self, name, values[0])

    def _trl_defaults(self) -> None:
        """TRL 1.13's defaults where they differ from ``TrainingArguments``': ``bf16`` True
        unless ``fp16`` (with the error TRL gives where bf16 is unavailable, clearer), and
        activation (gradient) checkpointing on unless set either way."""
        if self.bf16 is None:
            self.bf16 = not self.fp16
            if self.bf16 and not self.use_cpu and not _bf16_available():
                raise ValueError(
                    f"{type(self).__name__} defaults to bf16=True (as TRL 1.13 does), and this "
                    f"machine has no bf16-capable accelerator: pass use_cpu=True (bf16 autocast "
                    f"on the CPU) or bf16=False (float32)")
        if self.gradient_checkpointing is not None:
            return
        if _HAS_ACTIVATION_CHECKPOINTING:  # transformers >= 5.23: the new name, the old an alias
            if self.activation_checkpointing is None:
                self.activation_checkpointing = True
        else:  # older releases know gradient_checkpointing only
            self.gradient_checkpointing = True


# ``TrainingArguments.activation_checkpointing`` exists from transformers 5.23 (with
# ``gradient_checkpointing`` kept as its deprecated alias); before, only the old name.
_HAS_ACTIVATION_CHECKPOINTING = "activation_checkpointing" in {
    f.name for f in dataclasses.fields(TrainingArguments)}


def _bf16_available() -> bool:
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return bool(is_torch_bf16_gpu_available() or is_torch_xla_available())


def _as_list(name, value) -> List[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a float or a list of floats, got {value!r}")
    try:
        value = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a float or a list of floats, got {value!r}") from None
    if not value:
        raise ValueError(f"{name} must be a float or a non-empty list of floats")
    return value


def _per_epoch(values: Union[float, List[float]], epoch: float) -> float:
    # The original indexed the list with the float ``state.epoch`` (a TypeError for a list);
    # the documented behaviour is one value per epoch, the last one kept.
    if isinstance(values, (int, float)):
        return float(values)
    return values[min(int(epoch or 0), len(values) - 1)]


_is_conversational = is_conversational


def _embedding_rows(model) -> Optional[int]:
    """Rows of a model's input embedding (None when it has none)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(emb, "num_embeddings", None)


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
        # rows of a streaming dataset are first seen here (map-style ones at construction too)
        check_prompts([f.get("prompt") if isinstance(f, dict) else f for f in features],
                      "a batch of prompts", self.tokenizer)
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
        empty = (enc["attention_mask"].sum(1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"prompt {texts[empty[0]]!r} tokenizes to no tokens: a prompt needs "
                             "at least one token")
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


def _resolve_dtype(model_init_kwargs: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """TRL 1.13's ``model_init_kwargs["dtype"]``: ``"auto"``, None, a ``torch.dtype`` or its
    name (``"bfloat16"``), anything else an error."""
    if not model_init_kwargs or "dtype" not in model_init_kwargs:
        return model_init_kwargs
    kw, dtype = dict(model_init_kwargs), model_init_kwargs["dtype"]
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"model_init_kwargs['dtype'] must be 'auto' or a torch dtype name "
                             f"(e.g. 'float32'), got {dtype!r}")
        kw["dtype"] = getattr(torch, dtype)
    elif not (dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype)):
        raise ValueError(f"model_init_kwargs['dtype'] must be 'auto' or a torch dtype, got "
                         f"{dtype!r}")
    return kw


def load_reward_model(path: str, args=None) -> nn.Module:
    """A reward model from a path, as TRL 1.13 loads one: ``AutoModelForSequenceClassification``
    with ``num_labels=1`` and ``model_init_kwargs`` (``trust_remote_code`` from the config
    unless given there)."""
    kw = dict(_resolve_dtype(getattr(args, "model_init_kwargs", None)) or {})
    kw.setdefault("trust_remote_code", bool(getattr(args, "trust_remote_code", False)))
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kw)


def load_reward_tokenizer(path: str, args=None):
    """The tokenizer of a reward model loaded from ``path`` (``revision`` from
    ``model_init_kwargs``, ``trust_remote_code`` from the config, as TRL 1.13)."""
    revision = (getattr(args, "model_init_kwargs", None) or {}).get("revision")
    return AutoTokenizer.from_pretrained(
        path, revision=revision, trust_remote_code=bool(getattr(args, "trust_remote_code", False)))


def _set_reward_pad_token(reward_model: nn.Module, tokenizer) -> None:
    """The reward model reads its score at the last non-padding token, so its config must
    know the padding id its inputs use: the tokenizer's (EOS when it has none), as TRL 1.13."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(reward_model, "config", None) is not None:
        reward_model.config.pad_token_id = tokenizer.pad_token_id


def _is_reward_model(f) -> bool:
    return isinstance(f, (str, nn.Module))


def _merge_reward_processing_classes(classes, single):
    """TRL's ``reward_processing_classes`` (a tokenizer or a list aligned with reward_funcs)
    and nashkern's ``reward_processing_class`` name the same thing: at most one of them."""
    if classes is not None and single is not None:
        raise ValueError("reward_processing_classes (TRL 1.13's name) and "
                         "reward_processing_class (nashkern's) were both given: pass one")
    return classes if classes is not None else single


#: GenerationConfig fields nashkern's sampler implements (generation_kwargs may set them).
_SAMPLING_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p",
                    "repetition_penalty", "use_cache", "cache_implementation")


class _OptimizerTimer(TrainerCallback):
    """``time/optimizer`` of :meth:`OnlinePreferenceTrainer._timed`: from
    ``on_pre_optimizer_step`` to ``on_optimizer_step`` (the optimizer's ``step``)."""

    def __init__(self, trainer):
        self._trainer, self._phase = trainer, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._phase = self._trainer._timed("optimizer")
        self._phase.__enter__()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._phase is not None:
            self._phase.__exit__(None, None, None)
            self._phase = None


class OnlinePreferenceTrainer(Trainer):
    """Base class of the online preference trainers (see the module docstring). Subclasses set
    ``config_class`` and implement ``compute_loss``."""

    config_class = OnlinePreferenceConfig
    #: a reward model in reward_funcs without a tokenizer: load the one at its path (TRL 1.13's
    #: XPO / Online DPO) or use the policy's (False: TRL 1.13's Nash-MD)
    _reward_tokenizer_from_path = True
    #: the method and its paper, named in the model card (model_card.Paper or None); a subclass's
    #: default output_dir and its model-card tag are the method name, lower-case and hyphenated
    #: (set by __init_subclass__: "Online DPO" -> "online-dpo")
    _method_name = "online preference optimisation"
    _paper = None
    _tag_names = ["nashkern"]
    _default_output_dir = "online-preference"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._default_output_dir = cls._method_name.lower().replace(" ", "-")
        cls._tag_names = ["nashkern", cls._default_output_dir]

    def __init__(self, model: Union[str, nn.Module], ref_model: Optional[nn.Module] = None,
                 reward_funcs: Optional[Union[RewardFunc, List[RewardFunc]]] = None,
                 args: Optional[OnlinePreferenceConfig] = None, data_collator=None,
                 train_dataset=None, eval_dataset=None,
                 processing_class: Optional[PreTrainedTokenizerBase] = None,
                 reward_processing_classes=None, peft_config=None, compute_metrics=None,
                 callbacks=None, optimizers=(None, None), preprocess_logits_for_metrics=None, *,
                 reward_model: Optional[Union[str, nn.Module]] = None,
                 judge: Optional[BasePairwiseJudge] = None,
                 reward_processing_class: Optional[PreTrainedTokenizerBase] = None):
        # Positional order: TRL 1.13's (model, ref_model, reward_funcs, args, data_collator,
        # train_dataset, eval_dataset, processing_class, reward_processing_classes, peft_config,
        # ...); nashkern's own reward_model= / judge= / reward_processing_class= are keywords.
        args = args if args is not None else self.config_class(output_dir=self._default_output_dir)
        if not isinstance(args, self.config_class):
            raise TypeError(f"args must be a {self.config_class.__name__}, got "
                            f"{type(args).__name__}")
        self._check_generation_args(args)
        reward_funcs = self._check_scorers(args, reward_model, judge, reward_funcs)
        reward_processing_classes = _merge_reward_processing_classes(
            reward_processing_classes, reward_processing_class)
        model, model_path = self._load_policy(model, args)
        if ref_model is not None and ref_model is model:
            raise ValueError("model and ref_model cannot be the same object: omit ref_model to "
                             "use a frozen copy (or the PEFT base) as the reference")
        tok = self._load_tokenizer(processing_class, model_path, args)
        model = self._wrap_peft(model, peft_config)
        self.ref_model = self._make_reference(model, ref_model)
        reward_model, reward_processing_class, reward_funcs = self._split_reward_funcs(
            args, reward_model, reward_processing_classes, reward_funcs, tok)
        self.reward_model, reward_processing_class = self._load_reward_model(
            reward_model, reward_processing_class, args)
        if self.reward_model is not None:
            _set_reward_pad_token(self.reward_model, reward_processing_class or tok)
        self.reward_processing_class = (None if same_tokenizer(tok, reward_processing_class)
                                        else reward_processing_class)
        self.judge = judge
        self.reward_funcs = reward_funcs
        if args.disable_dropout:
            _disable_dropout(model)
            if self.ref_model is not None:
                _disable_dropout(self.ref_model)
        self._check_reward_model(tok)
        self._check_lengths(model, args)
        self._check_vocabularies(model, tok)
        self._check_datasets(tok, train_dataset=train_dataset, eval_dataset=eval_dataset)
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
        for f in self.reward_funcs or []:
            if isinstance(f, ModelRewardFunc):
                f.model.to(self.accelerator.device)
        self.generation_config = self._make_generation_config(args, tok)
        try:  # the sampling parameters of every step, checked now rather than at step 1
            self._sampling_params()
        except ValueError as e:
            raise ValueError(f"{e} (the generation config built from the config's sampling "
                             f"fields and generation_kwargs={args.generation_kwargs!r})") from None
        self.stats: Dict[str, List[float]] = defaultdict(list)
        self.last_samples: List[Dict[str, Any]] = []
        self._generator = None
        self._micro_step, self._micro = None, 0  # (optimizer step, micro-batch) of the last draw
        self._evaluating = False  # inside evaluate(): metrics go to _eval_stats
        self._eval_stats: Dict[str, List[float]] = defaultdict(list)
        self._truncation_warned = False
        self._keep = None  # bool [B]: the prompts kept by the last _kept_rows (None: not run)
        self.add_callback(_OptimizerTimer(self))

    # -- set-up steps (called once, in this order, by __init__) ----------------------------------
    def _check_scorers(self, args, reward_model, judge, reward_funcs):
        """Exactly one of reward_model / judge / reward_funcs; returns reward_funcs as a list."""
        if isinstance(reward_funcs, Callable) and not isinstance(reward_funcs, nn.Module):
            reward_funcs = [reward_funcs]
        if reward_funcs is not None and not isinstance(reward_funcs, (list, tuple)):
            reward_funcs = [reward_funcs]  # a model or a path (TRL 1.13's reward_funcs)
        given = [n for n, v in (("reward_model", reward_model), ("judge", judge),
                                ("reward_funcs", reward_funcs)) if v]
        if reward_model is not None and any(_is_reward_model(f) for f in reward_funcs or []):
            raise ValueError(
                "a reward model was given twice: as reward_model= (nashkern's keyword) and inside "
                "reward_funcs (TRL 1.13's argument); pass it once, in either place")
        if len(given) != 1:
            raise ValueError(f"{type(self).__name__} needs exactly one of reward_model, judge or "
                             f"reward_funcs; got {given or 'none'}")
        if judge is not None and not callable(getattr(judge, "judge", None)):
            raise TypeError(f"judge must have a judge(prompts, completion_pairs) method (a "
                            f"BasePairwiseJudge), got {type(judge).__name__}")
        for i, f in enumerate(reward_funcs or []):
            if not (callable(f) or isinstance(f, str)):  # str: a reward model's path / id
                raise TypeError(f"reward_funcs[{i}] must be a callable, a reward model or its "
                                f"path, got {type(f).__name__}")
        if args.reward_weights is not None and (
                not reward_funcs or len(args.reward_weights) != len(reward_funcs)):
            raise ValueError(f"reward_weights ({len(args.reward_weights)}) needs one weight per "
                             f"reward function ({len(reward_funcs or [])})")
        return list(reward_funcs) if reward_funcs else reward_funcs

    def _check_generation_args(self, args) -> None:
        """``use_vllm`` (unsupported), ``cache_implementation`` and the ``generation_kwargs``
        keys, before anything is loaded."""
        if args.use_vllm:
            raise ValueError(
                f"use_vllm=True is not supported by nashkern's {type(self).__name__}: completions "
                f"are sampled by nashkern's own KV-cached sampler (Nash-MD's mixture samples need "
                f"the policy's and the reference's logits at every token, which vLLM does not "
                f"expose). Set use_vllm=False; the vllm_* fields are accepted and ignored.")
        if args.cache_implementation not in CACHE_IMPLEMENTATIONS:
            raise ValueError(f"cache_implementation must be one of {CACHE_IMPLEMENTATIONS}, got "
                             f"{args.cache_implementation!r}")
        from transformers import GenerationConfig

        get_defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
        defaults = get_defaults() if get_defaults is not None else vars(GenerationConfig())
        for k, v in (args.generation_kwargs or {}).items():
            if k in _SAMPLING_FIELDS or k in ("pad_token_id", "bos_token_id", "eos_token_id"):
                continue
            if k not in defaults or (v is not None and defaults[k] != v):
                raise ValueError(
                    f"generation_kwargs[{k!r}]={v!r} is not supported: nashkern's sampler "
                    f"implements {', '.join(_SAMPLING_FIELDS)} (other GenerationConfig fields "
                    f"only at their default values)")

    def _split_reward_funcs(self, args, reward_model, reward_processing_classes, reward_funcs,
                            tok):
        """TRL 1.13's ``reward_funcs`` (models, paths, callables) -> nashkern's scorers
        ``(reward_model, its tokenizer, reward functions)``; sets ``self.reward_weights``.

        A path is loaded as :func:`load_reward_model`. A single reward model (and weight 1) is
        the ``reward_model`` path (scored on the policy's tokens when it shares the policy's
        tokenizer); models mixed with callables or other models become
        :class:`~nashkern.rl.scoring.ModelRewardFunc`. A model's tokenizer is its entry of
        ``reward_processing_classes``, else loaded from its path (``config._name_or_path``),
        else the policy's."""
        if not reward_funcs:
            self.reward_weights = (None if reward_model is None
                                   else torch.ones(1, dtype=torch.float32))
            rtok = reward_processing_classes
            if isinstance(rtok, (list, tuple)):
                if len(rtok) != 1 or reward_model is None:
                    raise ValueError("reward_processing_classes: one tokenizer for the one reward "
                                     f"model, got {rtok!r}")
                rtok = rtok[0]
            return reward_model, rtok, reward_funcs
        n = len(reward_funcs)
        classes = reward_processing_classes
        if not isinstance(classes, (list, tuple)):
            classes = [classes] * n if n == 1 or classes is None else None
        if classes is None or len(classes) != n:
            raise ValueError(f"reward_processing_classes needs one entry per reward function "
                             f"({n}), got {reward_processing_classes!r}")
        weights = [1.0] * n if args.reward_weights is None else list(args.reward_weights)
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        models, funcs = [], []
        for f, rtok in zip(reward_funcs, classes):
            if isinstance(f, str):
                path, f = f, load_reward_model(f, args)
                rtok = rtok if rtok is not None else load_reward_tokenizer(path, args)
            elif isinstance(f, nn.Module) and rtok is None:
                rtok = self._default_reward_tokenizer(f, tok, args)
            if isinstance(f, nn.Module):
                _set_reward_pad_token(f, rtok)
                f.eval()
                f.requires_grad_(False)
                models.append((f, rtok))
                f = ModelRewardFunc(f, rtok, max_length=None)
            funcs.append(f)
        if len(funcs) == 1 and models and weights == [1.0]:
            return models[0][0], models[0][1], None
        return None, None, funcs

    def _default_reward_tokenizer(self, reward_model, tok, args):
        """A reward model given without a tokenizer: TRL 1.13 loads the one saved at its path
        (``config._name_or_path``); a model with no path (built in memory) uses the policy's."""
        path = getattr(getattr(reward_model, "config", None), "_name_or_path", "") or ""
        if path and self._reward_tokenizer_from_path:
            try:
                return load_reward_tokenizer(path, args)
            except (OSError, ValueError) as e:
                raise ValueError(f"could not load the reward model's tokenizer from {path!r} "
                                 f"({e}); pass it as reward_processing_classes") from e
        vocab = getattr(getattr(reward_model, "config", None), "vocab_size", None)
        if vocab is not None and len(tok) > vocab:
            raise ValueError(f"the reward model's vocabulary ({vocab}) is smaller than the "
                             f"policy tokenizer's ({len(tok)}): pass the reward model's tokenizer "
                             f"as reward_processing_classes")
        return tok

    def _make_generation_config(self, args, tok):
        """``trainer.generation_config``: TRL 1.13's ``GenerationConfig`` (sampling fields, then
        ``generation_kwargs`` over them). nashkern's sampler reads it at every step, so changing
        it changes the sampling; ``use_cache`` is True (nashkern's generation always caches)."""
        from transformers import GenerationConfig

        kw = dict(max_new_tokens=args.max_new_tokens, do_sample=True,
                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, repetition_penalty=args.repetition_penalty, use_cache=True,
                  min_p=args.min_p, cache_implementation=args.cache_implementation)
        kw.update(args.generation_kwargs or {})
        for k in ("pad_token_id", "eos_token_id"):
            if kw.get(k) != getattr(tok, k):
                raise ValueError(f"generation_kwargs[{k!r}]={kw[k]!r} differs from the "
                                 f"tokenizer's ({getattr(tok, k)}): nashkern stops and pads "
                                 f"with the tokenizer's tokens")
        if kw.get("cache_implementation") not in CACHE_IMPLEMENTATIONS:
            raise ValueError(f"generation_kwargs['cache_implementation'] must be one of "
                             f"{CACHE_IMPLEMENTATIONS}, got {kw['cache_implementation']!r}")
        return GenerationConfig(**{k: v for k, v in kw.items() if v is not None})

    def _load_policy(self, model, args):
        """The policy (loaded when ``model`` is a path) -> (model, path or None)."""
        model_path = model if isinstance(model, str) else None
        if model_path is not None:
            kw = model_load_kwargs(_resolve_dtype(args.model_init_kwargs),
                                   trust_remote_code=args.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(model_path, **kw)
        elif args.model_init_kwargs is not None:
            raise ValueError("model_init_kwargs was given but model is already instantiated: it "
                             "applies only when model is a path (as in TRL 1.13)")
        if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
            raise ValueError(f"model must be a causal language model with an output embedding "
                             f"(an AutoModelForCausalLM), got {type(model).__name__}")
        return model, model_path

    @staticmethod
    def _load_tokenizer(processing_class, model_path, args=None):
        """The policy's tokenizer, with a pad token (EOS when it has none) and an EOS token."""
        if processing_class is None:
            if model_path is None:
                raise ValueError("processing_class (the tokenizer) is required when model is "
                                 "not a path")
            processing_class = AutoTokenizer.from_pretrained(
                model_path, trust_remote_code=bool(args is not None and args.trust_remote_code))
        if hasattr(processing_class, "tokenizer") and not isinstance(
                processing_class, PreTrainedTokenizerBase):
            raise TypeError(f"processing_class must be a tokenizer: nashkern's trainers are "
                            f"text-only, got a {type(processing_class).__name__} (see COMPAT.md)")
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
        if peft_config is not None and type(model).__name__.startswith("Peft"):
            raise ValueError("model is already a PeftModel and peft_config was given: merge and "
                             "unload the existing adapter first, or omit peft_config (as TRL 1.13)")
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
    def _load_reward_model(reward_model, reward_processing_class, args=None):
        """The frozen reward model (loaded when a path) -> (model or None, its tokenizer)."""
        if isinstance(reward_model, str):
            path = reward_model
            reward_model = load_reward_model(path, args)
            if reward_processing_class is None:
                reward_processing_class = load_reward_tokenizer(path, args)
        if reward_model is not None:
            labels = getattr(getattr(reward_model, "config", None), "num_labels", 1)
            if labels != 1:
                raise ValueError(f"reward_model ({type(reward_model).__name__}) has num_labels="
                                 f"{labels}; a reward model returns one score per sequence "
                                 "(num_labels=1)")
            reward_model.eval()
            reward_model.requires_grad_(False)
        return reward_model, reward_processing_class

    def _check_reward_model(self, tok):
        """A reward model that reads the policy's token ids (no reward tokenizer of its own)
        must cover the policy tokenizer's vocabulary."""
        if self.reward_model is None or self.reward_processing_class is not None:
            return
        n = _embedding_rows(self.reward_model)
        if n is not None and n < len(tok):
            raise ValueError(f"reward_model ({type(self.reward_model).__name__}) has a vocabulary "
                             f"of {n} tokens, smaller than the policy tokenizer's {len(tok)}: "
                             "pass its own tokenizer as reward_processing_class (completions are "
                             "then re-tokenised for it)")

    def _check_vocabularies(self, model, tok):
        """The tokenizer's ids fit the policy's embedding, and the reference scores the same
        vocabulary as the policy."""
        n = _embedding_rows(model)
        if n is not None and len(tok) > n:
            raise ValueError(f"the tokenizer has {len(tok)} tokens but the model's embedding only "
                             f"{n} rows: resize_token_embeddings(len(tokenizer)) first")
        if self.ref_model is not None:
            rows = [getattr(getattr(m, "get_output_embeddings", lambda: None)(), "weight", None)
                    for m in (model, self.ref_model)]
            if all(w is not None for w in rows) and rows[0].shape[0] != rows[1].shape[0]:
                raise ValueError(f"ref_model's vocabulary ({rows[1].shape[0]}) differs from the "
                                 f"policy's ({rows[0].shape[0]}): the reference must share the "
                                 "policy's tokenizer")

    def _check_lengths(self, model, args):
        """``max_length`` (prompt + completion) must fit the policy's positions. Longer prompts
        are truncated from the left to ``max_length - max_new_tokens`` tokens, with a warning."""
        cfg = getattr(model, "config", None)
        cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
        limit = getattr(cfg, "max_position_embeddings", None)
        self._position_limit = limit if isinstance(limit, int) else None
        if not isinstance(limit, int):
            return
        if args.max_length is not None and args.max_length > limit:
            raise ValueError(f"max_length ({args.max_length}) exceeds the model's "
                             f"max_position_embeddings ({limit}); set max_length <= {limit} "
                             "(prompts longer than max_length - max_new_tokens are truncated "
                             "from the left)")
        new_tokens = (args.generation_kwargs or {}).get("max_new_tokens", args.max_new_tokens)
        where = "generation_kwargs['max_new_tokens']" \
            if "max_new_tokens" in (args.generation_kwargs or {}) else "max_new_tokens"
        # a prompt keeps at least one token: generation spans up to max_new_tokens + 1 positions
        if isinstance(new_tokens, int) and new_tokens + 1 > limit:
            raise ValueError(f"{where} ({new_tokens}) + 1 prompt token exceeds the model's "
                             f"max_position_embeddings ({limit}): set {where} <= {limit - 1}")

    def _check_datasets(self, tokenizer=None, **datasets):
        """Every given dataset has a 'prompt' column, at least one row and well-formed prompts
        (:func:`~nashkern.rl.checks.check_prompt_dataset`; streaming datasets are checked batch
        by batch; transformers asks them for ``max_steps``)."""
        for split, ds in datasets.items():
            check_prompt_dataset(split, ds, tokenizer)

    # -- schedules ----------------------------------------------------------------------------
    def _scheduled(self, name: str) -> float:
        return _per_epoch(getattr(self.args, name), self.state.epoch)

    @property
    def beta(self) -> float:
        return self._scheduled("beta")

    @property
    def use_vllm(self) -> bool:
        """TRL 1.13's attribute; always False (``use_vllm=True`` is refused at construction)."""
        return bool(self.args.use_vllm)

    # -- step pieces --------------------------------------------------------------------------
    def _sampling_params(self) -> SamplingParams:
        """This step's sampling parameters, read from ``self.generation_config``."""
        g = self.generation_config
        greedy = not g.do_sample  # the temperature does not matter (it may then be 0)
        return SamplingParams(max_new_tokens=g.max_new_tokens,
                              temperature=1.0 if greedy or g.temperature is None
                              else g.temperature,
                              top_k=g.top_k, top_p=g.top_p, min_p=g.min_p,
                              repetition_penalty=g.repetition_penalty,
                              do_sample=bool(g.do_sample))

    def _generation_kwargs(self, generator: torch.Generator) -> Dict[str, Any]:
        """Keyword arguments of :func:`~nashkern.rl.generation.generate` for this step."""
        tok = self.processing_class
        params = self._sampling_params()
        # max_new_tokens >= max_length (a warning at config time, as TRL): prompts keep 1 token.
        # max_length=None: no length limit of the config's; prompts are cut only to what the
        # model's positions hold (max_position_embeddings, when the config has one)
        max_length = self.args.max_length
        if max_length is None:
            max_length = self._position_limit
        if max_length is not None:
            max_length = max(max_length, params.max_new_tokens + 1)
        return dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                    params=params, max_length=max_length, generator=generator,
                    cache_implementation=getattr(self.generation_config,
                                                 "cache_implementation", None),
                    **self._engine_generation_kwargs())

    def _engine_generation_kwargs(self) -> Dict[str, Any]:
        """Rank-synchronised stepping and the gathering the training engine needs
        (:mod:`nashkern.rl.engines`)."""
        policy, ref = self.model_wrapped, self.ref_model
        gather = self.args.ds3_gather_for_generation
        return dict(synced_gpus=engines.needs_synced_generation(policy, ref),
                    gather_context=lambda: self._generation_context(policy, ref, gather))

    @contextlib.contextmanager
    def _generation_context(self, policy, ref, gather_zero3: bool):
        """The engine's gathering (:func:`~nashkern.rl.engines.generation_context`) under the
        training's mixed precision (``bf16`` / ``fp16``: accelerate's autocast): generation calls
        the unwrapped models, bypassing the engine's own input casting, so a reference whose
        nested FSDP1 units compute in bf16 would otherwise get float32 inputs from its root."""
        with self.accelerator.autocast(), engines.generation_context(
                policy, ref, gather_zero3=gather_zero3):
            yield

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
        # the ranks of a tensor-parallel group run one computation: they draw the same samples
        rank = tensor_parallel.sampler_rank(self.model, self.args.process_index)
        key = [self.args.seed, rank, step, self._micro]
        if self._evaluating:  # evaluation draws its own numbers: training's stay as they were
            key.append(1)
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
            full = self._reward_model_texts(inputs, completions, reps)
            scores = reward_model_scores(
                self.reward_model, gen.input_ids, gen.attention_mask,
                pad_token_id=tok.pad_token_id, texts=full,
                reward_tokenizer=self.reward_processing_class)
            finite_rows(scores, f"reward_model {type(self.reward_model).__name__}",
                        self.args.nonfinite_scores, inputs["prompts"])
        else:
            raw = inputs["raw_prompts"] * reps
            comps = completions
            if _is_conversational(raw[0]):
                comps = [[{"role": "assistant", "content": c}] for c in completions]
            ids = [row[m.bool()].tolist() for row, m in zip(gen.completion_ids,
                                                              gen.completion_mask)]
            columns = {k: list(v) * reps for k, v in inputs.get("columns", {}).items()}
            columns.setdefault("trainer_state", self.state)  # as TRL 1.13 passes it
            scores = reward_funcs_scores(self.reward_funcs, raw, comps, ids,
                                         weights=self.args.reward_weights,
                                         nonfinite=self.args.nonfinite_scores, **columns)
        scores = scores.to(gen.completion_ids.device)
        return apply_missing_eos_penalty(scores, gen.completion_ids, tok.eos_token_id,
                                         self.args.missing_eos_penalty)

    def _reward_model_texts(self, inputs, completions: List[str], reps: int) -> List[str]:
        """Texts the reward model scores when its tokenizer differs from the policy's: the
        conversation rendered by the reward tokenizer's chat template (TRL 1.13) when the
        prompts are conversational and it has one, else the policy's prompt text + completion."""
        raw = inputs["raw_prompts"] * reps
        rtok = self.reward_processing_class
        if rtok is not None and _is_conversational(raw[0]) and getattr(rtok, "chat_template",
                                                                       None):
            return reward_texts(raw, [[{"role": "assistant", "content": c}] for c in completions],
                                rtok)
        return [p + c for p, c in zip(inputs["prompts"] * reps, completions)]

    def _judge_choices(self, prompts: List[str], pairs: List[Tuple[str, str]]) -> List[int]:
        return judge_choices(self.judge, self.judge.judge(prompts, pairs), len(pairs))

    def _kept_rows(self, values: Sequence[Optional[torch.Tensor]], batch_size: int, device,
                   prompts=None) -> torch.Tensor:
        """Bool ``[B]``: the prompts whose values (``[B]`` each, None skipped) are all finite.
        Under ``nonfinite_scores="raise"`` a non-finite value raises, naming the judge (the
        reward functions / model have raised already in :meth:`_scores`); under ``"skip"`` the
        number of dropped prompts, summed over processes, is recorded as
        ``scores/nonfinite_count``."""
        source = f"judge {scorer_name(self.judge)}" if self.judge is not None else "the scores"
        keep = torch.ones(batch_size, dtype=torch.bool, device=device)
        for v in values:
            if v is not None:
                keep &= finite_rows(v, source, self.args.nonfinite_scores, prompts).to(device)
        if self.args.nonfinite_scores == "skip":
            dropped = self.accelerator.gather((~keep).sum().reshape(1)).sum()
            self._record_metrics({"scores/nonfinite_count": float(dropped)})
        self._keep = keep.detach()
        return keep

    def _pair_logps(self, model, pairs, ref, ref_ctx):
        """Per-sequence log-probs of ``chosen ‖ rejected`` rows (:mod:`~nashkern.rl.pairs`) under
        the policy (with grad) and the reference, in ONE fused pass of each model:
        ``((chosen, rejected), (ref_chosen, ref_rejected))``, each ``[B]``."""
        st = completion_stats(model, pairs.input_ids, pairs.attention_mask, pairs.context_length,
                              ref_model=ref, ref_context=ref_ctx,
                              allow_unfused=self.args.allow_unfused_head)
        return (pairs.split(sequence_logps(st.logprobs, pairs.completion_mask)),
                pairs.split(sequence_logps(st.ref_logprobs, pairs.completion_mask)))

    @staticmethod
    def _kept_mean(per_row: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return kept_mean(per_row, keep)

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
        stats = self._eval_stats if self._evaluating else self.stats
        keep = self._keep
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor) and k.startswith("loss/") and keep is not None \
                    and v.dim() == 1 and v.shape[0] == keep.shape[0] and not bool(keep.all()):
                # nonfinite_scores="skip": a dropped prompt's loss terms are no loss values
                # (NaN: averaged out below, as its scores are), not zeros
                v = torch.where(keep.to(v.device), v.detach().float(), float("nan"))
            if isinstance(v, torch.Tensor):
                v = self.accelerator.gather_for_metrics(v.detach().float().reshape(-1))
                # rows dropped under nonfinite_scores="skip" carry NaN scores: averaged out
                # (their number is scores/nonfinite_count)
                v = v[torch.isfinite(v)].mean().item() if bool(torch.isfinite(v).any()) \
                    else float("nan")
            stats[k].append(float(v))

    @contextlib.contextmanager
    def _timed(self, phase: str):
        """Wall time of one phase of the step, logged as ``time/<phase>`` (seconds, the mean
        over the micro-batches since the last log): ``generation``, ``scoring``, ``statistics``
        (log-prob / KL forward and the loss), ``backward``, ``optimizer``. On a CUDA device the
        phase boundaries synchronise the device (a few syncs per step, next to generation's one
        per token) so that each phase is charged its own kernels. Training only: evaluation's
        metrics stay reproducible."""
        if self._evaluating:
            yield
            return
        device = self.accelerator.device
        sync = device.type == "cuda" and torch.cuda.is_available()
        if sync:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                torch.cuda.synchronize(device)
            self.stats[f"time/{phase}"].append(time.perf_counter() - t0)

    def _records(self, model) -> bool:
        """Whether this ``compute_loss`` records metrics: in training and in ``evaluate()``."""
        return model.training or self._evaluating

    # -- Trainer hooks ------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss")

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        self._warn_long_prompts(inputs)
        self._keep = None
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        check_finite_loss(loss, int(self.state.global_step))
        loss = loss / self.args.gradient_accumulation_steps
        with self._timed("backward"):
            self.accelerator.backward(loss)
        if self.args.nonfinite_scores == "skip":
            self._rescale_for_dropped_micro_batches(model)
        return loss.detach()

    def _rescale_for_dropped_micro_batches(self, model) -> None:
        """``nonfinite_scores="skip"``: a micro-batch whose prompts were all dropped contributes
        no gradient (its loss is 0), but the others were divided by the full number of
        micro-batches. At the last micro-batch of the accumulation window (after the backward:
        the gradients are reduced, nothing clipped or stepped yet) the accumulated gradient is
        multiplied by ``micro-batches / non-empty micro-batches``, counted over all processes,
        so it is the mean over the micro-batches that had data. (One small all-reduce per
        optimizer step, in "skip" mode only.) Under DeepSpeed the engine steps inside its
        backward: there the scale cannot be corrected, and a warning says so once."""
        keep = self._keep
        empty = keep is not None and not bool(keep.any())
        self._window = getattr(self, "_window", [0, 0])
        self._window[0] += 1
        self._window[1] += 0 if empty else 1
        if not self.accelerator.sync_gradients:
            return
        counts = torch.tensor(self._window, dtype=torch.float32, device=self.accelerator.device)
        self._window = [0, 0]
        counts = self.accelerator.reduce(counts, reduction="sum")
        total, nonempty = float(counts[0]), float(counts[1])
        if nonempty in (0.0, total):
            return
        if engines.engine_of(model) in ("zero3", "deepspeed"):
            if not getattr(self, "_skip_scale_warned", False):
                self._skip_scale_warned = True
                warnings.warn(f"nonfinite_scores='skip': {int(total - nonempty)} of {int(total)} "
                              "micro-batches of this step had every prompt dropped; under "
                              "DeepSpeed their zero gradient is averaged in (the step is "
                              "scaled by the fraction of micro-batches with data)", UserWarning)
            return
        factor = total / nonempty
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)

    def _warn_long_prompts(self, inputs) -> None:
        """Prompts longer than ``max_length - max_new_tokens`` tokens are truncated from the left
        by :func:`~nashkern.rl.generation.generate`: say so (once per trainer, with a count)."""
        if self.args.max_length is None:
            return
        room = self.args.max_length - self.args.max_new_tokens
        n = int((inputs["attention_mask"].sum(1) > room).sum())
        if n and not self._truncation_warned:
            self._truncation_warned = True
            warnings.warn(f"{n} prompt(s) of this batch are longer than max_length - "
                          f"max_new_tokens = {room} tokens and are truncated from the left "
                          "(further truncations are not reported)", UserWarning)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False):
        """Refuses to save non-finite weights (a NaN model never reaches disk unannounced).
        A save the user asks for writes the model card (``README.md``) next to the weights
        (checkpoints write it into ``output_dir``, ``push_to_hub`` writes its own)."""
        bad = nonfinite_parameters(self.model) if self.model is not None else []
        if bad:
            raise FloatingPointError(f"not saving the model to {output_dir or self.args.output_dir}"
                                     f": non-finite weights in {bad}")
        out = super().save_model(output_dir, _internal_call)
        if not _internal_call:
            self.create_model_card(output_dir=output_dir)
        return out

    def _save_checkpoint(self, model, trial):
        """The model card in ``output_dir`` with every checkpoint (as TRL 1.13), then the
        checkpoint."""
        self.create_model_card()
        return super()._save_checkpoint(model, trial)

    def create_model_card(self, model_name: Optional[str] = None,
                          dataset_name: Optional[Union[str, List[str]]] = None,
                          tags: Optional[Union[str, List[str]]] = None, *,
                          output_dir: Optional[str] = None, dataset=None, finetuned_from=None,
                          license: Optional[str] = None, language=None, **unused) -> None:
        """Write ``README.md`` (:func:`~nashkern.rl.model_card.model_card`) into ``output_dir``
        (default ``args.output_dir``), on the main process: TRL 1.13's arguments
        (``model_name``, ``dataset_name``, ``tags``; what ``push_to_hub(**kwargs)`` passes on),
        and ``transformers.Trainer``'s ``dataset`` / ``finetuned_from`` / ``license`` /
        ``language``; the remaining ones of ``Trainer.create_model_card`` (``tasks``,
        ``dataset_tags``, ``dataset_args``) are accepted and not used. The base model is
        ``finetuned_from``, else the policy's ``config._name_or_path``; the tags are
        ``generated_from_trainer``, the trainer's own, the model's ``model_tags`` and ``tags``."""
        from .model_card import model_card

        unknown = set(unused) - {"tasks", "dataset_tags", "dataset_args"}
        if unknown:
            raise TypeError(f"create_model_card() got unexpected keyword arguments "
                            f"{sorted(unknown)}")
        if not self.is_world_process_zero():
            return
        out = output_dir or self.args.output_dir
        if model_name is None:
            model_name = (self.args.hub_model_id.split("/")[-1] if self.args.hub_model_id
                          else os.path.basename(os.path.normpath(out)))
        inner = engines.inner_module(self.model)
        base = getattr(getattr(inner, "config", None), "_name_or_path", None)
        if hasattr(inner, "get_base_model"):  # PEFT: the base model's path
            base = getattr(getattr(inner.get_base_model(), "config", None), "_name_or_path",
                           base)
        tag_list = ["generated_from_trainer", *self._tag_names,
                    *(getattr(inner, "model_tags", None) or []),
                    *([tags] if isinstance(tags, str) else (tags or []))]
        if dataset_name is None:
            dataset_name = dataset
        text = model_card(model_name=model_name, trainer_name=type(self).__name__,
                          method=self._method_name, paper=self._paper,
                          base_model=finetuned_from or base or None, dataset_name=dataset_name,
                          tags=tag_list, hub_model_id=getattr(self, "hub_model_id", None),
                          license=license, language=language)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
            f.write(text)

    # -- evaluation: the method's loss and metrics on eval prompts, no update -----------------
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        self._warn_long_prompts(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach().mean(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None,
                        ignore_keys=None, metric_key_prefix: str = "eval"):
        """Generation + scoring + loss on every eval batch (``prediction_step``), without an
        update; the method's metrics come back as ``<prefix>_<metric>`` (as in TRL's online
        trainers) next to ``<prefix>_loss``. Training's samples and sampler state are kept."""
        saved = (self.last_samples, self._micro_step, self._micro)
        self._evaluating, self._micro_step = True, None
        self._eval_stats.clear()
        try:
            out = super().evaluation_loop(dataloader, description, prediction_loss_only=True,
                                          ignore_keys=ignore_keys,
                                          metric_key_prefix=metric_key_prefix)
        finally:
            self._evaluating = False
            self.last_samples, self._micro_step, self._micro = saved
        for k, v in self._eval_stats.items():
            out.metrics[f"{metric_key_prefix}_{k}"] = sum(v) / len(v)
        self._eval_stats.clear()
        return out

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        if self.stats and self.model is not None and "loss" in logs:
            for k, v in self.stats.items():
                finite = [x for x in v if np.isfinite(x)]
                if finite:  # all-NaN: every prompt of the window dropped (no value to log)
                    logs[k] = sum(finite) / len(finite)
            self.stats.clear()
        return super().log(logs, start_time)
