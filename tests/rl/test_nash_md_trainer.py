import json
import sys

import pytest
import torch
from datasets import Dataset

from nashkern.apps.tiny import CHARS
from online_helpers import (PROMPTS, lora_trainer, save_tiny_model_dirs, train_only_the_adapters,
                            train_updating_the_policy_only, train_with_reward_model_tokenizers)
from tiny_models import make_tokenizer, single_thread, tiny_causal_lm, tiny_reward_model  # noqa: F401


def vowel_reward(prompts, completions, completion_ids=None, **kw):
    out = []
    for c in completions:
        text = c if isinstance(c, str) else c[0]["content"]
        out.append(sum(ch in "aeiou" for ch in text) / max(len(text), 1))
    return out


def make_args(tmp_path, **kw):
    from nashkern import NashMDConfig

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=2,
                max_new_tokens=6, learning_rate=1e-3, logging_steps=1, report_to="none",
                save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, bf16=False)
    base.update(kw)
    return NashMDConfig(**base)


def trainer_for(tmp_path, model=None, tok=None, dataset=None, **kw):
    from nashkern import NashMDTrainer

    tok = tok or make_tokenizer()
    args = kw.pop("args", None) or make_args(tmp_path)
    scorer = {k: kw.pop(k) for k in ("reward_model", "judge", "reward_funcs") if k in kw}
    if not scorer:
        scorer = {"reward_funcs": vowel_reward}
    return NashMDTrainer(model=model or tiny_causal_lm(), args=args, processing_class=tok,
                         train_dataset=dataset if dataset is not None else Dataset.from_dict({"prompt": PROMPTS}),
                         **scorer, **kw)


METRICS = {"loss/kl", "objective/entropy", "loss/score", "rewards/probabilities",
           "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
           "val/model_contain_eos_token", "val/ref_contain_eos_token", "beta", "mixture_coef"}


def test_import_is_light():
    import subprocess
    code = "import nashkern, sys; assert 'transformers' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_train_with_reward_funcs_logs_metrics_and_updates_policy_only(tmp_path):
    tr = trainer_for(tmp_path)
    logs = train_updating_the_policy_only(tr, "loss/kl",
                                          METRICS | {"rewards/chosen", "rewards/rejected"})
    assert logs[0]["beta"] == 0.1 and logs[0]["mixture_coef"] == 0.5
    # per-phase wall time of every step (seconds), and they fit inside the step
    phases = [f"time/{p}" for p in ("generation", "scoring", "statistics", "backward",
                                     "optimizer")]
    for h in logs:
        assert all(h[k] > 0 for k in phases), h
    total = sum(h["train_runtime"] for h in tr.state.log_history if "train_runtime" in h)
    assert sum(h[k] for h in logs for k in phases) <= total


def test_reward_model_same_and_different_tokenizer(tmp_path):
    same, _ = train_with_reward_model_tokenizers(trainer_for, tmp_path)
    assert "rewards/chosen" in same.state.log_history[0]


def test_judge_and_conversational_prompts_and_per_epoch_schedule(tmp_path):
    from nashkern.rl.judges import BasePairwiseJudge

    class LongerJudge(BasePairwiseJudge):
        def judge(self, prompts, completions, shuffle_order=True):
            assert all(p.endswith("<|assistant|>") for p in prompts)  # chat template applied
            return [0 if len(a) >= len(b) else 1 for a, b in completions]

    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS]})
    args = make_args(tmp_path, max_steps=-1, num_train_epochs=3, per_device_train_batch_size=6,
                     beta=[0.1, 0.2], mixture_coef=[0.0, 1.0], kl_estimator="full")
    tr = trainer_for(tmp_path, dataset=ds, judge=LongerJudge(), args=args)
    tr.train()
    logs = [h for h in tr.state.log_history if "beta" in h]
    assert [h["beta"] for h in logs] == [0.1, 0.2, 0.2]
    assert [h["mixture_coef"] for h in logs] == [0.0, 1.0, 1.0]
    assert "rewards/chosen" not in logs[0]
    p = logs[0]["rewards/probabilities"] * 6  # a judge without probabilities: P ∈ {0, 1}
    assert abs(p - round(p)) < 1e-5
    assert logs[0]["loss/kl"] == 0  # exact KL (kl_estimator="full") at step 0: policy == ref


def test_bad_input(tmp_path):
    from nashkern import NashMDConfig
    from nashkern.rl.judges import RandomPairwiseJudge

    with pytest.raises(ValueError, match="exactly one"):
        trainer_for(tmp_path, reward_funcs=vowel_reward, judge=RandomPairwiseJudge())
    with pytest.raises(ValueError, match="exactly one"):
        trainer_for(tmp_path, reward_funcs=[])
    with pytest.raises(ValueError, match="'prompt' column"):
        trainer_for(tmp_path, dataset=Dataset.from_dict({"text": ["a"]}))
    with pytest.raises(ValueError, match="empty"):
        trainer_for(tmp_path, dataset=Dataset.from_dict({"prompt": []}))
    with pytest.raises(ValueError, match="beta"):
        NashMDConfig(output_dir=str(tmp_path), beta=-0.1)
    with pytest.raises(ValueError, match="mixture_coef"):
        NashMDConfig(output_dir=str(tmp_path), mixture_coef=[0.5, 1.5])
    with pytest.raises(ValueError, match="causal"):
        trainer_for(tmp_path, model=tiny_reward_model())
    tok = make_tokenizer(pad=False)
    with pytest.warns(UserWarning, match="pad token"):
        trainer_for(tmp_path, tok=tok)
    assert tok.pad_token == tok.eos_token


def test_pair_rm_judge_clear_error():
    from nashkern.rl.judges import PairRMJudge
    try:
        import llm_blender  # noqa: F401
        pytest.skip("llm-blender installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="pip install llm-blender"):
        PairRMJudge()


def test_model_from_path_and_completions_callback(tmp_path):
    from nashkern import LogCompletionsCallback

    path = tmp_path / "model"
    tiny_causal_lm().save_pretrained(path)  # safetensors
    make_tokenizer().save_pretrained(path)
    tr = trainer_for(tmp_path, model=str(path), tok=None)
    tr.add_callback(LogCompletionsCallback(tr, num_prompts=2))
    tr.train()
    rows = [json.loads(line) for line in open(tmp_path / "completions.jsonl")]
    assert len(rows) == 4 and {"prompt", "policy", "mixture", "probability"} <= set(rows[0])


def test_fused_logprobs_match_full_logits(tmp_path):
    from nashkern.rl.completion_stats import completion_stats

    model, ref = tiny_causal_lm(seed=0), tiny_causal_lm(seed=1)
    tok = make_tokenizer()
    enc = tok(["hello world", "ab cd ef"], return_tensors="pt", padding=True)
    ids, mask = enc.input_ids, enc.attention_mask.clone()
    mask[1, -2:] = 0  # padding at the end of a completion
    ctx = 4
    st = completion_stats(model, ids, mask, ctx, ref_model=ref)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    z = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, ctx - 1:-1]
    r = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, ctx - 1:-1]
    t = ids[:, ctx:]
    lp = z.log_softmax(-1).gather(-1, t[..., None])[..., 0] * mask[:, ctx:]
    rlp = r.log_softmax(-1).gather(-1, t[..., None])[..., 0] * mask[:, ctx:]
    torch.testing.assert_close(st.logprobs, lp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(st.ref_logprobs, rlp, rtol=1e-4, atol=1e-5)
    g1 = torch.autograd.grad(st.logprobs.sum(), model.model.embed_tokens.weight)[0]
    g2 = torch.autograd.grad(lp.sum(), model.model.embed_tokens.weight)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-5)


def test_softcap_and_fallback_warning():
    from nashkern.rl.completion_stats import completion_stats

    class Wrapped(torch.nn.Module):  # a model whose head cannot be separated
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, **kw):
            kw.pop("logits_to_keep", None)
            out = self.m(**kw)
            out.logits = out.logits * 2.0 + 1.0
            return out

        def get_output_embeddings(self):
            return self.m.get_output_embeddings()

    m = tiny_causal_lm()
    ids = torch.randint(5, 40, (2, 9))
    mask = torch.ones_like(ids)
    with pytest.raises(ValueError, match="allow_unfused_head=True"):  # no silent fallback
        completion_stats(Wrapped(m), ids, mask, 4, ref_model=m)
    with pytest.warns(RuntimeWarning, match="chunked logits"):  # the explicit opt-in
        st = completion_stats(Wrapped(m), ids, mask, 4, ref_model=m, allow_unfused=True)
    z = m(input_ids=ids).logits[:, 3:-1] * 2 + 1
    lp = z.log_softmax(-1).gather(-1, ids[:, 4:, None])[..., 0]
    torch.testing.assert_close(st.logprobs, lp, rtol=1e-4, atol=1e-5)
    # Gemma-2 style softcapping read from the config
    m2 = tiny_causal_lm(final_logit_softcapping=2.0)
    from nashkern.rl.completion_stats import output_head
    assert output_head(m2).softcap == 2.0


def test_peft_reference_is_base_with_adapters_disabled(tmp_path):
    from nashkern.rl.generation import SamplingParams, generate

    tr, model, base_copy = lora_trainer(trainer_for, tmp_path)
    ref, ctx = tr._ref(model)
    tok = make_tokenizer()
    enc = tok(PROMPTS[:3], return_tensors="pt", padding=True)
    kw = dict(params=SamplingParams(max_new_tokens=8), eos_token_id=1, pad_token_id=0)
    # coef = 1: the "mixture" is the reference alone = the base model without the LoRA adapters
    mix = generate(model, enc.input_ids, enc.attention_mask, ref_model=ref, coef=1.0,
                   ref_context=ctx, generator=torch.Generator().manual_seed(0), **kw)
    want = generate(base_copy, enc.input_ids, enc.attention_mask,
                    generator=torch.Generator().manual_seed(0), **kw)
    pol = generate(model, enc.input_ids, enc.attention_mask,
                   generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(mix.completion_ids, want.completion_ids)
    assert not torch.equal(pol.completion_ids, want.completion_ids)  # adapters do act
    train_only_the_adapters(tr, base_copy)


def test_train_cli_with_local_paths(tmp_path):
    from nashkern.apps.cli import main

    path, rm, data = save_tiny_model_dirs(tmp_path, PROMPTS)
    out = tmp_path / "out"
    rc = main(["train", "--model_name_or_path", str(path), "--reward_model_path", str(rm),
               "--dataset_name", str(data), "--output_dir", str(out), "--max_steps", "2",
               "--per_device_train_batch_size", "3", "--max_new_tokens", "4", "--beta", "0.1",
               "0.2", "--mixture_coef", "0.3", "--logging_steps", "1", "--report_to", "none",
               "--use_cpu", "--save_strategy", "no", "--warmup_ratio", "0.1",
               "--missing_eos_penalty", "1.0"])
    assert rc == 0
    assert (out / "model.safetensors").exists() and (out / "completions.jsonl").exists()


def test_demo_smoke(tmp_path, capsys):
    from nashkern.apps.cli import main

    assert main(["demo", "--steps", "3", "--batch-size", "4", "--max-new-tokens", "4",
                 "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reward(policy)" in out and (tmp_path / "completions.jsonl").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_ddp_two_processes(tmp_path):
    """`accelerate launch`, 2 CPU processes (gloo): parameters stay identical across ranks; a NaN
    score on one rank raises on both."""
    import os
    import socket
    import subprocess

    with socket.socket() as s:  # a free port, so parallel runs cannot collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # --multi_gpu selects accelerate's torch.distributed launcher; without CUDA the
    # processes come up as MULTI_CPU with the gloo backend.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(port), worker, str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads((tmp_path / "ddp.json").read_text())
    assert info["world"] == 2 and info["max_diff"] == 0.0
    assert info["n_logs"] == 3 and METRICS <= set(info["keys"])
    # a NaN score seen by one process only raises on both (checks.any_process), no hang
    assert "gave non-finite scores: row 0 = nan" in (tmp_path / "nan_rank1.txt").read_text()
    assert "non-finite scores on another process" in (tmp_path / "nan_rank0.txt").read_text()


def test_checkpoint_resume_continues_without_lost_or_repeated_steps(tmp_path):
    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2,
                     per_device_train_batch_size=2)
    tr = trainer_for(tmp_path, args=args)
    tr.train()
    full_steps = [h["step"] for h in tr.state.log_history if "loss/kl" in h]
    assert full_steps == [1, 2, 3, 4]
    args2 = make_args(tmp_path, max_steps=4, save_strategy="no", per_device_train_batch_size=2)
    tr2 = trainer_for(tmp_path, args=args2)
    tr2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    steps = [h["step"] for h in tr2.state.log_history if "loss/kl" in h]
    assert steps == [1, 2, 3, 4] and tr2.state.global_step == 4
    # The resumed steps draw the same completions (the sampler is keyed on the step, not on
    # how the process got there), so they log the same losses and end at the same weights.
    keys = ("loss", "loss/kl", "loss/score", "logps/chosen")
    full = {h["step"]: [h[k] for k in keys] for h in tr.state.log_history if "loss/kl" in h}
    resumed = {h["step"]: [h[k] for k in keys] for h in tr2.state.log_history if "loss/kl" in h}
    for step in (3, 4):
        assert resumed[step] == pytest.approx(full[step], rel=1e-4, abs=1e-6), step
    for p1, p2 in zip(tr.model.parameters(), tr2.model.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-6)


def _tiny_architecture(name):
    import transformers

    common = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64)
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2,
                                      n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    else:
        extra = {"gemma2": dict(final_logit_softcapping=2.0, head_dim=8),
                 "cohere": dict(logit_scale=0.5), "granite": dict(logits_scaling=4.0)}
        cls = {"qwen2": "Qwen2Config", "llama": "LlamaConfig", "gemma2": "Gemma2Config",
               "cohere": "CohereConfig", "granite": "GraniteConfig"}[name]
        cfg = getattr(transformers, cls)(**common, **extra.get(name, {}))
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).float()


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma2", "cohere", "granite", "gpt2"])
def test_completion_stats_reads_final_hidden_state_without_output_hidden_states(arch):
    """The final hidden state comes from a hook on the base model: after the first call
    (which checks it against hidden_states[-1]) the model is never asked for every layer's
    hidden states; the statistics equal log-softmax of the model's own logits."""
    from nashkern.rl.completion_stats import completion_stats

    model, ref = _tiny_architecture(arch), _tiny_architecture(arch)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    asked, forward = [], model.forward

    def spy(*a, **kw):  # the forward completion_stats calls (through the redirect)
        asked.append(bool(kw.get("output_hidden_states")))
        return forward(*a, **kw)

    model.forward = spy
    ids = torch.randint(3, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    ctx = 4
    completion_stats(model, ids, mask, ctx, ref_model=ref)
    st = completion_stats(model, ids, mask, ctx, ref_model=ref)
    assert asked == [True, False], asked  # only the first call checks against hidden_states
    assert model._nashkern_final_hidden_hook is True
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    z = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, ctx - 1:-1]
    lp = z.float().log_softmax(-1).gather(-1, ids[:, ctx:, None])[..., 0] * mask[:, ctx:]
    torch.testing.assert_close(st.logprobs, lp, rtol=1e-4, atol=1e-5)
    g1 = torch.autograd.grad(st.logprobs.sum(), model.get_input_embeddings().weight)[0]
    g2 = torch.autograd.grad(lp.sum(), model.get_input_embeddings().weight)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-5)
