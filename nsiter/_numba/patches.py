r"""The numpy backend's patch kernels: wrappers allocating outputs for the Numba kernels.

Moments are float64 ``(count, mean (G, fb), M2 (G, fb, fb))``, ``M2`` possibly a reused work
buffer (callers copy or reduce it), accumulated about a *shift* close to the feature means (the
channel mean times the fraction of the grid where a tap sees the image) and corrected exactly,
``M2 = S_2 - s s^T / N`` (``s`` the shifted column sums): no ``E[x x^T] - mu mu^T``
cancellation as in the reference code's float32.  The kernels that share one shifted image
between all taps of a channel ("rowshift", "shifted") shift only the image pixels, keep the padding
at 0 and add the padding's part exactly from the counts of valid positions (:func:`_finish_padded`),
so no moment is a difference of sums of squared means.  A cost model (:func:`_cost`) picks one of
:data:`KERNELS`, which agree to rounding:

* ``"gemm"`` (any geometry): one BLAS product ``B^T B`` per chunk of shifted patch rows with a
  column of ones (moments and column sums at once); float32 BLAS for float32 blocks of >= 64 features.
* ``"narrow"`` (any geometry): the same rows, filled in parallel into cache-sized tasks and
  multiplied by register tiles (upper triangle, in the buffer dtype of "gemm"; float32 chains of at
  most 256 or 2048 rows summed in float64):
  no BLAS call per chunk, no chunk in memory; fastest wherever the rows are many.
* ``"rowshift"`` (vertical step 1): products of 1-row patch matrices, one per row shift and
  window segment: ``kh`` times less fill and about ``kh/2`` times fewer multiply-adds.
* ``"shifted"`` (step 1): shifted inner products, ``O(C^2 k^2 H W)`` instead of ``O(C^2 k^4 H W)``.
"""
from __future__ import annotations

import functools
import math
import threading
from typing import NamedTuple

import numba
import numpy as np

from .. import _tuning
from .._moments import Plan, channel_means, merge_moments, pieces
from ._covariance import (_centre_padded, _narrow_moments, _patch_rows, _reduce_parts, _row_patches,
                          _scatter_moments, _shifted_moments, _subtract_outer)
from ._im2col import _col2im, _im2col
from ._tiles import _VECTOR_BYTES, GRAM_TILE_ROWS

__all__ = ["KERNELS", "im2col", "col2im", "matrix_moments", "patch_moments", "choose_kernel", "correlate_centred"]

#: Moment kernels of :func:`patch_moments` (its ``kernel`` argument forces one, for tests and benchmarks).
KERNELS = ("gemm", "narrow", "rowshift", "shifted")

_BUFFER_BYTES = 8 * 2**20  # one chunk of shifted patch rows
_F32_ROWS = 2048  # rows per float32 chunk of patch rows (its rounding grows like sqrt(rows))
_F32_GEMM_ROWS = 8192  # rows per float32 product of 1-row patch matrices (fewer, larger BLAS calls)
_F64_ROWS = 65536
_F32_MIN_FEATURES = 64  # narrower blocks are fill-bound: their products run in float64
_SOURCE_ORDER_MIN_FEATURES = 64  # the reference grouping fills in im2col order from this many features (_fill_plan)
_FILL_RUN = 40  # patches of one column filled per pass, at least, in im2col order (_fill_plan)
_DENSE_BYTES = 32 * 2**20  # one piece of padded, shifted float64 images ("shifted" kernel)
_ROWS_BYTES = 32 * 2**20  # one piece of 1-row patch matrices ("rowshift" kernel)
_SCRATCH_MAX = 8 * 2**20  # work buffers up to this size are kept per thread and reused
_NARROW_TASK_BYTES = 512 * 2**10  # one task's patch rows ("narrow" kernel): they stay in L2
_NARROW_L1_BYTES = 32 * 2**10  # accumulators up to this size stay in L1 during a product ...
_NARROW_WIDE_K = 160  # ... larger ones take products of this many rows (a 256-byte column slab each: 40 KB)
_NARROW_F32_ROWS = 256  # rows per float32 chain of the "narrow" kernel when its accumulators fit L1
_NARROW_PARTS = 16  # independent partial sums of the "narrow" kernel (fixed: not the thread count)
_NARROW_MIN_PARTS = 2  # ... at least, and a power of two (the threads share them evenly) ...
_NARROW_ACC_BYTES = 16 * 2**20  # ... with float64 accumulators up to this size (a buffer kept per thread)
_RATE_MAC = {np.dtype(k): v for k, v in _tuning.COV_RATE_MAC.items()}  # keyed by dtype: a cheap lookup


def im2col(imgs: np.ndarray, g, out: np.ndarray | None = None) -> np.ndarray:
    """The ``(N*L, C*kh*kw)`` patch matrix (Numba, parallel over image rows), written into ``out``
    (C-contiguous, ``imgs``' dtype, not overlapping it: the caller checked) when given."""
    if out is None:
        out = np.empty((g.n * g.n_patches, g.n_features), dtype=imgs.dtype)
    _im2col(np.ascontiguousarray(imgs), g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.oh, g.ow, out)
    return out


def col2im(X: np.ndarray, g) -> np.ndarray:
    """Patch rows summed back into ``(N, C, H, W)`` images (Numba, parallel over planes)."""
    out = np.zeros((g.n, g.c, g.h, g.w), dtype=X.dtype)
    _col2im(np.ascontiguousarray(X), g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.oh, g.ow, out)
    return out


def correlate_centred(x: np.ndarray, shift: np.ndarray, K: np.ndarray, bias: np.ndarray, padding) -> np.ndarray:
    """``y[n, o] = bias[o] + sum_c (pad(x[n], padding) - shift[c]) * K[o, c]`` (valid correlation).

    float64, one padded image at a time (SciPy's correlation per channel pair).
    """
    from scipy.signal import correlate

    n, c, h, w = x.shape
    ph, pw = padding
    y = np.empty((n, K.shape[0], h + 2 * ph - K.shape[2] + 1, w + 2 * pw - K.shape[3] + 1))
    xs = np.empty((c, h + 2 * ph, w + 2 * pw))
    for i in range(n):
        xs[...] = -shift[:, None, None]
        xs[:, ph:ph + h, pw:pw + w] = x[i] - shift[:, None, None]
        for co in range(K.shape[0]):
            acc = np.full(y.shape[2:], bias[co])
            for ci in range(c):
                acc += correlate(xs[ci], K[co, ci], mode="valid")
            y[i, co] = acc
    return y


_LOCAL = threading.local()


def _scratch(name: str, shape, dtype, *, zero: bool = False, limit: int = _SCRATCH_MAX) -> np.ndarray:
    """A work buffer of at most ``limit`` bytes kept per thread and reused between calls (fresh
    pages are slow to fault in); results handed to callers are never scratch."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes > limit:
        return np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
    store = _LOCAL.__dict__.setdefault("buffers", {})
    raw = store.get(name)
    if raw is None or raw.nbytes < nbytes + 64:
        raw = store[name] = np.empty(max(nbytes, 64) + 64, dtype=np.uint8)
    start = -raw.ctypes.data % 64  # 64-byte aligned: whole cache lines, vector loads within one line
    arr = raw[start:start + nbytes].view(dtype).reshape(shape)
    if zero:
        arr.fill(0)
    return arr


def _finish_shifted(count, shift, sums, second):
    """Centred statistics from moments about ``shift``: ``M2 = S_2 - s s^T / N`` in place on ``second``
    (as ``z z^T`` with ``z = s / sqrt(N)``, which keeps ``M2`` exactly symmetric)."""
    z = sums / math.sqrt(count)
    _subtract_outer(second.reshape((-1,) + second.shape[-2:]), z.reshape(-1, z.shape[-1]))
    return count, shift + sums / count, second


def _chunk_rows(width: int, dtype: np.dtype) -> int:
    rows = max(1, _BUFFER_BYTES // (width * dtype.itemsize))
    return int(min(rows, _F32_ROWS if dtype == np.float32 else _F64_ROWS))


def _buffer_dtype(arr_dtype: np.dtype, fb: int) -> np.dtype:
    if arr_dtype == np.float32 and fb >= _F32_MIN_FEATURES:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def matrix_moments(arr: np.ndarray):
    """Moments of the rows of a samples x features matrix about a sampled shift, in chunks through BLAS."""
    n, f = arr.shape
    shift = arr[:: max(1, n // 256)].mean(axis=0, dtype=np.float64)  # a shift near the mean (<= 511 rows)
    bdt = _buffer_dtype(arr.dtype, f)
    shift_b = shift.astype(bdt)  # subtract in the buffer's dtype (no mixed-type loop) ...
    shift = shift_b.astype(np.float64)  # ... and correct for exactly that shift
    rows = _chunk_rows(f + 1, bdt)
    flat = _scratch("rows", (min(rows, n) * (f + 1),), bdt)
    tmp = _scratch("tmp", (f + 1, f + 1), bdt)
    acc = _scratch("acc", (f + 1, f + 1), np.float64, zero=True)
    for p0 in range(0, n, rows):
        r = min(rows, n - p0)
        buf = flat[: r * (f + 1)].reshape(r, f + 1)
        np.subtract(arr[p0:p0 + r], shift_b, out=buf[:, :f])
        buf[:, f] = 1.0
        np.matmul(buf.T, buf, out=tmp)
        acc += tmp
    return _finish_shifted(n, shift, acc[f, :f], acc[:f, :f])


def _tap_ranges(out: int, step: int, pad: int, dil: int, k: int, size: int):
    """``lo, hi (k,)``: tap ``i`` of one axis reads the image, not its padding, at output positions
    ``[lo[i], hi[i])`` (``q*step + i*dil - pad`` in ``[0, size)``)."""
    off = np.arange(k) * dil - pad
    lo = np.clip(-(off // step), 0, out)
    return lo, np.maximum(lo, np.clip(-((off - size) // step), 0, out))


def _valid_fraction(out: int, step: int, pad: int, dil: int, k: int, size: int) -> np.ndarray:
    lo, hi = _tap_ranges(out, step, pad, dil, k, size)
    return (hi - lo) / out


def _window_bounds(lo, hi, a0: int, a1: int, dil: int):
    """``(r0, r1)``, each ``(k, k + 1)``: rows ``[r0[i, i'], r1[i, i'])`` of a piece holding output rows
    ``[a0, a1)`` (plus the halo) that tap ``i`` reads where tap ``i'`` sees the image; ``i' = k``: all."""
    lo = np.append(np.clip(lo, a0, a1), a0) - a0
    hi = np.append(np.clip(hi, a0, a1), a1) - a0
    tap = np.arange(len(lo) - 1)[:, None] * dil
    return tap + lo[None, :], tap + hi[None, :]


def _finish_padded(g, m_c, tsum, second, rh, rw):
    r"""``(count, mean - shift, M2, shift)`` (means ``(B, fb)``, ``M2 (B, fb, fb)``) of ``B`` blocks of
    whole channels from moments of zero-padded, shifted images (``shift = m_c f``).

    With ``y_a = (x_a - m_c) [a valid]`` (what the kernels saw), ``x_a = y_a + m_c [a valid]``, and
    ``M2 = Y_c^T Y_c + (E + E^T) + m_c m_{c'} K``, ``E_ab = m_{c'} (T_ab - f_b S_a)``, with the
    shifted column sums ``S``, the sums ``T_ab`` of ``y_a`` where tap ``b`` is valid (``tsum (C, kh,
    kw, kh + 1, kw + 1)``, index ``kh``/``kw`` = everywhere, so ``S`` and ``T`` of an always-valid tap
    are the same floats and its ``E`` is exactly 0), the valid fractions ``f`` and the centred
    validity counts ``K = n (C_h (x) H_w + P_h (x) C_w)`` from the per-axis ranges ``rh, rw`` of
    :func:`_tap_ranges` (``H_ii'``: positions valid for taps ``i`` and ``i'``, ``P = L L^T / out`` with
    ``L = diag H``, ``C = H - P``): 0 for always-valid taps, no cancellation in any term.  ``second``:
    ``Y^T Y`` per block.
    """
    kh, kw = g.kh, g.kw
    taps = kh * kw
    blocks, fb = second.shape[0], second.shape[-1]
    cb = fb // taps
    parts = []
    for (lo, hi), out in ((rh, g.oh), (rw, g.ow)):
        shared = np.maximum(0, np.minimum.outer(hi, hi) - np.maximum.outer(lo, lo))
        p = np.outer(hi - lo, hi - lo) / out
        parts.append((hi - lo, shared, shared - p, p))
    (lh, _, ch, ph), (lw, hw, cw, _) = parts
    f = np.outer(lh, lw).reshape(taps) / (g.oh * g.ow)
    S = tsum[:, :, :, kh, kw].reshape(g.c, taps)
    shift = (m_c[:, None] * f).reshape(blocks, fb)
    count = g.n * g.oh * g.ow
    if g.ph == 0 and g.pw == 0:  # every tap always valid: E = K = 0
        return _finish_shifted(count, 0.0, S.reshape(blocks, fb), second) + (shift,)
    K = g.n * (ch[:, None, :, None] * hw[None, :, None, :] + ph[:, None, :, None] * cw[None, :, None, :])
    A = tsum[:, :, :, :kh, :kw].reshape(g.c, taps, taps) - S[:, :, None] * f  # sums of y_a (valid_b - f_b)
    z = S / math.sqrt(count)
    for blk in range(blocks):
        cs = slice(blk * cb, (blk + 1) * cb)
        _centre_padded(second[blk], z[cs], A[cs], m_c[cs], K.reshape(taps, taps))
    return count, (S / count).reshape(blocks, fb), second, shift


def _patch_shift(imgs: np.ndarray, g, plan: Plan):
    """``(shift per im2col column (F,), per output feature (G, fb))``: the column means of a stationary
    image, padding included (averaged over the stacked groups of the reference grouping)."""
    m_c = channel_means(imgs)
    fh = _valid_fraction(g.oh, g.sh, g.ph, g.dh, g.kh, g.h)
    fw = _valid_fraction(g.ow, g.sw, g.pw, g.dw, g.kw, g.w)
    shift_col = (m_c[:, None, None] * fh[None, :, None] * fw[None, None, :]).reshape(-1)
    if plan.mode == "reference":
        shift_out = shift_col.reshape(plan.fb, plan.stack).mean(axis=1)
        return np.ascontiguousarray(shift_out[plan.feat]), shift_out[None]
    return shift_col, shift_col.reshape(plan.groups, plan.fb)


def _fill_plan(plan: Plan, ow: int) -> tuple[np.ndarray, int]:
    """``(order, band)`` of :func:`_patch_rows`: the fill order of the im2col columns and the output
    rows filled per pass.

    im2col order (channel by channel), with bands of at least :data:`_FILL_RUN` patches (several
    output rows on a narrow grid), so that a column reads its channel plane down the band while
    the plane's next columns follow; but for the reference grouping with fewer than
    :data:`_SOURCE_ORDER_MIN_FEATURES` features per group, the order of the buffer (lane by
    lane: consecutive writes share cache lines), one output row per pass.  Measured on Table 3's
    layers (batch 32, ``covariance_narrow.md``): with 144-576 features per group the first
    takes 0.72-0.95x the time of the row-by-row buffer order (4 groups of 576 on an 11-patch grid:
    bands of 4 rows, 0.57x); with 9-36 it takes 1.2-1.35x."""
    if plan.mode == "reference" and plan.fb < _SOURCE_ORDER_MIN_FEATURES:
        return np.lexsort((plan.feat, plan.grp)), 1  # by group, then feature: the buffer's order
    return np.arange(plan.n_features, dtype=np.int64), max(1, -(-_FILL_RUN // ow))


def _fill_columns(kh: int, kw: int, base: np.ndarray, shift_col: np.ndarray, order: np.ndarray):
    """``(cols (F, 4), shift (F,))`` of :func:`_patch_rows`: im2col column ``order[e]``'s channel, tap
    row, tap column and destination ``base``, and its shift, in fill order (decoded once per call of
    a kernel, not per chunk or task)."""
    c, tap = np.divmod(order, kh * kw)
    i, j = np.divmod(tap, kw)
    return np.ascontiguousarray(np.stack([c, i, j, base[order]], axis=1), dtype=np.int64), shift_col[order]


def _gemm_moments(imgs: np.ndarray, g, plan: Plan):
    """Moments of the (grouped, stacked) patch rows, chunk by chunk through BLAS."""
    shift_col, shift_out = _patch_shift(imgs, g, plan)
    fb1 = plan.fb + 1
    stacked = plan.mode == "reference"
    lanes = plan.stack if plan.mode == "reference" else plan.groups  # group rows per patch row
    bdt = _buffer_dtype(imgs.dtype, plan.fb)
    total = g.n * g.oh * g.ow
    rows = min(_chunk_rows(lanes * fb1, bdt), total)
    flat = _scratch("rows", (rows * lanes * fb1,), bdt)
    tmp = _scratch("tmp", (plan.groups, fb1, fb1), bdt)
    acc = _scratch("acc", (plan.groups, fb1, fb1), np.float64, zero=True)
    x = np.ascontiguousarray(imgs)
    order, band = _fill_plan(plan, g.ow)
    if stacked:  # (R, G, fb1): row stride lanes*fb1
        base = plan.grp * fb1 + plan.feat
        ones = np.arange(lanes, dtype=np.int64) * fb1 + plan.fb
        cols, cshift = _fill_columns(g.kh, g.kw, base, shift_col, order)
    for p0 in range(0, total, rows):
        r = min(rows, total - p0)
        if not stacked:  # (G, R, fb1): group stride r*fb1, row stride fb1
            base = plan.grp * (r * fb1) + plan.feat
            ones = np.arange(lanes, dtype=np.int64) * (r * fb1) + plan.fb
            cols, cshift = _fill_columns(g.kh, g.kw, base, shift_col, order)
        _patch_rows(x, cols, cshift, ones, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.oh, g.ow,
                    p0, r, lanes * fb1 if stacked else fb1, band, flat)
        if stacked:
            b2 = flat[: r * lanes * fb1].reshape(r * lanes, fb1)
            np.matmul(b2.T, b2, out=tmp[0])
        else:
            buf = flat[: r * lanes * fb1].reshape(lanes, r, fb1)
            np.matmul(buf.transpose(0, 2, 1), buf, out=tmp)
        acc += tmp
    count = total * plan.stack
    fb = plan.fb
    return _finish_shifted(count, shift_out, acc[:, fb, :fb], acc[:, :fb, :fb])


class _NarrowLayout(NamedTuple):
    """The buffers of the "narrow" kernel: ``cols`` per row (whole vectors), ``rows_c`` accumulator
    rows, the row and group strides ``rs``/``gs``, patch ``rows`` per task, ``parts`` partial sums of
    ``blocks`` accumulators each, product rows per ``chain`` between float64 flushes."""

    cols: int
    rows_c: int
    rs: int
    gs: int
    rows: int
    parts: int
    blocks: int
    chain: int


def _narrow_layout(plan: Plan, total: int, bdt: np.dtype) -> _NarrowLayout:
    """The layout of :func:`_narrow_gram` for ``total`` patch rows in buffers of ``bdt``.

    Tasks fill :data:`_NARROW_TASK_BYTES`, or hold :data:`_NARROW_WIDE_K` rows of a product when the
    accumulators exceed :data:`_NARROW_L1_BYTES` (then the rows' slab of one column block of tiles
    stays in L1 instead).  Strides that are multiples of 4 KiB would put the rows a
    fill loop writes in turn into one set of the L1 cache: one more row (never written, zero) breaks
    the alignment.  Parts: up to :data:`_NARROW_PARTS`, one task at least each, a power of two
    (2, 4, 8 threads share them evenly), float64 accumulators of at most :data:`_NARROW_ACC_BYTES` in
    all (a buffer kept between calls: fresh pages are slow to fault in) unless that leaves fewer
    than :data:`_NARROW_MIN_PARTS`; fixed numbers, so that the result does not depend on the thread
    count."""
    fb = plan.fb
    stacked = plan.mode == "reference"
    lanes = plan.stack if stacked else plan.groups  # group rows per patch row
    vec = _VECTOR_BYTES // bdt.itemsize
    cols = -(-(fb + 1) // vec) * vec
    rows_c = -(-(fb + 1) // GRAM_TILE_ROWS) * GRAM_TILE_ROWS
    row_bytes = cols * bdt.itemsize
    wide = rows_c * row_bytes > _NARROW_L1_BYTES  # accumulators beyond L1: products of _NARROW_WIDE_K rows
    if stacked:
        gs = cols
        rs = (lanes + (lanes * row_bytes % 4096 == 0)) * cols
        rows = _NARROW_TASK_BYTES // (rs * bdt.itemsize) if not wide else _NARROW_WIDE_K // (rs // cols)
    else:
        rs = cols
        rows = _NARROW_TASK_BYTES // (lanes * row_bytes) if not wide else _NARROW_WIDE_K
    rows = max(1, min(total, rows))
    if not stacked:
        gs = (rows + (rows * row_bytes % 4096 == 0)) * cols
    blocks = 1 if stacked else plan.groups
    by_bytes = max(_NARROW_MIN_PARTS, _NARROW_ACC_BYTES // (8 * blocks * rows_c * cols))
    parts = max(1, min(_NARROW_PARTS, -(-total // rows), 2 ** int(math.log2(by_bytes))))
    if bdt == np.float32:  # float64 sums of float32 chains: short ones where flushing is cheap
        chain = _F32_ROWS if wide else _NARROW_F32_ROWS
    else:
        chain = total * rs  # float64: longer than all rows of a part, one sum per part
    return _NarrowLayout(cols, rows_c, rs, gs, rows, parts, blocks, chain)


def _narrow_gram(imgs: np.ndarray, g, plan: Plan):
    """Moments of the (grouped, stacked) patch rows by one fused Numba pass (:func:`_narrow_moments`):
    the rows of the "gemm" kernel (in its buffer dtype), filled in cache-sized tasks and multiplied in
    registers, in parallel, without BLAS (whose products of narrow blocks run far below its peak, and
    whose spinning threads would slow a parallel fill) or a chunk of rows in memory."""
    shift_col, shift_out = _patch_shift(imgs, g, plan)
    fb = plan.fb
    stacked = plan.mode == "reference"
    lanes = plan.stack if stacked else plan.groups
    bdt = _buffer_dtype(imgs.dtype, fb)  # float64 products below 64 features, as the "gemm" kernel
    total = g.n * g.oh * g.ow
    lay = _narrow_layout(plan, total, bdt)
    acc = _scratch("narrow_acc", (lay.parts, lay.blocks, lay.rows_c, lay.cols), np.float64, zero=True,
                   limit=_NARROW_ACC_BYTES)
    base = plan.grp * lay.gs + plan.feat
    ones = np.arange(lanes, dtype=np.int64) * lay.gs + fb
    order, band = _fill_plan(plan, g.ow)
    cols, cshift = _fill_columns(g.kh, g.kw, base, shift_col, order)
    work = _scratch("narrow", (lay.parts, lay.rows * lay.rs if stacked else lanes * lay.gs), bdt)
    tmp = _scratch("narrow_gram", acc.shape, bdt)
    _narrow_moments(np.ascontiguousarray(imgs), cols, cshift, ones, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.oh,
                    g.ow, band, lay.rows, lay.rs, lay.gs, stacked, lay.chain, work, tmp, acc)
    second = np.empty((lay.blocks, fb, fb))
    sums = np.empty((lay.blocks, fb))
    _reduce_parts(acc, fb, second, sums)
    return _finish_shifted(total * plan.stack, shift_out, sums, second)


def _dense_pairs(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """Channel pairs ``a <= b`` whose moments the plan needs (all, or within contiguous blocks)."""
    a, b = np.triu_indices(plan.c)
    if plan.mode == "contiguous":
        block = plan.c // plan.groups
        keep = a // block == b // block
        a, b = a[keep], b[keep]
    return a, b


def _dense_tasks(plan: Plan, kh: int) -> np.ndarray:
    """Tasks ``(c, c2, di)``: ``di >= 0`` for ``c == c2`` (the rest is the transpose), all ``di`` else."""
    a, b = _dense_pairs(plan)
    di = np.arange(-(kh - 1), kh)
    t = np.stack(np.broadcast_arrays(a[:, None], b[:, None], di[None, :]), axis=-1).reshape(-1, 3)
    t = t[(t[:, 0] != t[:, 1]) | (t[:, 2] >= 0)]
    return np.ascontiguousarray(t, dtype=np.int64)


def _shifted_moments_driver(imgs: np.ndarray, g, plan: Plan):
    """Moments of a dense (effective stride 1) patch grid via shifted inner products."""
    m_c = channel_means(imgs)
    kh, kw, dh, dw = g.kh, g.kw, g.dh, g.dw
    wp = g.ow + (kw - 1) * dw
    margin = (kw - 1) * dw
    halo = (kh - 1) * dh
    tasks = _dense_tasks(plan, kh)
    acc = np.zeros((len(tasks), kh, 2 * kw - 1, kw))
    tsum = np.zeros((g.c, kh, kw, kh + 1, kw + 1))
    rh, rw = _tap_ranges(g.oh, 1, g.ph, dh, kh, g.h), _tap_ranges(g.ow, 1, g.pw, dw, kw, g.w)
    c0, c1 = _window_bounds(*rw, 0, g.ow, dw)
    # a piece's float64 rows: xs and its copy xb with zero margins
    for n0, n1, a0, a1 in pieces(g, g.c * (2 * g.ow + 4 * margin) * 8, halo, _DENSE_BYTES):
        rows = a1 - a0 + halo
        xs = np.zeros((n1 - n0, g.c, rows, wp))
        # padded rows [a0, a0 + rows) hold image rows [a0 - ph, ...); columns [pw, pw + w)
        r0 = max(0, a0 - g.ph)
        r1 = min(g.h, a0 + rows - g.ph)
        if r1 > r0:
            dst = xs[:, :, r0 + g.ph - a0:r1 + g.ph - a0, g.pw:g.pw + g.w]
            np.subtract(imgs[n0:n1, :, r0:r1], m_c[None, :, None, None], out=dst)
        xb = np.zeros((n1 - n0, g.c, rows, wp + 2 * margin))
        xb[..., margin:margin + wp] = xs
        _shifted_moments(xs, xb, tasks, kh, kw, dh, dw, a1 - a0, g.ow, acc)
        sat = np.zeros((g.c, rows + 1, wp + 1))
        np.cumsum(np.cumsum(xs.sum(axis=0), axis=1), axis=2, out=sat[:, 1:, 1:])
        u0, u1 = (b[:, None, :, None] for b in _window_bounds(*rh, a0, a1, dh))
        v0, v1 = c0[None, :, None, :], c1[None, :, None, :]
        tsum += sat[:, u1, v1] - sat[:, u0, v1] - sat[:, u1, v0] + sat[:, u0, v0]
    second = np.zeros((plan.n_features, plan.n_features))
    _scatter_moments(acc, tasks, kh, kw, second)
    n, local, m2, shift = _finish_padded(g, m_c, tsum, second[None], rh, rw)
    return _regroup(n, local[0], m2[0], plan, shift[0])


def _rowshift_moments(imgs: np.ndarray, g, plan: Plan):
    r"""Moments of a patch grid with vertical step 1 from row-shifted products of 1-row patches.

    With ``Z_u`` the ``1 x kw`` im2col matrix of padded row ``u`` (columns ``(c, j)``), the moment
    of taps ``(c, i, j)`` and ``(c', i + di, j')`` is a window of a running sum over ``u``,

    .. math::  \sum_{u = i d_h}^{i d_h + oh - 1} (Z_u^T Z_{u + di\,d_h})_{(c, j), (c', j')},

    one BLAS product per row shift and segment between window boundaries (per contiguous block).
    """
    m_c = channel_means(imgs)
    kh, kw, dh = g.kh, g.kw, g.dh
    halo = (kh - 1) * dh
    cw = g.c * kw
    blocks = plan.groups if plan.mode == "contiguous" else 1
    cb = g.c // blocks  # channels per computed block
    bw = cb * kw
    zdt = _buffer_dtype(imgs.dtype, cb * g.kh * kw)
    cap = _F32_GEMM_ROWS if zdt == np.float32 else _F64_ROWS
    acc = _scratch("acc", (blocks, cb, kh, kw, cb, kh, kw), np.float64, zero=True)
    tsum = np.zeros((g.c, kh, kw, kh + 1, kw + 1))
    rh, rw = _tap_ranges(g.oh, 1, g.ph, dh, kh, g.h), _tap_ranges(g.ow, g.sw, g.pw, g.dw, kw, g.w)
    bl, bh = np.append(rw[0], 0), np.append(rw[1], g.ow)
    edges = np.unique(np.concatenate([bl, bh]))
    il, ih = np.searchsorted(edges, bl), np.searchsorted(edges, bh)
    x = np.ascontiguousarray(imgs)
    tmp = _scratch("tmp", (bw, bw), zdt)
    run = _scratch("run", (bw, bw), np.float64)
    for n0, n1, a0, a1 in pieces(g, g.ow * cw * zdt.itemsize, halo, _ROWS_BYTES):
        oh = a1 - a0
        rows = oh + halo
        Z = _scratch("rows", (rows, n1 - n0, g.ow, cw), zdt)
        rs = _scratch("rowsum", (rows, cw, len(edges)), np.float64)
        _row_patches(x, m_c, kw, g.sw, g.ph, g.pw, g.dw, g.ow, n0, a0, edges, Z, rs)
        per_row = (n1 - n0) * g.ow
        step = max(1, cap // per_row)  # rows of Z per BLAS product (bounded rounding in float32)
        Zm = Z.reshape(rows * per_row, cw)
        pre = np.zeros((rows + 1, cw, len(edges)))  # prefix sums over the rows u
        np.cumsum(rs, axis=0, out=pre[1:])
        r0, r1 = _window_bounds(*rh, a0, a1, dh)
        win = pre[r1] - pre[r0]  # (kh, kh + 1, cw, edges): window sums up to each column edge
        tsum += (win[..., ih] - win[..., il]).reshape(kh, kh + 1, g.c, kw, kw + 1).transpose(2, 0, 3, 1, 4)
        for blk in range(blocks):
            cols = slice(blk * bw, (blk + 1) * bw)
            for di in range(kh):
                starts = [i * dh for i in range(kh - di)]
                bounds = sorted(set(starts) | {u + oh for u in starts})
                run.fill(0)  # sum of Z_u^T Z_{u + di dh} over rows [bounds[0], u)
                for u0, u1 in zip(bounds[:-1], bounds[1:]):
                    for v0 in range(u0, u1, step):
                        v1 = min(u1, v0 + step)
                        A = Zm[v0 * per_row:v1 * per_row, cols]
                        if di == 0:
                            np.matmul(A.T, A, out=tmp)
                        else:
                            B = Zm[(v0 + di * dh) * per_row:(v1 + di * dh) * per_row, cols]
                            np.matmul(A.T, B, out=tmp)
                        run += tmp
                    # window i spans rows [i dh, i dh + oh): add the running sum at its end,
                    # subtract it at its start (the first start has run == 0); blocks i <= i + di only
                    win = run.reshape(cb, kw, cb, kw)
                    for i, u in enumerate(starts):
                        if u + oh == u1:
                            np.add(acc[blk, :, i, :, :, i + di, :], win, out=acc[blk, :, i, :, :, i + di, :])
                        if u == u1:
                            np.subtract(acc[blk, :, i, :, :, i + di, :], win, out=acc[blk, :, i, :, :, i + di, :])
    for di in range(1, kh):  # the lower block triangle, mirrored once: the same floats as the upper one
        for i in range(kh - di):
            acc[:, :, i + di, :, :, i, :] = acc[:, :, i, :, :, i + di, :].transpose(0, 3, 4, 1, 2)
    fb = cb * kh * kw
    n, local, m2, shift = _finish_padded(g, m_c, tsum, acc.reshape(blocks, fb, fb), rh, rw)
    if plan.mode == "contiguous":
        return n, shift + local, m2
    return _regroup(n, local[0], m2[0], plan, shift[0])


def _regroup(n, local, m2, plan: Plan, shift):
    """Full-matrix statistics (``mean = shift + local`` (F,), ``M2 (F, F)``) arranged as the plan's blocks.

    The stacked groups of the reference grouping merge about the shift of group 0, so that the mean
    differences of equally shifted taps are free of the shift's rounding (``u |shift|``)."""
    if plan.mode == "full":
        return n, (shift + local)[None], m2[None]
    if plan.mode == "contiguous":
        fb = plan.fb
        idx = np.arange(plan.groups)[:, None] * fb + np.arange(fb)[None, :]
        return n, (shift + local)[idx], m2[idx[:, :, None], idx[:, None, :]]
    idx = [np.arange(plan.fb) * plan.stack + grp for grp in range(plan.stack)]
    base = shift[idx[0]]
    n_all, mu, M = functools.reduce(merge_moments, [(n, (shift[i] - base) + local[i], m2[np.ix_(i, i)]) for i in idx])
    return n_all, (base + mu)[None], M[None]


def _gemm_seconds(macs: float, width: int, dtype) -> float:
    """BLAS time of ``macs`` multiply-adds producing ``width``-wide outputs (narrow ones are memory-bound)."""
    eff = min(1.0, (width / 64.0) ** 0.5)
    return macs / (_RATE_MAC[np.dtype(dtype)] * eff * numba.get_num_threads())


def _narrow_seconds(rows: int, f: int, plan: Plan, lanes: int, bdt: np.dtype) -> float:
    """Time of the "narrow" kernel on ``rows`` patch rows: the parallel fill, the register-tiled Gram
    products (whole rows up to two vectors, else the upper triangle's tiles) and the accumulator
    flushes (every float32 chunk of rows, and once per part)."""
    lay = _narrow_layout(plan, rows, bdt)
    per_block = lay.rows_c * lay.cols
    gram = rows * lanes * per_block * (1.0 if lay.cols * bdt.itemsize <= 2 * _VECTOR_BYTES else 0.5)
    flushes = lay.parts + (rows * lanes / lay.chain if bdt == np.float32 else 0)
    threads = min(numba.get_num_threads(), lay.parts)
    return ((rows * f / _tuning.COV_RATE_FILL + gram / _tuning.COV_RATE_GRAM[bdt.name]) / threads
            + flushes * lay.blocks * per_block / _tuning.COV_RATE_FLUSH)


def _cost(g, plan: Plan, dtype) -> dict:
    """Estimated seconds of each kernel for this geometry (a coarse model; only the ranking matters).

    Per-thread rates of :mod:`nsiter._tuning`: BLAS multiply-adds (:func:`_gemm_seconds`), the
    serial patch fill and the parallel shifted-product kernel.
    """
    rows = g.n * g.oh * g.ow
    fb1 = plan.fb + 1
    f = plan.n_features
    lanes = plan.stack if plan.mode == "reference" else plan.groups  # group rows per patch row
    bdt = _buffer_dtype(np.dtype(dtype), plan.fb)
    chunks = -(-rows // _chunk_rows(lanes * fb1, bdt))
    macs = rows * lanes * fb1 * (fb1 + 1) / 2  # syrk: upper triangles
    cost = dict.fromkeys(KERNELS, math.inf)
    cost["gemm"] = (rows * f / _tuning.COV_RATE_FILL + _gemm_seconds(macs, fb1, bdt)
                    + chunks * plan.groups * _tuning.COV_CALL_OVERHEAD)
    cost["narrow"] = _narrow_seconds(rows, f, plan, lanes, bdt)
    if g.sh != 1:
        return cost
    kh, kw, dh, dw = g.kh, g.kw, g.dh, g.dw
    hp = g.oh + (kh - 1) * dh
    blocks = plan.groups if plan.mode == "contiguous" else 1
    bw = g.c // blocks * kw
    zdt = _buffer_dtype(np.dtype(dtype), g.c // blocks * kh * kw)
    per_row = g.n * g.ow
    macs = 0.0
    for di in range(kh):
        macs += ((kh - 1 - di) * dh + g.oh) * per_row * bw * bw * (0.5 if di == 0 else 1.0)
    calls = blocks * kh * 2 * kh * max(1, -(-hp * per_row // (_F32_GEMM_ROWS if zdt == np.float32 else _F64_ROWS)))
    cost["rowshift"] = (g.n * hp * g.ow * g.c * kw / _tuning.COV_RATE_FILL + _gemm_seconds(blocks * macs, bw, zdt)
                        + calls * _tuning.COV_CALL_OVERHEAD)
    if g.sw != 1:
        return cost
    wp = g.ow + (kw - 1) * dw
    cols = (2 * kw - 1) * wp
    a, b = _dense_pairs(plan)
    n_same = int(np.count_nonzero(a == b))
    n_diff = len(a) - n_same
    rows_pos = sum(hp - di * dh for di in range(kh))  # di >= 0
    rows_all = 2 * rows_pos - hp
    events = 2 * kh * (2 * kw - 1) * wp
    work = n_same * (rows_pos * cols + kh * events) + n_diff * (rows_all * cols + (2 * kh - 1) * events)
    cost["shifted"] = (g.n * work / (_tuning.COV_RATE_SHIFTED * numba.get_num_threads())
                       + 3 * g.n * g.c * hp * wp / _tuning.COV_RATE_FILL)
    return cost


def choose_kernel(g, plan: Plan, dtype) -> str:
    """The kernel of least estimated cost (:func:`_cost`)."""
    cost = _cost(g, plan, dtype)
    return min(cost, key=cost.get)


def patch_moments(imgs: np.ndarray, g, plan: Plan, kernel: str | None = None):
    """``(count, mean (G, fb), M2 (G, fb, fb))`` in float64 of the planned patch rows, by one kernel."""
    kernel = kernel or choose_kernel(g, plan, imgs.dtype)
    if kernel == "shifted":
        if g.sh != 1 or g.sw != 1:
            raise ValueError("the 'shifted' kernel needs an effective stride (stride * sampling_stride) of 1")
        return _shifted_moments_driver(imgs, g, plan)
    if kernel == "rowshift":
        if g.sh != 1:
            raise ValueError("the 'rowshift' kernel needs a vertical effective stride of 1")
        return _rowshift_moments(imgs, g, plan)
    if kernel == "narrow":
        return _narrow_gram(imgs, g, plan)
    return _gemm_moments(imgs, g, plan)


