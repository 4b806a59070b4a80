import pytest
import torch

from nashkern.rl.generation import (SamplingParams, derived_generator, generate, generate_pair,
                                 mix_logits, process_logits, sample_next, truncate_prompts_left)
from tiny_models import make_tokenizer, single_thread, tiny_causal_lm  # noqa: F401

PROMPTS = ["hello there", "a", "what is two plus two?"]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def models():
    return tiny_causal_lm(seed=0), tiny_causal_lm(seed=1)


def naive_generate(model, ids, mask, *, ref_model, coef, params, eos, pad, generator):
    """No KV cache: both models re-run over the whole prefix at every token."""
    B = ids.shape[0]
    finished = torch.zeros(B, dtype=torch.bool)
    out = []
    vocab = model.config.vocab_size
    seen = torch.zeros(B, vocab, dtype=torch.long).scatter_add_(1, ids, mask) > 0
    with torch.no_grad():
        for _ in range(params.max_new_tokens):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            z = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
            r = None
            if ref_model is not None and coef > 0:
                r = ref_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
            t = sample_next(z, r, coef if r is not None else 0.0, params, seen, generator)
            t = torch.where(finished, torch.full_like(t, pad), t)
            out.append(t)
            finished |= t == eos
            seen[torch.arange(B), t] = True
            if finished.all():
                break
            ids = torch.cat([ids, t[:, None]], 1)
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("coef,proc", [(0.0, {}), (0.5, {}), (0.5, dict(top_k=10, top_p=0.9,
                                                                       min_p=0.05,
                                                                       repetition_penalty=1.3)),
                                       (1.0, {})])
def test_kv_cached_matches_naive(tok, models, coef, proc):
    model, ref = models
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    params = SamplingParams(max_new_tokens=12, temperature=0.9, **proc)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    out = generate(model, enc.input_ids, enc.attention_mask, ref_model=ref, coef=coef,
                   params=params, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                   generator=g1)
    want = naive_generate(model, enc.input_ids, enc.attention_mask.long(), ref_model=ref,
                          coef=coef, params=params, eos=tok.eos_token_id, pad=tok.pad_token_id,
                          generator=g2)
    assert torch.equal(out.completion_ids, want)
    assert out.completion_ids.shape == (3, 12)


def test_mixture_differs_from_policy_and_coef1_is_reference(tok, models):
    model, ref = models
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    params = SamplingParams(max_new_tokens=16)
    kw = dict(params=params, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    a = generate(model, enc.input_ids, enc.attention_mask, generator=torch.Generator().manual_seed(0), **kw)
    b = generate(model, enc.input_ids, enc.attention_mask, ref_model=ref, coef=0.5,
                 generator=torch.Generator().manual_seed(0), **kw)
    c = generate(model, enc.input_ids, enc.attention_mask, ref_model=ref, coef=1.0,
                 generator=torch.Generator().manual_seed(0), **kw)
    d = generate(ref, enc.input_ids, enc.attention_mask, generator=torch.Generator().manual_seed(0), **kw)
    assert not torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(c.completion_ids, d.completion_ids)


def _eos_likely_models():
    """Tiny policy / reference whose rows stop at different steps (EOS made likely)."""
    model, ref = tiny_causal_lm(seed=0), tiny_causal_lm(seed=1)
    eos = make_tokenizer().eos_token_id
    with torch.no_grad():
        model.model.embed_tokens.weight[eos] *= 40.0
        ref.model.embed_tokens.weight[eos] *= 40.0
    return model, ref


@pytest.mark.parametrize("coef,proc,cache", [
    (0.5, {}, None), (1.0, {}, None), (0.0, {}, None),
    (0.5, dict(top_k=10, top_p=0.9, repetition_penalty=1.3), None), (0.5, {}, "static")])
def test_generate_pair_matches_two_generate_calls(tok, coef, proc, cache):
    """One loop (policy over 2B rows, reference over the B mixture rows, each prompt prefilled
    once per model) draws exactly what two generate calls draw with the same generators:
    y from `generator`, y′ from `second_generator` — ids, masks and each output's length."""
    model, ref = _eos_likely_models()
    enc = tok(PROMPTS * 2, return_tensors="pt", padding=True)
    params = SamplingParams(max_new_tokens=14, temperature=0.9, **proc)
    kw = dict(params=params, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
              cache_implementation=cache)
    calls, ref_calls = [], []
    model.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape),
                                    with_kwargs=True)
    ref.register_forward_pre_hook(lambda m, a, k: ref_calls.append(1), with_kwargs=True)
    y, y2 = generate_pair(model, enc.input_ids, enc.attention_mask, ref_model=ref, coef=coef,
                          generator=torch.Generator().manual_seed(3),
                          second_generator=torch.Generator().manual_seed(4), **kw)
    prefill = calls[0]
    # each model stops once its rows have finished: the reference runs as in its own loop
    assert len(ref_calls) == (y2.completion_ids.shape[1] if coef > 0 else 0)
    calls.clear()
    want_y = generate(model, enc.input_ids, enc.attention_mask,
                      generator=torch.Generator().manual_seed(3), **kw)
    want_y2 = generate(model, enc.input_ids, enc.attention_mask, ref_model=ref, coef=coef,
                       generator=torch.Generator().manual_seed(4), **kw)
    for got, want in ((y, want_y), (y2, want_y2)):
        assert torch.equal(got.completion_ids, want.completion_ids)
        assert torch.equal(got.completion_mask, want.completion_mask)
        assert torch.equal(got.input_ids, want.input_ids)
    if cache is None:  # the policy's prompt prefill runs once, over the B prompts
        assert prefill[0] == enc.input_ids.shape[0]


def test_generate_pair_second_policy_sample_is_generate_over_repeated_prompts(tok):
    """Online DPO's pair: with no reference and no second generator, both samples come from one
    sampler call per token over the 2B rows — exactly generate(prompts repeated twice)."""
    model, _ = _eos_likely_models()
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(params=SamplingParams(max_new_tokens=12), eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)
    a, b = generate_pair(model, enc.input_ids, enc.attention_mask,
                         generator=torch.Generator().manual_seed(9), **kw)
    want = generate(model, enc.input_ids.repeat(2, 1), enc.attention_mask.repeat(2, 1),
                    generator=torch.Generator().manual_seed(9), **kw)
    assert torch.equal(torch.cat([a.completion_ids, b.completion_ids]), want.completion_ids)
    assert torch.equal(torch.cat([a.completion_mask, b.completion_mask]), want.completion_mask)


def test_generate_pair_default_second_stream(tok, models):
    """Without a second generator the mixture sample draws from a stream derived from the
    first generator's state: reproducible, not advancing it, unlike the policy's stream."""
    model, ref = models
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(params=SamplingParams(max_new_tokens=10), eos_token_id=-1,
              pad_token_id=tok.pad_token_id, ref_model=ref, coef=0.5)
    g = torch.Generator().manual_seed(11)
    first = derived_generator(g)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(11).get_state())
    assert torch.equal(first.get_state(), derived_generator(g).get_state())
    assert not torch.equal(torch.rand(8, generator=first),
                           torch.rand(8, generator=torch.Generator().manual_seed(11)))
    y, y2 = generate_pair(model, enc.input_ids, enc.attention_mask,
                          generator=torch.Generator().manual_seed(11), **kw)
    again = generate_pair(model, enc.input_ids, enc.attention_mask,
                          generator=torch.Generator().manual_seed(11), **kw)
    want_y2 = generate(model, enc.input_ids, enc.attention_mask,
                       generator=derived_generator(torch.Generator().manual_seed(11)), **kw)
    assert torch.equal(y2.completion_ids, want_y2.completion_ids)
    assert torch.equal(y.completion_ids, again[0].completion_ids)
    assert torch.equal(y2.completion_ids, again[1].completion_ids)


def test_eos_stops_each_row_and_pads(tok):
    model = tiny_causal_lm(seed=0)
    eos = tok.eos_token_id
    with torch.no_grad():  # make EOS likely so rows stop at different steps
        model.lm_head.weight[eos] += 0.0  # tied: edit the embedding row instead
        model.model.embed_tokens.weight[eos] *= 40.0
    enc = tok(PROMPTS * 2, return_tensors="pt", padding=True)
    out = generate(model, enc.input_ids, enc.attention_mask, params=SamplingParams(max_new_tokens=30),
                   eos_token_id=eos, pad_token_id=tok.pad_token_id,
                   generator=torch.Generator().manual_seed(0))
    ids, m = out.completion_ids, out.completion_mask
    stopped = 0
    for row, mrow in zip(ids.tolist(), m.tolist()):
        if eos in row:
            stopped += 1
            k = row.index(eos)
            assert all(t == tok.pad_token_id for t in row[k + 1:])
            assert mrow == [1] * (k + 1) + [0] * (len(row) - k - 1)
        else:
            assert all(mrow)
    assert stopped >= 1
    if stopped == len(ids):  # loop ends once every row has stopped
        assert m[:, -1].any()


def test_left_padding_matches_unpadded_rows(tok, models):
    """A row's tokens do not depend on the other rows' padding (greedy-ish: top_k=1)."""
    model, _ = models
    params = SamplingParams(max_new_tokens=8, top_k=1)
    kw = dict(params=params, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    assert (enc.attention_mask[:, 0] == 0).any()
    batch = generate(model, enc.input_ids, enc.attention_mask, **kw).completion_ids
    for i, p in enumerate(PROMPTS):
        e = tok([p], return_tensors="pt")
        single = generate(model, e.input_ids, e.attention_mask, **kw).completion_ids
        n = single.shape[1]
        assert torch.equal(batch[i, :n], single[0])


def test_left_truncation():
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    i2, m2 = truncate_prompts_left(ids, mask, 3)
    assert i2.tolist() == [[5, 6, 7], [10, 11, 12]] and m2.tolist() == [[1, 1, 1], [1, 1, 1]]
    i3, m3 = truncate_prompts_left(ids, mask, 5)
    assert i3.tolist() == ids.tolist()
    i4, _ = truncate_prompts_left(ids[:1], mask[:1], 5)  # drops all-padding columns
    assert i4.tolist() == [[5, 6, 7]]
    with pytest.raises(ValueError, match="left-padded"):
        truncate_prompts_left(torch.tensor([[5, 0]]), torch.tensor([[1, 0]]), 2)


def test_generate_with_max_length_truncates(tok, models):
    model, _ = models
    enc = tok(["abcdefghijklmnopqrstuvwxyz"], return_tensors="pt")
    out = generate(model, enc.input_ids, enc.attention_mask, params=SamplingParams(max_new_tokens=4),
                   max_length=10, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert out.prompt_ids.shape[1] == 6
    assert tok.decode(out.prompt_ids[0]) == "uvwxyz"


def test_gradient_checkpointing_still_uses_cache_and_restores_mode(tok):
    model = tiny_causal_lm(seed=0)
    model.gradient_checkpointing_enable()
    model.train()
    calls = []
    model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[1]),
                                    with_kwargs=True)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    out = generate(model, enc.input_ids, enc.attention_mask, params=SamplingParams(max_new_tokens=5),
                   eos_token_id=-1, pad_token_id=tok.pad_token_id)
    assert out.completion_ids.shape == (3, 5)
    assert calls[0] == enc.input_ids.shape[1] and calls[1:] == [1] * 4  # one new token per forward
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_processors():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.0, 1.0, 2.0]])
    out = process_logits(x, None, SamplingParams(top_k=2))
    assert torch.isinf(out[:, :2]).all() and torch.isfinite(out[:, 2:]).all()
    seen = torch.tensor([[True, False, False, True], [True, False, False, False]])
    out = process_logits(x, seen, SamplingParams(repetition_penalty=2.0))
    assert out.tolist() == [[0.5, 2.0, 3.0, 2.0], [-2.0, 0.0, 1.0, 2.0]]
    out = process_logits(torch.tensor([[0.0, 0.0, 10.0]]), None, SamplingParams(top_p=0.5))
    assert torch.isinf(out[0, :2]).all() and out[0, 2] == 10.0
    out = process_logits(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), None, SamplingParams(min_p=0.5))
    assert torch.isfinite(out[0, :2]).all() and torch.isinf(out[0, 2])
    assert torch.equal(mix_logits(x, torch.full_like(x, float("-inf")), 0.0), x)
    with pytest.raises(ValueError):
        SamplingParams(temperature=0)


def test_mixture_log_softmax_end_points_ignore_the_unused_model():
    """The wrapper's mixture follows the ops' end-point rule: at coef 0 / 1 a -inf logit of the
    model weighted 0 is ignored (it used to give 0 * -inf = NaN)."""
    from nashkern.rl.mixture_wrapper import mixture_log_softmax

    gen = torch.Generator().manual_seed(0)
    z, r = torch.randn(2, 3, 11, generator=gen), torch.randn(2, 3, 11, generator=gen)
    masked_r, masked_z = r.clone(), z.clone()
    masked_r[..., 4] = float("-inf")
    masked_z[..., 7] = float("-inf")
    torch.testing.assert_close(mixture_log_softmax(z, masked_r, 0.0), torch.log_softmax(z, -1))
    torch.testing.assert_close(mixture_log_softmax(masked_z, r, 1.0), torch.log_softmax(r, -1))
