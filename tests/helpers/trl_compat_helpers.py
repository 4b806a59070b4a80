"""Shared set-up of the TRL 1.13 drop-in tests (``test_trl_compat_*.py``): local stand-ins for
the hub checkpoints and data sets TRL's own tests use, TRL 1.13's test cases as data, and the
scenarios a TRL 1.13 user's script exercises, each run against one trainer.

Everything is built locally (no hub):
* ``qwen``: a tiny Qwen2 causal LM + the character tokenizer (pad token set), saved to a
  directory (TRL's ``trl-internal-testing/tiny-Qwen2ForCausalLM-2.5``);
* ``llama``: a tiny Llama causal LM with a *different* tokenizer (another vocabulary order,
  ``<s>`` / ``</s>``, another chat template, **no pad token**; its config has no
  ``pad_token_id``), TRL's ``trl-internal-testing/tiny-LlamaForCausalLM-3.2``;
* ``remote``: a checkpoint whose classes live in Python files next to its config
  (``auto_map``), loadable only with ``trust_remote_code=True``;
* :func:`zen`: a ``DatasetDict`` (train / test) of prompt-only rows, standard or conversational
  (TRL's ``trl-internal-testing/zen``).
"""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from datasets import Dataset, DatasetDict

from nashkern.apps.tiny import CHARS, make_tokenizer, tiny_qwen2_config

#: TRL 1.13 itself refuses its default bf16=True on a machine without a bf16 accelerator unless
#: ``use_cpu=True`` (verified with trl 1.13.0 on this CPU): the one argument TRL's own tests
#: need here beyond the import switch and the local checkpoints.
CPU = {} if torch.cuda.is_available() else {"use_cpu": True}

ZEN = ["beautiful is better than", "explicit is better than", "simple is better than",
       "flat is better than", "readability", "errors should never", "in the face of",
       "now is better than"]


def zen(config_name: str) -> DatasetDict:
    """``load_dataset("trl-internal-testing/zen", config_name)`` stand-in: train 6 / test 2."""
    if config_name == "standard_prompt_only":
        rows = [{"prompt": p} for p in ZEN]
    elif config_name == "conversational_prompt_only":
        rows = [{"prompt": [{"role": "user", "content": p}]} for p in ZEN]
    else:
        raise ValueError(config_name)
    return DatasetDict({"train": Dataset.from_list(rows[:6]), "test": Dataset.from_list(rows[6:])})


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------
LLAMA_SPECIAL = ["<s>", "</s>", "<unk>"]
LLAMA_TEMPLATE = ("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n"
                  "{% endfor %}{% if add_generation_prompt %}ASSISTANT: {% endif %}")


def llama_tokenizer():
    """A character tokenizer unlike :func:`make_tokenizer`'s: reversed vocabulary, ``<s>`` /
    ``</s>`` (eos id 1), its own chat template, and no pad token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(LLAMA_SPECIAL + list(reversed(CHARS + "ABCDEFGHIJKLMNOPQRSTUVWXYZ_|<>")))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(LLAMA_SPECIAL)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left")
    fast.chat_template = LLAMA_TEMPLATE
    return fast


def tiny_llama_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, tie_word_embeddings=False,
                       bos_token_id=0, eos_token_id=1, pad_token_id=None)


REMOTE_MODELING = '''from transformers import (AutoModel, Qwen2Config, Qwen2ForCausalLM,
                          Qwen2ForSequenceClassification, Qwen2Model)


class TinyRemoteConfig(Qwen2Config):
    model_type = "tiny_remote"


class TinyRemoteModel(Qwen2Model):
    config_class = TinyRemoteConfig


class TinyRemoteForCausalLM(Qwen2ForCausalLM):
    config_class = TinyRemoteConfig


class TinyRemoteForSequenceClassification(Qwen2ForSequenceClassification):
    config_class = TinyRemoteConfig


AutoModel.register(TinyRemoteConfig, TinyRemoteModel, exist_ok=True)  # the classifier's body
'''


def _save_remote(path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    AutoModelForCausalLM.from_config(tiny_qwen2_config()).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    with open(os.path.join(path, "modeling_tiny_remote.py"), "w") as f:
        f.write(REMOTE_MODELING)
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(model_type="tiny_remote", architectures=["TinyRemoteForCausalLM"], auto_map={
        "AutoConfig": "modeling_tiny_remote.TinyRemoteConfig",
        "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM",
        "AutoModelForSequenceClassification":
            "modeling_tiny_remote.TinyRemoteForSequenceClassification"})
    json.dump(cfg, open(cfg_path, "w"))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """``{"qwen": path, "llama": path, "remote": path}`` (built once per session)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("trl_compat_ckpt")
    paths = {k: str(root / k) for k in ("qwen", "llama", "remote")}
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_qwen2_config()).save_pretrained(paths["qwen"])
    make_tokenizer().save_pretrained(paths["qwen"])
    tok = llama_tokenizer()
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(tiny_llama_config(len(tok))).save_pretrained(paths["llama"])
    tok.save_pretrained(paths["llama"])
    _save_remote(paths["remote"])
    return paths


def vowels(prompts, completions, completion_ids=None, **kwargs):
    """A rule reward in TRL 1.13's reward-function signature."""
    return [float(sum(ch in "aeiou" for ch in (c if isinstance(c, str) else c[0]["content"])))
            for c in completions]


# ------------------------------------------------------------------------------------------------
# TRL 1.13's own trainer tests, as data: (config kwargs, trainer kwargs by role, dataset config)
# ------------------------------------------------------------------------------------------------
TRAIN = dict(per_device_train_batch_size=2, max_steps=3, report_to="none")
#: TRL's ``test_training_pre_pefted_model_implicit_ref*`` (Nash-MD and XPO) train with this.
PRE_PEFTED_TRAIN = dict(per_device_train_batch_size=1, max_steps=2, learning_rate=5.0e-7,
                        eval_strategy="no", report_to="none", remove_unused_columns=False)


def trl_case_objects(checkpoints, reward: str):
    """TRL's ``setup_method``: model, ref_model, reward model, tokenizers (pad = EOS, as the
    tests set it). ``reward``: ``"qwen"`` (Nash-MD / XPO tests) or ``"llama"`` (Online DPO)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    q = checkpoints["qwen"]
    objs = dict(model=AutoModelForCausalLM.from_pretrained(q, dtype="float32"),
                ref_model=AutoModelForCausalLM.from_pretrained(q),
                reward_model=AutoModelForSequenceClassification.from_pretrained(
                    checkpoints[reward], num_labels=1),
                tokenizer=AutoTokenizer.from_pretrained(q),
                reward_tokenizer=AutoTokenizer.from_pretrained(checkpoints[reward]),
                model_path=q)
    for k in ("tokenizer", "reward_tokenizer"):
        objs[k].pad_token = objs[k].eos_token
    return objs


def lora(r=16, alpha=32, dropout=0.05):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                      task_type="CAUSAL_LM")


def run_trl_case(Trainer, Config, tmp_path, objs, *, config, roles, data="standard_prompt_only",
                 eval_split=False, peft=None, pre_peft=None):
    """One TRL 1.13 test body: build the config and the trainer from TRL's argument names,
    ``trainer.train()``, and TRL's assertion (``train_loss`` in the last log)."""
    from peft import get_peft_model

    args = Config(output_dir=str(tmp_path), **config, **CPU)
    ds = zen(data)
    kw = {name: objs[role] for name, role in roles.items()}
    if pre_peft is not None:
        kw["model"] = get_peft_model(objs["model"], pre_peft)
    if peft is not None:
        kw["peft_config"] = peft
    if eval_split:
        kw["eval_dataset"] = ds["test"]
    trainer = Trainer(args=args, processing_class=objs["tokenizer"], train_dataset=ds["train"],
                      **kw)
    trainer.train()
    assert "train_loss" in trainer.state.log_history[-1]
    return trainer


# ------------------------------------------------------------------------------------------------
# scenarios of a TRL 1.13 user's script, run against one trainer
# ------------------------------------------------------------------------------------------------
def quick_args(Config, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1,
                max_new_tokens=4, report_to="none", save_strategy="no", disable_tqdm=True,
                logging_steps=1, **CPU)
    base.update(kw)
    return Config(**base)


def positional_call(Trainer, Config, tmp_path, checkpoints, has_rpc_positional: bool):
    """TRL's positional order: (model, ref_model, reward_funcs, args, data_collator,
    train_dataset, eval_dataset, processing_class, [reward_processing_classes,] peft_config)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoints["qwen"])
    rm = AutoModelForSequenceClassification.from_pretrained(checkpoints["qwen"], num_labels=1)
    ds = zen("standard_prompt_only")
    args = quick_args(Config, tmp_path)
    middle = (tok,) if has_rpc_positional else ()
    tr = Trainer(AutoModelForCausalLM.from_pretrained(checkpoints["qwen"]), None, rm, args, None,
                 ds["train"], ds, tok, *middle, lora(r=4, alpha=8, dropout=0.0))
    assert tr.reward_model is rm and tr.is_peft and tr.ref_model is None
    assert tr.eval_dataset is ds
    tr.train()
    return tr


def reward_model_by_path_without_pad(Trainer, Config, tmp_path, checkpoints, data: str):
    """A Qwen policy and a Llama reward model given by its path (its tokenizer, loaded from the
    path, has no pad token and its config no pad_token_id): scores come from the Llama model on
    its own tokenization of the text; conversational prompts are rendered by its chat
    template; an eval DatasetDict is accepted."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoints["qwen"])
    ds = zen(data)
    tr = Trainer(model=AutoModelForCausalLM.from_pretrained(checkpoints["qwen"]),
                 reward_funcs=checkpoints["llama"], args=quick_args(Config, tmp_path),
                 train_dataset=ds["train"], eval_dataset=ds, processing_class=tok)
    rtok = tr.reward_processing_class
    assert type(tr.reward_model).__name__ == "LlamaForSequenceClassification"
    assert rtok is not None and rtok.pad_token == "</s>"
    assert tr.reward_model.config.pad_token_id == rtok.pad_token_id == 1
    seen = []
    original = rtok.__class__.__call__

    def spy(self, *a, **k):
        if self is rtok:
            seen.extend(k.get("text", a[0] if a else []))
        return original(self, *a, **k)

    rtok.__class__.__call__ = spy
    try:
        tr.train()
    finally:
        rtok.__class__.__call__ = original
    assert seen, "the reward tokenizer was never used"
    if data == "conversational_prompt_only":
        assert all(t.startswith("USER: ") and "\nASSISTANT: " in t for t in seen), seen[:3]
    assert any("rewards" in k or "scores" in k for k in tr.state.log_history[0])
    return tr


def llama_policy_with_qwen_reward(Trainer, Config, tmp_path, checkpoints):
    """A Llama-style policy whose tokenizer (no pad token) differs from the reward model's;
    reward model object + reward_processing_classes; pad token set from EOS."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    ptok = AutoTokenizer.from_pretrained(checkpoints["llama"])
    assert ptok.pad_token is None
    rm = AutoModelForSequenceClassification.from_pretrained(checkpoints["qwen"], num_labels=1)
    rtok = AutoTokenizer.from_pretrained(checkpoints["qwen"])
    ds = zen("conversational_prompt_only")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = Trainer(model=AutoModelForCausalLM.from_pretrained(checkpoints["llama"]),
                     reward_funcs=rm, args=quick_args(Config, tmp_path),
                     train_dataset=ds["train"], processing_class=ptok,
                     reward_processing_classes=rtok)
    assert ptok.pad_token == ptok.eos_token
    assert tr.reward_processing_class is rtok and tr.reward_model is rm
    tr.train()
    return tr


def mixed_reward_funcs(Trainer, Config, tmp_path, checkpoints):
    """A reward model and a callable in one list, weighted: the model becomes a reward function
    scored on its own tokenization; ``trainer.reward_weights`` is TRL's tensor."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from nashkern.rl.scoring import ModelRewardFunc

    tok = AutoTokenizer.from_pretrained(checkpoints["qwen"])
    rm = AutoModelForSequenceClassification.from_pretrained(checkpoints["llama"], num_labels=1)
    ds = zen("standard_prompt_only")
    tr = Trainer(model=AutoModelForCausalLM.from_pretrained(checkpoints["qwen"]),
                 reward_funcs=[rm, vowels],
                 args=quick_args(Config, tmp_path, reward_weights=[0.5, 2.0]),
                 train_dataset=ds["train"], processing_class=tok,
                 reward_processing_classes=[AutoTokenizer.from_pretrained(checkpoints["llama"]),
                                            None])
    assert tr.reward_model is None and isinstance(tr.reward_funcs[0], ModelRewardFunc)
    assert tr.reward_funcs[1] is vowels
    torch.testing.assert_close(tr.reward_weights, torch.tensor([0.5, 2.0]))
    # the model's entry is scored with its own (Llama) tokenizer, pad token set from EOS
    assert tr.reward_funcs[0].tokenizer.pad_token == "</s>" and rm.config.pad_token_id == 1
    texts, comps = ["simple is", "flat is"], [" ok", " fine"]
    expected = 0.5 * torch.tensor(tr.reward_funcs[0](texts, comps)) + 2.0 * torch.tensor(
        vowels(texts, comps))
    from nashkern.rl.scoring import reward_funcs_scores
    got = reward_funcs_scores(tr.reward_funcs, texts, comps, [[0], [0]], weights=[0.5, 2.0])
    torch.testing.assert_close(got, expected)
    tr.train()
    return tr


def reward_model_given_twice(Trainer, Config, tmp_path, checkpoints):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoints["qwen"])
    rm = AutoModelForSequenceClassification.from_pretrained(checkpoints["qwen"], num_labels=1)
    with pytest.raises(ValueError, match="given twice"):
        Trainer(model=AutoModelForCausalLM.from_pretrained(checkpoints["qwen"]),
                reward_funcs=rm, reward_model=rm, args=quick_args(Config, tmp_path),
                train_dataset=zen("standard_prompt_only")["train"], processing_class=tok)
    with pytest.raises(ValueError, match="reward_processing_classes"):
        Trainer(model=AutoModelForCausalLM.from_pretrained(checkpoints["qwen"]),
                reward_funcs=rm, args=quick_args(Config, tmp_path), processing_class=tok,
                train_dataset=zen("standard_prompt_only")["train"],
                reward_processing_classes=tok, reward_processing_class=tok)


def remote_code(Trainer, Config, tmp_path, checkpoints):
    """A checkpoint with its own modeling code: refused unless trust_remote_code=True, then
    the policy and the reward model (a path in reward_funcs) load through it."""
    from transformers import AutoTokenizer

    path = checkpoints["remote"]
    tok = AutoTokenizer.from_pretrained(path)
    ds = zen("standard_prompt_only")
    with pytest.raises(ValueError, match="trust_remote_code"):
        Trainer(model=path, reward_funcs=vowels, args=quick_args(Config, tmp_path),
                train_dataset=ds["train"], processing_class=tok)
    tr = Trainer(model=path, reward_funcs=path,
                 args=quick_args(Config, tmp_path, trust_remote_code=True,
                                 model_init_kwargs={"dtype": "float32"}),
                 train_dataset=ds["train"], processing_class=tok)
    assert type(tr.model).__name__ == "TinyRemoteForCausalLM"
    assert type(tr.reward_model).__name__ == "TinyRemoteForSequenceClassification"
    assert tr.model.dtype == torch.float32
    tr.train()
    return tr


def config_defaults(Config, tmp_path, schedules):
    """TRL 1.13's defaults and scalar schedules; use_vllm rejected at the trainer only."""
    cfg = Config(output_dir=str(tmp_path), **CPU)
    assert cfg.bf16 is True and cfg.fp16 is False
    assert cfg.gradient_checkpointing is True
    assert getattr(cfg, "activation_checkpointing", True) is True  # transformers >= 5.23 only
    assert cfg.learning_rate == 5e-7 and cfg.logging_steps == 10
    assert cfg.remove_unused_columns is False
    assert (cfg.top_p, cfg.top_k, cfg.min_p, cfg.repetition_penalty) == (1.0, 0, None, 1.0)
    assert cfg.max_new_tokens == 64 and cfg.max_length == 512 and cfg.temperature == 0.9
    assert cfg.cache_implementation is None and cfg.generation_kwargs is None
    assert cfg.trust_remote_code is False and cfg.ds3_gather_for_generation is True
    assert (cfg.use_vllm, cfg.vllm_mode, cfg.vllm_server_host, cfg.vllm_server_port,
            cfg.vllm_server_timeout, cfg.vllm_gpu_memory_utilization,
            cfg.vllm_tensor_parallel_size) == (False, "colocate", "0.0.0.0", 8000, 240.0, 0.55, 1)
    for name, default in schedules.items():
        value = getattr(cfg, name)
        assert isinstance(value, float) and value == default, (name, value)
        value = getattr(Config(output_dir=str(tmp_path), **{name: 0.25}, **CPU), name)
        assert isinstance(value, float) and value == 0.25
        assert getattr(Config(output_dir=str(tmp_path), **{name: [0.25, 0.5]}, **CPU),
                       name) == [0.25, 0.5]
    with pytest.warns(UserWarning, match="max_new_tokens"):
        Config(output_dir=str(tmp_path), max_new_tokens=16, max_length=16, **CPU)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="bf16"):
            Config(output_dir=str(tmp_path))  # as TRL 1.13 on a machine without bf16
    assert Config(output_dir=str(tmp_path), use_vllm=True, vllm_mode="server", **CPU).use_vllm


def long_completions_and_model_init_kwargs(Trainer, Config, tmp_path):
    """max_new_tokens >= max_length warns (as TRL) and trains, prompts cut to their last token;
    model_init_kwargs with an instantiated model is an error (as TRL)."""
    from nashkern.apps.tiny import tiny_causal_lm

    with pytest.warns(UserWarning, match="max_new_tokens"):
        args = quick_args(Config, tmp_path, max_new_tokens=5, max_length=5)
    tr = Trainer(model=tiny_causal_lm(), reward_funcs=vowels, args=args,
                 train_dataset=zen("standard_prompt_only")["train"],
                 processing_class=make_tokenizer())
    tr.train()
    assert "train_loss" in tr.state.log_history[-1]
    with pytest.raises(ValueError, match="model_init_kwargs"):
        Trainer(model=tiny_causal_lm(), reward_funcs=vowels,
                args=quick_args(Config, tmp_path, model_init_kwargs={"dtype": "float32"}),
                train_dataset=zen("standard_prompt_only")["train"],
                processing_class=make_tokenizer())


def use_vllm_rejected(Trainer, Config, tmp_path):
    from nashkern.apps.tiny import tiny_causal_lm

    with pytest.raises(ValueError, match="use_vllm=True is not supported.*logits"):
        Trainer(model=tiny_causal_lm(), reward_funcs=vowels,
                args=quick_args(Config, tmp_path, use_vllm=True, vllm_mode="colocate"),
                train_dataset=zen("standard_prompt_only")["train"],
                processing_class=make_tokenizer())


def sampling_knobs_reach_generation(Trainer, Config, tmp_path, module, n_calls: int):
    """generation_kwargs / top_p / top_k / min_p / repetition_penalty / cache_implementation
    from the config reach every sample of a step (policy and mixture / reference samples
    alike, drawn by one :func:`generate_pair` loop), through ``trainer.generation_config``;
    ``n_calls``: the kinds of samples (a second policy sample counts with the first)."""
    from nashkern.apps.tiny import tiny_causal_lm

    args = quick_args(Config, tmp_path, top_p=0.9, top_k=7, min_p=0.05, repetition_penalty=1.3,
                      temperature=0.7, cache_implementation="static",
                      generation_kwargs={"top_k": 5, "num_beams": 1})
    tr = Trainer(model=tiny_causal_lm(), reward_funcs=vowels, args=args,
                 train_dataset=zen("standard_prompt_only")["train"],
                 processing_class=make_tokenizer())
    g = tr.generation_config
    assert (g.top_p, g.top_k, g.min_p, g.repetition_penalty, g.temperature, g.max_new_tokens,
            g.do_sample, g.cache_implementation) == (0.9, 5, 0.05, 1.3, 0.7, 4, True, "static")
    calls = []
    real = module.generate_pair

    def spy(*a, **k):  # one loop, two samples: the policy's, then the mixture / reference's
        calls.append((k["params"], k.get("cache_implementation"), 0.0))
        if k.get("ref_model") is not None and k.get("coef", 0.0) > 0:
            calls.append((k["params"], k.get("cache_implementation"), k["coef"]))
        return real(*a, **k)

    module.generate_pair = spy
    try:
        tr.train()
    finally:
        module.generate_pair = real
    assert len(calls) == n_calls
    for params, cache, _ in calls:
        assert (params.top_p, params.top_k, params.min_p, params.repetition_penalty,
                params.temperature, params.do_sample, cache) == (0.9, 5, 0.05, 1.3, 0.7, True,
                                                                  "static")
    with pytest.raises(ValueError, match="num_beams"):
        Trainer(model=tiny_causal_lm(), reward_funcs=vowels,
                args=quick_args(Config, tmp_path, generation_kwargs={"num_beams": 4}),
                train_dataset=zen("standard_prompt_only")["train"],
                processing_class=make_tokenizer())
    return calls


def scenario_tests(Trainer, Config, *, rpc_positional: bool, schedules, module, n_calls: int):
    """The scenario tests of one trainer, as ``test_*`` functions for a test module's globals
    (``globals().update(scenario_tests(...))``)."""
    def test_positional_order(tmp_path, checkpoints):  # noqa: F811
        positional_call(Trainer, Config, tmp_path, checkpoints, has_rpc_positional=rpc_positional)

    @pytest.mark.parametrize("data", ["standard_prompt_only", "conversational_prompt_only"])
    def test_reward_model_path_without_pad_token(tmp_path, checkpoints, data):  # noqa: F811
        reward_model_by_path_without_pad(Trainer, Config, tmp_path, checkpoints, data)

    def test_llama_policy_and_reward_tokenizer_that_differs(tmp_path, checkpoints):  # noqa: F811
        llama_policy_with_qwen_reward(Trainer, Config, tmp_path, checkpoints)

    def test_reward_model_and_callable_in_reward_funcs(tmp_path, checkpoints):  # noqa: F811
        mixed_reward_funcs(Trainer, Config, tmp_path, checkpoints)

    def test_reward_model_given_twice_is_an_error(tmp_path, checkpoints):  # noqa: F811
        reward_model_given_twice(Trainer, Config, tmp_path, checkpoints)

    def test_trust_remote_code(tmp_path, checkpoints):  # noqa: F811
        remote_code(Trainer, Config, tmp_path, checkpoints)

    def test_config_defaults(tmp_path):
        config_defaults(Config, tmp_path, schedules)

    def test_use_vllm_is_a_clear_error(tmp_path):
        use_vllm_rejected(Trainer, Config, tmp_path)

    def test_max_new_tokens_over_max_length_and_model_init_kwargs(tmp_path):
        long_completions_and_model_init_kwargs(Trainer, Config, tmp_path)

    def test_sampling_knobs_reach_every_generate_call(tmp_path):
        calls = sampling_knobs_reach_generation(Trainer, Config, tmp_path, module, n_calls)
        # Nash-MD: policy then mixture (c = 0.5) samples; XPO: policy then reference (c = 1)
        expected = {1: [0.0], 2: [0.0, 0.5 if "mixture_coef" in schedules else 1.0]}[n_calls]
        assert [c for _, _, c in calls] == expected

    return {name: f for name, f in locals().items() if name.startswith("test_")}
