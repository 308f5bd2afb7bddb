"""Cost model of ``inv_sqrtm(method="auto")``: eigh, the spectrum probe and the fixed cost
of an iteration run, in units of one step of the iteration, measured on this machine.

``auto`` compares, per matrix, ``K + fixed`` steps of the accelerated iteration (``K``
predicted from the probe's condition estimate) against ``eigh``; it skips the probe when
``eigh`` beats even the fewest steps plus the probe.  Every term is measured here with the
kernels ``auto`` calls, in the mode and thread configuration it uses:

- the iteration: the fused Numba kernel (n <= 64, one matrix per thread) or its numpy
  ``@`` twin (larger n), stopping on a tolerance and confirming the predicted last step in
  float64 as ``auto`` does, run for 4 and for 12 steps (cond 1e6 in float64, 1e4 in
  float32: no matrix converges earlier); one step is ``(t_12 - t_4) / 8``, the fixed cost
  ``t_4 - 4 steps``;
- ``eigh``: :func:`nsiter.newton_schulz._eigh_power` (float64 LAPACK, per-thread up to
  n = 128 with SciPy's OpenBLAS held to one thread, numpy's batched eigh above), cast to the
  working dtype;
- the probe: :func:`nsiter.newton_schulz._probe` (Cholesky + 4 inverse-iteration steps).

Rounds are interleaved and medians taken.  The table printed (and written to
``analysis/results/auto_cost.{md,json,csv}``) is what ``_AUTO_COST`` in
``nsiter/newton_schulz.py`` holds.  ``--quick``: fewer sizes and rounds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import progress, write_results  # noqa: E402
from bench_newton_schulz import spd  # noqa: E402

from nsiter import newton_schulz as ns  # noqa: E402


def batch_for(n):
    """Enough matrices that every thread has several (and the batch is a few MB at most)."""
    return int(max(2, min(128, 2 ** 21 // (n * n))))


def interleaved(fns, rounds):
    for fn in fns:
        fn()
    samples = [[] for _ in fns]
    for _ in range(rounds):
        for fn, s in zip(fns, samples):
            t0 = time.perf_counter()
            fn()
            s.append(time.perf_counter() - t0)
    return [float(np.median(s)) for s in samples]


def measure(n, dtype, rounds):
    nb = batch_for(n)
    A = spd(n, 1e6 if dtype == np.float64 else 1e4, nb, np.float64, seed=n)
    fro = np.linalg.norm(A, axis=(-2, -1))
    delta = 10.0 * n * np.finfo(dtype).eps * fro
    Y0_64 = A / fro[:, None, None]
    Y0 = Y0_64.astype(dtype)
    coefs = np.empty((nb, 12, 3))
    coefs[:] = (1.5, -0.5, 0.0)
    tiny = 1e-30  # never reached: every run takes all its steps

    def steps(k):
        return lambda: ns._run_coupled(Y0, Y0_64, coefs, k, tol=tiny, record=False, stop_early=True,
                                       k_last=np.full(nb, k))

    t4, t12, t_eigh, t_probe = interleaved(
        [steps(4), steps(12), lambda: ns._eigh_power(A, dtype, delta, 0.0),
         lambda: ns._probe(A, delta, ns._PROBE_INVERSE_STEPS_SCHEDULE, 0)], rounds)
    for k in (4, 12):  # every matrix ran every step (no early stop, no divergence)
        n_done = ns._run_coupled(Y0, Y0_64, coefs, k, tol=tiny, record=False, stop_early=True,
                                 k_last=np.full(nb, k))[2]
        assert np.all(n_done == k), (n, dtype, k, np.unique(n_done))
    t_step = (t12 - t4) / 8.0
    return dict(n=n, dtype=np.dtype(dtype).name, batch=nb, step_us=1e6 * t_step / nb,
                fixed_steps=t4 / t_step - 4.0, eigh_steps=t_eigh / t_step, probe_steps=t_probe / t_step)


def main(argv=None):
    import numba

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and rounds")
    args = ap.parse_args(argv)
    sizes = (16, 64, 256) if args.quick else (8, 16, 27, 48, 64, 96, 128, 192, 256, 512)
    rounds = 5 if args.quick else 15
    rows = []
    for dtype in (np.float64, np.float32):
        for n in sizes:
            progress(f"n={n} {np.dtype(dtype).name}")
            rows.append(measure(n, dtype, rounds))
    meta = {"numba_threads": numba.get_num_threads(), "numpy": np.__version__,
            "eigh_kernel_max_n": ns._eigh_kernel_max_n()}
    path = write_results("auto_cost", rows, meta=meta,
                         columns=["n", "dtype", "batch", "step_us", "fixed_steps", "eigh_steps", "probe_steps"],
                         title="inv_sqrtm auto: costs in steps of the iteration")
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
