"""The opt-in compiled decode step (config field ``compile_decode``, nashkern.rl.compiled_decode):
the same completions as the eager decode for the same seed, no recompilation after the first
step, clear errors where it cannot be used. On the CPU (inductor's C++ backend, float32, one tiny
one-layer Qwen2 shape: every test here reuses the same two graphs, B = 3 and 2B = 6 rows, so the
module compiles twice; the GPU benefit is not measured here)."""
import pytest
import torch
from torch._dynamo.utils import counters

from nashkern import NashMDConfig, NashMDTrainer
from nashkern.rl import nash_md
from nashkern.rl.compiled_decode import CompiledDecode
from nashkern.rl.generation import (SamplingParams, _forward_last_logits, _new_cache, generate,
                                    generate_pair)
from online_helpers import make_args, trainer_for
from tiny_models import make_tokenizer, single_thread, tiny_causal_lm  # noqa: F401

PROMPTS = ["hello there", "a", "what is two plus two?"]
MAX_LENGTH = 40  # the static cache's positions: one length for every prompt width below


@pytest.fixture(scope="module", autouse=True)
def one_compile_thread():
    """Inductor compiles its C++ kernels in a pool of worker processes by default; on a shared
    2-core machine the pool's start-up doubled the first compile (82 s vs 41 s wall, cold
    cache, load 5): compile in this process."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(compile_threads=1):
        yield


@pytest.fixture(scope="module")
def compiled():
    return CompiledDecode("default")


def one_layer_lm(seed=0):
    """The tiny Qwen2 with one layer: a cold compile of its decode step took 20 s wall here
    against 72 s for the usual two layers (load 5 on 2 cores; most of it g++ on inductor's
    kernels)."""
    return tiny_causal_lm(seed=seed, layers=1)


@pytest.fixture(scope="module")
def models():
    return one_layer_lm(0), one_layer_lm(1)


def encode(prompts):
    return make_tokenizer()(prompts, return_tensors="pt", padding=True)


def kwargs(**kw):
    tok = make_tokenizer()
    return dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                params=SamplingParams(max_new_tokens=6), max_length=MAX_LENGTH, **kw)


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def compiled_frames() -> int:
    """Frames dynamo has converted (every compilation and recompilation, also one that hits the
    recompile limit and would run eagerly)."""
    return counters["frames"]["total"]


def test_step_logits_match_the_eager_forward(models, compiled):
    """Token by token, the compiled forward's logits (static cache of MAX_LENGTH positions, the
    padded mask) are the eager forward's (dynamic cache, the growing mask) within float32
    rounding, on left-padded prompts."""
    model = models[0].eval()
    enc = encode(PROMPTS)
    ids, mask = enc.input_ids, enc.attention_mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        z_eager, eager_cache = _forward_last_logits(model, ids, mask, pos,
                                                    _new_cache(model, None, 0))
        static = compiled.cache(model, "policy", ids.shape[0], MAX_LENGTH)
        z_static, static = _forward_last_logits(model, ids, mask, pos, static)
        torch.testing.assert_close(z_static, z_eager, rtol=1e-5, atol=1e-5)
        tok, next_pos = z_eager.argmax(-1), pos[:, -1:]
        for _ in range(4):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            next_pos = next_pos + 1
            z_eager, eager_cache = _forward_last_logits(model, tok[:, None], mask, next_pos,
                                                        eager_cache)
            z_compiled = compiled(model, tok[:, None], mask, next_pos, static)
            torch.testing.assert_close(z_compiled, z_eager, rtol=1e-5, atol=1e-5)
            tok = z_eager.argmax(-1)


@pytest.mark.parametrize("coef", [0.0, 0.5])
def test_generate_matches_the_eager_decode(models, compiled, coef):
    model, ref = models
    enc = encode(PROMPTS)
    outs = [generate(model, enc.input_ids, enc.attention_mask, ref_model=ref, coef=coef,
                     generator=torch.Generator().manual_seed(7),
                     **kwargs(compiled_decode=c)) for c in (None, compiled)]
    assert outs[0].completion_ids.shape[1] > 1  # decode steps did run
    assert torch.equal(outs[1].completion_ids, outs[0].completion_ids)
    assert torch.equal(outs[1].completion_mask, outs[0].completion_mask)


def test_generate_pair_matches_and_does_not_recompile(models, compiled):
    """generate_pair (policy 2B rows, reference B rows): the eager completions; then prompt
    widths 11, 21 and 2 within the same MAX_LENGTH run without one recompilation."""
    model, ref = models
    batches = [["hello there", "a", "abc"], PROMPTS, ["hi", "yo", "ok"]]
    widths = set()
    for i, prompts in enumerate(batches):
        enc = encode(prompts)
        widths.add(enc.input_ids.shape[1])
        run = lambda c: generate_pair(model, enc.input_ids, enc.attention_mask,  # noqa: E731
                                      ref_model=ref, coef=0.5,
                                      generator=torch.Generator().manual_seed(i),
                                      **kwargs(compiled_decode=c))
        eager = run(None)
        if i == 0:
            got = run(compiled)
            graphs = unique_graphs()
        else:
            with torch._dynamo.config.patch(error_on_recompile=True):
                got = run(compiled)
        for a, b in zip(got, eager):
            assert torch.equal(a.completion_ids, b.completion_ids)
    assert len(widths) == 3
    assert unique_graphs() == graphs


def test_nash_md_trainer_steps_match_eager_without_recompiling(tmp_path, monkeypatch):
    """NashMDTrainer with compile_decode: three steps (prompt widths differ between batches)
    sample what the eager trainer samples, and the graphs compiled at step 1 serve steps 2
    and 3."""
    samples = []
    pair = nash_md.generate_pair

    def recording(*a, **kw):
        out = pair(*a, **kw)
        samples.append((a[1].shape[1], [o.completion_ids.clone() for o in out],
                        (unique_graphs(), compiled_frames())))
        return out

    monkeypatch.setattr(nash_md, "generate_pair", recording)
    runs = {}
    for mode in (None, "default"):
        samples.clear()
        tr = trainer_for(NashMDTrainer, NashMDConfig, tmp_path, model=one_layer_lm(),
                         config=dict(max_steps=3, compile_decode=mode, max_length=MAX_LENGTH,
                                     mixture_coef=0.5))
        assert (tr._compiled_decode is None) == (mode is None)
        tr.train()
        runs[mode] = list(samples)
    assert len(runs["default"]) == 3
    assert len({width for width, _, _ in runs["default"]}) >= 2  # different prompt widths
    for (_, eager, _), (_, got, _) in zip(runs[None], runs["default"]):
        for a, b in zip(got, eager):
            assert torch.equal(a, b)
    graphs = [g for _, _, g in runs["default"]]
    assert graphs[1] == graphs[2] == graphs[0]  # counted after each step's generation


def test_config_rejects_an_unknown_mode(tmp_path):
    with pytest.raises(ValueError, match=r"compile_decode must be one of"):
        make_args(NashMDConfig, tmp_path, compile_decode="fast")


def test_trainer_refuses_what_the_compiled_decode_cannot_run(tmp_path):
    with pytest.raises(ValueError, match=r"compile_decode='default'.*set max_length"):
        trainer_for(NashMDTrainer, NashMDConfig, tmp_path,
                    config=dict(compile_decode="default", max_length=None))
    with pytest.raises(ValueError, match=r"compile_decode='default'.*cache_implementation"):
        trainer_for(NashMDTrainer, NashMDConfig, tmp_path,
                    config=dict(compile_decode="default", cache_implementation="dynamic"))
    model = one_layer_lm()
    model._can_compile_fullgraph = False  # as transformers marks e.g. DBRX
    with pytest.raises(ValueError, match=r"compile_decode='default'.*model: .*static KV cache"):
        trainer_for(NashMDTrainer, NashMDConfig, tmp_path, model=model,
                    config=dict(compile_decode="default"))


def test_generate_refuses_a_sharded_engine_and_a_dynamic_cache(models, compiled):
    enc = encode(PROMPTS)
    with pytest.raises(ValueError, match=r"compile_decode='default'.*sharded engine"):
        generate(models[0], enc.input_ids, enc.attention_mask,
                 **kwargs(compiled_decode=compiled, synced_gpus=True))
    with pytest.raises(ValueError, match=r"compile_decode='default'.*cache_implementation"):
        generate_pair(models[0], enc.input_ids, enc.attention_mask,
                      **kwargs(compiled_decode=compiled, cache_implementation="offloaded"))
