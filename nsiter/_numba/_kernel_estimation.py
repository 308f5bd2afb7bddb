"""Numba kernels of :mod:`nsiter.kernel_estimation` on a zero-padded C-contiguous float64 batch ``xp``
(N, C, Hp, Wp), never building the im2col matrix ``X``: :func:`_correlate` is ``X w`` (the valid
cross-correlation), :func:`_correlate_adjoint` is ``X^T y`` (the kernel-shaped gradient of ``||X w - y||^2 / 2``)."""
from __future__ import annotations

import numpy as np

from .._config import jit, prange

# Output rows per partial sum of the adjoint: fixed, so that the summation order (the last bits) is thread-independent.
ROWS_PER_PARTIAL = 16
LANES = 8


@jit(parallel=True)
def _correlate(xp, w, sh, sw, dh, dw, out):
    """``out[n, r, q] = sum_{c,i,j} xp[n, c, r*sh + i*dh, q*sw + j*dw] * w[c, i, j]``, overwritten; prange over
    (image, output row), each writing its own row of ``out``; the inner loop runs along an input row."""
    n_img, n_ch = xp.shape[0], xp.shape[1]
    kh, kw = w.shape[1], w.shape[2]
    oh, ow = out.shape[1], out.shape[2]
    for t in prange(n_img * oh):
        n = t // oh
        r = t - n * oh
        orow = out[n, r]
        orow[:] = 0.0
        for c in range(n_ch):
            for i in range(kh):
                src = xp[n, c, r * sh + i * dh]
                for j in range(kw):
                    wv = w[c, i, j]
                    off = j * dw
                    if sw == 1:  # contiguous: lets LLVM vectorise
                        seg = src[off:off + ow]
                        for q in range(ow):
                            orow[q] += wv * seg[q]
                    else:
                        for q in range(ow):
                            orow[q] += wv * src[q * sw + off]


@jit(parallel=True)
def _correlate_adjoint(xp, y, sh, sw, dh, dw, partial):
    """``partial[b]``: the sum of ``xp[n, c, r*sh + i*dh, q*sw + j*dw] * y[n, r, q]`` over the output rows
    ``(n, r)`` of block ``b``, for ``y`` (N, oh, ow) and ``partial`` (ceil(N*oh / ROWS_PER_PARTIAL), C, kh, kw),
    overwritten.  prange over disjoint blocks; the caller sums them serially into ``X^T y``."""
    n_img, n_ch = xp.shape[0], xp.shape[1]
    kh, kw = partial.shape[2], partial.shape[3]
    oh, ow = y.shape[1], y.shape[2]
    qv = ow - ow % LANES
    for b in prange(partial.shape[0]):
        lanes = np.zeros(LANES)
        acc = partial[b]
        acc[:] = 0.0
        for t in range(b * ROWS_PER_PARTIAL, min(n_img * oh, (b + 1) * ROWS_PER_PARTIAL)):
            n = t // oh
            r = t - n * oh
            yrow = y[n, r]
            for c in range(n_ch):
                for i in range(kh):
                    src = xp[n, c, r * sh + i * dh]
                    for j in range(kw):
                        off = j * dw
                        # LANES independent partial sums (a fixed, deterministic order): the
                        # lane loop vectorises without reassociation (no fastmath)
                        for l in range(LANES):
                            lanes[l] = 0.0
                        if sw == 1:
                            seg = src[off:off + ow]
                            for q0 in range(0, qv, LANES):
                                for l in range(LANES):
                                    lanes[l] += seg[q0 + l] * yrow[q0 + l]
                        else:
                            for q0 in range(0, qv, LANES):
                                for l in range(LANES):
                                    lanes[l] += src[(q0 + l) * sw + off] * yrow[q0 + l]
                        s = 0.0
                        for q in range(qv, ow):
                            s += src[q * sw + off] * yrow[q]
                        for l in range(LANES):
                            s += lanes[l]
                        acc[c, i, j] += s
