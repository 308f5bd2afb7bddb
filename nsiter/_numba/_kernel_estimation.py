"""Numba kernels for kernel estimation (private twins of :mod:`nsiter.kernel_estimation`).

Both kernels work on an already zero-padded, C-contiguous float64 batch ``xp`` of shape
``(N, C, Hp, Wp)`` and never build the im2col matrix ``X``:

* :func:`_correlate` computes ``X w`` — the valid cross-correlation of ``xp`` with ``w``;
* :func:`_correlate_adjoint` computes ``X^T y`` — the correlation of ``xp`` with ``y``,
  i.e. the kernel-shaped gradient of ``0.5 * ||X w - y||^2``.
"""
from __future__ import annotations

import numpy as np

from .._config import jit, prange

# Output rows per partial sum of the adjoint: fixed, so that the summation order (and so
# the last bits of the result) does not depend on the number of threads.
ROWS_PER_PARTIAL = 16
LANES = 8


@jit(parallel=True)
def _correlate(xp, w, sh, sw, dh, dw, out):
    """``out[n, r, q] = sum_{c,i,j} xp[n, c, r*sh + i*dh, q*sw + j*dw] * w[c, i, j]``.

    ``w`` is ``(C, kh, kw)``, ``out`` is ``(N, oh, ow)`` (overwritten).  Parallel over
    (image, output row) pairs; each writes its own row of ``out``.  The inner loop runs
    along an input row (contiguous reads, stride ``sw``).
    """
    n_img, n_ch = xp.shape[0], xp.shape[1]
    kh, kw = w.shape[1], w.shape[2]
    oh, ow = out.shape[1], out.shape[2]
    for t in prange(n_img * oh):
        n = t // oh
        r = t - n * oh
        orow = out[n, r]
        for q in range(ow):
            orow[q] = 0.0
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
    """Per-block partial sums of ``X^T y``: ``partial[b, c, i, j]`` over output rows of block ``b``.

    ``(X^T y)[c, i, j] = sum_{n, r, q} xp[n, c, r*sh + i*dh, q*sw + j*dw] * y[n, r, q]``.
    ``y`` is ``(N, oh, ow)``; ``partial`` is ``(n_blocks, C, kh, kw)`` with
    ``n_blocks = ceil(N*oh / ROWS_PER_PARTIAL)``, overwritten.  Blocks are independent
    (prange over disjoint slices of ``partial``); the caller sums them serially.
    """
    n_img, n_ch = xp.shape[0], xp.shape[1]
    kh, kw = partial.shape[2], partial.shape[3]
    oh, ow = y.shape[1], y.shape[2]
    n_rows = n_img * oh
    n_blocks = partial.shape[0]
    qv = ow - ow % LANES
    for b in prange(n_blocks):
        lanes = np.zeros(LANES)
        acc = partial[b]
        for c in range(n_ch):
            for i in range(kh):
                for j in range(kw):
                    acc[c, i, j] = 0.0
        t_end = min(n_rows, (b + 1) * ROWS_PER_PARTIAL)
        for t in range(b * ROWS_PER_PARTIAL, t_end):
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
