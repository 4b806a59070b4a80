"""pytest set-up of the kernel benchmarks: options, one test per (shape, workload, mode,
provider) of each suite's ``SPEC``, the CUDA timer, and the CSV at the end of the run.

    pytest benchmarks                          # tiny shapes without a GPU, model shapes with one
    pytest benchmarks --bench-shapes auto --bench-csv auto     # what `make bench` runs
"""
import pytest

import bench_config as cfg
import bench_harness as bh

_SESSION = pytest.StashKey()
_WRITTEN = pytest.StashKey()


def pytest_addoption(parser):
    g = parser.getgroup("nashkern kernel benchmarks")
    g.addoption("--bench-shapes", choices=[*cfg.SHAPE_SETS, "auto"],
                help="shape set (bench_config.SHAPE_SETS): default 'models' on a CUDA device, "
                     "'tiny' otherwise; 'auto': 'models' on a CUDA device, 'cpu' otherwise")
    g.addoption("--bench-models", help="comma-separated models of the set (default: all)")
    g.addoption("--bench-n", help="comma-separated N (B for mixture_sample) instead of the set's")
    g.addoption("--bench-dtype", choices=sorted(bh.DTYPES), help="default: the set's")
    g.addoption("--bench-providers", help="comma-separated providers (default: the set's, "
                                          "else all)")
    g.addoption("--bench-workloads", help="comma-separated workloads, 'sample' for "
                                          "mixture_sample (default: the set's, else all)")
    g.addoption("--bench-modes", help="comma-separated modes (default: the set's, else all)")
    g.addoption("--bench-rounds", type=int,
                help="timed rounds per case (CPU: exactly this, default 3; CUDA: at least this, "
                     "default 5, more up to ~1 s of timed calls)")
    g.addoption("--bench-threads", type=int,
                help="CPU: torch.set_num_threads for the run; 0: torch's default (default: the "
                     "set's: 1 for 'cpu', per-core figures that a shared machine cannot skew)")
    g.addoption("--bench-contended", type=int, default=0, metavar="N",
                help="start N competing busy processes (a Python spin loop each) for the whole "
                     "run and stop them at the end: the 'contended' mode (issue 24: a CI "
                     "runner or a laptop's other work sharing the cores); default 0")
    g.addoption("--bench-csv", metavar="PATH",
                help="append one row per case to PATH ('auto': benchmarks/results/<device>.csv)")


_COMPETITORS = pytest.StashKey()


def pytest_configure(config):
    config.stash[_SESSION] = bh.Session(config)
    n = config.getoption("--bench-contended", 0) or 0
    if n:
        import subprocess
        import sys

        config.stash[_COMPETITORS] = [
            subprocess.Popen([sys.executable, "-c", "while True:\n    pass\n"])
            for _ in range(n)]
        # contended rows never mix with quiet ones: the CSV's device names the contention
        config.stash[_SESSION].facts["device"] += f" [contended: {n} busy process(es)]"


def pytest_unconfigure(config):
    for proc in config.stash.get(_COMPETITORS, []):
        proc.kill()
        proc.wait()


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    session = metafunc.config.stash[_SESSION]
    sel = session.selection(metafunc.config)
    spec: bh.OpSpec = metafunc.module.SPEC
    sizes = sel["n"] or (session.shapes.rows if spec.name == "mixture_sample"
                         else session.shapes.tokens)
    cases = [
        bh.Case(spec, provider, workload, mode, model, n, session.dtype)
        for model in sel["models"] for n in sizes
        for workload in spec.workloads if sel["workloads"] is None or workload in sel["workloads"]
        for mode in spec.modes if sel["modes"] is None or mode in sel["modes"]
        for provider in spec.providers
        if sel["providers"] is None or provider.name in sel["providers"]
    ]
    metafunc.parametrize("case", cases, ids=[c.id for c in cases])


def pytest_collection_modifyitems(config, items):
    if config.stash[_SESSION].device == "cuda":
        for item in items:  # rounds end when the device is done, not when the launches are
            item.add_marker(pytest.mark.benchmark(timer=bh.synchronized_timer))


@pytest.fixture(scope="session")
def bench_session(request) -> bh.Session:
    return request.config.stash[_SESSION]


@pytest.hookimpl(hookwrapper=True, tryfirst=True)  # before pytest-benchmark saves its results
def pytest_sessionfinish(session):
    bench = session.config.stash.get(_SESSION, None)
    if bench is not None:
        bench.finalize()  # the floors use the best rates measured in the run
        path = bench.write_csv()
        if path is not None:
            session.config.stash[_WRITTEN] = (path, len(bench.rows))
    yield



def pytest_terminal_summary(terminalreporter, config):
    bench = config.stash.get(_SESSION, None)
    if bench is None:
        return
    tr = terminalreporter
    tr.section("nashkern kernel benchmarks")
    competitors = len(config.stash.get(_COMPETITORS, []))
    if competitors:
        tr.write_line(f"contended: {competitors} competing busy process(es) ran beside every "
                      "case")
    tr.write_line(f"device: {bench.name} | torch {bench.facts['torch']} | triton "
                  f"{bench.facts['triton'] or 'n/a'} | commit {bench.facts['git_commit']} | "
                  f"shapes '{bench.shapes_name}' {bench.dtype}")
    counts = {}
    for row in bench.rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    tr.write_line("cases: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    from bench_harness import strategy_ratios
    for line in strategy_ratios(bench.rows):
        tr.write_line(line)
    written = config.stash.get(_WRITTEN, None)
    if written:
        tr.write_line(f"appended {written[1]} rows to {written[0]}")
    if bench.device != "cuda":
        tr.write_line("no CUDA device: CPU figures only (torch backend and eager PyTorch, peak "
                      "memory). The GPU figures (Triton and CUDA backends, Liger-Kernel, Cut "
                      "Cross-Entropy, roofline vs bf16 matmul) need a GPU: run `make bench` on a "
                      "CUDA machine.")
