"""Shared helpers of the XPO / Online DPO trainer tests (tiny local models, no hub)."""
import json

import torch
from datasets import Dataset

from nashkern.apps.tiny import make_tokenizer, tiny_causal_lm, tiny_reward_model  # noqa: F401

PROMPTS = ["tell me a story", "hi", "what is one plus one?", "count: 1 2 3", "abc", "why?"]


def vowel_count(prompts, completions, completion_ids=None, **kw):
    """Rule reward: the number of vowels in the completion (standard or conversational)."""
    return [float(sum(ch in "aeiou" for ch in (c if isinstance(c, str) else c[0]["content"])))
            for c in completions]


def make_args(Config, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=2,
                max_new_tokens=6, learning_rate=1e-3, logging_steps=1, report_to="none",
                save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, bf16=False)
    base.update(kw)
    return Config(**base)


def trainer_for(Trainer, Config, tmp_path, model=None, tok=None, dataset=None, **kw):
    tok = tok or make_tokenizer()
    args = kw.pop("args", None) or make_args(Config, tmp_path)
    scorer = {k: kw.pop(k) for k in ("reward_model", "judge", "reward_funcs") if k in kw}
    if not scorer:
        scorer = {"reward_funcs": vowel_count}
    return Trainer(model=model or tiny_causal_lm(), args=args, processing_class=tok,
                   train_dataset=dataset if dataset is not None
                   else Dataset.from_dict({"prompt": PROMPTS}), **scorer, **kw)


def full_logits_logps(model, ids, mask, ctx):
    """Per-sequence Σ log p of ``ids[:, ctx:]`` from the model's full [B, T, V] logits (the
    original trainers' computation, as an oracle)."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        z = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, ctx - 1:-1]
    lp = z.float().log_softmax(-1).gather(-1, ids[:, ctx:, None])[..., 0]
    return (lp * mask[:, ctx:]).sum(1)


def save_tiny_model_dirs(tmp_path):
    """A policy dir, a reward-model dir and a prompts .jsonl for the CLI tests."""
    path = tmp_path / "model"
    tiny_causal_lm().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    rm = tmp_path / "rm"
    tiny_reward_model(seed=3).save_pretrained(rm)
    make_tokenizer().save_pretrained(rm)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path, rm, data


def first_last_mean(values, k):
    return sum(values[:k]) / k, sum(values[-k:]) / k
