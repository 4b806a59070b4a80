"""Online DPO with nashkern as TRL 1.13's `examples/scripts/online_dpo.py` (usage: ./_flow.py)."""
from _flow import run  # ./_flow.py (a script's folder is on sys.path)

from nashkern import OnlineDPOConfig, OnlineDPOTrainer

if __name__ == "__main__":
    run(OnlineDPOTrainer, OnlineDPOConfig)
