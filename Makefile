# Set-up is part of every target: a fresh machine needs nothing but python3.
# TORCH_SPEC pins the CPU wheel available here; on a GPU runner pass a CUDA build, e.g.
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_WORKERS ?= 2

.PHONY: install test test-suite test-root test-wheel test-min-versions wheel demo bench bench-gpu bench-peers clean bench-trl device-check \
	device-check-dry-run device-wheels compile-gate

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_SPEC)
	# The newest releases the declared ranges admit (what a new user gets); .ci/min-versions.txt
	# is the other end (make test-min-versions).
	NASHKERN_SKIP_CUDA_BUILD=$${NASHKERN_SKIP_CUDA_BUILD:-1} $(PY) -m pip install -q \
		--no-build-isolation -e ".[test,peft,triton]"
	# DeepSpeed for the ZeRO-3 tests (tests/rl/test_sharded.py; CPU: DS_ACCELERATOR=cpu at run time);
	# DS_BUILD_OPS=0: no C++/CUDA op is compiled at install (pure Python, ~15 s)
	DS_BUILD_OPS=0 $(PY) -m pip install -q "deepspeed>=0.16"
	@$(PY) scripts/versions.py
	touch $@

install: $(VENV)/.installed

# The whole suite. Without a GPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1,
# set by tests/conftest.py) on small shapes.
# make test = what CI runs (.ci/run): the suite with the newest releases, the checks a user makes
# from the repository root, the built wheel installed (not editable) into a fresh venv and used
# from outside the repository, and the suite's min_versions part at the declared lower bounds.
test: test-suite test-root test-wheel test-min-versions

test-suite: install
	$(PY) -m pytest tests -q -n $(PYTEST_WORKERS) -p no:cacheprovider

# From the repository root, where the top-level kernels/ folder is on sys.path: it must not
# shadow the PyPI package `kernels` that transformers imports (DESIGN.md, "Packaging").
test-root: install
	$(PY) -m nashkern --version
	$(PY) -m nashkern --help > /dev/null
	$(PY) -c "import kernels, nashkern.rl.online, nashkern.kernels.token_stats as k; \
		assert 'site-packages' in (kernels.__file__ or ''), kernels.__file__; print('root imports ok')"
	$(PY) -m pytest --collect-only -q -p no:cacheprovider tests | tail -1

# The wheel, built as pip builds it for users (isolated build; no CUDA toolchain used).
WHEEL_DIR ?= build/wheel
wheel:
	rm -rf $(WHEEL_DIR) build/lib build/bdist* *.egg-info
	NASHKERN_SKIP_CUDA_BUILD=1 $(PYTHON) -m pip wheel -q --no-deps -w $(WHEEL_DIR) .

# A fresh venv with the newest releases, the wheel installed from its file (not editable), the
# smoke script run from a directory outside the repository.
WHEEL_VENV ?= build/venv-wheel
SMOKE_DIR ?= $(shell mktemp -d)
test-wheel: wheel
	rm -rf $(WHEEL_VENV) && $(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip install -q --upgrade pip
	$(WHEEL_VENV)/bin/pip install -q $(TORCH_SPEC)
	$(WHEEL_VENV)/bin/pip install -q $(WHEEL_DIR)/nashkern-*.whl
	$(WHEEL_VENV)/bin/pip check
	@$(WHEEL_VENV)/bin/python scripts/versions.py
	cd $(SMOKE_DIR) && PATH=$(CURDIR)/$(WHEEL_VENV)/bin:$$PATH \
		$(CURDIR)/$(WHEEL_VENV)/bin/python $(CURDIR)/scripts/wheel_smoke.py --source $(CURDIR)

# The declared lower bounds installed exactly (.ci/min-versions.txt; they are the GPU runner
# image's versions too), the wheel's dependencies resolved from its metadata under them, the
# smoke script on the wheel, then the tests marked min_versions from the root (the source tree).
MIN_VENV ?= build/venv-min
test-min-versions: wheel
	rm -rf $(MIN_VENV) && $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install -q --upgrade pip
	$(MIN_VENV)/bin/pip install -q -c .ci/min-versions.txt "$$(ls $(WHEEL_DIR)/nashkern-*.whl)[test,peft,triton]"
	$(MIN_VENV)/bin/pip check
	@$(MIN_VENV)/bin/python scripts/versions.py --expect .ci/min-versions.txt
	cd $(SMOKE_DIR) && PATH=$(CURDIR)/$(MIN_VENV)/bin:$$PATH \
		$(CURDIR)/$(MIN_VENV)/bin/python $(CURDIR)/scripts/wheel_smoke.py --source $(CURDIR)
	$(MIN_VENV)/bin/python -m pytest tests -q -n $(PYTEST_WORKERS) -p no:cacheprovider -m min_versions

demo: install
	$(PY) -m nashkern demo

# Kernel microbenchmarks: the pytest-benchmark suites benchmarks/test_bench_*.py (BENCHMARKS.md).
# On a CUDA machine every provider at the model shapes (bf16); without one the CPU-meaningful
# figures (torch backend vs eager PyTorch, peak memory; ~8 min, 1 thread), and it says the
# GPU figures need a GPU. Rows are appended to benchmarks/results/<device>.csv, then BENCHMARKS.md
# and its plots are regenerated (also when a case failed). BENCH_ARGS: more options, e.g.
#   make bench BENCH_ARGS="--bench-models llama-3-8b --bench-n 4096 --bench-providers eager,nashkern-triton"
BENCH_ARGS ?=
bench: install
	$(PY) -m pytest benchmarks/test_bench_*.py -q -p no:cacheprovider --bench-shapes auto \
		--bench-csv auto --benchmark-columns=median,iqr,min,rounds,iterations $(BENCH_ARGS); \
	status=$$?; $(PY) benchmarks/render.py && exit $$status

# The benchmarks' third-party peers (CUDA only; without them those providers are skipped).
BENCH_PEERS ?= liger-kernel cut-cross-entropy
bench-peers: install
	$(PY) -m pip install -q $(BENCH_PEERS)

# The lent GPU runner (no network; 15 min of device time per session, machine start included;
# <= 10 min and <= 8 returned files per call): ONE call, `make device-check`, with the machine's own
# python3 and the wheels carried in .whl/ (scripts/device_check.py; README "On a lent GPU").
# Parts in value order, each under its deadline, 480 s in all: correctness at the model shapes
# + the GPU test files, the headline benchmark, compute-sanitizer, trainer vs TRL. $(OUT) gets
# summary.md / .json, correctness.xml, tests.xml, bench.csv, trainers.csv, logs.txt.
DEVICE_PYTHON ?= python3
OUT ?= out
device-check:
	TRITON_INTERPRET= $(DEVICE_PYTHON) scripts/device_check.py --out $(OUT)

# Here (no GPU): each part's Python on the CPU at tiny sizes, the imports of the real run, the
# benchmark selection (CI runs it: tests/tools/test_device_check.py).
device-check-dry-run: install
	$(PY) scripts/device_check.py --dry-run --out $(OUT)/dry-run

# The wheels the runner's image lacks (scripts/device_wheels.txt: 2.6 MiB), for CPython 3.12,
# into a clean .whl/ (ignored), then checked against the sizes recorded there.
WHEEL_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
device-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --abi cp312 --abi none $(addprefix --platform ,$(WHEEL_PLATFORMS)) \
		--platform any -d .whl -r scripts/device_wheels.txt
	$(PYTHON) scripts/device_check.py --verify-wheels

# The compile gate alone (make test runs it too): every Triton kernel AOT for sm_90 and sm_80.
# --markdown auto: the committed table of the installed Triton (compile_gate.md, or
# compile_gate_triton-<X.Y>.md for the GPU image's); tests/ops/test_compile_gate.py checks it is current.
compile-gate: install
	env -u TRITON_INTERPRET $(PY) scripts/compile_gate.py --markdown auto

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# The CUDA kernels (csrc/*.cu) -> nashkern/_nashkern_cuda.so in place, for backend="cuda": nvcc
# only (no GPU, no CUDA torch needed to build). NASHKERN_CUDA_ARCHS="80;90" by default; the nvcc
# command lines are printed (flags live in csrc/build_cuda.py, shared with setup.py and the tests).
.PHONY: cuda
cuda:
	$(PYTHON) csrc/build_cuda.py --output nashkern/_nashkern_cuda.so

# Trainers side by side with TRL 1.13 (NashMDTrainer / XPOTrainer, trl.experimental), on the CPU:
# TRL lives in its own virtualenv $(TRL_VENV) (benchmarks/trl/setup_venv.sh); each trainer runs in
# a fresh subprocess under its own venv. METHOD=nash_md (issue 3) or METHOD=xpo (issue 6).
TRL_VENV ?= .venv-trl
METHOD ?= nash_md
$(TRL_VENV)/.installed: benchmarks/trl/setup_venv.sh
	PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" benchmarks/trl/setup_venv.sh $(TRL_VENV)

bench-trl: install $(TRL_VENV)/.installed
	$(PY) benchmarks/bench_trainers.py --compare --method $(METHOD) --nashkern-python $(PY) \
		--trl-python $(TRL_VENV)/bin/python --csv benchmarks/results/trainers_cpu.csv
