"""The plain-PyTorch backend (``backend="torch"``): one file per op, shared pieces in ``common.py``."""
