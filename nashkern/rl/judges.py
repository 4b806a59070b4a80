"""Pairwise judges: ``judge(prompts, completion_pairs, shuffle_order=True) -> list[int]``
(index of the preferred completion of each pair; -1 when the judge could not decide). What a
judge returns is checked (length, values in {-1, 0, 1}, probabilities in [0, 1])."""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from typing import List, Optional, Sequence, Tuple

from .checks import judge_choices, judge_probabilities_checked


class BasePairwiseJudge(ABC):
    """Base class of pairwise judges. A judge may also accept ``return_scores=True`` and then
    return, per pair, the probability that the *first* completion is preferred."""

    @abstractmethod
    def judge(self, prompts: List[str], completions: List[Sequence[str]],
              shuffle_order: bool = True) -> List[int]:
        raise NotImplementedError


class RandomPairwiseJudge(BasePairwiseJudge):
    """Picks at random (for tests and smoke runs)."""

    def __init__(self, seed: Optional[int] = None):
        self.rng = random.Random(seed)

    def judge(self, prompts, completions, shuffle_order=True):
        return [self.rng.randint(0, 1) for _ in prompts]


class PairRMJudge(BasePairwiseJudge):
    """`llm-blender`'s PairRM (``llm-blender/PairRM``) as a pairwise judge.

    Needs the optional ``llm-blender`` package (``pip install llm-blender``) and hub access."""

    def __init__(self, model: str = "llm-blender/PairRM", device=None):
        try:
            import llm_blender
        except ImportError as e:
            raise ImportError("PairRMJudge needs the optional package `llm-blender`, which is not "
                              "installed: pip install llm-blender") from e
        if device is None:
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.blender = llm_blender.Blender()
        self.blender.loadranker(model, device=device)

    def judge(self, prompts, completions, shuffle_order=True, return_scores=False,
              temperature=1.0):
        import numpy as np

        if any(len(pair) != 2 for pair in completions):
            raise ValueError("PairRMJudge needs exactly 2 completions per prompt")
        flip = np.zeros(len(prompts), dtype=bool)
        if shuffle_order:
            flip = np.random.choice([True, False], size=len(prompts))
            completions = [list(p)[::-1] if f else list(p) for f, p in zip(flip, completions)]
        ranks = np.asarray(self.blender.rank(prompts, completions, return_scores=return_scores,
                                             disable_tqdm=True), dtype=float)
        if return_scores:
            ranks = ranks / temperature
        else:
            ranks = ranks - 1
        ranks[flip] = ranks[flip][:, ::-1]
        if return_scores:
            e = np.exp(ranks - ranks.max(-1, keepdims=True))
            return (e[:, 0] / e.sum(-1)).tolist()
        return [int(r) for r in ranks[:, 0]]


def judge_probabilities(judge: BasePairwiseJudge, prompts: List[str],
                        pairs: List[Tuple[str, str]]) -> List[float]:
    """P(first completion preferred) per pair: the judge's probability when it offers one
    (``return_scores=True``), else 1/0 from its choice (0.5 when it returns -1)."""
    import inspect

    try:
        accepts_scores = "return_scores" in inspect.signature(judge.judge).parameters
    except (TypeError, ValueError):
        accepts_scores = False
    if accepts_scores:
        return judge_probabilities_checked(
            judge, judge.judge(prompts, pairs, return_scores=True), len(pairs))
    choices = judge_choices(judge, judge.judge(prompts, pairs), len(pairs))
    return [0.5 if c == -1 else (1.0 if c == 0 else 0.0) for c in choices]
