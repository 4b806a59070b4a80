#!/usr/bin/env bash
# Issue 24's measurements, to be run on a QUIET machine (nothing else running), from the repo
# root, after `make install` and `make bench-trl` (which builds .venv-trl). Prints `uptime` before
# each part so the load is on record next to every figure. ~25-40 min on 2 cores.
#   benchmarks/issue24_quiet.sh [THREADS]       (default 1: the trainer benchmark's configuration)
set -euo pipefail
THREADS=${1:-1}
PY=.venv/bin/python
CSV=benchmarks/results/trainers_cpu.csv

echo "== sampler: mixture_sample [8, 151936] fp32, 1 thread, torch backend beside eager"
uptime
(cd benchmarks && ../$PY -m pytest test_bench_mixture_sample.py -q -p no:cacheprovider \
    --bench-shapes cpu --bench-n 8 --bench-threads 1 --bench-providers nashkern-torch,eager \
    --benchmark-columns=median,min,rounds)

echo "== op benchmark, contended: linear_token_stats fwd+bwd, N=2048, 2 threads, 1 busy process"
uptime
(cd benchmarks && ../$PY -m pytest test_bench_linear_token_stats.py -q -p no:cacheprovider \
    --bench-shapes cpu --bench-n 2048 --bench-threads 2 --bench-contended 1 \
    --benchmark-columns=median,min,rounds)

echo "== trainers, quiet: Nash-MD, nashkern vs TRL 1.13, fp32, batch 8, 64 new tokens"
uptime
$PY benchmarks/bench_trainers.py --compare --method nash_md --threads "$THREADS" \
    --csv "$CSV" --note "issue 24 quiet"

echo "== trainers, contended: the same with one competing busy process"
uptime
$PY benchmarks/bench_trainers.py --compare --method nash_md --threads "$THREADS" \
    --contended 1 --csv "$CSV" --note "issue 24 contended (1 busy process)"
uptime
