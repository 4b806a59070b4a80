"""The RL wing: online preference trainers on ``transformers.Trainer`` and the small functions
they wire (generation, scoring, judges, completion statistics, pairs, losses).

Built on :mod:`nashkern.ops`; nothing in the kernel library imports this package.
"""
