"""``LogCompletionsCallback``: the last step's prompts, completions and scores, as JSONL in
``output_dir`` and as a table in Weights & Biases / TensorBoard when those loggers are on.

Works with any nashkern trainer: it logs ``trainer.last_samples`` (a list of flat dicts, one
per prompt, e.g. ``prompt, policy, mixture, probability, policy_score, mixture_score``).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional

from transformers import TrainerCallback


def _markdown_table(columns: List[str], rows: List[List[Any]]) -> str:
    def cell(v):
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _json_safe(row: Dict[str, Any]) -> Dict[str, Any]:
    """``row`` with non-finite floats as None (JSON has no NaN / Infinity)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in row.items()}


class LogCompletionsCallback(TrainerCallback):
    """At every logging step, appends the last step's samples to
    ``<output_dir>/completions.jsonl`` and, when enabled in ``report_to``, logs them as a
    ``wandb.Table`` (key ``completions``) and a TensorBoard text table (tag ``completions``).

    num_prompts: rows per step (None: all of the last batch on the main process)."""

    def __init__(self, trainer, num_prompts: Optional[int] = None, path: Optional[str] = None):
        self.trainer, self.num_prompts = trainer, num_prompts
        self.path = path or os.path.join(trainer.args.output_dir, "completions.jsonl")
        self._written = None
        self._history: List[Dict[str, Any]] = []  # wandb tables are logged whole each time

    def on_log(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.trainer.last_samples:
            return
        samples = self.trainer.last_samples
        if samples is self._written:  # e.g. the end-of-training log: nothing new
            return
        self._written = samples
        # stamped with the optimizer step they are logged at, like the metrics beside them
        rows = [{**r, "step": state.global_step} for r in samples[: self.num_prompts]]
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a") as f:
            for r in rows:  # strict JSON: a NaN / inf score (nonfinite_scores="skip") is null
                f.write(json.dumps(_json_safe(r), allow_nan=False) + "\n")
        report_to = args.report_to or []
        if "wandb" in report_to:
            self._log_wandb(rows)
        if "tensorboard" in report_to:
            self._log_tensorboard(rows, state.global_step)

    def _log_wandb(self, rows):
        import wandb

        if wandb.run is None:
            return
        self._history.extend(rows)
        columns = list(self._history[0])
        data = [[r.get(c) for c in columns] for r in self._history]
        wandb.log({"completions": wandb.Table(columns=columns, data=data)})

    def _log_tensorboard(self, rows, step):
        from transformers.integrations import TensorBoardCallback

        for cb in self.trainer.callback_handler.callbacks:
            writer = getattr(cb, "tb_writer", None) if isinstance(cb, TensorBoardCallback) else None
            if writer is not None:
                columns = list(rows[0])
                writer.add_text("completions", _markdown_table(
                    columns, [[r.get(c) for c in columns] for r in rows]), step)
                writer.flush()
