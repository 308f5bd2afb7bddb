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

__all__ = [
    "_psd_probe", "_psd_probe_serial", "_spectrum_estimates_serial", "_coupled_ns_parallel", "_coupled_ns_serial",
    "_coupled_solve_parallel", "_coupled_solve_serial",
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
    pivot ``L_jj^2``).

    Both triangular solves are column oriented: contiguous ``axpy`` updates written as
    0-based loops over row views, the form LLVM vectorises (the forward solve on rows of
    ``U``, the backward one on rows of ``L``).
    """
    n = L.shape[0]
    min_pivot = np.inf
    for i in range(n):
        p = L[i, i] * L[i, i]
        if p < min_pivot:
            min_pivot = p
        v[i] = np.cos(2.3 * i + 0.7) + 0.25
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
            w[i] /= L[i, i]
            xi = w[i]
            lrow = L[i]
            for k in range(i):
                w[k] -= lrow[k] * xi
        inv_est = _norm2(w)
        for i in range(n):
            v[i] = w[i]
    est = 1.0 / inv_est if inv_est > 0.0 else min_pivot
    return min(est, min_pivot)


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


@jit
def _psd_probe_one(a, shift, n_inverse, n_power, out):
    """Right-looking Cholesky of ``a + shift I`` (trailing updates over contiguous rows,
    vectorisable) and the estimates of :func:`_power_one` / :func:`_inverse_one`.

    ``out = [ok, lambda_min estimate, lambda_max estimate]``; ``ok = 0`` when a pivot is
    ``<= 0`` or NaN: ``a`` has an eigenvalue below ``-shift`` (``lambda_min = nan``).
    """
    n = a.shape[0]
    U = np.empty((n, n))
    v = np.empty(n)
    w = np.empty(n)
    for i in range(n):  # the upper triangle of a + shift I
        urow = U[i, i:]
        arow = a[i, i:]
        for k in range(n - i):
            urow[k] = arow[k]
        U[i, i] += shift
    good = True
    for j in range(n):  # right-looking on the upper triangle: U^T U = a + shift I
        d = U[j, j]
        if not (d > 0.0):
            good = False
            break
        inv = 1.0 / np.sqrt(d)
        head = U[j, j:]
        for k in range(n - j):
            head[k] *= inv
        for i in range(j + 1, n):
            uji = U[j, i]
            row = U[i, i:]
            src = U[j, i:]
            for k in range(n - i):
                row[k] -= uji * src[k]
    out[0] = 1.0 if good else 0.0
    out[2] = _power_one(a, n_power, v, w) if n_power > 0 else 0.0
    if good:
        L = np.empty((n, n))
        for i in range(n):
            for k in range(i, n):
                L[k, i] = U[i, k]
        out[1] = _inverse_lu(L, U, n_inverse, v, w) - shift
    else:
        out[1] = np.nan


@jit(parallel=True)
def _psd_probe(A, shift, n_inverse, n_power, out):
    """:func:`_psd_probe_one` for every matrix (``out`` of shape ``(nb, 3)``), one per thread.

    Cost: ``n^3/3 + (n_inverse + n_power) 2 n^2`` flops per matrix.
    """
    for b in prange(A.shape[0]):
        _psd_probe_one(A[b], shift[b], n_inverse, n_power, out[b])


@jit
def _psd_probe_serial(A, shift, n_inverse, n_power, out):
    """:func:`_psd_probe` in batch order (a single matrix: no thread pool)."""
    for b in range(A.shape[0]):
        _psd_probe_one(A[b], shift[b], n_inverse, n_power, out[b])


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
# TILE_ROWS.  Zero padding is closed under the iteration's products and its entrywise steps on
# the leading n x n block, so the padding stays zero and the leading block is the product.
TILE_ROWS = 4
_VECTOR_BYTES = 64
_I32 = ir.IntType(32)


def _tile_product(rows, vecs):
    """An intrinsic ``tile(A, B, C, i0, j0, k_end)``: ``C[i0:i0+rows, j0:j0+vecs*L] =
    A[i0:i0+rows, :k_end] @ B[:k_end, j0:j0+vecs*L]`` (``L`` lanes of one 64-byte vector) for
    C-contiguous 2-D arrays of one float dtype, no bounds checks.

    ``rows x vecs`` accumulator vectors stay in registers over the whole ``k`` loop (one
    vector load per column block and one broadcast per row each step), each entry summed in
    ``k`` order with correctly rounded fused multiply-adds (``llvm.fma``, what BLAS does;
    not a fastmath flag).  Written at the LLVM level because neither of LLVM's vectorisers
    keeps loop-carried accumulators of Numba code in vector registers.
    """
    @intrinsic
    def tile(typingctx, A, B, C, i0, j0, k_end):
        sig = types.void(A, B, C, i0, j0, k_end)

        def codegen(context, builder, signature, args):
            a_arr, b_arr, c_arr = (context.make_array(t)(context, builder, v)
                                   for t, v in zip(signature.args[:3], args[:3]))
            i0v, j0v, kend = args[3], args[4], args[5]
            ety = context.get_value_type(signature.args[0].dtype)
            size = context.get_abi_sizeof(ety)
            lanes = _VECTOR_BYTES // size
            vty = ir.VectorType(ety, lanes)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty, vty, vty]),
                                                 f"llvm.fma.v{lanes}f{8 * size}")
            lda, ldb, ldc = (cgutils.unpack_tuple(builder, arr.shape, 2)[1] for arr in (a_arr, b_arr, c_arr))
            zero = ir.Constant(vty, [ir.Constant(ety, 0.0)] * lanes)
            undef = ir.Constant(vty, ir.Undefined)
            splat = ir.Constant(ir.VectorType(_I32, lanes), [ir.Constant(_I32, 0)] * lanes)
            idx = i0v.type
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(vecs)] for _ in range(rows)]
            a_rows = [builder.gep(a_arr.data, [builder.mul(builder.add(i0v, ir.Constant(idx, r)), lda)])
                      for r in range(rows)]
            with cgutils.for_range(builder, kend) as loop:
                k = loop.index
                brow = builder.gep(b_arr.data, [builder.add(builder.mul(k, ldb), j0v)])
                bs = [builder.load(builder.bitcast(builder.gep(brow, [ir.Constant(idx, v * lanes)]),
                                                   vty.as_pointer()), align=size) for v in range(vecs)]
                for r in range(rows):
                    a = builder.load(builder.gep(a_rows[r], [k]))
                    s = builder.shuffle_vector(builder.insert_element(undef, a, ir.Constant(_I32, 0)), undef, splat)
                    for v in range(vecs):
                        builder.store(builder.call(fma, [s, bs[v], builder.load(accs[r][v])]), accs[r][v])
            for r in range(rows):
                crow = builder.gep(c_arr.data, [builder.add(builder.mul(builder.add(i0v, ir.Constant(idx, r)), ldc),
                                                            j0v)])
                for v in range(vecs):
                    dst = builder.bitcast(builder.gep(crow, [ir.Constant(idx, v * lanes)]), vty.as_pointer())
                    builder.store(builder.load(accs[r][v]), dst, align=size)
            return context.get_dummy_value()

        return sig, codegen

    return tile


_tile_2v = _tile_product(TILE_ROWS, 2)
_tile_1v = _tile_product(TILE_ROWS, 1)


@jit
def _padded_shape(n, itemsize):
    """``(rows, cols)`` of the padded buffer of an ``n x n`` matrix (see :func:`_mm_padded`)."""
    lanes = _VECTOR_BYTES // itemsize
    return -(-n // TILE_ROWS) * TILE_ROWS, -(-n // lanes) * lanes


@jit
def _mm_padded(A, B, C, n):
    """``C = A[:, :n] @ B[:n]`` on padded buffers (:func:`_padded_shape`, one dtype): row tiles of
    :data:`TILE_ROWS`, column tiles of two vectors and a one-vector tail."""
    rows, cols = C.shape
    step = 2 * (_VECTOR_BYTES // C.itemsize)
    for i0 in range(0, rows, TILE_ROWS):
        j0 = 0
        while j0 + step <= cols:
            _tile_2v(A, B, C, i0, j0, n)
            j0 += step
        if j0 < cols:
            _tile_1v(A, B, C, i0, j0, n)


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
    the register-blocked :func:`_mm_padded` (no BLAS call per product).

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
            _mm_padded(Z, Y, M, n)
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
            _mm_padded(M, M, T, n)
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
            _mm_padded(T, Z, W, n)
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
        _mm_padded(Y, T, W, n)
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
def _coupled_solve_one(A64, c, s, want_sqrt, coefs, n_max, k_last, record, stop_early, tol,
                       out, hist, info_i, info_f):
    """:func:`_coupled_ns_one` from ``A = s A64`` to the result, in one pass per matrix.

    ``Y_0 = A64 / c`` is formed here as the driver's ``_initial`` forms it (in the working
    dtype of ``out``: entries rounded to it, then divided by ``c`` rounded to it; its float64
    twin only when a residual is evaluated), and ``out = Z / (sqrt(c) sqrt(s))`` or
    ``Y (sqrt(c) sqrt(s))`` (``want_sqrt``) as ``_finish`` forms it (in float64, rounded once
    to the working dtype): bit-identical to the three separate passes, without their batch
    temporaries.  ``info_i[3] = 1`` when the returned ``Z`` is finite.
    """
    n = A64.shape[0]
    Y0 = np.empty((n, n), dtype=out.dtype)
    cw = np.empty(1, dtype=out.dtype)
    cw[0] = c
    for i in range(n):
        for j in range(n):
            Y0[i, j] = A64[i, j]
            Y0[i, j] = Y0[i, j] / cw[0]
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
    finite = True
    for i in range(n):
        for j in range(n):
            z = Z[i, j]
            if not np.isfinite(z):
                finite = False
            out[i, j] = float(Y[i, j]) * f if want_sqrt else float(z) / f
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
def _prepare_one(a, eps, out, stats):
    """``out = ((a + a^T)/2 + eps I) / s`` in float64 with ``s = 4^k`` the power of four that
    brings ``max(max|a_ij|, eps)`` into ``[1, 4)``, and
    ``stats = [all finite, max|a_ij|, max|a_ij - a_ji|, ||out||_F, ||out||_inf, s]``.

    Dividing by a power of four is exact and keeps ``sqrt(s) = 2^k`` exact, so norms and
    products of ``out`` can neither overflow nor underflow at any representable scale (the
    scaling LAPACK's ``nrm2`` does), and results scale back exactly.  Two passes over ``a``:
    the checks and ``max|a_ij|``, then the scaled symmetric part.
    """
    n = a.shape[0]
    finite = True
    amax = 0.0
    asym = 0.0
    for i in range(n):
        for j in range(i, n):
            x = float(a[i, j])
            y = float(a[j, i])
            if not (np.isfinite(x) and np.isfinite(y)):
                finite = False
            amax = max(amax, max(abs(x), abs(y)))
            asym = max(asym, abs(x - y))
    scale = 1.0
    top = max(amax, eps)
    if finite and top > 0.0:
        e = math.frexp(top)[1]  # top = f 2^e, f in [1/2, 1)
        scale = math.ldexp(1.0, 2 * ((e - 1) // 2))
    ridge = eps / scale
    fro2 = 0.0
    rows = np.zeros(n)
    for i in range(n):
        d = float(a[i, i]) / scale + ridge
        out[i, i] = d
        fro2 += d * d
        rows[i] += abs(d)
        for j in range(i + 1, n):
            v = (float(a[i, j]) + float(a[j, i])) * 0.5
            if not np.isfinite(v):  # |a_ij + a_ji| above the largest float: halve first
                v = float(a[i, j]) * 0.5 + float(a[j, i]) * 0.5
            v /= scale
            out[i, j] = v
            out[j, i] = v
            fro2 += 2.0 * v * v
            rows[i] += abs(v)
            rows[j] += abs(v)
    stats[0] = 1.0 if finite else 0.0
    stats[1] = amax
    stats[2] = asym
    stats[3] = np.sqrt(fro2)
    stats[4] = np.max(rows) if n > 0 else 0.0
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
