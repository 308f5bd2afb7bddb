"""Numba kernels for im2col / col2im (private twins of :mod:`nsiter.im2col`)."""
from __future__ import annotations

import numpy as np

from .._config import jit, prange


@jit
def _valid_range(n_out, step, offset, size):
    """Output positions ``q`` in ``[0, n_out)`` with ``0 <= q*step + offset < size``."""
    lo = 0
    while lo < n_out and lo * step + offset < 0:
        lo += 1
    hi = n_out
    while hi > lo and (hi - 1) * step + offset >= size:
        hi -= 1
    return lo, hi


#: Elements of the per-task slab of zero-padded input rows (a few hundred KB: it stays in cache).
_SLAB_ELEMENTS = 65536


@jit
def _copy4(dst, o, src, i):
    """``dst[o:o + 4] = src[i:i + 4]`` (unsigned indices: no wraparound checks, so one vector move)."""
    a0 = src[i]
    a1 = src[i + np.uint64(1)]
    a2 = src[i + np.uint64(2)]
    a3 = src[i + np.uint64(3)]
    dst[o] = a0
    dst[o + np.uint64(1)] = a1
    dst[o + np.uint64(2)] = a2
    dst[o + np.uint64(3)] = a3


@jit
def _copy8(dst, o, src, i):
    """``dst[o:o + 8] = src[i:i + 8]`` as :func:`_copy4`."""
    _copy4(dst, o, src, i)
    _copy4(dst, o + np.uint64(4), src, i + np.uint64(4))


@jit
def _copy16(dst, o, src, i):
    """``dst[o:o + 16] = src[i:i + 16]`` as :func:`_copy4`."""
    _copy8(dst, o, src, i)
    _copy8(dst, o + np.uint64(8), src, i + np.uint64(8))


@jit
def _runs(dst, o, slab, s, wp, n_runs, kw):
    """``dst[o + e*kw : o + (e + 1)*kw] = slab[s + e*wp : s + e*wp + kw]`` for ``e < n_runs``, each run
    moved as one vector of 4, 8 or 16 elements (or several for ``kw > 16``) that may spill up to 15
    elements past its end: runs go in ascending order, so the next run overwrites the spill, and the
    caller keeps the last vector inside the row."""
    od = np.uint64(o)
    sd = np.uint64(s)
    ukw = np.uint64(kw)
    uwp = np.uint64(wp)
    if kw <= 4:
        for _ in range(n_runs):
            _copy4(dst, od, slab, sd)
            od += ukw
            sd += uwp
    elif kw <= 8:
        for _ in range(n_runs):
            _copy8(dst, od, slab, sd)
            od += ukw
            sd += uwp
    elif kw <= 16:
        for _ in range(n_runs):
            _copy16(dst, od, slab, sd)
            od += ukw
            sd += uwp
    else:
        tail = np.uint64(kw - 16)
        for _ in range(n_runs):
            for j0 in range(0, kw - 16, 16):
                _copy16(dst, od + np.uint64(j0), slab, sd + np.uint64(j0))
            _copy16(dst, od + tail, slab, sd + tail)  # overlaps the previous chunk, inside the run
            od += ukw
            sd += uwp


@jit(parallel=True)
def _im2col(x, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, out):
    """Fill ``out[(n*oh + r)*ow + q, (c*kh + i)*kw + j] = xpad[n, c, r*sh + i*dh, q*sw + j*dw]``.

    Parallel over (image, output row) pairs, each writing its own ``ow`` rows of ``out`` front to
    back.  A pair first copies the ``kh`` input rows of each channel it reads, zero-padded and with
    a zero tail, into a slab (blocks of channels that fit :data:`_SLAB_ELEMENTS`); every output row
    is then ``C*kh`` runs of ``kw`` taps, each a contiguous piece of a slab row when ``dw == 1``,
    moved as one vector (:func:`_runs`) with no padding tests in the loop; the runs whose vector
    would cross the end of the output row, and every tap when ``dw > 1``, go element by element.
    """
    n_img, n_ch, h, w = x.shape
    f = n_ch * kh * kw
    vec = 4 if kw <= 4 else (8 if kw <= 8 else 16)
    wp = w + 2 * pw + vec  # padded row and a tail for the last vector's spill
    cb = max(1, min(n_ch, _SLAB_ELEMENTS // (kh * wp)))
    flat = out.reshape(-1)
    for t in prange(n_img * oh):
        n = t // oh
        r = t - n * oh
        h0 = r * sh - ph
        slab = np.empty(cb * kh * wp, dtype=out.dtype)
        for c0 in range(0, n_ch, cb):
            c1 = min(n_ch, c0 + cb)
            for c in range(c0, c1):
                for i in range(kh):
                    e = (c - c0) * kh + i
                    row = slab[e * wp:(e + 1) * wp]
                    hh = h0 + i * dh
                    if hh < 0 or hh >= h:
                        row[:] = 0.0
                    else:
                        row[:pw] = 0.0
                        row[pw:pw + w] = x[n, c, hh]
                        row[pw + w:] = 0.0
            n_runs = (c1 - c0) * kh
            col0 = c0 * kh * kw
            n_vec = min(n_runs, max(0, (f - vec - col0) // kw + 1)) if dw == 1 else 0
            for q in range(ow):
                o = (t * ow + q) * f + col0
                s = q * sw
                _runs(flat, o, slab, s, wp, n_vec, kw)
                for e in range(n_vec, n_runs):
                    for j in range(kw):
                        flat[o + e * kw + j] = slab[s + e * wp + j * dw]


@jit(parallel=True)
def _col2im(cols, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, out):
    """Adjoint of :func:`_im2col`: ``out[n, c, ...] += cols[...]`` summed over overlaps.

    ``out`` is zeroed.  Parallel over (image, channel) planes: each thread owns one, so no write races.
    """
    n_img, n_ch, h, w = out.shape
    n_patch = oh * ow
    for t in prange(n_img * n_ch):
        n = t // n_ch
        c = t - n * n_ch
        dst = out[n, c]
        for r in range(oh):
            h0 = r * sh - ph
            row0 = n * n_patch + r * ow
            for i in range(kh):
                hh = h0 + i * dh
                if hh < 0 or hh >= h:
                    continue
                drow = dst[hh]
                for j in range(kw):
                    off = j * dw - pw
                    cj = (c * kh + i) * kw + j
                    lo, hi = _valid_range(ow, sw, off, w)
                    for q in range(lo, hi):
                        drow[q * sw + off] += cols[row0 + q, cj]
