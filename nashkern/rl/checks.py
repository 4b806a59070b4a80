"""Checks of every value that crosses from a user into the online trainers, where it enters.

* scalar fields of the configs and of :class:`~nashkern.rl.generation.SamplingParams`: one
  declarative table, :data:`FIELD_RULES` (a field that a class lacks is skipped, so a new config
  field gets checked by adding one row);
* prompts: the datasets at construction (every row) and every collated batch (streaming
  datasets, whose rows are only seen then);
* reward function outputs, reward model outputs, judge choices and probabilities;
* non-finite scores (:func:`finite_rows`, policy ``nonfinite_scores``), the loss before the
  backward and the weights before a save.

Errors name the argument (field, column and row, reward function, judge) and what was expected.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

NONFINITE_POLICIES = ("raise", "skip")
LOSS_TYPES = ("sigmoid", "ipo")  # of Online DPO / XPO (nashkern.rl.losses); Nash-MD accepts them
#: ``compile_decode``: None (eager decode) or the ``torch.compile`` mode of the compiled one-token
#: forward (nashkern.rl.compiled_decode; "reduce-overhead": CUDA graphs on a GPU)
COMPILE_DECODE_MODES = (None, "default", "reduce-overhead", "max-autotune-no-cudagraphs")


# ------------------------------------------------------------------------------------------------
# scalar fields (configs, SamplingParams)
# ------------------------------------------------------------------------------------------------
def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _finite(v) -> bool:
    return _real(v) and math.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _optional(rule: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or rule(v)


def _one_of(*choices) -> Callable[[Any], bool]:
    return lambda v: v in choices


#: field -> (is the value valid, what is expected). Fields listed in ``LIST_FIELDS`` (per-epoch
#: schedules, weights) hold a list: the rule applies to every element.
FIELD_RULES: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "beta": (lambda v: _finite(v) and v >= 0, "a finite float >= 0"),
    "alpha": (lambda v: _finite(v) and v >= 0, "a finite float >= 0"),
    "mixture_coef": (lambda v: _finite(v) and 0 <= v <= 1, "a float in [0, 1]"),
    "temperature": (lambda v: _finite(v) and v > 0, "a finite float > 0"),
    "top_p": (_optional(lambda v: _finite(v) and 0 < v <= 1), "None or a float in (0, 1]"),
    "top_k": (_optional(lambda v: _integer(v) and v >= 0), "None or an int >= 0 (0: off)"),
    "min_p": (_optional(lambda v: _finite(v) and 0 <= v <= 1), "None or a float in [0, 1]"),
    "repetition_penalty": (_optional(lambda v: _finite(v) and v > 0),
                           "None or a finite float > 0"),
    "missing_eos_penalty": (_optional(_finite), "None or a finite float"),
    "max_new_tokens": (lambda v: _integer(v) and v >= 1, "an int >= 1"),
    "max_length": (_optional(lambda v: _integer(v) and v >= 2), "None or an int >= 2"),
    "reward_weights": (_finite, "a list of finite floats"),
    "warmup_ratio": (_optional(lambda v: _finite(v) and 0 <= v < 1), "None or a float in [0, 1)"),
    "kl_estimator": (_one_of("sample", "full"), "'sample' or 'full'"),
    "loss_type": (_one_of(*LOSS_TYPES), f"one of {LOSS_TYPES}"),
    "ema_decay": (lambda v: _finite(v) and 0 <= v <= 1,
                  "a float in [0, 1] (0: self-play, 1: the opponent stays at the initial policy)"),
    "nonfinite_scores": (_one_of(*NONFINITE_POLICIES), f"one of {NONFINITE_POLICIES}"),
    "compile_decode": (_one_of(*COMPILE_DECODE_MODES), f"one of {COMPILE_DECODE_MODES}"),
}
LIST_FIELDS = ("beta", "alpha", "mixture_coef", "reward_weights", "ema_decay")


def check_fields(obj, rules: Dict[str, Tuple[Callable[[Any], bool], str]] = FIELD_RULES) -> None:
    """Check the fields of ``obj`` named in ``rules`` (absent fields are skipped); raises
    ``ValueError("<Class>.<field> must be <expected>, got <value>")``."""
    owner = type(obj).__name__
    for name, (ok, expected) in rules.items():
        if not hasattr(obj, name):
            continue
        value = getattr(obj, name)
        if name in LIST_FIELDS and value is None:
            continue
        values = list(value) if name in LIST_FIELDS and isinstance(value, (list, tuple)) \
            else [value]
        for i, v in enumerate(values):
            if not ok(v):
                at = f" (element {i})" if len(values) > 1 else ""
                raise ValueError(f"{owner}.{name} must be {expected}, got {value!r}{at}")


# ------------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------------
def is_conversational(prompt) -> bool:
    return isinstance(prompt, list) and len(prompt) > 0 and isinstance(prompt[0], dict) \
        and "role" in prompt[0]


def _short(x, n: int = 40) -> str:
    r = repr(x)
    return r if len(r) <= n else r[: n - 3] + "..."


def prompt_problem(prompt) -> Optional[str]:
    """What is wrong with one prompt (None when it is a non-empty string or a well-formed list of
    chat messages ``{"role": str, "content": str | list}``)."""
    if prompt is None:
        return "is None"
    if isinstance(prompt, str):
        return "is an empty string" if not prompt else None
    if isinstance(prompt, list):
        if not prompt:
            return "is an empty list of messages"
        for j, m in enumerate(prompt):
            if not isinstance(m, dict):
                return (f"message {j} is a {type(m).__name__} ({_short(m)}), expected a dict "
                        "with 'role' and 'content'")
            if not isinstance(m.get("role"), str):
                return f"message {j} has no string 'role' (keys {sorted(m)})"
            if not isinstance(m.get("content"), (str, list)):
                return (f"message {j} has no 'content' string (got "
                        f"{type(m.get('content')).__name__})")
        return None
    return (f"is a {type(prompt).__name__} ({_short(prompt)}), expected a string or a list of "
            "chat messages")


def check_prompts(prompts: Sequence, where: str, tokenizer=None, rows: Optional[Sequence] = None):
    """Raise a ``ValueError`` naming ``where`` (e.g. ``"train_dataset['prompt']"``), the rows and
    the problem when a prompt is malformed, when text and chat prompts are mixed, or when chat
    prompts meet a tokenizer without a chat template."""
    rows = list(rows) if rows is not None else list(range(len(prompts)))
    bad = [(r, p) for r, p in zip(rows, (prompt_problem(x) for x in prompts)) if p]
    if bad:
        listed = "; ".join(f"row {r} {p}" for r, p in bad[:5])
        more = f" (and {len(bad) - 5} more rows)" if len(bad) > 5 else ""
        raise ValueError(f"{where}: {listed}{more}. Every prompt must be a non-empty string or a "
                         "non-empty list of chat messages")
    chat = [is_conversational(p) for p in prompts]
    if any(chat) and not all(chat):
        r_text, r_chat = rows[chat.index(False)], rows[chat.index(True)]
        raise ValueError(f"{where}: mixes plain-text prompts (row {r_text}) and chat prompts "
                         f"(row {r_chat}); use one kind per dataset")
    if any(chat) and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: chat prompts (row {rows[0]}) need a tokenizer with a "
                         "chat_template; set processing_class.chat_template")


def check_prompt_dataset(split: str, ds, tokenizer=None) -> None:
    """A dataset of prompts, at trainer construction: a 'prompt' column, at least one row, every
    row's prompt well formed (:func:`check_prompts`). Streaming datasets (no ``len``) are checked
    batch by batch in the collator instead."""
    if ds is None:
        return
    if split == "train_dataset" and type(ds).__name__ in ("DatasetDict", "IterableDatasetDict"):
        # (as eval_dataset a DatasetDict is transformers' dict of named eval sets: checked below)
        raise ValueError(f"{split} is a {type(ds).__name__} (splits {list(ds)}); pass one split, "
                         f"e.g. dataset[{next(iter(ds), 'train')!r}]")
    if isinstance(ds, dict):  # several eval datasets (transformers' dict of eval sets)
        for name, part in ds.items():
            check_prompt_dataset(f"{split}[{name!r}]", part, tokenizer)
        return
    cols = getattr(ds, "column_names", None)
    if cols is not None and "prompt" not in cols:
        raise ValueError(f"{split} needs a 'prompt' column, got columns {cols}")
    if not hasattr(ds, "__len__") or _is_iterable_dataset(ds):
        return  # streaming: rows are checked as they are collated
    if len(ds) == 0:
        raise ValueError(f"{split} is empty")
    if cols is not None:
        prompts = ds["prompt"]
    else:
        prompts = []
        for i in range(len(ds)):
            row = ds[i]
            if not isinstance(row, dict) or "prompt" not in row:
                raise ValueError(f"{split} row {i} has no 'prompt' key (got {_short(row)})")
            prompts.append(row["prompt"])
    check_prompts(list(prompts), f"{split}['prompt']", tokenizer)


def _is_iterable_dataset(ds) -> bool:
    try:
        from datasets import IterableDataset
    except ImportError:  # pragma: no cover
        return False
    return isinstance(ds, (IterableDataset, torch.utils.data.IterableDataset))


# ------------------------------------------------------------------------------------------------
# reward functions, reward models, judges
# ------------------------------------------------------------------------------------------------
def scorer_name(f) -> str:
    return getattr(f, "__name__", None) or type(f).__name__


def reward_values(name: str, out, n: int) -> Tensor:
    """A reward function's output -> float32 ``[n]`` on the CPU (a ``None`` entry counts as 0).

    Accepted: a list / tuple / 1-D numpy array of numbers (or None), or a 1-D real tensor on any
    device that holds data (it is copied to the CPU). Anything else (None, a scalar, nested
    lists, strings, the wrong length, a ``meta`` tensor) is a ``ValueError`` naming the reward
    function."""
    who = f"reward function {name}"
    if isinstance(out, Tensor):
        if out.device.type == "meta":
            raise ValueError(f"{who} returned a tensor on the meta device (no values); return a "
                             "list of floats or a tensor holding the rewards")
        if out.dim() != 1 or out.dtype == torch.bool or out.is_complex():
            raise ValueError(f"{who} returned a tensor of shape {tuple(out.shape)} "
                             f"({out.dtype}); expected a 1-D tensor of {n} rewards")
        out = out.detach().to("cpu", torch.float64).tolist()
    elif hasattr(out, "tolist") and hasattr(out, "ndim"):  # numpy
        if out.ndim != 1:
            raise ValueError(f"{who} returned an array of shape {tuple(out.shape)}; expected "
                             f"{n} rewards (one per completion)")
        out = out.tolist()
    if out is None or isinstance(out, (str, bytes, dict)) or not isinstance(out, (list, tuple)):
        raise ValueError(f"{who} returned {_short(out)} ({type(out).__name__}); expected a list "
                         f"of {n} rewards (one per completion)")
    if len(out) != n:
        raise ValueError(f"{who} returned {len(out)} rewards for {n} completions")
    vals = []
    for i, x in enumerate(out):
        if isinstance(x, Tensor) and x.numel() == 1:
            x = x.item()
        if x is None:
            x = 0.0
        if not _real(x):
            raise ValueError(f"{who}: reward {i} is {_short(x)} ({type(x).__name__}); expected "
                             "a number or None")
        vals.append(float(x))
    return torch.tensor(vals, dtype=torch.float32)


def check_reward_logits(name: str, logits: Tensor) -> None:
    """A reward model returns one score per sequence: logits ``[B, 1]`` (or ``[B, T, 1]``)."""
    if logits.shape[-1] != 1:
        raise ValueError(f"reward model {name} returns {logits.shape[-1]} labels per sequence; "
                         "a reward model needs num_labels=1 (one scalar score)")


def _sequence(name: str, out, n: int, what: str) -> List:
    if isinstance(out, Tensor) or (hasattr(out, "tolist") and hasattr(out, "ndim")):
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise ValueError(f"judge {name} returned {_short(out)} ({type(out).__name__}); expected "
                         f"a list of {n} {what}")
    if len(out) != n:
        raise ValueError(f"judge {name} returned {len(out)} {what} for {n} pairs")
    return list(out)


def judge_choices(judge, out, n: int) -> List[int]:
    """A judge's choices -> list of ints in {-1, 0, 1} (-1: undecided); else a ``ValueError``
    naming the judge, the pair and the value."""
    name = scorer_name(judge)
    vals = []
    for i, c in enumerate(_sequence(name, out, n, "choices")):
        if not (_real(c) and float(c) in (-1.0, 0.0, 1.0)):
            raise ValueError(f"judge {name}: choice {i} is {_short(c)}; expected 0 (first "
                             "completion), 1 (second) or -1 (undecided)")
        vals.append(int(c))
    return vals


def judge_probabilities_checked(judge, out, n: int) -> List[float]:
    """A judge's probabilities (P(first preferred)) -> list of floats in [0, 1] or NaN (NaN is
    left to the ``nonfinite_scores`` policy); anything else is a ``ValueError`` naming the judge."""
    name = scorer_name(judge)
    vals = []
    for i, p in enumerate(_sequence(name, out, n, "probabilities")):
        if isinstance(p, Tensor) and p.numel() == 1:
            p = p.item()
        if not _real(p) or (not math.isnan(p) and not 0 <= p <= 1):
            raise ValueError(f"judge {name}: probability {i} is {_short(p)}; expected a float "
                             "in [0, 1]")
        vals.append(float(p))
    return vals


# ------------------------------------------------------------------------------------------------
# non-finite scores, loss, weights
# ------------------------------------------------------------------------------------------------
def finite_rows(values: Tensor, source: str, policy: str = "raise",
                prompts: Optional[Sequence[str]] = None) -> Tensor:
    """Bool ``[N]``: True where ``values`` is finite. With ``policy="raise"`` a non-finite value
    is a ``ValueError`` naming ``source``, the rows and their prompts (``prompts`` repeat when
    ``N`` is a multiple of their number); with ``"skip"`` the mask is returned for the caller to
    drop those rows from the loss."""
    keep = torch.isfinite(values)
    if policy == "raise" and any_process(not bool(keep.all())):
        if bool(keep.all()):  # another process saw them: raise everywhere, not hang there
            raise ValueError(f"{source} gave non-finite scores on another process. No weight "
                             "was changed. Fix the scorer, or set nonfinite_scores='skip'")
        rows = (~keep).nonzero().flatten().tolist()
        shown = ", ".join(
            f"row {r} = {values[r].item()}"
            + (f" (prompt {_short(prompts[r % len(prompts)])})" if prompts else "")
            for r in rows[:5])
        raise ValueError(f"{source} gave non-finite scores: {shown}"
                         f"{f' and {len(rows) - 5} more' if len(rows) > 5 else ''}. No weight "
                         "was changed. Fix the scorer, or set nonfinite_scores='skip' to drop "
                         "such rows from the loss (counted in scores/nonfinite_count)")
    return keep


def any_process(flag: bool) -> bool:
    """``flag`` on any process of the default process group (one all-reduce when several run,
    the local flag otherwise). Every process reaches each check at the same point of a step, so
    a check that raises on one process raises on all of them instead of leaving the others
    blocked in the step's next collective."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def kept_mean(per_row: Tensor, keep: Tensor) -> Tensor:
    """Mean of ``per_row`` over the kept rows (0, still differentiable, when none is kept);
    dropped rows contribute neither a value nor a gradient, even when they are NaN."""
    kept = torch.where(keep, per_row, per_row.new_zeros(()))
    return kept.sum() / keep.sum().clamp(min=1).to(per_row.dtype)


def check_finite_loss(loss: Tensor, step: int) -> None:
    """Raise before the backward when the loss is NaN/inf (no weight changes)."""
    if not bool(torch.isfinite(loss.detach()).all()):
        raise FloatingPointError(
            f"the loss is {loss.detach().float().item()} at step {step}: not running the "
            "backward (no weight was changed). The scores are finite here, so the policy or the "
            "reference produced non-finite log-probs (learning rate too high? fp16 overflow?)")


def nonfinite_parameters(model: torch.nn.Module, limit: int = 5) -> List[str]:
    """Names of (up to ``limit``) parameters holding a NaN or an inf."""
    bad = []
    for name, p in model.named_parameters():
        if p.numel() and not bool(torch.isfinite(p.detach()).all()):
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad
