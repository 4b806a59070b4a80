"""Applications built on both wings: the ``nashkern`` command line, the demo, and tiny local
models and tokenizers for tests and demos (no model hub)."""
