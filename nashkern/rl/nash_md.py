"""``NashMDConfig`` and ``NashMDTrainer``: Nash-MD on the shared machinery of
:mod:`nashkern.rl.online`, wiring the small functions of :mod:`nashkern.rl.generation`,
:mod:`nashkern.rl.scoring`, :mod:`nashkern.rl.completion_stats` and :mod:`nashkern.rl.losses`.

One step (``compute_loss``; ``training_step`` adds the backward):
  1. policy completions and geometric-mixture completions (KV-cached, one loop,
     :func:`generate_pair`);
  2. P(policy ≻ mixture) from the reward model / judge / reward functions;
  3. policy and reference per-token log-probs (and exact KL) of the policy completions from the
     final hidden states (:func:`completion_stats`, no ``[B, T, V]`` logits);
  4. :func:`nash_md_loss` and the original trainer's metrics (gathered across processes).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar, List, Tuple

import torch

from .generation import derived_generator, generate, generate_pair
from .judges import judge_probabilities
from .completion_stats import completion_stats
from .losses import LOSS_TYPES, nash_md_loss
from .mixture_wrapper import GeometricMixtureWrapper  # noqa: F401  (TRL 1.13's import path)
from .model_card import NASH_MD_PAPER
from .config import OnlinePreferenceConfig
from .online import OnlinePreferenceTrainer
from .scoring import preference_probability


@dataclass
class NashMDConfig(OnlinePreferenceConfig):
    """Training arguments of :class:`NashMDTrainer` (fields of the original ``NashMDConfig``).

    ``beta`` and ``mixture_coef`` take a float or a list (one value per epoch; the last value is
    kept after the list ends)."""

    _schedules: ClassVar[Tuple[str, ...]] = ("beta", "mixture_coef")

    mixture_coef: List[float] = field(default_factory=lambda: [0.5], metadata={
        "help": "Reference weight c of the mixture π^(1-c)·μ^c: float or one per epoch."})
    kl_estimator: str = field(default="sample", metadata={
        "help": "'sample': Σ sg(logπ−logμ)·logπ (original); 'full': exact per-token KL."})

    loss_type: str = field(default="sigmoid", metadata={
        "help": "Accepted for TRL 1.13 compatibility (its NashMDConfig inherits it from "
                "OnlineDPOConfig); Nash-MD's loss has no variants, so only 'sigmoid' is silent.",
        "choices": list(LOSS_TYPES)})

    def __post_init__(self):
        super().__post_init__()  # every field (loss_type, mixture_coef, ...): checks.FIELD_RULES
        if self.loss_type != "sigmoid":
            warnings.warn(f"NashMDConfig.loss_type={self.loss_type!r} has no effect: the Nash-MD "
                          f"loss has no DPO/IPO variants (TRL 1.13 ignored it as well)",
                          UserWarning, stacklevel=3)


class NashMDTrainer(OnlinePreferenceTrainer):
    """Nash-MD (Munos et al., 2023) with KV-cached mixture generation and fused token stats."""

    config_class = NashMDConfig
    _method_name = "Nash-MD"
    _paper = NASH_MD_PAPER
    _reward_tokenizer_from_path = False  # TRL 1.13's Nash-MD scores with the policy's tokenizer

    def __init__(self, model=None, ref_model=None, reward_funcs=None, args=None,
                 data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), preprocess_logits_for_metrics=None, *,
                 reward_model=None, judge=None, reward_processing_classes=None,
                 reward_processing_class=None):
        """TRL 1.13's positional order (its NashMDTrainer has no reward_processing_classes
        argument; here it is a keyword, as are nashkern's reward_model= and judge=)."""
        super().__init__(model, ref_model, reward_funcs, args, data_collator, train_dataset,
                         eval_dataset, processing_class, reward_processing_classes, peft_config,
                         compute_metrics, callbacks, optimizers, preprocess_logits_for_metrics,
                         reward_model=reward_model, judge=judge,
                         reward_processing_class=reward_processing_class)

    @property
    def mixture_coef(self) -> float:
        return self._scheduled("mixture_coef")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        unwrapped = self.accelerator.unwrap_model(model)
        ref, ref_ctx = self._ref(unwrapped)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        beta, coef = self.beta, self.mixture_coef
        common = self._generation_kwargs(self._gen(ids.device))
        with self._timed("generation"):
            pol, mix = self._samples(unwrapped, ids, mask, ref, ref_ctx, coef, common)
        with self._timed("scoring"):
            pol_text = self._decode(pol.completion_ids, pol.completion_mask)
            mix_text = self._decode(mix.completion_ids, mix.completion_mask)
            pol_scores = mix_scores = None
            if self.judge is not None:
                pairs = list(zip(pol_text, mix_text))
                probability = torch.tensor(
                    judge_probabilities(self.judge, inputs["prompts"], pairs),
                    dtype=torch.float32, device=ids.device)
            else:
                pol_scores = self._scores(inputs, pol, pol_text)
                mix_scores = self._scores(inputs, mix, mix_text)
                probability = preference_probability(pol_scores, mix_scores)
            keep = self._kept_rows((probability, pol_scores, mix_scores), len(pol_text),
                                   ids.device, inputs["prompts"])
        with self._timed("statistics"):
            ctx = pol.prompt_ids.shape[1]
            st = completion_stats(model, pol.input_ids, pol.attention_mask, ctx, ref_model=ref,
                                  ref_context=ref_ctx, allow_unfused=self.args.allow_unfused_head)
            cmask = pol.completion_mask
            loss, score, kl_term = nash_md_loss(
                st.logprobs, st.ref_logprobs, torch.where(keep, probability, 0.5),
                cmask * keep[:, None], beta,
                token_kl=st.kl if args.kl_estimator == "full" else None)
            if not bool(keep.all()):  # nonfinite_scores="skip": the mean over the kept prompts
                loss = self._kept_mean(beta * kl_term - score, keep)
        if self._records(model):
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

    def _samples(self, unwrapped, ids, mask, ref, ref_ctx, coef, common):
        """``(y, y′)``: the policy's completions and the opponent's. Nash-MD: y ~ π and
        y′ ~ π^(1−c)·μ^c in one decoding loop (:func:`generate_pair`: each prompt prefilled
        once per model, the policy decoding the 2B rows and the reference the B mixture rows;
        y′ from :func:`derived_generator` of the step's generator, also at ``c = 0``). A
        subclass whose opponent is not the mixture (it overrides :meth:`_opponent_samples`,
        e.g. Nash-EMA's averaged weights) generates the two one after the other, the opponent
        drawing from the same derived stream (so Nash-EMA at β = 0 draws what Nash-MD at
        c = 0 draws)."""
        second = derived_generator(common["generator"])  # before the policy's draws
        if type(self)._opponent_samples is not NashMDTrainer._opponent_samples:
            pol = generate(unwrapped, ids, mask, **common)
            return pol, self._opponent_samples(unwrapped, ids, mask, ref, ref_ctx, coef,
                                               dict(common, generator=second))
        return generate_pair(unwrapped, ids, mask, ref_model=ref, coef=coef,
                             ref_context=ref_ctx, second_generator=second, **common)

    def _opponent_samples(self, unwrapped, ids, mask, ref, ref_ctx, coef, common):
        """The opponent's completions: the geometric mixture ``π^(1−c)·μ^c`` (the hook
        :class:`~nashkern.rl.nash_ema.NashEMATrainer` overrides with the policy's EMA)."""
        return generate(unwrapped, ids, mask, ref_model=ref, coef=coef, ref_context=ref_ctx,
                        **common)

    def _opponent_metrics(self, coef) -> dict:
        """The schedule value logged for the opponent (``mixture_coef``)."""
        return {"mixture_coef": float(coef)}

    @torch.no_grad()
    def _record(self, st, cmask, probability, score, pol, mix, pol_scores, mix_scores, beta, coef):
        m = cmask.bool()
        lp = torch.where(m, st.logprobs.detach(), 0.0).sum(1)
        rlp = torch.where(m, st.ref_logprobs, 0.0).sum(1)
        if self.args.kl_estimator == "full":
            kl = torch.where(m, st.kl.detach(), 0.0).sum(1)
        else:
            kl = lp - rlp  # Σ_t (logπ − logμ): the sample estimate, as the original logged
        eos = self.processing_class.eos_token_id
        margin = lp - rlp
        metrics = {"loss/score": score, "loss/kl": kl, "logps/chosen": lp, "logps/rejected": rlp}
        if pol_scores is not None:
            metrics.update({"rewards/chosen": pol_scores, "rewards/rejected": mix_scores})
        metrics.update({
            "rewards/probabilities": probability, "objective/entropy": -lp,
            "rewards/margins": margin, "rewards/accuracies": (margin > 0).float(),
            "val/model_contain_eos_token": (pol.completion_ids == eos).any(1),
            "val/ref_contain_eos_token": (mix.completion_ids == eos).any(1),
            "beta": float(beta), **self._opponent_metrics(coef)})
        self._record_metrics(metrics)
