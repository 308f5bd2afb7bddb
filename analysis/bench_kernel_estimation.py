"""Benchmark: nsiter.estimate_kernel(method="lstsq") against im2col + numpy/scipy least squares.

Problem (the issue's speed goal): a 1024 x 1024 grayscale image (the bundled sample photo,
resized bilinearly) and a 15 x 15 kernel, ``y = x ⋆ k`` (valid, noise-free), so the im2col
matrix is 1,020,100 x 225 (1.8 GB in float64).

Side by side, each with its kernel error ``||k_hat - k|| / ||k||``:
- nsiter ``lstsq``: normal matrix from ``nsiter.patch_covariance`` (no im2col), ``X^T y`` by a
  Numba correlation, Cholesky, one refinement step; its phases timed separately;
- peer ``numpy_lstsq``: ``nsiter.im2col`` + ``np.linalg.lstsq`` (LAPACK gelsd, SVD) — the goal's
  reference;
- peer ``scipy_gelsy``: ``nsiter.im2col`` + ``scipy.linalg.lstsq(lapack_driver="gelsy")`` (QR);
- peer ``numpy_normal_eq``: ``nsiter.im2col`` + ``X.T @ X`` (BLAS) + Cholesky — the best a
  user gets from numpy on the same normal equations;
- nsiter ``gd_whitened`` (one step, Proposition 1), for the cost of whitening on top.
Ceilings in the same run: memcpy GB/s and float64 GEMM GFLOP/s (``X^T X`` costs ``M F^2``
multiply-adds).  Results: analysis/results/kernel_estimation.{json,csv,md}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import scipy.linalg
from scipy.ndimage import zoom

sys.path.insert(0, os.path.dirname(__file__))
from _bench import gemm_gflops, machine_info, median_time, memcpy_gbps, progress, write_results  # noqa: E402

import nsiter  # noqa: E402
from nsiter.kernel_estimation import _Problem, _Quadratic, _exact_loss_grad  # noqa: E402  (phase timings)
from nsiter._conventions import geometry  # noqa: E402


def test_image(size: int) -> np.ndarray:
    x = nsiter.data.sample_image(gray=True)
    return np.ascontiguousarray(zoom(x, (size / x.shape[0], size / x.shape[1]), order=1))


def rel_err(a, b) -> float:
    return float(np.linalg.norm(np.ravel(a) - np.ravel(b)) / np.linalg.norm(b))


def once(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=1024, help="image side (default 1024)")
    ap.add_argument("--kernel", type=int, default=15, help="kernel side (default 15)")
    ap.add_argument("--repeat", type=int, default=5, help="repeats of the nsiter timings")
    ap.add_argument("--peer-repeat", type=int, default=1, help="repeats of the (slow) im2col peers")
    args = ap.parse_args(argv)
    k = args.kernel
    rng = np.random.default_rng(0)
    x = test_image(args.size)
    kern = rng.standard_normal((k, k)) / k
    g = geometry((1, 1) + x.shape, k)
    y = _Problem(x[None, None], np.zeros((1, g.oh, g.ow)), g, 0.0, False).xw(kern.ravel())[0]
    m, f = g.n_patches, g.n_features
    progress(f"image {x.shape}, kernel {k}x{k}: im2col would be {m} x {f} ({m * f * 8 / 1e9:.2f} GB)")

    bw = memcpy_gbps()
    gf = gemm_gflops(2048, 2048, 2048, dtype=np.float64)
    progress(f"ceilings: memcpy {bw:.1f} GB/s, float64 GEMM {gf:.1f} GFLOP/s")

    # ---- nsiter (warm up JIT first)
    nsiter.estimate_kernel(x[:64, :64], y[:64 - k + 1, :64 - k + 1], k)
    est = nsiter.estimate_kernel(x, y, k)
    t_ns = median_time(lambda: nsiter.estimate_kernel(x, y, k), repeat=args.repeat, warmup=0)
    err_ns = rel_err(est.kernel, kern)
    cond = est.condition
    progress(f"nsiter lstsq {t_ns:.3f} s, error {err_ns:.2e}, cond(X^T X) {cond:.3g}")

    # phases of nsiter lstsq
    prob = _Problem(x[None, None], y, g, 0.0, False)
    t_cov = median_time(lambda: prob.__dict__.update(_moments=None) or prob.moments(), repeat=args.repeat, warmup=0)
    t_xty = median_time(lambda: prob.xtr(prob.y), repeat=args.repeat, warmup=0)
    quad = _Quadratic(prob)
    t_chol = median_time(lambda: (quad.__dict__.update(_chol=None, _eigs=None), quad.solve()), repeat=args.repeat)
    theta = quad.solve()
    t_ref = median_time(lambda: _exact_loss_grad(prob, theta), repeat=args.repeat)
    est_w = nsiter.estimate_kernel(x, y, k, method="gd_whitened")
    t_w = median_time(lambda: nsiter.estimate_kernel(x, y, k, method="gd_whitened"), repeat=args.repeat, warmup=0)
    err_w = rel_err(est_w.kernel, kern)

    rows = [
        {"solver": "nsiter lstsq (patch_covariance + Cholesky + 1 refinement)", "time_s": t_ns,
         "kernel_rel_err": err_ns},
        {"solver": "  phase: patch_covariance (X^T X / M, mean)", "time_s": t_cov},
        {"solver": "  phase: X^T y correlation kernel", "time_s": t_xty},
        {"solver": "  phase: Cholesky solve + eigvalsh (condition)", "time_s": t_chol},
        {"solver": "  phase: refinement gradient (X w and X^T r correlations)", "time_s": t_ref},
        {"solver": "nsiter gd_whitened (1 step, Proposition 1)", "time_s": t_w, "kernel_rel_err": err_w},
    ]

    # ---- peers on the explicit im2col matrix
    def peer(name, solve):
        ts, errs = [], []
        for _ in range(args.peer_repeat):
            X, t_im = once(lambda: nsiter.im2col(x, k))
            w, t_solve = once(lambda X=X: solve(X))
            ts.append((t_im, t_solve))
            errs.append(rel_err(w, kern))
            del X
        t_im, t_solve = np.median(np.array(ts), axis=0)
        progress(f"{name}: im2col {t_im:.2f} s + solve {t_solve:.2f} s, error {errs[-1]:.2e}")
        return {"solver": name, "time_s": t_im + t_solve, "im2col_s": t_im, "solve_s": t_solve,
                "kernel_rel_err": errs[-1]}

    yr = y.ravel()
    rows.append(peer("numpy: im2col + np.linalg.lstsq (gelsd)",
                     lambda X: np.linalg.lstsq(X, yr, rcond=None)[0]))
    rows.append(peer("scipy: im2col + scipy.linalg.lstsq (gelsy)",
                     lambda X: scipy.linalg.lstsq(X, yr, lapack_driver="gelsy", check_finite=False)[0]))
    rows.append(peer("numpy: im2col + X.T @ X + Cholesky",
                     lambda X: scipy.linalg.cho_solve(scipy.linalg.cho_factor(X.T @ X), X.T @ yr)))
    t_ref_peer = rows[6]["time_s"]
    for r in rows:
        if not r["solver"].startswith("  phase"):
            r["speedup_vs_numpy_lstsq"] = t_ref_peer / r["time_s"]
    gemm_s = m * f * f * 2 / (gf * 1e9)
    cols = ["solver", "time_s", "im2col_s", "solve_s", "kernel_rel_err", "speedup_vs_numpy_lstsq"]
    meta = {"problem": f"{args.size}x{args.size} gray sample image (bilinear resize), {k}x{k} kernel, noise-free",
            "im2col_shape": f"{m} x {f}", "cond_XtX": f"{cond:.4g}",
            "memcpy_GBps": round(bw, 2), "gemm_f64_GFLOPs": round(gf, 2),
            "X^T X at GEMM speed (s)": round(gemm_s, 3), "machine": machine_info()}
    path = write_results("kernel_estimation", rows, meta=meta, columns=cols,
                         title=f"Kernel estimation, lstsq on {args.size}x{args.size} with a {k}x{k} kernel (float64)")
    print(path.read_text())


if __name__ == "__main__":
    main()
