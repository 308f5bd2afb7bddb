r"""The numpy backend's convolution kernels: GEMM blocks inside Numba threads, fused gathers and scatters.

Private twins of the array code of :mod:`nsiter.conv` (im2col/col2im + one large GEMM), which
stream the whole column matrix through memory once to write it and once to read it.  Here each
Numba thread takes one task at a time (an image, a group, a block of channels or rows), works in
its own cache-sized buffers and calls single-threaded BLAS (``np.dot``; BLAS held to one thread
by threadpoolctl for the duration, as in :mod:`nsiter._numba.linalg`):

* :func:`conv2d` / :func:`conv_shuffle` — convolution.  Per task the ``(F_g, rows * W_out)`` patch
  matrix of a block of output rows is gathered (the ``unfold`` layout: one contiguous row per tap),
  multiplied by the weight, and the product written out with the bias added.  The same epilogue
  optionally applies the periodic shuffle and the crop of the sub-pixel route (``r > 1``): the
  LR-space convolution and its :func:`nsiter.pixel_shuffle` in one pass.
* :func:`conv_transpose2d` — transposed convolution.  Per task ``C = W_mat^T x_n`` for a block
  of output channels (``(cb kh kw, H W)``, no copy of the channels-first input); then each output
  row is summed in a one-row buffer in phase-major order (column ``w`` at ``[w mod s_w, w div s_w]``),
  so that every tap adds one contiguous (vectorised) run instead of a stride-``s`` scatter, and is
  interleaved into the output with the bias.  Overlaps are summed with ``i`` descending and ``j``
  ascending, the order of :func:`nsiter._numba._im2col._col2im`: given the same products both give
  identical bits.

Inner loops run from 0 over slices: Numba's negative-index wraparound check on ``a[q + off]``
keeps LLVM from vectorising them.
"""
from __future__ import annotations

import threading

import numba
import numpy as np

from .._config import jit, prange
from ._im2col import _valid_range
from .linalg import _blas_controller

__all__ = ["KERNELS", "conv2d", "conv_transpose2d", "conv_shuffle"]

# Elements of one task's column block (4 MB of float32): enough GEMM rows for BLAS to run near its
# peak, small enough that the scatter reads the block back from cache
# (block sizes compared in analysis/results/conv_blocks.md).
_BLOCK_ELEMENTS = 2**20
_SCRATCH_MAX = 16 * 2**20  # per-thread work buffers up to this size are kept and reused

_LOCAL = threading.local()


def _scratch(name: str, n_elements: int, dtype) -> np.ndarray:
    """A flat work buffer kept per Python thread and reused between calls (fresh pages are slow
    to fault in); never handed to callers."""
    dtype = np.dtype(dtype)
    nbytes = int(n_elements) * dtype.itemsize
    if nbytes > _SCRATCH_MAX:
        return np.empty(n_elements, dtype)
    store = _LOCAL.__dict__.setdefault("buffers", {})
    raw = store.get(name)
    if raw is None or raw.nbytes < nbytes:
        raw = store[name] = np.empty(max(nbytes, 64), dtype=np.uint8)
    return raw[:nbytes].view(dtype)


# ---------------------------------------------------------------------------------------------
# convolution (and the fused sub-pixel epilogue)
# ---------------------------------------------------------------------------------------------
@jit(parallel=True)
def _conv_lr(x, wm, bias, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, rows, r, et, el, n_threads, cols_buf,
             acc_buf, out):
    """``z = conv(x, w)`` by tasks (image, group, block of ``rows`` output rows), written as
    ``out[n, o, m r + phi - et, u r + psi - el] = z[n, o r^2 + phi r + psi, m, u] + bias[o]``.

    ``x (N, G, C_g, H, W)``, ``wm (G, O_g, C_g kh kw)`` (columns ``(c, i, j)``), ``out (N, O / r^2,
    Ho, Wo)``; ``cols_buf``/``acc_buf`` ``(n_threads, ...)`` flat per-thread buffers.  ``r = 1,
    et = el = 0`` is the plain convolution.
    """
    n_img, G, cg, h, w = x.shape
    og = wm.shape[1]
    fg = cg * kh * kw
    ho, wo = out.shape[2], out.shape[3]
    rr2 = r * r
    n_blk = (oh + rows - 1) // rows
    n_tasks = n_img * G * n_blk
    for th in prange(n_threads):
        for task in range(th, n_tasks, n_threads):
            n = task // (G * n_blk)
            rem = task - n * G * n_blk
            g = rem // n_blk
            r0 = (rem - g * n_blk) * rows
            nr = min(oh, r0 + rows) - r0
            lb = nr * ow
            cols = cols_buf[th, : fg * lb].reshape((fg, lb))
            for c in range(cg):
                for i in range(kh):
                    for j in range(kw):
                        dst = cols[(c * kh + i) * kw + j]
                        off = j * dw - pw
                        lo, hi = _valid_range(ow, sw, off, w)
                        for m in range(nr):
                            hh = (r0 + m) * sh - ph + i * dh
                            d = dst[m * ow: (m + 1) * ow]
                            if hh < 0 or hh >= h or hi <= lo:
                                d[:] = 0.0
                                continue
                            # zero-based loops over slices: no index wraparound checks, so LLVM vectorises
                            d[:lo] = 0.0
                            d[hi:] = 0.0
                            dv = d[lo:hi]
                            sv = x[n, g, c, hh, lo * sw + off::sw]
                            for q in range(hi - lo):
                                dv[q] = sv[q]
            acc = acc_buf[th, : og * lb].reshape((og, lb))
            np.dot(wm[g], cols, acc)
            for cl in range(og):
                cz = g * og + cl  # LR channel o r^2 + phi r + psi
                o = cz // rr2
                phi = (cz - o * rr2) // r
                psi = cz - o * rr2 - phi * r
                b = bias[o]
                lo, hi = _valid_range(ow, r, psi - el, wo)
                if hi <= lo:
                    continue
                for m in range(nr):
                    hh = (r0 + m) * r + phi - et
                    if hh < 0 or hh >= ho:
                        continue
                    dv = out[n, o, hh, lo * r + psi - el::r]
                    av = acc[cl, m * ow + lo: m * ow + hi]
                    for u in range(hi - lo):
                        dv[u] = av[u] + b


def _threads() -> int:
    return numba.get_num_threads()


def _conv_call(x, weight, bias, g, groups, r, et, el, out):
    n, cin, h, w = x.shape
    cg = cin // groups
    fg = cg * g.kh * g.kw
    og = weight.shape[0] // groups
    rows = max(1, min(g.oh, _BLOCK_ELEMENTS // max(fg * g.ow, 1)))
    nt = _threads()
    while rows > 1 and n * groups * ((g.oh + rows - 1) // rows) < 2 * nt:  # enough tasks for the threads
        rows = (rows + 1) // 2
    xs = np.ascontiguousarray(x).reshape(n, groups, cg, h, w)
    wm = np.ascontiguousarray(weight).reshape(groups, og, fg)
    b = np.zeros(out.shape[1], x.dtype) if bias is None else np.ascontiguousarray(bias)
    cols = _scratch("cols", nt * fg * rows * g.ow, x.dtype).reshape(nt, fg * rows * g.ow)
    acc = _scratch("acc", nt * og * rows * g.ow, x.dtype).reshape(nt, og * rows * g.ow)
    with _blas_controller().limit(limits=1, user_api="blas"):
        _conv_lr(xs, wm, b, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.oh, g.ow, rows, r, et, el, nt,
                 cols, acc, out)
    return out


def conv2d(x: np.ndarray, weight: np.ndarray, bias, g, groups: int) -> np.ndarray:
    """Convolution of ``x (N, C_in, H, W)`` with ``weight (C_out, C_in/groups, kh, kw)`` on geometry ``g``."""
    out = np.empty((g.n, weight.shape[0], g.oh, g.ow), x.dtype)
    return _conv_call(x, weight, bias, g, groups, 1, 0, 0, out)


def conv_shuffle(x: np.ndarray, weight: np.ndarray, bias, g, groups: int, r: int, crop, out_hw) -> np.ndarray:
    """``pixel_shuffle(conv2d(x, weight), r)[..., et:et + Ho, el:el + Wo] + bias`` in one pass
    (``crop = (et, el)``, ``out_hw = (Ho, Wo)``, ``bias`` per HR channel)."""
    out = np.empty((g.n, weight.shape[0] // (r * r), out_hw[0], out_hw[1]), x.dtype)
    return _conv_call(x, weight, bias, g, groups, r, crop[0], crop[1], out)


# ---------------------------------------------------------------------------------------------
# transposed convolution
# ---------------------------------------------------------------------------------------------
@jit(parallel=True)
def _conv_transpose(x, wt, bias, kh, kw, sh, sw, ph, pw, dh, dw, ih, iw, cb, n_threads, cols_buf, row_buf, out):
    """``out[n, c] = bias[c] + col2im(W_mat^T x_n)`` by tasks (image, group, block of ``cb`` channels).

    ``x (N, G, C_g, ih*iw)``, ``wt (G, O_g kh kw, C_g)`` (rows ``(o, i, j)``), ``out (N, O, Ho, Wo)``;
    input pixel ``(r, q)`` of tap ``(i, j)`` lands on ``(r sh - ph + i dh, q sw - pw + j dw)``.  Output
    row ``hh`` is summed in ``row_buf`` in phase-major order (column ``ww`` at ``[ww mod sw, ww div sw]``),
    so that every tap adds one contiguous run, then interleaved into ``out`` with the bias.
    """
    n_img, G, cg, L = x.shape
    ho, wo = out.shape[2], out.shape[3]
    og = out.shape[1] // G
    kk = kh * kw
    aw = (wo + sw - 1) // sw
    n_blk = (og + cb - 1) // cb
    n_tasks = n_img * G * n_blk
    for th in prange(n_threads):
        acc = row_buf[th, : sw * aw].reshape((sw, aw))
        phw = np.empty(kw, np.int64)  # per column tap: phase, offset in the phase, valid input columns
        awoff = np.empty(kw, np.int64)
        qlo = np.empty(kw, np.int64)
        qhi = np.empty(kw, np.int64)
        for j in range(kw):
            woff = j * dw - pw
            phw[j] = woff % sw
            awoff[j] = (woff - phw[j]) // sw
            qlo[j], qhi[j] = _valid_range(iw, sw, woff, wo)
        for task in range(th, n_tasks, n_threads):
            n = task // (G * n_blk)
            rem = task - n * G * n_blk
            g = rem // n_blk
            c0 = (rem - g * n_blk) * cb
            nc = min(og, c0 + cb) - c0
            cols = cols_buf[th, : nc * kk * L].reshape((nc * kk, L))
            np.dot(wt[g, c0 * kk:(c0 + nc) * kk], x[n, g], cols)
            for cl in range(nc):
                c = g * og + c0 + cl
                b = bias[c]
                dst = out[n, c]
                for hh in range(ho):
                    acc[...] = 0.0
                    for i in range(kh - 1, -1, -1):
                        t = hh + ph - i * dh
                        if t < 0 or t % sh:
                            continue
                        rr = t // sh
                        if rr >= ih:
                            continue
                        base = rr * iw
                        for j in range(kw):
                            lo = qlo[j]
                            m = qhi[j] - lo
                            if m <= 0:
                                continue
                            # zero-based runs over slices: no index wraparound checks, so LLVM vectorises
                            src = cols[cl * kk + i * kw + j, base + lo: base + lo + m]
                            arow = acc[phw[j], lo + awoff[j]: lo + awoff[j] + m]
                            for q in range(m):
                                arow[q] += src[q]
                    for p_w in range(sw):
                        arow = acc[p_w]
                        dv = dst[hh, p_w::sw]
                        for u in range(dv.shape[0]):
                            dv[u] = arow[u] + b


def conv_transpose2d(x: np.ndarray, weight: np.ndarray, bias, g, groups: int) -> np.ndarray:
    """Transposed convolution of ``x (N, C_in, H, W)`` with ``weight (C_in, C_out/groups, kh, kw)``.

    ``g`` is the geometry of the output image as a convolution's input (:func:`nsiter.col2im`), its
    grid ``(g.oh, g.ow)`` equal to ``(H, W)``.
    """
    n, cin, h, w = x.shape
    cg = cin // groups
    og = weight.shape[1]
    kk = g.kh * g.kw
    L = h * w
    nt = _threads()
    cb = max(1, min(og, _BLOCK_ELEMENTS // max(kk * L, 1)))
    while cb > 1 and n * groups * ((og + cb - 1) // cb) < 2 * nt:  # enough tasks for the threads
        cb = (cb + 1) // 2
    xs = np.ascontiguousarray(x).reshape(n, groups, cg, L)
    wt = np.ascontiguousarray(weight.reshape(groups, cg, og * kk).transpose(0, 2, 1))
    b = np.zeros(g.c, x.dtype) if bias is None else np.ascontiguousarray(bias)
    aw = -(-g.w // g.sw)
    cols = _scratch("tcols", nt * cb * kk * L, x.dtype).reshape(nt, cb * kk * L)
    row = _scratch("trow", nt * g.sw * aw, x.dtype).reshape(nt, g.sw * aw)
    out = np.empty((n, g.c, g.h, g.w), x.dtype)
    with _blas_controller().limit(limits=1, user_api="blas"):
        _conv_transpose(xs, wt, b, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, h, w, cb, nt, cols, row, out)
    return out


#: Kernels of :mod:`nsiter.conv` this backend computes natively (tests empty it to run the array code).
KERNELS = {"conv2d": conv2d, "conv_transpose2d": conv_transpose2d, "conv_shuffle": conv_shuffle}
