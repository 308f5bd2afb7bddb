"""Register tiles written at the LLVM level, shared by the Newton–Schulz products
(:func:`nsiter._numba._newton_schulz._mm_tiles`) and the Gram matrices of narrow patch rows
(:func:`_gram_tiles`).

Neither of LLVM's vectorisers keeps loop-carried accumulators of Numba code in vector registers
(without fastmath, which nsiter does not use: :mod:`nsiter._config`), so these kernels build the
tiles themselves: each accumulator vector is one ``k``-ordered chain of correctly rounded fused
multiply-adds (``llvm.fma``), whatever tile it lies in.

Numba's on-disk cache keys a kernel on its own source file only: after editing this module, clear
``nsiter/_numba/__pycache__`` (or touch the modules that import it), or the kernels already cached
keep the tiles they were compiled with.  A fresh checkout (CI) always compiles them anew.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["_VECTOR_BYTES", "_I32", "_emit_tile", "_emit_narrow_rows", "_emit_row_block", "_vector_fma", "_gram_tiles", "GRAM_TILE_ROWS"]

# the vector width of the hand-vectorised loops (one AVX-512 register)
_VECTOR_BYTES = 64
_I32 = ir.IntType(32)

#: Rows of the accumulator matrix of :func:`_gram_tiles` come in multiples of this.
GRAM_TILE_ROWS = 4
_GRAM_NARROW_ROWS = 8  # rows per tile when a row is at most two vectors
_GRAM_WIDE_VECS = 4  # vectors per tile otherwise (4 x 4 accumulators) ...
_GRAM_SPLIT_VECS = 8  # ... or two (8 x 2) for rows of at most this many vectors


def _vector_fma(context, builder, dtype):
    """``(lanes, vector type, llvm.fma of that type)`` for one 64-byte vector of ``dtype``."""
    ety = context.get_value_type(dtype)
    size = context.get_abi_sizeof(ety)
    lanes = _VECTOR_BYTES // size
    vty = ir.VectorType(ety, lanes)
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty, vty, vty]),
                                         f"llvm.fma.v{lanes}f{8 * size}")
    return lanes, vty, fma


def _emit_tile(builder, fma, vty, arrs, lds, i0v, j0v, kend, alpha, rows, vecs, *, a_k=None, accumulate=False):
    """IR of one register tile: ``C[i0:i0+rows, j0:j0+vecs*L] = alpha * (A[i0:i0+rows, :k_end] @
    B[:k_end, j0:j0+vecs*L])``: ``rows x vecs`` accumulator vectors kept in registers over the
    whole ``k`` loop (one vector load per column block and one broadcast per row each step),
    each entry summed in ``k`` order with correctly rounded fused multiply-adds (``llvm.fma``,
    what BLAS does; not a fastmath flag), then rounded and multiplied by ``alpha``.

    ``a_k``: the stride of ``A`` along ``k`` (default 1; ``A[i, k]`` at ``i*lda + k*a_k``), so that
    ``A`` can be the transpose of a row-major matrix.  ``accumulate``: ``C += A @ B`` instead
    (the chains start from ``C``'s entries; ``alpha`` is not applied).  Vector loads and stores
    assume only the alignment of one element (buffers need not start on a 64-byte boundary).
    """
    (a_data, b_data, c_data), (lda, ldb, ldc) = arrs, lds
    lanes = vty.count
    size = _VECTOR_BYTES // lanes  # the alignment the loads may assume: one element
    zero = ir.Constant(vty, [ir.Constant(vty.element, 0.0)] * lanes)
    undef = ir.Constant(vty, ir.Undefined)
    splat = ir.Constant(ir.VectorType(_I32, lanes), [ir.Constant(_I32, 0)] * lanes)
    idx = i0v.type

    def c_vector(r, v):
        crow = builder.gep(c_data, [builder.add(builder.mul(builder.add(i0v, ir.Constant(idx, r)), ldc), j0v)])
        return builder.bitcast(builder.gep(crow, [ir.Constant(idx, v * lanes)]), vty.as_pointer())

    accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(vecs)] for _ in range(rows)]
    for r in range(rows):
        for v in range(vecs):
            builder.store(builder.load(c_vector(r, v), align=size) if accumulate else zero, accs[r][v])
    a_rows = [builder.gep(a_data, [builder.mul(builder.add(i0v, ir.Constant(idx, r)), lda)]) for r in range(rows)]
    with cgutils.for_range(builder, kend) as loop:
        k = loop.index
        ka = k if a_k is None else builder.mul(k, a_k)
        brow = builder.gep(b_data, [builder.add(builder.mul(k, ldb), j0v)])
        bs = [builder.load(builder.bitcast(builder.gep(brow, [ir.Constant(idx, v * lanes)]), vty.as_pointer()),
                           align=size) for v in range(vecs)]
        for r in range(rows):
            a = builder.load(builder.gep(a_rows[r], [ka]))
            s = builder.shuffle_vector(builder.insert_element(undef, a, ir.Constant(_I32, 0)), undef, splat)
            for v in range(vecs):
                builder.store(builder.call(fma, [s, bs[v], builder.load(accs[r][v])]), accs[r][v])
    for r in range(rows):
        for v in range(vecs):
            acc = builder.load(accs[r][v])
            builder.store(acc if accumulate else builder.fmul(alpha, acc), c_vector(r, v), align=size)


def _emit_narrow_rows(builder, rows, nv, tile, big, small):
    """IR of the row tiles of a product whose rows are one or two vectors (``nv``): tiles of ``big``
    rows, then one of ``small`` rows at ``rows - small`` when ``rows % big == small`` (``rows`` a
    multiple of ``small``, so no row is computed twice); ``tile(i0, j0, rows, vecs)`` emits one."""
    idx = rows.type
    two = builder.icmp_unsigned("==", nv, ir.Constant(idx, 2))
    for r, start, count in ((big, None, builder.udiv(rows, ir.Constant(idx, big))),
                            (small, builder.sub(rows, ir.Constant(idx, small)),
                             builder.udiv(builder.urem(rows, ir.Constant(idx, big)), ir.Constant(idx, small)))):
        with cgutils.for_range(builder, count) as loop:
            i0 = builder.mul(loop.index, ir.Constant(idx, r)) if start is None else start
            with builder.if_else(two) as (v2, v1):
                with v2:
                    tile(i0, ir.Constant(idx, 0), r, 2)
                with v1:
                    tile(i0, ir.Constant(idx, 0), r, 1)


def _emit_row_block(builder, i0, rows, nv, lanes, tile, vecs):
    """IR of the tiles of rows ``i0 .. i0 + rows`` across all ``nv`` vectors of columns: tiles of
    ``vecs`` vectors, then one of the remaining ``nv % vecs``; ``tile(i0, j0, rows, vecs)`` emits one."""
    idx = nv.type
    full = builder.udiv(nv, ir.Constant(idx, vecs))
    with cgutils.for_range(builder, full) as loop:
        tile(i0, builder.mul(loop.index, ir.Constant(idx, vecs * lanes)), rows, vecs)
    j0 = builder.mul(full, ir.Constant(idx, vecs * lanes))
    rem = builder.urem(nv, ir.Constant(idx, vecs))
    for v in range(1, vecs):
        with builder.if_then(builder.icmp_unsigned("==", rem, ir.Constant(idx, v))):
            tile(i0, j0, rows, v)


@intrinsic
def _gram_tiles(typingctx, R, C, k_end):
    """An intrinsic ``_gram_tiles(R, C, k_end)``: ``C += R[:k_end, :m]^T R[:k_end]`` (``m`` the rows
    of ``C``) on the upper triangle, for C-contiguous 2-D arrays of one float dtype with as many columns, a
    whole number of 64-byte vectors (anywhere in memory: no alignment is assumed), ``m`` a multiple of :data:`GRAM_TILE_ROWS` and at most the
    columns; no bounds checks.  Tiles wholly below the diagonal are skipped, so the strictly lower
    triangle holds partial sums: read the upper one.

    Each row of ``R`` is loaded once per tile as vectors, and its entries broadcast from the same
    row: for rows of at most two vectors (``m <= 16``) all ``m`` rows of ``C`` are 8-row tiles in
    registers at once, for wider ones tiles of 4 rows by 4 vectors, column block by column block
    (``R[:k_end]``'s slab of a block, for ``k_end`` up to about 160, stays in L1 for all its tiles).  One ``k``-ordered fma chain per
    entry, continued from ``C``'s value: calls over consecutive row ranges add up the same floats as
    one call over their union.
    """
    def codegen(context, builder, signature, args):
        r_arr, c_arr = (context.make_array(t)(context, builder, v) for t, v in zip(signature.args[:2], args[:2]))
        kend = args[2]
        lanes, vty, fma = _vector_fma(context, builder, signature.args[0].dtype)
        ldr = cgutils.unpack_tuple(builder, r_arr.shape, 2)[1]
        rows, ldc = cgutils.unpack_tuple(builder, c_arr.shape, 2)
        idx = ldc.type
        one = ir.Constant(idx, 1)

        def const(v):
            return ir.Constant(idx, v)

        def tile(i0, j0, r, v):  # R^T as A: A[i, k] = R[k, i] (lda 1, stride ldr along k)
            _emit_tile(builder, fma, vty, (r_arr.data, r_arr.data, c_arr.data), (one, ldr, ldc), i0, j0, kend,
                       None, r, v, a_k=ldr, accumulate=True)

        nv = builder.udiv(ldc, const(lanes))
        with builder.if_else(builder.icmp_unsigned("<=", nv, const(2))) as (narrow, wide):
            with narrow:
                _emit_narrow_rows(builder, rows, nv, tile, _GRAM_NARROW_ROWS, GRAM_TILE_ROWS)
            with wide:  # column blocks outside: their slab of R[:k_end] stays in L1 across the row tiles
                n_tiles = builder.udiv(rows, const(GRAM_TILE_ROWS))

                def column_block(j0, v):
                    # row tiles i0 < j0 + v*L only (the others lie below the diagonal): tiles of
                    # 16 accumulators (big = 4, 8, 16 rows for v = 4, 2, 1; 12 for v = 3), then 4-row ones
                    last = builder.udiv(builder.add(j0, const(v * lanes + GRAM_TILE_ROWS - 1)), const(GRAM_TILE_ROWS))
                    end = builder.select(builder.icmp_unsigned("<", last, n_tiles), last, n_tiles)  # 4-row tiles
                    per = max(1, _GRAM_WIDE_VECS // v)  # 4-row tiles in one big tile
                    n_big = builder.udiv(end, const(per))
                    if per > 1:
                        with cgutils.for_range(builder, n_big) as rloop:
                            tile(builder.mul(rloop.index, const(per * GRAM_TILE_ROWS)), j0, per * GRAM_TILE_ROWS, v)
                    start = builder.mul(n_big, const(per)) if per > 1 else const(0)
                    with cgutils.for_range(builder, builder.sub(end, start)) as rloop:
                        tile(builder.mul(builder.add(start, rloop.index), const(GRAM_TILE_ROWS)), j0, GRAM_TILE_ROWS, v)

                def blocks(width):  # column blocks of `width` vectors, then the remaining ones
                    full = builder.udiv(nv, const(width))
                    rem = builder.urem(nv, const(width))
                    with cgutils.for_range(builder, full) as cloop:
                        column_block(builder.mul(cloop.index, const(width * lanes)), width)
                    j0 = builder.mul(full, const(width * lanes))
                    for v in range(1, width):
                        with builder.if_then(builder.icmp_unsigned("==", rem, const(v))):
                            column_block(j0, v)

                # up to _GRAM_SPLIT_VECS vectors, blocks of two: less of the lower triangle computed
                with builder.if_else(builder.icmp_unsigned("<=", nv, const(_GRAM_SPLIT_VECS))) as (few, many):
                    with few:
                        blocks(2)
                    with many:
                        blocks(_GRAM_WIDE_VECS)
        return context.get_dummy_value()

    return types.void(R, C, k_end), codegen
