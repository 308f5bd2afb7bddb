"""Benchmark: ``nsiter.verify_whitening`` and ``nsiter verify`` on the 27 x 27 image covariance.

Goal (issue 5): the CLI check of a 27 x 27 covariance completes well under a second once the
Numba cache is warm.  Measured in the same run:
- in process: ``verify_whitening`` (default: coupled + uncoupled + eigh, 50 iterations; it runs
  on the numpy backend's array kernels, see ``nsiter._backend``), its parts (one ``inv_sqrtm``
  call on each kernel set, the float64 ``eigh`` reference) and a scipy peer (``inv(sqrtm(C))``);
- CLI wall time (fresh ``python -m nsiter.cli verify`` processes after two warm-up runs), next
  to its floors: ``python -c "import numpy"`` and ``nsiter --version`` (Python + package import).
Start-up itself (issue 17: ``import nsiter``, ``nsiter verify`` as whole processes, many repeats):
``analysis/bench_startup.py``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _bench import machine_info, median_time, progress, write_results  # noqa: E402

import nsiter  # noqa: E402


def image_covariance(path=None) -> np.ndarray:
    x = nsiter.data.sample_image() if path is None else nsiter.data.load_image(path)
    X = nsiter.im2col(x, 3)
    Xc = X - X.mean(axis=0)
    C = Xc.T @ Xc / X.shape[0]
    return (C + C.T) / 2


def _on_array_kernels(fn):
    from nsiter._backend import numpy_kernels

    with numpy_kernels("array"):
        return fn()


def wall(cmd, repeat: int) -> float:
    for _ in range(2):  # warm the Numba cache and the OS file cache
        subprocess.run(cmd, capture_output=True, check=False)
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=False)
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--image", default=None, help="image file (default: matplotlib's grace_hopper.jpg)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    import scipy.linalg

    C = image_covariance(args.image)
    rows = []
    progress("in-process timings")
    cases = [
        ("verify_whitening, 3 methods x 50 iterations", lambda: nsiter.verify_whitening(C)),
        ("verify_whitening, coupled + eigh", lambda: nsiter.verify_whitening(C, methods=("coupled", "eigh"))),
        ("  inv_sqrtm coupled, 50 iterations + residuals (Numba kernels)",
         lambda: nsiter.inv_sqrtm(C, method="coupled", n_iter=50, return_info=True)),
        ("  inv_sqrtm coupled, 50 iterations + residuals (array kernels)", lambda: _on_array_kernels(
            lambda: nsiter.inv_sqrtm(C, method="coupled", n_iter=50, return_info=True))),
        ("  numpy eigh (the float64 reference)", lambda: np.linalg.eigh(C)),
        ("  peer: scipy inv(sqrtm(C))", lambda: scipy.linalg.inv(scipy.linalg.sqrtm(C))),
    ]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, fn in cases:
            t = median_time(fn, repeat=args.repeat, warmup=2)
            rows.append({"what": label, "ms": 1e3 * t})
            progress(f"{label}: {1e3 * t:.2f} ms")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "cov27.npy")
        np.save(path, C)
        py = [sys.executable]
        cli = py + ["-m", "nsiter.cli"]
        progress("CLI wall times (subprocesses)")
        for label, cmd in [
            ("CLI: nsiter verify cov27.npy", cli + ["verify", path]),
            ("CLI: nsiter verify cov27.npy --json", cli + ["verify", path, "--json"]),
            ("CLI: nsiter verify cov27.npy --plot out.png", cli + ["verify", path, "--plot", os.path.join(d, "o.png")]),
            ("floor: nsiter --version (python + import nsiter)", cli + ["--version"]),
            ("floor: python -c 'import numpy'", py + ["-c", "import numpy"]),
        ]:
            t = wall(cmd, args.repeat)
            rows.append({"what": label, "ms": 1e3 * t})
            progress(f"{label}: {1e3 * t:.0f} ms")
    lam = np.linalg.eigvalsh(C)
    meta = {"matrix": f"27 x 27 covariance of 3x3 RGB patches, kappa = {lam[-1] / lam[0]:.3g}",
            "machine": machine_info()}
    out = write_results("verify", rows, meta=meta, columns=["what", "ms"],
                        title="nsiter verify on the 27 x 27 image covariance (float64, CPU)")
    print(out.read_text())


if __name__ == "__main__":
    main()
