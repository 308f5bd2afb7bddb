"""The register-blocked products, the fused small-matrix solver and the pipeline kernel of the Numba backend.

``_mm_padded`` is checked against a float64 loop-free reference for every size 1..70
(multiples and non-multiples of the row tile and of the vector width); the fused solver
``_coupled_solve`` against float64 ``eigh`` on matrices of chosen condition number, and
against the three-pass route (``_initial``, the fused iteration, ``_finish``) it replaces; the
pipeline (prepare, probe and solver in one call) against the three calls, bit for bit, and its
left-looking Cholesky against the right-looking triangle loops.
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


def _cholesky_triangle(S):
    """The right-looking Cholesky on the upper triangle, loop by loop (the order the kernel keeps)."""
    n = S.shape[0]
    U = np.triu(S).astype(np.float64)
    for j in range(n):
        if not U[j, j] > 0:
            return U, False
        inv = 1.0 / np.sqrt(U[j, j])
        U[j, j:] *= inv
        for i in range(j + 1, n):
            U[i, i:] -= U[j, i] * U[j, i:]
    return U, True


def test_left_looking_cholesky_has_the_bits_of_the_right_looking_triangle_loops():
    rng = np.random.default_rng(21)
    for n in (1, 2, 7, 8, 9, 27, 40):
        S = spd_with_condition(n, 1e4, rng, batch=(1,), dtype=np.float64)[0]
        for shift in (0.0, 1e-3):
            ref, ok_ref = _cholesky_triangle(S + shift * np.eye(n))
            U = np.empty((n, -(-n // 8) * 8))
            ok = kern._cholesky_rows(S, shift, U)
            assert ok == ok_ref
            np.testing.assert_array_equal(np.triu(U[:, :n]), np.triu(ref))
    S = np.diag([1.0, -1.0, 2.0])
    assert not kern._cholesky_rows(S, 1e-3, np.empty((3, 8)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_abs_max_reads_the_largest_magnitude_and_finiteness_from_the_bits(dtype):
    rng = np.random.default_rng(22)
    A = rng.standard_normal((27, 27)).astype(dtype)
    A[3, 4] = -7.5
    assert kern._abs_max(A) == (7.5, True)
    assert kern._abs_max(np.zeros((3, 3), dtype=dtype)) == (0.0, True)
    for bad in (np.inf, -np.inf, np.nan):
        B = A.copy()
        B[5, 1] = bad
        assert not kern._abs_max(B)[1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("want", ["isqrt", "sqrt"])
@pytest.mark.parametrize("nb", [1, 2, 7, 9, 17, 64])  # one, two and 8 (lanes) matrices per step, odd batches
def test_pipeline_is_bit_identical_to_prepare_probe_and_the_fused_solver(dtype, want, nb):
    rng = np.random.default_rng(300 + nb)
    n = 27
    A = spd_with_condition(n, 1e3, rng, batch=(nb,), dtype=dtype)
    if nb > 1:
        A[1] -= np.asarray(0.5 * np.eye(n), dtype=dtype)  # indefinite: its Cholesky fails
    rel = float(10.0 * n * np.finfo(dtype).eps)
    for spectral in (False, True):
        n_power = ns._PROBE_POWER_STEPS if spectral else 0
        for record, stop_early, tol in ((False, False, None), (True, False, None), (False, True, 1e-3)):
            res = linalg._coupled_pipeline(
                A, 0.0, rel, ns._PROBE_INVERSE_STEPS, n_power, spectral, dtype, want, 6, tol=tol, record=record,
                stop_early=stop_early, asym_rel=ns._asym_rel(dtype), sing_rel=ns._singular_rel(n, dtype))
            A64, stats, probe, c, solved = res.A64, res.stats, res.probe, res.c, res.solved()
            A64_r, fro, stats_r = linalg.prepare(A, 0.0)
            np.testing.assert_array_equal(A64, A64_r)
            np.testing.assert_array_equal(stats, stats_r)
            delta = ns._delta(fro, n, dtype)
            ok, lmin, lmax = linalg.probe(A64_r, delta, ns._PROBE_INVERSE_STEPS, n_power)
            np.testing.assert_array_equal(probe[:, 0] > 0, ok)
            np.testing.assert_array_equal(probe[:, 1], lmin)
            np.testing.assert_array_equal(probe[:, 2], lmax)
            c_r = ns._scale(backend(A), A64_r, "spectral" if spectral else "fro", lmax, fro)
            np.testing.assert_array_equal(c, c_r)
            good = ok.nonzero()[0]
            ref = linalg._coupled_solve(A64_r[good], c_r[good], stats_r[good, 5], dtype, want, None, 6, tol=tol,
                                        record=record, stop_early=stop_early)
            for got, exp in zip(solved, ref):
                np.testing.assert_array_equal(got[good], exp)


def _driver_would_pass(stats, probe, solved, n, dtype, want):
    """The driver's checks of ``_solve_tracked`` on the pipeline's outputs, per matrix: no
    error, no warning, no rerun (the conditions the kernel's ``clean`` flag mirrors)."""
    fro, s, lmin = stats[:, 3], stats[:, 5], probe[:, 1]
    good = (stats[:, 0] > 0) & ~(stats[:, 2] > ns._asym_rel(dtype) * stats[:, 1]) & (probe[:, 0] > 0)
    good &= solved[6] & ~solved[3]
    if want == "isqrt":
        good &= (fro > 0) & ~(lmin * s <= ns._singular_tol(fro, n, dtype) * s)
    return good


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("want", ["isqrt", "sqrt"])
def test_pipeline_clean_flag_is_the_drivers_checks(dtype, want):
    """The pipeline reports a batch clean exactly when every matrix passes the driver's
    checks; each kind of matrix that must raise or warn makes a batch of good ones unclean."""
    rng = np.random.default_rng(77)
    n = 27
    good = spd_with_condition(n, 1e3, rng, batch=(9,), dtype=dtype)
    u = np.finfo(dtype).eps
    singular = good[0] - np.asarray(np.linalg.eigvalsh(good[0].astype(np.float64))[0] * np.eye(n), dtype=dtype)
    asym = good[0].copy()
    asym[0, 1] += 1e3 * u * np.abs(good[0]).max()
    nan = good[0].copy()
    nan[3, 3] = np.nan
    bad = {"none": None, "singular": singular, "zero": np.zeros((n, n), dtype), "asymmetric": asym,
           "indefinite": good[0] - np.asarray(np.eye(n), dtype=dtype), "nan": nan}
    rel = float(10.0 * n * u)
    for name, M in bad.items():
        A = good.copy()
        if M is not None:
            A[4] = M
        res = linalg._coupled_pipeline(
            A, 0.0, rel, ns._PROBE_INVERSE_STEPS, 0, False, dtype, want, 5, tol=None, record=False,
            stop_early=False, asym_rel=ns._asym_rel(dtype), sing_rel=ns._singular_rel(n, dtype))
        clean = res.clean
        expected = _driver_would_pass(res.stats, res.probe, res.solved(), n, dtype, want)
        assert clean == bool(expected.all()), name
        assert clean == (name == "none" or (want == "sqrt" and name in ("singular", "zero"))), name


@pytest.mark.parametrize("n", [1, 2, 8, 27, 48, 64])
def test_lane_probe_has_the_bits_of_the_scalar_probe(n):
    """Eight matrices in the lanes of one vector (a partial group too, an indefinite and a
    NaN matrix among them) give the scalar probe's outputs bit for bit."""
    rng = np.random.default_rng(400 + n)
    L = kern._LANES64
    A = spd_with_condition(n, 1e4, rng, batch=(11,), dtype=np.float64)
    A[2] -= 0.5 * np.abs(A[2]).max() * np.eye(n)  # indefinite (n > 1): its Cholesky fails
    A[5, 0, 0] = np.nan
    A64, fro, _ = linalg.prepare(A, 0.0)
    A64[5, 0, 0] = np.nan
    delta = ns._delta(fro, n, np.float32)
    v0 = np.empty(n)
    kern._inverse_start(v0)
    for n_inverse, n_power in ((ns._PROBE_INVERSE_STEPS, 0), (0, ns._PROBE_POWER_STEPS), (2, 3)):
        ref = np.empty((11, 3))
        kern._psd_probe_serial(A64, delta, n_inverse, n_power, ref)
        got = np.full((11, 3), -1.0)
        for b0 in (0, L):
            cnt = min(L, 11 - b0)
            kern._psd_probe_lanes(A64, b0, cnt, delta[b0:b0 + L].copy(), n_inverse, n_power, v0, got,
                                  np.empty(n * n * L), np.empty(n * L), np.empty(n * L))
        np.testing.assert_array_equal(got, ref)
    assert ref[5, 0] == 0 and np.isnan(ref[5, 1])
    if n > 1:
        assert ref[2, 0] == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_prepare_statistics_match_float64_references(dtype):
    rng = np.random.default_rng(23)
    A = rng.standard_normal((3, 27, 27)).astype(dtype)
    A[1] = A[1] + A[1].T
    A64, fro, stats = linalg.prepare(A, 0.25)
    for b in range(3):
        a = A[b].astype(np.float64)
        s = stats[b, 5]
        sym = ((a + a.T) / 2 + 0.25 * np.eye(27)) / s
        np.testing.assert_array_equal(A64[b], sym)
        np.testing.assert_array_equal(A64[b], A64[b].T)
        assert stats[b, 1] == np.abs(a).max() and stats[b, 2] == np.abs(a - a.T).max()
        np.testing.assert_allclose(stats[b, 3], np.linalg.norm(sym), rtol=1e-14)
        np.testing.assert_allclose(stats[b, 4], np.abs(sym).sum(axis=1).max(), rtol=1e-14)
        assert 1 <= max(np.abs(a).max(), 0.25) / s < 4
