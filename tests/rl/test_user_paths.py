"""The trainers on the paths users take (issue 19): every model dtype under every mixed-precision
config, the model card and TRL's example scripts end to end, the bad inputs that used to crash
mid-step, the smaller edge cases, and the KV-cache argument of the installed transformers.
Tiny local models, a step or two each."""
import json
import math
import os
import runpy
import shutil
import sys
import warnings

import pytest
import torch
from datasets import Dataset

from nashkern import (GeometricMixtureWrapper, NashMDConfig, NashMDTrainer, OnlineDPOConfig,
                      OnlineDPOTrainer, XPOConfig, XPOTrainer)
from nashkern.apps.tiny import make_tokenizer, tiny_causal_lm, tiny_reward_model

from online_helpers import PROMPTS, vowel_count

# touches transformers / accelerate / datasets / peft through the trainers: also run by the
# minimum-versions job (the oldest supported releases; item 5's cache argument above all)
pytestmark = pytest.mark.min_versions

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAINERS = {"nash_md": (NashMDTrainer, NashMDConfig), "xpo": (XPOTrainer, XPOConfig),
            "online_dpo": (OnlineDPOTrainer, OnlineDPOConfig)}


def _args(Config, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1,
                max_new_tokens=3, learning_rate=1e-2, logging_steps=1, report_to="none",
                save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, bf16=False,
                gradient_checkpointing=False)
    base.update(kw)
    return Config(**base)


def _trainer(name, tmp_path, model=None, prompts=PROMPTS[:2], **kw):
    Trainer, Config = TRAINERS[name]
    scorer = {k: kw.pop(k) for k in ("reward_funcs", "reward_model", "judge") if k in kw} \
        or {"reward_funcs": vowel_count}
    init = {k: kw.pop(k) for k in ("callbacks",) if k in kw}
    return Trainer(model=model if model is not None else tiny_causal_lm(),
                   args=_args(Config, tmp_path, **kw), processing_class=make_tokenizer(),
                   train_dataset=Dataset.from_dict({"prompt": list(prompts)}), **scorer, **init)


# ------------------------------------------------------------------------------------------------
# 0. every model dtype x every mixed-precision config trains (CPU autocast)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_every_model_dtype_trains_under_every_precision_config(model_dtype, precision, tmp_path):
    """A model loaded in fp32 / bf16 / fp16 with the config's bf16=True (TRL's default), fp16=True
    or neither (use_cpu=True: CPU autocast) takes its step on the fused path: no error, a finite
    loss, the weights moved, the head separated (no fallback). The trainer rotates over the
    three methods so each meets every dtype once in the matrix. bf16=True on a bf16 model used to
    fail at step 1 in the head check (float32 hidden @ bf16 head)."""
    names = list(TRAINERS)
    name = names[([torch.float32, torch.bfloat16, torch.float16].index(model_dtype)
                  + ["bf16", "fp16", "fp32"].index(precision)) % 3]
    model = tiny_causal_lm(tie_word_embeddings=False).to(model_dtype)
    before = model.lm_head.weight.detach().clone()
    tr = _trainer(name, tmp_path, model=model, bf16=precision == "bf16",
                  fp16=precision == "fp16")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*chunked logits.*")  # no silent fallback
        tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert logs and math.isfinite(logs[0]["loss"]), logs
    assert tr.model._nashkern_separable is True
    assert not torch.equal(tr.model.lm_head.weight.detach(), before)  # an update happened
    assert tr.model.lm_head.weight.dtype == model_dtype


# ------------------------------------------------------------------------------------------------
# 1. the model card; TRL's example scripts end to end (a local stand-in for the hub)
# ------------------------------------------------------------------------------------------------
CITED = {"nash_md": ("Nash-MD", "Nash Learning from Human Feedback", "Munos", "2312.00886"),
         "xpo": ("XPO", "Exploratory Preference Optimization", "Xie", "2405.21046"),
         "online_dpo": ("Online DPO", "Direct Language Model Alignment from Online AI Feedback",
                        "Guo", "2402.04792")}


def _check_card(text, name, *, base, dataset=None, tags=()):
    method, title, author, arxiv = CITED[name]
    assert text.startswith("---\n") and "library_name: transformers" in text
    assert f"This model was trained with {method}, a method introduced in [{title}" in text
    assert f"https://huggingface.co/papers/{arxiv}" in text and author in text  # the citation
    assert "nashkern" in text and f"`{TRAINERS[name][0].__name__}`" in text
    for lib in ("nashkern", "Transformers", "PyTorch", "Datasets", "Tokenizers"):
        assert f"\n- {lib}: " in text, lib
    assert base in text
    if dataset is not None:
        assert f"datasets:\n- {dataset}\n" in text
    for t in ("generated_from_trainer", "nashkern", *tags):
        assert f"\n- {t}\n" in text, t


@pytest.mark.parametrize("name", list(TRAINERS))
def test_create_model_card_takes_trl_arguments(name, tmp_path):
    """TRL 1.13's create_model_card(model_name, dataset_name, tags) (what push_to_hub passes
    on) writes README.md into output_dir; save_model writes one next to the weights."""
    model = tiny_causal_lm()
    model.config._name_or_path = "tiny-org/tiny-qwen2"  # a Hub id: the card links it
    tr = _trainer(name, tmp_path / "out", model=model)
    tr.create_model_card(model_name="my-model", dataset_name="trl-lib/tldr", tags=["extra"])
    text = (tmp_path / "out" / "README.md").read_text()
    _check_card(text, name, base="base_model: tiny-org/tiny-qwen2", dataset="trl-lib/tldr",
                tags=("extra", TRAINERS[name][0]._tag_names[1]))
    assert "# Model Card for my-model" in text
    assert "[trl-lib/tldr](https://huggingface.co/datasets/trl-lib/tldr)" in text
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['dataset_nmae'\]"):
        tr.create_model_card(dataset_nmae="x")
    tr.save_model(str(tmp_path / "saved"))
    saved = (tmp_path / "saved" / "README.md").read_text()
    _check_card(saved, name, base="tiny-org/tiny-qwen2")
    assert "# Model Card for saved" in saved


def test_nash_ema_model_card_names_its_method(tmp_path):
    """Nash-EMA (a Nash-MD subclass) is named as itself, with the paper both come from."""
    from nashkern import NashEMAConfig, NashEMATrainer

    tr = NashEMATrainer(model=tiny_causal_lm(), args=_args(NashEMAConfig, tmp_path),
                        processing_class=make_tokenizer(), reward_funcs=vowel_count,
                        train_dataset=Dataset.from_dict({"prompt": PROMPTS[:2]}))
    tr.create_model_card(dataset_name="trl-lib/tldr")
    text = (tmp_path / "README.md").read_text()
    assert "This model was trained with Nash-EMA, a method introduced in [Nash Learning from " \
           "Human Feedback](https://huggingface.co/papers/2312.00886)" in text
    assert "`NashEMATrainer`" in text and "\n- nash-ema\n" in text


class LocalHub:
    """Stand-in for ``transformers.trainer.hf_api()``: create_repo records the repo, and
    upload_folder copies the folder into ``root/<repo>`` (what the Hub would receive)."""

    def __init__(self, root):
        self.root, self.repos, self.uploads = root, [], []

    def create_repo(self, repo_id, token=None, private=None, exist_ok=False, **kw):
        from types import SimpleNamespace

        self.repos.append(repo_id)
        return SimpleNamespace(repo_id=f"local-user/{os.path.basename(repo_id)}")

    def upload_folder(self, repo_id, folder_path, ignore_patterns=(), **kw):
        dest = os.path.join(self.root, repo_id)
        shutil.copytree(folder_path, dest, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(*ignore_patterns))
        self.uploads.append(repo_id)
        return dest


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    import transformers.trainer

    hub = LocalHub(str(tmp_path / "hub"))
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda *a, **k: hub)
    return hub


@pytest.fixture
def script_inputs(tmp_path):
    """A policy checkpoint, a reward-model checkpoint and a local data set directory with
    train / test splits (the scripts' --model_name_or_path, --reward_model_path,
    --dataset_name)."""
    policy, rm, data = tmp_path / "policy", tmp_path / "rm", tmp_path / "tldr"
    tiny_causal_lm().save_pretrained(policy)
    make_tokenizer().save_pretrained(policy)
    tiny_reward_model(seed=3).save_pretrained(rm)
    make_tokenizer().save_pretrained(rm)
    data.mkdir()
    for split, rows in (("train", PROMPTS[:4]), ("test", PROMPTS[4:])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n"
                                                     for p in rows))
    return policy, rm, data


def _run_script(name, argv, monkeypatch):
    script = os.path.join(REPO, "examples", "scripts", f"{name}.py")
    monkeypatch.setattr(sys, "argv", [script, *argv])
    monkeypatch.syspath_prepend(os.path.dirname(script))  # as `python <script>` puts it first
    runpy.run_path(script, run_name="__main__")


# The scripts' documented commands (examples/scripts/*.py), with the tiny local checkpoints and
# data in place of the Hub ones, --use_cpu (bf16 autocast on the CPU), and the sizes cut to one
# step (max_steps 1; batch 2 x accumulation 2 instead of 4 x 32, 3 epochs).
DOCUMENTED = {
    "nash_md": ["--learning_rate", "5.0e-7", "--warmup_ratio", "0.1", "--missing_eos_penalty",
                "1.0", "--push_to_hub"],
    "xpo": ["--learning_rate", "5.0e-7", "--warmup_ratio", "0.1", "--missing_eos_penalty", "1.0",
            "--push_to_hub"],
    "online_dpo": ["--learning_rate", "5.0e-7", "--warmup_ratio", "0.1", "--missing_eos_penalty",
                   "1.0", "--push_to_hub"],
}


@pytest.mark.parametrize("name", list(TRAINERS))
def test_example_script_documented_command(name, tmp_path, script_inputs, local_hub,
                                           monkeypatch):
    """``python examples/scripts/<name>.py --model_name_or_path … --reward_model_path …
    --dataset_name … --push_to_hub``: trains, saves, and pushes (to the local stand-in) a
    folder with the weights and a model card naming the base model, the data set, the method
    and its paper. Online DPO's command also runs with --use_peft (LoRA)."""
    policy, rm, data = script_inputs
    out = tmp_path / f"tiny-{name}"
    argv = ["--model_name_or_path", str(policy), "--reward_model_path", str(rm),
            "--dataset_name", str(data), "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--max_steps", "1", "--max_new_tokens", "4", "--use_cpu", "--report_to", "none",
            "--save_strategy", "no", "--disable_tqdm", "true", *DOCUMENTED[name]]
    if name == "online_dpo":
        pytest.importorskip("peft")
        argv += ["--use_peft", "--lora_r", "4", "--lora_alpha", "8"]
    _run_script(name, argv, monkeypatch)
    assert (out / "README.md").exists()
    # save_model pushes too when push_to_hub is set (transformers); the script's push is last
    assert local_hub.uploads and set(local_hub.uploads) == {f"local-user/tiny-{name}"}
    pushed = tmp_path / "hub" / "local-user" / f"tiny-{name}"
    card = (pushed / "README.md").read_text()
    _check_card(card, name, base=f"`{policy}` (a local checkpoint)")
    assert "datasets:" not in card and "base_model:" not in card  # local paths: no Hub metadata
    assert f"on `{data}` data set" in card
    weights = {"adapter_model.safetensors"} if name == "online_dpo" else {"model.safetensors"}
    assert weights <= set(os.listdir(pushed)), sorted(os.listdir(pushed))


class FakeBlender:
    """Stand-in for ``llm_blender.Blender`` with PairRM loaded (no hub), with the API TRL's
    PairRMJudge (and nashkern's) calls: ``loadranker(name, device=...)``, then
    ``rank(prompts, candidates, return_scores=..., disable_tqdm=True)`` -> a numpy array
    [N, candidates]: PairRM's scores (logits, higher = better) with ``return_scores=True``, else
    the ranks (1 = best). The score of a completion is :meth:`score` (a fixed text function),
    so the test can recompute every preference."""

    instances = []

    def __init__(self):
        self.loaded, self.calls = [], []
        FakeBlender.instances.append(self)

    def loadranker(self, name, device=None, **kw):
        self.loaded.append((name, str(device)))

    @staticmethod
    def score(text):
        return (sum(map(ord, text)) % 17) / 4.0 + len(text) / 1000.0

    def rank(self, inputs, candidates, instructions=None, return_scores=False, batch_size=8,
             disable_tqdm=False, **kw):
        import numpy as np

        assert self.loaded, "rank() before loadranker()"
        assert len(inputs) == len(candidates) and all(isinstance(p, str) for p in inputs)
        self.calls.append((list(inputs), [list(c) for c in candidates], return_scores))
        scores = np.array([[self.score(c) for c in cands] for cands in candidates])
        if return_scores:
            return scores
        return (-scores).argsort(-1).argsort(-1) + 1  # rank 1: the highest score


@pytest.fixture
def fake_llm_blender(monkeypatch):
    import types

    module = types.ModuleType("llm_blender")
    module.Blender = FakeBlender
    monkeypatch.setitem(sys.modules, "llm_blender", module)
    FakeBlender.instances = []
    return FakeBlender


# TRL's documented PairRM commands (docs of the Nash-MD / XPO trainers; Online DPO's alike):
# --judge pair_rm on trl-lib/ultrafeedback-prompt (conversational prompts), no reward model
JUDGE_COMMAND = ["--judge", "pair_rm", "--learning_rate", "5.0e-7", "--logging_steps", "25",
                 "--warmup_ratio", "0.1", "--push_to_hub"]


@pytest.mark.parametrize("name", list(TRAINERS))
def test_example_script_pair_rm_judge_command(name, tmp_path, script_inputs, local_hub,
                                              fake_llm_blender, monkeypatch):
    """``python examples/scripts/<name>.py --model_name_or_path … --judge pair_rm --dataset_name
    <conversational prompts> … --push_to_hub`` with a local stand-in for llm-blender's PairRM
    (FakeBlender): the judge is loaded as PairRM, asked about every step's completion pairs
    (with scores for Nash-MD's preference probability, ranks for XPO / Online DPO's choice),
    and the trainer's preferences are the stand-in's, mapped back through the judge's random
    order shuffling; the model is saved and pushed with its card."""
    from nashkern.rl.online import OnlinePreferenceTrainer

    policy, _, _ = script_inputs
    data = tmp_path / "ultrafeedback-prompt"
    data.mkdir()
    for split, rows in (("train", PROMPTS[:4]), ("test", PROMPTS[4:])):
        (data / f"{split}.jsonl").write_text("".join(
            json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n" for p in rows))
    made = []
    real_init = OnlinePreferenceTrainer.__init__

    def recording_init(self, *a, **k):
        real_init(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(OnlinePreferenceTrainer, "__init__", recording_init)
    out = tmp_path / f"tiny-{name}-pair-rm"
    _run_script(name, ["--model_name_or_path", str(policy), "--dataset_name", str(data),
                       "--output_dir", str(out), "--per_device_train_batch_size", "2",
                       "--max_steps", "1", "--max_new_tokens", "4", "--use_cpu",
                       "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
                       *JUDGE_COMMAND], monkeypatch)
    (blender,) = fake_llm_blender.instances
    assert [n for n, _ in blender.loaded] == ["llm-blender/PairRM"]
    (trainer,) = made
    assert type(trainer.judge).__name__ == "PairRMJudge" and trainer.reward_funcs is None
    # one step of 2 prompts: one judge call on their 2 pairs (shuffled within each pair)
    (prompts, candidates, return_scores), = blender.calls
    assert len(prompts) == 2 and all(len(c) == 2 for c in candidates)
    assert return_scores == (name == "nash_md")
    rows = trainer.last_samples
    assert len(rows) == 2
    score = fake_llm_blender.score
    flipped = []
    for row, cands in zip(rows, candidates):
        if name == "nash_md":
            first, second = row["policy"], row["mixture"]
            # P(policy preferred): PairRM's scores as logits, softmax over the pair
            want = 1.0 / (1.0 + math.exp(score(second) - score(first)))
            assert row["probability"] == pytest.approx(want, rel=1e-5), row
        else:
            first, second = ((row["policy"], row["reference"]) if name == "xpo"
                             else (row["completion_1"], row["completion_2"]))
            assert score(first) != score(second), row  # a decided pair (no tie)
            first_wins = score(first) > score(second)
            assert row["chosen"] == (("policy" if first_wins else "reference") if name == "xpo"
                                     else (1 if first_wins else 2)), row
        assert sorted(cands) == sorted([first, second])  # the pair the judge saw
        flipped.append(cands != [first, second])
    # the judge showed a pair in swapped order (its shuffle_order, numpy's RNG seeded by the
    # Trainer): the preference above went through its un-swapping
    assert any(flipped), flipped
    pushed = tmp_path / "hub" / "local-user" / f"tiny-{name}-pair-rm"
    _check_card((pushed / "README.md").read_text(), name,
                base=f"`{policy}` (a local checkpoint)")
    assert "model.safetensors" in os.listdir(pushed)


# ------------------------------------------------------------------------------------------------
# 3. bad inputs that used to crash mid-step
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TRAINERS))
def test_max_new_tokens_past_the_model_positions_is_a_construction_error(name, tmp_path):
    """max_length fits, max_new_tokens does not (generation spans max_new_tokens + 1 positions):
    a ValueError at construction naming max_new_tokens and the limit (was an IndexError at step
    1, or silent generation past the positions); generation_kwargs' override is named too."""
    with pytest.raises(ValueError, match=r"max_new_tokens \(200\) \+ 1 prompt token exceeds the "
                                         r"model's max_position_embeddings \(128\): set "
                                         r"max_new_tokens <= 127"):
        _trainer(name, tmp_path, model=tiny_causal_lm(max_position_embeddings=128),
                 max_length=64, max_new_tokens=200)
    with pytest.raises(ValueError, match=r"generation_kwargs\['max_new_tokens'\] \(128\)"):
        _trainer(name, tmp_path, model=tiny_causal_lm(max_position_embeddings=128),
                 max_length=64, generation_kwargs={"max_new_tokens": 128})
    _trainer(name, tmp_path, model=tiny_causal_lm(max_position_embeddings=128), max_length=64,
             max_new_tokens=127)  # the largest that fits


def _vocab_mask_hook(ids):
    def hook(module, args, out):
        return out.index_fill(-1, torch.tensor(ids), float("-inf"))
    return hook


def test_forward_hook_on_lm_head_raises_the_separation_error_or_runs_hooked(tmp_path):
    """A forward hook on lm_head (a vocabulary mask) is logit post-processing the fused path
    never builds: the "could not be separated … allow_unfused_head" error (was an AttributeError
    in the hook every step), and with allow_unfused_head=True the step trains on the hooked
    logits: the masked tokens are never sampled and the log-probs are the hooked model's."""
    from nashkern.rl.completion_stats import completion_stats

    masked = list(range(10, 30))
    model = tiny_causal_lm()
    model.lm_head.register_forward_hook(_vocab_mask_hook(masked))
    with pytest.raises(ValueError, match=r"could not be separated.*forward hook on the head.*"
                                         r"allow_unfused_head=True"):
        _trainer("nash_md", tmp_path, model=model).train()
    tr = _trainer("nash_md", tmp_path, model=model, allow_unfused_head=True, max_new_tokens=6)
    seen = []
    import nashkern.rl.nash_md as nash_md
    real = nash_md.generate_pair

    def recording(*a, **k):  # the step's one generation loop: policy and mixture samples
        outputs = real(*a, **k)
        for out in outputs:
            seen.append(out.completion_ids[out.completion_mask.bool()])
        return outputs

    nash_md.generate_pair = recording
    try:
        with pytest.warns(RuntimeWarning, match="chunked logits"):
            tr.train()
    finally:
        nash_md.generate_pair = real
    sampled = torch.cat(seen)
    assert sampled.numel() and not torch.isin(sampled, torch.tensor(masked)).any()
    # the statistics are the hooked model's: log-softmax of the masked logits
    ids = torch.tensor([[5, 6, 7, 40, 8, 9]])
    mask = torch.ones_like(ids)
    with pytest.warns(RuntimeWarning, match="chunked logits"):
        st = completion_stats(tr.model, ids, mask, 3, ref_model=tr.ref_model,
                              allow_unfused=True)
    with torch.no_grad():
        z = tr.model(input_ids=ids).logits[:, 2:-1].float()
    assert torch.isinf(z[..., masked]).all()  # the hook ran on the model's own logits
    want = z.log_softmax(-1).gather(-1, ids[:, 3:, None])[..., 0]
    torch.testing.assert_close(st.logprobs.detach(), want, rtol=1e-5, atol=1e-5)


def test_model_level_forward_hook_is_not_fed_the_fused_statistics(tmp_path):
    """A forward hook on the model itself (it reads ``out.logits``) would receive the fused
    statistics' tuple through the redirected forward: the same separation error instead, and
    the unfused path with the flag."""
    model = tiny_causal_lm()
    calls = []
    model.register_forward_hook(lambda m, a, out: calls.append(out.logits.shape))
    with pytest.raises(ValueError, match=r"forward hook on the policy \(Qwen2ForCausalLM\) and "
                                         r"the reference \(Qwen2ForCausalLM\).*"
                                         r"allow_unfused_head=True"):
        _trainer("xpo", tmp_path, model=model).train()
    tr = _trainer("xpo", tmp_path, model=model, allow_unfused_head=True)
    with pytest.warns(RuntimeWarning, match="chunked logits"):
        tr.train()
    assert calls and all(len(s) == 3 for s in calls)


@pytest.mark.parametrize("name", list(TRAINERS))
def test_max_length_none_trains_without_truncation(name, tmp_path):
    """max_length=None: no truncation (prompts cut only to the model's positions); the step
    runs (was a TypeError comparing int and None at step 1), and a long prompt is kept
    whole."""
    long_prompt = "word " * 30
    tr = _trainer(name, tmp_path, max_length=None, prompts=[long_prompt, "hi"])
    import nashkern.rl.generation as generation
    widths = []
    real = generation.truncate_prompts_left

    def recording(ids, mask, max_prompt):
        out = real(ids, mask, max_prompt)
        widths.append(out[0].shape[1])
        return out

    generation.truncate_prompts_left = recording
    try:
        tr.train()
    finally:
        generation.truncate_prompts_left = real
    assert tr.state.global_step == 1
    assert widths and set(widths) == {len(long_prompt)}  # character tokenizer: one per char
    kw = tr._generation_kwargs(torch.Generator())
    assert kw["max_length"] == 512  # the model's max_position_embeddings


# ------------------------------------------------------------------------------------------------
# 4. the smaller ones
# ------------------------------------------------------------------------------------------------
def _nan_for(prompts_to_drop):
    def reward(prompts, completions, completion_ids=None, **kw):
        return [float("nan") if p in prompts_to_drop else float(len(c))
                for p, c in zip(prompts, completions)]
    return reward


@pytest.mark.parametrize("name", ["nash_md", "xpo"])
def test_skip_all_dropped_micro_batch_neither_scales_gradient_nor_logs_zero_loss(name,
                                                                                 tmp_path):
    """nonfinite_scores='skip', 2 micro-batches per step, the second with every prompt dropped:
    the update equals the one from the first micro-batch alone (accumulation 1, the same
    prompts: SGD at lr 1 makes the update the gradient), and the logged loss and loss/* are the
    first micro-batch's, not averaged with zeros. completions.jsonl stays strict JSON (null, not
    NaN)."""
    from nashkern.rl.callbacks import LogCompletionsCallback

    kw = dict(optim="sgd", learning_rate=1.0, max_grad_norm=0.0, lr_scheduler_type="constant",
              nonfinite_scores="skip", top_k=1, per_device_train_batch_size=2)
    drop = ["what is one plus one?", "count: 1 2 3"]

    class InOrder(TRAINERS[name][0]):
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    def run(prompts, accumulation, out):
        Trainer, Config = TRAINERS[name]
        tr = InOrder(model=tiny_causal_lm(tie_word_embeddings=False),
                     ref_model=tiny_causal_lm(seed=1, tie_word_embeddings=False),
                     args=_args(Config, out, gradient_accumulation_steps=accumulation, **kw),
                     processing_class=make_tokenizer(), reward_funcs=_nan_for(drop),
                     train_dataset=Dataset.from_dict({"prompt": prompts}))
        tr.add_callback(LogCompletionsCallback(tr))
        before = {k: v.detach().clone() for k, v in tr.model.named_parameters()}
        tr.train()
        update = {k: v.detach() - before[k] for k, v in tr.model.named_parameters()}
        return tr, update

    ref_tr, ref_update = run(PROMPTS[:2], 1, tmp_path / "one")
    tr, update = run(PROMPTS[:2] + drop, 2, tmp_path / "two")
    assert any(float(u.abs().max()) > 0 for u in ref_update.values())
    for k in ref_update:
        torch.testing.assert_close(update[k], ref_update[k], rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{k}: {m}")
    log = [h for h in tr.state.log_history if "scores/nonfinite_count" in h][0]
    ref_log = [h for h in ref_tr.state.log_history if "loss" in h and "step" in h][0]
    assert log["scores/nonfinite_count"] == pytest.approx(1.0)  # 2 dropped / 2 micro-batches
    for k in [k for k in ref_log if k.startswith("loss/")]:
        assert log[k] == pytest.approx(ref_log[k], rel=1e-4, abs=1e-6), k
    # the Trainer's own loss log (rounded to 4 digits by transformers): the first micro-batch's,
    # not its mean with the dropped one's 0 (half of it)
    assert abs(ref_log["loss"]) > 1e-2, ref_log
    assert log["loss"] == pytest.approx(ref_log["loss"], rel=1e-4, abs=2e-4)
    assert tr.state.log_history[-1]["train_loss"] == pytest.approx(ref_log["loss"], rel=1e-3)
    lines = (tmp_path / "two" / "completions.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
            for line in lines]
    assert rows and any(r.get("policy_score", r.get("chosen_score", 0)) is None
                        or None in r.values() for r in rows), rows


@pytest.mark.parametrize("name", list(TRAINERS))
def test_sampling_temperature_zero_is_refused_at_construction(name, tmp_path):
    with pytest.raises(ValueError, match=r"temperature must be a finite float > 0, got 0\.0.*"
                                         r"generation_kwargs=\{'temperature': 0\.0\}"):
        _trainer(name, tmp_path, generation_kwargs={"temperature": 0.0})
    # greedy decoding ignores the temperature: allowed
    _trainer(name, tmp_path, generation_kwargs={"temperature": 0.0, "do_sample": False})


def test_tabular_rejects_bool_tau_and_non_integer_steps():
    from nashkern import tabular as tb

    P = torch.tensor([[0.5, 0.7], [0.3, 0.5]], dtype=torch.float64)
    mu = torch.tensor([0.5, 0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match="tau must be a finite number >= 0, got True"):
        tb.PreferenceGame(P, mu, True)
    game = tb.PreferenceGame(P, mu, 0.1)
    for steps in (2.5, 3.0, True, "3"):
        with pytest.raises(ValueError, match=f"steps must be an int >= 0, got {steps!r}"):
            tb.nash_md(game, 0.5, steps)
    assert tb.nash_md(game, 0.5, 3).shape == (4, 2)


def test_demo_steps_zero_takes_no_step(tmp_path, capsys):
    from nashkern.apps.cli import main

    assert main(["demo", "--steps", "0", "--output-dir", str(tmp_path)]) == 0
    assert "--steps 0: no training step taken" in capsys.readouterr().out
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("argv, message", [
    (["ops-demo", "--vocab", "0"], "argument --vocab: must be an int >= 1, got 0"),
    (["ops-demo", "--tokens", "0"], "argument --tokens: must be an int >= 1, got 0"),
    (["nash-demo", "--beta", "0"], "argument --beta: must be a finite number > 0, got 0"),
    (["demo", "--steps", "-1"], "argument --steps: must be an int >= 0, got -1"),
])
def test_cli_argument_messages(argv, message, capsys):
    from nashkern.apps.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_geometric_mixture_wrapper_end_point_with_masked_reference():
    """mixture_coef=0 with a -inf reference logit: the policy's log-probs (0·(-inf) was NaN);
    coef=1 with a -inf policy logit: the reference's."""
    from nashkern.rl.mixture_wrapper import mixture_log_softmax

    z, r = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    r_masked, z_masked = r.clone(), z.clone()
    r_masked[..., 4] = float("-inf")
    z_masked[..., 7] = float("-inf")
    torch.testing.assert_close(mixture_log_softmax(z, r_masked, 0.0), z.log_softmax(-1))
    torch.testing.assert_close(mixture_log_softmax(z_masked, r, 1.0), r.log_softmax(-1))
    model, ref = tiny_causal_lm(seed=0), tiny_causal_lm(seed=1)
    ref.lm_head = torch.nn.Linear(32, model.config.vocab_size, bias=True)
    with torch.no_grad():
        ref.lm_head.weight.copy_(model.lm_head.weight)
        ref.lm_head.bias.fill_(0.0)
        ref.lm_head.bias[5] = float("-inf")
    wrapper = GeometricMixtureWrapper(model, ref, model.generation_config, mixture_coef=0.0)
    ids = torch.randint(5, 40, (2, 6))
    out = wrapper(input_ids=ids).logits
    with torch.no_grad():
        want = model(input_ids=ids).logits.float().log_softmax(-1)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.float(), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# 5. the KV-cache argument of the installed transformers
# ------------------------------------------------------------------------------------------------
def test_cache_argument_follows_the_forward_signature(caplog):
    """The sampler passes the KV cache under the name the model's forward declares: ``cache``
    where it names it (transformers >= the rename; ``past_key_values`` is deprecated there),
    else ``past_key_values``; and the installed transformers' Qwen2 gets the one it declares
    (no deprecation warning from generation)."""
    import inspect

    from nashkern.rl.generation import SamplingParams, cache_argument, generate

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, **kw):
            raise AssertionError

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kw):
            raise AssertionError

    class Neither(torch.nn.Module):
        def forward(self, **kw):
            raise AssertionError

    assert cache_argument(New()) == "cache"
    assert cache_argument(Old()) == "past_key_values"
    assert cache_argument(Neither()) == "past_key_values"
    model = tiny_causal_lm()
    params = inspect.signature(model.forward).parameters
    expected = "cache" if "cache" in params else "past_key_values"
    assert cache_argument(model) == expected

    class Recording(torch.nn.Module):  # what the sampler passes, then the real model
        def __init__(self, m):
            super().__init__()
            self.m, self.keys = m, []

        def forward(self, input_ids=None, **kw):
            self.keys.append(sorted(k for k in kw if k in ("cache", "past_key_values")))
            return self.m(input_ids=input_ids, **kw)

    rec = Recording(model)
    rec.forward.__func__.__signature__ = inspect.signature(model.forward)
    ids = torch.randint(5, 40, (2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = generate(rec, ids, torch.ones_like(ids), eos_token_id=1, pad_token_id=0,
                       params=SamplingParams(max_new_tokens=4),
                       generator=torch.Generator().manual_seed(0))
    assert rec.keys and all(k == [expected] for k in rec.keys)
    assert "deprecated" not in caplog.text, caplog.text
    plain = generate(model, ids, torch.ones_like(ids), eos_token_id=1, pad_token_id=0,
                     params=SamplingParams(max_new_tokens=4),
                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.completion_ids, plain.completion_ids)
