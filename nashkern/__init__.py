"""nashkern: streaming vocabulary kernels for online preference optimisation (Nash-MD, XPO,
Online DPO).

Two wings, one rule (the kernel library never imports the RL wing):

* the kernel library: ``from nashkern import ops`` gives the fused ops (log-probs, entropy, KL,
  geometric-mixture log-probs and sampling) over logits or straight from hidden states and the
  lm_head weight; ``nashkern.naive`` holds their eager float64-checkable definitions;
* the RL wing, :mod:`nashkern.rl`: the online preference trainers (Nash-MD, XPO, Online DPO)
  and the small functions they are built from; :mod:`nashkern.apps`: the CLI and the demo.
"""
from . import naive, ops
from .types import TokenStats

__version__ = "0.1.0"
__all__ = ["ops", "naive", "TokenStats", "__version__"]

_LAZY = {"NashMDConfig": "nash_md", "NashMDTrainer": "nash_md",
         "NashEMAConfig": "nash_ema", "NashEMATrainer": "nash_ema",
         "XPOConfig": "xpo", "XPOTrainer": "xpo",
         "OnlineDPOConfig": "online_dpo", "OnlineDPOTrainer": "online_dpo",
         "OnlinePreferenceConfig": "config", "OnlinePreferenceTrainer": "online",
         "LogCompletionsCallback": "callbacks", "GeometricMixtureWrapper": "mixture_wrapper"}


def __getattr__(name):
    """``nashkern.NashMDTrainer`` / ``XPOTrainer`` / ``OnlineDPOTrainer`` and their configs,
    imported on first use so that ``import nashkern`` does not import transformers."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".rl.{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
