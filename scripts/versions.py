"""The versions nashkern runs against, one line (printed by every make target that installs, and
by the test suite's summary, so a failure caused by a new release names the package and version).

    python scripts/versions.py                 print them
    python scripts/versions.py --expect FILE   also fail unless each ``name==version`` pin of FILE
                                               is what is installed (the minimum-versions job)
"""
from __future__ import annotations

import argparse
import sys
from importlib import metadata

PACKAGES = ("torch", "transformers", "accelerate", "datasets", "peft", "triton", "numpy",
            "deepspeed", "kernels")


def installed(name: str):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions_line() -> str:
    found = [f"{name} {installed(name)}" for name in PACKAGES if installed(name)]
    return f"Python {sys.version.split()[0]}, " + ", ".join(found)


def check_pins(path: str) -> list:
    """Mismatches between FILE's ``name==version`` lines and what is installed."""
    wrong = []
    for line in open(path):
        line = line.split("#")[0].strip()
        if "==" not in line:
            continue
        name, version = (part.strip() for part in line.split("=="))
        have = installed(name)
        if have is None or have.split("+")[0] != version:
            wrong.append(f"{name}: pinned {version}, installed {have}")
    return wrong


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expect", help="a constraints file of name==version pins")
    args = parser.parse_args()
    print(f"nashkern runs against: {versions_line()}")
    if args.expect:
        wrong = check_pins(args.expect)
        if wrong:
            print("not the pinned versions: " + "; ".join(wrong), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
