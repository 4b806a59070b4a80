"""OnlineDPOTrainer driven exactly as a TRL 1.13 user drives ``trl.experimental.online_dpo``
(see ``trl_compat_helpers``): TRL 1.13's own Online DPO tests with the import switched (hub
checkpoints and data replaced by local ones; the vLLM and vision-model tests are not applicable,
see COMPAT.md), the scenarios of a TRL 1.13 script, and the sampling knobs acting on nashkern's
KV-cached generation."""
import pytest
import torch

import nashkern.rl.online_dpo as online_dpo_module
from nashkern import OnlineDPOConfig, OnlineDPOTrainer
from nashkern.apps.tiny import make_tokenizer, tiny_causal_lm
from nashkern.rl.generation import SamplingParams, generate
from tiny_models import single_thread  # noqa: F401
from trl_compat_helpers import (CPU, TRAIN, checkpoints, lora, run_trl_case, scenario_tests,
                                trl_case_objects, zen)  # noqa: F401

# -- TRL 1.13: tests/experimental/test_online_dpo_trainer.py ---------------------------------
LR5 = dict(TRAIN, learning_rate=5.0e-7)
SCORED = dict(model="model", reward_funcs="reward_model",
              reward_processing_classes="reward_tokenizer")


@pytest.fixture
def objs(checkpoints):  # noqa: F811
    return trl_case_objects(checkpoints, reward="llama")


class TestOnlineDPOTrainer:
    @pytest.mark.parametrize("config_name", ["standard_prompt_only", "conversational_prompt_only"])
    def test_training(self, objs, tmp_path, config_name):
        run_trl_case(OnlineDPOTrainer, OnlineDPOConfig, tmp_path, objs, data=config_name,
                     config=LR5, roles=SCORED)

    def test_training_model_str(self, objs, tmp_path):
        run_trl_case(OnlineDPOTrainer, OnlineDPOConfig, tmp_path, objs, config=LR5,
                     roles=dict(SCORED, model="model_path"))

    def test_training_with_ref_model(self, objs, tmp_path):
        run_trl_case(OnlineDPOTrainer, OnlineDPOConfig, tmp_path, objs, config=LR5,
                     roles=dict(SCORED, ref_model="ref_model"))

    def test_ref_model_is_model(self, objs, tmp_path):
        with pytest.raises(ValueError):
            run_trl_case(OnlineDPOTrainer, OnlineDPOConfig, tmp_path, objs, config=TRAIN,
                         roles=dict(SCORED, ref_model="model"))

    def test_training_with_peft(self, objs, tmp_path):
        run_trl_case(OnlineDPOTrainer, OnlineDPOConfig, tmp_path, objs, config=LR5,
                     peft=lora(), roles=SCORED)

    def test_training_with_peft_and_ref_model(self, objs, tmp_path):
        run_trl_case(OnlineDPOTrainer, OnlineDPOConfig, tmp_path, objs, config=LR5,
                     peft=lora(), roles=dict(SCORED, ref_model="ref_model"))

    def test_vllm_config_validation(self):
        config = OnlineDPOConfig(use_vllm=True, vllm_mode="server", **CPU)
        assert config.vllm_mode == "server"
        config = OnlineDPOConfig(use_vllm=True, vllm_mode="colocate", **CPU)
        assert config.vllm_mode == "colocate"
        config = OnlineDPOConfig(**CPU)
        assert config.vllm_mode == "colocate"
        assert config.vllm_server_base_url is None
        assert config.vllm_server_host == "0.0.0.0"
        assert config.vllm_server_port == 8000
        assert config.vllm_server_timeout == 240.0
        assert config.vllm_gpu_memory_utilization == 0.55
        assert config.top_p == 1.0
        assert config.top_k == 0
        assert config.min_p is None
        assert config.repetition_penalty == 1.0
        assert config.cache_implementation is None
        assert config.generation_kwargs is None

    def test_generation_config_setup(self, objs, tmp_path):
        training_args = OnlineDPOConfig(
            output_dir=str(tmp_path), use_vllm=False, temperature=0.8, top_p=0.9, top_k=40,
            repetition_penalty=1.2, max_new_tokens=64, generation_kwargs={"do_sample": False},
            report_to="none", **CPU)
        trainer = OnlineDPOTrainer(
            model=objs["model"], reward_funcs=objs["reward_model"], args=training_args,
            train_dataset=zen("standard_prompt_only")["train"],
            processing_class=objs["tokenizer"],
            reward_processing_classes=objs["reward_tokenizer"])
        assert not trainer.use_vllm
        assert not (hasattr(trainer, "llm") and trainer.llm is not None)
        assert not (hasattr(trainer, "vllm_client") and trainer.vllm_client is not None)
        assert trainer.generation_config is not None
        assert trainer.generation_config.temperature == 0.8
        assert trainer.generation_config.top_p == 0.9
        assert trainer.generation_config.top_k == 40
        assert trainer.generation_config.repetition_penalty == 1.2
        assert trainer.generation_config.max_new_tokens == 64
        assert not trainer.generation_config.do_sample

    @pytest.mark.parametrize("config_name", ["standard_prompt_only", "conversational_prompt_only"])
    def test_training_with_reward_funcs(self, objs, tmp_path, config_name):
        def simple_reward_func(prompts, completions, completion_ids, **kwargs):
            return [0.5 for _ in prompts]

        objs["funcs"] = [simple_reward_func, simple_reward_func]
        trainer = run_trl_case(OnlineDPOTrainer, OnlineDPOConfig, tmp_path, objs,
                               data=config_name, config=dict(LR5, reward_weights=[0.7, 0.3]),
                               roles=dict(model="model", reward_funcs="funcs"))
        assert len(trainer.reward_funcs) == 2
        assert trainer.reward_weights is not None
        assert round(abs(trainer.reward_weights[0].item() - 0.7), 5) == 0
        assert round(abs(trainer.reward_weights[1].item() - 0.3), 5) == 0


# -- a TRL 1.13 user's script (trl_compat_helpers.scenario_tests) ---------------------------
globals().update(scenario_tests(OnlineDPOTrainer, OnlineDPOConfig, rpc_positional=True, schedules={"beta": 0.1},
                                module=online_dpo_module, n_calls=1))

def test_greedy_generation_kwargs_make_both_samples_equal(tmp_path):
    """generation_kwargs={"do_sample": False} acts on the sampler: Online DPO's two samples of
    a prompt become the same (greedy) completion."""
    from trl_compat_helpers import quick_args, vowels

    tr = OnlineDPOTrainer(model=tiny_causal_lm(), reward_funcs=vowels,
                          args=quick_args(OnlineDPOConfig, tmp_path, max_new_tokens=6,
                                          generation_kwargs={"do_sample": False}),
                          train_dataset=zen("standard_prompt_only")["train"],
                          processing_class=make_tokenizer())
    tr.train()
    assert tr.last_samples and all(s["completion_1"] == s["completion_2"]
                                   for s in tr.last_samples)


# -- the knobs on nashkern's KV-cached generation (policy and mixture samples alike) ---------
@pytest.fixture(scope="module")
def two_models():
    tok = make_tokenizer()
    enc = tok(["tell me a story", "hi", "abc"], return_tensors="pt", padding=True)
    return tiny_causal_lm(seed=0), tiny_causal_lm(seed=1), enc.input_ids, enc.attention_mask


def _gen(models, params, coef, seed=0, **kw):
    model, ref, ids, mask = models
    return generate(model, ids, mask, eos_token_id=1, pad_token_id=0, params=params,
                    ref_model=ref, coef=coef, generator=torch.Generator().manual_seed(seed),
                    **kw).completion_ids


@pytest.mark.parametrize("coef", [0.0, 0.5])
def test_cache_implementations_draw_the_same_tokens(two_models, coef):
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.95, top_k=20,
                            min_p=0.01, repetition_penalty=1.2)
    dynamic = _gen(two_models, params, coef)
    assert torch.equal(_gen(two_models, params, coef, cache_implementation="static"), dynamic)
    with pytest.raises(ValueError, match="offloaded"):  # CPU models (the tests' device)
        _gen(two_models, params, coef, cache_implementation="offloaded")
    with pytest.raises(ValueError, match="cache_implementation"):
        _gen(two_models, params, coef, cache_implementation="quantized")


@pytest.mark.parametrize("coef", [0.0, 0.5])
def test_filters_act_on_policy_and_mixture_samples(two_models, coef):
    """top_k=1 (and top_p -> 0, min_p=1) leave only the most likely token of the (mixture)
    distribution: any seed draws the greedy completion; a repetition penalty changes it."""
    greedy = _gen(two_models, SamplingParams(max_new_tokens=6, do_sample=False), coef)
    for knob in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        for seed in (0, 1):
            got = _gen(two_models, SamplingParams(max_new_tokens=6, **knob), coef, seed=seed)
            assert torch.equal(got, greedy), knob
    penalised = _gen(two_models, SamplingParams(max_new_tokens=6, do_sample=False,
                                                repetition_penalty=50.0), coef)
    assert not torch.equal(penalised, greedy)
    for row in penalised:  # a strong penalty: no token repeats within a completion
        real = row[row != 0].tolist()
        assert len(set(real)) == len(real)
