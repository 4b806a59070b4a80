"""Nash-MD with nashkern, as TRL 1.13's `examples/scripts/nash_md.py` (the flow: ./_flow.py).

Usage (TRL's documented command; on a CPU-only machine add --use_cpu):

python examples/scripts/nash_md.py \
    --model_name_or_path trl-lib/pythia-1b-deduped-tldr-sft \
    --reward_model_path trl-lib/pythia-1b-deduped-tldr-rm \
    --dataset_name trl-lib/tldr \
    --learning_rate 5.0e-7 \
    --output_dir pythia-1b-tldr-nash-md \
    --per_device_train_batch_size 4 \
    --gradient_accumulation_steps 32 \
    --num_train_epochs 3 \
    --max_new_tokens 64 \
    --warmup_ratio 0.1 \
    --missing_eos_penalty 1.0 \
    --push_to_hub

LoRA: add --use_peft --lora_r 16 --lora_alpha 32. Under accelerate: `accelerate launch
--config_file examples/accelerate/<engine>.yaml examples/scripts/nash_md.py ...`.
tests/rl/test_user_paths.py runs these commands on tiny local checkpoints.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _flow import run  # noqa: E402

from nashkern import NashMDConfig, NashMDTrainer  # noqa: E402

if __name__ == "__main__":
    run(NashMDTrainer, NashMDConfig)
