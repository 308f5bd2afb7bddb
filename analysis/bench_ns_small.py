"""Small batched Newton–Schulz against the machine's GEMM ceiling and numpy ``eigh`` (issue 17).

Workload: ``nsiter.inv_sqrtm(A, n_iter=5)`` (coupled, fixed count) on a batch of 64 SPD
matrices ``Q diag(lambda) Q^T`` (cond 1e3) of size n = 27, 48, 64, float32 and float64.
Rate convention: ``6 n^3`` flops per iteration per matrix.  Side by side in one run, in
ABAB rounds (each round times every function once; ratios are medians of per-round ratios):

- the public call ``inv_sqrtm``, the one Numba call it makes (``linalg._coupled_pipeline``:
  prepare, probe and iteration) and the fused solver alone (``linalg._coupled_solve`` on the
  prepared input);
- numpy's batched ``eigh``-based inverse square root in the input dtype (the peer);
- the ceiling: numpy 1024^3 matmul GFLOP/s in the dtype (SGEMM / DGEMM), and for context
  numpy's batched ``matmul`` of the same small stack.

A 0.25 s pause precedes each timed function: OpenBLAS threads busy-wait after a threaded
call and would slow the Numba kernel that follows.  Compile / cache-load time of the first
call is reported apart.  Writes ``analysis/results/ns_small.{json,csv,md}``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import (first_call_time, gemm_gflops, median_time, memcpy_gbps, numpy_eigh_isqrt, progress,  # noqa: E402
                    spd, write_results)

import nsiter  # noqa: E402
from nsiter import newton_schulz as ns  # noqa: E402
from nsiter._numba import linalg  # noqa: E402

BATCH = 64
N_ITER = 5


def rounds(fns, n_rounds):
    """``(n_rounds, len(fns))`` seconds per call, ABAB order, a pause before each sample."""
    out = np.empty((n_rounds, len(fns)))
    for r in range(n_rounds):
        for i, fn in enumerate(fns):
            time.sleep(0.25)
            out[r, i] = median_time(fn, repeat=1, warmup=1, min_time=0.03)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    args = ap.parse_args(argv)
    n_rounds = 3 if args.quick else 7
    progress("ceilings")
    ceiling = {np.float32: gemm_gflops(1024, 1024, 1024, np.float32), np.float64: gemm_gflops(1024, 1024, 1024,
                                                                                               np.float64)}
    meta = {"memcpy_GBps": round(memcpy_gbps(), 2), "SGEMM_1024_GFLOPs": round(ceiling[np.float32], 1),
            "DGEMM_1024_GFLOPs": round(ceiling[np.float64], 1), "batch": BATCH, "n_iter": N_ITER,
            "rounds": n_rounds, "flops": "6 n^3 per iteration per matrix"}
    rows = []
    for dtype in (np.float32, np.float64):
        for n in (27, 48, 64):
            progress(f"n={n} {np.dtype(dtype).name}")
            A = spd(n, 1e3, BATCH, dtype, seed=n)
            A64, fro, stats = linalg.prepare(A, 0.0)
            t_first = first_call_time(lambda: nsiter.inv_sqrtm(A, n_iter=N_ITER))
            B = A.copy()
            out = np.empty_like(A)
            rel = float(10.0 * n * np.finfo(dtype).eps)
            fns = [lambda: nsiter.inv_sqrtm(A, n_iter=N_ITER),
                   lambda: linalg._coupled_solve(A64, fro, stats[:, 5], A.dtype, "isqrt", None, N_ITER, tol=None,
                                                 record=False, stop_early=False),
                   lambda: numpy_eigh_isqrt(A),
                   lambda: np.matmul(A, B, out=out),
                   lambda: linalg._coupled_pipeline(A, 0.0, rel, ns._PROBE_INVERSE_STEPS, 0, False, A.dtype, "isqrt",
                                                    N_ITER, tol=None, record=False, stop_early=False,
                                                    asym_rel=ns._asym_rel(dtype), sing_rel=ns._singular_rel(n, dtype))]
            t = rounds(fns, n_rounds)
            flops = 6.0 * n ** 3 * N_ITER * BATCH
            t_pub, t_ker, t_eig, t_mm, t_pipe = np.median(t, axis=0)
            ceil = ceiling[dtype] * 1e9
            rows.append(dict(
                n=n, dtype=np.dtype(dtype).name, public_ms=1e3 * t_pub, pipeline_ms=1e3 * t_pipe, kernel_ms=1e3 * t_ker,
                numpy_eigh_ms=1e3 * t_eig,
                public_frac_gemm=float(np.median(flops / t[:, 0] / ceil)),
                pipeline_frac_gemm=float(np.median(flops / t[:, 4] / ceil)),
                kernel_frac_gemm=float(np.median(flops / t[:, 1] / ceil)),
                x_numpy_eigh=float(np.median(t[:, 2] / t[:, 0])),
                public_GFLOPs=flops / t_pub / 1e9, gemm_GFLOPs=ceiling[dtype],
                batched_matmul_GFLOPs=2.0 * n ** 3 * BATCH / t_mm / 1e9,
                first_call_s=t_first,
            ))
    path = write_results("ns_small", rows, meta=meta, title="inv_sqrtm, 64 small SPD matrices, 5 coupled iterations",
                         columns=["n", "dtype", "public_ms", "pipeline_ms", "kernel_ms", "numpy_eigh_ms",
                                  "public_frac_gemm", "pipeline_frac_gemm", "kernel_frac_gemm", "x_numpy_eigh", "public_GFLOPs", "gemm_GFLOPs",
                                  "batched_matmul_GFLOPs", "first_call_s"])
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
