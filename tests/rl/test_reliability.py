"""Nothing silent (issue 13): what a careless or hostile user passes into the trainers gets a
clear error where it enters, or an exact result; a non-finite score never reaches the weights
unannounced; no non-finite model is saved; PEFT heads are exact; evaluate() and streaming work."""
import copy
import math

import pytest
import torch
from datasets import Dataset

from online_helpers import PROMPTS, make_args, trainer_for, vowel_count
from tiny_models import make_tokenizer, single_thread, tiny_causal_lm, tiny_reward_model  # noqa: F401

NAN, INF = float("nan"), float("inf")


def _classes(method):
    import nashkern
    return {"nash_md": (nashkern.NashMDTrainer, nashkern.NashMDConfig),
            "xpo": (nashkern.XPOTrainer, nashkern.XPOConfig),
            "online_dpo": (nashkern.OnlineDPOTrainer, nashkern.OnlineDPOConfig)}[method]


def make(method, tmp_path, config=None, **kw):
    Trainer, Config = _classes(method)
    if "args" not in kw:
        kw["args"] = make_args(Config, tmp_path, **(config or {}))
    return trainer_for(Trainer, Config, tmp_path, **kw)


def weights(tr):
    return [p.detach().clone() for p in tr.model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def nan_for(prompt_text, value=NAN):
    """A reward function: the vowel count, but ``value`` for completions of one prompt."""
    def reward(prompts, completions, **kw):
        return [value if p == prompt_text else r
                for p, r in zip(prompts, vowel_count(prompts, completions))]
    return reward


METHODS = ["nash_md", "xpo", "online_dpo"]


# ------------------------------------------------------------------------------------------------
# 6. configs: every field checked at construction, the error names the field
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,kw,field", [
    ("nash_md", dict(beta=NAN), "beta"), ("nash_md", dict(beta=INF), "beta"),
    ("nash_md", dict(beta=[0.1, NAN]), "beta"), ("nash_md", dict(beta=-1.0), "beta"),
    ("nash_md", dict(mixture_coef=NAN), "mixture_coef"),
    ("nash_md", dict(mixture_coef=[0.5, 1.5]), "mixture_coef"),
    ("xpo", dict(alpha=NAN), "alpha"), ("xpo", dict(alpha=-INF), "alpha"),
    ("online_dpo", dict(beta=INF), "beta"),
    ("nash_md", dict(temperature=0.0), "temperature"),
    ("xpo", dict(temperature=NAN), "temperature"),
    ("online_dpo", dict(top_p=1.5), "top_p"), ("nash_md", dict(top_p=0.0), "top_p"),
    ("nash_md", dict(top_k=-1), "top_k"), ("nash_md", dict(min_p=2.0), "min_p"),
    ("nash_md", dict(repetition_penalty=0.0), "repetition_penalty"),
    ("xpo", dict(missing_eos_penalty=NAN), "missing_eos_penalty"),
    ("online_dpo", dict(reward_weights=[1.0, INF]), "reward_weights"),
    ("nash_md", dict(nonfinite_scores="ignore"), "nonfinite_scores"),
    ("nash_md", dict(max_new_tokens=0), "max_new_tokens"),
    ("nash_md", dict(kl_estimator="exact"), "kl_estimator"),
    ("nash_md", dict(warmup_ratio=1.0), "warmup_ratio"),
    ("nash_md", dict(loss_type="kto"), "NashMDConfig.loss_type"),
    ("online_dpo", dict(loss_type="kto"), "OnlineDPOConfig.loss_type"),
])
def test_config_rejects_bad_field_at_construction(tmp_path, method, kw, field):
    Config = _classes(method)[1]
    with pytest.raises(ValueError, match=rf"{field}"):
        Config(output_dir=str(tmp_path), **kw)


def test_config_error_message_and_sampling_params_share_the_table(tmp_path):
    from nashkern import NashMDConfig
    from nashkern.rl.generation import SamplingParams

    with pytest.raises(ValueError, match=r"NashMDConfig\.beta must be a finite float >= 0, got "
                                         r"\[0\.1, nan\] \(element 1\)"):
        NashMDConfig(output_dir=str(tmp_path), beta=[0.1, NAN])
    with pytest.raises(ValueError, match=r"SamplingParams\.top_p must be None or a float in "
                                         r"\(0, 1\], got 1\.5"):
        SamplingParams(top_p=1.5)
    with pytest.warns(UserWarning, match=r"max_new_tokens \(8\) >= max_length \(8\)"):
        NashMDConfig(output_dir=str(tmp_path), max_length=8, max_new_tokens=8, bf16=False)
    with pytest.raises(ValueError, match="beta must be a float or a list"):
        NashMDConfig(output_dir=str(tmp_path), beta="0.1")


# ------------------------------------------------------------------------------------------------
# 1. non-finite scores: raise before any weight changes (default) or drop the rows, counted
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("value", [NAN, INF])
def test_nonfinite_reward_raises_before_any_weight_changes(tmp_path, method, value):
    bad = nan_for("hi", value)  # 'hi' is in the first batch: step 0 raises, nothing changed
    tr = make(method, tmp_path, reward_funcs=bad,
              dataset=Dataset.from_dict({"prompt": ["abc", "hi", "why?"]}))
    before = weights(tr)
    with pytest.raises(ValueError, match=r"reward function reward gave non-finite scores: row \d+ "
                                         r"= (nan|inf) \(prompt 'hi'\).*No weight was changed"):
        tr.train()
    assert same(before, weights(tr))


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_reward_skip_drops_the_prompt_and_counts_it(tmp_path, method):
    # 6 prompts, batches of 3, 2 steps: the one 'hi' prompt is met exactly once
    tr = make(method, tmp_path, reward_funcs=nan_for("hi"), config=dict(nonfinite_scores="skip"))
    before = weights(tr)
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert [h["scores/nonfinite_count"] for h in logs].count(1.0) == 1
    assert sum(h["scores/nonfinite_count"] for h in logs) == 1.0
    assert all(math.isfinite(h["loss"]) for h in logs)
    after = weights(tr)
    assert all(bool(torch.isfinite(p).all()) for p in after) and not same(before, after)


def test_skip_loss_is_the_mean_over_the_kept_pairs(tmp_path):
    """Online DPO: with the pair of 'hi' dropped, the loss is exactly the mean of the other
    pairs' DPO losses (and its gradient ignores the dropped pair)."""
    tr = make("online_dpo", tmp_path, reward_funcs=nan_for("hi"),
              config=dict(nonfinite_scores="skip"))
    batch = tr.data_collator([{"prompt": p} for p in ["abc", "hi", "why?"]])
    tr.model.train()
    loss, out = tr.compute_loss(tr.model, batch, return_outputs=True)
    keep = torch.tensor([True, False, True])
    torch.testing.assert_close(loss, out["losses"][keep].mean())
    assert tr.stats["scores/nonfinite_count"] == [1.0]


def test_kept_mean_ignores_nan_rows_value_and_gradient():
    from nashkern.rl.checks import kept_mean

    x = torch.tensor([1.0, NAN, 3.0, INF], requires_grad=True)
    keep = torch.tensor([True, False, True, False])
    y = kept_mean(x, keep)
    y.backward()
    assert y.item() == 2.0 and x.grad.tolist() == [0.5, 0.0, 0.5, 0.0]
    z = torch.tensor([NAN], requires_grad=True)
    assert kept_mean(z, torch.tensor([False])).item() == 0.0


def test_nonfinite_reward_model_score_and_judge_probability_raise(tmp_path):
    class NaNHead(torch.nn.Module):  # a reward model whose score is NaN for every sequence
        def __init__(self, rm):
            super().__init__()
            self.rm, self.config = rm, rm.config

        def forward(self, **kw):
            out = self.rm(**kw)
            out.logits = out.logits * NAN
            return out

        def get_input_embeddings(self):
            return self.rm.get_input_embeddings()

    tr = make("xpo", tmp_path, reward_model=NaNHead(tiny_reward_model()))
    before = weights(tr)
    with pytest.raises(ValueError, match="reward_model NaNHead gave non-finite scores"):
        tr.train()
    assert same(before, weights(tr))

    class NaNJudge:
        def judge(self, prompts, completions, shuffle_order=True, return_scores=False):
            return [NAN] + [0.5] * (len(prompts) - 1)

    tr = make("nash_md", tmp_path, judge=NaNJudge())
    before = weights(tr)
    with pytest.raises(ValueError, match=r"judge NaNJudge gave non-finite scores: row 0 = nan"):
        tr.train()
    assert same(before, weights(tr))


def test_nan_score_is_never_chosen():
    from nashkern.rl.pairs import first_preferred

    got = first_preferred(scores=torch.tensor([NAN, 1.0, 2.0, NAN, INF, 1.0]),
                          other_scores=torch.tensor([1.0, NAN, 1.0, NAN, 0.0, 1.0]))
    assert got.tolist() == [False, True, True, True, False, True]


def test_nonfinite_loss_raises_before_backward(tmp_path, monkeypatch):
    tr = make("online_dpo", tmp_path)
    before = weights(tr)

    def nan_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        return sum(p.sum() for p in model.parameters()) * NAN

    monkeypatch.setattr(tr, "compute_loss", nan_loss)
    with pytest.raises(FloatingPointError, match="the loss is nan at step 0: not running the "
                                                 "backward"):
        tr.train()
    assert same(before, weights(tr))
    assert all(p.grad is None for p in tr.model.parameters())


def test_model_with_nonfinite_weights_is_never_saved(tmp_path):
    tr = make("nash_md", tmp_path)
    with torch.no_grad():
        tr.model.model.norm.weight[3] = NAN
    out = tmp_path / "saved"
    with pytest.raises(FloatingPointError, match=r"non-finite weights in \['model.norm.weight'\]"):
        tr.save_model(str(out))
    assert not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------------------------------------
# 2, 3. PEFT heads: modules_to_save=["lm_head"] and a LoRA adapter on lm_head
# ------------------------------------------------------------------------------------------------
def _logps64(model, ids, ctx):
    """Per-token log-probs of ids[:, ctx:] from the model's full logits in float64."""
    m = copy.deepcopy(model).double()
    z = m(input_ids=ids).logits[:, ctx - 1:-1]
    return z.log_softmax(-1).gather(-1, ids[:, ctx:, None])[..., 0]


def test_peft_modules_to_save_head_reference_uses_the_original_head():
    peft = pytest.importorskip("peft")
    from nashkern.rl.completion_stats import completion_stats

    base = tiny_causal_lm(seed=0)
    base_copy = copy.deepcopy(base)
    m = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                  modules_to_save=["lm_head"],
                                                  task_type="CAUSAL_LM"))
    trained = m.get_output_embeddings().modules_to_save["default"].weight
    with torch.no_grad():  # the trained copy of the head moves away from the original
        trained.add_(torch.randn_like(trained))
    ids = torch.randint(5, 40, (2, 9))
    st = completion_stats(m, ids, torch.ones_like(ids), 4, ref_model=m,
                          ref_context=m.disable_adapter)
    torch.testing.assert_close(st.ref_logprobs.double(), _logps64(base_copy, ids, 4).detach(),
                               rtol=0, atol=2e-5)
    torch.testing.assert_close(st.logprobs.double(), _logps64(m, ids, 4).detach(),
                               rtol=0, atol=2e-5)
    assert (st.logprobs - st.ref_logprobs).abs().max() > 0.1  # the heads do differ


def test_lora_on_lm_head_is_in_the_fused_path_values_and_gradients():
    peft = pytest.importorskip("peft")
    from nashkern.rl.completion_stats import completion_stats

    base = tiny_causal_lm(seed=0)
    base_copy = copy.deepcopy(base)
    m = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"],
                                                  init_lora_weights=False,
                                                  task_type="CAUSAL_LM"))
    head = m.get_output_embeddings()
    A, B = head.lora_A["default"].weight, head.lora_B["default"].weight
    ids = torch.randint(5, 40, (2, 9))
    st = completion_stats(m, ids, torch.ones_like(ids), 4, ref_model=m,
                          ref_context=m.disable_adapter)
    want = _logps64(m, ids, 4)
    torch.testing.assert_close(st.logprobs.double(), want.detach(), rtol=0, atol=2e-5)
    torch.testing.assert_close(st.ref_logprobs.double(), _logps64(base_copy, ids, 4).detach(),
                               rtol=0, atol=2e-5)
    gA, gB = torch.autograd.grad(st.logprobs.sum(), [A, B])
    z = m(input_ids=ids).logits[:, 3:-1].float()  # the unfused computation, same dtype
    lp = z.log_softmax(-1).gather(-1, ids[:, 4:, None])[..., 0]
    wA, wB = torch.autograd.grad(lp.sum(), [A, B])
    torch.testing.assert_close(gA, wA, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(gB, wB, rtol=1e-3, atol=1e-5)


def test_lora_dropout_on_the_head_raises_or_falls_back_on_request_at_that_step():
    peft = pytest.importorskip("peft")
    from nashkern.rl.completion_stats import completion_stats

    m = peft.get_peft_model(tiny_causal_lm(seed=0), peft.LoraConfig(
        r=4, target_modules=["lm_head"], lora_dropout=0.5, task_type="CAUSAL_LM"))
    ids = torch.randint(5, 40, (2, 9))
    m.eval()  # no dropout in eval mode: fused, silently exact
    completion_stats(m, ids, torch.ones_like(ids), 4, ref_model=m, ref_context=m.disable_adapter)
    m.train()
    with pytest.raises(ValueError, match=r"lora_dropout=0.5 on the output head.*"
                                         r"allow_unfused_head=True"):
        completion_stats(m, ids, torch.ones_like(ids), 4, ref_model=m,
                         ref_context=m.disable_adapter)
    with pytest.warns(RuntimeWarning, match=r"lora_dropout=0.5 on the output head.*chunked"):
        st = completion_stats(m, ids, torch.ones_like(ids), 4, ref_model=m,
                              ref_context=m.disable_adapter, allow_unfused=True)
    assert st.logprobs.requires_grad


def test_lora_only_on_lm_head_trains(tmp_path):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], task_type="CAUSAL_LM")
    tr = make("nash_md", tmp_path, peft_config=cfg)
    head = tr.model.get_output_embeddings()
    assert bool((head.lora_B["default"].weight == 0).all())
    tr.train()
    assert bool((head.lora_B["default"].weight != 0).any())


# ------------------------------------------------------------------------------------------------
# 4 (generation side). sampled ids outside [0, V)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-1, 1000])
def test_generation_rejects_sampled_ids_outside_the_vocabulary(monkeypatch, bad):
    from nashkern import ops
    from nashkern.rl.generation import SamplingParams, generate

    m = tiny_causal_lm()
    V = m.config.vocab_size
    monkeypatch.setattr(ops, "mixture_sample",
                        lambda z, *a, **k: torch.full((z.shape[0],), min(bad, V + 3)))
    # the sampler of the fused decode (the models' final hidden states, rl/fused_decode.py)
    monkeypatch.setattr(ops, "linear_mixture_sample",
                        lambda h, *a, **k: torch.full((h.shape[0],), min(bad, V + 3)))
    ids = torch.randint(5, 40, (2, 4))
    with pytest.raises(RuntimeError, match=rf"sampled token id {min(bad, V + 3)} in row 0 is "
                                           rf"outside \[0, {V}\)"):
        generate(m, ids, torch.ones_like(ids), eos_token_id=1, pad_token_id=0,
                 params=SamplingParams(max_new_tokens=2))


# ------------------------------------------------------------------------------------------------
# 5. judge outputs
# ------------------------------------------------------------------------------------------------
class ListJudge:
    def __init__(self, out):
        self.out = out

    def judge(self, prompts, completions, shuffle_order=True):
        return self.out(len(prompts))


class ProbJudge(ListJudge):
    def judge(self, prompts, completions, shuffle_order=True, return_scores=False):
        return self.out(len(prompts))


@pytest.mark.parametrize("judge,match", [
    (ListJudge(lambda n: [2] + [0] * (n - 1)), r"judge ListJudge: choice 0 is 2; expected 0"),
    (ListJudge(lambda n: [0.5] * n), r"choice 0 is 0.5"),
    (ListJudge(lambda n: ["a"] * n), r"choice 0 is 'a'"),
    (ListJudge(lambda n: [0]), r"judge ListJudge returned 1 choices for 3 pairs"),
    (ListJudge(lambda n: 0), r"judge ListJudge returned 0 \(int\); expected a list of 3"),
    (ProbJudge(lambda n: [1.7] * n), r"judge ProbJudge: probability 0 is 1.7; expected a float "
                                     r"in \[0, 1\]"),
    (ProbJudge(lambda n: [-INF] * n), r"probability 0 is -inf"),
    (ProbJudge(lambda n: [0.5] * (n + 1)), r"returned 4 probabilities for 3 pairs"),
])
def test_bad_judge_output_is_a_clear_error(judge, match):
    from nashkern.rl.judges import judge_probabilities

    with pytest.raises(ValueError, match=match):
        judge_probabilities(judge, ["p"] * 3, [("a", "b")] * 3)


def test_judge_choices_checked_in_xpo_and_online_dpo(tmp_path):
    for method in ("xpo", "online_dpo"):
        tr = make(method, tmp_path, judge=ListJudge(lambda n: [3] * n))
        with pytest.raises(ValueError, match="judge ListJudge: choice 0 is 3"):
            tr.train()
    from nashkern.rl.judges import judge_probabilities
    assert judge_probabilities(ListJudge(lambda n: [0, 1, -1]), ["p"] * 3,
                               [("a", "b")] * 3) == [1.0, 0.0, 0.5]


# ------------------------------------------------------------------------------------------------
# 7. prompts: checked at construction (column, row, problem); long prompts
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompts,match", [
    (["ok", None], r"train_dataset\['prompt'\]: row 1 is None"),
    (["ok", ""], r"row 1 is an empty string"),
    (["", ""], r"row 0 is an empty string; row 1 is an empty string"),
    ([1, 2], r"row 0 is a int \(1\), expected a string"),
    ([[{"content": "hi"}]], r"row 0 message 0 has no string 'role'"),
    ([[{"role": "user", "content": 3}]], r"row 0 message 0 has no 'content' string"),
    ([[]], r"row 0 is an empty list of messages"),
    ([["a", "b"]], r"row 0 message 0 is a str \('a'\), expected a dict"),
    ([("x",)], r"row 0 is a tuple"),
    (["text", [{"role": "user", "content": "hi"}]], r"mixes plain-text prompts \(row 0\) and "
                                                    r"chat prompts \(row 1\)"),
])
def test_bad_prompts_rejected_at_construction(tmp_path, prompts, match):
    chat = any(isinstance(p, (list, tuple)) for p in prompts)  # Arrow cannot hold these
    ds = [{"prompt": p} for p in prompts] if chat else Dataset.from_dict({"prompt": prompts})
    with pytest.raises(ValueError, match=match):
        make("nash_md", tmp_path, dataset=ds)


def test_eval_dataset_and_chat_template_checked(tmp_path):
    with pytest.raises(ValueError, match=r"eval_dataset\['prompt'\]: row 2 is None"):
        make("xpo", tmp_path, eval_dataset=[{"prompt": "a"}, {"prompt": "b"}, {"prompt": None}])
    tok = make_tokenizer()
    tok.chat_template = None
    chat = Dataset.from_dict({"prompt": [[{"role": "user", "content": "hi"}]]})
    with pytest.raises(ValueError, match="chat prompts .* need a tokenizer with a chat_template"):
        make("nash_md", tmp_path, tok=tok, dataset=chat)


def test_max_length_beyond_model_positions_and_long_prompts_truncated_with_warning(tmp_path):
    with pytest.raises(ValueError, match=r"max_length \(600\) exceeds the model's "
                                         r"max_position_embeddings \(512\)"):
        make("nash_md", tmp_path, config=dict(max_length=600))
    tr = make("nash_md", tmp_path, config=dict(max_length=16, max_new_tokens=6, max_steps=1),
              dataset=Dataset.from_dict({"prompt": ["x" * 40, "hi", "abc"]}))
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) of this batch are longer than "
                                         r"max_length - max_new_tokens = 10 tokens"):
        tr.train()


# ------------------------------------------------------------------------------------------------
# 8. reward functions and reward models
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out,match", [
    (lambda n: 1.0, r"reward function bad returned 1.0 \(float\); expected a list of 3 rewards"),
    (lambda n: None, r"reward function bad returned None"),
    (lambda n: [[1.0]] * n, r"reward function bad: reward 0 is \[1.0\] \(list\)"),
    (lambda n: [1.0] * (n - 1), r"reward function bad returned 2 rewards for 3 completions"),
    (lambda n: ["1"] * n, r"reward 0 is '1' \(str\)"),
    (lambda n: torch.ones(n, device="meta"), r"returned a tensor on the meta device"),
    (lambda n: torch.ones(n, 1), r"returned a tensor of shape \(3, 1\)"),
])
def test_bad_reward_function_output_is_a_clear_error(out, match):
    from nashkern.rl.scoring import reward_funcs_scores

    def bad(prompts, completions, **kw):
        return out(len(prompts))

    with pytest.raises(ValueError, match=match):
        reward_funcs_scores([bad], ["p"] * 3, ["c"] * 3, [[1]] * 3)


def test_reward_function_outputs_accepted_exactly():
    import numpy as np

    from nashkern.rl.scoring import reward_funcs_scores

    outs = [[1.0, None, 2], np.array([0.5, 0.25, 0.0]), torch.tensor([1, 2, 3]),
            (torch.tensor(1.0), 0, -1.5)]
    fs = [lambda prompts, completions, o=o, **kw: o for o in outs]
    got = reward_funcs_scores(fs, ["p"] * 3, ["c"] * 3, [[1]] * 3, weights=[1, 2, 0.5, 1])
    assert got.tolist() == [1 + 1 + 0.5 + 1, 0 + 0.5 + 1 + 0, 2 + 0 + 1.5 - 1.5]


def test_reward_model_with_two_labels_or_a_smaller_vocabulary(tmp_path):
    with pytest.raises(ValueError, match=r"reward_model \(Qwen2ForSequenceClassification\) has "
                                         r"num_labels=2"):
        make("online_dpo", tmp_path, reward_model=_two_label_rm())
    small = tiny_reward_model(vocab_size=20)
    with pytest.raises(ValueError, match=r"vocabulary of 20 tokens, smaller than the policy "
                                         r"tokenizer's \d+: pass its own tokenizer as "
                                         r"reward_processing_class"):
        make("nash_md", tmp_path, reward_model=small)


def _two_label_rm():
    from transformers import AutoModelForSequenceClassification

    from nashkern.apps.tiny import tiny_qwen2_config
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(tiny_qwen2_config(num_labels=2))


def test_reward_model_logits_with_two_labels_rejected_at_scoring():
    from nashkern.rl.scoring import reward_model_scores

    rm = _two_label_rm()
    ids = torch.randint(5, 40, (2, 5))
    with pytest.raises(ValueError, match="returns 2 labels per sequence"):
        reward_model_scores(rm, ids, torch.ones_like(ids), pad_token_id=0)


# ------------------------------------------------------------------------------------------------
# 9. evaluate(); 10. streaming datasets
# ------------------------------------------------------------------------------------------------
EVAL_KEYS = {"nash_md": {"eval_loss/kl", "eval_rewards/probabilities", "eval_logps/chosen"},
             "xpo": {"eval_loss/dpo", "eval_loss/xpo", "eval_objective/scores_margin"},
             "online_dpo": {"eval_objective/kl", "eval_objective/scores", "eval_rewards/margins"}}


@pytest.mark.parametrize("method", METHODS)
def test_evaluate_computes_the_method_metrics_without_an_update(tmp_path, method):
    tr = make(method, tmp_path, eval_dataset=Dataset.from_dict({"prompt": PROMPTS[:4]}),
              config=dict(per_device_eval_batch_size=2))
    before = weights(tr)
    m1 = tr.evaluate()
    assert EVAL_KEYS[method] <= set(m1) and math.isfinite(m1["eval_loss"])
    assert same(before, weights(tr)) and not tr.stats and tr.last_samples == []
    assert all(p.grad is None for p in tr.model.parameters())
    m2 = tr.evaluate()  # same step, same draws: the same numbers
    assert {k: v for k, v in m1.items() if "runtime" not in k and "per_second" not in k} == \
        {k: v for k, v in m2.items() if "runtime" not in k and "per_second" not in k}


def test_streaming_dataset_with_max_steps(tmp_path):
    ds = Dataset.from_dict({"prompt": PROMPTS}).to_iterable_dataset()
    tr = make("online_dpo", tmp_path, dataset=ds)
    tr.train()
    assert tr.state.global_step == 2
    bad = Dataset.from_dict({"prompt": ["a", "", "b"]}).to_iterable_dataset()
    with pytest.raises(ValueError, match=r"a batch of prompts: row 1 is an empty string"):
        make("online_dpo", tmp_path, dataset=bad).train()


# ------------------------------------------------------------------------------------------------
# beyond the list: the other values that enter the trainers
# ------------------------------------------------------------------------------------------------
def test_other_trainer_arguments_checked_where_they_enter(tmp_path):
    from datasets import DatasetDict

    with pytest.raises(TypeError, match="judge must have a judge"):
        make("nash_md", tmp_path, judge=object())
    with pytest.raises(TypeError, match=r"reward_funcs\[1\] must be a callable, a reward model "
                                        r"or its path, got int"):
        make("xpo", tmp_path, reward_funcs=[vowel_count, 42])
    with pytest.raises(ValueError, match=r"the tokenizer has \d+ tokens but the model's "
                                         r"embedding only 20 rows"):
        make("nash_md", tmp_path, model=tiny_causal_lm(vocab_size=20))
    with pytest.raises(ValueError, match=r"ref_model's vocabulary \(80\) differs from the "
                                         r"policy's \(\d+\)"):
        make("online_dpo", tmp_path, ref_model=tiny_causal_lm(vocab_size=80))
    dd = DatasetDict({"train": Dataset.from_dict({"prompt": PROMPTS})})
    with pytest.raises(ValueError, match=r"train_dataset is a DatasetDict \(splits \['train'\]\); "
                                         r"pass one split"):
        make("nash_md", tmp_path, dataset=dd)
    with pytest.raises(ValueError, match=r"eval_dataset\['b'\]\['prompt'\]: row 0 is None"):
        make("nash_md", tmp_path, eval_dataset={"a": Dataset.from_dict({"prompt": ["x"]}),
                                                "b": [{"prompt": None}]})


@pytest.mark.parametrize("bad", [NAN, INF, -1.0])
def test_loss_functions_reject_nonfinite_beta_and_alpha(bad):
    from nashkern.rl.losses import dpo_loss, nash_md_loss, xpo_loss

    x = torch.zeros(2, 3)
    v = torch.zeros(2)
    with pytest.raises(ValueError, match="beta must be a finite float >= 0"):
        nash_md_loss(x, x, 0.5, None, bad)
    with pytest.raises(ValueError, match="beta must be a finite float >= 0"):
        dpo_loss(v, v, v, v, beta=bad)
    with pytest.raises(ValueError, match="alpha must be a finite float >= 0"):
        xpo_loss(v, v, v, v, v, beta=0.1, alpha=bad)


def test_prompt_that_tokenizes_to_nothing_is_an_error():
    from nashkern.rl.trainer_setup import PromptCollator

    class DropsDigits:  # a tokenizer that has no token for digits
        padding_side, chat_template = "left", None

        def __call__(self, texts, **kw):
            tok = make_tokenizer()
            enc = tok([t.strip("0123456789") or "x" for t in texts], **kw)
            for i, t in enumerate(texts):
                if not t.strip("0123456789"):
                    enc["attention_mask"][i] = 0
            return enc

    with pytest.raises(ValueError, match="prompt '123' tokenizes to no tokens"):
        PromptCollator(DropsDigits())([{"prompt": "ab"}, {"prompt": "123"}])
