"""Compile gate: every Triton kernel, ahead of time, for sm_90 and sm_80, without a GPU.

For each kernel of ``kernels/*.py`` (looked up by its name among the ``@triton.jit`` functions
of the ``nashkern.kernels`` modules), each frozen config of ``nashkern.tuning`` for the target
architecture and each launch variant the host wrappers can make (dtype x features, declared once
in ``LAUNCHES`` below), this compiles ``triton.compile(ASTSource(...), target=GPUTarget(...))``
(Triton ships its own ptxas), reads the cubin back with the ``cuobjdump`` that Triton ships and
checks:

* it compiles;
* shared memory <= the architecture's per-block limit (227 KiB sm_90, 163 KiB sm_80);
* bf16/fp16 variants: zero register spills (no ``STACK`` / ``LOCAL`` bytes, no ``STL`` in SASS);
* the bf16 forward of ``linear_token_stats`` issues tensor-core MMA in its SASS (HGMMA, i.e.
  wgmma, on sm_90; HMMA on sm_80).

Usage (needs no GPU; ``TRITON_INTERPRET`` must be unset, the script refuses otherwise)::

    python scripts/compile_gate.py [--arch sm_90,sm_80] [--jobs 2] [--json out.json]
                                   [--markdown benchmarks/results/compile_gate.md | auto]

``--markdown auto`` writes the committed table of the running Triton (``table_path()``:
``benchmarks/results/compile_gate_triton-<major.minor>.md`` where one is kept for that version,
else ``compile_gate.md``); ``tests/ops/test_compile_gate.py`` fails when the committed table of the
running Triton differs from what the gate produces (run ``make compile-gate``).

Exit status 1 when a check fails. Triton's own cache (``TRITON_CACHE_DIR``, default
``~/.triton/cache``) makes a second run of unchanged kernels take seconds.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"

#: Target architectures: compute capability and the largest shared memory one block may opt in
#: to (CUDA C Programming Guide, "Technical Specifications per Compute Capability").
ARCHS: Dict[str, Tuple[int, int]] = {
    "sm_90": (90, 227 * 1024),
    "sm_80": (80, 163 * 1024),
}
DTYPES = ("bf16", "fp16", "fp32")
#: Scalar (non-pointer, non-constexpr) arguments that are floats; every other scalar is an int.
FLOAT_SCALARS = {"coef", "inv_temperature", "softcap"}
#: Integer arguments launched with values divisible by 16 in practice (hidden sizes, vocabulary
#: strides of model shapes): Triton specialises them as such at launch.
DIVISIBLE_16 = {"D", "DR", "logits_stride_g", "logits_stride_r", "ref_stride_g", "ref_stride_r",
                "logits_stride", "ref_stride"}
#: Upper bound of the merge kernels' BLOCK_SPLITS (next power of two of the vocabulary splits:
#: a few programs per SM over 132 SMs).
MAX_BLOCK_SPLITS = 64


@dataclass(frozen=True)
class Launch:
    """One Triton kernel as its host wrapper launches it.

    ``inputs``: pointer arguments in the model's dtype; ``int64`` / ``int32``: integer pointers;
    every other pointer is fp32. ``present``: pointer -> predicate over the constexprs; where it
    is False the wrapper passes None. ``features``: named feature sets (constexpr flags) the
    wrapper can launch; ``config``: (tuning config, dtype) -> block-size constexprs and the
    launch options (num_warps, num_stages)."""

    family: str  # tuning.config_for kernel name
    kernel: str  # the @triton.jit function's name
    inputs: Tuple[str, ...]
    features: Dict[str, Dict[str, bool]]
    config: Callable[[object, str], Tuple[Dict[str, int], Dict[str, int]]]
    present: Dict[str, Callable[[Dict], bool]] = field(default_factory=dict)
    int64: Tuple[str, ...] = ("targets_ptr",)
    int32: Tuple[str, ...] = ()
    dtypes: Tuple[str, ...] = DTYPES
    #: extra (feature, dtype, constexpr overrides) variants, e.g. fp32 operands as tf32
    extra: Tuple[Tuple[str, str, Dict[str, bool]], ...] = ()


def _flags(**kw) -> Dict[str, bool]:
    return kw


_TS_FEATURES = {
    "policy": _flags(HAS_TARGETS=True, HAS_REF=False, HAS_MIX=False, HAS_SOFTCAP=False),
    "all": _flags(HAS_TARGETS=True, HAS_REF=True, HAS_MIX=True, HAS_SOFTCAP=True),
}
_LTS_FWD_FEATURES = {
    "policy": _flags(HAS_BIAS=False, HAS_REF=False, HAS_REF_BIAS=False, HAS_TARGETS=True,
                     HAS_MIX=False, HAS_SOFTCAP=False),
    "trainer": _flags(HAS_BIAS=False, HAS_REF=True, HAS_REF_BIAS=False, HAS_TARGETS=True,
                      HAS_MIX=True, HAS_SOFTCAP=False),
    "all": _flags(HAS_BIAS=True, HAS_REF=True, HAS_REF_BIAS=True, HAS_TARGETS=True,
                  HAS_MIX=True, HAS_SOFTCAP=True),
}
_NO_GRADS = _flags(HAS_GRAD_HIDDEN=False, HAS_GRAD_WEIGHT=False, HAS_GRAD_BIAS=False,
                   HAS_GRAD_REF_HIDDEN=False, HAS_GRAD_REF_WEIGHT=False, HAS_GRAD_REF_BIAS=False)
_LTS_BWD_FEATURES = {
    "policy": {**_LTS_FWD_FEATURES["policy"], **_NO_GRADS, "HAS_GRAD_HIDDEN": True,
               "HAS_GRAD_WEIGHT": True},
    "trainer": {**_LTS_FWD_FEATURES["trainer"], **_NO_GRADS, "HAS_GRAD_HIDDEN": True,
                "HAS_GRAD_WEIGHT": True},
    "all": {**_LTS_FWD_FEATURES["all"], **{k: True for k in _NO_GRADS}},
}


def _ts_fwd(cfg, dtype):
    return {"BLOCK_V": cfg.BLOCK_V_FWD}, {"num_warps": cfg.num_warps}


def _ts_bwd(cfg, dtype):
    return {"BLOCK_V": cfg.BLOCK_V_BWD}, {"num_warps": cfg.num_warps}


def _merge(cfg, dtype):
    return {"BLOCK_SPLITS": MAX_BLOCK_SPLITS}, {"num_warps": 1}


def _lts(block_v_field):
    def config(cfg, dtype):
        consts = {"BLOCK_N": cfg.BLOCK_N, "BLOCK_V": getattr(cfg, block_v_field),
                  "BLOCK_D": cfg.BLOCK_D, "IS_TF32": False}
        if block_v_field == "BLOCK_V_BWD":
            # split_grad_operand (hi + lo gradient operands) is an internal numerics option of
            # the host wrapper, off on every path the ops launch
            consts.update(IS_SPLIT_DZ=False, IS_SPLIT_DR=False, GROUP_N=cfg.GROUP_N_BWD)
        return consts, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return config


def _lts_merge(cfg, dtype):
    return {"BLOCK_N": cfg.BLOCK_N}, {}


def _mix(cfg, dtype):
    return {"BLOCK_K": cfg.BLOCK_V // 4}, {"num_warps": cfg.num_warps}


_TS_PRESENT = {"ref_ptr": lambda c: c["HAS_REF"], "targets_ptr": lambda c: c["HAS_TARGETS"]}
_LTS_PRESENT = {
    "bias_ptr": lambda c: c["HAS_BIAS"], "ref_hidden_ptr": lambda c: c["HAS_REF"],
    "ref_weight_ptr": lambda c: c["HAS_REF"], "ref_bias_ptr": lambda c: c["HAS_REF_BIAS"],
    "targets_ptr": lambda c: c["HAS_TARGETS"],
}
_LTS_INPUTS = ("hidden_ptr", "weight_ptr", "bias_ptr", "ref_hidden_ptr", "ref_weight_ptr",
               "ref_bias_ptr")
_TF32 = {"IS_TF32": True}

#: Every kernel the host wrappers launch, with the variants they can launch.
LAUNCHES: Tuple[Launch, ...] = (
    Launch("token_stats", "_token_stats_fwd_kernel", ("logits_ptr", "ref_ptr"),
           {f"{name}{split}": {**f, "IS_SPLIT": split == "+split"}
            for name, f in _TS_FEATURES.items() for split in ("", "+split")},
           _ts_fwd,
           present={**_TS_PRESENT, "partial_ptr": lambda c: c["IS_SPLIT"]}),
    Launch("token_stats", "_token_stats_merge_kernel", ("logits_ptr", "ref_ptr"), _TS_FEATURES,
           _merge, present=_TS_PRESENT),
    Launch("token_stats", "_token_stats_bwd_kernel",
           ("logits_ptr", "ref_ptr", "grad_logits_ptr", "grad_ref_ptr"),
           {"policy": {**_TS_FEATURES["policy"], "HAS_GRAD_LOGITS": True, "HAS_GRAD_REF": False},
            "all": {**_TS_FEATURES["all"], "HAS_GRAD_LOGITS": True, "HAS_GRAD_REF": True}},
           _ts_bwd,
           present={**_TS_PRESENT, "grad_logits_ptr": lambda c: c["HAS_GRAD_LOGITS"],
                    "grad_ref_ptr": lambda c: c["HAS_GRAD_REF"]}),
    Launch("linear_token_stats", "_fwd_kernel", _LTS_INPUTS, _LTS_FWD_FEATURES,
           _lts("BLOCK_V_FWD"), present=_LTS_PRESENT, extra=(("all", "fp32", _TF32),)),
    Launch("linear_token_stats", "_merge_kernel", (),
           {"policy": _flags(HAS_REF=False, HAS_TARGETS=True, HAS_MIX=False),
            "all": _flags(HAS_REF=True, HAS_TARGETS=True, HAS_MIX=True)},
           _lts_merge, present={"targets_ptr": lambda c: c["HAS_TARGETS"]}, dtypes=("fp32",)),
    Launch("linear_token_stats", "_bwd_kernel", _LTS_INPUTS, _LTS_BWD_FEATURES,
           _lts("BLOCK_V_BWD"),
           present={**_LTS_PRESENT,
                    **{f"d_{name}_ptr": (lambda flag: lambda c: c[flag])(f"HAS_GRAD_{name.upper()}")
                       for name in ("hidden", "weight", "bias", "ref_hidden", "ref_weight",
                                    "ref_bias")}},
           extra=(("all", "fp32", _TF32),)),
    Launch("mixture_sample", "_mixture_sample_kernel", ("logits_ptr", "ref_ptr"),
           {f"{name}{split}": {**f, "IS_SPLIT": split == "+split"}
            for name, f in {"mixture": _flags(HAS_POLICY=True, HAS_REF=True),
                            "policy": _flags(HAS_POLICY=True, HAS_REF=False)}.items()
            for split in ("", "+split")},
           _mix,
           present={"out_ptr": lambda c: not c["IS_SPLIT"],
                    "part_score_ptr": lambda c: c["IS_SPLIT"],
                    "part_col_ptr": lambda c: c["IS_SPLIT"]},
           int64=("seed_ptr", "out_ptr"), int32=("part_col_ptr",)),
    Launch("mixture_sample", "_mixture_sample_merge_kernel", (), {"merge": {}}, _merge,
           int64=("out_ptr",), int32=("part_col_ptr",), dtypes=("fp32",)),
)


@dataclass(frozen=True)
class Variant:
    """One compilation: a launch, an architecture, a dtype and a feature set."""

    arch: str
    family: str
    kernel: str
    dtype: str
    features: str
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    attrs: Dict[Tuple[int, ...], List]
    options: Dict[str, int]
    config: str

    @property
    def name(self) -> str:
        return f"{self.arch} {self.kernel} {self.dtype} {self.features}"


def find_kernel(name: str):
    """The ``@triton.jit`` function ``name`` of the ``nashkern.kernels`` modules (exactly one)."""
    import triton
    import nashkern.kernels as pkg

    found = []
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        obj = getattr(module, name, None)
        if isinstance(obj, triton.runtime.JITFunction) and obj not in found:
            found.append(obj)
    if len(found) != 1:
        raise LookupError(f"expected one @triton.jit function {name!r} in nashkern.kernels, "
                          f"found {len(found)}")
    return found[0]


def uncovered_kernels() -> List[str]:
    """Kernels (``@triton.jit`` functions named ``*_kernel``) of ``nashkern.kernels`` that
    ``LAUNCHES`` does not declare: a new kernel must be added there to be gated."""
    import triton
    import nashkern.kernels as pkg

    declared = {launch.kernel for launch in LAUNCHES}
    out = []
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if (isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel")
                    and name not in declared):
                out.append(f"{info.name}.{name}")
    return sorted(out)


def variants(arch: str, settings: Optional[Dict[str, Dict[str, int]]] = None,
             only: Optional[Callable[[str, str, str], bool]] = None) -> List[Variant]:
    """Every launch variant of every kernel for ``arch`` with its frozen config (fields
    replaced by ``settings[family]``), those for which ``only(kernel, dtype, features)``."""
    from nashkern import tuning

    out = []
    for launch in LAUNCHES:
        fn = find_kernel(launch.kernel)
        cfg = tuning.config_for_arch(launch.family, arch)
        cfg = dataclasses.replace(cfg, **(settings or {}).get(launch.family, {}))
        combos = [(feat, dtype, {}) for feat in launch.features for dtype in launch.dtypes]
        combos += list(launch.extra)
        for feat, dtype, overrides in combos:
            label = feat + ("+tf32" if overrides.get("IS_TF32") else "")
            if only is not None and not only(launch.kernel, dtype, label):
                continue
            consts, options = launch.config(cfg, dtype)
            consts = {**launch.features[feat], **consts, **overrides}
            missing = [a for a in consts if a not in fn.arg_names]
            if missing:
                raise LookupError(f"{launch.kernel} has no arguments {missing}: update LAUNCHES")
            signature, attrs = {}, {}
            for i, arg in enumerate(fn.arg_names):
                if arg in consts:
                    signature[arg] = "constexpr"
                elif arg.endswith("_ptr"):
                    if not launch.present.get(arg, lambda c: True)(consts):
                        signature[arg] = "constexpr"
                        consts[arg] = None
                        continue
                    signature[arg] = ("*" + dtype if arg in launch.inputs else
                                      "*i64" if arg in launch.int64 else
                                      "*i32" if arg in launch.int32 else "*fp32")
                    attrs[(i,)] = [["tt.divisibility", 16]]
                else:
                    signature[arg] = "fp32" if arg in FLOAT_SCALARS else "i32"
                    if arg in DIVISIBLE_16:
                        attrs[(i,)] = [["tt.divisibility", 16]]
            unset = [a for a, t in signature.items() if t == "constexpr" and a not in consts]
            if unset:
                raise LookupError(f"{launch.kernel}: constexprs {unset} not set by LAUNCHES")
            out.append(Variant(arch, launch.family, launch.kernel, dtype, label, signature,
                               consts, attrs, options, _describe(cfg)))
    return out


def _describe(cfg) -> str:
    return " ".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
                    if f.name != "reason")


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Triton ships no {name} at {path}")
    return path


def compile_variant(v: Variant) -> Dict:
    """Compile one variant; its registers, spills, shared memory and MMA instructions."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"arch": v.arch, "family": v.family, "kernel": v.kernel, "dtype": v.dtype,
           "features": v.features, "options": v.options, "config": v.config, "error": None}
    start = time.perf_counter()
    try:
        src = ASTSource(find_kernel(v.kernel), v.signature, v.constexprs, v.attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", ARCHS[v.arch][0], 32),
                                  options=v.options)
    except Exception as exc:  # noqa: BLE001 - reported as a failed check
        row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        return row
    row["compile_s"] = round(time.perf_counter() - start, 2)
    row["shared_bytes"] = compiled.metadata.shared
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], check=True,
                               capture_output=True, text=True).stdout
        res = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
        row["registers"] = int(res["REG"])
        row["stack_bytes"] = int(res["STACK"])
        row["local_bytes"] = int(res["LOCAL"])
        # The SASS (megabytes of text for the big kernels) only where it can show something:
        # spill instructions need stack / local memory, MMA needs tl.dot.
        sass = ""
        if row["stack_bytes"] or row["local_bytes"] or "tt.dot" in compiled.asm["ttir"]:
            sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], check=True,
                                  capture_output=True, text=True).stdout
    row["spill_stores"] = len(re.findall(r"\bSTL(\.\w+)*\s", sass))
    row["spill_loads"] = len(re.findall(r"\bLDL(\.\w+)*\s", sass))
    row["hgmma"] = len(re.findall(r"\bHGMMA\b", sass))
    row["hmma"] = len(re.findall(r"\bHMMA\b", sass))
    return row


def failures(row: Dict) -> List[str]:
    """The checks this row fails (empty: it passes)."""
    if row["error"]:
        return [f"does not compile: {row['error']}"]
    out = []
    limit = ARCHS[row["arch"]][1]
    if row["shared_bytes"] > limit:
        out.append(f"shared memory {row['shared_bytes']} B > {limit} B per block")
    spilled = row["stack_bytes"] or row["local_bytes"] or row["spill_stores"]
    if row["dtype"] in ("bf16", "fp16") and spilled:
        out.append(f"register spills: {row['stack_bytes']} B stack, {row['local_bytes']} B "
                   f"local, {row['spill_stores']} STL at {row['registers']} registers")
    if (row["kernel"] == "_fwd_kernel" and row["family"] == "linear_token_stats"
            and row["dtype"] == "bf16"):
        mma = "hgmma" if row["arch"] == "sm_90" else "hmma"
        if row[mma] == 0:
            out.append(f"no {mma.upper()} in the SASS of the bf16 forward "
                       f"(HGMMA {row['hgmma']}, HMMA {row['hmma']})")
    return out


def run(archs: Sequence[str], jobs: int, settings=None, only=None) -> List[Dict]:
    todo = [v for arch in archs for v in variants(arch, settings, only)]
    # The biggest kernels first, so that the pool's tail is short.
    todo.sort(key=lambda v: v.family != "linear_token_stats")
    if jobs <= 1:
        return [compile_variant(v) for v in todo]
    with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(compile_variant, todo))


def occupancy(row: Dict) -> str:
    """Resident blocks per SM from registers and shared memory (65536 registers per SM on
    both; 228 / 164 KiB shared per SM)."""
    if row["error"]:
        return "-"
    threads = 32 * row["options"].get("num_warps", 4)
    regs = (row["registers"] + 7) // 8 * 8  # allocation granularity: 8 per thread (256/warp)
    by_regs = 65536 // (regs * threads)
    sm_shared = 228 * 1024 if row["arch"] == "sm_90" else 164 * 1024
    by_shared = sm_shared // (row["shared_bytes"] + 1024) if row["shared_bytes"] else 32
    return str(min(by_regs, by_shared, 2048 // threads))


def markdown(rows: List[Dict]) -> str:
    import triton

    lines = [
        "# Compile gate: registers, spills, shared memory (no GPU)",
        "",
        f"Generated by `python scripts/compile_gate.py --markdown ...` with Triton "
        f"{triton.__version__} (its bundled ptxas, read back with its cuobjdump). "
        "Compiled ahead of time for each architecture with the frozen configs of "
        "`nashkern/tuning.py` (`config_for`); nothing here ran on a GPU. "
        "Occupancy: resident blocks per SM estimated from registers and shared memory. "
        "Spills: bytes of stack / local memory and STL instructions; gated for bf16/fp16 only "
        "(fp32 operands run as 3xTF32 and may spill: recorded here).",
        "",
        "| arch | kernel | dtype | features | warps | stages | registers | spills (B / STL) | "
        "shared KiB | blocks/SM | MMA | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bad = failures(r)
        if r["error"]:
            lines.append(f"| {r['arch']} | {r['kernel']} | {r['dtype']} | {r['features']} "
                         f"| | | | | | | | FAIL: does not compile |")
            continue
        mma = ("HGMMA" if r["hgmma"] else "") + ("HMMA" if r["hmma"] else "") or "-"
        lines.append(
            f"| {r['arch']} | {r['kernel']} | {r['dtype']} | {r['features']} "
            f"| {r['options'].get('num_warps', 4)} | {r['options'].get('num_stages', 3)} "
            f"| {r['registers']} | {max(r['stack_bytes'], r['local_bytes'])} / "
            f"{r['spill_stores']} | {r['shared_bytes'] / 1024:.0f} | {occupancy(r)} | {mma} "
            f"| {'ok' if not bad else 'FAIL: ' + '; '.join(bad)} |")
    configs = sorted({(r["arch"], r["family"], r["config"]) for r in rows})
    lines += ["", "Configs:", ""] + [f"* {a} `{f}`: {c}" for a, f, c in configs]
    return "\n".join(lines) + "\n"


def table_path(triton_version: Optional[str] = None) -> Path:
    """The committed table of a Triton version: ``compile_gate_triton-<major.minor>.md`` when
    kept (the GPU runner image's Triton), else ``compile_gate.md`` (the Triton of ``make
    install``)."""
    if triton_version is None:
        import triton

        triton_version = triton.__version__
    major_minor = ".".join(triton_version.split(".")[:2])
    pinned = RESULTS / f"compile_gate_triton-{major_minor}.md"
    return pinned if pinned.is_file() else RESULTS / "compile_gate.md"


def table_is_for(text: str, triton_version: str) -> bool:
    """Whether a table's header names this Triton version (the version it was generated with)."""
    return f"with Triton {triton_version} " in text


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default=",".join(ARCHS), help="comma-separated, of "
                        + ", ".join(ARCHS))
    parser.add_argument("--jobs", "-j", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--markdown", help="write the table as Markdown here")
    parser.add_argument("--set", action="append", default=[], metavar="FAMILY.FIELD=INT",
                        help="try a config value, e.g. linear_token_stats.BLOCK_V_FWD=64")
    parser.add_argument("--only", help="regex over 'kernel dtype features' of the variants")
    args = parser.parse_args(argv)
    settings: Dict[str, Dict[str, int]] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        family, _, name = key.partition(".")
        settings.setdefault(family, {})[name] = int(value)
    only = None
    if args.only:
        pattern = re.compile(args.only)
        only = lambda kernel, dtype, feat: bool(pattern.search(f"{kernel} {dtype} {feat}"))
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    archs = [a for a in args.arch.split(",") if a]
    for a in archs:
        if a not in ARCHS:
            parser.error(f"--arch: {a!r} not in {list(ARCHS)}")
    start = time.perf_counter()
    rows = run(archs, args.jobs, settings, only)
    text = markdown(rows)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        if args.markdown == "auto":
            args.markdown = str(table_path())
            print(f"table: {args.markdown}")
        with open(args.markdown, "w") as f:
            f.write(text)
    bad = [(r, failures(r)) for r in rows if failures(r)]
    print(f"{len(rows)} compilations, {len(bad)} failing, {time.perf_counter() - start:.0f} s")
    for r, why in bad:
        print(f"FAIL {r['arch']} {r['kernel']} {r['dtype']} {r['features']}: {'; '.join(why)}")
    uncovered = uncovered_kernels()
    if uncovered:
        print(f"FAIL kernels not declared in LAUNCHES (not gated): {', '.join(uncovered)}")
    return 1 if bad or uncovered else 0


if __name__ == "__main__":
    sys.exit(main())
