"""Numba kernels for im2col / col2im (private twins of :mod:`nsiter.im2col`)."""
from __future__ import annotations

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


@jit(parallel=True)
def _im2col(x, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, out):
    """Fill ``out[(n*oh + r)*ow + q, (c*kh + i)*kw + j] = xpad[n, c, r*sh + i*dh, q*sw + j*dw]``.

    Parallel over (image, output row) pairs, each writing its own ``ow`` rows of ``out``; the
    innermost loop reads along an input row, and the ``ow x F`` block it writes stays in cache.
    """
    n_img, n_ch, h, w = x.shape
    for t in prange(n_img * oh):
        n = t // oh
        r = t - n * oh
        h0 = r * sh - ph
        row0 = t * ow
        col = 0
        for c in range(n_ch):
            for i in range(kh):
                hh = h0 + i * dh
                if hh < 0 or hh >= h:
                    for q in range(ow):
                        for j in range(kw):
                            out[row0 + q, col + j] = 0.0
                else:
                    src = x[n, c, hh]
                    for j in range(kw):
                        off = j * dw - pw
                        lo, hi = _valid_range(ow, sw, off, w)
                        cj = col + j
                        for q in range(lo):
                            out[row0 + q, cj] = 0.0
                        for q in range(lo, hi):
                            out[row0 + q, cj] = src[q * sw + off]
                        for q in range(hi, ow):
                            out[row0 + q, cj] = 0.0
                col += kw


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
