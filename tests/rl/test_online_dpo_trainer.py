"""OnlineDPOTrainer: metrics, the step against the original (full-logits) definition, judge /
reward model / reward functions (with dataset columns and weights), conversational prompts,
PEFT, schedules, memory, CLI, learning."""
import json

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from online_helpers import (PROMPTS, assert_reference_is_the_base, lora_trainer, make_args,
                            save_tiny_model_dirs, step_allocations, train_on_the_rule_reward,
                            train_only_the_adapters, train_updating_the_policy_only, trainer_for,
                            vowel_count)
from tiny_models import make_tokenizer, single_thread, tiny_causal_lm, tiny_reward_model  # noqa: F401


def odpo(tmp_path, **kw):
    """A OnlineDPOTrainer on the tiny models (online_helpers.trainer_for)."""
    from nashkern import OnlineDPOConfig, OnlineDPOTrainer

    return trainer_for(OnlineDPOTrainer, OnlineDPOConfig, tmp_path, **kw)


METRICS = {"objective/kl", "objective/entropy", "objective/non_score_reward", "rewards/chosen",
           "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "val/contain_eos_token", "beta"}
SCORE_METRICS = {"objective/rlhf_reward", "objective/scores_margin", "objective/scores"}


def test_train_with_reward_funcs_logs_all_metrics_and_updates_policy_only(tmp_path):
    tr = odpo(tmp_path)
    logs = train_updating_the_policy_only(tr, "objective/non_score_reward", METRICS | SCORE_METRICS)
    assert "loss/xpo" not in logs[0] and "alpha" not in logs[0]
    assert logs[0]["beta"] == 0.1 and logs[0]["objective/kl"] == 0
    assert logs[0]["objective/scores_margin"] >= 0
    row = tr.last_samples[0]
    assert {"step", "prompt", "completion_1", "completion_2", "chosen", "score_1",
            "score_2"} <= set(row)
    assert row["chosen"] == (1 if row["score_1"] >= row["score_2"] else 2)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_step_matches_the_original_definition(tmp_path, loss_type):
    """Loss and gradient of one step against the original computation: two policy samples per
    prompt (prompts repeated), chosen = first when its score >= the second's, full-logits
    log-prob sums, DPO / IPO on them."""
    from nashkern.rl.generation import generate

    beta = 0.3
    tr = odpo(tmp_path, config=dict(beta=beta, loss_type=loss_type, max_new_tokens=8))
    batch = tr.data_collator([{"prompt": p} for p in PROMPTS])
    tr._gen = lambda device: torch.Generator().manual_seed(11)
    model = tr.model
    model.train()
    loss, out = tr.compute_loss(model, batch, return_outputs=True)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)

    ids, mask = batch["input_ids"], batch["attention_mask"]
    B = ids.shape[0]
    s = generate(model, ids.repeat(2, 1), mask.repeat(2, 1),
                 **tr._generation_kwargs(torch.Generator().manual_seed(11)))
    ctx = s.prompt_ids.shape[1]
    pos = (s.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def logps(m):
        z = m(input_ids=s.input_ids, attention_mask=s.attention_mask,
              position_ids=pos).logits[:, ctx - 1:-1]
        lp = z.log_softmax(-1).gather(-1, s.completion_ids[..., None])[..., 0]
        return (lp * s.completion_mask).sum(1)

    lp = logps(model)
    with torch.no_grad():
        rlp = logps(tr.ref_model)
    scores = torch.tensor(vowel_count(None, tr._decode(s.completion_ids, s.completion_mask)))
    first = scores[:B] >= scores[B:]
    rows = torch.arange(B)
    ci, ri = rows + (~first) * B, rows + first * B
    h = (lp[ci] - lp[ri]) - (rlp[ci] - rlp[ri])
    losses = -F.logsigmoid(beta * h) if loss_type == "sigmoid" else (h - 1 / (2 * beta)) ** 2
    torch.testing.assert_close(out["losses"], losses.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, losses.mean(), rtol=1e-4, atol=1e-5)
    for g1, g2 in zip(grads, torch.autograd.grad(losses.mean(), params)):
        torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-5)


def test_judge_conversational_prompts_and_per_epoch_beta(tmp_path):
    from nashkern import OnlineDPOConfig
    from nashkern.rl.judges import BasePairwiseJudge

    class SecondJudge(BasePairwiseJudge):
        def judge(self, prompts, completions, shuffle_order=True):
            assert all(p.endswith("<|assistant|>") for p in prompts)
            return [1] * len(prompts)

    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS]})
    args = make_args(OnlineDPOConfig, tmp_path, max_steps=-1, num_train_epochs=3,
                     per_device_train_batch_size=6, beta=[0.1, 0.2], loss_type="ipo")
    tr = odpo(tmp_path, dataset=ds, judge=SecondJudge(), args=args)
    tr.train()
    logs = [h for h in tr.state.log_history if "objective/kl" in h]
    assert [h["beta"] for h in logs] == [0.1, 0.2, 0.2]
    assert METRICS <= set(logs[0]) and not SCORE_METRICS & set(logs[0])
    assert all(r["chosen"] == 2 for r in tr.last_samples)


def test_reward_model_and_reward_funcs_with_columns_and_weights(tmp_path):
    from nashkern import OnlineDPOConfig

    tr = odpo(tmp_path, reward_model=tiny_reward_model(seed=5))
    tr.train()
    assert SCORE_METRICS <= set(tr.state.log_history[0])

    seen = []

    def wants_target(prompts, completions, target, **kw):
        assert len(target) == len(completions) == len(prompts)  # columns repeated per sample
        seen.append(list(target))
        return [float(c.count(t)) for c, t in zip(completions, target)]

    ds = Dataset.from_dict({"prompt": PROMPTS, "target": list("aeioua")})
    args = make_args(OnlineDPOConfig, tmp_path, reward_weights=[2.0, 0.0], max_steps=1)
    tr2 = odpo(tmp_path, dataset=ds, args=args, reward_funcs=[wants_target, vowel_count])
    tr2.train()
    assert len(seen[0]) == 6 and seen[0][:3] == seen[0][3:]
    row = tr2.last_samples[0]
    t = seen[0][0]  # weights: 2 x target count, 0 x vowels
    assert row["score_1"] == 2 * row["completion_1"].count(t)


def test_peft_reference_is_the_base_with_adapters_disabled(tmp_path):
    from nashkern.rl.generation import generate

    tr, model, base_copy = lora_trainer(odpo, tmp_path)
    batch = tr.data_collator([{"prompt": p} for p in PROMPTS])
    s = generate(model, batch["input_ids"], batch["attention_mask"],
                 **tr._generation_kwargs(torch.Generator().manual_seed(0)))
    assert_reference_is_the_base(tr, model, base_copy, s)
    train_only_the_adapters(tr, base_copy)
    assert METRICS <= set(tr.state.log_history[0])


def test_bad_input(tmp_path):
    from nashkern import OnlineDPOConfig, XPOConfig

    with pytest.raises(ValueError, match="loss_type"):
        OnlineDPOConfig(output_dir=str(tmp_path), loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        OnlineDPOConfig(output_dir=str(tmp_path), beta=[-1.0])
    with pytest.raises(ValueError, match="exactly one"):
        odpo(tmp_path, reward_funcs=[])
    # an XPOConfig is an OnlineDPOConfig (as in the original): accepted, alpha unused
    tr = odpo(tmp_path, args=make_args(XPOConfig, tmp_path))
    assert tr.beta == 0.1


def test_no_tokens_x_vocab_tensor_in_a_step(tmp_path):
    step_allocations(odpo, tmp_path)


def test_learning_signal_on_a_rule_reward(tmp_path):
    train_on_the_rule_reward(odpo, tmp_path, "objective/scores")


def test_train_cli_method_online_dpo_with_local_paths(tmp_path):
    from nashkern.apps.cli import main

    path, rm, data = save_tiny_model_dirs(tmp_path)
    out = tmp_path / "out"
    rc = main(["train", "--method=online_dpo", "--model_name_or_path", str(path),
               "--reward_model_path", str(rm), "--dataset_name", str(data), "--output_dir",
               str(out), "--max_steps", "2", "--per_device_train_batch_size", "3",
               "--max_new_tokens", "4", "--beta", "0.1", "--logging_steps", "1",
               "--report_to", "none", "--use_cpu", "--save_strategy", "no"])
    assert rc == 0
    assert (out / "model.safetensors").exists()
    rows = [json.loads(line) for line in open(out / "completions.jsonl")]
    assert {"prompt", "completion_1", "completion_2", "chosen"} <= set(rows[0])
