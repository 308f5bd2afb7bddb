"""Benchmark of ``nsiter.inv_sqrtm`` (issue 4): methods x n x batch x dtype, peers and ceilings.

Matrices: ``Q diag(lambda) Q^T`` with log-spaced eigenvalues and a chosen condition number
(as in the tests).  Times are medians of repeats after a JIT warm-up, side by side with

- numpy's batched ``eigh``-based inverse square root ``V diag(lambda^-1/2) V^T`` in the
  input dtype (``numpy eigh``, the peer of the speed goals);
- the same coupled iteration on numpy ``@`` (batched BLAS, ``coupled[numpy @]``): the
  comparison that decides the Numba dispatch;
- the GEMM ceiling: the time the products of the iteration would take at the machine's
  numpy GEMM rate for that size (``gemm_ceiling_ms``), and the memcpy bandwidth.

Residual: ``max_b ||D_b A_b D_b - I||_F / sqrt(n)`` in float64.  Goals checked:

1. batch 64 of 27 x 27 float32, 5 iterations: ``inv_sqrtm`` >= 2x faster than numpy eigh;
2. cond 1e6, n 64, batch 32, float64: ``method="auto", tol=1e-7`` >= 1.8x faster than plain
   coupled with the smallest iteration count that reaches 1e-7 (and ``accelerated`` alone);
3. ``auto`` never more than 1.2x slower than the better of coupled (same tol) and eigh;

Ratios of goals 2 and 3 are medians of per-round ratios over 11 interleaved rounds.
4. single n = 512: coupled vs LAPACK, reported as measured.

Writes ``analysis/results/newton_schulz.{json,csv,md}`` and ``newton_schulz_goals.{...}``.
``--quick`` runs fewer sizes and repeats (a smoke test).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import gemm_gflops, median_time, memcpy_gbps, numpy_eigh_isqrt, progress, spd, write_results  # noqa: E402

import nsiter  # noqa: E402
from nsiter import newton_schulz as ns  # noqa: E402
from nsiter._backend import backend  # noqa: E402


def residual(D, A):
    D = np.asarray(D, dtype=np.float64)
    A = np.asarray(A, dtype=np.float64)
    n = A.shape[-1]
    R = D @ A @ D - np.eye(n)
    return float(np.max(np.sqrt(np.sum(R * R, axis=(-2, -1))) / np.sqrt(n)))


def numpy_coupled(A, n_iter):
    """Fixed-count coupled iteration on numpy ``@`` (the same products as the kernel)."""
    c = np.sqrt(np.sum(A.astype(np.float64) ** 2, axis=(-2, -1)))
    Y0 = A / c.astype(A.dtype)[:, None, None]
    Z, _ = ns._run_fixed(backend(Y0), Y0, n_iter, None, want_y=False)
    return Z / np.sqrt(c).astype(A.dtype)[:, None, None]


def products(n_iter):
    """n x n products issued by ``n_iter`` coupled steps (the first needs one)."""
    return 1 + 3 * (n_iter - 1)


class Bench:
    def __init__(self, repeat):
        self.repeat = repeat
        self.gemm = {}

    def gemm_rate(self, n, dtype):
        key = (n, np.dtype(dtype).name)
        if key not in self.gemm:
            self.gemm[key] = gemm_gflops(n, n, n, dtype=dtype, repeat=3) * 1e9
        return self.gemm[key]

    def time(self, fn):
        # OpenBLAS worker threads busy-wait for ~0.1 s after a threaded call (numpy eigh,
        # large products): let them go idle so that no method pays for the one before it
        time.sleep(0.25)
        fn()  # JIT warm-up / cache load
        return median_time(fn, repeat=self.repeat, warmup=1, min_time=0.02)

    def time_interleaved(self, *fns, rounds=11):
        """Times of ``fns`` in alternation (each round times every function once), as an
        array ``(rounds, len(fns))``: a ratio is taken within each round and its median
        reported, so drifts of the shared machine between rounds cancel."""
        for fn in fns:
            fn()  # JIT warm-up / cache load
        samples = np.empty((rounds, len(fns)))
        for r in range(rounds):
            for i, fn in enumerate(fns):
                samples[r, i] = median_time(fn, repeat=1, warmup=0, min_time=0.02)
        return samples


def table(bench, sizes, cond, dtypes, rows):
    for dtype in dtypes:
        tol_ = 1e-8 if dtype == np.float64 else 1e-2
        for n, batch in sizes:
            A = spd(n, cond, batch, dtype, seed=n + batch)
            progress(f"n={n} batch={batch} {np.dtype(dtype).name}")
            t_eigh = bench.time(lambda: numpy_eigh_isqrt(A))
            rate = bench.gemm_rate(n, dtype)

            def add(method, fn, iters, note=""):
                t = bench.time(fn)
                D = fn()
                if isinstance(D, tuple):
                    D = D[0]
                n_prod = products(iters) if isinstance(iters, int) and iters > 0 else None
                rows.append(dict(
                    method=method, n=n, batch=batch, dtype=np.dtype(dtype).name, cond=cond,
                    time_ms=1e3 * t, iters=iters, residual=residual(D, A),
                    speedup_vs_numpy_eigh=t_eigh / t,
                    gemm_ceiling_ms=(1e3 * n_prod * 2 * n**3 * batch / rate) if n_prod else float("nan"),
                    note=note,
                ))

            add("numpy eigh", lambda: numpy_eigh_isqrt(A), 0, "peer")
            add("coupled (5 it)", lambda: nsiter.inv_sqrtm(A, n_iter=5), 5, "paper setting")
            add("coupled[numpy @] (5 it)", lambda: numpy_coupled(A, 5), 5, "numpy backend")
            _, info = nsiter.inv_sqrtm(A, tol=tol_, return_info=True)
            add(f"coupled tol={tol_:g}", lambda: nsiter.inv_sqrtm(A, tol=tol_), int(info.n_iter))
            _, info = nsiter.inv_sqrtm(A, method="accelerated", tol=tol_, return_info=True)
            add(f"accelerated tol={tol_:g}", lambda: nsiter.inv_sqrtm(A, method="accelerated", tol=tol_),
                int(info.n_iter))
            _, info = nsiter.inv_sqrtm(A, method="auto", tol=tol_, return_info=True)
            add(f"auto tol={tol_:g}", lambda: nsiter.inv_sqrtm(A, method="auto", tol=tol_),
                int(info.n_iter) if "accelerated" in info.method else 0, info.method)
            add("eigh (float64)", lambda: nsiter.inv_sqrtm(A, method="eigh"), 0)


def goals(bench, quick):
    out = []
    # 1. the paper's first layer: 64 x 27 x 27 float32, 5 iterations
    A = spd(27, 1e4, 64, np.float32, seed=1)
    t_ns = bench.time(lambda: nsiter.inv_sqrtm(A, n_iter=5))
    t_eig = bench.time(lambda: numpy_eigh_isqrt(A))
    out.append(dict(goal="64 x 27x27 f32, 5 it: numpy eigh / inv_sqrtm", target=">= 2", value=t_eig / t_ns,
                    detail=f"inv_sqrtm {1e3 * t_ns:.3f} ms, numpy eigh {1e3 * t_eig:.3f} ms"))
    # 2. cond 1e6, n 64, batch 32, float64, tol 1e-7
    A = spd(64, 1e6, 32, np.float64, seed=2)
    k = 1
    while True:  # the smallest fixed count of plain coupled that reaches 1e-7 for every matrix
        D = nsiter.inv_sqrtm(A, n_iter=k)
        r = np.linalg.norm(D @ D @ A - np.eye(64), axis=(-2, -1))
        if np.all(r <= 1e-7) or k >= ns.MAX_ITER:
            break
        k += 1
    t = bench.time_interleaved(
        lambda: nsiter.inv_sqrtm(A, n_iter=k), lambda: nsiter.inv_sqrtm(A, method="auto", tol=1e-7),
        lambda: nsiter.inv_sqrtm(A, method="accelerated", tol=1e-7))
    t_c, t_auto, t_acc = np.median(t, axis=0)
    r_auto, r_acc = np.median(t[:, 0] / t[:, 1]), np.median(t[:, 0] / t[:, 2])
    _, ia = nsiter.inv_sqrtm(A, method="auto", tol=1e-7, return_info=True)
    _, ic = nsiter.inv_sqrtm(A, method="accelerated", tol=1e-7, return_info=True)
    out.append(dict(goal="cond 1e6, 32 x 64x64 f64, tol 1e-7: coupled(minimal k) / auto", target=">= 1.8",
                    value=r_auto,
                    detail=f"coupled k={k}: {1e3 * t_c:.2f} ms; auto ({ia.method}): {1e3 * t_auto:.2f} ms, "
                           f"all converged: {bool(np.all(ia.converged))}"))
    out.append(dict(goal="same: coupled(minimal k) / accelerated", target="(reported)", value=r_acc,
                    detail=f"accelerated {ic.n_iter} it: {1e3 * t_acc:.2f} ms, "
                           f"all converged: {bool(np.all(ic.converged))}"))
    # 3. auto vs the better of coupled / eigh
    worst = 0.0
    detail = []
    configs = [(27, 64, 1e4, np.float32), (64, 32, 1e6, np.float64), (128, 8, 1e3, np.float64),
               (256, 2, 1e6, np.float64)]
    if not quick:
        configs += [(16, 128, 1e2, np.float64), (96, 16, 1e8, np.float64), (512, 1, 1e4, np.float64),
                    (27, 64, 1e5, np.float64), (48, 32, 1e3, np.float64), (64, 16, 1e2, np.float32),
                    (8, 256, 1e4, np.float64), (200, 4, 1e5, np.float64)]
    for n, batch, cond, dtype in configs:
        A = spd(n, cond, batch, dtype, seed=3 + n)
        tol_ = 1e-7 if dtype == np.float64 else 1e-2
        t = bench.time_interleaved(
            lambda: nsiter.inv_sqrtm(A, method="auto", tol=tol_),
            lambda: nsiter.inv_sqrtm(A, method="coupled", tol=tol_), lambda: nsiter.inv_sqrtm(A, method="eigh"))
        ratio = float(np.median(t[:, 0] / np.minimum(t[:, 1], t[:, 2])))
        worst = max(worst, ratio)
        _, ia = nsiter.inv_sqrtm(A, method="auto", tol=tol_, return_info=True)
        detail.append(f"n={n} b={batch} cond={cond:g}: {ratio:.2f} ({ia.method})")
    out.append(dict(goal="auto / min(coupled, eigh), worst case", target="<= 1.2", value=worst,
                    detail="; ".join(detail)))
    # 4. one large matrix
    for n in (512,):
        A = spd(n, 1e4, 1, np.float64, seed=4)
        t_c = bench.time(lambda: nsiter.inv_sqrtm(A, tol=1e-8))
        _, ic = nsiter.inv_sqrtm(A, tol=1e-8, return_info=True)
        t_5 = bench.time(lambda: nsiter.inv_sqrtm(A, n_iter=5))
        t_e = bench.time(lambda: numpy_eigh_isqrt(A))
        t_a = bench.time(lambda: nsiter.inv_sqrtm(A, method="auto", tol=1e-8))
        out.append(dict(goal=f"single n={n} f64 cond 1e4: numpy eigh / coupled", target="(reported)",
                        value=t_e / t_c,
                        detail=f"coupled tol 1e-8 ({ic.n_iter} it) {1e3 * t_c:.1f} ms, coupled 5 it "
                               f"{1e3 * t_5:.1f} ms, numpy eigh {1e3 * t_e:.1f} ms, auto {1e3 * t_a:.1f} ms"))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    args = ap.parse_args(argv)
    bench = Bench(repeat=3 if args.quick else 5)
    progress("ceilings")
    meta = {"memcpy_GBps": round(memcpy_gbps(), 2),
            "gemm_GFLOPs_f64_512": round(gemm_gflops(512, 512, 512, dtype=np.float64, repeat=3), 1),
            "thread_env": {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                         "NUMBA_NUM_THREADS") if os.environ.get(k)} or "defaults"}
    rows = []
    sizes = [(27, 64), (64, 32), (128, 8)] if args.quick else [(27, 64), (64, 32), (128, 8), (256, 2), (512, 1)]
    table(bench, sizes, 1e4, (np.float32, np.float64), rows)
    write_results("newton_schulz", rows, meta=dict(meta, cond=1e4, tol="1e-8 (float64), 1e-2 (float32)"),
                  columns=["method", "n", "batch", "dtype", "time_ms", "iters", "residual",
                           "speedup_vs_numpy_eigh", "gemm_ceiling_ms", "note"],
                  title="inv_sqrtm: methods x n x batch x dtype (cond 1e4)")
    progress("goals")
    g = goals(bench, args.quick)
    path = write_results("newton_schulz_goals", g, meta=meta, columns=["goal", "target", "value", "detail"],
                         title="inv_sqrtm: issue goals")
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
