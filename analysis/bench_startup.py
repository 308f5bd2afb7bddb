"""Benchmark: start-up, measured as whole processes (issue 17, item 4).

Goals: ``import nsiter`` at most 0.2 s and ``nsiter verify cov27.npy`` (the 27 x 27 covariance of
3x3 RGB patches, warm Numba cache) at most 0.5 s, medians.  Measured in the same run, next to
the floors ``python -c pass`` and ``python -c "import numpy"``:

- ``import nsiter`` (and ``import numba``: what any use of the Numba kernels costs first);
- ``nsiter --version``, ``nsiter verify cov27.npy`` (text and ``--json``), the installed console
  script (``python -m nsiter.cli`` where there is none);
- for comparison, one process that imports nsiter and runs ``inv_sqrtm`` once on the same matrix
  on the Numba kernels (the default kernel set; ``nsiter verify`` takes the array kernels, see
  ``nsiter._backend``), and the same on the array kernels.

Every command runs a few times first (the Numba cache and the OS file cache warm), then the
commands take turns, ``--repeat`` rounds, so that a change of machine load hits all of them
alike.  Reported: median, lower and upper quartile of the wall time, and the modules that
``import nsiter`` and ``nsiter verify`` left loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _bench import machine_info, progress, write_results  # noqa: E402

GOALS = {"import nsiter": 0.2, "nsiter verify cov27.npy": 0.5}
HEAVY = ("numba", "scipy", "matplotlib", "torch", "dask", "array_api_compat")
_LOADED = "import sys; print(','.join(m for m in {heavy!r} if m in sys.modules))"


def cov27(path: str) -> None:
    """The 27 x 27 covariance of the 3x3 RGB patches of the bundled sample image (float64)."""
    import nsiter

    X = nsiter.im2col(nsiter.data.sample_image(), 3)
    Xc = X - X.mean(axis=0)
    C = Xc.T @ Xc / X.shape[0]
    np.save(path, (C + C.T) / 2)


def nsiter_command() -> list[str]:
    """The console script next to this Python (what a user runs), else ``python -m nsiter.cli``."""
    script = shutil.which("nsiter", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "nsiter.cli"]


def run_once(cmd) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.decode()[-500:]}")
    return dt


def loaded_after(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code + "\n" + _LOADED.format(heavy=HEAVY)],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=25, help="rounds over all commands (default 25)")
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    py = sys.executable
    cli = nsiter_command()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "cov27.npy")
        cov27(path)
        solve = ("import numpy as np, nsiter\nfrom nsiter._backend import numpy_kernels\n"
                 f"C = np.load({path!r})\n")
        cases = [
            ("floor: python -c pass", [py, "-c", "pass"]),
            ("floor: python -c 'import numpy'", [py, "-c", "import numpy"]),
            ("import numba", [py, "-c", "import numba"]),
            ("import nsiter", [py, "-c", "import nsiter"]),
            ("nsiter --version", cli + ["--version"]),
            ("nsiter verify cov27.npy", cli + ["verify", path]),
            ("nsiter verify cov27.npy --json", cli + ["verify", path, "--json"]),
            ("import nsiter + inv_sqrtm(C) once, Numba kernels", [py, "-c", solve + "nsiter.inv_sqrtm(C)"]),
            ("import nsiter + inv_sqrtm(C) once, array kernels",
             [py, "-c", solve + "with numpy_kernels('array'):\n    nsiter.inv_sqrtm(C)"]),
        ]
        progress(f"warm-up: {args.warmup} runs of each of {len(cases)} commands")
        for _ in range(args.warmup):
            for _, cmd in cases:
                run_once(cmd)
        samples = {label: [] for label, _ in cases}
        progress(f"{args.repeat} rounds, the commands in turn")
        for r in range(args.repeat):
            for label, cmd in cases:
                samples[label].append(run_once(cmd))
            if (r + 1) % 5 == 0:
                progress(f"round {r + 1}/{args.repeat}: verify median so far "
                         f"{1e3 * np.median(samples['nsiter verify cov27.npy']):.0f} ms")
        verify_loaded = loaded_after(
            "import io, contextlib\nfrom nsiter.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()):\n    main(['verify', {path!r}])")
    rows = []
    for label, _ in cases:
        s = np.asarray(samples[label])
        goal = GOALS.get(label)
        rows.append({"what": label, "median_ms": 1e3 * float(np.median(s)),
                     "q1_ms": 1e3 * float(np.percentile(s, 25)), "q3_ms": 1e3 * float(np.percentile(s, 75)),
                     "min_ms": 1e3 * float(s.min()), "runs": int(s.size),
                     "goal_ms": "" if goal is None else 1e3 * goal,
                     "met": "" if goal is None else ("yes" if np.median(s) <= goal else "NO")})
    meta = {
        "commands": "whole processes (subprocess.run), stdout to /dev/null; the commands take turns, "
                    f"{args.repeat} rounds after {args.warmup} warm-up rounds",
        "nsiter command": " ".join(os.path.basename(c) if i == 0 else c for i, c in enumerate(cli)),
        "matrix": "27 x 27 covariance of the 3x3 RGB patches of grace_hopper.jpg (float64), saved with numpy.save",
        "loaded by import nsiter": loaded_after("import nsiter") or "none of " + ", ".join(HEAVY),
        "loaded by nsiter verify cov27.npy": verify_loaded or "none of " + ", ".join(HEAVY),
        "load average (1 min) at the end": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a",
        "machine": machine_info(),
    }
    out = write_results("startup", rows, meta=meta,
                        columns=["what", "median_ms", "q1_ms", "q3_ms", "min_ms", "runs", "goal_ms", "met"],
                        title="Start-up: whole-process wall times (warm Numba cache)")
    print(out.read_text())
    print(json.dumps({r["what"]: round(r["median_ms"], 1) for r in rows}, indent=1))


if __name__ == "__main__":
    main()
