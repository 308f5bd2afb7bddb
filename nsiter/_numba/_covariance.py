"""Numba kernels for patch covariances (private twins of :mod:`nsiter.covariance`): patch rows
for BLAS (:func:`_patch_rows`, :func:`_row_patches`), their Gram matrices fused with the fill for
narrow blocks (:func:`_narrow_moments`) and shifted inner products of a dense patch grid
(:func:`_shifted_moments`), all about a shift; see :mod:`nsiter._numba.patches`."""
from __future__ import annotations

import numpy as np

from .._config import jit, prange
from ._im2col import _valid_range
from ._tiles import _gram_tiles


@jit
def _patch_rows(x, cols, cshift, ones, kw, sh, sw, ph, pw, dh, dw, oh, ow, p0, n_rows, rs, band, out):
    """Shifted patch rows ``p0 .. p0 + n_rows`` of the im2col matrix, scattered into ``out`` (1-D).

    ``cols (F, 4)``, ``cshift (F,)``: the columns in fill order, each ``(channel, tap row, tap
    column, destination)`` and its shift (:func:`nsiter._numba.patches._fill_columns`): row ``r = p -
    p0`` of the column goes to ``out[destination + r*rs]`` as ``value - shift``, and a 1 to ``out[ones[g] + r*rs]`` for every
    group ``g``: with the ones column, one product ``B^T B`` per chunk gives the second moments
    *and* the column sums.  Serial: the "gemm" kernel calls it between BLAS products (a parallel
    fill would compete with the BLAS worker threads that keep spinning between calls), the
    "narrow" kernel once per task in each of its parallel parts.

    ``band``: output rows per pass (the choice: :func:`nsiter._numba.patches._fill_plan`): one
    (:func:`_patch_rows_by_row`, every column for one output row), or more
    (:func:`_patch_rows_by_band`, each column for all of the band's rows at once: a column reads its
    channel plane down the band).  The values written are the same.
    """
    if band == 1:
        _patch_rows_by_row(x, cols, cshift, ones, kw, sh, sw, ph, pw, dh, dw, oh, ow, p0, n_rows, rs, out)
    else:
        _patch_rows_by_band(x, cols, cshift, ones, kw, sh, sw, ph, pw, dh, dw, oh, ow, p0, n_rows, rs, band, out)


@jit
def _patch_rows_by_row(x, cols, cshift, ones, kw, sh, sw, ph, pw, dh, dw, oh, ow, p0, n_rows, rs, out):
    """:func:`_patch_rows` one output row per pass."""
    _, _, h, w = x.shape
    n_patch = oh * ow
    n_cols = cols.shape[0]
    lo_j = np.empty(kw, np.int64)
    hi_j = np.empty(kw, np.int64)
    urs = np.uint64(rs)
    usw = np.uint64(sw)
    p = p0
    p_end = p0 + n_rows
    while p < p_end:  # one output row (n, a) per pass, columns b in [b_lo, b_hi)
        n = p // n_patch
        rem = p - n * n_patch
        a = rem // ow
        b_lo = rem - a * ow
        b_hi = min(ow, b_lo + (p_end - p))
        r0 = p - p0 - b_lo  # chunk row of b = 0
        for g in range(ones.shape[0]):
            o = ones[g]
            for b in range(b_lo, b_hi):
                out[o + (r0 + b) * rs] = 1.0
        for jj in range(kw):  # valid b of tap column jj: 0 <= b*sw + jj*dw - pw < w
            lo, hi = _valid_range(ow, sw, jj * dw - pw, w)
            lo_j[jj] = min(max(lo, b_lo), b_hi)
            hi_j[jj] = max(min(hi, b_hi), lo_j[jj])
        h0 = a * sh - ph
        for e in range(n_cols):
            hh = h0 + cols[e, 1] * dh
            o = cols[e, 3] + r0 * rs
            sv = cshift[e]
            if hh < 0 or hh >= h:
                for b in range(b_lo, b_hi):
                    out[o + b * rs] = -sv
                continue
            src = x[n, cols[e, 0], hh]
            jj = cols[e, 2]
            off = jj * dw - pw
            lo = lo_j[jj]
            hi = hi_j[jj]
            for b in range(b_lo, lo):
                out[o + b * rs] = -sv
            # unsigned indices: no wraparound checks in the loop that reads the image
            d = np.uint64(o + lo * rs)
            q = np.uint64(lo * sw + off)
            for _ in range(hi - lo):
                out[d] = src[q] - sv
                d += urs
                q += usw
            for b in range(hi, b_hi):
                out[o + b * rs] = -sv
        p += b_hi - b_lo


@jit
def _patch_rows_by_band(x, cols, cshift, ones, kw, sh, sw, ph, pw, dh, dw, oh, ow, p0, n_rows, rs, band, out):
    """:func:`_patch_rows` ``band`` output rows per pass."""
    _, nc, h, w = x.shape
    xf = x.reshape(x.size)  # flat indices: no array view (and its reference count) per column
    n_patch = oh * ow
    n_cols = cols.shape[0]
    lo_j = np.empty(kw, np.int64)
    hi_j = np.empty(kw, np.int64)
    for jj in range(kw):  # valid b of tap column jj: 0 <= b*sw + jj*dw - pw < w
        lo_j[jj], hi_j[jj] = _valid_range(ow, sw, jj * dw - pw, w)
    urs = np.uint64(rs)
    usw = np.uint64(sw)
    p = p0
    p_end = p0 + n_rows
    while p < p_end:  # the patches [q_lo, q_hi) of image n, in at most `band` output rows, per pass
        n = p // n_patch
        q_lo = p - n * n_patch
        a_lo = q_lo // ow
        q_hi = min(n_patch, q_lo + (p_end - p), (a_lo + band) * ow)
        a_hi = (q_hi - 1) // ow + 1
        r_img = p - p0 - q_lo  # chunk row of the image's patch 0 (may lie before the chunk)
        for g in range(ones.shape[0]):
            o = ones[g]
            for q in range(q_lo, q_hi):
                out[o + (r_img + q) * rs] = 1.0
        for e in range(n_cols):
            ti = cols[e, 1]
            jj = cols[e, 2]
            sv = cshift[e]
            off = jj * dw - pw
            plane = (n * nc + cols[e, 0]) * h
            dest = cols[e, 3] + r_img * rs
            for a in range(a_lo, a_hi):  # output row a, columns b in [b_lo, b_hi)
                b_lo = max(q_lo - a * ow, 0)
                b_hi = min(q_hi - a * ow, ow)
                o = dest + a * ow * rs
                hh = a * sh - ph + ti * dh
                if hh < 0 or hh >= h:
                    for b in range(b_lo, b_hi):
                        out[o + b * rs] = -sv
                    continue
                lo = min(max(lo_j[jj], b_lo), b_hi)
                hi = max(min(hi_j[jj], b_hi), lo)
                # (the run of _patch_rows_by_row, written out: a shared kernel for it, called per
                # column, took 1.17-1.29x the time of both loops)
                for b in range(b_lo, lo):
                    out[o + b * rs] = -sv
                d = np.uint64(o + lo * rs)
                q = np.uint64((plane + hh) * w + lo * sw + off)
                for _ in range(hi - lo):
                    out[d] = xf[q] - sv
                    d += urs
                    q += usw
                for b in range(hi, b_hi):
                    out[o + b * rs] = -sv
        p += q_hi - q_lo


@jit(parallel=True)
def _narrow_moments(x, fill_cols, cshift, ones, kw, sh, sw, ph, pw, dh, dw, oh, ow, band, rows, rs, gs, stacked, flush, work,
                    tmp,
                    acc):
    """Shifted second moments and column sums of all ``N*oh*ow`` patch rows, fill and product fused.

    Patch rows go in tasks of ``rows`` (:func:`_patch_rows`, ``fill_cols``/``cshift``/``ones`` as in the
    "gemm" kernel, into a zero-padded buffer of ``work``'s dtype that stays in cache: row stride ``rs``,
    group stride ``gs``); their Gram matrices (:func:`_gram_tiles`, upper triangle, in that dtype)
    accumulate in ``tmp[q, a] (rows_c, cols)`` for ``flush`` rows (bounding the rounding of a
    float32 sum, as the "gemm" kernel's chunks do) and then go into the float64 ``acc[q, a]`` of
    part ``q``.  ``stacked`` (the reference grouping): the group rows of a patch row follow each
    other (``gs = cols``, ``rs`` whole rows of ``cols``, unwritten ones zero) and all go into block
    0 with one product per task; else group ``a``'s rows (``rs = cols``) into block ``a``.  Part
    ``q`` takes the ``q``-th contiguous run of tasks: the parts, not the threads, fix the order of
    the additions, so the result does not depend on the thread count.  ``work``: one buffer per
    part, at least ``rows*rs`` (stacked) or ``n_acc*gs`` long; ``work`` and ``tmp``: any content
    (zeroed here).  Parallel over parts.
    """
    parts, n_acc, rows_c, cols = acc.shape
    total = x.shape[0] * oh * ow
    n_tasks = -(-total // rows)
    per_part = -(-n_tasks // parts)
    size = rows * rs if stacked else n_acc * gs
    for q in prange(parts):
        buf = work[q, :size]
        buf[:] = 0.0
        tmp[q] = 0.0
        pending = 0
        t_end = min(n_tasks, (q + 1) * per_part)
        for t in range(q * per_part, t_end):
            p0 = t * rows
            r = min(rows, total - p0)
            _patch_rows(x, fill_cols, cshift, ones, kw, sh, sw, ph, pw, dh, dw, oh, ow, p0, r, rs, band, buf)
            k = r * rs // cols if stacked else r  # product rows of the task (per group)
            for k0 in range(0, k, flush):  # chains of at most `flush` rows between flushes
                k1 = min(k, k0 + flush)
                if stacked:
                    _gram_tiles(buf[k0 * cols:k1 * cols].reshape(k1 - k0, cols), tmp[q, 0], k1 - k0)
                else:
                    for a in range(n_acc):
                        lo = a * gs + k0 * cols
                        _gram_tiles(buf[lo:lo + (k1 - k0) * cols].reshape(k1 - k0, cols), tmp[q, a], k1 - k0)
                pending += k1 - k0
                if pending >= flush or (t == t_end - 1 and k1 == k):
                    for a in range(n_acc):
                        src = tmp[q, a]
                        dst = acc[q, a]
                        for i in range(rows_c):
                            for j in range(i, cols):
                                dst[i, j] += src[i, j]
                                src[i, j] = 0.0
                    pending = 0


@jit
def _reduce_parts(acc, fb, second, sums):
    """The parts of :func:`_narrow_moments` summed in order: ``second[a] (fb, fb)`` from the upper
    triangles of ``acc[:, a]``, mirrored (exactly symmetric), and ``sums[a] (fb,)`` from column ``fb``."""
    parts, blocks = acc.shape[:2]
    for a in range(blocks):
        for i in range(fb + 1):
            for j in range(i, fb + 1):
                s = acc[0, a, i, j]
                for q in range(1, parts):
                    s += acc[q, a, i, j]
                if j == fb:
                    if i < fb:
                        sums[a, i] = s
                else:
                    second[a, i, j] = s
                    second[a, j, i] = s


@jit
def _row_patches(x, m, kw, sw, ph, pw, dw, ow, n0, u0, edges, out, rowpre):
    """1-row patches ``out[u, t, b, c*kw + j] = xpad[n0 + t, c, u0 + u, b*sw + j*dw] - m[c]`` on image
    pixels, 0 on the padding (row-major in ``u``: any range of rows is one matrix), and their float64
    sums over ``t`` and the output columns ``b < edges[e]`` in ``rowpre[u, c*kw + j, e]``.

    ``edges``: sorted column boundaries from 0 to ``ow``; the running sum over ``b`` is recorded once per
    segment between them, so every sum over a range of edges comes from the same additions.  Serial, as
    :func:`_patch_rows`.
    """
    _, n_ch, h, w = x.shape
    rowpre[:, :, :] = 0.0
    for t in range(out.shape[1]):
        n = n0 + t
        for u in range(out.shape[0]):
            hh = u0 + u - ph
            dst = out[u, t]
            for c in range(n_ch):
                mc = m[c]
                for j in range(kw):
                    col = c * kw + j
                    if hh < 0 or hh >= h:
                        for b in range(ow):
                            dst[b, col] = 0.0
                        continue
                    src = x[n, c, hh]
                    off = j * dw - pw
                    lo, hi = _valid_range(ow, sw, off, w)
                    for b in range(lo):
                        dst[b, col] = 0.0
                    for b in range(hi, ow):
                        dst[b, col] = 0.0
                    pre = rowpre[u, col]
                    s = 0.0
                    for e in range(edges.shape[0] - 1):
                        for b in range(max(lo, edges[e]), min(hi, edges[e + 1])):
                            v = src[b * sw + off] - mc
                            dst[b, col] = v
                            s += v
                        pre[e + 1] += s


@jit
def _next_boundary(u, i_lo, i_hi, dh, oh, u_hi):
    """The first window boundary (``i*dh`` or ``i*dh + oh``) after row ``u``, at most ``u_hi``."""
    nxt = u_hi
    for i in range(i_lo, i_hi):
        for e in (i * dh, i * dh + oh):
            if u < e < nxt:
                nxt = e
    return nxt


@jit(parallel=True)
def _shifted_moments(xa, xb, tasks, kh, kw, dh, dw, oh, ow, acc):
    r"""Raw moments of a dense (stride 1) patch grid from shifted inner products.

    ``xa``: padded, shifted float64 images ``(N, C, oh + (kh - 1)*dh, Wp = ow + (kw - 1)*dw)``; ``xb``:
    the same with ``(kw - 1)*dw`` zero columns on each side.  Task ``t = (c, c2, di)`` adds to
    ``acc[t, i, dj + kw - 1, j]`` the im2col inner product of columns ``(c, i, j)``, ``(c2, i + di, j + dj)``,

    .. math::

        \sum_n \sum_{u = i d_h}^{i d_h + oh - 1} \sum_{v = j d_w}^{j d_w + ow - 1}
        xa[n, c, u, v] \; xa[n, c_2, u + d_i d_h, v + d_j d_w].

    Each product row is formed once per task for all ``dj`` and summed over ``u`` once for all
    windows (``cum``, four rows per pass between window boundaries); a window's sum is the
    difference of the prefix sums of ``cum`` at its last and first row.  Parallel over tasks.
    """
    nb, _, _, wp = xa.shape
    margin = (xb.shape[3] - wp) // 2
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
            a_img = xa[n, c]
            b_img = xb[n, c2]
            cum[:, :] = 0.0
            u = u_lo
            while True:
                # window boundaries at row u: cum holds the row sums of rows [u_lo, u)
                event = False
                for i in range(i_lo, i_hi):
                    if i * dh == u or i * dh + oh == u:
                        event = True
                if event:
                    for q in range(ndj):
                        dj = q - (kw - 1)
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
                                for j in range(max(0, -dj), kw - max(0, dj)):
                                    v0 = j * dw
                                    acc[t, i, q, j] += sign * (pref[v0 + ow] - pref[v0])
                if u == u_hi:
                    break
                nxt = _next_boundary(u, i_lo, i_hi, dh, oh, u_hi)
                while u + 4 <= nxt:
                    a0 = a_img[u]
                    a1 = a_img[u + 1]
                    a2 = a_img[u + 2]
                    a3 = a_img[u + 3]
                    b0 = b_img[u + ddh]
                    b1 = b_img[u + 1 + ddh]
                    b2 = b_img[u + 2 + ddh]
                    b3 = b_img[u + 3 + ddh]
                    for q in range(ndj):
                        st = margin + (q - (kw - 1)) * dw
                        row = cum[q]
                        for v in range(wp):
                            row[v] += (a0[v] * b0[st + v] + a1[v] * b1[st + v]) + (
                                a2[v] * b2[st + v] + a3[v] * b3[st + v])
                    u += 4
                while u < nxt:
                    a0 = a_img[u]
                    b0 = b_img[u + ddh]
                    for q in range(ndj):
                        st = margin + (q - (kw - 1)) * dw
                        row = cum[q]
                        for v in range(wp):
                            row[v] += a0[v] * b0[st + v]
                    u += 1


@jit
def _scatter_moments(acc, tasks, kh, kw, M):
    """Write task results of :func:`_shifted_moments` into both triangles of the ``(F, F)`` matrix ``M``."""
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


@jit
def _subtract_outer(M, z):
    """``M[g] -= z[g] z[g]^T`` in place; exactly symmetric since ``z_i z_j == z_j z_i``."""
    for g in range(M.shape[0]):
        for i in range(M.shape[1]):
            zi = z[g, i]
            for j in range(M.shape[2]):
                M[g, i, j] -= zi * z[g, j]


@jit
def _centre_padded(M, z, A, m, K):
    """``M[(c, t), (c', t')] += (m[c'] A[c, t, t'] + m[c] A[c', t', t] + m[c] m[c'] K[t, t']) - z[c, t] z[c', t']``
    in place: :func:`_subtract_outer` with the padding terms of
    :func:`nsiter._numba.patches._finish_padded`, in one pass.  The term is symmetric in its two
    indices (``K`` is), so the upper triangle is computed and mirrored: exactly symmetric, as ``M``."""
    cb, taps, _ = A.shape
    for c in range(cb):
        for t in range(taps):
            a = c * taps + t
            row = M[a]
            zi = z[c, t]
            for c2 in range(c, cb):
                mm = m[c] * m[c2]
                for t2 in range(t if c2 == c else 0, taps):
                    row[c2 * taps + t2] += (m[c2] * A[c, t, t2] + m[c] * A[c2, t2, t] + mm * K[t, t2]) - zi * z[c2, t2]
    _mirror_upper(M)


@jit
def _mirror_upper(M):
    """``M[b, a] = M[a, b]`` for ``a < b``, in 32 x 32 tiles (a whole-column write per row would miss
    the cache on every element)."""
    f = M.shape[0]
    for a0 in range(0, f, 32):
        a1 = min(a0 + 32, f)
        for b0 in range(a0, f, 32):
            b1 = min(b0 + 32, f)
            for a in range(a0, a1):
                for b in range(max(b0, a + 1), b1):
                    M[b, a] = M[a, b]
