"""`make bench`: run every ``analysis/bench_*.py`` (CPU) one after another."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = {"bench_gpu.py"}  # needs CUDA; run by hand on a GPU machine


def main() -> int:
    scripts = sorted(p for p in HERE.glob("bench_*.py") if p.name not in SKIP)
    failed = []
    t_all = time.perf_counter()
    for p in scripts:
        print(f"==> {p.name}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(p)], cwd=HERE.parent)
        print(f"<== {p.name}: exit {rc} in {time.perf_counter() - t0:.1f} s", flush=True)
        if rc:
            failed.append(p.name)
    print(f"all benchmarks: {time.perf_counter() - t_all:.1f} s; results in analysis/results/")
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
