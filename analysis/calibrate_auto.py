"""Cost model of ``inv_sqrtm(method="auto")``: eigh, the spectrum probe and the fixed cost
of an iteration run, in units of one step of the iteration, measured on this machine.

``auto`` compares, per matrix, ``K + fixed`` steps of the accelerated iteration (``K``
predicted from the probe's condition estimate) against ``eigh``; it skips the probe when
``eigh`` beats even the fewest steps plus the probe.  Every term is measured here with the
kernels ``auto`` calls, in the mode and thread configuration it uses:

- the iteration: ``newton_schulz._iterate_coupled`` with the numpy backend's runner (the
  fused Numba kernel for small n, the array code on numpy ``@`` above), stopping on a tolerance and confirming the predicted last step in
  float64 as ``auto`` does, run for 4 and for 12 steps (cond 1e6 in float64, 1e4 in
  float32: no matrix converges earlier); one step is ``(t_12 - t_4) / 8``, the fixed cost
  ``t_4 - 4 steps``;
- ``eigh``: ``newton_schulz._eigh_subset`` (the backend's float64 LAPACK kernel, with its
  spectrum checks), cast to the working dtype;
- the probe: the backend's ``probe`` kernel (Cholesky + 4 inverse-iteration steps).

Rounds are interleaved and medians taken.  The table printed (and written to
``analysis/results/auto_cost.{md,json,csv}``) is what ``AUTO_COST`` in
``nsiter/_tuning.py`` holds; the script prints that section ready to paste.  ``--quick``:
fewer sizes and rounds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import progress, write_results  # noqa: E402
from _bench import spd  # noqa: E402

from nsiter import newton_schulz as ns  # noqa: E402
from nsiter._backend import backend  # noqa: E402
from nsiter._numba import linalg as numba_linalg  # noqa: E402


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
    be = backend(A)
    coefs = np.empty((nb, 12, 3))
    coefs[:] = (1.5, -0.5, 0.0)
    tiny = 1e-30  # never reached: every run takes all its steps

    def steps(k):
        return lambda: ns._iterate_coupled(be, Y0, Y0_64, coefs, k, tiny, False, True, np.full(nb, k), "isqrt")

    t4, t12, t_eigh, t_probe = interleaved(
        [steps(4), steps(12), lambda: ns._eigh_subset(be, A, dtype, delta, fro, 0.0, "isqrt", False, np.ones(nb)),
         lambda: be.linalg.probe(A, delta, ns._PROBE_INVERSE_STEPS_SCHEDULE, 0)], rounds)
    for k in (4, 12):  # every matrix ran every step (no early stop, no divergence)
        n_done = steps(k)()[2]
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
            "eigh_kernel_max_n": numba_linalg.EIGH_KERNEL_MAX_N}
    path = write_results("auto_cost", rows, meta=meta,
                         columns=["n", "dtype", "batch", "step_us", "fixed_steps", "eigh_steps", "probe_steps"],
                         title="inv_sqrtm auto: costs in steps of the iteration")
    print(path.read_text())
    print(tuning_snippet(rows))
    return 0


def tuning_snippet(rows):
    """The ``AUTO_COST`` section of ``nsiter/_tuning.py`` for these measurements (to paste there)."""
    sizes = sorted({r["n"] for r in rows})
    lines = [f"AUTO_COST_N = {tuple(sizes)}", "AUTO_COST = {"]
    for dt in ("float64", "float32"):
        lines.append(f'    "{dt}": {{')
        for kind in ("fixed", "eigh", "probe"):
            vals = tuple(round(r[kind + "_steps"], 1) for n in sizes for r in rows if r["n"] == n and r["dtype"] == dt)
            lines.append(f'        "{kind}": {vals},')
        lines.append("    },")
    return "\n".join(lines + ["}"])


if __name__ == "__main__":
    sys.exit(main())
