"""``XPOConfig`` and ``XPOTrainer``: Exploratory Preference Optimization (Xie et al., 2024) on the
shared machinery of :mod:`nashkern.rl.online`.

One step (``compute_loss``; ``training_step`` adds the backward):
  1. a policy completion y and a reference completion ỹ per prompt (KV-cached, one decoding
     loop, :func:`generate_pair`; ỹ from the reference alone, i.e. the PEFT base with the adapters disabled when there is no
     ``ref_model``), stacked ``y ‖ ỹ`` on a common padding;
  2. chosen / rejected per prompt from the judge, or from one scoring pass over the ``2B``
     completions (reward model / reward functions; y is chosen when its score ≥ ỹ's);
  3. the ``2B`` sequences reordered ``chosen ‖ rejected`` (:mod:`nashkern.rl.pairs`), then ONE
     policy forward and ONE reference forward (no grad) over them through
     :func:`completion_stats` (fused log-probs from the final hidden states, no ``[B, T, V]``);
     the exploration term's Σ log π(ỹ) is the chosen or the rejected policy sum, no extra pass;
  4. :func:`xpo_loss` and the original trainer's metrics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Tuple

import torch

from .generation import generate_pair
from .losses import xpo_loss
from .model_card import XPO_PAPER
from .online import OnlinePreferenceTrainer
from .online_dpo import OnlineDPOConfig
from .pairs import chosen_rejected_from_preference, concat_generations


@dataclass
class XPOConfig(OnlineDPOConfig):
    """Training arguments of :class:`XPOTrainer`: those of :class:`OnlineDPOConfig` (``beta``,
    ``loss_type``, generation, scoring) and ``alpha``, the weight of the exploration term.
    ``alpha`` and ``beta`` take a float or a list (one value per epoch, the last one kept)."""

    _schedules: ClassVar[Tuple[str, ...]] = ("beta", "alpha")

    alpha: List[float] = field(default_factory=lambda: [1e-5], metadata={
        "help": "Weight of the XPO exploration term α·Σlogπ(ỹ): float or one per epoch."})



class XPOTrainer(OnlinePreferenceTrainer):
    """XPO: DPO on (policy sample, reference sample) pairs plus α·Σ log π(ỹ)."""

    config_class = XPOConfig
    _method_name = "XPO"
    _paper = XPO_PAPER

    @property
    def alpha(self) -> float:
        return self._scheduled("alpha")

    def _completions(self, unwrapped, ids, mask, generator):
        """``(y, ỹ)``: a policy completion and a reference completion of every prompt."""
        ref, ref_ctx = self._ref(unwrapped)
        kw = self._generation_kwargs(generator)
        # One decoding loop for both (generate_pair): y ~ π from `generator`, ỹ from coef = 1,
        # the reference alone (the policy decodes only the y rows), from a stream derived from
        # `generator`'s state. Under PEFT without ref_model the reference is the base with the
        # adapters really disabled (``disable_adapter`` around each reference forward); the
        # original sampled from ``get_base_model()``, which still carries the injected LoRA
        # layers, i.e. from the policy.
        return generate_pair(unwrapped, ids, mask, ref_model=ref, coef=1.0, ref_context=ref_ctx,
                             **kw)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        ref, ref_ctx = self._ref(unwrapped)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        B, beta, alpha = ids.shape[0], self.beta, self.alpha
        with self._timed("generation"):
            policy, reference = self._completions(unwrapped, ids, mask, self._gen(ids.device))
            samples = concat_generations(policy, reference,
                                         pad_token_id=self.processing_class.pad_token_id)
        with self._timed("scoring"):
            texts = self._decode(samples.completion_ids, samples.completion_mask)
            policy_chosen, scores = self._preference(inputs, samples, texts)
        with self._timed("statistics"):
            pairs = chosen_rejected_from_preference(samples, policy_chosen)
            (pc, pr), (rc, rr) = self._pair_logps(model, pairs, ref, ref_ctx)
        # ỹ is the rejected completion where y is chosen, and the chosen one elsewhere
        policy_ref_sample = torch.where(policy_chosen, pr, pc)
        loss, dpo_losses, xpo_losses = xpo_loss(pc, pr, rc, rr, policy_ref_sample, beta=beta,
                                                alpha=alpha, loss_type=self.args.loss_type)
        keep = self._kept_rows((None,) if scores is None else (scores[:B], scores[B:]), B,
                               ids.device, inputs["prompts"])
        if not bool(keep.all()):  # nonfinite_scores="skip": the mean over the kept pairs
            loss = self._kept_mean(dpo_losses + xpo_losses, keep)
        if self._records(model):
            eos = self.processing_class.eos_token_id
            has_eos = (samples.completion_ids == eos).any(1).float()
            self._record_xpo_metrics(
                pc.detach(), pr.detach(), rc, rr, dpo_losses, xpo_losses, beta, alpha, scores,
                None if scores is None else pairs.split(scores[pairs.index]),
                has_eos[:B], has_eos[B:])
            self.last_samples = [
                {"step": int(self.state.global_step), "prompt": p, "policy": a, "reference": b,
                 "chosen": "policy" if bool(f) else "reference",
                 **({"policy_score": float(s1), "reference_score": float(s2)}
                    if scores is not None else {})}
                for p, a, b, f, s1, s2 in zip(
                    inputs["prompts"], texts[:B], texts[B:], policy_chosen.tolist(),
                    *((scores[:B].tolist(), scores[B:].tolist()) if scores is not None
                      else ([None] * B, [None] * B)))]
        return (loss, {"dpo_losses": dpo_losses, "xpo_losses": xpo_losses}) if return_outputs \
            else loss

    @torch.no_grad()
    def _record_xpo_metrics(self, pc, pr, rc, rr, dpo_losses, xpo_losses, beta, alpha, scores,
                            chosen_rejected_scores, model_eos, ref_eos):
        """The original XPO metrics, per prompt (their batch means are the original's means;
        ``objective/kl`` and ``objective/entropy`` average the policy and the reference
        completions, which are the chosen and the rejected ones in some order)."""
        B = pc.shape[0]
        chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
        margin = chosen_rewards - rejected_rewards
        metrics = {"loss/dpo": dpo_losses, "loss/xpo": xpo_losses,
                   "objective/kl": ((pc - rc) + (pr - rr)) / 2,
                   "objective/entropy": -(pc + pr) / 2}
        if scores is not None:
            sc, sr = chosen_rejected_scores
            metrics.update({
                "objective/model_scores": scores[:B], "objective/ref_scores": scores[B:],
                # documented as chosen − rejected; the original code logged model − ref, which
                # is objective/model_scores − objective/ref_scores
                "objective/scores_margin": sc - sr})
        metrics.update({
            "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (margin > 0).float(), "rewards/margins": margin,
            # documented as the policy's mean log-probs of the chosen / rejected completions;
            # the original code added the reference's mean log-probs to them
            "logps/chosen": pc, "logps/rejected": pr,
            "val/model_contain_eos_token": model_eos, "val/ref_contain_eos_token": ref_eos,
            "alpha": float(alpha), "beta": float(beta)})
        self._record_metrics(metrics)
