"""Run by tests/rl/test_sharded.py::test_vocab_parallel_linear_token_stats under `accelerate
launch` (2 CPU processes, gloo): ops.linear_token_stats(..., process_group=WORLD) on each rank's
rows of an odd vocabulary (37 = 19 + 18), every case of CASES, against the float64 oracle on the
full head (forward and every gradient, the weight / bias gradients against the matching rows)
and against the unsharded op on the same float32 full head (forward). Writes per-rank errors."""
import json
import os
import sys

import torch
import torch.distributed as dist

from nashkern import ops
from nashkern.naive import naive_linear_token_stats

V, N_LEAD, D, DR = 37, (3, 3), 16, 12
#: the shard pass under test: "torch" (default) or "triton" (tests/rl/test_tensor_parallel.py, under
#: TRITON_INTERPRET=1 on the CPU)
BACKEND = os.environ.get("NASHKERN_VP_BACKEND", "torch")
BOUNDS = [0, 19, 37]
IGNORED = (1, 1)          # an ignored row
MASKED_COLS = (4, 30)     # -inf in both heads' biases (one column per shard)
FIELDS = ("logprobs", "entropy", "ref_logprobs", "kl", "mixture_logprobs")
ALL = set(FIELDS)
#: name -> options. fields: the statistics the loss weights (the rest get no upstream gradient).
CASES = {
    "logprobs": dict(fields={"logprobs"}),
    "entropy_without_targets": dict(targets=False, fields={"entropy"}, softcap=3.0,
                                    temperature=0.7),
    "logprobs_entropy": dict(fields={"logprobs", "entropy"}, temperature=1.3),
    "no_bias": dict(bias=False, fields={"logprobs", "entropy"}),
    "kl": dict(ref=True, fields={"logprobs", "entropy", "ref_logprobs", "kl"}, softcap=2.5),
    "mixture": dict(ref=True, coef=0.3, fields=ALL, softcap=3.0, temperature=0.8,
                    ref_grad=True),
    "mixture_coef0": dict(ref=True, coef=0.0, fields=ALL, policy_only_mask=10, ref_grad=True),
    "mixture_coef1": dict(ref=True, coef=1.0, fields=ALL, policy_only_mask=10, ref_grad=True),
    "shared_head": dict(ref=True, shared_head=True, coef=0.5, fields=ALL, temperature=1.5),
    # every column of rank 1's shard masked: that rank holds no finite logit in any row
    "masked_shard": dict(fields={"logprobs", "entropy"}, mask_shard=1),
    # bf16 inputs (the oracle on the same rounded values): gradients come back in bf16
    "bf16_mixture": dict(ref=True, coef=0.4, fields=ALL, softcap=3.0, dtype=torch.bfloat16),
}


def _inputs(opts, g):
    N = N_LEAD[0] * N_LEAD[1]
    f64 = dict(generator=g, dtype=torch.float64)
    x = dict(hidden=torch.randn(*N_LEAD, D, **f64), weight=torch.randn(V, D, **f64) * 0.5)
    if opts.get("bias", True):
        x["bias"] = torch.randn(V, **f64)
        x["bias"][list(MASKED_COLS)] = float("-inf")
        if "policy_only_mask" in opts:
            x["bias"][opts["policy_only_mask"]] = float("-inf")
        if "mask_shard" in opts:
            k = opts["mask_shard"]
            x["bias"][BOUNDS[k]:BOUNDS[k + 1]] = float("-inf")
    if opts.get("ref"):
        x["ref_hidden"] = torch.randn(*N_LEAD, DR if not opts.get("shared_head") else D, **f64)
        if not opts.get("shared_head"):
            x["ref_weight"] = torch.randn(V, DR, **f64) * 0.5
            x["ref_bias"] = torch.randn(V, **f64)
            x["ref_bias"][list(MASKED_COLS)] = float("-inf")
    targets = None
    if opts.get("targets", True):
        allowed = [v for v in range(V) if torch.isfinite(x["bias"][v] if "bias" in x
                                                         else torch.zeros(())).item()]
        targets = torch.tensor(allowed)[torch.randint(0, len(allowed), (N,), generator=g)]
        targets[0], targets[-1] = 2, 33 if "mask_shard" not in opts else 17  # one per shard
        targets = targets.view(N_LEAD)
        targets[IGNORED] = -100
    ups = {k: torch.randn(N_LEAD, **f64) if k in opts["fields"] else None for k in FIELDS}
    return x, targets, ups


def _shard(x, lo, hi):
    return {k: (v[lo:hi] if k in ("weight", "bias", "ref_weight", "ref_bias") else v)
            for k, v in x.items()}


def _loss(st, ups):
    return sum((getattr(st, k).double() * u).sum() for k, u in ups.items() if u is not None)


def check(name, opts, rank, world, g):
    x, targets, ups = _inputs(opts, g)
    dtype = opts.get("dtype", torch.float32)
    x = {k: v.to(dtype).double() for k, v in x.items()}  # the values the op sees
    lo, hi = BOUNDS[rank], BOUNDS[rank + 1]
    scalars = dict(coef=opts.get("coef"), temperature=opts.get("temperature", 1.0),
                   softcap=opts.get("softcap"))
    frozen = () if opts.get("ref_grad") else ("ref_hidden", "ref_weight", "ref_bias")

    def leaves(d, dtype):
        return {k: v.to(dtype).clone().requires_grad_(k not in frozen) for k, v in d.items()}

    oracle_in = leaves(x, torch.float64)
    ref = naive_linear_token_stats(targets=targets, **oracle_in, **scalars)
    _loss(ref, ups).backward()
    mine_in = leaves(_shard(x, lo, hi), dtype)
    st = ops.linear_token_stats(targets=targets, **mine_in, **scalars,
                                process_group=dist.group.WORLD, backend=BACKEND)
    _loss(st, ups).backward()
    full = ops.linear_token_stats(targets=targets, **{k: v.to(dtype) for k, v in x.items()},
                                  **scalars)
    err, scale = {}, {}
    for k in FIELDS:
        a, b, c = getattr(st, k), getattr(ref, k), getattr(full, k)
        assert (a is None) == (b is None) == (c is None), (name, k)
        if a is not None:
            assert torch.isfinite(a).all(), (name, k, a)
            err[k] = (a.double() - b).abs().max().item()
            err[f"{k}_vs_unsharded"] = (a - c).abs().max().item()
            scale[k] = b.abs().max().item()
    if targets is not None:  # ignored rows: 0 in every field
        assert all(getattr(st, k)[IGNORED] == 0 for k in FIELDS if getattr(st, k) is not None)
    for k, v in mine_in.items():
        if v.requires_grad:
            want = oracle_in[k].grad
            want = want[lo:hi] if k in ("weight", "bias", "ref_weight", "ref_bias") else want
            assert v.grad is not None, (name, k)
            err[f"d_{k}"] = (v.grad.double() - want).abs().max().item()
            scale[f"d_{k}"] = want.abs().max().item()
    return dict(err=err, scale=scale)


def check_nan_row(rank, g):
    """A NaN hidden row: NaN in its statistics, every other row as without it."""
    x, targets, _ = _inputs(CASES["kl"], g)
    lo, hi = BOUNDS[rank], BOUNDS[rank + 1]
    x = {k: v.float() for k, v in x.items()}
    clean = ops.linear_token_stats(targets=targets, **_shard(x, lo, hi),
                                   process_group=dist.group.WORLD, backend=BACKEND)
    x["hidden"][0, 2, 5] = float("nan")
    st = ops.linear_token_stats(targets=targets, **_shard(x, lo, hi),
                                process_group=dist.group.WORLD, backend=BACKEND)
    out = {}
    for k in ("logprobs", "entropy", "ref_logprobs", "kl"):
        a, b = getattr(st, k).clone(), getattr(clean, k)
        out[f"{k}_nan_in_row"] = bool(torch.isnan(a[0, 2]))
        a[0, 2] = b[0, 2]
        out[f"{k}_others_equal"] = bool(torch.equal(a, b))
    return out


def check_empty():
    """N = 0: empty statistics, gradients of the right shapes (no collective)."""
    h = torch.zeros(0, D, requires_grad=True)
    w = torch.randn(BOUNDS[dist.get_rank() + 1] - BOUNDS[dist.get_rank()], D, requires_grad=True)
    st = ops.linear_token_stats(h, w, torch.zeros(0, dtype=torch.long),
                                process_group=dist.group.WORLD, backend=BACKEND)
    (st.logprobs.sum() + st.entropy.sum()).backward()
    return dict(shape=list(st.logprobs.shape), d_hidden=list(h.grad.shape),
                d_weight_zero=bool((w.grad == 0).all()))


def check_different_tokens():
    """Rank r passes N = r + 2 tokens: a ValueError on every rank naming N (not a gloo abort),
    then the group still works (a correct call after it)."""
    rank = dist.get_rank()
    w = torch.randn(BOUNDS[rank + 1] - BOUNDS[rank], D)
    try:
        ops.linear_token_stats(torch.randn(rank + 2, D), w, torch.zeros(rank + 2,
                                                                        dtype=torch.long),
                               process_group=dist.group.WORLD)
        message = ""
    except ValueError as e:
        message = str(e)
    after = ops.linear_token_stats(torch.randn(3, D), w, torch.zeros(3, dtype=torch.long),
                                   process_group=dist.group.WORLD)
    return dict(message=message, after_shape=list(after.logprobs.shape))


def main(out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, world
    res = {}
    for i, (name, opts) in enumerate(CASES.items()):
        res[name] = check(name, opts, rank, world, torch.Generator().manual_seed(i))
    res["nan_row"] = check_nan_row(rank, torch.Generator().manual_seed(99))
    res["empty"] = check_empty()
    res["different_tokens"] = check_different_tokens()
    results = [None] * world
    dist.all_gather_object(results, res)
    if rank == 0:
        with open(os.path.join(out, "vocab_parallel.json"), "w") as f:
            json.dump({"world": world, "backend": BACKEND, "ranks": results}, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # torch 2.13's gloo teardown race (see ddp_worker.py)
