"""`make figures`: run every ``analysis/fig_*.py`` script; each writes PNG + data to figures/."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)  # e.g. --image PATH, passed to each script
    scripts = sorted(HERE.glob("fig_*.py"))
    failed = []
    t_all = time.perf_counter()
    for p in scripts:
        print(f"==> {p.name}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(p), *extra], cwd=HERE.parent)
        print(f"<== {p.name}: exit {rc} in {time.perf_counter() - t0:.1f} s", flush=True)
        if rc:
            failed.append(p.name)
    total = time.perf_counter() - t_all
    print(f"make figures: {len(scripts)} scripts in {total:.1f} s; outputs in figures/")
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
