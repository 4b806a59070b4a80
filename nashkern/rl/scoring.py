"""Preference probability P(policy completion ≻ mixture completion) from a reward model, a
pairwise judge or reward functions, and the ``missing_eos_penalty``."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from .checks import check_reward_logits, finite_rows, reward_values, scorer_name


def left_pack(ids: Tensor, mask: Tensor, pad_token_id: int):
    """Move every row's attended tokens to the right end (left padding)."""
    mask = mask.bool()
    lengths = mask.sum(1)
    T = int(lengths.max()) if ids.shape[0] else 0
    out = torch.full((ids.shape[0], T), pad_token_id, dtype=ids.dtype, device=ids.device)
    out_mask = torch.zeros((ids.shape[0], T), dtype=torch.long, device=ids.device)
    for i in range(ids.shape[0]):
        row = ids[i][mask[i]]
        if row.numel():
            out[i, T - row.numel():] = row
            out_mask[i, T - row.numel():] = 1
    return out, out_mask


def same_tokenizer(a, b) -> bool:
    if a is None or b is None or a is b:
        return True
    try:
        return type(a) is type(b) and len(a) == len(b) and a.get_vocab() == b.get_vocab()
    except Exception:  # noqa: BLE001
        return False


@torch.no_grad()
def reward_model_scores(reward_model, input_ids: Tensor, attention_mask: Tensor, *,
                        pad_token_id: int, texts: Optional[List[str]] = None,
                        reward_tokenizer=None, max_length: Optional[int] = None) -> Tensor:
    """Scalar rewards ``[B]`` (float32) of full sequences (prompt + completion).

    Same tokenizer: the policy's ids, repacked to the left so the score is read at the last
    real token. Different tokenizer: ``texts`` (decoded prompt + completion) re-tokenised with
    ``reward_tokenizer``."""
    was_training = reward_model.training
    reward_model.eval()
    try:
        device = next(reward_model.parameters()).device
        if reward_tokenizer is not None and texts is not None:
            side = reward_tokenizer.padding_side
            reward_tokenizer.padding_side = "left"
            try:
                enc = reward_tokenizer(texts, return_tensors="pt", padding=True,
                                       truncation=max_length is not None, max_length=max_length,
                                       add_special_tokens=False)
            finally:
                reward_tokenizer.padding_side = side
            ids, mask = enc["input_ids"], enc["attention_mask"]
        else:
            ids, mask = left_pack(input_ids, attention_mask, pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = reward_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        check_reward_logits(type(reward_model).__name__, logits)
        if logits.dim() == 3:  # a model returning per-token scores: the last (real) position
            logits = logits[:, -1]
        return logits[:, 0].float()
    finally:
        reward_model.train(was_training)


def reward_funcs_scores(reward_funcs: Sequence[Callable], prompts: List, completions: List,
                        completion_ids: List[List[int]], weights: Optional[Sequence[float]] = None,
                        nonfinite: str = "raise", **kwargs) -> Tensor:
    """Σ_f w_f · f(prompts, completions, completion_ids=..., **kwargs) per row, float32 ``[B]``
    (a ``None`` reward counts as 0). Each output is checked (:func:`~nashkern.rl.checks.
    reward_values`); a NaN/inf reward raises naming the function and the rows
    (``nonfinite="raise"``) or makes that row's total NaN (``"skip"``: the trainer drops it)."""
    total = torch.zeros(len(prompts), dtype=torch.float32)
    weights = weights or [1.0] * len(reward_funcs)
    for w, f in zip(weights, reward_funcs):
        name = scorer_name(f)
        r = reward_values(name, f(prompts=prompts, completions=completions,
                                  completion_ids=completion_ids, **kwargs), len(prompts))
        finite_rows(r, f"reward function {name}", nonfinite, prompts)
        total += w * r
    return total


def reward_texts(prompts: List, completions: List, tokenizer) -> List[str]:
    """The texts a reward model scores, as TRL 1.13 builds them: ``prompt + completion`` for
    standard data; for conversational data (prompts and completions lists of messages) the
    conversation rendered by ``tokenizer``'s own chat template."""
    if prompts and isinstance(prompts[0], list):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("conversational prompts need a chat template on the reward model's "
                             "tokenizer (reward_processing_classes) to render the conversation")
        return [tokenizer.apply_chat_template(list(p) + list(c), tokenize=False)
                for p, c in zip(prompts, completions)]
    return [p + c for p, c in zip(prompts, completions)]


class ModelRewardFunc:
    """A reward model and its tokenizer as a reward function (TRL 1.13's model entry of
    ``reward_funcs``, when it is combined with other reward functions): scores
    :func:`reward_texts` with :func:`reward_model_scores`."""

    def __init__(self, model, tokenizer, max_length: Optional[int] = None):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        cfg = getattr(model, "config", None)
        self.__name__ = str(getattr(cfg, "_name_or_path", "") or type(model).__name__)

    def __call__(self, prompts, completions, **kwargs) -> List[float]:
        texts = reward_texts(prompts, completions, self.tokenizer)
        return reward_model_scores(self.model, None, None, pad_token_id=self.tokenizer.pad_token_id,
                                   texts=texts, reward_tokenizer=self.tokenizer,
                                   max_length=self.max_length).tolist()


def apply_missing_eos_penalty(scores: Tensor, completion_ids: Tensor, eos_token_id: int,
                              penalty: Optional[float]) -> Tensor:
    """Subtract ``penalty`` from the scores of completions that contain no EOS."""
    if penalty is None:
        return scores
    has_eos = (completion_ids == eos_token_id).any(-1).to(scores.device)
    return scores - penalty * (~has_eos).to(scores.dtype)


def preference_probability(scores: Tensor, other_scores: Tensor) -> Tensor:
    """P = σ(r(y) − r(y'))."""
    return torch.sigmoid(scores - other_scores)
