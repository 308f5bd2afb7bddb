"""Scale invariance of inv_sqrtm / sqrtm_psd at every representable scale (issue: right or
loudly wrong).

For a 6x6 SPD ``A`` (cond 100; 5 for the uncoupled iteration, which is unstable above 9),
every method, both dtypes and both backends (numpy; torch CPU when installed): the largest
relative difference of ``inv_sqrtm(s A) sqrt(s)``, ``sqrtm_psd(s A) / sqrt(s)`` and
``inv_sqrtm(s A, eps=s/2) sqrt(s)`` from the same at ``s = 1``, over ``s = 10^e``
(float64: e = -300..300 step 25; float32: -35..35 step 5), against the bound ``100 u kappa``.
Writes ``analysis/results/accuracy_scale.{md,json,csv}``.
"""
from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _bench import write_results  # noqa: E402
from helpers import spd_with_condition  # noqa: E402

import nsiter  # noqa: E402

SCALES = {np.float64: [10.0 ** e for e in range(-300, 301, 25)], np.float32: [10.0 ** e for e in range(-35, 36, 5)]}
METHODS = ("coupled", "uncoupled", "accelerated", "eigh", "auto")


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def worst_error(method, dtype, to, back):
    kappa = 5.0 if method == "uncoupled" else 100.0
    A = spd_with_condition(6, kappa, np.random.default_rng(1)).astype(dtype)
    kw = dict(method=method, n_iter=6) if method == "uncoupled" else dict(method=method)
    D0, S0 = back(nsiter.inv_sqrtm(to(A), **kw)), back(nsiter.sqrtm_psd(to(A), **kw))
    De0 = back(nsiter.inv_sqrtm(to(A), eps=0.5, **kw))
    worst = 0.0
    for s in SCALES[dtype]:
        As = to((s * A.astype(np.float64)).astype(dtype))
        r = math.sqrt(s)
        worst = max(worst, rel(back(nsiter.inv_sqrtm(As, **kw)) * r, D0),
                    rel(back(nsiter.sqrtm_psd(As, **kw)) / r, S0),
                    rel(back(nsiter.inv_sqrtm(As, eps=0.5 * s, **kw)) * r, De0))
    return worst, 100 * np.finfo(dtype).eps / 2 * kappa


def main():
    backends = [("numpy", lambda a: a, lambda a: np.asarray(a))]
    try:
        import torch

        backends.append(("torch", torch.from_numpy, lambda t: t.numpy()))
    except ImportError:
        pass
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a spurious warning at some scale fails the run
        for name, to, back in backends:
            for dtype in (np.float64, np.float32):
                for m in METHODS:
                    err, bound = worst_error(m, dtype, to, back)
                    rows.append(dict(backend=name, dtype=np.dtype(dtype).name, method=m, max_rel_error=err,
                                     bound_100_u_kappa=bound, ratio=err / bound))
    path = write_results("accuracy_scale", rows, title="inv_sqrtm / sqrtm_psd: scale invariance over the dtype's range")
    print(path.read_text())
    return 0 if all(r["ratio"] <= 1 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
