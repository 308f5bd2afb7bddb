"""Newton–Schulz inverse square roots: accuracy, stability, semantics, bad input."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import nsiter
import reference
from helpers import assert_close, spd_with_condition, tol
from nsiter import newton_schulz as ns
from nsiter._backend import backend
from nsiter._numba import linalg as numba_linalg

ITERATIVE = ("coupled", "uncoupled", "accelerated")


def whitening_residual(D, A):
    """``||D A D - I||_F / sqrt(n)`` in float64."""
    D = np.asarray(D, dtype=np.float64)
    A = np.asarray(A, dtype=np.float64)
    n = A.shape[-1]
    R = D @ A @ D - np.eye(n)
    return np.sqrt(np.sum(R * R, axis=(-2, -1))) / math.sqrt(n)


@pytest.fixture(scope="module")
def image_cov():
    """The 27 x 27 covariance of 3 x 3 x RGB patches of the sample image (1/N, float64)."""
    x = nsiter.data.sample_image()
    X = nsiter.im2col(x, 3).astype(np.float64)
    Xc = X - X.mean(axis=0)
    return Xc.T @ Xc / X.shape[0]


# ----------------------------------------------------------------------------- semantics


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_coupled_five_steps_reproduce_reference_code(image_cov, dtype):
    A = image_cov.astype(dtype)
    D = nsiter.inv_sqrtm(A, method="coupled", n_iter=5, scaling="fro")
    ref = reference.isqrt_newton_schulz_autograd(A, 5)
    assert D.dtype == dtype
    assert_close(D, ref, factor=2, n=27)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_coupled_batched_reference_semantics_on_random_spd(dtype):
    # batch larger than n_iter on purpose (per-matrix coefficient tables)
    rng = np.random.default_rng(1)
    A = spd_with_condition(16, 1e3, rng, batch=(12,), dtype=dtype)
    D = nsiter.inv_sqrtm(A, n_iter=3)
    for b in range(12):
        assert_close(D[b], reference.isqrt_newton_schulz_autograd(A[b], 3), n=16)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 13])
def test_scalar_model_gives_whitened_eigenvalues_of_diagonal_matrices(k):
    # for eigenvalue x = lambda / c: p_0 = x, p_{j+1} = p_j (3 - p_j)^2 / 4 and D_k A D_k = diag(p_k)
    lam = np.array([1e-4, 3e-3, 0.02, 0.1, 0.5, 1.0, 2.0, 4.0])
    A = np.diag(lam)
    c = np.linalg.norm(lam)
    p = lam / c
    for _ in range(k):
        p = p * (3.0 - p) ** 2 / 4.0
    D = nsiter.inv_sqrtm(A, method="coupled", n_iter=k)
    W = D @ A @ D
    assert np.count_nonzero(W - np.diag(np.diag(W))) == 0  # stays exactly diagonal
    np.testing.assert_allclose(np.diag(W), p, rtol=20 * k * np.finfo(float).eps)


def test_residual_history_matches_independent_runs(image_cov):
    D, info = nsiter.inv_sqrtm(image_cov, method="coupled", n_iter=12, return_info=True)
    assert info.residuals.shape == (12,)
    for k in (1, 4, 12):
        Dk = nsiter.inv_sqrtm(image_cov, method="coupled", n_iter=k)
        r = np.linalg.norm(Dk @ Dk @ image_cov - np.eye(27))
        assert info.residuals[k - 1] == pytest.approx(r, rel=1e-9)
    assert info.n_iter == 12 and info.best_iter == 12
    assert info.scale == pytest.approx(np.linalg.norm(image_cov))
    assert info.method == "coupled" and info.scaling == "fro"
    # a fixed count is judged against the default tolerance raised to the matrix's floor
    assert ns.default_tol(np.float64, 27) <= info.tol <= 0.01 * np.sqrt(27)
    assert bool(info.converged) == bool(info.residuals[-1] <= info.tol) and not bool(info.diverged)


@pytest.mark.parametrize("method", ITERATIVE + ("eigh", "auto"))
def test_info_fields_have_batch_shapes(method):
    rng = np.random.default_rng(2)
    A = spd_with_condition(6, 50.0, rng, batch=(2, 3))
    D, info = nsiter.inv_sqrtm(A, method=method, n_iter=6 if method != "eigh" else None,
                               return_info=True)
    assert isinstance(info, nsiter.NewtonSchulzInfo)
    assert D.shape == A.shape
    assert info.residuals.dtype == np.float64
    assert info.residuals.shape == (2, 3, 1 if method == "eigh" else info.n_iter)
    for field in ("converged", "diverged", "best_iter", "scale"):
        assert getattr(info, field).shape == (2, 3), field
    assert info.converged.dtype == bool and info.diverged.dtype == bool
    with pytest.raises(AttributeError):
        info.n_iter = 3  # frozen


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cond", [1e2, 1e5, 1e9])
def test_return_info_does_not_change_the_result(cond, dtype):
    rng = np.random.default_rng(3)
    A = spd_with_condition(20, cond, rng, batch=(5,), dtype=dtype)
    for method in ("coupled", "accelerated", "auto"):
        for kw in (dict(tol=1e-8), dict(n_iter=9), {}):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", nsiter.NsiterWarning)  # unreachable tol in float32
                D1 = nsiter.inv_sqrtm(A, method=method, **kw)
                D2, _ = nsiter.inv_sqrtm(A, method=method, return_info=True, **kw)
            np.testing.assert_array_equal(D1, D2, err_msg=f"{method} {kw}")


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("cond", [1e1, 1e3, 1e6, 1e9])
def test_coupled_reaches_eigh_accuracy_for_chosen_condition_numbers(cond):
    rng = np.random.default_rng(int(math.log10(cond)))
    A = spd_with_condition(24, cond, rng, batch=(3,))
    D = nsiter.inv_sqrtm(A, method="coupled")
    D_ref = reference.inv_sqrtm(A)
    assert np.all(whitening_residual(D, A) <= 10 * whitening_residual(D_ref, A))
    # forward error of an inverse square root is about cond^(1/2) eps relative
    err = np.linalg.norm(D - D_ref, axis=(-2, -1)) / np.linalg.norm(D_ref, axis=(-2, -1))
    assert np.all(err <= 1e3 * math.sqrt(cond) * np.finfo(float).eps * 24)


@pytest.mark.parametrize("method", ["accelerated", "auto"])
@pytest.mark.parametrize("cond", [1e2, 1e6, 1e9])
def test_accelerated_and_auto_reach_eigh_accuracy(method, cond):
    rng = np.random.default_rng(10 + int(math.log10(cond)))
    A = spd_with_condition(24, cond, rng, batch=(3,))
    D = nsiter.inv_sqrtm(A, method=method)
    assert np.all(whitening_residual(D, A) <= 10 * whitening_residual(reference.inv_sqrtm(A), A))


def test_accelerated_needs_fewer_iterations_than_coupled():
    rng = np.random.default_rng(4)
    A = spd_with_condition(32, 1e6, rng)
    _, ic = nsiter.inv_sqrtm(A, method="coupled", tol=1e-7, return_info=True)
    _, ia = nsiter.inv_sqrtm(A, method="accelerated", tol=1e-7, return_info=True)
    assert ic.converged and ia.converged
    assert ia.n_iter <= 0.65 * ic.n_iter


def test_coupled_is_stable_for_a_thousand_iterations(image_cov):
    D, info = nsiter.inv_sqrtm(image_cov, method="coupled", n_iter=1000, return_info=True)
    r = info.residuals
    assert np.all(np.isfinite(r)) and not info.diverged
    floor = r[:100].min()
    assert r[-1] <= 10 * floor
    assert whitening_residual(D, image_cov) <= 10 * whitening_residual(reference.inv_sqrtm(image_cov), image_cov)


def test_uncoupled_blows_up_on_the_image_covariance_within_sixty_iterations(image_cov):
    with pytest.warns(nsiter.NewtonSchulzDivergenceWarning, match="uncoupled.*best iterate"):
        D, info = nsiter.inv_sqrtm(image_cov, method="uncoupled", n_iter=60, return_info=True)
    r = info.residuals
    assert r.shape == (60,)
    assert info.diverged and not np.all(np.isfinite(r)) or r.max() > 1e3 * np.nanmin(r)
    blow = int(np.argmax(~np.isfinite(r) | (r > 1e3 * np.nanmin(r))))
    assert blow < 60
    # the returned D is the best iterate: finite, with the best residual
    assert np.all(np.isfinite(D))
    k = int(info.best_iter)
    assert r[k - 1] == np.nanmin(r)
    assert np.linalg.norm(D @ D @ image_cov - np.eye(27)) == pytest.approx(r[k - 1], rel=1e-9)


def test_uncoupled_converges_on_a_well_conditioned_matrix():
    rng = np.random.default_rng(5)
    A = spd_with_condition(10, 3.0, rng)
    D, info = nsiter.inv_sqrtm(A, method="uncoupled", n_iter=12, return_info=True)
    assert not info.diverged
    assert whitening_residual(D, A) < 1e-12


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("method", ITERATIVE + ("eigh", "auto"))
def test_dtype_is_preserved_and_accuracy_is_dtype_aware(method, dtype):
    rng = np.random.default_rng(6)
    # the uncoupled iteration amplifies rounding errors unless cond(A) is small (< 9)
    A = spd_with_condition(12, 100.0 if method != "uncoupled" else 3.0, rng, batch=(2,), dtype=dtype)
    D = nsiter.inv_sqrtm(A, method=method, n_iter=None if method != "uncoupled" else 8)
    assert D.dtype == dtype
    assert np.all(whitening_residual(D, A) < tol(dtype, 100.0, n=12))


@pytest.mark.parametrize("dtype,expected", [(np.int64, np.float64), (np.float16, np.float32), (bool, np.float64)])
def test_integer_and_half_input_promote(dtype, expected):
    A = (2 * np.eye(3) + np.ones((3, 3))).astype(dtype) if dtype is not bool else np.eye(3, dtype=bool)
    D = nsiter.inv_sqrtm(A, n_iter=30)
    assert D.dtype == expected


def test_tol_stops_at_the_first_iterate_below_it():
    rng = np.random.default_rng(7)
    A = spd_with_condition(16, 1e4, rng, batch=(4,))
    D, info = nsiter.inv_sqrtm(A, method="coupled", tol=1e-9, return_info=True)
    assert np.all(info.converged)
    for b in range(4):
        k = info.best_iter[b]
        assert info.residuals[b, k - 1] <= 1e-9
        assert np.all(info.residuals[b, : k - 1] > 1e-9)
        assert np.linalg.norm(D[b] @ D[b] @ A[b] - np.eye(16)) <= 1e-9


def test_unreachable_tol_warns_and_stops_at_the_rounding_floor():
    rng = np.random.default_rng(8)
    A = spd_with_condition(16, 1e6, rng, dtype=np.float32)
    with pytest.warns(nsiter.NsiterWarning, match="tol=1e-12 was not reached"):
        D, info = nsiter.inv_sqrtm(A, tol=1e-12, return_info=True)
    assert not info.converged and not info.diverged
    assert info.n_iter < ns.MAX_ITER


def test_default_tolerance_is_documented_and_dtype_aware():
    assert ns.default_tol(np.float64, 4) == pytest.approx(200 * np.finfo(np.float64).eps)
    assert ns.default_tol(np.float32, 4) == pytest.approx(200 * np.finfo(np.float32).eps)
    rng = np.random.default_rng(9)
    A = spd_with_condition(9, 10.0, rng)
    _, info = nsiter.inv_sqrtm(A, return_info=True)
    # judged against default_tol raised to the rounding floor 10 kappa sqrt(n) eps (kappa ~ 10 here)
    assert ns.default_tol(np.float64, 9) <= info.tol <= 10 * ns.default_tol(np.float64, 9)
    assert info.converged and info.n_iter < 30


def test_n_iter_with_tol_is_a_cap():
    rng = np.random.default_rng(10)
    A = spd_with_condition(8, 1e8, rng)
    with pytest.warns(nsiter.NsiterWarning, match="not reached"):
        _, info = nsiter.inv_sqrtm(A, tol=1e-10, n_iter=4, return_info=True)
    assert info.n_iter == 4 and not info.converged


def test_ridge_eps_inverts_a_plus_eps_identity():
    rng = np.random.default_rng(11)
    A = spd_with_condition(10, 1e3, rng)
    D = nsiter.inv_sqrtm(A, eps=0.1)
    assert_close(D, reference.inv_sqrtm(A + 0.1 * np.eye(10)), factor=10, n=10)


@pytest.mark.parametrize("scaling", ns.SCALINGS)
def test_every_scaling_converges_and_reports_its_scale(scaling):
    rng = np.random.default_rng(12)
    A = spd_with_condition(12, 1e4, rng, lam_max=3.0)
    D, info = nsiter.inv_sqrtm(A, scaling=scaling, return_info=True)
    assert whitening_residual(D, A) < 1e-11
    lam_max = 3.0
    if scaling == "fro":
        assert info.scale == pytest.approx(np.linalg.norm(A))
    elif scaling == "trace":
        assert info.scale == pytest.approx(np.trace(A))
    else:
        assert lam_max * 0.5 <= info.scale <= lam_max * (1 + 1e-12)


def test_spectral_scaling_saves_iterations_on_a_flat_spectrum():
    rng = np.random.default_rng(13)
    A = spd_with_condition(40, 1e3, rng)
    _, i_fro = nsiter.inv_sqrtm(A, scaling="fro", tol=1e-10, return_info=True)
    _, i_spec = nsiter.inv_sqrtm(A, scaling="spectral", tol=1e-10, return_info=True)
    assert i_spec.n_iter <= i_fro.n_iter


@pytest.mark.parametrize("method", ("coupled", "accelerated", "eigh", "uncoupled"))
def test_sqrtm_psd_squares_to_a(method):
    rng = np.random.default_rng(14)
    A = spd_with_condition(10, 10.0 if method != "uncoupled" else 3.0, rng, batch=(2,))
    S = nsiter.sqrtm_psd(A, method=method, n_iter=None if method != "uncoupled" else 10)
    assert_close(S @ S, A, factor=20, n=10)
    assert_close(S, np.swapaxes(S, -1, -2), factor=20, n=10)


def test_sqrtm_psd_eigh_accepts_a_singular_matrix():
    v = np.array([[1.0, 2.0, 2.0]])
    S = nsiter.sqrtm_psd(v.T @ v, method="eigh")
    assert_close(S @ S, v.T @ v, factor=10, n=3)


# ----------------------------------------------------------------------------- batches


@pytest.mark.parametrize("method", ITERATIVE + ("eigh", "auto"))
def test_batched_equals_looped(method):
    rng = np.random.default_rng(15)
    A = spd_with_condition(9, 1e3 if method != "uncoupled" else 3.0, rng, batch=(2, 3))
    kw = dict(n_iter=12) if method == "uncoupled" else {}
    D = nsiter.inv_sqrtm(A, method=method, **kw)
    for idx in np.ndindex(2, 3):
        np.testing.assert_array_equal(D[idx], nsiter.inv_sqrtm(A[idx], method=method, **kw))


@given(st.integers(1, 12), st.integers(1, 5), st.floats(0.0, 8.0), st.integers(0, 2**31))
def test_whitening_property_holds_for_random_spd(n, nb, log_cond, seed):
    rng = np.random.default_rng(seed)
    A = spd_with_condition(n, 10.0 ** log_cond, rng, batch=(nb,))
    D = nsiter.inv_sqrtm(A)
    assert np.all(whitening_residual(D, A) <= 10 * whitening_residual(reference.inv_sqrtm(A), A) + 1e-14)


@given(st.floats(-6, 6), st.integers(0, 2**31))
def test_scale_invariance(log_s, seed):
    # inv_sqrtm(s A) = inv_sqrtm(A) / sqrt(s) (Frobenius scaling makes the iterates identical)
    rng = np.random.default_rng(seed)
    A = spd_with_condition(6, 100.0, rng)
    s = 10.0 ** log_s
    assert_close(nsiter.inv_sqrtm(s * A, n_iter=15) * math.sqrt(s), nsiter.inv_sqrtm(A, n_iter=15),
                 factor=10, n=6)


def test_fused_kernel_parallel_serial_and_array_code_agree(monkeypatch):
    """The coupled step's two implementations (fused Numba kernel, array code) agree, and
    the kernel gives the same bits one matrix per thread or in batch order."""
    rng = np.random.default_rng(16)
    A = spd_with_condition(20, 1e4, rng, batch=(6,))
    c = np.linalg.norm(A, axis=(-2, -1))
    Y0 = A / c[:, None, None]
    coefs3 = np.tile([1.5, -0.5, 0.0], (6, 9, 1))
    be = backend(Y0)
    fused = numba_linalg.coupled_kernel(20)
    Zp, Yp, *_ = fused(Y0, Y0, coefs3, 9, tol=None, record=False, stop_early=False)
    Zn, Yn = ns._run_fixed(be, Y0, 9, coefs3, want_y=True)
    assert_close(Zp, Zn, n=20)
    assert_close(Yp, Yn, n=20)
    Za, Ya, *_ = ns._run_coupled(be, Y0, Y0, None, 9, tol=None, record=False, stop_early=False)
    np.testing.assert_array_equal(Za, Zn)
    np.testing.assert_array_equal(Ya, Yn)
    monkeypatch.setattr(numba_linalg, "PARALLEL_MAX_N", 0)
    Zs, *_ = fused(Y0, Y0, coefs3, 9, tol=None, record=False, stop_early=False)
    np.testing.assert_array_equal(Zs, Zp)


def test_strided_and_noncontiguous_input():
    rng = np.random.default_rng(17)
    A = spd_with_condition(8, 100.0, rng, batch=(4,))
    view = np.swapaxes(A, -1, -2)[::2]
    assert_close(nsiter.inv_sqrtm(view), reference.inv_sqrtm(A[::2]), factor=10, n=8)


def test_input_is_not_modified():
    rng = np.random.default_rng(18)
    A = spd_with_condition(8, 100.0, rng, batch=(2,))
    A0 = A.copy()
    for method in ns.METHODS:
        nsiter.inv_sqrtm(A, method=method, eps=0.5, n_iter=None if method != "uncoupled" else 5)
    np.testing.assert_array_equal(A, A0)


@pytest.mark.parametrize("method", ns.METHODS)
def test_empty_batch_returns_empty_results(method):
    A = np.empty((0, 4, 4), dtype=np.float32)
    D, info = nsiter.inv_sqrtm(A, method=method, return_info=True)
    assert D.shape == (0, 4, 4) and D.dtype == np.float32
    assert info.residuals.shape[0] == 0 and info.converged.shape == (0,)


def test_one_by_one_matrix_is_the_scalar_inverse_square_root():
    assert nsiter.inv_sqrtm(np.array([[4.0]]))[0, 0] == pytest.approx(0.5, rel=1e-14)


def test_auto_picks_the_accelerated_iteration_for_small_matrices_and_eigh_for_large():
    rng = np.random.default_rng(19)
    _, info = nsiter.inv_sqrtm(spd_with_condition(16, 2.0, rng, batch=(4,)), method="auto", return_info=True)
    assert info.method == "auto:accelerated"
    _, info = nsiter.inv_sqrtm(spd_with_condition(300, 1e6, rng), method="auto", return_info=True)
    assert info.method == "auto:eigh"


def test_accelerated_schedule_becomes_the_classic_step():
    coefs, K = ns._accelerated_schedule(np.array([1e-6, 1e-2]), 1e-10, 16, 40)
    assert 5 <= K[0] < 20 and K[1] < K[0]
    np.testing.assert_allclose(coefs[0, K[0] - 1, :2], [1.5, -0.5], atol=1e-3)
    np.testing.assert_array_equal(coefs[0, K[0]:], np.tile([1.5, -0.5, 0.0], (40 - K[0], 1)))
    a, b, E = ns._deg3_minimax(1.0, 1.0)
    assert (a, b, E) == pytest.approx((1.5, -0.5, 0.0))


@pytest.mark.parametrize("p_lo", [3.7e-7, 2.2e-3, 0.31])
def test_grid_schedule_maps_the_whole_true_interval(p_lo):
    """p_lo is rounded down to the schedule grid: the schedule still maps every eigenvalue
    of [p_lo, 1] to within tol (scalar model p <- p (a + b p)^2), at most one step later."""
    coefs, K = ns._accelerated_schedule(np.array([p_lo]), 1e-7, 16, 60)
    _, K_exact = ns._design_schedule(np.array([p_lo]), 1e-7, 16, 60)
    assert K_exact[0] <= K[0] <= K_exact[0] + 1
    p = np.logspace(np.log10(p_lo), 0.0, 400)
    for a, b, _ in coefs[0, :K[0]]:
        p = p * (a + b * p) ** 2
    assert np.sqrt(16) * np.max(np.abs(p - 1.0)) <= 1e-7


def test_auto_cost_model_is_batch_free_and_prefers_eigh_for_ill_conditioned_matrices():
    for dtype in (np.float32, np.float64):
        for n in (4, 16, 64, 300):
            plan = ns._auto_plan(np.array([3, 60]), n, dtype)
            assert not plan[0] or ns._eigh_without_probe(1e-3, n, 100, np.dtype(dtype)) or n <= 8
            assert plan[1]


# ----------------------------------------------------------------------------- divergence


def test_coupled_blow_up_on_a_singular_float32_matrix_returns_the_best_iterate():
    v = np.arange(1.0, 7.0)[None, :]
    A = (v.T @ v + np.diag([1.0, 1, 1, 1, 1, 0])).astype(np.float32)  # rank 5
    A[-1, :] = A[:, -1] = 0.0
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        D = nsiter.inv_sqrtm(A, n_iter=400)
    kinds = {type(x.message) for x in w}
    assert nsiter.IllConditionedWarning in kinds
    assert nsiter.NewtonSchulzDivergenceWarning in kinds
    assert np.all(np.isfinite(D))
    # the same in tolerance mode (the blow-up shows in the by-product first), with and without info
    for info_flag in (False, True):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            res = nsiter.inv_sqrtm(A, tol=1e-3, n_iter=400, return_info=info_flag)
        D2 = res[0] if info_flag else res
        assert nsiter.NewtonSchulzDivergenceWarning in {type(x.message) for x in w}
        assert np.all(np.isfinite(D2))
        if info_flag:
            info = res[1]
            assert info.diverged and not info.converged
            k = int(info.best_iter)
            assert info.residuals[k - 1] == np.nanmin(info.residuals)


def test_singular_matrix_warning_names_eps_and_eigh_raises():
    A = np.array([[1.0, 1.0], [1.0, 1.0]])
    with pytest.warns(nsiter.IllConditionedWarning, match="eps"):
        nsiter.inv_sqrtm(A, n_iter=5)
    with pytest.raises(ValueError, match="singular.*eps"):
        nsiter.inv_sqrtm(A, method="eigh")
    # auto never hands a singular matrix to eigh, even where it skips the probe (small n)
    assert ns._eigh_without_probe(ns.default_tol(np.float64, 2), 2, ns.MAX_ITER, np.dtype(np.float64))
    with pytest.warns(nsiter.IllConditionedWarning, match="eps"):
        D, info = nsiter.inv_sqrtm(A, method="auto", return_info=True)
    assert info.method == "auto:accelerated" and np.all(np.isfinite(D))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nsiter.inv_sqrtm(A, n_iter=5, eps=1e-3)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("method", ns.METHODS)
def test_indefinite_matrix_is_rejected(method):
    A = np.diag([1.0, 2.0, -0.5])
    with pytest.raises(ValueError, match="positive semidefinite.*eps"):
        nsiter.inv_sqrtm(A, method=method)


def test_rounding_level_negative_eigenvalue_is_accepted_with_a_warning():
    rng = np.random.default_rng(20)
    q = reference.random_orthogonal(5, rng) if hasattr(reference, "random_orthogonal") else np.linalg.qr(
        rng.standard_normal((5, 5)))[0]
    A = (q * np.array([-1e-17, 0.1, 0.5, 1.0, 2.0])) @ q.T
    A = (A + A.T) / 2
    with pytest.warns(nsiter.IllConditionedWarning, match="eps"):
        nsiter.inv_sqrtm(A, n_iter=5)


def test_zero_matrix_is_rejected_naming_eps():
    with pytest.raises(ValueError, match="zero matrix.*eps"):
        nsiter.inv_sqrtm(np.zeros((3, 3)))


@pytest.mark.parametrize(
    "A,exc,match",
    [
        (np.ones(3), ValueError, "shape \\(\\.\\.\\., n, n\\)"),
        (np.float64(2.0), ValueError, "shape \\(\\.\\.\\., n, n\\)"),
        (np.ones((3, 4)), ValueError, "square"),
        (np.empty((2, 0, 0)), ValueError, "n >= 1"),
        (np.array([[1.0, 0.5], [0.0, 1.0]]), ValueError, "symmetric"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), ValueError, "finite"),
        (np.array([[np.inf, 0.0], [0.0, 1.0]]), ValueError, "finite"),
        (np.eye(2, dtype=complex), TypeError, "complex"),
        (np.array([["a", "b"], ["c", "d"]]), TypeError, "numeric"),
    ],
)
def test_bad_matrices_are_rejected(A, exc, match):
    with pytest.raises(exc, match=match):
        nsiter.inv_sqrtm(A)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(method="newton"), ValueError, "unknown method 'newton'; choose one of: 'coupled'"),
        (dict(scaling="max"), ValueError, "unknown scaling 'max'; choose one of: 'fro', 'trace', 'spectral'"),
        (dict(n_iter=0), ValueError, "n_iter >= 1"),
        (dict(n_iter=-3), ValueError, "n_iter >= 1"),
        (dict(n_iter=2.5), TypeError, "integer n_iter"),
        (dict(tol=0.0), ValueError, "tol > 0"),
        (dict(tol=-1e-3), ValueError, "tol > 0"),
        (dict(tol=float("nan")), ValueError, "tol > 0"),
        (dict(eps=-1.0), ValueError, "eps >= 0"),
        (dict(return_info="yes"), TypeError, "return_info"),
    ],
)
def test_bad_options_are_rejected(kw, exc, match):
    with pytest.raises(exc, match=match):
        nsiter.inv_sqrtm(np.eye(3), **kw)


def test_bad_options_are_rejected_by_sqrtm_psd_too():
    with pytest.raises(ValueError, match="unknown method"):
        nsiter.sqrtm_psd(np.eye(2), method="x")
    with pytest.raises(ValueError, match="positive semidefinite"):
        nsiter.sqrtm_psd(np.diag([1.0, -1.0]))


def test_registries_list_the_methods_and_scalings():
    assert ns.METHODS == ("coupled", "uncoupled", "accelerated", "eigh", "auto")
    assert ns.SCALINGS == ("fro", "trace", "spectral")
    for name in ("inv_sqrtm", "sqrtm_psd", "NewtonSchulzInfo"):
        assert name in nsiter.__all__


def test_auto_splits_a_mixed_batch_between_the_iteration_and_eigh():
    rng = np.random.default_rng(21)
    # the choice depends on n, the predicted step count and the dtype only (not the batch
    # or the thread count): a well-conditioned n = 48 matrix iterates, an ill-conditioned one
    # goes to eigh
    A = np.stack([spd_with_condition(48, 2.0, rng), spd_with_condition(48, 1e8, rng)])
    D, info = nsiter.inv_sqrtm(A, method="auto", tol=1e-6, return_info=True)
    assert info.method == "auto:accelerated+eigh"
    assert np.all(info.converged) and not np.any(info.diverged)
    assert info.best_iter[1] == 1 and info.scale[1] == 1.0
    assert info.residuals.shape == (2, info.n_iter)
    for b in range(2):
        assert np.linalg.norm(D[b] @ D[b] @ A[b] - np.eye(48)) <= 1e-6
        assert_close(D[b], nsiter.inv_sqrtm(A[b], method="auto", tol=1e-6), n=48)


def test_sqrtm_psd_of_the_zero_matrix_is_zero():
    for method in ("coupled", "eigh", "accelerated"):
        S = nsiter.sqrtm_psd(np.zeros((3, 3)), method=method, n_iter=10 if method != "eigh" else None)
        np.testing.assert_array_equal(S, np.zeros((3, 3)))


@pytest.mark.parametrize("method", ["coupled", "accelerated"])
@pytest.mark.parametrize("kw", [dict(n_iter=7), dict(tol=1e-9), dict(tol=1e-9, return_info=True), {},
                                dict(n_iter=20, return_info=True)])
def test_numpy_twin_of_the_kernel_makes_the_same_decisions(method, kw, monkeypatch):
    # large n runs the array-code twin of the fused kernel on numpy @; force it at a small size
    rng = np.random.default_rng(22)
    A = spd_with_condition(12, 1e6, rng, batch=(3,))
    ref = nsiter.inv_sqrtm(A, method=method, **kw)
    monkeypatch.setattr(numba_linalg, "NUMBA_MAX_N", 0)
    got = nsiter.inv_sqrtm(A, method=method, **kw)
    if kw.get("return_info"):
        (ref, ri), (got, gi) = ref, got
        assert gi.n_iter == ri.n_iter
        np.testing.assert_array_equal(gi.best_iter, ri.best_iter)
        np.testing.assert_array_equal(gi.converged, ri.converged)
        np.testing.assert_allclose(gi.residuals, ri.residuals, rtol=1e-3, atol=1e-13)
    assert_close(got, ref, factor=1e3, n=12)


def test_numpy_twin_returns_the_best_iterate_after_a_blow_up(monkeypatch):
    monkeypatch.setattr(numba_linalg, "NUMBA_MAX_N", 0)
    v = np.arange(1.0, 7.0)[None, :]
    A = (v.T @ v + np.diag([1.0, 1, 1, 1, 1, 0])).astype(np.float32)
    A[-1, :] = A[:, -1] = 0.0
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        D, info = nsiter.inv_sqrtm(A, tol=1e-3, n_iter=400, return_info=True)
    assert nsiter.NewtonSchulzDivergenceWarning in {type(x.message) for x in w}
    assert np.all(np.isfinite(D)) and info.diverged
    assert info.residuals[int(info.best_iter) - 1] == np.nanmin(info.residuals)
