"""XPOTrainer: metrics, the step against the original (full-logits) definition, judge /
reward model / reward functions, conversational prompts, PEFT, schedules, memory, CLI, learning."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from online_helpers import (PROMPTS, assert_reference_is_the_base, first_last_mean, lora_trainer,
                            make_args, save_tiny_model_dirs, step_allocations,
                            train_on_the_rule_reward, train_only_the_adapters,
                            train_updating_the_policy_only, train_with_reward_model_tokenizers,
                            trainer_for, vowel_count)
from tiny_models import make_tokenizer, single_thread, tiny_causal_lm, tiny_reward_model  # noqa: F401


def xpo(tmp_path, **kw):
    """An XPOTrainer on the tiny models (online_helpers.trainer_for)."""
    from nashkern import XPOConfig, XPOTrainer

    return trainer_for(XPOTrainer, XPOConfig, tmp_path, **kw)


METRICS = {"loss/xpo", "loss/dpo", "objective/kl", "objective/entropy", "rewards/chosen",
           "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "val/model_contain_eos_token", "val/ref_contain_eos_token", "alpha",
           "beta"}
SCORE_METRICS = {"objective/model_scores", "objective/ref_scores", "objective/scores_margin"}


def test_train_with_reward_funcs_logs_all_metrics_and_updates_policy_only(tmp_path):
    tr = xpo(tmp_path)
    logs = train_updating_the_policy_only(tr, "loss/xpo", METRICS | SCORE_METRICS)
    assert logs[0]["alpha"] == 1e-5 and logs[0]["beta"] == 0.1  # the original defaults
    assert logs[0]["objective/kl"] == 0  # step 0: policy == reference
    assert logs[0]["objective/scores_margin"] >= 0  # chosen − rejected
    row = tr.last_samples[0]
    assert {"step", "prompt", "policy", "reference", "chosen", "policy_score",
            "reference_score"} <= set(row)
    assert row["chosen"] == ("policy" if row["policy_score"] >= row["reference_score"]
                             else "reference")


@pytest.mark.parametrize("loss_type,use_peft", [("sigmoid", False), ("ipo", False),
                                                ("sigmoid", True)])
def test_step_matches_the_original_definition(tmp_path, loss_type, use_peft):
    """One step's loss, DPO / XPO parts and gradient against the original trainer's
    computation: full [B, T, V] logits on y and ỹ separately, chosen = score(y) >= score(ỹ),
    torch.where assembly, α·Σ log π(ỹ)."""
    base = tiny_causal_lm(seed=0)
    kw = {}
    ref_oracle = None
    if use_peft:
        peft = pytest.importorskip("peft")
        ref_oracle = copy.deepcopy(base)
        kw["peft_config"] = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM")
    beta, alpha = 0.3, 0.2
    tr = xpo(tmp_path, model=base, config=dict(beta=beta, alpha=alpha, loss_type=loss_type,
                                               max_new_tokens=8), **kw)
    ref_oracle = ref_oracle or tr.ref_model
    batch = tr.data_collator([{"prompt": p} for p in PROMPTS])
    tr._gen = lambda device: torch.Generator().manual_seed(7)  # fixed samples for both paths
    model = tr.model
    model.train()
    loss, out = tr.compute_loss(model, batch, return_outputs=True)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)

    y, ty = tr._completions(model, batch["input_ids"], batch["attention_mask"],
                            torch.Generator().manual_seed(7))
    ctx = y.prompt_ids.shape[1]

    def logps(m, g, grad=False):
        with torch.enable_grad() if grad else torch.no_grad():
            pos = (g.attention_mask.cumsum(-1) - 1).clamp(min=0)
            z = m(input_ids=g.input_ids, attention_mask=g.attention_mask,
                  position_ids=pos).logits[:, ctx - 1:-1]
            lp = z.log_softmax(-1).gather(-1, g.completion_ids[..., None])[..., 0]
            return (lp * g.completion_mask).sum(1)

    m_y, m_t = logps(model, y, True), logps(model, ty, True)
    r_y, r_t = logps(ref_oracle, y), logps(ref_oracle, ty)
    s_y = torch.tensor(vowel_count(None, tr._decode(y.completion_ids, y.completion_mask)))
    s_t = torch.tensor(vowel_count(None, tr._decode(ty.completion_ids, ty.completion_mask)))
    cm = s_y >= s_t
    chosen_lr = torch.where(cm, m_y, m_t) - torch.where(cm, r_y, r_t)
    rejected_lr = torch.where(~cm, m_y, m_t) - torch.where(~cm, r_y, r_t)
    h = chosen_lr - rejected_lr
    dpo = -F.logsigmoid(beta * h) if loss_type == "sigmoid" else (h - 1 / (2 * beta)) ** 2
    xpo_l = alpha * m_t
    want = (dpo + xpo_l).mean()
    torch.testing.assert_close(out["dpo_losses"], dpo.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["xpo_losses"], xpo_l.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)
    want_grads = torch.autograd.grad(want, params)
    for g1, g2 in zip(grads, want_grads):
        torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-5)


def test_judge_conversational_prompts_and_per_epoch_schedules(tmp_path):
    from nashkern import XPOConfig
    from nashkern.rl.judges import BasePairwiseJudge

    class FixedJudge(BasePairwiseJudge):
        def judge(self, prompts, completions, shuffle_order=True):
            assert all(p.endswith("<|assistant|>") for p in prompts)  # chat template applied
            assert all(len(pair) == 2 for pair in completions)
            return [0, -1, 1, 0, -1, 1][: len(prompts)]  # policy, -1 (-> reference), reference

    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS]})
    args = make_args(XPOConfig, tmp_path, max_steps=-1, num_train_epochs=3,
                     per_device_train_batch_size=6, alpha=[1e-5, 0.5], beta=[0.1, 0.2])
    tr = xpo(tmp_path, dataset=ds, judge=FixedJudge(), args=args)
    tr.train()
    logs = [h for h in tr.state.log_history if "loss/xpo" in h]
    assert [h["alpha"] for h in logs] == [1e-5, 0.5, 0.5]
    assert [h["beta"] for h in logs] == [0.1, 0.2, 0.2]
    assert METRICS <= set(logs[0]) and not SCORE_METRICS & set(logs[0])  # no scores: a judge
    # the exploration term follows alpha: loss/xpo = alpha · mean Σ log π(ỹ) < 0
    assert abs(logs[0]["loss/xpo"]) < 1e-2 < abs(logs[1]["loss/xpo"])
    assert [r["chosen"] for r in tr.last_samples] == ["policy", "reference", "reference"] * 2


def test_reward_model_same_and_different_tokenizer(tmp_path):
    for tr in train_with_reward_model_tokenizers(xpo, tmp_path):
        assert SCORE_METRICS <= set(tr.state.log_history[0])


def test_peft_reference_is_the_base_with_adapters_disabled(tmp_path):
    from nashkern.rl.generation import derived_generator, generate

    tr, model, base_copy = lora_trainer(xpo, tmp_path, config=dict(max_new_tokens=8))
    batch = tr.data_collator([{"prompt": p} for p in PROMPTS])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    y, ty = tr._completions(model, ids, mask, torch.Generator().manual_seed(0))
    # the same draws: the policy (adapters on) from the step's generator, the base model alone
    # from the stream derived from it (one decoding loop for both, generate_pair)
    kw = tr._generation_kwargs(torch.Generator().manual_seed(0))
    want_y = generate(model, ids, mask, **kw)
    kw["generator"] = derived_generator(torch.Generator().manual_seed(0))
    want_ty = generate(base_copy, ids, mask, **kw)
    assert torch.equal(y.completion_ids, want_y.completion_ids)
    assert torch.equal(ty.completion_ids, want_ty.completion_ids)
    assert_reference_is_the_base(tr, model, base_copy, ty)
    train_only_the_adapters(tr, base_copy)
    assert METRICS <= set(tr.state.log_history[0])


def test_bad_input(tmp_path):
    from nashkern import NashMDConfig, XPOConfig
    from nashkern.rl.judges import RandomPairwiseJudge

    with pytest.raises(ValueError, match="alpha"):
        XPOConfig(output_dir=str(tmp_path), alpha=[0.1, -1.0])
    with pytest.raises(ValueError, match="beta"):
        XPOConfig(output_dir=str(tmp_path), beta=-0.1)
    with pytest.raises(ValueError, match="loss_type"):
        XPOConfig(output_dir=str(tmp_path), loss_type="hinge")
    with pytest.raises(ValueError, match="ipo"):
        XPOConfig(output_dir=str(tmp_path), loss_type="ipo", beta=[0.1, 0.0])
    with pytest.raises(TypeError, match="XPOConfig"):
        xpo(tmp_path, args=NashMDConfig(output_dir=str(tmp_path), bf16=False))
    with pytest.raises(ValueError, match="exactly one"):
        xpo(tmp_path, reward_funcs=vowel_count, judge=RandomPairwiseJudge())
    with pytest.raises(ValueError, match="'prompt' column"):
        xpo(tmp_path, dataset=Dataset.from_dict({"text": ["a"]}))
    m = tiny_causal_lm()
    with pytest.raises(ValueError, match="same object"):
        xpo(tmp_path, model=m, ref_model=m)
    with pytest.raises(ValueError, match="reward_weights"):
        xpo(tmp_path, config=dict(reward_weights=[1.0, 2.0]))


def test_no_tokens_x_vocab_tensor_in_a_step(tmp_path):
    """A step never allocates the [rows, T, V] logits (online_helpers.step_allocations)."""
    assert len(step_allocations(xpo, tmp_path).sizes) > 100


def test_learning_signal_on_a_rule_reward(tmp_path):
    """Reward = number of vowels; after 30 steps the policy's completions score much higher."""
    tr, last = train_on_the_rule_reward(xpo, tmp_path, "objective/model_scores")
    ref_scores = [h["objective/ref_scores"] for h in tr.state.log_history
                  if "objective/ref_scores" in h]
    assert last > first_last_mean(ref_scores, 5)[1] + 2.0  # the reference did not move


def test_train_cli_method_xpo_with_local_paths(tmp_path):
    from nashkern.apps.cli import main

    path, rm, data = save_tiny_model_dirs(tmp_path)
    out = tmp_path / "out"
    rc = main(["train", "--method", "xpo", "--model_name_or_path", str(path),
               "--reward_model_path", str(rm), "--dataset_name", str(data), "--output_dir",
               str(out), "--max_steps", "2", "--per_device_train_batch_size", "3",
               "--max_new_tokens", "4", "--beta", "0.1", "0.2", "--alpha", "1e-5",
               "--loss_type", "ipo", "--logging_steps", "1", "--report_to", "none", "--use_cpu",
               "--save_strategy", "no", "--missing_eos_penalty", "1.0"])
    assert rc == 0
    assert (out / "model.safetensors").exists()
    rows = [json.loads(line) for line in open(out / "completions.jsonl")]
    assert {"prompt", "policy", "reference", "chosen"} <= set(rows[0])
    with pytest.raises(ValueError, match="mixture_coef"):  # Nash-MD-only: not an XPO argument
        main(["train", "--method", "xpo", "--model_name_or_path", str(path),
              "--dataset_name", str(data), "--output_dir", str(out), "--mixture_coef", "0.5",
              "--use_cpu"])
