"""Numba kernels of :mod:`nsiter.deconvnet` (Zeiler et al. 2010): the x-subproblem (Eq. 8 and its
lookup-table twin for 0 < p < 1) and the fused per-frequency / per-pixel steps of the FFT-domain ADMM.

Private twins of the public functions: contiguous float64 / complex128 arrays in, preallocated
outputs, no validation.  The spatial convolutions (``F z``, ``F^T r`` of Eq. 5-7 and the ``Z^T r``
of Eq. 9) are the correlation kernels of :mod:`nsiter._numba._kernel_estimation`.

Reductions write one row of a ``partial`` array per fixed-size chunk (``prange`` over chunks, so
slices are disjoint and the summation order does not depend on the thread count); the caller sums
the rows serially.
"""
from __future__ import annotations

import numpy as np

from .._config import jit, prange

__all__ = ["CHUNK", "_soft_threshold", "_lut_shrink", "_zsolve_circular", "_update_maps",
           "_xsolve_masked", "_update_masked_data"]

#: Elements (spatial kernels) or frequencies (Fourier kernels) per partial sum.
CHUNK = 4096


@jit(parallel=True)
def _soft_threshold(v, t, out):
    """Eq. 8: ``out = max(|v| - t, 0) sign(v)`` elementwise (1-D arrays; ``out`` may be ``v``)."""
    n = v.shape[0]
    for b in prange((n + CHUNK - 1) // CHUNK):
        for e in range(b * CHUNK, min(n, (b + 1) * CHUNK)):
            a = v[e]
            if a > t:
                out[e] = a - t
            elif a < -t:
                out[e] = a + t
            else:
                out[e] = 0.0


@jit(parallel=True)
def _lut_shrink(v, s, p, w_t, w0, dw, table, out):
    """``out = s * sign(v) * u*(|v| / s)`` with ``u*(w) = argmin_u (u - w)^2 / 2 + |u|^p`` (0 < p < 1).

    ``u* = 0`` for ``w <= w_t``; above, ``table[j] = u*(w0 + j dw)`` is interpolated linearly and
    refined by one Newton step on ``u + p u^(p-1) = w``; beyond the table Newton starts at ``u = w``
    (convex increasing, so it converges monotonically from the right).
    """
    n = v.shape[0]
    n_tab = table.shape[0]
    w_end = w0 + (n_tab - 1) * dw
    for b in prange((n + CHUNK - 1) // CHUNK):
        for e in range(b * CHUNK, min(n, (b + 1) * CHUNK)):
            a = v[e]
            w = abs(a) / s
            if not (w > w_t):
                out[e] = 0.0
                continue
            if w < w_end:
                pos = (w - w0) / dw
                j = int(pos)
                if j > n_tab - 2:
                    j = n_tab - 2
                frac = pos - j
                u = table[j] + frac * (table[j + 1] - table[j])
                n_newton = 1
            else:
                u = w
                n_newton = 8
            for _ in range(n_newton):
                g = u + p * u ** (p - 1.0) - w
                d = 1.0 + p * (p - 1.0) * u ** (p - 2.0)
                u -= g / d
            out[e] = s * u if a > 0 else -s * u


@jit
def _woodbury(dmat, minv, f, b, t, m, x):
    """At frequency ``f`` (``D = dmat[f]``, C x K): ``t = D b``, ``m = minv[f] t``, ``x = b - D^H m`` —
    with ``minv = (rho I + D D^H)^-1``, ``x / rho`` solves ``(D^H D + rho I) x / rho = b`` and
    ``D x / rho = m`` (Woodbury).  ``t``, ``m``, ``x``: outputs of lengths C, C, K."""
    n_c, n_k = dmat.shape[1], dmat.shape[2]
    for c in range(n_c):
        s = 0j
        for k in range(n_k):
            s += dmat[f, c, k] * b[k]
        t[c] = s
    for c in range(n_c):
        s = 0j
        for c2 in range(n_c):
            s += minv[f, c, c2] * t[c2]
        m[c] = s
    for k in range(n_k):
        s = 0j
        for c in range(n_c):
            s += np.conj(dmat[f, c, k]) * m[c]
        x[k] = b[k] - s


@jit(parallel=True)
def _zsolve_circular(dmat, minv, dhy, vhat, rho, yhat, weights, out, partial):
    """ADMM z-step of the circular problem, per frequency ``f`` (Woodbury; ``D = dmat[f]``, C x K):

    ``b = dhy + rho vhat``, ``t = D b``, ``m = minv[f] t`` (``minv = (rho I + D D^H)^-1``),
    ``out = (b - D^H m) / rho`` solves ``(D^H D + rho I) out = b``; ``D out = m``, so
    ``partial[chunk] = sum weights[f] |m - yhat|^2`` (the data term by Parseval) comes for free.
    Shapes: dmat (F, C, K), minv (F, C, C), dhy/vhat/out (I, K, F), yhat (I, C, F), weights (F,).
    """
    n_f, n_c, n_k = dmat.shape
    n_img = dhy.shape[0]
    for blk in prange((n_f + CHUNK - 1) // CHUNK):
        acc = 0.0
        b = np.empty(n_k, dtype=np.complex128)
        t = np.empty(n_c, dtype=np.complex128)
        m = np.empty(n_c, dtype=np.complex128)
        x = np.empty(n_k, dtype=np.complex128)
        for f in range(blk * CHUNK, min(n_f, (blk + 1) * CHUNK)):
            for i in range(n_img):
                for k in range(n_k):
                    b[k] = dhy[i, k, f] + rho * vhat[i, k, f]
                _woodbury(dmat, minv, f, b, t, m, x)
                for c in range(n_c):
                    r = m[c] - yhat[i, c, f]
                    acc += weights[f] * (r.real * r.real + r.imag * r.imag)
                for k in range(n_k):
                    out[i, k, f] = x[k] / rho
        partial[blk] = acc


@jit(parallel=True)
def _update_maps(z, x, u, alpha, thresh, v, partial):
    """Relaxed ADMM shrinkage and dual steps on the feature maps, fused (flat arrays of equal length):

    ``zr = alpha z + (1 - alpha) x``, ``x' = soft(zr + u, thresh)``, ``u' = u + zr - x'``,
    ``v = x' - u'`` (the next z-step's right side); ``x``, ``u`` overwritten.  ``partial[chunk]`` =
    (sum z^2, sum x'^2, sum (z - x')^2, sum (x' - x)^2, sum u'^2, sum |z|).
    """
    n = z.shape[0]
    for blk in prange((n + CHUNK - 1) // CHUNK):
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        s3 = 0.0
        s4 = 0.0
        s5 = 0.0
        for e in range(blk * CHUNK, min(n, (blk + 1) * CHUNK)):
            ze = z[e]
            xo = x[e]
            zr = alpha * ze + (1.0 - alpha) * xo
            a = zr + u[e]
            if a > thresh:
                xn = a - thresh
            elif a < -thresh:
                xn = a + thresh
            else:
                xn = 0.0
            un = a - xn
            x[e] = xn
            u[e] = un
            v[e] = xn - un
            s0 += ze * ze
            s1 += xn * xn
            s2 += (ze - xn) * (ze - xn)
            s3 += (xn - xo) * (xn - xo)
            s4 += un * un
            s5 += abs(ze)
        partial[blk, 0] = s0
        partial[blk, 1] = s1
        partial[blk, 2] = s2
        partial[blk, 3] = s3
        partial[blk, 4] = s4
        partial[blk, 5] = s5


@jit(parallel=True)
def _xsolve_masked(dmat, minv, v0hat, v1hat, out, dout):
    """x-step of the mask-decoupled ADMM, per frequency: ``b = D^H v0hat + v1hat``, ``t = D b``,
    ``m = minv[f] t`` (``minv = (I + D D^H)^-1``), ``out = b - D^H m`` solves ``(D^H D + I) out = b``
    and ``dout = D out = m``.  Shapes: dmat (F, C, K), v0hat/dout (I, C, F), v1hat/out (I, K, F)."""
    n_f, n_c, n_k = dmat.shape
    n_img = v0hat.shape[0]
    for blk in prange((n_f + CHUNK - 1) // CHUNK):
        b = np.empty(n_k, dtype=np.complex128)
        t = np.empty(n_c, dtype=np.complex128)
        m = np.empty(n_c, dtype=np.complex128)
        x = np.empty(n_k, dtype=np.complex128)
        for f in range(blk * CHUNK, min(n_f, (blk + 1) * CHUNK)):
            for i in range(n_img):
                for k in range(n_k):
                    s = v1hat[i, k, f]
                    for c in range(n_c):
                        s += np.conj(dmat[f, c, k]) * v0hat[i, c, f]
                    b[k] = s
                _woodbury(dmat, minv, f, b, t, m, x)
                for c in range(n_c):
                    dout[i, c, f] = m[c]
                for k in range(n_k):
                    out[i, k, f] = x[k]


@jit(parallel=True)
def _update_masked_data(dx, y0, u0, sig, rho, alpha, nh, nw, v0, partial):
    """Data block of the mask-decoupled ADMM (arrays (P, Mh, Mw), P = images x channels; the mask
    ``W`` is 1 on the top-left ``nh x nw`` window, where ``sig`` holds the image, 0 elsewhere):

    ``a0 = alpha dx + (1 - alpha)(y0 + sig)``, ``y0' = rho (a0 - sig + u0) / (W + rho)``,
    ``u0' = u0 + a0 - y0' - sig``, ``v0 = y0' + sig - u0'``; ``y0``, ``u0`` overwritten.
    ``partial[plane]`` = (sum dx^2, sum y0'^2, sum (dx - y0' - sig)^2, sum (y0' - y0)^2,
    sum u0'^2, sum W (dx - sig)^2)."""
    n_p, mh, mw = dx.shape
    for pl in prange(n_p):
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        s3 = 0.0
        s4 = 0.0
        s5 = 0.0
        for r in range(mh):
            for q in range(mw):
                d = dx[pl, r, q]
                sv = sig[pl, r, q]
                yo = y0[pl, r, q]
                a0 = alpha * d + (1.0 - alpha) * (yo + sv)
                t = a0 - sv + u0[pl, r, q]
                if r < nh and q < nw:
                    yn = rho * t / (1.0 + rho)
                    s5 += (d - sv) * (d - sv)
                else:
                    yn = t
                un = t - yn
                y0[pl, r, q] = yn
                u0[pl, r, q] = un
                v0[pl, r, q] = yn + sv - un
                s0 += d * d
                s1 += yn * yn
                s2 += (d - yn - sv) * (d - yn - sv)
                s3 += (yn - yo) * (yn - yo)
                s4 += un * un
        partial[pl, 0] = s0
        partial[pl, 1] = s1
        partial[pl, 2] = s2
        partial[pl, 3] = s3
        partial[pl, 4] = s4
        partial[pl, 5] = s5
