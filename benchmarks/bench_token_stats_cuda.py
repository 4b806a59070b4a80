#!/usr/bin/env python
"""The CUDA backend on a GPU: token statistics over logits, and the fused mixture sampler.

One command, on a machine with a CUDA GPU and a CUDA-enabled torch (after ``make cuda`` or
``NASHKERN_BUILD_CUDA=1 pip install --no-build-isolation -e .``)::

    python benchmarks/bench_token_stats_cuda.py                 # the defaults below
    python benchmarks/bench_token_stats_cuda.py --N 4096 --csv benchmarks/results/cuda.csv

1. ``token_stats`` over policy + reference logits ``[N, V]`` (default ``[16384, 151936]`` bf16,
   targets, ``coef=0.5``: every field), forward and forward+backward (gradient w.r.t. the
   policy logits), for ``backend="cuda"``, ``"triton"``, ``"torch"`` and eager PyTorch
   (``nashkern.reference.naive_token_stats`` in float32; it materialises several ``[N, V]``
   float32 tensors and may run out of memory, which is reported). The floor is a device-to-device
   copy of the same two tensors (``torch.empty_like(x).copy_(x)``): the forward reads each logit
   once, so its time is compared with half of the copy's (which reads and writes every byte);
   ``%copy`` is the forward's read bandwidth over the copy's read+write bandwidth. The ops go
   through the public API (argument checks, one host sync for the target range check); the row
   ``cuda-kernel`` times the bare forward launch of the CUDA backend.
2. ``mixture_sample`` of ``[B, V]`` last-position logits (default B = 64, bf16), in
   microseconds, per call through ``ops.mixture_sample`` (which also draws the seed on the
   device) and for the bare CUDA kernel.

Without a GPU it prints why and exits (status 0). Timings: CUDA events, median of ``--reps``
(the sampler: batches of 20 calls, per call).
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path
from typing import Callable, List, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _time_ms(fn: Callable[[], object], reps: int, warmup: int = 2, inner: int = 1) -> float:
    """Median wall time of `inner` back-to-back calls of fn, in ms per call (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times: List[float] = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def _free():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


class Table:
    def __init__(self, csv_path: Optional[Path]):
        self.rows: List[dict] = []
        self.csv_path = csv_path
        print(f"{'benchmark':<14}{'provider':<16}{'mode':<18}{'time':>12}{'GB/s':>10}{'%copy':>8}  status")

    def add(self, bench, provider, mode, time=None, unit="ms", gbps=None, pct=None, status="ok"):
        t = "-" if time is None else f"{time:.3f} {unit}"
        g = "-" if gbps is None else f"{gbps:.0f}"
        p = "-" if pct is None else f"{pct:.0f}"
        print(f"{bench:<14}{provider:<16}{mode:<18}{t:>12}{g:>10}{p:>8}  {status}", flush=True)
        self.rows.append(dict(benchmark=bench, provider=provider, mode=mode,
                              time=time if time is not None else "", unit=unit,
                              gbps=gbps if gbps is not None else "", pct_copy=pct if pct is not None else "",
                              status=status, device=torch.cuda.get_device_name()))

    def write(self):
        if self.csv_path is None:
            return
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.csv_path.exists()
        with open(self.csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(self.rows[0]))
            if new:
                w.writeheader()
            w.writerows(self.rows)


def bench_token_stats(args, table: Table) -> None:
    from nashkern import _library, ops
    from nashkern.reference import naive_token_stats

    dtype = DTYPES[args.dtype]
    N, V = args.N, args.V
    g = torch.Generator(device="cuda").manual_seed(0)
    z = (torch.randn(N, V, device="cuda", generator=g) * 2).to(dtype)
    r = (torch.randn(N, V, device="cuda", generator=g) * 2).to(dtype)
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    read_bytes = 2 * z.numel() * z.element_size()

    copy_ms = _time_ms(lambda: (torch.empty_like(z).copy_(z), torch.empty_like(r).copy_(r)),
                       args.reps)
    copy_gbps = 2 * read_bytes / copy_ms / 1e6  # read + write
    table.add("token_stats", "d2d-copy", "floor (r+w)", copy_ms, gbps=copy_gbps, pct=100.0)
    _free()

    def run(backend, z_, grad):
        if backend == "eager":
            s = naive_token_stats(z_.float(), t, r.float(), coef=0.5)
        else:
            s = ops.token_stats(z_, t, r, coef=0.5, backend=backend)
        if grad:
            (s.logprobs.sum() + s.entropy.sum() + s.kl.sum() + s.mixture_logprobs.sum()).backward()
        return s

    providers = ["cuda", "triton", "torch", "eager"]
    for provider in providers:
        if provider == "cuda" and _library._cuda_extension() is None:
            table.add("token_stats", provider, "forward",
                      status=f"skipped: {_library._cuda_unavailable_reason()}")
            continue
        if provider == "triton" and not _library._triton_available():
            table.add("token_stats", provider, "forward", status="skipped: no triton")
            continue
        for mode in ("forward", "forward+backward"):
            grad = mode != "forward"
            zz = z.detach().requires_grad_(grad)
            try:
                with torch.set_grad_enabled(grad):
                    ms = _time_ms(lambda: run(provider, zz, grad), args.reps)
                gbps = read_bytes / ms / 1e6 if not grad else None
                table.add("token_stats", provider, mode, ms, gbps=gbps,
                          pct=100.0 * gbps / copy_gbps if gbps else None)
            except torch.cuda.OutOfMemoryError:
                table.add("token_stats", provider, mode, status="out of memory")
            except Exception as e:  # noqa: BLE001 - report and go on with the next provider
                table.add("token_stats", provider, mode, status=f"error: {type(e).__name__}: {e}")
            zz.grad = None
            del zz
            _free()
    if _library._cuda_extension() is not None:  # the kernels alone: no argument checks, no sync
        from nashkern.backends import cuda_impl
        z3, r3 = z.view(1, N, V), r.view(1, N, V)
        ms = _time_ms(lambda: cuda_impl.token_stats_forward(
            z3, t, r3, coef=0.5, temperature=1.0, softcap=None, ignore_index=-100), args.reps)
        gbps = read_bytes / ms / 1e6
        table.add("token_stats", "cuda-kernel", "forward", ms, gbps=gbps, pct=100.0 * gbps / copy_gbps)
    del z, r
    _free()


def bench_sampler(args, table: Table) -> None:
    from nashkern import _library, ops
    from nashkern.backends import cuda_impl

    dtype = DTYPES[args.dtype]
    B, V = args.B, args.V
    g = torch.Generator(device="cuda").manual_seed(1)
    z = (torch.randn(B, V, device="cuda", generator=g) * 2).to(dtype)
    r = (torch.randn(B, V, device="cuda", generator=g) * 2).to(dtype)
    gen = torch.Generator(device="cuda").manual_seed(2)
    for provider in ("cuda", "triton", "torch"):
        if provider == "cuda" and _library._cuda_extension() is None:
            table.add("mixture_sample", provider, f"B={B}",
                      status=f"skipped: {_library._cuda_unavailable_reason()}")
            continue
        if provider == "triton" and not _library._triton_available():
            table.add("mixture_sample", provider, f"B={B}", status="skipped: no triton")
            continue
        try:
            ms = _time_ms(lambda: ops.mixture_sample(z, r, coef=0.5, temperature=0.9,
                                                     generator=gen, backend=provider),
                          args.reps, inner=20)
            table.add("mixture_sample", provider, f"B={B} ops call", ms * 1e3, unit="us",
                      gbps=2 * z.numel() * z.element_size() / ms / 1e6)
        except Exception as e:  # noqa: BLE001
            table.add("mixture_sample", provider, f"B={B}", status=f"error: {type(e).__name__}: {e}")
    if _library._cuda_extension() is not None:
        seed = torch.tensor([12345], dtype=torch.int64, device="cuda")
        ms = _time_ms(lambda: cuda_impl.mixture_sample(z, r, seed, coef=0.5, temperature=0.9),
                      args.reps, inner=20)
        table.add("mixture_sample", "cuda-kernel", f"B={B} kernel only", ms * 1e3, unit="us",
                  gbps=2 * z.numel() * z.element_size() / ms / 1e6)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--N", type=int, default=16384, help="token_stats rows")
    p.add_argument("--V", type=int, default=151936, help="vocabulary size")
    p.add_argument("--B", type=int, default=64, help="mixture_sample rows")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--only", choices=("token_stats", "mixture_sample"), default=None)
    p.add_argument("--csv", type=Path, default=None, help="append the rows to this CSV")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_token_stats_cuda: needs a CUDA GPU and a CUDA-enabled torch "
              "(torch.cuda.is_available() is False here); nothing measured.")
        return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"N={args.N} V={args.V} B={args.B} {args.dtype}")
    table = Table(args.csv)
    if args.only in (None, "token_stats"):
        bench_token_stats(args, table)
    if args.only in (None, "mixture_sample"):
        bench_sampler(args, table)
    table.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
