#!/usr/bin/env python3
"""One small run of every GPU kernel, forward and backward: what ``scripts/device_check.py``
runs under ``compute-sanitizer --tool memcheck`` (part 3). Odd sizes (partial row blocks and
vocabulary tiles), bf16, a reference model and the mixture, so that every masked load and store
of each kernel runs.

Kernels: Triton token_stats (forward, merge, backward), Triton linear_token_stats fused
(forward, merge, backward), Triton mixture_sample, CUDA token_stats and mixture_sample, and the
chunked strategy with each epilogue (cuBLAS + the kernels above).

Without a GPU (the dry run): the same calls on the CPU, Triton in the interpreter, the CUDA
backend left out. Prints one line per case; exits non-zero on the first failure.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nashkern import ops  # noqa: E402
from nashkern.backends.cuda import library as cuda_lib  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: Tokens, hidden size, vocabulary: odd, several row blocks and vocabulary tiles on the device;
#: smaller in the interpreter (the dry run checks the calls, not the kernels' memory accesses).
N, D, V = (70, 64, 1001) if DEVICE == "cuda" else (6, 16, 97)


def _randn(*shape, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(torch.bfloat16)


def token_stats_case(backend: str) -> None:
    z = _randn(2, N // 2, V, scale=3.0).requires_grad_(True)
    r = _randn(2, N // 2, V, scale=3.0).requires_grad_(True)
    t = torch.randint(0, V, (2, N // 2), device=DEVICE)
    t[0, 1] = -100
    s = ops.token_stats(z, t, r, coef=0.5, temperature=0.9, softcap=30.0, backend=backend)
    sum(f.sum() for f in s).backward()


def linear_case(backend: str, strategy: str) -> None:
    h = _randn(N, D).requires_grad_(True)
    w = _randn(V, D, scale=D ** -0.5).requires_grad_(True)
    rh, rw = _randn(N, D), _randn(V, D, scale=D ** -0.5)
    t = torch.randint(0, V, (N,), device=DEVICE)
    s = ops.linear_token_stats(h, w, t, ref_hidden=rh, ref_weight=rw, coef=0.5, softcap=30.0,
                               backend=backend, strategy=strategy)
    sum(f.sum() for f in s).backward()


def sample_case(backend: str) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids = ops.mixture_sample(_randn(5, V), _randn(5, V), coef=0.5, temperature=0.9,
                             generator=gen, backend=backend)
    assert ((ids >= 0) & (ids < V)).all(), ids


def cases():
    """The hand-written CUDA kernels first (their indexing is ours alone; a deadline that cuts
    the run short leaves the Triton ones, whose loads and stores are masked by construction)."""
    if DEVICE == "cuda":
        reason = cuda_lib.unavailable_reason()
        if reason is not None:
            raise SystemExit(f"backend='cuda' unavailable on the device: {reason}")
        yield "cuda token_stats", lambda: token_stats_case("cuda")
        yield "cuda mixture_sample", lambda: sample_case("cuda")
        yield "cuda linear_token_stats chunked", lambda: linear_case("cuda", "chunked")
    yield "triton token_stats", lambda: token_stats_case("triton")
    yield "triton linear_token_stats fused", lambda: linear_case("triton", "fused")
    yield "triton mixture_sample", lambda: sample_case("triton")
    yield "triton linear_token_stats chunked", lambda: linear_case("triton", "chunked")


def main() -> int:
    torch.manual_seed(0)
    for name, run in cases():
        run()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        print(f"sanitizer case ok: {name} ({DEVICE})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
