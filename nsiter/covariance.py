r"""Covariances of data matrices and of convolution patches (Ye et al. 2020, Algorithm 1).

``covariance(X)`` is the paper's ``Cov = (X - mu)^T (X - mu) / N`` of a samples x features
matrix.  ``patch_covariance(x, k, ...)`` is the same statistic for the im2col matrix of an
image batch, per channel block and on a subsampled patch grid (§4.5.2, Algorithm 1),
computed without materialising the im2col matrix.  ``PatchStatistics`` accumulates it
batch by batch and merges shards exactly.

Numerics (every kernel): second moments are accumulated in float64 about a *shift* close to
the feature means (the channel mean times the fraction of the grid where a tap sees the
image, so padding is accounted for) and corrected exactly at the end,
``M2 = S_2 - s s^T / N`` with ``s`` the shifted column sums.  Data with a large mean
therefore does not cancel the way the reference code's ``E[x x^T] - mu mu^T`` in float32
does.  Three kernels compute the moments (:data:`KERNELS`):

* ``"gemm"`` (any geometry): chunks of shifted patch rows (at most 8 MB), each augmented by a
  column of ones, and one BLAS product ``B^T B`` per chunk (moments and column sums at once);
  chunk results are summed in float64.  For float32 input with blocks of at least 64
  features one chunk's product (at most 2048 rows) runs in float32 BLAS, otherwise in
  float64.
* ``"rowshift"`` (vertical step 1): BLAS products of 1-row patch matrices ``Z_u^T Z_{u+di}``,
  one per row shift ``di`` and window segment, instead of one per tap-row pair; ``kh`` times
  less fill and about ``kh/2`` times fewer multiply-adds than ``"gemm"``.
* ``"shifted"`` (step 1 both ways): the moment of two taps is a window sum of the product of
  the image with a shifted copy of itself, ``O(C^2 k^2 H W)`` work instead of
  ``O(C^2 k^4 H W)``, in float64 (:func:`nsiter._numba._covariance._shifted_moments`).

A cost model (:func:`_cost`, rates measured on this project's 2-core machine) picks the
cheapest; all three agree to rounding (the tests compare each with the loop reference).
Work buffers of at most 8 MB are kept per thread and reused between calls (:func:`_scratch`).
"""
from __future__ import annotations

import math
import threading
from typing import NamedTuple

import numba
import numpy as np

from ._conventions import as_images, geometry
from ._dispatch import is_tensor, torch_backend
from ._numba._covariance import (
    _patch_rows,
    _subtract_outer,
    _row_patches,
    _scatter_moments,
    _shifted_moments,
)
from ._validation import (
    as_float_array,
    as_pair,
    check_finite,
    check_ndim,
    check_nonempty,
    check_nonnegative_float,
    check_option,
    check_positive_int,
)

__all__ = ["GROUPINGS", "covariance", "patch_covariance", "PatchStatistics"]

#: Channel groupings of ``patch_covariance`` / ``PatchStatistics`` (``block_size`` given).
GROUPINGS = ("contiguous", "reference")

#: Kernels behind ``patch_covariance`` (chosen automatically; the private ``_kernel``
#: argument of :func:`_patch_moments` forces one, for tests and benchmarks).
KERNELS = ("gemm", "rowshift", "shifted")

_BUFFER_BYTES = 8 * 2**20  # one chunk of shifted patch rows
_F32_ROWS = 2048  # rows per float32 chunk of patch rows (its rounding grows like sqrt(rows))
_F32_GEMM_ROWS = 8192  # rows per float32 product of 1-row patch matrices (fewer, larger BLAS calls)
_F64_ROWS = 65536
_F32_MIN_FEATURES = 64  # narrower blocks are fill-bound: their products run in float64
_DENSE_BYTES = 32 * 2**20  # one piece of padded, shifted float64 images ("shifted" kernel)
_ROWS_BYTES = 32 * 2**20  # one piece of 1-row patch matrices ("rowshift" kernel)
_SCRATCH_MAX = 8 * 2**20  # work buffers up to this size are kept per thread and reused

# cost model (seconds = work / rate), per thread, measured on a 2-core AVX2 machine
_RATE_MAC = {np.dtype(np.float32): 27e9, np.dtype(np.float64): 14e9}  # BLAS multiply-adds / s
_RATE_FILL = 0.5e9  # patch entries written / s (serial fills)
_RATE_SHIFTED = 2.0e9  # multiply-adds / s, shifted-product kernel
_CALL_OVERHEAD = 10e-6  # per BLAS call


# --------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------

def _check_finite_fast(arr: np.ndarray, name: str) -> None:
    """``check_finite`` in one pass without a boolean temporary.

    The sum of the array is finite unless it holds NaN/inf or overflows; only then is the
    exact (element-wise) check run, so huge but finite data is still accepted.
    """
    if arr.size and not np.isfinite(arr.sum()):
        check_finite(arr, name)


def _check_block(block_size, c: int):
    if block_size is None:
        return None
    block_size = check_positive_int(block_size, "block_size")
    if c % block_size:
        fix = math.gcd(block_size, c)
        raise ValueError(
            f"block_size {block_size} does not divide the {c} channels of x; "
            f"use block_size={fix} (gcd({block_size}, {c})) or another divisor of {c}"
        )
    return block_size


def _ridge(cov: np.ndarray, eps: float) -> np.ndarray:
    if eps:
        n = cov.shape[-1]
        idx = np.arange(n)
        cov[..., idx, idx] += eps
    return cov


_LOCAL = threading.local()


def _scratch(name: str, shape, dtype, *, zero: bool = False) -> np.ndarray:
    """A work buffer kept per thread and reused between calls (fresh pages are slow to fault in).

    Buffers above ``_SCRATCH_MAX`` bytes are allocated per call.  Results handed to the
    caller are never scratch: they are copied or computed into fresh arrays.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes > _SCRATCH_MAX:
        return np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
    store = getattr(_LOCAL, "buffers", None)
    if store is None:
        store = _LOCAL.buffers = {}
    raw = store.get(name)
    if raw is None or raw.nbytes < nbytes:
        raw = store[name] = np.empty(max(nbytes, 64), dtype=np.uint8)
    arr = raw[:nbytes].view(dtype).reshape(shape)
    if zero:
        arr.fill(0)
    return arr


# --------------------------------------------------------------------------------------
# layout of groups
# --------------------------------------------------------------------------------------

class _Plan(NamedTuple):
    """How im2col columns map to covariance blocks.

    ``mode`` is ``"full"`` (one ``F x F`` matrix), ``"contiguous"`` (``groups`` matrices of
    ``fb x fb``) or ``"reference"`` (``stack`` column groups stacked as rows, one matrix).
    Column ``j`` goes to block ``grp[j]`` at feature ``feat[j]``.
    """

    mode: str
    c: int
    taps: int
    groups: int  # matrices returned
    stack: int  # column groups stacked as rows (reference grouping), else 1
    fb: int
    grp: np.ndarray
    feat: np.ndarray

    @property
    def n_features(self) -> int:
        return self.c * self.taps


def _plan(c: int, taps: int, block_size, grouping: str) -> _Plan:
    f = c * taps
    j = np.arange(f, dtype=np.int64)
    if block_size is None:
        return _Plan("full", c, taps, 1, 1, f, np.zeros(f, np.int64), j)
    g = c // block_size
    fb = block_size * taps
    if grouping == "contiguous":
        return _Plan("contiguous", c, taps, g, 1, fb, j // fb, j % fb)
    return _Plan("reference", c, taps, 1, g, fb, j % g, j // g)


# --------------------------------------------------------------------------------------
# moments: (count, mean (G, fb), M2 (G, fb, fb)), float64, M2 = sum of centred outer products
# --------------------------------------------------------------------------------------

def _finish_shifted(count, shift, sums, second):
    """Centred statistics from moments about ``shift``: ``M2 = S_2 - s s^T / N`` (in place on ``second``).

    ``z = s / sqrt(N)`` makes the correction ``z z^T`` exactly symmetric, so an exactly
    symmetric ``second`` gives an exactly symmetric ``M2``.
    """
    z = sums / math.sqrt(count)
    _subtract_outer(second.reshape((-1,) + second.shape[-2:]), z.reshape(-1, z.shape[-1]))
    return count, shift + sums / count, second


def _merge_moments(a, b):
    """Chan–Golub–LeVeque: statistics of the union of two sample sets (exact in exact arithmetic)."""
    na, ma, Ma = a
    nb, mb, Mb = b
    n = na + nb
    d = mb - ma
    mean = ma + d * (nb / n)
    m2 = Ma + Mb + (na * nb / n) * (d[..., :, None] * d[..., None, :])
    return n, mean, m2


def _chunk_rows(width: int, dtype: np.dtype) -> int:
    rows = max(1, _BUFFER_BYTES // (width * dtype.itemsize))
    return int(min(rows, _F32_ROWS if dtype == np.float32 else _F64_ROWS))


def _buffer_dtype(arr_dtype: np.dtype, fb: int) -> np.dtype:
    if arr_dtype == np.float32 and fb >= _F32_MIN_FEATURES:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def _matrix_moments(arr: np.ndarray):
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


def _channel_means(imgs: np.ndarray) -> np.ndarray:
    """Per-channel means of a strided sample (<= 64 images x ~16 x 16 pixels): only a shift.

    The statistics are exact for any shift; a shift near the mean only keeps the float64
    moments free of cancellation, and a sample keeps its cost negligible next to the fill.
    """
    n, _, h, w = imgs.shape
    sub = imgs[:: max(1, n // 64), :, :: max(1, h // 16), :: max(1, w // 16)]
    return sub.mean(axis=(0, 2, 3), dtype=np.float64)


def _valid_fraction(out: int, step: int, pad: int, dil: int, k: int, size: int) -> np.ndarray:
    pos = np.arange(out)[:, None] * step - pad + np.arange(k)[None, :] * dil
    return ((pos >= 0) & (pos < size)).mean(axis=0)


def _patch_shift(imgs: np.ndarray, g, plan: _Plan):
    """Per-column shift ``m_c * (fraction of the grid where tap (i, j) is inside the image)``.

    This is the column mean of a stationary image, padding included.  For the reference
    grouping the shift is averaged over the stacked groups (one shift per shared feature).
    Returns ``(shift per im2col column (F,), shift per output feature (G, fb))``.
    """
    m_c = _channel_means(imgs)
    fh = _valid_fraction(g.oh, g.sh, g.ph, g.dh, g.kh, g.h)
    fw = _valid_fraction(g.ow, g.sw, g.pw, g.dw, g.kw, g.w)
    shift_col = (m_c[:, None, None] * fh[None, :, None] * fw[None, None, :]).reshape(-1)
    if plan.mode == "reference":
        shift_out = shift_col.reshape(plan.fb, plan.stack).mean(axis=1)
        return np.ascontiguousarray(shift_out[plan.feat]), shift_out[None]
    return shift_col, shift_col.reshape(plan.groups, plan.fb)


def _lanes(plan: _Plan) -> int:
    """Group rows per patch row: the stacked groups (reference) or the blocks."""
    return plan.stack if plan.mode == "reference" else plan.groups


def _gemm_moments(imgs: np.ndarray, g, plan: _Plan):
    """Moments of the (grouped, stacked) patch rows, chunk by chunk through BLAS."""
    shift_col, shift_out = _patch_shift(imgs, g, plan)
    fb1 = plan.fb + 1
    stacked = plan.mode == "reference"
    lanes = _lanes(plan)
    bdt = _buffer_dtype(imgs.dtype, plan.fb)
    total = g.n * g.oh * g.ow
    rows = min(_chunk_rows(lanes * fb1, bdt), total)
    flat = _scratch("rows", (rows * lanes * fb1,), bdt)
    tmp = _scratch("tmp", (plan.groups, fb1, fb1), bdt)
    acc = _scratch("acc", (plan.groups, fb1, fb1), np.float64, zero=True)
    x = np.ascontiguousarray(imgs)
    if stacked:  # (R, G, fb1): row stride lanes*fb1
        base = plan.grp * fb1 + plan.feat
        ones = np.arange(lanes, dtype=np.int64) * fb1 + plan.fb
    for p0 in range(0, total, rows):
        r = min(rows, total - p0)
        if stacked:
            _patch_rows(x, shift_col, base, ones, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.oh, g.ow,
                        p0, r, lanes * fb1, flat)
            b2 = flat[: r * lanes * fb1].reshape(r * lanes, fb1)
            np.matmul(b2.T, b2, out=tmp[0])
        else:  # (G, R, fb1): group stride r*fb1, row stride fb1
            base = plan.grp * (r * fb1) + plan.feat
            ones = np.arange(lanes, dtype=np.int64) * (r * fb1) + plan.fb
            _patch_rows(x, shift_col, base, ones, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.oh, g.ow,
                        p0, r, fb1, flat)
            buf = flat[: r * lanes * fb1].reshape(lanes, r, fb1)
            np.matmul(buf.transpose(0, 2, 1), buf, out=tmp)
        acc += tmp
    count = total * plan.stack
    fb = plan.fb
    return _finish_shifted(count, shift_out, acc[:, fb, :fb], acc[:, :fb, :fb])


def _dense_pairs(plan: _Plan) -> tuple[np.ndarray, np.ndarray]:
    """Channel pairs ``a <= b`` whose moments the plan needs (all, or within contiguous blocks)."""
    a, b = np.triu_indices(plan.c)
    if plan.mode == "contiguous":
        block = plan.c // plan.groups
        keep = a // block == b // block
        a, b = a[keep], b[keep]
    return a, b


def _dense_tasks(plan: _Plan, kh: int) -> np.ndarray:
    """Tasks ``(c, c2, di)``: ``di >= 0`` for ``c == c2`` (the rest is the transpose), all ``di`` else."""
    a, b = _dense_pairs(plan)
    di = np.arange(-(kh - 1), kh)
    t = np.stack(np.broadcast_arrays(a[:, None], b[:, None], di[None, :]), axis=-1).reshape(-1, 3)
    t = t[(t[:, 0] != t[:, 1]) | (t[:, 2] >= 0)]
    return np.ascontiguousarray(t, dtype=np.int64)


def _dense_pieces(g):
    """``(n0, n1, a0, a1)``: image ranges and output-row bands whose padded rows fit the budget."""
    wp = 2 * g.ow + 4 * (g.kw - 1) * g.dw  # two copies, one with zero margins
    hp = g.oh + (g.kh - 1) * g.dh
    per_image = g.c * hp * wp * 8
    if per_image <= _DENSE_BYTES:
        step = max(1, _DENSE_BYTES // per_image)
        return [(n0, min(g.n, n0 + step), 0, g.oh) for n0 in range(0, g.n, step)]
    halo = (g.kh - 1) * g.dh
    band = max(1, _DENSE_BYTES // (g.c * wp * 8) - halo)
    return [(n, n + 1, a0, min(g.oh, a0 + band)) for n in range(g.n) for a0 in range(0, g.oh, band)]


def _shifted_moments_driver(imgs: np.ndarray, g, plan: _Plan):
    """Moments of a dense (effective stride 1) patch grid via shifted inner products."""
    m_c = _channel_means(imgs)
    kh, kw, dh, dw = g.kh, g.kw, g.dh, g.dw
    wp = g.ow + (kw - 1) * dw
    margin = (kw - 1) * dw
    halo = (kh - 1) * dh
    tasks = _dense_tasks(plan, kh)
    acc = np.zeros((len(tasks), kh, 2 * kw - 1, kw))
    colsum = np.zeros((g.c, kh, kw))
    ii = np.arange(kh) * dh
    jj = np.arange(kw) * dw
    for n0, n1, a0, a1 in _dense_pieces(g):
        rows = a1 - a0 + halo
        xs = np.empty((n1 - n0, g.c, rows, wp))
        xs[...] = -m_c[None, :, None, None]
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
        oh = a1 - a0
        colsum += (sat[:, ii[:, None] + oh, jj[None, :] + g.ow] - sat[:, ii[:, None], jj[None, :] + g.ow]
                   - sat[:, ii[:, None] + oh, jj[None, :]] + sat[:, ii[:, None], jj[None, :]])
    f = plan.n_features
    second = np.zeros((f, f))
    _scatter_moments(acc, tasks, kh, kw, second)
    count = g.n * g.oh * g.ow
    shift = np.repeat(m_c, kh * kw)
    n, mean, m2 = _finish_shifted(count, shift, colsum.reshape(-1), second)
    return _regroup(n, mean, m2, plan)


def _row_pieces(g, width: int, itemsize: int):
    """Like :func:`_dense_pieces` for 1-row patch matrices of ``width`` columns."""
    halo = (g.kh - 1) * g.dh
    per_row = g.ow * width * itemsize
    per_image = (g.oh + halo) * per_row
    if per_image <= _ROWS_BYTES:
        step = max(1, _ROWS_BYTES // per_image)
        return [(n0, min(g.n, n0 + step), 0, g.oh) for n0 in range(0, g.n, step)]
    band = max(1, _ROWS_BYTES // per_row - halo)
    return [(n, n + 1, a0, min(g.oh, a0 + band)) for n in range(g.n) for a0 in range(0, g.oh, band)]


def _rowshift_moments(imgs: np.ndarray, g, plan: _Plan):
    r"""Moments of a patch grid with vertical step 1 from row-shifted products of 1-row patches.

    With ``Z_u`` the im2col matrix of padded row ``u`` for a ``1 x kw`` kernel (rows over
    images and horizontal positions, columns ``(c, j)``), the im2col moment of taps
    ``(c, i, j)`` and ``(c', i + di, j')`` is

    .. math::  \sum_{u = i d_h}^{i d_h + oh - 1} (Z_u^T Z_{u + di\,d_h})_{(c, j), (c', j')},

    i.e. a window of the running sum over ``u`` of one product per row shift ``di``: the
    rows between consecutive window boundaries are multiplied once (one BLAS product per
    segment), for ``kh`` shifts instead of ``kh^2`` tap-row pairs, and the im2col fill shrinks
    by ``kh``.  Contiguous blocks are computed block by block; the reference grouping and
    ``block_size=None`` from the full matrix.
    """
    m_c = _channel_means(imgs)
    kh, kw, dh = g.kh, g.kw, g.dh
    halo = (kh - 1) * dh
    cw = g.c * kw
    blocks = plan.groups if plan.mode == "contiguous" else 1
    cb = g.c // blocks  # channels per computed block
    bw = cb * kw
    zdt = _buffer_dtype(imgs.dtype, cb * g.kh * kw)
    cap = _F32_GEMM_ROWS if zdt == np.float32 else _F64_ROWS
    acc = _scratch("acc", (blocks, cb, kh, kw, cb, kh, kw), np.float64, zero=True)
    colsum = np.zeros((g.c, kh, kw))
    x = np.ascontiguousarray(imgs)
    tmp = _scratch("tmp", (bw, bw), zdt)
    run = _scratch("run", (bw, bw), np.float64)
    for n0, n1, a0, a1 in _row_pieces(g, cw, zdt.itemsize):
        oh = a1 - a0
        rows = oh + halo
        Z = _scratch("rows", (rows, n1 - n0, g.ow, cw), zdt)
        rs = _scratch("rowsum", (rows, cw), np.float64)
        _row_patches(x, m_c, kw, g.sw, g.ph, g.pw, g.dw, g.ow, n0, a0, Z, rs)
        per_row = (n1 - n0) * g.ow
        step = max(1, cap // per_row)  # rows of Z per BLAS product (bounded rounding in float32)
        Zm = Z.reshape(rows * per_row, cw)
        pre = np.zeros((rows + 1, cw))
        np.cumsum(rs, axis=0, out=pre[1:])
        ii = np.arange(kh) * dh
        colsum += (pre[ii + oh] - pre[ii]).reshape(kh, g.c, kw).transpose(1, 0, 2)
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
                    # subtract it at its start (the first start has run == 0)
                    for i, u in enumerate(starts):
                        sign = (u + oh == u1) - (u == u1)
                        if sign:
                            win = run.reshape(cb, kw, cb, kw)
                            acc[blk, :, i, :, :, i + di, :] += sign * win
                            if di:
                                acc[blk, :, i + di, :, :, i, :] += sign * win.transpose(2, 3, 0, 1)
    count = g.n * g.oh * g.ow
    fb = cb * kh * kw
    second = acc.reshape(blocks, fb, fb)
    shift = np.repeat(m_c, kh * kw).reshape(blocks, fb)
    n, mean, m2 = _finish_shifted(count, shift, colsum.reshape(blocks, fb), second)
    if plan.mode == "contiguous":
        return n, mean, m2
    return _regroup(n, mean[0], m2[0], plan)


def _regroup(n, mean, m2, plan: _Plan):
    """Full-matrix statistics ``(F,), (F, F)`` arranged as the plan's blocks."""
    if plan.mode == "full":
        return n, mean[None], m2[None]
    if plan.mode == "contiguous":
        fb = plan.fb
        idx = np.arange(plan.groups)[:, None] * fb + np.arange(fb)[None, :]
        return n, mean[idx], m2[idx[:, :, None], idx[:, None, :]]
    stats = None
    for grp in range(plan.stack):
        idx = np.arange(plan.fb) * plan.stack + grp
        s = (n, mean[idx], m2[np.ix_(idx, idx)])
        stats = s if stats is None else _merge_moments(stats, s)
    n_all, mu, M = stats
    return n_all, mu[None], M[None]


def _gemm_seconds(macs: float, width: int, dtype) -> float:
    """BLAS time of ``macs`` multiply-adds producing ``width``-wide outputs (narrow ones are memory-bound)."""
    eff = min(1.0, (width / 64.0) ** 0.5)
    return macs / (_RATE_MAC[np.dtype(dtype)] * eff * numba.get_num_threads())


def _cost(g, plan: _Plan, dtype) -> dict:
    """Estimated seconds of each kernel for this geometry (a coarse model; only the ranking matters).

    Rates are per thread, measured on a 2-core AVX2 machine: BLAS multiply-adds (scaled by
    the thread count and by a width efficiency for narrow outputs), the serial patch fill,
    and the shifted-product kernel (parallel).
    """
    threads = numba.get_num_threads()
    rows = g.n * g.oh * g.ow
    fb1 = plan.fb + 1
    f = plan.n_features
    lanes = _lanes(plan)
    bdt = _buffer_dtype(np.dtype(dtype), plan.fb)
    chunks = -(-rows // _chunk_rows(lanes * fb1, bdt))
    macs = rows * lanes * fb1 * (fb1 + 1) / 2  # syrk: upper triangles
    cost = {
        "gemm": rows * f / _RATE_FILL + _gemm_seconds(macs, fb1, bdt) + chunks * plan.groups * _CALL_OVERHEAD,
        "rowshift": math.inf,
        "shifted": math.inf,
    }
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
    cost["rowshift"] = (g.n * hp * g.ow * g.c * kw / _RATE_FILL + _gemm_seconds(blocks * macs, bw, zdt)
                        + calls * _CALL_OVERHEAD)
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
    cost["shifted"] = g.n * work / (_RATE_SHIFTED * threads) + 3 * g.n * g.c * hp * wp / _RATE_FILL
    return cost


def _choose_kernel(g, plan: _Plan, dtype) -> str:
    cost = _cost(g, plan, dtype)
    return min(cost, key=cost.get)


def _patch_moments(imgs: np.ndarray, g, plan: _Plan, _kernel: str | None = None):
    """Dispatch to one kernel: ``(count, mean (G, fb), M2 (G, fb, fb))`` in float64."""
    kernel = _kernel or _choose_kernel(g, plan, imgs.dtype)
    if kernel == "shifted":
        if g.sh != 1 or g.sw != 1:
            raise ValueError("the 'shifted' kernel needs an effective stride (stride * sampling_stride) of 1")
        return _shifted_moments_driver(imgs, g, plan)
    if kernel == "rowshift":
        if g.sh != 1:
            raise ValueError("the 'rowshift' kernel needs a vertical effective stride of 1")
        return _rowshift_moments(imgs, g, plan)
    return _gemm_moments(imgs, g, plan)


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------

def covariance(X, *, eps=0.0):
    r"""Covariance and mean of a samples x features matrix, with the paper's 1/N normalisation.

    .. math::

        \mu = \frac{1}{N} \sum_r X_{r,:}, \qquad
        \mathrm{Cov} = \frac{1}{N} (X - \mu)^T (X - \mu) + \varepsilon I

    (Ye et al. 2020, §4.2; ``eps`` is the ridge of Algorithm 1, line 8).

    Parameters
    ----------
    X : array_like, shape (N, F)
        Rows are samples, columns features.  Never modified.
    eps : float, optional
        Ridge added to the diagonal (``>= 0``).

    Returns
    -------
    cov : ndarray, shape (F, F)
        Symmetric.  float32 for float32/float16 input, float64 otherwise.
    mean : ndarray, shape (F,)
        Same dtype as ``cov``.

    Raises
    ------
    ValueError
        ``X`` not 2-D, empty, holding NaN/inf, or a negative ``eps``.
    TypeError
        Complex or non-numeric ``X``.

    Notes
    -----
    Chunks of rows shifted by the mean of a row sample (each chunk augmented by a column of
    ones) are multiplied by BLAS and summed in float64, then corrected exactly for the shift
    (``M2 = S_2 - s s^T / N``): the extra memory is a few MB whatever ``N``, and there is no
    ``E[x x^T] - mu mu^T`` cancellation.  For float32 input with ``F >= 64`` the product of one chunk (at most 2048
    rows) runs in float32 BLAS, which keeps float32 speed at about 1e-6 relative accuracy;
    float64 input is float64 throughout.

    Examples
    --------
    >>> import numpy as np, nsiter
    >>> X = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> cov, mean = nsiter.covariance(X)
    >>> cov
    array([[1., 2.],
           [2., 4.]])
    >>> mean
    array([2., 4.])
    """
    if is_tensor(X):
        return torch_backend().covariance(X, eps=eps)
    arr = as_float_array(X, "X")
    check_ndim(arr, "X", (2,), "(n_samples, n_features); for one feature use X[:, None]")
    check_nonempty(arr, "X")
    eps = check_nonnegative_float(eps, "eps")
    _check_finite_fast(arr, "X")
    n, mean, m2 = _matrix_moments(arr)
    return _scaled(m2, n, eps, arr.dtype), mean.astype(arr.dtype, copy=False)


def _sampled_geometry(shape4, kernel_size, stride, padding, dilation, sampling_stride):
    s = check_positive_int(sampling_stride, "sampling_stride")
    sh, sw = as_pair(stride, "stride", minimum=1)
    return geometry(shape4, kernel_size, (sh * s, sw * s), padding, dilation)


def _scaled(m2: np.ndarray, n, eps: float, dtype) -> np.ndarray:
    """``M2 / n + eps I`` written straight into the output dtype (one rounding, no float64 copy)."""
    cov = np.divide(m2, n, out=np.empty(m2.shape, dtype=dtype), casting="same_kind")
    return _ridge(cov, eps)


def _finish(stats, plan: _Plan, eps: float, dtype):
    n, mean, m2 = stats
    cov = _scaled(m2, n, eps, dtype)
    mean = mean.astype(dtype, copy=False)
    if plan.mode == "contiguous":
        return cov, mean
    return cov[0], mean[0]


def patch_covariance(x, kernel_size, *, stride=1, padding=0, dilation=1, sampling_stride=1,
                     block_size=None, grouping="contiguous", eps=0.0):
    r"""Covariance of the im2col matrix of an image batch (Ye et al. 2020, Algorithm 1).

    With ``X = im2col(x, kernel_size, stride=stride*sampling_stride, padding=padding,
    dilation=dilation)`` (one row per patch, ``F = C*kh*kw`` columns) this returns

    .. math::

        \mathrm{Cov} = \frac{1}{N} (X - \mu)^T (X - \mu) + \varepsilon I, \qquad
        \mu = \frac{1}{N} \sum_r X_{r,:}

    per channel block, without materialising ``X``.  ``sampling_stride = S`` is the
    subsampling of §4.5.2: patches on a grid of step ``S*stride`` from offset 0, as in the
    reference implementation (``S^2`` times fewer rows).

    Parameters
    ----------
    x : array_like, shape (N, C, H, W), (C, H, W) or (H, W)
        Channels-first images (never modified).
    kernel_size, stride, padding, dilation : int or (int, int)
        As in :func:`nsiter.im2col` (zero padding).
    sampling_stride : int, optional
        Subsampling factor ``S >= 1`` of the patch grid.
    block_size : int, optional
        Channels per block ``B`` (must divide ``C``).  ``None``: one ``F x F`` covariance.
    grouping : {"contiguous", "reference"}, optional
        How channels form blocks when ``block_size`` is given (see Notes).  Ignored for
        ``block_size=None`` (but still validated).
    eps : float, optional
        Ridge ``eps * I`` added to each returned covariance.

    Returns
    -------
    cov : ndarray
        ``(F, F)`` for ``block_size=None``; ``(G, Fb, Fb)`` for ``"contiguous"`` with
        ``G = C/B`` and ``Fb = B*kh*kw``; ``(Fb, Fb)`` for ``"reference"``.
    mean : ndarray
        ``(F,)``, ``(G, Fb)`` or ``(Fb,)`` accordingly.  float32 for float32/float16 input,
        float64 otherwise.

    Raises
    ------
    ValueError
        Wrong ndim or empty ``x``, NaN/inf in ``x``, kernel larger than the padded image,
        non-positive stride/dilation/sampling_stride, negative padding or ``eps``,
        ``block_size`` not dividing ``C`` (the message names ``gcd(B, C)``), unknown
        ``grouping`` (the message lists :data:`GROUPINGS`).
    TypeError
        Complex input, non-integer sizes.

    Notes
    -----
    **Groupings.**  ``"contiguous"``: channels ``[gB, (g+1)B)`` form block ``g``, whose
    covariance is that of ``im2col(x[:, gB:(g+1)B])`` (columns ``c*kh*kw + i*kw + j`` within
    the block); this is also the statistic of a grouped convolution with ``groups = G``.
    ``"reference"``: the grouping of the paper's reference code (FastDeconv, groups=1):
    im2col column ``j`` goes to group ``j mod G`` at feature ``j div G``, and the ``G`` groups
    are stacked as extra rows, so ONE covariance of ``Fb x Fb`` is shared by all groups and
    ``N = G * patches``.  Its blocks interleave channels and taps (group ``g`` holds columns
    ``g, g + G, g + 2G, ...``), and the shared matrix averages the groups' second moments
    about the common mean; ``"contiguous"`` keeps one exact covariance per channel block.
    With ``B = C`` both equal the full covariance (``"contiguous"`` keeps a leading axis of 1).

    **Cost.**  The im2col matrix is never built.  A cost model picks one of three kernels
    (:data:`KERNELS`, module docstring): shifted patch rows in chunks of at most 8 MB times
    BLAS (any geometry); BLAS products of 1-row patch matrices, one per row shift (vertical
    step 1; pieces of at most 32 MB); or shifted inner products of the image with itself,
    ``O(C^2 k^2 HW)`` instead of ``O(C^2 k^4 HW)`` (step 1; padded, shifted float64 copies of
    at most 32 MB).  Beyond those pieces the extra memory is the ``G (Fb+1)^2`` float64
    accumulators.  All accumulate in float64 about a per-feature shift and agree to rounding.

    Examples
    --------
    >>> import numpy as np, nsiter
    >>> x = np.random.default_rng(0).standard_normal((2, 4, 16, 16))
    >>> cov, mean = nsiter.patch_covariance(x, 3, padding=1)
    >>> cov.shape, mean.shape
    ((36, 36), (36,))
    >>> np.allclose(cov, nsiter.covariance(nsiter.im2col(x, 3, padding=1))[0])
    True
    >>> cov, mean = nsiter.patch_covariance(x, 3, padding=1, block_size=2)
    >>> cov.shape
    (2, 18, 18)
    >>> cov, mean = nsiter.patch_covariance(x, 3, block_size=2, grouping="reference", sampling_stride=2)
    >>> cov.shape
    (18, 18)
    """
    if is_tensor(x):
        return torch_backend().patch_covariance(
            x, kernel_size, stride=stride, padding=padding, dilation=dilation, sampling_stride=sampling_stride,
            block_size=block_size, grouping=grouping, eps=eps)
    arr = as_float_array(x, "x")
    imgs = as_images(arr, "x")
    check_nonempty(imgs, "x")
    check_option(grouping, "grouping", GROUPINGS)
    eps = check_nonnegative_float(eps, "eps")
    g = _sampled_geometry(imgs.shape, kernel_size, stride, padding, dilation, sampling_stride)
    block_size = _check_block(block_size, g.c)
    _check_finite_fast(imgs, "x")
    plan = _plan(g.c, g.kh * g.kw, block_size, grouping)
    return _finish(_patch_moments(imgs, g, plan), plan, eps, arr.dtype)


class PatchStatistics:
    r"""Streaming patch covariance: update batch by batch, merge shards, read ``(cov, mean)``.

    Holds the count, the float64 mean and the float64 centred second moment
    ``M2 = sum_r (x_r - mu)(x_r - mu)^T`` of the (grouped) im2col rows seen so far.  Batches
    and shards combine with the pairwise update of Chan, Golub & LeVeque
    (``M2 = M2_a + M2_b + n_a n_b / n * d d^T``, ``d = mu_b - mu_a``), so the statistics of
    several updates (or of merged accumulators from other processes) equal the one-shot
    :func:`patch_covariance` of the concatenated batch up to rounding (~1e-15 relative).

    Parameters
    ----------
    kernel_size, stride, padding, dilation, sampling_stride, block_size, grouping
        As in :func:`patch_covariance`; fixed for the lifetime of the accumulator.

    Attributes
    ----------
    count : int
        Samples seen: patches for ``block_size=None`` / ``"contiguous"``, patches times
        ``C/B`` for ``"reference"`` (the stacked rows).
    channels : int or None
        ``C``, fixed by the first update (``None`` before).
    dtype : numpy.dtype or None
        Output dtype: float32 while every update was float32/float16, else float64.

    Examples
    --------
    >>> import numpy as np, nsiter
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.standard_normal((2, 3, 3, 20, 20))
    >>> stats = nsiter.PatchStatistics(5, padding=2).update(a).update(b)
    >>> cov, mean = stats.covariance(eps=1e-5)
    >>> ref, _ = nsiter.patch_covariance(np.concatenate([a, b]), 5, padding=2, eps=1e-5)
    >>> bool(np.allclose(cov, ref, rtol=1e-12, atol=1e-14))
    True
    """

    def __init__(self, kernel_size, *, stride=1, padding=0, dilation=1, sampling_stride=1,
                 block_size=None, grouping="contiguous"):
        self.kernel_size = as_pair(kernel_size, "kernel_size", minimum=1)
        self.stride = as_pair(stride, "stride", minimum=1)
        self.padding = as_pair(padding, "padding", minimum=0)
        self.dilation = as_pair(dilation, "dilation", minimum=1)
        self.sampling_stride = check_positive_int(sampling_stride, "sampling_stride")
        self.block_size = None if block_size is None else check_positive_int(block_size, "block_size")
        self.grouping = check_option(grouping, "grouping", GROUPINGS)
        self.channels = None
        self.dtype = None
        self._plan = None
        self._stats = None  # (count, mean (G, fb), M2 (G, fb, fb)) in float64

    def _settings(self) -> dict:
        return {"kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "dilation": self.dilation, "sampling_stride": self.sampling_stride,
                "block_size": self.block_size, "grouping": self.grouping}

    @property
    def count(self) -> int:
        return 0 if self._stats is None else int(self._stats[0])

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._settings().items())
        return f"PatchStatistics({args}; channels={self.channels}, count={self.count})"

    def update(self, x):
        """Add the patches of an image batch ``x`` ((N, C, H, W), (C, H, W) or (H, W)); returns ``self``.

        torch tensors are copied to host memory (the statistics are float64 numpy arrays).
        Validation as in :func:`patch_covariance`; a failed update leaves ``self`` unchanged.
        """
        if is_tensor(x):
            x = x.detach().cpu().numpy()
        arr = as_float_array(x, "x")
        imgs = as_images(arr, "x")
        check_nonempty(imgs, "x")
        g = _sampled_geometry(imgs.shape, self.kernel_size, self.stride, self.padding, self.dilation,
                              self.sampling_stride)
        if self.channels is not None and g.c != self.channels:
            raise ValueError(
                f"expected images with {self.channels} channels (fixed by the first update), got {g.c}; "
                "use one PatchStatistics per channel count"
            )
        block = _check_block(self.block_size, g.c)
        _check_finite_fast(imgs, "x")
        plan = self._plan if self._plan is not None else _plan(g.c, g.kh * g.kw, block, self.grouping)
        n, mean, m2 = _patch_moments(imgs, g, plan)  # m2 may be a reused work buffer: copy or merge
        self._stats = (n, mean.copy(), m2.copy()) if self._stats is None else _merge_moments(self._stats,
                                                                                           (n, mean, m2))
        self.channels, self._plan = g.c, plan
        self.dtype = arr.dtype if self.dtype is None else np.promote_types(self.dtype, arr.dtype)
        return self

    def merge(self, other: "PatchStatistics"):
        """Add the statistics of another accumulator with the same settings, in place; returns ``self``."""
        if not isinstance(other, PatchStatistics):
            raise TypeError(f"expected a PatchStatistics to merge, got {type(other).__name__}")
        mine, theirs = self._settings(), other._settings()
        diff = [f"{k}: {mine[k]!r} vs {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]
        if diff:
            raise ValueError(
                "cannot merge PatchStatistics with different settings (" + "; ".join(diff) + "); "
                "accumulate shards with identical kernel_size, stride, padding, dilation, "
                "sampling_stride, block_size and grouping"
            )
        if other._stats is None:
            return self
        if self.channels is not None and other.channels != self.channels:
            raise ValueError(
                f"cannot merge statistics of {other.channels}-channel images into an accumulator of "
                f"{self.channels}-channel images; use one PatchStatistics per channel count"
            )
        if self._stats is None:
            self.channels, self._plan, self.dtype = other.channels, other._plan, other.dtype
            n, mean, m2 = other._stats
            self._stats = (n, mean.copy(), m2.copy())
            return self
        self.dtype = np.promote_types(self.dtype, other.dtype)
        self._stats = _merge_moments(self._stats, other._stats)
        return self

    def covariance(self, eps=0.0):
        """``(cov, mean)`` of everything seen, shaped as :func:`patch_covariance` returns them."""
        eps = check_nonnegative_float(eps, "eps")
        if self._stats is None:
            raise ValueError("PatchStatistics has seen no data (count 0); call update(x) or merge(other) first")
        return _finish(self._stats, self._plan, eps, self.dtype)
