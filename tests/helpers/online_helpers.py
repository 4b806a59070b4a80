"""Shared helpers of the trainer and CLI tests (tiny local models, no hub)."""
import copy
import json

import pytest
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


def trainer_for(Trainer, Config, tmp_path, model=None, tok=None, dataset=None, config=None, **kw):
    """A ``Trainer`` on the tiny policy and :data:`PROMPTS` (``args``, else :func:`make_args`
    with the ``config`` overrides; the vowel-count reward unless a scorer is given)."""
    tok = tok or make_tokenizer()
    args = kw.pop("args", None) or make_args(Config, tmp_path, **(config or {}))
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


def save_tiny_model_dirs(tmp_path, prompts=PROMPTS):
    """A policy dir, a reward-model dir and a ``prompts`` .jsonl for the CLI tests."""
    path = tmp_path / "model"
    tiny_causal_lm().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    rm = tmp_path / "rm"
    tiny_reward_model(seed=3).save_pretrained(rm)
    make_tokenizer().save_pretrained(rm)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path, rm, data


def lora_trainer(make, tmp_path, **kw):
    """``make(tmp_path, model=<tiny policy>, peft_config=<LoRA on q, v>, **kw)``: the trainer, its
    unwrapped PEFT model and an untouched copy of the base (the reference it must use)."""
    peft = pytest.importorskip("peft")
    base = tiny_causal_lm(seed=0)
    base_copy = copy.deepcopy(base)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False, task_type="CAUSAL_LM")
    tr = make(tmp_path, model=base, peft_config=cfg, **kw)
    assert tr.ref_model is None and tr.is_peft
    return tr, tr.accelerator.unwrap_model(tr.model), base_copy


def assert_reference_is_the_base(tr, model, base_copy, sample):
    """On a generated ``sample``: the step's reference log-probs are the base model's, the
    policy's differ (the adapters act)."""
    from nashkern.rl.completion_stats import completion_stats
    from nashkern.rl.pairs import sequence_logps

    ref, ctx = tr._ref(model)
    P = sample.prompt_ids.shape[1]
    st = completion_stats(model, sample.input_ids, sample.attention_mask, P, ref_model=ref,
                          ref_context=ctx)
    base_lp = full_logits_logps(base_copy, sample.input_ids, sample.attention_mask, P)
    torch.testing.assert_close(sequence_logps(st.ref_logprobs, sample.completion_mask), base_lp,
                               rtol=1e-4, atol=1e-4)
    assert not torch.allclose(sequence_logps(st.logprobs, sample.completion_mask).detach(),
                              base_lp, atol=1e-3)


def train_only_the_adapters(tr, base_copy):
    """``tr.train()``; the base weights never change, only the adapters train."""
    frozen = {k: v.clone() for k, v in base_copy.state_dict().items()}
    tr.train()
    sd = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
          for k, v in tr.model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(sd[k], v) for k, v in frozen.items())


def train_updating_the_policy_only(tr, key, metrics):
    """``tr.train()``; the reference's weights never change (nor get a gradient), the policy's
    do; every step logs a row holding ``key`` and the ``metrics``. Returns those rows."""
    ref_before = [p.clone() for p in tr.ref_model.parameters()]
    pol_before = [p.detach().clone() for p in tr.model.parameters()]
    tr.train()
    assert all(torch.equal(a, b) for a, b in zip(ref_before, tr.ref_model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(pol_before, tr.model.parameters()))
    assert all(p.grad is None for p in tr.ref_model.parameters())
    logs = [h for h in tr.state.log_history if key in h]
    assert len(logs) == tr.args.max_steps
    assert all(metrics <= set(h) for h in logs), metrics - set(logs[0])
    return logs


def train_with_reward_model_tokenizers(make, tmp_path):
    """``make(tmp_path, reward_model=…)`` with a reward model that shares the policy's tokenizer
    (none kept), then with one of a different vocabulary (completions are decoded and
    re-tokenised): both train. Returns the two trainers."""
    same = make(tmp_path, reward_model=tiny_reward_model(seed=5))
    assert same.reward_processing_class is None
    same.train()
    other = make_tokenizer()
    other.add_tokens(["<extra>"])
    different = make(tmp_path, reward_model=tiny_reward_model(seed=5, vocab_size=len(other)),
                     reward_processing_class=other)
    assert different.reward_processing_class is other
    different.train()
    return same, different


def first_last_mean(values, k):
    return sum(values[:k]) / k, sum(values[-k:]) / k


def train_on_the_rule_reward(make, tmp_path, score_key):
    """``make`` trained 30 steps (lr 1e-2) on reward = number of vowels: the mean of the last 5
    logged ``score_key`` values is more than 2 above the first 5's. Returns (trainer, last)."""
    tr = make(tmp_path, config=dict(max_steps=30, per_device_train_batch_size=8, max_new_tokens=8,
                                    learning_rate=1e-2, lr_scheduler_type="constant",
                                    temperature=1.0, beta=0.1),
              dataset=Dataset.from_dict({"prompt": PROMPTS * 4}))
    tr.train()
    scores = [h[score_key] for h in tr.state.log_history if score_key in h]
    first, last = first_last_mean(scores, 5)
    assert last > first + 2.0, scores
    return tr, last


def step_allocations(make, tmp_path):
    """One step (generation, scoring, fused log-probs, loss, backward) of ``make`` with a
    vocabulary much larger than the other dimensions (V = 16384, D = 16; 4 prompts, 2 completions
    each of at most 8 tokens), under the allocation recorder: it never allocates the
    ``[rows, T, V]`` logits. The largest tensors are V x D (the embedding gradient) and
    rows x vocabulary-tile (4096) blocks. Returns the recorder."""
    from nashkern.memory import AllocationRecorder

    V, D = 16384, 16
    tr = make(tmp_path, model=tiny_causal_lm(vocab_size=V, hidden=D),
              config=dict(max_new_tokens=8, per_device_train_batch_size=4))
    batch = tr.data_collator([{"prompt": p} for p in PROMPTS[:4]])
    tr.model.train()
    with AllocationRecorder() as rec:
        tr.compute_loss(tr.model, batch).backward()
    rows = 2 * 4 * 8
    largest, op = rec.largest()
    assert largest <= max(V * D, rows * 4096) < rows * V, (largest, op)
    return rec
