"""Numba kernels for patch covariances (private twins of :mod:`nsiter.covariance`).

Two ways to the raw second moments of the (virtual) im2col matrix about a shift:

* :func:`_patch_rows` writes a chunk of shifted patch rows, laid out per group and
  augmented by a column of ones, so that one BLAS product ``B^T B`` per chunk gives
  the second moments *and* the column sums (the paper's augmented data matrix).
* :func:`_shifted_moments` never builds patch rows: for a dense (stride 1) patch grid
  the moment of taps ``(c, i, j)`` and ``(c', i + di, j + dj)`` is the sum, over the
  window of output positions, of the product image ``x_c(u, v) x_c'(u + di*dh, v + dj*dw)``.
  Each product row is formed once per ``(c, c', di)`` and all ``dj``; window sums are
  differences of running row sums taken at the window's first and last row, so the cost is
  ``O(Hp * Wp * (2kw - 1))`` per ``(c, c', di)`` instead of ``O(H W k^4)`` per channel pair.

Kernels take contiguous arrays and preallocated outputs and never validate.
"""
from __future__ import annotations

import numpy as np

from .._config import jit, prange


@jit(parallel=True)
def _patch_rows(x, shift, grp, feat, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, p0, stacked, out):
    """Shifted patch rows ``p0 .. p0 + R`` of the im2col matrix, one output slot per column.

    Patch ``p = n*oh*ow + a*ow + b`` has im2col column ``j = (c*kh + i)*kw + jj`` equal
    to ``xpad[n, c, a*sh + i*dh, b*sw + jj*dw]`` (zero outside ``x``); the kernel stores
    ``value - shift[j]`` at group ``grp[j]``, feature ``feat[j]``:

    * ``stacked=False``: ``out[grp[j], r, feat[j]]`` with ``out`` of shape ``(G, R, Fb + 1)``;
    * ``stacked=True``:  ``out[r, grp[j], feat[j]]`` with ``out`` of shape ``(R, G, Fb + 1)``
      (rows of all groups stacked, the reference grouping).

    The last slot of every group row is set to 1.  Parallel over rows (disjoint writes).
    """
    n_ch = x.shape[1]
    h = x.shape[2]
    w = x.shape[3]
    if stacked:
        n_rows = out.shape[0]
        n_grp = out.shape[1]
    else:
        n_rows = out.shape[1]
        n_grp = out.shape[0]
    fb = out.shape[2] - 1
    n_patch = oh * ow
    for r in prange(n_rows):
        p = p0 + r
        n = p // n_patch
        rem = p - n * n_patch
        a = rem // ow
        h0 = a * sh - ph
        w0 = (rem - a * ow) * sw - pw
        inside = h0 >= 0 and h0 + (kh - 1) * dh < h and w0 >= 0 and w0 + (kw - 1) * dw < w
        col = 0
        for c in range(n_ch):
            for i in range(kh):
                hh = h0 + i * dh
                row_ok = hh >= 0 and hh < h
                for jj in range(kw):
                    ww = w0 + jj * dw
                    if inside or (row_ok and ww >= 0 and ww < w):
                        v = x[n, c, hh, ww] - shift[col]
                    else:
                        v = -shift[col]
                    if stacked:
                        out[r, grp[col], feat[col]] = v
                    else:
                        out[grp[col], r, feat[col]] = v
                    col += 1
        for g in range(n_grp):
            if stacked:
                out[r, g, fb] = 1.0
            else:
                out[g, r, fb] = 1.0


@jit(parallel=True)
def _shifted_moments(xs, tasks, kh, kw, dh, dw, oh, ow, acc):
    """Raw moments of a dense (stride 1) patch grid from shifted inner products.

    ``xs`` is ``(N, C, Hp, Wp)`` float64: padded, shifted images with
    ``Hp = oh + (kh - 1)*dh`` and ``Wp = ow + (kw - 1)*dw``.  Task ``t = (c, c2, di)``
    adds to ``acc[t, i, dj + kw - 1, j]`` (for the valid ``i``, ``dj``, ``j``)

    .. math::

        \\sum_n \\sum_{u = i d_h}^{i d_h + oh - 1} \\sum_{v = j d_w}^{j d_w + ow - 1}
        xs[n, c, u, v] \\; xs[n, c_2, u + d_i d_h, v + d_j d_w],

    the im2col inner product of columns ``(c, i, j)`` and ``(c2, i + di, j + dj)``.
    Row sums over ``u`` are accumulated once for all windows (``cum``); a window's sum
    is the difference of the prefix sums along ``v`` of ``cum`` recorded at its last
    and first row.  Parallel over tasks, each owning ``acc[t]``.
    """
    nb = xs.shape[0]
    wp = xs.shape[3]
    ndj = 2 * kw - 1
    for t in prange(tasks.shape[0]):
        c = tasks[t, 0]
        c2 = tasks[t, 1]
        di = tasks[t, 2]
        i_lo = max(0, -di)
        i_hi = kh - max(0, di)
        u_lo = i_lo * dh
        u_hi = (i_hi - 1) * dh + oh
        ddh = di * dh
        cum = np.zeros((ndj, wp))
        pref = np.empty(wp + 1)
        for n in range(nb):
            a_img = xs[n, c]
            b_img = xs[n, c2]
            cum[:, :] = 0.0
            for u in range(u_lo, u_hi + 1):
                # window boundaries at row u: cum holds the row sums of rows [u_lo, u)
                event = False
                for i in range(i_lo, i_hi):
                    if i * dh == u or i * dh + oh == u:
                        event = True
                if event:
                    for q in range(ndj):
                        dj = q - (kw - 1)
                        j_lo = max(0, -dj)
                        j_hi = kw - max(0, dj)
                        row = cum[q]
                        s = 0.0
                        pref[0] = 0.0
                        for v in range(wp):
                            s += row[v]
                            pref[v + 1] = s
                        for i in range(i_lo, i_hi):
                            sign = 0.0
                            if i * dh + oh == u:
                                sign += 1.0
                            if i * dh == u:
                                sign -= 1.0
                            if sign != 0.0:
                                for j in range(j_lo, j_hi):
                                    v0 = j * dw
                                    acc[t, i, q, j] += sign * (pref[v0 + ow] - pref[v0])
                if u == u_hi:
                    break
                a = a_img[u]
                b = b_img[u + ddh]
                for q in range(ndj):
                    off = (q - (kw - 1)) * dw
                    v_lo = max(0, -off)
                    v_hi = wp - max(0, off)
                    row = cum[q]
                    for v in range(v_lo, v_hi):
                        row[v] += a[v] * b[v + off]


@jit
def _scatter_moments(acc, tasks, kh, kw, M):
    """Write task results of :func:`_shifted_moments` into the symmetric ``(F, F)`` matrix ``M``.

    ``acc[t, i, dj + kw - 1, j]`` is the moment of im2col columns
    ``(c*kh + i)*kw + j`` and ``(c2*kh + i + di)*kw + j + dj``; both ``M[a, b]`` and
    ``M[b, a]`` are set.
    """
    taps = kh * kw
    for t in range(tasks.shape[0]):
        c = tasks[t, 0]
        c2 = tasks[t, 1]
        di = tasks[t, 2]
        for i in range(max(0, -di), kh - max(0, di)):
            for q in range(2 * kw - 1):
                dj = q - (kw - 1)
                for j in range(max(0, -dj), kw - max(0, dj)):
                    a = c * taps + i * kw + j
                    b = c2 * taps + (i + di) * kw + j + dj
                    v = acc[t, i, q, j]
                    M[a, b] = v
                    M[b, a] = v
