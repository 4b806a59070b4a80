"""``NashMDConfig`` and ``NashMDTrainer``: a thin ``transformers.Trainer`` subclass wiring the
small functions of :mod:`nashkern.generation`, :mod:`nashkern.scoring`,
:mod:`nashkern.logprobs` and :mod:`nashkern.losses`.

One step (``compute_loss``; ``training_step`` adds the backward):
  1. policy completions and geometric-mixture completions (KV-cached, :func:`generate`);
  2. P(policy ≻ mixture) from the reward model / judge / reward functions;
  3. policy and reference per-token log-probs (and exact KL) of the policy completions from the
     final hidden states (:func:`completion_stats`, no ``[B, T, V]`` logits);
  4. :func:`nash_md_loss` and the original trainer's metrics (gathered across processes).
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch
import torch.nn as nn
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer, PreTrainedTokenizerBase, Trainer,
                          TrainingArguments)

from .callbacks import LogCompletionsCallback  # noqa: F401  (re-exported)
from .generation import SamplingParams, generate
from .judges import BasePairwiseJudge, judge_probabilities
from .logprobs import completion_stats
from .losses import nash_md_loss
from .scoring import (apply_missing_eos_penalty, preference_probability, reward_funcs_scores,
                      reward_model_scores, same_tokenizer)


@dataclass
class NashMDConfig(TrainingArguments):
    """Training arguments of :class:`NashMDTrainer` (fields of the original ``NashMDConfig``).

    ``beta`` and ``mixture_coef`` take a float or a list (one value per epoch; the last value is
    kept after the list ends)."""

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
    mixture_coef: List[float] = field(default_factory=lambda: [0.5], metadata={
        "help": "Reference weight c of the mixture π^(1-c)·μ^c: float or one per epoch."})
    disable_dropout: bool = field(default=True, metadata={"help": "Disable dropout in the models."})
    reward_model_path: Optional[str] = field(default=None, metadata={"help": "Reward model path."})
    judge: Optional[str] = field(default=None, metadata={"help": "Judge name (pair_rm)."})
    model_init_kwargs: Optional[Dict[str, Any]] = field(default=None, metadata={
        "help": "kwargs of AutoModelForCausalLM.from_pretrained when the model is a path."})
    kl_estimator: str = field(default="sample", metadata={
        "help": "'sample': Σ sg(logπ−logμ)·logπ (original); 'full': exact per-token KL."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False."})
    warmup_ratio: Optional[float] = field(default=None, metadata={
        "help": "Linear warmup over this fraction of the steps (sets warmup_steps; the "
                "original script's argument)."})

    def __post_init__(self):
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = float(self.warmup_ratio)
        self.beta = _as_list("beta", self.beta)
        self.mixture_coef = _as_list("mixture_coef", self.mixture_coef)
        if any(b < 0 for b in self.beta):
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if any(not 0 <= c <= 1 for c in self.mixture_coef):
            raise ValueError(f"mixture_coef must be in [0, 1], got {self.mixture_coef}")
        if self.kl_estimator not in ("sample", "full"):
            raise ValueError(f"kl_estimator must be 'sample' or 'full', got {self.kl_estimator!r}")
        if self.max_new_tokens < 1 or self.max_length <= self.max_new_tokens:
            raise ValueError("need 1 <= max_new_tokens < max_length")
        super().__post_init__()


def _as_list(name, value) -> List[float]:
    if isinstance(value, (int, float)):
        return [float(value)]
    value = [float(v) for v in value]
    if not value:
        raise ValueError(f"{name} must be a float or a non-empty list of floats")
    return value


def _per_epoch(values: List[float], epoch: float) -> float:
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
    (the chat template applied to conversational prompts)."""

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
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "prompts": texts, "raw_prompts": [f["prompt"] for f in features]}


class NashMDTrainer(Trainer):
    """Nash-MD (Munos et al., 2023) with KV-cached mixture generation and fused token stats."""

    _tag_names = ["nashkern", "nash-md"]

    def __init__(self, model: Union[str, nn.Module], ref_model: Optional[nn.Module] = None,
                 reward_model: Optional[Union[str, nn.Module]] = None,
                 judge: Optional[BasePairwiseJudge] = None,
                 reward_funcs: Optional[Union[Callable, List[Callable]]] = None,
                 args: Optional[NashMDConfig] = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class: Optional[PreTrainedTokenizerBase] = None,
                 peft_config=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), preprocess_logits_for_metrics=None,
                 reward_processing_class: Optional[PreTrainedTokenizerBase] = None):
        args = args if args is not None else NashMDConfig(output_dir="nash-md")
        if not isinstance(args, NashMDConfig):
            raise TypeError(f"args must be a NashMDConfig, got {type(args).__name__}")
        if isinstance(reward_funcs, Callable) and not isinstance(reward_funcs, nn.Module):
            reward_funcs = [reward_funcs]
        given = [n for n, v in (("reward_model", reward_model), ("judge", judge),
                                ("reward_funcs", reward_funcs)) if v]
        if len(given) != 1:
            raise ValueError("NashMDTrainer needs exactly one of reward_model, judge or "
                             f"reward_funcs; got {given or 'none'}")
        # model
        model_path = model if isinstance(model, str) else None
        if model_path is not None:
            kw = dict(args.model_init_kwargs or {})
            kw.setdefault("trust_remote_code", False)
            model = AutoModelForCausalLM.from_pretrained(model_path, **kw)
        if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
            raise ValueError(f"model must be a causal language model with an output embedding "
                             f"(an AutoModelForCausalLM), got {type(model).__name__}")
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
        # PEFT
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
        # reference: a given model, the PEFT base with adapters disabled, or a frozen copy
        if ref_model is None and not self.is_peft:
            ref_model = copy.deepcopy(model)
        if ref_model is not None:
            ref_model.eval()
            ref_model.requires_grad_(False)
        self.ref_model = ref_model
        # scorers
        if isinstance(reward_model, str):
            path = reward_model
            reward_model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, trust_remote_code=False)
            if reward_processing_class is None:
                reward_processing_class = AutoTokenizer.from_pretrained(path)
        if reward_model is not None:
            reward_model.eval()
            reward_model.requires_grad_(False)
        self.reward_model = reward_model
        self.reward_processing_class = (None if same_tokenizer(tok, reward_processing_class)
                                        else reward_processing_class)
        self.judge = judge
        self.reward_funcs = reward_funcs
        if args.disable_dropout:
            _disable_dropout(model)
            if ref_model is not None:
                _disable_dropout(ref_model)
        # data
        for name, ds in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if ds is None:
                continue
            cols = getattr(ds, "column_names", None)
            if cols is not None and "prompt" not in cols:
                raise ValueError(f"{name} needs a 'prompt' column, got columns {cols}")
            if len(ds) == 0:
                raise ValueError(f"{name} is empty")
        args.remove_unused_columns = False
        super().__init__(model=model, args=args,
                         data_collator=data_collator or PromptCollator(tok),
                         train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=tok, compute_metrics=compute_metrics,
                         callbacks=callbacks, optimizers=optimizers,
                         preprocess_logits_for_metrics=preprocess_logits_for_metrics)
        if self.ref_model is not None:
            self.ref_model.to(self.accelerator.device)
        if self.reward_model is not None:
            self.reward_model.to(self.accelerator.device)
        self.stats: Dict[str, List[float]] = defaultdict(list)
        self.last_samples: List[Dict[str, Any]] = []
        self._generator = None

    # -- schedule -----------------------------------------------------------------------------
    @property
    def beta(self) -> float:
        return _per_epoch(self.args.beta, self.state.epoch)

    @property
    def mixture_coef(self) -> float:
        return _per_epoch(self.args.mixture_coef, self.state.epoch)

    # -- one step -----------------------------------------------------------------------------
    def _sampling_params(self) -> SamplingParams:
        a = self.args
        return SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                              top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                              repetition_penalty=a.repetition_penalty)

    def _ref(self, unwrapped):
        if self.ref_model is not None:
            return self.ref_model, None
        return unwrapped, unwrapped.disable_adapter  # PEFT base, adapters disabled

    def _gen(self, device) -> torch.Generator:
        """The sampling generator, re-seeded from (seed, process, optimizer step, micro-batch)
        at every call: samples depend only on where training is, so a run resumed from a
        checkpoint draws exactly what the uninterrupted run drew, and ranks draw differently."""
        step = int(self.state.global_step)
        self._micro = self._micro + 1 if getattr(self, "_micro_step", None) == step else 0
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

    def _scores(self, inputs, gen, texts, completions):
        """Scores [B] of one set of completions (reward model or reward functions)."""
        tok = self.processing_class
        if self.reward_model is not None:
            full = [p + c for p, c in zip(inputs["prompts"], completions)]
            scores = reward_model_scores(
                self.reward_model, gen.input_ids, gen.attention_mask,
                pad_token_id=tok.pad_token_id, texts=full,
                reward_tokenizer=self.reward_processing_class)
        else:
            raw = inputs["raw_prompts"]
            comps = completions
            if _is_conversational(raw[0]):
                comps = [[{"role": "assistant", "content": c}] for c in completions]
            ids = [row[m.bool()].tolist() for row, m in zip(gen.completion_ids,
                                                              gen.completion_mask)]
            scores = reward_funcs_scores(self.reward_funcs, raw, comps, ids)
        scores = scores.to(gen.completion_ids.device)
        return apply_missing_eos_penalty(scores, gen.completion_ids, tok.eos_token_id,
                                         self.args.missing_eos_penalty)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        tok, args = self.processing_class, self.args
        unwrapped = self.accelerator.unwrap_model(model)
        ref, ref_ctx = self._ref(unwrapped)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        params, beta, coef = self._sampling_params(), self.beta, self.mixture_coef
        g = self._gen(ids.device)
        common = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      params=params, max_length=args.max_length, generator=g)
        pol = generate(unwrapped, ids, mask, **common)
        mix = generate(unwrapped, ids, mask, ref_model=ref, coef=coef, ref_context=ref_ctx,
                       **common)
        pol_text = self._decode(pol.completion_ids, pol.completion_mask)
        mix_text = self._decode(mix.completion_ids, mix.completion_mask)
        pol_scores = mix_scores = None
        if self.judge is not None:
            pairs = list(zip(pol_text, mix_text))
            probability = torch.tensor(judge_probabilities(self.judge, inputs["prompts"], pairs),
                                       dtype=torch.float32, device=ids.device)
        else:
            pol_scores = self._scores(inputs, pol, None, pol_text)
            mix_scores = self._scores(inputs, mix, None, mix_text)
            probability = preference_probability(pol_scores, mix_scores)
        ctx = pol.prompt_ids.shape[1]
        st = completion_stats(model, pol.input_ids, pol.attention_mask, ctx, ref_model=ref,
                              ref_context=ref_ctx)
        cmask = pol.completion_mask
        loss, score, kl_term = nash_md_loss(
            st.logprobs, st.ref_logprobs, probability, cmask, beta,
            token_kl=st.kl if args.kl_estimator == "full" else None)
        if model.training:
            self._record(st, cmask, probability, score, pol, mix, pol_scores, mix_scores, beta,
                         coef)
            self.last_samples = [
                {"step": int(self.state.global_step), "prompt": p, "policy": a, "mixture": b,
                 "probability": float(pr),
                 **({"policy_score": float(s1), "mixture_score": float(s2)}
                    if pol_scores is not None else {})}
                for p, a, b, pr, s1, s2 in zip(
                    inputs["prompts"], pol_text, mix_text, probability.tolist(),
                    *( (pol_scores.tolist(), mix_scores.tolist()) if pol_scores is not None
                       else ([None] * len(pol_text), [None] * len(pol_text))))]
        return (loss, {"probability": probability}) if return_outputs else loss

    @torch.no_grad()
    def _record(self, st, cmask, probability, score, pol, mix, pol_scores, mix_scores, beta, coef):
        m = cmask.bool()
        lp = torch.where(m, st.logprobs.detach(), 0.0).sum(1)
        rlp = torch.where(m, st.ref_logprobs, 0.0).sum(1)
        if self.args.kl_estimator == "full":
            kl = torch.where(m, st.kl.detach(), 0.0).sum(1)
        else:
            kl = lp - rlp  # Σ_t (logπ − logμ): the sample estimate, as the original logged

        def gm(x):
            return self.accelerator.gather_for_metrics(x.float().reshape(-1)).mean().item()

        eos = self.processing_class.eos_token_id
        s = self.stats
        s["loss/score"].append(gm(score.detach()))
        s["loss/kl"].append(gm(kl))
        s["logps/chosen"].append(gm(lp))
        s["logps/rejected"].append(gm(rlp))
        if pol_scores is not None:
            s["rewards/chosen"].append(gm(pol_scores))
            s["rewards/rejected"].append(gm(mix_scores))
        s["rewards/probabilities"].append(gm(probability))
        s["objective/entropy"].append(gm(-lp))
        margin = lp - rlp
        s["rewards/margins"].append(gm(margin))
        s["rewards/accuracies"].append(gm((margin > 0).float()))
        s["val/model_contain_eos_token"].append(gm((pol.completion_ids == eos).any(1)))
        s["val/ref_contain_eos_token"].append(gm((mix.completion_ids == eos).any(1)))
        s["beta"].append(float(beta))
        s["mixture_coef"].append(float(coef))

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
