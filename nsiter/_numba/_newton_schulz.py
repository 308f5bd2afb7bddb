"""Numba kernels of the Newton–Schulz inverse square root (Higham 2008, Eqs. 6.35 and 7.12).

Private twins of :mod:`nsiter.newton_schulz`: contiguous float arrays in, preallocated
outputs, no validation.  Every kernel is parallel over the batch axis (``prange`` writes
one matrix per iteration, so the slices are disjoint).
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .._config import jit, prange
from .._policy import BLOWUP_GROWTH, BLOWUP_SQRT_N, STAGNATION_BELOW, STAGNATION_RATIO
from ._tiles import _I32, _VECTOR_BYTES, _emit_narrow_rows, _emit_row_block, _emit_tile, _vector_fma

__all__ = [
    "_psd_probe", "_psd_probe_serial", "_spectrum_estimates_serial", "_coupled_ns_parallel", "_coupled_ns_serial",
    "_coupled_solve_parallel", "_coupled_solve_serial", "_coupled_pipeline_parallel", "_coupled_pipeline_serial",
    "_eigh_power", "_eigh_power_serial", "_prepare", "_prepare_serial",
]



@jit
def _norm2(v):
    """``||v||_2`` without a temporary array."""
    s = 0.0
    for i in range(v.shape[0]):
        s += v[i] * v[i]
    return np.sqrt(s)


@jit
def _power_one(a, n_steps, v, w):
    """``n_steps`` of power iteration on symmetric ``a``: an estimate ``<= lambda_max``.

    ``A v = sum_k v_k A[k, :]`` by symmetry: contiguous rows, vectorisable.
    """
    n = a.shape[0]
    est = 0.0
    for i in range(n):
        v[i] = np.sqrt(abs(a[i, i])) + 1e-3 * np.cos(1.7 * i + 0.3)
    for _ in range(n_steps):
        nv = _norm2(v)
        if not (nv > 0.0):
            break
        for i in range(n):
            w[i] = 0.0
        for k in range(n):
            vk = v[k] / nv
            for i in range(n):
                w[i] += vk * a[k, i]
        est = _norm2(w)
        for i in range(n):
            v[i] = w[i]
    return est


@jit
def _inverse_lu(L, U, n_steps, v, w):
    """``n_steps`` of inverse iteration with the Cholesky factor ``L`` (lower, and its
    transpose ``U``): an estimate ``>= lambda_min(L L^T)`` (also bounded by the smallest
    pivot ``L_jj^2``); :func:`_inverse_upper` from :func:`_inverse_start`."""
    _inverse_start(v)
    return _inverse_upper(U, n_steps, v, w)


@jit
def _inverse_start(v):
    """The start vector of :func:`_inverse_lu` (the same for every matrix of one size)."""
    for i in range(v.shape[0]):
        v[i] = np.cos(2.3 * i + 0.7) + 0.25


@jit
def _inverse_upper(U, n_steps, v, w):
    """:func:`_inverse_lu` from the upper factor ``U`` alone (its leading ``n x n`` block), ``v``
    holding the start vector.

    Both triangular solves are column oriented: the forward one a contiguous ``axpy`` on rows
    of ``U`` (the form LLVM vectorises), the backward one on columns of ``U`` (``L``'s rows,
    without forming ``L``), each column from the entry the next division needs on.
    """
    n = U.shape[0]
    min_pivot = np.inf
    for i in range(n):
        p = U[i, i] * U[i, i]
        if p < min_pivot:
            min_pivot = p
    inv_est = 0.0
    for _ in range(n_steps):
        nv = _norm2(v)
        for i in range(n):
            v[i] /= nv
        for j in range(n):  # forward: L y = v (v is overwritten)
            yj = v[j] / U[j, j]
            w[j] = yj
            tail = v[j + 1:]
            urow = U[j, j + 1:]
            for k in range(n - j - 1):
                tail[k] -= urow[k] * yj
        for i in range(n - 1, -1, -1):  # backward: L^T x = y
            w[i] /= U[i, i]
            xi = w[i]
            for k in range(i - 1, -1, -1):
                w[k] -= U[k, i] * xi
        inv_est = _norm2(w)
        for i in range(n):
            v[i] = w[i]
    est = 1.0 / inv_est if inv_est > 0.0 else min_pivot
    return min(est, min_pivot)


@jit
def _inverse_upper2(U1, U2, n_steps, v1, w1, v2, w2):
    """:func:`_inverse_upper` on two factors of one size in lockstep: ``(estimate 1, estimate 2)``,
    each with the operations, so the bits, of its own call.  The solves are chains of
    dependent divisions; two independent chains in one loop overlap in the processor."""
    n = U1.shape[0]
    min1 = np.inf
    min2 = np.inf
    for i in range(n):
        p = U1[i, i] * U1[i, i]
        if p < min1:
            min1 = p
        p = U2[i, i] * U2[i, i]
        if p < min2:
            min2 = p
    inv1 = 0.0
    inv2 = 0.0
    for _ in range(n_steps):
        nv1 = _norm2(v1)
        nv2 = _norm2(v2)
        for i in range(n):
            v1[i] /= nv1
            v2[i] /= nv2
        for j in range(n):  # forward: L y = v (v is overwritten)
            y1 = v1[j] / U1[j, j]
            y2 = v2[j] / U2[j, j]
            w1[j] = y1
            w2[j] = y2
            tail1 = v1[j + 1:]
            urow1 = U1[j, j + 1:]
            tail2 = v2[j + 1:]
            urow2 = U2[j, j + 1:]
            for k in range(n - j - 1):
                tail1[k] -= urow1[k] * y1
                tail2[k] -= urow2[k] * y2
        for i in range(n - 1, -1, -1):  # backward: L^T x = y
            w1[i] /= U1[i, i]
            w2[i] /= U2[i, i]
            x1 = w1[i]
            x2 = w2[i]
            for k in range(i - 1, -1, -1):
                w1[k] -= U1[k, i] * x1
                w2[k] -= U2[k, i] * x2
        inv1 = _norm2(w1)
        inv2 = _norm2(w2)
        for i in range(n):
            v1[i] = w1[i]
            v2[i] = w2[i]
    est1 = 1.0 / inv1 if inv1 > 0.0 else min1
    est2 = 1.0 / inv2 if inv2 > 0.0 else min2
    return min(est1, min1), min(est2, min2)


@jit
def _inverse_one(L, n_steps, v, w):
    """:func:`_inverse_lu` from the lower factor ``L`` alone."""
    n = L.shape[0]
    U = np.empty((n, n))
    for i in range(n):
        for k in range(i + 1):
            U[k, i] = L[i, k]
    return _inverse_lu(L, U, n_steps, v, w)


@jit
def _spectrum_estimates_serial(A, L, shift, n_inverse, n_power, lmin, lmax):
    """Per matrix, in batch order: ``lmin[b] ~ lambda_min(A_b)`` (an over-estimate, from the
    Cholesky factor ``L_b`` of ``A_b + shift_b I``) and ``lmax[b] ~ lambda_max(A_b)`` (an
    under-estimate; 0 when ``n_power == 0``).  For the large matrices LAPACK factorised: no
    thread pool, whose spinning would only compete with the BLAS threads."""
    nb, n, _ = A.shape
    v = np.empty(n)
    w = np.empty(n)
    for b in range(nb):
        lmax[b] = _power_one(A[b], n_power, v, w) if n_power > 0 else 0.0
        lmin[b] = _inverse_one(L[b], n_inverse, v, w) - shift[b]


@intrinsic
def _scale_row(typingctx, U, i, v0, alpha):
    """An intrinsic ``_scale_row(U, i, v0, alpha)`` on a C-contiguous 2-D float array whose rows
    are whole 64-byte vectors (``v0`` a multiple of the lanes): ``U[i, v0:] *= alpha``, one
    vector at a time, no bounds checks."""
    def codegen(context, builder, signature, args):
        u = context.make_array(signature.args[0])(context, builder, args[0])
        iv, v0v = args[1], args[2]
        ety = context.get_value_type(signature.args[0].dtype)
        size = context.get_abi_sizeof(ety)
        lanes = _VECTOR_BYTES // size
        vty = ir.VectorType(ety, lanes)
        undef = ir.Constant(vty, ir.Undefined)
        splat = ir.Constant(ir.VectorType(_I32, lanes), [ir.Constant(_I32, 0)] * lanes)
        alpha = context.cast(builder, args[3], signature.args[3], signature.args[0].dtype)
        s = builder.shuffle_vector(builder.insert_element(undef, alpha, ir.Constant(_I32, 0)), undef, splat)
        ld = cgutils.unpack_tuple(builder, u.shape, 2)[1]
        idx = iv.type
        count = builder.udiv(builder.sub(ld, v0v), ir.Constant(idx, lanes))
        row_i = builder.gep(u.data, [builder.add(builder.mul(iv, ld), v0v)])
        with cgutils.for_range(builder, count) as loop:
            pi = builder.bitcast(builder.gep(row_i, [builder.mul(loop.index, ir.Constant(idx, lanes))]),
                                 vty.as_pointer())
            builder.store(builder.fmul(builder.load(pi, align=size), s), pi, align=size)
        return context.get_dummy_value()

    return types.void(U, i, v0, alpha), codegen
_LANES64 = _VECTOR_BYTES // 8
_DBL_MAX = float(np.finfo(np.float64).max)
_DOWNDATE_VECS = 4


@intrinsic
def _row_downdate(typingctx, U, i, v0, vecs):
    """An intrinsic ``_row_downdate(U, i, v0, vecs)`` on a C-contiguous 2-D float64 array:
    ``U[i, v0:v0+vecs*L] -= U[0, i] U[0, v0:...]``, then ``-= U[1, i] U[1, v0:...]``, ... down
    to row ``i - 1``, in that order (each product rounded, then subtracted), ``vecs`` (1 to
    :data:`_DOWNDATE_VECS`) vectors of ``L`` lanes kept in registers over the rows, no bounds
    checks: the updates row ``i`` gets from the rows above it in a right-looking Cholesky,
    applied at once (left-looking)."""
    def codegen(context, builder, signature, args):
        u = context.make_array(signature.args[0])(context, builder, args[0])
        iv, v0v, nvec = args[1], args[2], args[3]
        ety = context.get_value_type(signature.args[0].dtype)
        size = context.get_abi_sizeof(ety)
        lanes = _VECTOR_BYTES // size
        vty = ir.VectorType(ety, lanes)
        undef = ir.Constant(vty, ir.Undefined)
        splat = ir.Constant(ir.VectorType(_I32, lanes), [ir.Constant(_I32, 0)] * lanes)
        ld = cgutils.unpack_tuple(builder, u.shape, 2)[1]
        idx = iv.type
        row_i = builder.gep(u.data, [builder.add(builder.mul(iv, ld), v0v)])
        for vecs in range(1, _DOWNDATE_VECS + 1):
            with builder.if_then(builder.icmp_signed("==", nvec, ir.Constant(nvec.type, vecs))):
                ptrs = [builder.bitcast(builder.gep(row_i, [ir.Constant(idx, v * lanes)]), vty.as_pointer())
                        for v in range(vecs)]
                accs = [cgutils.alloca_once(builder, vty) for _ in range(vecs)]
                for v in range(vecs):
                    builder.store(builder.load(ptrs[v], align=size), accs[v])
                with cgutils.for_range(builder, iv) as loop:
                    row_j = builder.gep(u.data, [builder.mul(loop.index, ld)])
                    a = builder.load(builder.gep(row_j, [iv]))
                    s = builder.shuffle_vector(builder.insert_element(undef, a, ir.Constant(_I32, 0)), undef, splat)
                    src = builder.gep(row_j, [v0v])
                    for v in range(vecs):
                        b = builder.load(builder.bitcast(builder.gep(src, [ir.Constant(idx, v * lanes)]),
                                                         vty.as_pointer()), align=size)
                        builder.store(builder.fsub(builder.load(accs[v]), builder.fmul(s, b)), accs[v])
                for v in range(vecs):
                    builder.store(builder.load(accs[v]), ptrs[v], align=size)
        return context.get_dummy_value()

    return types.void(U, i, v0, vecs), codegen


@jit
def _cholesky_rows(a, shift, U):
    """Cholesky ``U^T U = a + shift I`` in the upper triangle of ``U`` (``n`` rows, whole float64
    vectors per row), left-looking (:func:`_row_downdate`); returns ``False`` at the first pivot
    ``<= 0`` or NaN.

    Each entry of the upper triangle gets the operations of the right-looking triangle-only
    loops in the same order (the same bits); the updates run over whole vectors from the one
    holding the diagonal on, so the strictly lower part holds finite by-products, never read.
    """
    n = a.shape[0]
    cols = U.shape[1]
    for i in range(n):
        urow = U[i]
        arow = a[i]
        for k in range(n):
            urow[k] = arow[k]
        for k in range(n, cols):
            urow[k] = 0.0
        urow[i] += shift
    for i in range(n):
        v0 = i - i % _LANES64
        c0 = v0
        while c0 < cols:
            vecs = min(_DOWNDATE_VECS, (cols - c0) // _LANES64)
            _row_downdate(U, i, c0, vecs)
            c0 += vecs * _LANES64
        d = U[i, i]
        if not (d > 0.0):
            return False
        _scale_row(U, i, v0, 1.0 / np.sqrt(d))
    return True


@jit
def _psd_probe_one(a, shift, n_inverse, n_power, v0, out):
    """Cholesky of ``a + shift I`` (:func:`_cholesky_rows`) and the estimates of
    :func:`_power_one` / :func:`_inverse_one` (``v0``: the start vector of :func:`_inverse_start`).

    ``out = [ok, lambda_min estimate, lambda_max estimate]``; ``ok = 0`` when a pivot is
    ``<= 0`` or NaN: ``a`` has an eigenvalue below ``-shift`` (``lambda_min = nan``).
    """
    n = a.shape[0]
    U = np.empty((n, -(-n // _LANES64) * _LANES64))
    v = np.empty(n)
    w = np.empty(n)
    good = _cholesky_rows(a, shift, U)
    out[0] = 1.0 if good else 0.0
    out[2] = _power_one(a, n_power, v, w) if n_power > 0 else 0.0
    if good:
        v[:] = v0
        out[1] = _inverse_upper(U, n_inverse, v, w) - shift
    else:
        out[1] = np.nan


@jit
def _psd_probe_pair(a1, a2, shift1, shift2, n_inverse, n_power, v0, out1, out2):
    """:func:`_psd_probe_one` on two matrices of one size, the inverse iterations in lockstep
    (:func:`_inverse_upper2`) when both factorisations succeed: the same outputs."""
    n = a1.shape[0]
    cols = -(-n // _LANES64) * _LANES64
    U1 = np.empty((n, cols))
    U2 = np.empty((n, cols))
    v1 = np.empty(n)
    w1 = np.empty(n)
    v2 = np.empty(n)
    w2 = np.empty(n)
    good1 = _cholesky_rows(a1, shift1, U1)
    good2 = _cholesky_rows(a2, shift2, U2)
    out1[0] = 1.0 if good1 else 0.0
    out2[0] = 1.0 if good2 else 0.0
    out1[2] = _power_one(a1, n_power, v1, w1) if n_power > 0 else 0.0
    out2[2] = _power_one(a2, n_power, v2, w2) if n_power > 0 else 0.0
    v1[:] = v0
    v2[:] = v0
    out1[1] = np.nan
    out2[1] = np.nan
    if good1 and good2:
        e1, e2 = _inverse_upper2(U1, U2, n_inverse, v1, w1, v2, w2)
        out1[1] = e1 - shift1
        out2[1] = e2 - shift2
    elif good1:
        out1[1] = _inverse_upper(U1, n_inverse, v1, w1) - shift1
    elif good2:
        out2[1] = _inverse_upper(U2, n_inverse, v2, w2) - shift2


@intrinsic
def _lanes_axpy(typingctx, dst, d0, ds, src, s0, ss, sc, t0, count):
    """``dst[d0 + c ds : + L] -= sc[t0 : t0 + L] * src[s0 + c ss : + L]`` for ``c < count``, on flat
    float64 arrays, one ``L``-lane vector each (the product rounded, then subtracted: the
    operations of the scalar loops, lane by lane), no bounds checks."""
    def codegen(context, builder, signature, args):
        tys = signature.args
        d = context.make_array(tys[0])(context, builder, args[0])
        a = context.make_array(tys[3])(context, builder, args[3])
        t = context.make_array(tys[6])(context, builder, args[6])
        d0v, dsv, s0v, ssv, t0v, cnt = args[1], args[2], args[4], args[5], args[7], args[8]
        vty = ir.VectorType(ir.DoubleType(), _LANES64)
        scale = builder.load(builder.bitcast(builder.gep(t.data, [t0v]), vty.as_pointer()), align=8)
        with cgutils.for_range(builder, cnt) as loop:
            pd = builder.bitcast(builder.gep(d.data, [builder.add(d0v, builder.mul(loop.index, dsv))]),
                                 vty.as_pointer())
            ps = builder.bitcast(builder.gep(a.data, [builder.add(s0v, builder.mul(loop.index, ssv))]),
                                 vty.as_pointer())
            prod = builder.fmul(scale, builder.load(ps, align=8))
            builder.store(builder.fsub(builder.load(pd, align=8), prod), pd, align=8)
        return context.get_dummy_value()

    return types.void(dst, d0, ds, src, s0, ss, sc, t0, count), codegen


@intrinsic
def _lanes_downdate(typingctx, U, i, n, j0, vecs):
    """``U[i, j] -= U[k, i] * U[k, j]`` for ``k = 0 .. i - 1`` in that order, ``j = j0 ..
    j0 + vecs - 1`` (1 to :data:`_DOWNDATE_VECS` lane vectors held in registers over ``k``),
    on the flat lane layout of :func:`_psd_probe_lanes` (entry ``(i, j)`` at ``(i n + j) L``):
    :func:`_row_downdate`, lane by lane (each product rounded, then subtracted)."""
    def codegen(context, builder, signature, args):
        u = context.make_array(signature.args[0])(context, builder, args[0])
        iv, nv, j0v, nvec = args[1], args[2], args[3], args[4]
        idx = iv.type
        L = ir.Constant(idx, _LANES64)
        vty = ir.VectorType(ir.DoubleType(), _LANES64)

        def vec_ptr(r, c):
            return builder.bitcast(builder.gep(u.data, [builder.mul(builder.add(builder.mul(r, nv), c), L)]),
                                   vty.as_pointer())

        for vecs in range(1, _DOWNDATE_VECS + 1):
            with builder.if_then(builder.icmp_signed("==", nvec, ir.Constant(nvec.type, vecs))):
                cols = [builder.add(j0v, ir.Constant(idx, v)) for v in range(vecs)]
                accs = [cgutils.alloca_once(builder, vty) for _ in range(vecs)]
                for v in range(vecs):
                    builder.store(builder.load(vec_ptr(iv, cols[v]), align=8), accs[v])
                with cgutils.for_range(builder, iv) as loop:
                    scale = builder.load(vec_ptr(loop.index, iv), align=8)
                    for v in range(vecs):
                        b = builder.load(vec_ptr(loop.index, cols[v]), align=8)
                        builder.store(builder.fsub(builder.load(accs[v]), builder.fmul(scale, b)), accs[v])
                for v in range(vecs):
                    builder.store(builder.load(accs[v]), vec_ptr(iv, cols[v]), align=8)
        return context.get_dummy_value()

    return types.void(U, i, n, j0, vecs), codegen


def _lanes_elementwise(op):
    @intrinsic
    def lanes_op(typingctx, dst, d0, src, s0, count):
        def codegen(context, builder, signature, args):
            tys = signature.args
            d = context.make_array(tys[0])(context, builder, args[0])
            a = context.make_array(tys[2])(context, builder, args[2])
            d0v, s0v, cnt = args[1], args[3], args[4]
            vty = ir.VectorType(ir.DoubleType(), _LANES64)
            x = builder.load(builder.bitcast(builder.gep(a.data, [s0v]), vty.as_pointer()), align=8)
            with cgutils.for_range(builder, cnt) as loop:
                off = builder.add(d0v, builder.mul(loop.index, ir.Constant(d0v.type, _LANES64)))
                pd = builder.bitcast(builder.gep(d.data, [off]), vty.as_pointer())
                builder.store(getattr(builder, op)(builder.load(pd, align=8), x), pd, align=8)
            return context.get_dummy_value()

        return types.void(dst, d0, src, s0, count), codegen

    return lanes_op


_lanes_mul = _lanes_elementwise("fmul")
_lanes_mul.__doc__ = """``dst[d0 + c L : + L] *= src[s0 : s0 + L]`` for ``c < count`` (flat float64 arrays)."""
_lanes_div = _lanes_elementwise("fdiv")
_lanes_div.__doc__ = """``dst[d0 + c L : + L] /= src[s0 : s0 + L]`` for ``c < count`` (flat float64 arrays)."""


@jit
def _norm2_lanes(v, n, out):
    """:func:`_norm2` of each lane of the flat ``v`` (``n`` vectors of ``L`` lanes) into ``out``."""
    for l in range(_LANES64):
        out[l] = 0.0
    for i in range(n):
        for l in range(_LANES64):
            out[l] += v[i * _LANES64 + l] * v[i * _LANES64 + l]
    for l in range(_LANES64):
        out[l] = np.sqrt(out[l])


@jit
def _psd_probe_lanes(A64, b0, cnt, shift, n_inverse, n_power, v0, out, U, v, w):
    """:func:`_psd_probe_one` on the ``cnt <= L`` matrices ``A64[b0:b0 + cnt]`` at once, matrix
    ``l`` in vector lane ``l`` (``L`` = :data:`_LANES64`; flat scratch ``U`` of ``n n L`` and
    ``v``, ``w`` of ``n L`` values, entry ``(i, j)`` of lane ``l`` at ``(i n + j) L + l``; unused
    lanes hold the identity): the same outputs, bit for bit.

    Every lane runs the operations of :func:`_cholesky_rows` and :func:`_inverse_upper` on its
    matrix in their order (the lane intrinsics round each product, then subtract, as the
    scalar loops do), so the lane form is the scalar form; what changes is that each
    operation is one vector instruction for ``L`` matrices, and the triangular solves' chains
    of dependent divisions are shared by ``L`` matrices instead of run one after another.  A
    lane whose pivot is ``<= 0`` or NaN carries on with NaN (``ok = 0``, ``lambda_min = nan``),
    the other lanes unaffected.
    """
    n = A64.shape[1]
    L = _LANES64
    good = np.ones(L, dtype=np.bool_)
    piv = np.full(L, np.inf)
    y = np.empty(L)
    inv = np.zeros(L)
    for i in range(n):
        for j in range(i, n):
            q = (i * n + j) * L
            for l in range(cnt):
                U[q + l] = A64[b0 + l, i, j]
            for l in range(cnt, L):
                U[q + l] = 1.0 if i == j else 0.0
        for l in range(cnt):
            U[(i * n + i) * L + l] += shift[l]
    for i in range(n):  # left-looking: row i downdated by rows 0..i-1 in order (_row_downdate)
        ii = (i * n + i) * L
        j = i
        while j < n:
            vecs = min(_DOWNDATE_VECS, n - j)
            _lanes_downdate(U, i, n, j, vecs)
            j += vecs
        for l in range(L):
            d = U[ii + l]
            if d > 0.0:
                y[l] = 1.0 / np.sqrt(d)
            else:
                good[l] = False
                y[l] = np.nan
        _lanes_mul(U, ii, y, 0, n - i)
        for l in range(L):
            p = U[ii + l] * U[ii + l]
            if p < piv[l]:
                piv[l] = p
    for i in range(n):
        for l in range(L):
            v[i * L + l] = v0[i]
    for _ in range(n_inverse):
        _norm2_lanes(v, n, y)
        for i in range(n):
            _lanes_div(v, i * L, y, 0, 1)
        for j in range(n):  # forward: L y = v (v is overwritten)
            _lanes_div(v, j * L, U, (j * n + j) * L, 1)
            for l in range(L):
                w[j * L + l] = v[j * L + l]
            _lanes_axpy(v, (j + 1) * L, L, U, (j * n + j + 1) * L, L, v, j * L, n - j - 1)
        for i in range(n - 1, -1, -1):  # backward: L^T x = y (each w[k], k < i, updated once per i)
            _lanes_div(w, i * L, U, (i * n + i) * L, 1)
            _lanes_axpy(w, 0, L, U, i * L, n * L, w, i * L, i)
        _norm2_lanes(w, n, inv)
        for i in range(n * L):
            v[i] = w[i]
    pv = np.empty(n)
    pw = np.empty(n)
    for l in range(cnt):
        o = out[b0 + l]
        o[0] = 1.0 if good[l] else 0.0
        o[2] = _power_one(A64[b0 + l], n_power, pv, pw) if n_power > 0 else 0.0
        if good[l]:
            est = 1.0 / inv[l] if inv[l] > 0.0 else piv[l]
            o[1] = min(est, piv[l]) - shift[l]
        else:
            o[1] = np.nan


@jit(parallel=True)
def _psd_probe(A, shift, n_inverse, n_power, out):
    """:func:`_psd_probe_one` for every matrix (``out`` of shape ``(nb, 3)``), one per thread.

    Cost: ``n^3/3 + (n_inverse + n_power) 2 n^2`` flops per matrix.
    """
    v0 = np.empty(A.shape[1])
    _inverse_start(v0)
    for b in prange(A.shape[0]):
        _psd_probe_one(A[b], shift[b], n_inverse, n_power, v0, out[b])


@jit
def _psd_probe_serial(A, shift, n_inverse, n_power, out):
    """:func:`_psd_probe` in batch order (a single matrix: no thread pool)."""
    v0 = np.empty(A.shape[1])
    _inverse_start(v0)
    for b in range(A.shape[0]):
        _psd_probe_one(A[b], shift[b], n_inverse, n_power, v0, out[b])


# hand-written products below this size, BLAS (np.dot) from it on: the per-call overhead of
# BLAS dominates tiny matrices (the crossover: analysis/results/newton_schulz.md)
SMALL_N = 6


@jit
def _mm(A, B, C):
    """``C = A @ B`` for square C-contiguous matrices: i-k-j loops for ``n <= SMALL_N``
    (vectorisable without reassociation), BLAS otherwise."""
    n = A.shape[0]
    if n > SMALL_N:
        np.dot(A, B, C)
        return
    for i in range(n):
        for j in range(n):
            C[i, j] = 0.0
        for k in range(n):
            a = A[i, k]
            for j in range(n):
                C[i, j] += a * B[k, j]


# ---------------------------------------------------------------- register-blocked products
# The products of the fused iteration run on zero-padded C-contiguous buffers: columns padded
# to a multiple of one 64-byte vector (16 float32 / 8 float64 lanes), rows to a multiple of
# TILE_ROWS.  The leading n x n block of a product reads only the leading blocks of its
# operands (k < n), so it is the product whatever finite values the padding holds: the
# general iteration keeps it zero, the fixed-count one (_coupled_fixed_one) lets it run.
TILE_ROWS = 4


# register tiles: 8 rows by one or two vectors for narrow matrices, else 6 rows by up to four
# vectors (at most 24 of AVX-512's 32 registers as accumulators: enough independent chains to
# cover the latency of fma); a last block of TILE_ROWS rows, overlapping the one before when
# the rows are not a multiple (recomputed rows get the same values)
_NARROW_ROWS = 8
_WIDE_ROWS = 6
_WIDE_VECS = 4


@intrinsic
def _mm_tiles(typingctx, A, B, C, k_end, alpha):
    """An intrinsic ``_mm_tiles(A, B, C, k_end, alpha)``: ``C = alpha * (A[:, :k_end] @ B[:k_end])``
    for C-contiguous 2-D arrays of one float dtype, ``C`` apart from ``A`` and ``B``, whose rows
    are whole 64-byte vectors and whose row count is a multiple of :data:`TILE_ROWS` (the
    padded buffers of :func:`_padded_shape`); no bounds checks.  Every entry is the same
    ``k``-ordered fma chain, rounded, then scaled, whatever its tile (``alpha = 1``: exact).

    One intrinsic for the whole product, tiles and loops inlined where it is called: a Numba
    call per product (array arguments reference-counted) costs as much as a small tile.
    Written at the LLVM level because neither of LLVM's vectorisers keeps loop-carried
    accumulators of Numba code in vector registers.
    """
    def codegen(context, builder, signature, args):
        arrays = [context.make_array(t)(context, builder, v) for t, v in zip(signature.args[:3], args[:3])]
        kend = args[3]
        lanes, vty, fma = _vector_fma(context, builder, signature.args[0].dtype)
        undef = ir.Constant(vty, ir.Undefined)
        splat = ir.Constant(ir.VectorType(_I32, lanes), [ir.Constant(_I32, 0)] * lanes)
        alpha = context.cast(builder, args[4], signature.args[4], signature.args[0].dtype)
        alpha = builder.shuffle_vector(builder.insert_element(undef, alpha, ir.Constant(_I32, 0)), undef, splat)
        datas = tuple(arr.data for arr in arrays)
        lds = tuple(cgutils.unpack_tuple(builder, arr.shape, 2)[1] for arr in arrays)
        rows = cgutils.unpack_tuple(builder, arrays[2].shape, 2)[0]
        cols = lds[2]
        idx = cols.type

        def const(v):
            return ir.Constant(idx, v)

        def tile(i0, j0, r, v):
            _emit_tile(builder, fma, vty, datas, lds, i0, j0, kend, alpha, r, v)

        nv = builder.udiv(cols, const(lanes))

        def block(i0, r):  # rows i0 .. i0 + r, every column: four-vector tiles, then the rest
            _emit_row_block(builder, i0, r, nv, lanes, tile, _WIDE_VECS)

        with builder.if_else(builder.icmp_unsigned("<=", nv, const(2))) as (narrow, wide):
            with narrow:
                _emit_narrow_rows(builder, rows, nv, tile, _NARROW_ROWS, TILE_ROWS)
            with wide:
                with cgutils.for_range(builder, builder.udiv(rows, const(_WIDE_ROWS))) as loop:
                    block(builder.mul(loop.index, const(_WIDE_ROWS)), _WIDE_ROWS)
                with builder.if_then(builder.icmp_unsigned("!=", builder.urem(rows, const(_WIDE_ROWS)), const(0))):
                    block(builder.sub(rows, const(TILE_ROWS)), TILE_ROWS)
        return context.get_dummy_value()

    return types.void(A, B, C, k_end, alpha), codegen


@jit
def _padded_shape(n, itemsize):
    """``(rows, cols)`` of the padded buffer of an ``n x n`` matrix (see :func:`_mm_padded`)."""
    lanes = _VECTOR_BYTES // itemsize
    return -(-n // TILE_ROWS) * TILE_ROWS, -(-n // lanes) * lanes


@jit
def _mm_padded(A, B, C, n):
    """``C = A[:, :n] @ B[:n]`` on padded buffers (:func:`_padded_shape`, one dtype; the tiled
    :func:`_mm_tiles`)."""
    _mm_tiles(A, B, C, n, 1.0)


@jit
def _sum_squares(row, lo, hi):
    """``sum(row[lo:hi]**2)`` in float64 with four independent chains (a reduction cannot be
    vectorised without reassociation; independent chains keep the pipeline busy)."""
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    j = lo
    while j + 3 < hi:
        v0 = float(row[j])
        v1 = float(row[j + 1])
        v2 = float(row[j + 2])
        v3 = float(row[j + 3])
        s0 += v0 * v0
        s1 += v1 * v1
        s2 += v2 * v2
        s3 += v3 * v3
        j += 4
    while j < hi:
        v = float(row[j])
        s0 += v * v
        j += 1
    return (s0 + s1) + (s2 + s3)


@jit
def _fro_minus_identity(M):
    """``||M - I||_F`` accumulated in float64."""
    n = M.shape[0]
    s = 0.0
    for i in range(n):
        d = float(M[i, i]) - 1.0
        s += _sum_squares(M[i], 0, i) + d * d + _sum_squares(M[i], i + 1, n)
    return np.sqrt(s)


@jit
def _residual_one(Z, Y0_64, R1, R2):
    """``||Z Z Y_0 - I||_F`` in float64 (the Fig. 7 metric ``||D D A - I||_F``)."""
    Z64 = Z.astype(np.float64)
    _mm(Z64, Z64, R1)
    _mm(R1, Y0_64, R2)
    return _fro_minus_identity(R2)


@jit
def _coupled_ns_one(Y0, Y0_64, coefs, n_max, k_last, record, stop_early, tol,
                    Z_out, Y_out, hist, info_i, info_f):
    """Coupled Newton–Schulz (Higham 2008, Eq. 6.35) on one matrix, all steps fused.

    Step ``k``: ``M = Z Y``, ``T = a_k I + b_k M + c_k M^2``, ``Y <- Y T``, ``Z <- T Z`` with
    ``(a_k, b_k, c_k) = coefs[k]`` (working dtype, ``n_max`` rows; the classic step is
    ``(3/2, -1/2, 0)``).  Step 0 uses ``Z_0 = I`` (``M = Y_0``, ``Z_1 = T``: two products
    saved, bit-identical).  The iterates live in zero-padded buffers and every product is
    the register-blocked :func:`_mm_tiles` (no BLAS call per product).

    ``record`` stores the float64 residual ``r_k = ||Z_k Z_k Y_0 - I||_F`` of every iterate
    in ``hist[k-1]``.  ``stop_early`` stops the matrix at the first iterate whose free
    by-product ``rho_k = ||Z_k Y_k - I||_F`` (``M`` of the next step, equal to ``r_k`` in
    exact arithmetic) is ``<= tol`` or has stagnated at the rounding floor
    (:mod:`nsiter._policy`), provided ``r_k`` confirms it (``r_k <= tol``, or stagnation); when ``r_k``
    disagrees, the decisions switch to ``r_k`` from then on.  The decisions do not depend
    on ``record``.  Divergence (:mod:`nsiter._policy`): non-finite, too large a growth over the best value;
    the best iterate is then returned (when the divergence shows in the by-product, no
    copy exists: the iteration stops, ``diverged`` is set and the caller reruns the matrix
    with ``record``).  Otherwise the iterate returned is the one the matrix stopped at
    (or the last).  ``k_last`` (``0``: none) is the predicted last
    iterate: there ``Z`` is formed first and ``r_k`` evaluated directly; when ``r_k <= tol``
    the matrix stops without forming ``Y`` (``Y_out`` then holds the previous ``Y``).

    ``info_i = [iterations run, returned iteration (1-based), diverged]``,
    ``info_f = [residual r of the returned iterate]`` (``nan`` when not evaluated).
    """
    n = Y0.shape[0]
    shape = _padded_shape(n, Y0.itemsize)  # every product on zero-padded buffers
    Y = np.zeros(shape, dtype=Y0.dtype)
    Z = np.zeros(shape, dtype=Y0.dtype)
    for i in range(n):
        Z[i, i] = 1.0
        for j in range(n):
            Y[i, j] = Y0[i, j]
    M = np.zeros(shape, dtype=Y0.dtype)
    T = np.zeros(shape, dtype=Y0.dtype)
    W = np.zeros(shape, dtype=Y0.dtype)
    Zb = Z.copy()
    Yb = Y.copy()
    R1 = np.empty((n, n))
    R2 = np.empty((n, n))
    big = BLOWUP_SQRT_N * np.sqrt(n)
    use_metric = False  # stop decisions on r_k instead of rho_k
    best = np.inf  # best by-product rho_k (decisions in by-product mode)
    best_m = np.inf  # best float64 residual r_k seen (record / metric mode); iterate in Zb, Yb
    best_mk = 0
    best_r = np.nan
    prev = np.inf
    best_k = 0
    diverged = False
    done = 0
    restore = False
    stopped = False
    r = np.nan
    for k in range(n_max):
        if k == 0:
            for i in range(n):
                for j in range(n):
                    M[i, j] = Y[i, j]
        else:
            _mm_tiles(Z, Y, M, n, 1.0)
        if stop_early and k >= 1 and not use_metric:
            rho = _fro_minus_identity(M[:n, :n])  # residual of iterate k, for free
            if not np.isfinite(rho) or rho > BLOWUP_GROWTH * best or rho > big:
                # without ``record`` no copies are kept: the caller reruns with ``record``
                diverged = True
                restore = record
                best_k = k
                break
            if rho < best:
                best = rho
            stag = rho < STAGNATION_BELOW and rho > STAGNATION_RATIO * prev
            prev = rho
            if rho <= tol or stag:
                if not record:
                    r = _residual_one(Z[:n, :n], Y0_64, R1, R2)
                if r <= tol or stag:
                    best_r = r
                    best_k = k
                    stopped = True
                    break
                # the by-product passed but the metric did not: decide on the metric
                # (the best-iterate record restarts here, with or without ``record``)
                use_metric = True
                prev = r
                best_m = r
                best_mk = k
                Zb[:, :] = Z
                Yb[:, :] = Y
        a = coefs[k, 0]
        b = coefs[k, 1]
        c = coefs[k, 2]
        if c != 0.0:
            _mm_tiles(M, M, T, n, 1.0)
            for i in range(n):
                for j in range(n):
                    T[i, j] = c * T[i, j] + b * M[i, j]
        else:
            for i in range(n):
                for j in range(n):
                    T[i, j] = b * M[i, j]
        for i in range(n):
            T[i, i] += a
        if k == 0:
            for i in range(n):
                for j in range(n):
                    Z[i, j] = T[i, j]
        else:
            _mm_tiles(T, Z, W, n, 1.0)
            Z, W = W, Z
        done = k + 1
        if record or use_metric or (stop_early and done == k_last):
            r = _residual_one(Z[:n, :n], Y0_64, R1, R2)
            if record:
                hist[k] = r
            if stop_early and done == k_last and not use_metric and r <= tol:
                # the predicted last step: accepted without updating Y (one product saved)
                best_r = r
                best_k = done
                stopped = True
                break
        _mm_tiles(Y, T, W, n, 1.0)
        Y, W = W, Y
        if record or use_metric:
            finite = np.isfinite(r)
            if finite and r < best_m:
                best_m = r
                best_mk = done
                Zb[:, :] = Z
                Yb[:, :] = Y
            if use_metric or not stop_early:
                if not finite or r > BLOWUP_GROWTH * best_m or r > big:
                    diverged = True
            if use_metric:
                if diverged or r <= tol or (r < STAGNATION_BELOW and r > STAGNATION_RATIO * prev):
                    restore = not (r <= tol)
                    if not restore:
                        best_k = done
                        best_r = r
                    stopped = True
                    break
                prev = r
    if restore or (diverged and record and not stop_early):
        Z_out[:, :] = Zb[:n, :n]
        Y_out[:, :] = Yb[:n, :n]
        best_k = best_mk
        best_r = best_m
    else:
        Z_out[:, :] = Z[:n, :n]
        Y_out[:, :] = Y[:n, :n]
        if not stopped and not diverged:
            # fixed count, or the cap was reached: the last iterate
            best_k = done
            if record:
                best_r = r
            elif stop_early:
                best_r = _residual_one(Z[:n, :n], Y0_64, R1, R2)
            else:
                best_r = np.nan
    info_i[0] = done
    info_i[1] = best_k
    info_i[2] = 1 if diverged else 0
    info_f[0] = best_r


@jit(parallel=True)
def _coupled_ns_parallel(Y0, Y0_64, coefs, n_max, k_last, record, stop_early, tol,
                         Z_out, Y_out, hist, info_i, info_f):
    """:func:`_coupled_ns_one` over the batch (``coefs[b]`` per matrix), one matrix per thread."""
    for b in prange(Y0.shape[0]):
        _coupled_ns_one(Y0[b], Y0_64[b], coefs[b], n_max, k_last[b], record, stop_early, tol,
                        Z_out[b], Y_out[b], hist[b], info_i[b], info_f[b])


@jit
def _coupled_ns_serial(Y0, Y0_64, coefs, n_max, k_last, record, stop_early, tol,
                       Z_out, Y_out, hist, info_i, info_f):
    """:func:`_coupled_ns_one` over the batch in order (large ``n``: BLAS threads instead)."""
    for b in range(Y0.shape[0]):
        _coupled_ns_one(Y0[b], Y0_64[b], coefs[b], n_max, k_last[b], record, stop_early, tol,
                        Z_out[b], Y_out[b], hist[b], info_i[b], info_f[b])


@jit
def _coupled_fixed_one(A64, c, s, want_sqrt, coefs, n_max, out):
    """:func:`_coupled_ns_one` with a fixed count (no residual, no decision) from ``Y_0 = A64 / c``
    to ``out`` as :func:`_coupled_solve_one` forms it; returns whether the last ``Z`` is finite.

    The same products in the same order, so the same bits, with less work around them: the
    classic step's ``T = b M + a I`` stored by the product ``Z Y`` itself
    (:func:`_mm_tiles` with ``alpha = b``), ``Z_1 = T`` without a copy, no ``Y`` update after the last
    step for the inverse root, the result read from the padded buffers.  The buffers' padding
    is finite but not zero: the leading ``n x n`` block of each product never reads it.
    """
    n = A64.shape[0]
    rows, cols = _padded_shape(n, out.itemsize)
    quadratic = False
    for k in range(n_max):
        if coefs[k, 2] != 0.0:
            quadratic = True
    buf = np.empty((5 if quadratic else 4, rows, cols), dtype=out.dtype)
    Y = buf[0]
    Z = buf[1]
    T = buf[2]
    W = buf[3]
    M = buf[4] if quadratic else buf[3]
    cw = np.empty(1, dtype=out.dtype)
    cw[0] = c
    cv = cw[0]  # c rounded to the working dtype, held in a register (a load from cw could alias Y)
    for i in range(rows):  # Y_0 = A64 / c, rounded as _initial rounds it; zero padding
        yrow = Y[i]
        if i < n:
            arow = A64[i]
            for j in range(n):
                yrow[j] = arow[j]
                yrow[j] = yrow[j] / cv
            for j in range(n, cols):
                yrow[j] = 0.0
        else:
            for j in range(cols):
                yrow[j] = 0.0
    for k in range(n_max):
        a = coefs[k, 0]
        b = coefs[k, 1]
        q = coefs[k, 2]
        need_y = want_sqrt or k < n_max - 1
        if k == 0:  # M = Y_0, Z_1 = T
            if q != 0.0:
                _mm_tiles(Y, Y, T, n, 1.0)
                for i in range(rows):
                    trow = T[i]
                    yrow = Y[i]
                    for j in range(cols):
                        trow[j] = q * trow[j] + b * yrow[j]
            else:
                for i in range(rows):
                    trow = T[i]
                    yrow = Y[i]
                    for j in range(cols):
                        trow[j] = b * yrow[j]
            for i in range(n):
                T[i, i] += a
            Z, T = T, Z
            if need_y:
                _mm_tiles(Y, Z, W, n, 1.0)
                Y, W = W, Y
            continue
        if q != 0.0:
            _mm_tiles(Z, Y, M, n, 1.0)
            _mm_tiles(M, M, T, n, 1.0)
            for i in range(rows):
                trow = T[i]
                mrow = M[i]
                for j in range(cols):
                    trow[j] = q * trow[j] + b * mrow[j]
        else:
            _mm_tiles(Z, Y, T, n, b)
        for i in range(n):
            T[i, i] += a
        _mm_tiles(T, Z, W, n, 1.0)
        Z, W = W, Z
        if need_y:
            _mm_tiles(Y, T, W, n, 1.0)
            Y, W = W, Y
    f = np.sqrt(c) * np.sqrt(s)  # as in _coupled_solve_one
    g = 1.0 / f
    finite = True
    for i in range(n):
        zrow = Z[i]
        orow = out[i]
        for j in range(n):
            if not np.isfinite(zrow[j]):
                finite = False
        if want_sqrt:
            yrow = Y[i]
            for j in range(n):
                orow[j] = float(yrow[j]) * f
        else:
            for j in range(n):
                orow[j] = float(zrow[j]) * g
    return finite


@jit
def _coupled_solve_one(A64, c, s, want_sqrt, coefs, n_max, k_last, record, stop_early, tol,
                       out, hist, info_i, info_f):
    """:func:`_coupled_ns_one` from ``A = s A64`` to the result, in one pass per matrix.

    ``Y_0 = A64 / c`` is formed here as the driver's ``_initial`` forms it (in the working
    dtype of ``out``: entries rounded to it, then divided by ``c`` rounded to it; its float64
    twin only when a residual is evaluated), and ``out = Z (1 / (sqrt(c) sqrt(s)))`` or
    ``Y (sqrt(c) sqrt(s))`` (``want_sqrt``) as ``_finish`` forms it (in float64, rounded once
    to the working dtype): bit-identical to the three separate passes, without their batch
    temporaries.  ``info_i[3] = 1`` when the returned ``Z`` is finite.  A fixed count (neither
    ``record`` nor ``stop_early``) takes :func:`_coupled_fixed_one`.
    """
    n = A64.shape[0]
    hist[:] = np.nan  # the steps not taken (or not recorded) stay unset
    if not (record or stop_early):
        info_i[0] = n_max
        info_i[1] = n_max
        info_i[2] = 0
        info_f[0] = np.nan
        info_i[3] = 1 if _coupled_fixed_one(A64, c, s, want_sqrt, coefs, n_max, out) else 0
        return
    Y0 = np.empty((n, n), dtype=out.dtype)
    cw = np.empty(1, dtype=out.dtype)
    cw[0] = c
    cv = cw[0]
    for i in range(n):
        for j in range(n):
            Y0[i, j] = A64[i, j]
            Y0[i, j] = Y0[i, j] / cv
    if record or stop_early:
        Y0_64 = np.empty((n, n))
        for i in range(n):
            for j in range(n):
                Y0_64[i, j] = A64[i, j] / c
    else:
        Y0_64 = np.empty((0, 0))
    Z = np.empty_like(Y0)
    Y = np.empty_like(Y0)
    _coupled_ns_one(Y0, Y0_64, coefs, n_max, k_last, record, stop_early, tol, Z, Y, hist, info_i, info_f)
    f = np.sqrt(c) * np.sqrt(s)  # sqrt(s) is a power of two: f is sqrt(c) scaled exactly
    g = 1.0 / f  # the inverse root multiplies by 1/f (as _finish does): a product per entry, not a division
    finite = True
    for i in range(n):
        for j in range(n):
            z = Z[i, j]
            if not np.isfinite(z):
                finite = False
            out[i, j] = float(Y[i, j]) * f if want_sqrt else float(z) * g
    info_i[3] = 1 if finite else 0


@jit(parallel=True)
def _coupled_solve_parallel(A64, c, s, want_sqrt, coefs, n_max, k_last, record, stop_early, tol,
                            out, hist, info_i, info_f):
    """:func:`_coupled_solve_one` over the batch, one matrix per thread."""
    for b in prange(A64.shape[0]):
        _coupled_solve_one(A64[b], c[b], s[b], want_sqrt, coefs[b], n_max, k_last[b], record, stop_early, tol,
                           out[b], hist[b], info_i[b], info_f[b])


@jit
def _coupled_solve_serial(A64, c, s, want_sqrt, coefs, n_max, k_last, record, stop_early, tol,
                          out, hist, info_i, info_f):
    """:func:`_coupled_solve_one` over the batch in order (a single matrix: no thread pool)."""
    for b in range(A64.shape[0]):
        _coupled_solve_one(A64[b], c[b], s[b], want_sqrt, coefs[b], n_max, k_last[b], record, stop_early, tol,
                           out[b], hist[b], info_i[b], info_f[b])


@jit
def _pipeline_shift(rel, stats):
    """The probe's shift ``delta = rel ||A64||_F`` (1 for the zero matrix), as ``_delta`` forms it."""
    fro = stats[3]
    return rel * fro if fro > 0.0 else 1.0


@jit
def _pipeline_solve(A64, stats, probe, spectral, want_sqrt, coefs, n_max, record, stop_early, tol, asym_rel, sing_rel,
                    c_out, out, hist, info_i, info_f):
    """The scaling ``c`` (``"fro"``: ``||A64||_F``; ``spectral``: the power estimate kept within
    ``[||A64||_F / sqrt(n), ||A64||_F]``; 1 where it is 0: the driver's ``_scale``) into
    ``c_out[0]``, and :func:`_coupled_solve_one` unless the matrix has a non-finite entry or
    failed its Cholesky (the driver raises for it).

    ``info_i[4] = 1`` when nothing about the matrix makes the driver raise, warn or rerun:
    finite entries, ``max|a_ij - a_ji| <= asym_rel max|a_ij|``, a Cholesky that succeeded, a
    finite result that did not diverge, and for the inverse root ``||A||_F > 0`` and
    ``lambda_min s > (sing_rel ||A64||_F) s`` (not numerically singular).  These are the
    driver's own tests, the same floating-point operations on the same values, so that a batch
    of clean matrices can skip them.
    """
    n = A64.shape[0]
    fro = stats[3]
    c = fro
    if spectral:
        c = min(max(probe[2], fro / np.sqrt(n)), fro)
    if not (c > 0.0):
        c = 1.0
    c_out[0] = c
    if stats[0] > 0.0 and probe[0] > 0.0:
        _coupled_solve_one(A64, c, stats[5], want_sqrt, coefs, n_max, 0, record, stop_early, tol,
                           out, hist, info_i[:4], info_f)
        s = stats[5]
        clean = not (stats[2] > asym_rel * stats[1]) and info_i[3] == 1 and info_i[2] == 0
        if not want_sqrt:
            clean = clean and fro > 0.0 and not (probe[1] * s <= (sing_rel * fro) * s)
        info_i[4] = 1 if clean else 0
    else:
        info_i[:] = 0
        info_f[0] = np.nan
        hist[:] = np.nan


@jit
def _coupled_pipeline_two(A, b, width, eps, rel, n_inverse, n_power, v0, spectral, want_sqrt, coefs, n_max, record,
                          stop_early, tol, asym_rel, sing_rel, A64, stats, probe, c, out, hist, info_i, info_f):
    """:func:`_prepare_one`, the probe and :func:`_coupled_solve_one` on matrix ``b``, and on
    ``b + 1`` too when ``width == 2`` and it exists (two probes in lockstep:
    :func:`_psd_probe_pair`), or on ``b .. b + L - 1`` when ``width`` is ``L`` = :data:`_LANES64`
    (their probes in the lanes of one vector: :func:`_psd_probe_lanes`).

    The probe's shift (:func:`_pipeline_shift`) and the scaling (:func:`_pipeline_solve`) are
    formed as the driver forms them, and every output of the three kernels is kept, so that
    the driver checks, raises and warns from them as after three calls.
    """
    end = min(b + width, A.shape[0])
    if width == _LANES64:
        n = A.shape[1]
        shift = np.empty(_LANES64)
        for i in range(b, end):
            _prepare_one(A[i], eps, A64[i], stats[i])
            shift[i - b] = _pipeline_shift(rel, stats[i])
        _psd_probe_lanes(A64, b, end - b, shift, n_inverse, n_power, v0, probe, np.empty(n * n * _LANES64),
                         np.empty(n * _LANES64), np.empty(n * _LANES64))
        for i in range(b, end):
            _pipeline_solve(A64[i], stats[i], probe[i], spectral, want_sqrt, coefs, n_max, record, stop_early, tol,
                            asym_rel, sing_rel, c[i:i + 1], out[i], hist[i], info_i[i], info_f[i])
        return
    _prepare_one(A[b], eps, A64[b], stats[b])
    if end == b + 2:
        _prepare_one(A[b + 1], eps, A64[b + 1], stats[b + 1])
        _psd_probe_pair(A64[b], A64[b + 1], _pipeline_shift(rel, stats[b]), _pipeline_shift(rel, stats[b + 1]),
                        n_inverse, n_power, v0, probe[b], probe[b + 1])
    else:
        _psd_probe_one(A64[b], _pipeline_shift(rel, stats[b]), n_inverse, n_power, v0, probe[b])
    for i in range(b, end):
        _pipeline_solve(A64[i], stats[i], probe[i], spectral, want_sqrt, coefs, n_max, record, stop_early, tol,
                        asym_rel, sing_rel, c[i:i + 1], out[i], hist[i], info_i[i], info_f[i])


@jit
def _count_clean(info_i):
    """How many matrices the pipeline found clean (``info_i[:, 4]``)."""
    count = 0
    for i in range(info_i.shape[0]):
        count += info_i[i, 4]
    return count


@jit(parallel=True)
def _coupled_pipeline_parallel(A, width, eps, rel, n_inverse, n_power, spectral, want_sqrt, coefs, n_max, record,
                               stop_early, tol, asym_rel, sing_rel, A64, stats, probe, c, out, hist, info_i, info_f):
    """:func:`_coupled_pipeline_two` over the batch, ``width`` (1, 2 or L) matrices per thread at a
    time: one parallel region (``coefs (n_max, 3)``, one step for every matrix, no ``k_last``).
    Returns the number of clean matrices (``info_i[:, 4]``, :func:`_pipeline_solve`)."""
    v0 = np.empty(A.shape[1])
    _inverse_start(v0)
    for p in prange((A.shape[0] + width - 1) // width):
        _coupled_pipeline_two(A, width * p, width, eps, rel, n_inverse, n_power, v0, spectral, want_sqrt, coefs,
                              n_max, record, stop_early, tol, asym_rel, sing_rel, A64, stats, probe, c, out, hist,
                              info_i, info_f)
    return _count_clean(info_i)


@jit
def _coupled_pipeline_serial(A, width, eps, rel, n_inverse, n_power, spectral, want_sqrt, coefs, n_max, record,
                             stop_early, tol, asym_rel, sing_rel, A64, stats, probe, c, out, hist, info_i, info_f):
    """:func:`_coupled_pipeline_parallel` in batch order (a single matrix: no thread pool)."""
    v0 = np.empty(A.shape[1])
    _inverse_start(v0)
    for b in range(0, A.shape[0], width):
        _coupled_pipeline_two(A, b, width, eps, rel, n_inverse, n_power, v0, spectral, want_sqrt, coefs, n_max,
                              record, stop_early, tol, asym_rel, sing_rel, A64, stats, probe, c, out, hist, info_i,
                              info_f)
    return _count_clean(info_i)


@jit
def _eigh_power_one(a, power, out, lam_out):
    """``out = V diag(lambda^power) V^T`` from LAPACK ``eigh`` of ``a`` (float64);
    eigenvalues ``<= 0`` contribute 0; ``lam_out`` gets them (ascending).

    Computed as ``W W^T`` with ``W = V diag(lambda^(power/2))``: symmetric to the last bit,
    and one power per eigenvalue (not per entry).
    """
    n = a.shape[0]
    lam, V = np.linalg.eigh(a)
    lam_out[:] = lam
    s = np.empty(n)
    for j in range(n):
        s[j] = lam[j] ** (0.5 * power) if lam[j] > 0.0 else 0.0
    W = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            W[i, j] = V[i, j] * s[j]
    np.dot(W, np.ascontiguousarray(W.T), out)


@jit(parallel=True)
def _eigh_power(A, power, out, lam_out):
    """:func:`_eigh_power_one` for every matrix, one per thread."""
    for b in prange(A.shape[0]):
        _eigh_power_one(A[b], power, out[b], lam_out[b])


@jit
def _eigh_power_serial(A, power, out, lam_out):
    """:func:`_eigh_power_one` in batch order."""
    for b in range(A.shape[0]):
        _eigh_power_one(A[b], power, out[b], lam_out[b])


@jit
def _abs_max(a):
    """``(max|a_ij|, all finite)`` of a C-contiguous float32/float64 matrix from the bits of its
    entries: with the sign bit cleared, the order of IEEE values is that of unsigned integers,
    infinities and NaNs above every finite value, so one integer max (order-free: LLVM
    vectorises it without fastmath) gives both."""
    if a.itemsize == 4:
        bits = a.view(np.uint32).reshape(a.size)
        top = np.uint32(0)
        for i in range(bits.shape[0]):
            top = max(top, bits[i] & np.uint32(0x7FFFFFFF))
        box = np.empty(1, dtype=np.uint32)
        box[0] = top
        return float(box.view(np.float32)[0]), top < np.uint32(0x7F800000)
    bits = a.view(np.uint64).reshape(a.size)
    top = np.uint64(0)
    for i in range(bits.shape[0]):
        top = max(top, bits[i] & np.uint64(0x7FFFFFFFFFFFFFFF))
    box = np.empty(1, dtype=np.uint64)
    box[0] = top
    return float(box.view(np.float64)[0]), top < np.uint64(0x7FF0000000000000)


@jit
def _prepare_one(a, eps, out, stats):
    """``out = ((a + a^T)/2 + eps I) / s`` in float64 with ``s = 4^k`` the power of four that
    brings ``max(max|a_ij|, eps)`` into ``[1, 4)``, and
    ``stats = [all finite, max|a_ij|, max|a_ij - a_ji|, ||out||_F, ||out||_inf, s]``.

    Dividing by a power of four is exact and keeps ``sqrt(s) = 2^k`` exact, so norms and
    products of ``out`` can neither overflow nor underflow at any representable scale (the
    scaling LAPACK's ``nrm2`` does), and results scale back exactly.  Passes over ``a``:
    ``max|a_ij|`` and the finiteness check (:func:`_abs_max`); ``a^T`` into ``out``; then, by
    rows, the scaled symmetric part, ``max|a_ij - a_ji|`` and the per-column sums of squares and
    magnitudes, elementwise across the row (vectorised, no loop-carried reduction).  (With a
    non-finite entry, which the driver rejects, ``max|a_ij|`` and ``max|a_ij - a_ji|`` are
    unspecified.)
    """
    n = a.shape[0]
    amax, finite = _abs_max(a)
    scale = 1.0
    top = max(amax, eps)
    if finite and top > 0.0:
        e = math.frexp(top)[1]  # top = f 2^e, f in [1/2, 1)
        scale = math.ldexp(1.0, 2 * ((e - 1) // 2))
    # multiplying by the reciprocal of a power of two is the division, bit for bit, where
    # the reciprocal is representable (all but the subnormal scales)
    inv = 1.0 / scale
    exact = inv < np.inf
    ridge = eps / scale
    for i in range(n):  # out = a^T first: the second pass then reads both by rows
        for j in range(n):
            out[i, j] = a[j, i]
    am = np.zeros(n)
    for i in range(n):
        ai = a[i]
        oi = out[i]
        for j in range(n):
            x = float(ai[j])
            y = oi[j]
            d = abs(x - y)
            am[j] = d if d > am[j] else am[j]
            v = (x + y) * 0.5
            h = x * 0.5 + y * 0.5  # |a_ij + a_ji| above the largest float: halve first
            v = v if abs(v) <= _DBL_MAX else h
            oi[j] = v * inv if exact else v / scale
        oi[i] += ridge
    sq = np.zeros(n)
    col = np.zeros(n)
    for i in range(n):
        oi = out[i]
        for j in range(n):
            sq[j] += oi[j] * oi[j]
            col[j] += abs(oi[j])
    fro2 = 0.0
    for j in range(n):
        fro2 += sq[j]
    stats[0] = 1.0 if finite else 0.0
    stats[1] = amax
    stats[2] = np.max(am) if n > 0 else 0.0
    stats[3] = np.sqrt(fro2)
    stats[4] = np.max(col) if n > 0 else 0.0  # column sums: the row sums of the symmetric out
    stats[5] = scale


@jit(parallel=True)
def _prepare(A, eps, out, stats):
    """:func:`_prepare_one` for every matrix, one per thread."""
    for b in prange(A.shape[0]):
        _prepare_one(A[b], eps, out[b], stats[b])


@jit
def _prepare_serial(A, eps, out, stats):
    """:func:`_prepare_one` in batch order (a single matrix: no thread pool to wake)."""
    for b in range(A.shape[0]):
        _prepare_one(A[b], eps, out[b], stats[b])
