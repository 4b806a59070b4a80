"""The fused decode (model bodies + ops.linear_mixture_sample, nashkern/rl/fused_decode.py)
gives the completions of the logits path for the same seed, never builds [rows, V], and the
logits path says once why it is used."""
import dataclasses
import logging

import pytest
import torch

from nashkern import ops, tuning
from nashkern.memory import AllocationRecorder
from nashkern.rl import fused_decode, generation
from nashkern.rl.generation import SamplingParams, generate, generate_pair
from tiny_models import make_tokenizer, single_thread, tiny_causal_lm  # noqa: F401

PROMPTS = ["hello there", "a", "what is two plus two?", "xyz"]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _models(**kw):
    """Policy / reference whose rows stop at different steps (EOS made likely)."""
    model, ref = tiny_causal_lm(seed=0, **kw), tiny_causal_lm(seed=1, **kw)
    eos = make_tokenizer().eos_token_id
    with torch.no_grad():
        for m in (model, ref):
            m.model.embed_tokens.weight[eos] *= 30.0
    return model, ref


@pytest.fixture
def counted(monkeypatch):
    """Counts the fused sampler's calls."""
    calls = []
    real = ops.linear_mixture_sample

    def wrapped(*a, **k):
        calls.append(a[0].shape[0])
        return real(*a, **k)
    monkeypatch.setattr(fused_decode.ops, "linear_mixture_sample", wrapped)
    return calls


def _logits_path(monkeypatch):
    monkeypatch.setattr(fused_decode, "fused_decode_reason", lambda params, device: "test")


@pytest.mark.parametrize("coef", [0.0, 0.5, 1.0])
def test_fused_generate_and_generate_pair_match_the_logits_path(tok, monkeypatch, counted, coef):
    model, ref = _models()
    enc = tok(PROMPTS * 2, return_tensors="pt", padding=True)
    kw = dict(params=SamplingParams(max_new_tokens=12, temperature=0.9),
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    def run():
        one = generate(model, enc.input_ids, enc.attention_mask, ref_model=ref, coef=coef,
                       generator=torch.Generator().manual_seed(3), **kw)
        pair = generate_pair(model, enc.input_ids, enc.attention_mask, ref_model=ref, coef=coef,
                             generator=torch.Generator().manual_seed(4),
                             second_generator=torch.Generator().manual_seed(5), **kw)
        joint = generate_pair(model, enc.input_ids, enc.attention_mask,
                              generator=torch.Generator().manual_seed(6), **kw)
        return [one, *pair, *joint]

    fused = run()
    assert len(counted) >= 12  # the fused sampler drew the tokens
    counted.clear()
    _logits_path(monkeypatch)
    want = run()
    assert not counted
    for got, w in zip(fused, want):
        assert torch.equal(got.completion_ids, w.completion_ids)
        assert torch.equal(got.completion_mask, w.completion_mask)
    assert any((o.completion_mask == 0).any() for o in fused)  # rows stopped at EOS


def test_fused_decode_never_builds_rows_x_vocab(tok, monkeypatch):
    monkeypatch.setattr(tuning, "TORCH", dataclasses.replace(
        tuning.TORCH, sample_chunk_elements=8192, sample_block=64))
    V = 20011
    model, ref = _models(vocab_size=V)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(params=SamplingParams(max_new_tokens=6), eos_token_id=-1,
              pad_token_id=tok.pad_token_id, ref_model=ref, coef=0.5)
    generate_pair(model, enc.input_ids, enc.attention_mask, **kw)  # separability checked once
    with AllocationRecorder() as rec:
        y, y2 = generate_pair(model, enc.input_ids, enc.attention_mask,
                              generator=torch.Generator().manual_seed(0), **kw)
    assert y2.completion_ids.shape == (len(PROMPTS), 6)
    B2 = 2 * len(PROMPTS)
    largest, op = rec.largest()
    # the tiles (8192 elements) and pass 2's gathered block rows [2B, block, D]
    assert largest <= max(8192, B2 * 64 * 32) < B2 * V // 4, f"{op} allocated {largest} elements (2B x V = {B2 * V})"
    # the logits path does build them: the recorder would see it
    _logits_path(monkeypatch)
    with AllocationRecorder() as rec:
        generate_pair(model, enc.input_ids, enc.attention_mask, **kw)
    assert rec.largest()[0] >= len(PROMPTS) * V


def test_logits_path_is_logged_once(tok, caplog, counted):
    model, ref = _models()
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    params = SamplingParams(max_new_tokens=3, top_k=5)
    fused_decode._LOGGED.discard(fused_decode.fused_decode_reason(params, torch.device("cpu")))
    with caplog.at_level(logging.WARNING, logger="nashkern.rl.fused_decode"):
        for _ in range(2):
            generate(model, enc.input_ids, enc.attention_mask, ref_model=ref, coef=0.5,
                     params=params, eos_token_id=-1, pad_token_id=tok.pad_token_id)
    said = [r for r in caplog.records if "logits processors" in r.getMessage()]
    assert len(said) == 1 and not counted


def test_hooked_head_keeps_the_logits_path(tok, counted):
    """A user's hook on the head acts on logits the fused path never builds: not used."""
    model, _ = _models()
    model.lm_head.register_forward_hook(lambda m, a, out: out)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    out = generate(model, enc.input_ids, enc.attention_mask, params=SamplingParams(max_new_tokens=3),
                   eos_token_id=-1, pad_token_id=tok.pad_token_id)
    assert out.completion_ids.shape == (len(PROMPTS), 3) and not counted


def test_synced_generation_after_both_groups_finished_draws_padding(tok, monkeypatch):
    """Under a sharded engine a rank whose rows have all finished keeps stepping (synced_gpus):
    the fused pair sampler then draws nothing and pads, as the logits path does."""
    model, ref = _models()
    with torch.no_grad():  # EOS very likely: both groups finish well before the last step
        for m in (model, ref):
            m.model.embed_tokens.weight[tok.eos_token_id] *= 4.0
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(params=SamplingParams(max_new_tokens=20), eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id, ref_model=ref, coef=0.5, synced_gpus=True)
    # one rank (this one) that must keep stepping to max_new_tokens: "other ranks not done"
    monkeypatch.setattr(generation, "all_ranks_done", lambda done, synced, device: False)
    def run():
        return generate_pair(model, enc.input_ids, enc.attention_mask,
                             generator=torch.Generator().manual_seed(1),
                             second_generator=torch.Generator().manual_seed(2), **kw)
    got = run()
    _logits_path(monkeypatch)
    want = run()
    for g, w in zip(got, want):
        assert torch.equal(g.completion_ids, w.completion_ids)
    # each output ends at its group's last EOS: both groups finished while the loop stepped on
    assert max(o.completion_ids.shape[1] for o in got) < 20
