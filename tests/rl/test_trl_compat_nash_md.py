"""NashMDTrainer driven exactly as a TRL 1.13 user drives ``trl.experimental.nash_md`` (see
``trl_compat_helpers``): TRL 1.13's own Nash-MD tests with the import switched (hub checkpoints
and data replaced by local ones), then the scenarios of a TRL 1.13 script."""
import pytest
import torch

import nashkern.rl.nash_md as nash_md_module
from nashkern import GeometricMixtureWrapper, NashMDConfig, NashMDTrainer
from nashkern.apps.tiny import make_tokenizer, tiny_causal_lm
from tiny_models import single_thread  # noqa: F401
from trl_compat_helpers import (CPU, PRE_PEFTED_TRAIN, TRAIN, checkpoints, lora, run_trl_case,
                                scenario_tests, trl_case_objects)  # noqa: F401

# -- TRL 1.13: tests/experimental/test_nash_md_trainer.py ------------------------------------
@pytest.fixture
def objs(checkpoints):  # noqa: F811
    return trl_case_objects(checkpoints, reward="qwen")


class TestGeometricMixtureWrapper:
    @pytest.fixture(autouse=True)
    def setup(self, checkpoints):  # noqa: F811
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.model = AutoModelForCausalLM.from_pretrained(checkpoints["qwen"], dtype="float32")
        self.ref_model = tiny_causal_lm(seed=3)  # same vocabulary, other weights
        self.generation_config = GenerationConfig(max_new_tokens=4, do_sample=False,
                                                  pad_token_id=0, eos_token_id=1)
        self.mixture_coef = 0.5
        self.wrapper = GeometricMixtureWrapper(self.model, self.ref_model,
                                               self.generation_config,
                                               mixture_coef=self.mixture_coef)

    def test_forward(self):
        input_ids = torch.tensor([[10, 11, 12, 13, 14]])
        output = self.wrapper(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        assert output.logits.shape == (1, 5, self.model.config.vocab_size)

    def test_mixture_coefficient(self):
        input_ids = torch.tensor([[10, 11, 12, 13, 14]])
        mask = torch.ones_like(input_ids)
        with torch.no_grad():
            z = self.model(input_ids=input_ids, attention_mask=mask).logits
            r = self.ref_model(input_ids=input_ids, attention_mask=mask).logits
            out = self.wrapper(input_ids=input_ids, attention_mask=mask)
        expected = torch.log_softmax(self.mixture_coef * r + (1 - self.mixture_coef) * z, -1)
        torch.testing.assert_close(out.logits, expected)

    def test_prepare_inputs_for_generation(self):
        input_ids = torch.tensor([[10, 11, 12, 13, 14]])
        inputs = self.wrapper.prepare_inputs_for_generation(
            input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True)
        assert "input_ids" in inputs and "attention_mask" in inputs
        assert not inputs.get("use_cache", False)

    def test_generate_greedy_matches_nashkern_mixture_generation(self):
        """transformers' generate over the wrapper (no cache, full forwards) and nashkern's
        KV-cached mixture sampler agree token for token (greedy)."""
        from nashkern.rl.generation import SamplingParams, generate

        ids = torch.tensor([[10, 11, 12, 13, 14], [0, 0, 20, 21, 22]])
        mask = (ids != 0).long()
        out = self.wrapper.generate(input_ids=ids, attention_mask=mask,
                                    generation_config=self.generation_config)
        mine = generate(self.model, ids, mask, eos_token_id=1, pad_token_id=0,
                        params=SamplingParams(max_new_tokens=4, do_sample=False),
                        ref_model=self.ref_model, coef=self.mixture_coef)
        assert torch.equal(out[:, 5:], mine.completion_ids)


class TestNashMDTrainer:
    @pytest.mark.parametrize("config_name", ["standard_prompt_only", "conversational_prompt_only"])
    def test_nash_md_trainer_training(self, objs, tmp_path, config_name):
        run_trl_case(NashMDTrainer, NashMDConfig, tmp_path, objs, data=config_name,
                     config=dict(TRAIN, remove_unused_columns=False,
                                 gradient_accumulation_steps=1, learning_rate=9e-1),
                     roles=dict(model="model", ref_model="ref_model",
                                reward_funcs="reward_model"))

    def test_training_with_peft(self, objs, tmp_path):
        run_trl_case(NashMDTrainer, NashMDConfig, tmp_path, objs, peft=lora(),
                     config=dict(TRAIN, learning_rate=5.0e-7),
                     roles=dict(model="model", reward_funcs="reward_model"))

    def test_training_with_peft_and_ref_model(self, objs, tmp_path):
        run_trl_case(NashMDTrainer, NashMDConfig, tmp_path, objs, peft=lora(),
                     config=dict(TRAIN, learning_rate=5.0e-7),
                     roles=dict(model="model", ref_model="ref_model",
                                reward_funcs="reward_model"))

    def test_training_pre_pefted_model_implicit_ref_with_reward_model(self, objs, tmp_path):
        run_trl_case(NashMDTrainer, NashMDConfig, tmp_path, objs, pre_peft=lora(8, 16, 0.1),
                     config=PRE_PEFTED_TRAIN,
                     roles=dict(reward_funcs="reward_model"))


# -- a TRL 1.13 user's script (trl_compat_helpers.scenario_tests) ---------------------------
globals().update(scenario_tests(NashMDTrainer, NashMDConfig, rpc_positional=False, schedules={"beta": 0.1, "mixture_coef": 0.5},
                                module=nash_md_module, n_calls=2))

def test_nash_md_loss_type_is_accepted_and_has_no_effect(tmp_path):
    assert NashMDConfig(output_dir=str(tmp_path), **CPU).loss_type == "sigmoid"
    with pytest.warns(UserWarning, match="no effect"):
        NashMDConfig(output_dir=str(tmp_path), loss_type="ipo", **CPU)


def test_bf16_default_keeps_the_fused_head(tmp_path, checkpoints):  # noqa: F811
    """TRL's default bf16=True runs the models under autocast (accelerate wraps ``forward`` and
    returns fp32 copies of bf16-computed logits): the head check accepts them, so the fused
    log-probs stay on (no chunked-logits fallback); a head that really differs is still
    refused."""
    import warnings

    from nashkern.rl.completion_stats import _logits_tolerance
    from trl_compat_helpers import quick_args, vowels, zen

    args = quick_args(NashMDConfig, tmp_path)
    assert args.bf16  # the default (use_cpu=True on a CPU-only machine)
    tr = NashMDTrainer(model=tiny_causal_lm(), reward_funcs=vowels, args=args,
                       train_dataset=zen("standard_prompt_only")["train"],
                       processing_class=make_tokenizer())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.train()
    assert not [w for w in caught if "could not be separated" in str(w.message)]
    z = torch.randn(4, 50) * 3
    assert _logits_tolerance(z) == (1e-3, 1e-3)
    zb = z.bfloat16().float()
    rtol, atol = _logits_tolerance(zb)
    assert torch.allclose(z, zb, rtol=rtol, atol=atol)            # bf16 rounding: accepted
    assert not torch.allclose(2 * z, zb, rtol=rtol, atol=atol)    # a scaled head: refused
