"""``OnlineDPOConfig`` and ``OnlineDPOTrainer``: Online DPO (Guo et al., 2024) on the shared
machinery of :mod:`nashkern.rl.online`.

One step (``compute_loss``; ``training_step`` adds the backward):
  1. two policy completions per prompt: one KV-cached decoding loop over the prompts repeated
     twice, each prompt prefilled once (:func:`generate_pair`; rows ``[0, B)`` the first
     samples, ``[B, 2B)`` the second);
  2. the preferred one of each pair from the judge, or from one scoring pass over the ``2B``
     completions (reward model / reward functions; a tie goes to the first);
  3. the ``2B`` sequences reordered ``chosen ‖ rejected`` (:mod:`nashkern.rl.pairs`), then ONE
     policy forward and ONE reference forward (no grad) over them through
     :func:`completion_stats` (fused log-probs from the final hidden states, no ``[B, T, V]``);
  4. :func:`dpo_loss` on the per-sequence sums and the original trainer's metrics.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .generation import generate_pair
from .losses import LOSS_TYPES, dpo_loss
from .model_card import ONLINE_DPO_PAPER
from .config import OnlinePreferenceConfig, _as_list
from .online import OnlinePreferenceTrainer
from .pairs import chosen_rejected_from_preference, concat_generations


@dataclass
class OnlineDPOConfig(OnlinePreferenceConfig):
    """Training arguments of :class:`OnlineDPOTrainer` (the generation / scoring fields of the
    original ``OnlineDPOConfig``; ``beta`` a float or one value per epoch)."""

    loss_type: str = field(default="sigmoid", metadata={
        "help": "'sigmoid' (DPO) or 'ipo' (IPO; beta is its tau).", "choices": list(LOSS_TYPES)})

    def __post_init__(self):
        # loss_type and beta alone: checks.FIELD_RULES (in super().__post_init__); together here
        if self.loss_type == "ipo" and any(b == 0 for b in _as_list("beta", self.beta)):
            raise ValueError("loss_type='ipo' needs beta > 0 (its target is 1/(2·beta))")
        super().__post_init__()


class OnlineDPOTrainer(OnlinePreferenceTrainer):
    """Online DPO: two policy samples per prompt, the preferred one chosen, the DPO loss."""

    config_class = OnlineDPOConfig
    _method_name = "Online DPO"
    _paper = ONLINE_DPO_PAPER

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        ref, ref_ctx = self._ref(unwrapped)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        B, beta = ids.shape[0], self.beta
        # both samples in one loop over the 2B rows, each prompt prefilled once: the same
        # draws as generate(ids.repeat(2, 1), ...) (generate_pair without a second generator)
        with self._timed("generation"):
            samples = concat_generations(
                *generate_pair(unwrapped, ids, mask,
                               **self._generation_kwargs(self._gen(ids.device))),
                pad_token_id=self.processing_class.pad_token_id)
        with self._timed("scoring"):
            texts = self._decode(samples.completion_ids, samples.completion_mask)
            first_chosen, scores = self._preference(inputs, samples, texts)
        with self._timed("statistics"):
            pairs = chosen_rejected_from_preference(samples, first_chosen)
            (pc, pr), (rc, rr) = self._pair_logps(model, pairs, ref, ref_ctx)
        loss, losses = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=self.args.loss_type)
        keep = self._kept_rows((None,) if scores is None else (scores[:B], scores[B:]), B,
                               ids.device, inputs["prompts"])
        if not bool(keep.all()):  # nonfinite_scores="skip": the mean over the kept pairs
            loss = self._kept_mean(losses, keep)
        if self._records(model):
            eos = self.processing_class.eos_token_id
            has_eos = (samples.completion_ids == eos).any(1).float()
            self._record_dpo_metrics(pc.detach(), pr.detach(), rc, rr, beta,
                                     None if scores is None else pairs.split(scores[pairs.index]),
                                     has_eos[:B], has_eos[B:])
            self.last_samples = [
                {"step": int(self.state.global_step), "prompt": p, "completion_1": a,
                 "completion_2": b, "chosen": 1 if bool(f) else 2,
                 **({"score_1": float(s1), "score_2": float(s2)} if scores is not None else {})}
                for p, a, b, f, s1, s2 in zip(
                    inputs["prompts"], texts[:B], texts[B:], first_chosen.tolist(),
                    *((scores[:B].tolist(), scores[B:].tolist()) if scores is not None
                      else ([None] * B, [None] * B)))]
        return (loss, {"losses": losses}) if return_outputs else loss

    @torch.no_grad()
    def _record_dpo_metrics(self, pc, pr, rc, rr, beta, chosen_rejected_scores, eos_1, eos_2):
        """The original Online DPO metrics, per prompt (their batch means are the original's
        means over the ``2B`` completions)."""
        kl = ((pc - rc) + (pr - rr)) / 2              # mean Σ(logπ − logμ) of the two samples
        non_score_reward = -beta * kl
        chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
        margin = chosen_rewards - rejected_rewards
        metrics = {"objective/kl": kl, "objective/entropy": -(pc + pr) / 2,
                   "objective/non_score_reward": non_score_reward}
        if chosen_rejected_scores is not None:
            sc, sr = chosen_rejected_scores
            metrics.update({"objective/rlhf_reward": (sc + sr) / 2 + non_score_reward,
                            "objective/scores_margin": sc - sr,
                            "objective/scores": (sc + sr) / 2})
        metrics.update({
            "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (margin > 0).float(), "rewards/margins": margin,
            "logps/chosen": pc, "logps/rejected": pr,
            # the original averaged this one on the local process only; gathered here
            "val/contain_eos_token": (eos_1 + eos_2) / 2, "beta": float(beta)})
        self._record_metrics(metrics)
