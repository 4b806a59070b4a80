"""nashkern: streaming vocabulary kernels for online preference optimisation (Nash-MD, XPO).

``from nashkern import ops`` gives the fused ops (log-probs, entropy, KL, geometric-mixture
log-probs and sampling) over logits or straight from hidden states and the lm_head weight.
"""
from . import ops, reference
from .types import TokenStats

__version__ = "0.1.0"
__all__ = ["ops", "reference", "TokenStats", "__version__"]
