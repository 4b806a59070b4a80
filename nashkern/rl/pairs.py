"""Preference pairs for the DPO-style trainers (Online DPO, XPO) as small functions.

A step has two completions per prompt, ``first`` and ``second`` (XPO: the policy's y and the
reference's ỹ; Online DPO: two policy samples). They are kept *stacked*: one
:class:`~nashkern.rl.generation.GenerationOutput` of ``2B`` rows, rows ``[0, B)`` the first
completions and ``[B, 2B)`` the second, on a common padding (:func:`concat_generations`).
:func:`first_preferred` turns scores or judge choices into the per-prompt ``first is chosen``
mask, and :func:`chosen_rejected_from_preference` reorders the stacked rows into
``chosen ‖ rejected`` (rows ``[0, B)`` chosen, ``[B, 2B)`` rejected): one policy forward and one
reference forward over those ``2B`` rows then give all four log-prob sums of the DPO loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .generation import GenerationOutput


def _pad_right(x: Tensor, width: int, value: int) -> Tensor:
    return F.pad(x, (0, width - x.shape[1]), value=value) if x.shape[1] < width else x


def concat_generations(*outputs: GenerationOutput, pad_token_id: int) -> GenerationOutput:
    """Stack generation outputs of the same prompts along the batch; completions are right-padded
    (``pad_token_id``, mask 0) to the longest one."""
    if not outputs:
        raise ValueError("concat_generations needs at least one GenerationOutput")
    p0 = outputs[0]
    for o in outputs[1:]:
        if o.prompt_ids.shape[1] != p0.prompt_ids.shape[1]:
            raise ValueError("concat_generations: the outputs have different prompt widths "
                             f"({p0.prompt_ids.shape[1]} vs {o.prompt_ids.shape[1]}); generate "
                             "them from the same prompts")
    width = max(o.completion_ids.shape[1] for o in outputs)
    return GenerationOutput(
        torch.cat([o.prompt_ids for o in outputs], 0),
        torch.cat([o.prompt_mask for o in outputs], 0),
        torch.cat([_pad_right(o.completion_ids, width, pad_token_id) for o in outputs], 0),
        torch.cat([_pad_right(o.completion_mask, width, 0) for o in outputs], 0))


def split_generation(output: GenerationOutput, parts: int = 2):
    """The inverse of :func:`concat_generations` for equal parts (views, no copies)."""
    B = output.prompt_ids.shape[0]
    if B % parts:
        raise ValueError(f"cannot split {B} rows into {parts} equal parts")
    n = B // parts
    return [GenerationOutput(output.prompt_ids[i * n:(i + 1) * n],
                             output.prompt_mask[i * n:(i + 1) * n],
                             output.completion_ids[i * n:(i + 1) * n],
                             output.completion_mask[i * n:(i + 1) * n]) for i in range(parts)]


def first_preferred(*, scores: Optional[Tensor] = None, other_scores: Optional[Tensor] = None,
                    judge_choices: Optional[Sequence[int]] = None,
                    device=None) -> Tensor:
    """Bool ``[B]``: True where the first completion of a pair is chosen.

    From scores (reward model / reward functions): ``scores >= other_scores`` (a tie goes to the
    first, as in the original trainers; a NaN/inf score loses to a finite one, and the first
    is kept when both are non-finite). From a pairwise judge's choices (the index of the
    preferred completion): ``choice == 0`` (a judge's -1, "undecided", therefore picks the
    second, as the original ``rank == 0`` test did)."""
    if (judge_choices is None) == (scores is None or other_scores is None):
        raise ValueError("first_preferred needs either scores and other_scores, or judge_choices")
    if judge_choices is not None:
        return torch.tensor([int(c) == 0 for c in judge_choices], dtype=torch.bool,
                            device=device)
    if scores.shape != other_scores.shape or scores.dim() != 1:
        raise ValueError(f"scores and other_scores must be [B] tensors of one shape, got "
                         f"{tuple(scores.shape)} and {tuple(other_scores.shape)}")
    # a non-finite score never wins over a finite one (``NaN >= x`` is False either way, so a
    # NaN first would be rejected but a NaN second would be chosen)
    first_ok, other_ok = torch.isfinite(scores), torch.isfinite(other_scores)
    out = torch.where(first_ok & other_ok, scores >= other_scores, first_ok | ~other_ok)
    return out if device is None else out.to(device)


@dataclass
class PreferencePairs:
    """``2B`` sequences: rows ``[0, B)`` the chosen completions, ``[B, 2B)`` the rejected ones
    (same prompts, left-padded; completions right-padded to a common width)."""

    input_ids: Tensor          # [2B, P + C]
    attention_mask: Tensor     # [2B, P + C]
    completion_mask: Tensor    # [2B, C]
    context_length: int        # P
    first_chosen: Tensor       # [B] bool
    index: Tensor              # [2B]: row of the stacked samples each pair row comes from

    @property
    def batch_size(self) -> int:
        return self.first_chosen.shape[0]

    def split(self, x: Tensor):
        """``(chosen, rejected)`` halves of a ``[2B, ...]`` tensor in this order."""
        return x[: self.batch_size], x[self.batch_size:]


def chosen_rejected_from_preference(samples: GenerationOutput,
                                    first_chosen: Tensor) -> PreferencePairs:
    """Reorder stacked ``first ‖ second`` samples (``2B`` rows) into ``chosen ‖ rejected``.

    Completion columns that are padding in every row are dropped."""
    B2 = samples.prompt_ids.shape[0]
    first_chosen = first_chosen.to(torch.bool).to(samples.prompt_ids.device).reshape(-1)
    if B2 != 2 * first_chosen.shape[0]:
        raise ValueError(f"{B2} stacked samples for {first_chosen.shape[0]} pairs: need 2 per pair")
    B = first_chosen.shape[0]
    rows = torch.arange(B, device=first_chosen.device)
    chosen = torch.where(first_chosen, rows, rows + B)
    index = torch.cat([chosen, torch.where(first_chosen, rows + B, rows)])
    width = int(samples.completion_mask.sum(1).max()) if B2 else 0
    cids = samples.completion_ids[index, :width]
    cmask = samples.completion_mask[index, :width]
    return PreferencePairs(
        input_ids=torch.cat([samples.prompt_ids[index], cids], 1),
        attention_mask=torch.cat([samples.prompt_mask[index], cmask], 1),
        completion_mask=cmask, context_length=samples.prompt_ids.shape[1],
        first_chosen=first_chosen, index=index)


def sequence_logps(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Σ over the completion tokens ``[B, T] -> [B]`` (padding ignored, even if NaN)."""
    if token_logps.shape != mask.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the shape of the log-probs "
                         f"{tuple(token_logps.shape)}")
    return torch.where(mask.bool(), token_logps, token_logps.new_zeros(())).sum(1)
