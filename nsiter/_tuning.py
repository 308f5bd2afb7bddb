"""Machine-measured tuning data of nsiter's kernels: numbers, not logic.

The cost models that read these numbers live with the code they steer; this module only
records what one machine measured, so that re-measuring on another machine replaces data and
touches no code.  Every section says where, when and with which script its numbers were
measured; the timings themselves are in ``analysis/results/``.
"""
from __future__ import annotations

# --- inv_sqrtm auto
# Costs behind method="auto", per matrix, in steps of the iteration (one step: three n x n
# products in the working dtype and the by-product residual): ``fixed``, the fixed cost of
# an iteration run (set-up, float64 confirmation of the last step, output); ``eigh``,
# method="eigh" (float64 LAPACK eigh + reconstruction); ``probe``, the spectrum probe.
# Measured with the kernels of each size and two threads by analysis/calibrate_auto.py
# (analysis/results/auto_cost.md): AMD EPYC, 2 cores, numba 0.68.1, numpy 2.4.6,
# 2026-11-23.  Interpolated in log n, constant outside.  Up to n = 64 the iteration and
# eigh both run one matrix per thread, so there the ratios do not depend on the thread count.
AUTO_COST_N = (8, 16, 27, 48, 64, 96, 128, 192, 256, 512)
AUTO_COST = {
    "float64": {
        "fixed": (1.7, 1.6, 1.8, 2.1, 1.7, 1.4, 1.7, 1.2, 1.1, 0.9),
        "eigh": (6.4, 10.6, 9.4, 10.0, 8.4, 5.2, 5.6, 5.0, 4.0, 3.2),
        "probe": (1.0, 1.2, 0.8, 0.9, 0.6, 0.8, 0.7, 0.6, 0.5, 0.6),
    },
    "float32": {
        "fixed": (0.7, 1.2, 2.6, 2.9, 2.2, 2.3, 3.1, 2.7, 2.6, 2.6),
        "eigh": (2.9, 6.6, 12.0, 14.9, 17.2, 6.5, 8.6, 9.7, 9.0, 6.8),
        "probe": (0.4, 0.7, 1.0, 1.1, 1.1, 0.8, 1.0, 1.1, 1.3, 1.4),
    },
}

# --- covariance kernels
# Cost model of the numpy patch-moment kernels ("gemm", "narrow", "rowshift", "shifted") in
# nsiter._numba.patches: seconds = work / rate, rates per thread.  Only the ranking the
# model produces matters: a uniformly faster or slower machine needs no new numbers.
# Measured on: AMD EPYC, 2 cores (AVX2), numba 0.68.1, numpy 2.4.6, 2026-11-23, while the
# kernels were written (commit 679afcd); the forced-kernel timings that check the model's
# picks come from analysis/bench_covariance.py (analysis/results/covariance_kernels.md).

#: BLAS multiply-adds per second and thread, by dtype name (wide products; narrow ones are
#: scaled down by the kernels' width efficiency).
COV_RATE_MAC = {"float32": 27e9, "float64": 14e9}
#: Patch entries written per second by the serial Numba fills.
COV_RATE_FILL = 0.5e9
#: Multiply-adds per second and thread of the register-tiled Gram products of the "narrow"
#: kernel, by buffer dtype (measured 33-55e9 float32 and 16-32e9 float64 on blocks of 9 to 576
#: features, Intel Xeon AVX-512, 2026-12-02); its fill runs at COV_RATE_FILL per thread, in
#: parallel.
COV_RATE_GRAM = {"float32": 40e9, "float64": 20e9}
#: Accumulator entries per second that a part of the "narrow" kernel zeroes and flushes.
COV_RATE_FLUSH = 1e9
#: Multiply-adds per second and thread of the shifted-product kernel.
COV_RATE_SHIFTED = 2.0e9
#: Seconds per BLAS call (dispatch and thread wake-up).
COV_CALL_OVERHEAD = 10e-6
