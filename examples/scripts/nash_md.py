"""Nash-MD with nashkern, as TRL 1.13's `examples/scripts/nash_md.py` (usage: ./_flow.py)."""
from _flow import run  # ./_flow.py (a script's folder is on sys.path)

from nashkern import NashMDConfig, NashMDTrainer

if __name__ == "__main__":
    run(NashMDTrainer, NashMDConfig)
