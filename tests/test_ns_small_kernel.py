"""The register-blocked products and the fused small-matrix solver of the Numba backend.

``_mm_padded`` is checked against a float64 loop-free reference for every size 1..70
(multiples and non-multiples of the row tile and of the vector width); the fused solver
``_coupled_solve`` against float64 ``eigh`` on matrices of chosen condition number, and
against the three-pass route (``_initial``, the fused iteration, ``_finish``) it replaces.
"""
from __future__ import annotations

import numpy as np
import pytest

import nsiter
from nsiter import newton_schulz as ns
from nsiter._backend import backend
from nsiter._numba import _newton_schulz as kern
from nsiter._numba import linalg

from helpers import spd_with_condition
from reference import inv_sqrtm as ref_inv_sqrtm

DTYPES = (np.float32, np.float64)


def _padded(M, dtype):
    n = M.shape[0]
    out = np.zeros(kern._padded_shape(n, np.dtype(dtype).itemsize), dtype=dtype)
    out[:n, :n] = M
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiled_product_matches_float64_product_for_every_size_up_to_70(dtype):
    rng = np.random.default_rng(11)
    u = np.finfo(dtype).eps
    for n in range(1, 71):
        A = rng.standard_normal((n, n)).astype(dtype)
        B = rng.standard_normal((n, n)).astype(dtype)
        Ap, Bp = _padded(A, dtype), _padded(B, dtype)
        Cp = np.full_like(Ap, np.nan)
        kern._mm_padded(Ap, Bp, Cp, n)
        ref = A.astype(np.float64) @ B.astype(np.float64)
        bound = 2 * n * u * (np.abs(A).astype(np.float64) @ np.abs(B).astype(np.float64))
        assert np.all(np.abs(Cp[:n, :n] - ref) <= bound), n
        # the padding of a product of zero-padded operands is exactly zero
        pad = Cp.copy()
        pad[:n, :n] = 0
        assert not pad.any(), n


def test_padded_shape_rounds_rows_to_the_tile_and_columns_to_one_vector():
    assert kern._padded_shape(27, 4) == (28, 32)
    assert kern._padded_shape(27, 8) == (28, 32)
    assert kern._padded_shape(48, 4) == (48, 48)
    assert kern._padded_shape(1, 8) == (kern.TILE_ROWS, 8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 5, 27, 33, 48, 64])
def test_fused_solver_converges_to_the_float64_eigh_inverse_square_root(dtype, n):
    rng = np.random.default_rng(n)
    cond = 1e2
    A = spd_with_condition(n, cond, rng, batch=(3,), dtype=dtype)
    D = nsiter.inv_sqrtm(A, n_iter=30)
    ref = np.stack([ref_inv_sqrtm(a) for a in A])
    err = np.max(np.abs(D - ref)) / np.max(np.abs(ref))
    assert err <= 50 * cond * np.finfo(dtype).eps * max(1.0, np.sqrt(n))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("want", ["isqrt", "sqrt"])
@pytest.mark.parametrize("n", [3, 27, 64])
def test_fused_solver_is_bit_identical_to_the_three_pass_route(dtype, want, n):
    rng = np.random.default_rng(100 + n)
    A = spd_with_condition(n, 1e3, rng, batch=(5,), dtype=dtype)
    be = backend(A)
    A64, fro, stats = linalg.prepare(A, 0.0)
    c, s = fro, stats[:, 5]
    for record, stop_early, tol in ((False, False, None), (True, False, None), (False, True, 1e-3)):
        out, n_d, it, div, r, _, finite = linalg._coupled_solve(A64, c, s, A.dtype, want, None, 9, tol=tol,
                                                                record=record, stop_early=stop_early)
        Y0, Y0_64 = ns._initial(be, A64, c, A.dtype)
        Z, Y, n_d2, it2, div2, r2, _ = linalg._coupled_fused(Y0, Y0_64, None, 9, tol=tol, record=record,
                                                             stop_early=stop_early)
        np.testing.assert_array_equal(out, ns._finish(be, Z, Y, A64, c, s, want, A.dtype))
        np.testing.assert_array_equal(n_d, n_d2)
        np.testing.assert_array_equal(it, it2)
        np.testing.assert_array_equal(div, div2)
        np.testing.assert_array_equal(r, r2)
        assert finite.all()


def test_fused_solver_reruns_a_blown_up_matrix_and_warns():
    rng = np.random.default_rng(5)
    A = spd_with_condition(16, 1e2, rng, batch=(2,), dtype=np.float64)
    # accelerated coefficients far too large: the iterates overflow; the best iterate returns
    A64, fro, stats = linalg.prepare(A, 0.0)
    coefs = np.tile(np.array([40.0, -0.5, 0.0]), (2, 40, 1))
    out, n_d, it, div, r, _ = ns._solve_fused(backend(A), linalg._coupled_solve, A64, fro, stats[:, 5], A.dtype,
                                              "isqrt", coefs, 40, None, False, False, None)
    assert div.all() and np.isfinite(out).all() and (it >= 1).all()
