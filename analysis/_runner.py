"""Run a list of analysis scripts one after another (``make figures``, ``make bench``)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_scripts(scripts, extra_args=(), *, label: str, outputs: str) -> int:
    """Run each script with ``extra_args`` from the repository root; 1 if any failed."""
    failed = []
    t_all = time.perf_counter()
    for p in scripts:
        print(f"==> {p.name}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(p), *extra_args], cwd=HERE.parent)
        print(f"<== {p.name}: exit {rc} in {time.perf_counter() - t0:.1f} s", flush=True)
        if rc:
            failed.append(p.name)
    print(f"{label}: {len(scripts)} scripts in {time.perf_counter() - t_all:.1f} s; outputs in {outputs}")
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0
