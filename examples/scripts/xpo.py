"""XPO with nashkern, as TRL 1.13's `examples/scripts/xpo.py` (usage: ./_flow.py)."""
from _flow import run  # ./_flow.py (a script's folder is on sys.path)

from nashkern import XPOConfig, XPOTrainer

if __name__ == "__main__":
    run(XPOTrainer, XPOConfig)
