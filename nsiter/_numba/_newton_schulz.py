"""Numba kernels of the Newton–Schulz inverse square root (Higham 2008, Eqs. 6.35 and 7.12).

Private twins of :mod:`nsiter.newton_schulz`: contiguous float arrays in, preallocated
outputs, no validation.  Every kernel is parallel over the batch axis (``prange`` writes
one matrix per iteration, so the slices are disjoint).
"""
from __future__ import annotations

import numpy as np

from .._config import jit, prange

__all__ = ["_psd_probe"]


@jit(parallel=True)
def _psd_probe(A, shift, n_steps, lmin, lmax, ok):
    """Cholesky test of ``A + shift I`` and cheap bounds on the extreme eigenvalues.

    For each matrix ``b`` (float64, symmetric): a hand-written Cholesky factorisation
    ``L L^T = A_b + shift_b I``.  When it breaks down (a pivot ``<= 0`` or NaN), ``ok[b] =
    False`` and ``A_b`` has an eigenvalue below ``-shift_b``.  Otherwise ``n_steps`` steps of
    inverse iteration (two triangular solves each) give ``lmin[b] >= lambda_min(A_b)``
    (tight for a separated smallest eigenvalue; the smallest Cholesky pivot is a second upper
    bound), and ``n_steps`` steps of power iteration give ``lmax[b] <= lambda_max(A_b)``.
    Cost: ``n^3/3 + 3 n_steps n^2`` flops per matrix.
    """
    nb, n, _ = A.shape
    for b in prange(nb):
        a = A[b]
        s = shift[b]
        L = np.zeros((n, n))
        good = True
        min_pivot = np.inf
        for j in range(n):
            d = a[j, j] + s
            for k in range(j):
                d -= L[j, k] * L[j, k]
            if not (d > 0.0):
                good = False
                break
            if d < min_pivot:
                min_pivot = d
            ljj = np.sqrt(d)
            L[j, j] = ljj
            for i in range(j + 1, n):
                t = a[i, j]
                for k in range(j):
                    t -= L[i, k] * L[j, k]
                L[i, j] = t / ljj
        ok[b] = good
        # power iteration for lambda_max (start: sqrt of the diagonal plus a generic term)
        v = np.empty(n)
        w = np.empty(n)
        for i in range(n):
            v[i] = np.sqrt(abs(a[i, i])) + 1e-3 * np.cos(1.7 * i + 0.3)
        est = 0.0
        for _ in range(n_steps):
            nv = 0.0
            for i in range(n):
                nv += v[i] * v[i]
            nv = np.sqrt(nv)
            if not (nv > 0.0):
                break
            for i in range(n):
                v[i] /= nv
            nw = 0.0
            for i in range(n):
                t = 0.0
                for k in range(n):
                    t += a[i, k] * v[k]
                w[i] = t
                nw += t * t
            est = np.sqrt(nw)
            for i in range(n):
                v[i] = w[i]
        # the Rayleigh quotient of the last normalised iterate is a (better) lower bound too
        lmax[b] = est
        if not good:
            lmin[b] = np.nan
            continue
        # inverse iteration for lambda_min of A + shift I: solve L L^T w = v
        for i in range(n):
            v[i] = np.cos(2.3 * i + 0.7) + 0.25
        inv_est = 0.0
        for _ in range(n_steps):
            nv = 0.0
            for i in range(n):
                nv += v[i] * v[i]
            nv = np.sqrt(nv)
            for i in range(n):
                v[i] /= nv
            for i in range(n):  # forward: L y = v
                t = v[i]
                for k in range(i):
                    t -= L[i, k] * w[k]
                w[i] = t / L[i, i]
            for i in range(n - 1, -1, -1):  # backward: L^T x = y
                t = w[i]
                for k in range(i + 1, n):
                    t -= L[k, i] * w[k]
                w[i] = t / L[i, i]
            nw = 0.0
            for i in range(n):
                nw += w[i] * w[i]
            inv_est = np.sqrt(nw)
            for i in range(n):
                v[i] = w[i]
        est_min = 1.0 / inv_est if inv_est > 0.0 else min_pivot
        if min_pivot < est_min:
            est_min = min_pivot
        lmin[b] = est_min - s
