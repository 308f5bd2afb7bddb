"""`make bench`: run every ``analysis/bench_*.py`` (CPU) one after another."""
from __future__ import annotations

import sys

from _runner import HERE, run_scripts

SKIP = {"bench_gpu.py"}  # needs CUDA; run by hand on a GPU machine


def main() -> int:
    scripts = sorted(p for p in HERE.glob("bench_*.py") if p.name not in SKIP)
    return run_scripts(scripts, label="make bench", outputs="analysis/results/")


if __name__ == "__main__":
    sys.exit(main())
