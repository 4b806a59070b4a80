"""`nashkern train` options beyond the basic run (tests/rl/test_nash_md_trainer.py has that)."""
import json

from online_helpers import save_tiny_model_dirs
from tiny_models import single_thread  # noqa: F401


def test_train_cli_use_peft_saves_only_adapters_and_keeps_the_base(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nashkern.apps.cli import main

    model, rm, data = save_tiny_model_dirs(tmp_path, ["ab", "hello", "x y", "q"])
    out = tmp_path / "out"
    rc = main(["train", "--model_name_or_path", str(model), "--reward_model_path", str(rm),
               "--dataset_name", str(data), "--output_dir", str(out), "--max_steps", "2",
               "--per_device_train_batch_size", "2", "--max_new_tokens", "4",
               "--learning_rate", "1e-2", "--use_peft", "--lora_r", "4", "--lora_alpha", "8",
               "--report_to", "none", "--use_cpu", "--save_strategy", "no"])
    assert rc == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["peft_type"] == "LORA"
    assert not (out / "model.safetensors").exists()  # adapters only, not a full copy
    base = AutoModelForCausalLM.from_pretrained(model)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), out)
    lora = {k: v for k, v in tuned.state_dict().items() if "lora_B" in k}
    assert lora and any(v.abs().sum() > 0 for v in lora.values())  # B starts at 0: it trained
    merged = tuned.merge_and_unload().state_dict()
    assert any(not (merged[k] == v).all() for k, v in base.state_dict().items() if k in merged)


def test_train_cli_random_judge_and_bad_judge(tmp_path):
    import pytest

    from nashkern.apps.cli import main

    model, _, data = save_tiny_model_dirs(tmp_path, ["ab", "hello", "x y", "q"])
    common = ["train", "--model_name_or_path", str(model), "--dataset_name", str(data),
              "--max_steps", "1", "--per_device_train_batch_size", "2", "--max_new_tokens", "3",
              "--report_to", "none", "--use_cpu", "--save_strategy", "no"]
    assert main(common + ["--judge", "random", "--output_dir", str(tmp_path / "o1")]) == 0
    with pytest.raises(ValueError, match="--judge must be one of"):
        main(common + ["--judge", "nope", "--output_dir", str(tmp_path / "o2")])


def test_model_load_kwargs_picks_flash_attention_only_when_usable(monkeypatch):
    import importlib.util

    import torch

    from nashkern.rl.trainer_setup import model_load_kwargs

    assert model_load_kwargs(None) == {"trust_remote_code": False}
    assert model_load_kwargs({"trust_remote_code": True})["trust_remote_code"] is True
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else found(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert model_load_kwargs({"dtype": torch.bfloat16})["attn_implementation"] == "flash_attention_2"
    assert "attn_implementation" not in model_load_kwargs({})  # fp32: flash-attn cannot run it
    assert model_load_kwargs({"dtype": "bfloat16", "attn_implementation": "sdpa"})[
        "attn_implementation"] == "sdpa"  # an explicit choice wins
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "attn_implementation" not in model_load_kwargs({"dtype": torch.bfloat16})


def test_train_cli_dtype_and_attention_flags(tmp_path):
    import pytest

    from nashkern.apps.cli import main

    model, _, data = save_tiny_model_dirs(tmp_path, ["ab", "hello", "x y", "q"])
    common = ["train", "--model_name_or_path", str(model), "--dataset_name", str(data),
              "--judge", "random", "--max_steps", "1", "--per_device_train_batch_size", "2",
              "--max_new_tokens", "3", "--report_to", "none", "--use_cpu", "--save_strategy", "no"]
    assert main(common + ["--attn_implementation", "eager", "--dtype", "float32",
                          "--output_dir", str(tmp_path / "o1")]) == 0
    with pytest.raises(ValueError, match="--dtype must be one of"):
        main(common + ["--dtype", "float8", "--output_dir", str(tmp_path / "o2")])
