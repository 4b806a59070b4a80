"""The CUDA backend (``backend="cuda"``): ``library.py`` loads ``csrc/``'s kernels through ctypes; one file per op."""
