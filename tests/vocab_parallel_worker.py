"""Run by tests/test_sharded.py::test_vocab_parallel_stats_match_unsharded under
`accelerate launch` (2 CPU processes, gloo): each rank holds its rows of an odd vocabulary
(37 = 19 + 18), the statistics and gradients are compared with the float64 unsharded oracle."""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from nashkern.naive import naive_linear_token_stats  # noqa: E402
from nashkern.vocab_parallel import vocab_parallel_linear_token_stats  # noqa: E402


def main(out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)  # the same full tensors on every rank
    N, D, Dr, V = 7, 16, 12, 37
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5
    rh = torch.randn(N, Dr, generator=g, dtype=torch.float64)
    rw = torch.randn(V, Dr, generator=g, dtype=torch.float64) * 0.5
    t = torch.randint(0, V, (N,), generator=g)
    t[3] = -100  # an ignored row
    ups = [torch.randn(N, generator=g, dtype=torch.float64) for _ in range(3)]
    bounds = [0, (V + 1) // 2, V]
    lo, hi = bounds[rank], bounds[rank + 1]
    # the oracle (float64, unsharded)
    h64, w64 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = naive_linear_token_stats(h64, w64, t, ref_hidden=rh, ref_weight=rw)
    (ref.logprobs * ups[0] + ref.entropy * ups[1] + ref.kl * ups[2]).sum().backward()
    # the vocab-parallel op on float32 shards
    h32 = h.float().requires_grad_()
    w32 = w[lo:hi].float().clone().requires_grad_()
    st = vocab_parallel_linear_token_stats(h32, w32, t, ref_hidden=rh.float(),
                                           ref_weight=rw[lo:hi].float())
    (st.logprobs * ups[0].float() + st.entropy * ups[1].float() + st.kl * ups[2].float()
     ).sum().backward()
    err = {k: (getattr(st, k).double() - getattr(ref, k)).abs().max().item()
           for k in ("logprobs", "entropy", "ref_logprobs", "kl")}
    err["d_hidden"] = (h32.grad.double() - h64.grad).abs().max().item()
    err["d_weight"] = (w32.grad.double() - w64.grad[lo:hi]).abs().max().item()
    err["scale"] = max(h64.grad.abs().max().item(), w64.grad.abs().max().item())
    errs = [None] * world
    dist.all_gather_object(errs, err)
    if rank == 0:
        with open(os.path.join(out, "vocab_parallel.json"), "w") as f:
            json.dump({"world": world, "errors": errs}, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # torch 2.13's gloo teardown race (see ddp_worker.py)
