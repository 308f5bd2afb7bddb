"""estimate_kernel: recovery, Proposition 1, the A.8 equivalence, CG, monotone GD, bad input."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import uniform_filter

import nsiter
import reference
from helpers import random_images
from nsiter.kernel_estimation import METHODS


def correlate(x, k, **geom):
    """Valid cross-correlation ``y = im2col(x) @ k`` shaped like estimate_kernel's ``y``."""
    x = np.asarray(x)
    X = nsiter.im2col(x, k.shape[-2:], **geom)
    oh, ow = nsiter.output_shape(x.shape, k.shape[-2:], **geom)
    y = X @ k.ravel()
    return y.reshape(x.shape[0], oh, ow) if x.ndim == 4 else y.reshape(oh, ow)


def smooth_image(shape, rng, passes=3):
    """Box-blurred noise: neighbouring pixels strongly correlated, cond(X^T X) ~ 1e6 for 5x5."""
    x = rng.standard_normal(shape)
    axes = (-2, -1)
    for _ in range(passes):
        x = uniform_filter(x, 3, axes=axes)
    return x


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


def rel_excess(est, optimum):
    """``(L_k - L*) / (L_0 - L*)`` per entry of the history."""
    h = est.history
    return (h - optimum) / (h[0] - optimum)


# ------------------------------------------------------------------------------ recovery

def test_lstsq_recovers_a_single_channel_kernel():
    rng = np.random.default_rng(0)
    x = random_images((32, 40), rng)
    k = rng.standard_normal((5, 5))
    est = nsiter.estimate_kernel(x, correlate(x, k), 5)
    assert est.kernel.shape == (5, 5) and est.method == "lstsq" and est.n_iter == 1
    assert rel_err(est.kernel, k) <= 1e-12
    assert est.intercept == 0.0 and est.converged is True
    assert est.history.shape == (2,) and est.history[1] <= 1e-12 * est.history[0]


def test_lstsq_recovers_a_multichannel_rectangular_kernel():
    rng = np.random.default_rng(1)
    x = random_images((3, 24, 28), rng)
    k = rng.standard_normal((3, 3, 4))
    est = nsiter.estimate_kernel(x, correlate(x, k), (3, 4))
    assert est.kernel.shape == (3, 3, 4)
    assert rel_err(est.kernel, k) <= 1e-12


@pytest.mark.parametrize("channel_axis", [False, True])
def test_lstsq_recovers_a_kernel_from_a_batch(channel_axis):
    rng = np.random.default_rng(2)
    x = random_images((2, 3, 14, 16), rng)
    k = rng.standard_normal((3, 3, 3))
    y = correlate(x, k)
    if channel_axis:
        y = y[:, None]  # (N, 1, oh, ow): one output channel
    est = nsiter.estimate_kernel(x, y, 3)
    assert est.kernel.shape == (3, 3, 3)
    assert rel_err(est.kernel, k) <= 1e-12


def test_lstsq_on_a_smooth_image_recovers_the_kernel_to_1e_7():
    rng = np.random.default_rng(3)
    x = smooth_image((48, 56), rng)
    k = rng.standard_normal((5, 5))
    est = nsiter.estimate_kernel(x, correlate(x, k), 5)
    assert est.condition > 1e5
    assert rel_err(est.kernel, k) <= 1e-7


@pytest.mark.parametrize("fit_intercept", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.3])
@pytest.mark.parametrize("geom", [dict(), dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2))])
def test_lstsq_equals_the_svd_reference_on_noisy_data(fit_intercept, eps, geom):
    rng = np.random.default_rng(4)
    x = random_images((2, 2, 11, 13), rng) + 0.5
    k = rng.standard_normal((2, 3, 3))
    y = correlate(x, k, **geom) + 0.1 * rng.standard_normal(correlate(x, k, **geom).shape) + 0.7
    est = nsiter.estimate_kernel(x, y, 3, fit_intercept=fit_intercept, eps=eps, **geom)
    w, b = reference.estimate_kernel(x, y, 3, fit_intercept=fit_intercept, eps=eps, **geom)
    np.testing.assert_allclose(est.kernel.ravel(), w, rtol=1e-10, atol=1e-10)
    assert est.intercept == pytest.approx(b, abs=1e-10)
    assert est.loss == pytest.approx(est.optimum_loss, rel=1e-12)


def test_fit_intercept_recovers_a_bias_that_the_plain_problem_cannot():
    rng = np.random.default_rng(5)
    x = random_images((30, 30), rng)
    k = rng.standard_normal((3, 3))
    y = correlate(x, k) + 3.0
    with_b = nsiter.estimate_kernel(x, y, 3, fit_intercept=True)
    without = nsiter.estimate_kernel(x, y, 3)
    assert with_b.intercept == pytest.approx(3.0, abs=1e-10)
    assert rel_err(with_b.kernel, k) <= 1e-10
    assert rel_err(without.kernel, k) > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_every_method_returns_a_finite_kernel_of_the_right_shape(method):
    rng = np.random.default_rng(6)
    x = random_images((2, 12, 13), rng)
    k = rng.standard_normal((2, 3, 3))
    est = nsiter.estimate_kernel(x, correlate(x, k), 3, method=method)
    assert est.kernel.shape == (2, 3, 3) and est.method == method
    assert np.all(np.isfinite(est.kernel)) and np.all(np.isfinite(est.history))
    assert len(est.history) == est.n_iter + 1 and est.loss == est.history[-1]
    assert est.history[-1] < est.history[0]


def test_float32_is_preserved_and_integers_promote_to_float64():
    rng = np.random.default_rng(7)
    x = random_images((20, 20), rng)
    k = rng.standard_normal((3, 3))
    y = correlate(x, k)
    e32 = nsiter.estimate_kernel(x.astype(np.float32), y.astype(np.float32), 3)
    assert e32.kernel.dtype == np.float32
    np.testing.assert_allclose(e32.kernel, k, atol=1e-4)
    xi = rng.integers(0, 5, (15, 15))
    ei = nsiter.estimate_kernel(xi, correlate(xi.astype(float), k), 3)
    assert ei.kernel.dtype == np.float64
    np.testing.assert_allclose(ei.kernel, k, atol=1e-10)


def test_inputs_are_not_modified():
    rng = np.random.default_rng(8)
    x = random_images((1, 2, 12, 12), rng)
    y = correlate(x, rng.standard_normal((2, 3, 3)))
    x0, y0 = x.copy(), y.copy()
    for method in METHODS:
        nsiter.estimate_kernel(x, y, 3, method=method, padding=0)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)


# ------------------------------------------------------------------------------ Proposition 1

@pytest.mark.parametrize("fit_intercept", [True, False])
def test_one_whitened_step_reaches_the_optimum_proposition_1(fit_intercept):
    rng = np.random.default_rng(9)
    x = smooth_image((48, 56), rng) + 0.5
    k = rng.standard_normal((5, 5))
    y = correlate(x, k) + 1e-3 * rng.standard_normal((44, 52))
    opt = nsiter.estimate_kernel(x, y, 5, fit_intercept=fit_intercept)
    assert opt.condition > 1e5  # the data violate the optimality condition badly
    one = nsiter.estimate_kernel(x, y, 5, method="gd_whitened", fit_intercept=fit_intercept)
    assert one.n_iter == 1 and one.lr == 1.0
    assert rel_err(one.kernel, opt.kernel) <= 1e-7
    assert one.intercept == pytest.approx(opt.intercept, abs=1e-8)
    assert rel_excess(one, opt.loss)[1] <= 1e-12
    # the same single step on the raw features is nowhere near
    gd = nsiter.estimate_kernel(x, y, 5, method="gd", n_iter=1, fit_intercept=fit_intercept)
    assert rel_excess(gd, opt.loss)[1] > 1e-3


def test_one_whitened_step_solves_the_ridge_problem_exactly():
    rng = np.random.default_rng(10)
    x = smooth_image((2, 30, 34), rng)
    y = correlate(x, rng.standard_normal((2, 3, 3))) + 0.01 * rng.standard_normal((28, 32))
    opt = nsiter.estimate_kernel(x, y, 3, eps=1e-3, fit_intercept=True)
    one = nsiter.estimate_kernel(x, y, 3, method="gd_whitened", eps=1e-3)
    assert rel_err(one.kernel, opt.kernel) <= 1e-10
    assert rel_excess(one, opt.loss)[1] <= 1e-12


def test_whitened_step_with_newton_schulz_whitening_is_exact_as_far_as_D_is():
    rng = np.random.default_rng(11)
    x = random_images((24, 24), rng)
    k = rng.standard_normal((3, 3))
    y = correlate(x, k)
    ns = nsiter.estimate_kernel(x, y, 3, method="gd_whitened", sqrtm_method="coupled")
    assert rel_err(ns.kernel, k) <= 1e-6


# ------------------------------------------------------------------------------ appendix A.8

@pytest.mark.parametrize("fit_intercept", [True, False])
def test_preconditioned_gd_iterates_equal_whitened_gd_iterates(fit_intercept):
    rng = np.random.default_rng(12)
    x = smooth_image((2, 26, 30), rng, passes=2) + 0.3
    y = correlate(x, rng.standard_normal((2, 3, 3))) + 0.05 * rng.standard_normal((24, 28))
    runs = {}
    for method in ("gd_whitened", "preconditioned"):
        path = []
        est = nsiter.estimate_kernel(x, y, 3, method=method, lr=0.3, n_iter=7, fit_intercept=fit_intercept,
                                     callback=lambda w, b: path.append(np.append(w.ravel(), b)))
        runs[method] = (est, np.array(path))
    (ew, pw), (ep, pp) = runs["gd_whitened"], runs["preconditioned"]
    assert pw.shape == pp.shape == (7, 19)
    np.testing.assert_allclose(pw, pp, rtol=1e-9, atol=1e-9 * np.abs(pp).max())
    np.testing.assert_allclose(ew.history, ep.history, rtol=1e-10)


def test_preconditioned_and_whitened_sgd_agree_on_the_same_mini_batches():
    rng = np.random.default_rng(13)
    x = smooth_image((30, 30), rng, passes=2)
    y = correlate(x, rng.standard_normal((3, 3)))
    kw = dict(batch_size=64, rng=5, n_iter=6, lr=0.5)
    a = nsiter.estimate_kernel(x, y, 3, method="gd_whitened", **kw)
    b = nsiter.estimate_kernel(x, y, 3, method="preconditioned", fit_intercept=True, **kw)
    np.testing.assert_allclose(a.kernel, b.kernel, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(a.history, b.history, rtol=1e-9)


# ------------------------------------------------------------------------------ conjugate gradients

@pytest.mark.parametrize("fit_intercept", [False, True])
def test_cg_matches_lstsq_and_reports_its_iterations(fit_intercept):
    rng = np.random.default_rng(14)
    x = smooth_image((2, 30, 34), rng, passes=2) + 0.2
    y = correlate(x, rng.standard_normal((2, 3, 3))) + 0.01 * rng.standard_normal((28, 32))
    opt = nsiter.estimate_kernel(x, y, 3, fit_intercept=fit_intercept)
    cg = nsiter.estimate_kernel(x, y, 3, method="cg", fit_intercept=fit_intercept)
    assert cg.converged is True and cg.grad_norm <= 1e-12
    assert 1 <= cg.n_iter <= 10 * 18 and len(cg.history) == cg.n_iter + 1
    assert rel_err(cg.kernel, opt.kernel) <= 1e-6
    assert cg.intercept == pytest.approx(opt.intercept, abs=1e-6)
    assert cg.loss == pytest.approx(opt.loss, rel=1e-9)


def test_cg_minimises_the_ridge_objective():
    rng = np.random.default_rng(15)
    x = random_images((20, 22), rng)
    y = correlate(x, rng.standard_normal((3, 3))) + 0.1 * rng.standard_normal((18, 20))
    opt = nsiter.estimate_kernel(x, y, 3, eps=0.5)
    cg = nsiter.estimate_kernel(x, y, 3, method="cg", eps=0.5)
    assert rel_err(cg.kernel, opt.kernel) <= 1e-9


def test_cg_stops_at_n_iter_without_converging():
    rng = np.random.default_rng(16)
    x = smooth_image((30, 30), rng)
    y = correlate(x, rng.standard_normal((5, 5)))
    cg = nsiter.estimate_kernel(x, y, 5, method="cg", n_iter=3)
    assert cg.n_iter == 3 and cg.converged is False and len(cg.history) == 4


# ------------------------------------------------------------------------------ gradient descent

@settings(max_examples=15)
@given(st.floats(0.05, 1.95), st.sampled_from(["gd", "gd_standardized"]), st.booleans())
def test_full_batch_gd_history_is_monotone_for_lr_below_2_over_lambda_max(frac, method, fit_intercept):
    rng = np.random.default_rng(17)
    x = smooth_image((2, 14, 15), rng, passes=2) + 0.5
    y = correlate(x, rng.standard_normal((2, 3, 3))) + 0.1 * rng.standard_normal((12, 13))
    safe = nsiter.estimate_kernel(x, y, 3, method=method, n_iter=1, fit_intercept=fit_intercept).lr
    est = nsiter.estimate_kernel(x, y, 3, method=method, lr=frac * safe, n_iter=40, fit_intercept=fit_intercept)
    assert np.all(np.diff(est.history) <= 1e-13 * est.history[0])


def test_gd_converges_to_lstsq_on_a_well_conditioned_problem():
    rng = np.random.default_rng(18)
    x = rng.standard_normal((40, 40))
    y = correlate(x, rng.standard_normal((3, 3))) + 0.1 * rng.standard_normal((38, 38))
    opt = nsiter.estimate_kernel(x, y, 3)
    for method in ("gd", "gd_standardized"):
        est = nsiter.estimate_kernel(x, y, 3, method=method, n_iter=300, fit_intercept=False)
        assert rel_err(est.kernel, opt.kernel) <= 1e-8, method


def test_gd_crawls_on_correlated_features_where_whitening_takes_one_step():
    rng = np.random.default_rng(19)
    x = smooth_image((40, 40), rng) + 0.5
    y = correlate(x, rng.standard_normal((5, 5)))
    opt = nsiter.estimate_kernel(x, y, 5, fit_intercept=True)
    gd = nsiter.estimate_kernel(x, y, 5, method="gd", n_iter=100, fit_intercept=True)
    bn = nsiter.estimate_kernel(x, y, 5, method="gd_standardized", n_iter=100)
    assert rel_excess(gd, opt.loss)[-1] > 1e-4
    assert rel_excess(bn, opt.loss)[-1] > 1e-4


def test_tol_stops_early_and_reports_convergence():
    rng = np.random.default_rng(20)
    x = rng.standard_normal((30, 30))
    y = correlate(x, rng.standard_normal((3, 3)))
    est = nsiter.estimate_kernel(x, y, 3, method="gd", n_iter=1000, tol=1e-6)
    assert est.converged is True and est.grad_norm <= 1e-6 and est.n_iter < 1000
    assert len(est.history) == est.n_iter + 1
    short = nsiter.estimate_kernel(x, y, 3, method="gd", n_iter=2, tol=1e-12)
    assert short.converged is False and short.n_iter == 2
    assert nsiter.estimate_kernel(x, y, 3, method="gd", n_iter=5).converged is None


def test_callback_sees_every_iterate():
    rng = np.random.default_rng(21)
    x = random_images((2, 12, 12), rng)
    y = correlate(x, rng.standard_normal((2, 3, 3)))
    seen = []
    est = nsiter.estimate_kernel(x, y, 3, method="gd_standardized", n_iter=4,
                                 callback=lambda w, b: seen.append((w.shape, b)))
    assert len(seen) == est.n_iter == 4 and seen[0][0] == (2, 3, 3)
    assert seen[-1][1] == est.intercept


def test_too_large_a_learning_rate_warns_and_returns_the_last_finite_iterate():
    rng = np.random.default_rng(22)
    x = random_images((20, 20), rng)
    y = correlate(x, rng.standard_normal((3, 3)))
    safe = nsiter.estimate_kernel(x, y, 3, method="gd", n_iter=1).lr
    with pytest.warns(nsiter.NsiterWarning, match="diverged"):
        est = nsiter.estimate_kernel(x, y, 3, method="gd", lr=5 * safe, n_iter=5000)
    assert est.n_iter < 5000 and np.all(np.isfinite(est.history)) and np.all(np.isfinite(est.kernel))


def test_a_mini_batch_of_every_patch_is_the_full_batch_step():
    rng = np.random.default_rng(26)
    x = smooth_image((2, 16, 18), rng) + 0.5
    y = correlate(x, rng.standard_normal((2, 3, 3))) + 0.01 * rng.standard_normal((14, 16))
    full = nsiter.estimate_kernel(x, y, 3, method="gd_whitened")
    batch = nsiter.estimate_kernel(x, y, 3, method="gd_whitened", batch_size=14 * 16, rng=3)
    np.testing.assert_allclose(batch.kernel, full.kernel, rtol=1e-9, atol=1e-9 * np.abs(full.kernel).max())
    for method in ("gd", "gd_standardized"):
        a = nsiter.estimate_kernel(x, y, 3, method=method, n_iter=3, fit_intercept=True)
        b = nsiter.estimate_kernel(x, y, 3, method=method, n_iter=3, fit_intercept=True, batch_size=14 * 16)
        np.testing.assert_allclose(b.history, a.history, rtol=1e-10)


def test_whitened_sgd_reaches_a_low_cost_in_a_few_mini_batch_steps():
    rng = np.random.default_rng(23)
    x = smooth_image((60, 60), rng, passes=2)
    y = correlate(x, rng.standard_normal((3, 3)))
    opt = nsiter.estimate_kernel(x, y, 3, fit_intercept=True)
    sgd = nsiter.estimate_kernel(x, y, 3, method="gd_whitened", batch_size=512, rng=0, n_iter=10)
    again = nsiter.estimate_kernel(x, y, 3, method="gd_whitened", batch_size=512, rng=0, n_iter=10)
    np.testing.assert_array_equal(sgd.kernel, again.kernel)
    assert sgd.batch_size == 512
    assert rel_excess(sgd, opt.loss)[5] <= 1e-3
    gd = nsiter.estimate_kernel(x, y, 3, method="gd", batch_size=512, rng=0, n_iter=10, fit_intercept=True)
    assert rel_excess(gd, opt.loss)[5] > 1e-2


# ------------------------------------------------------------------------------ bad input

def _xy(rng=None):
    rng = rng or np.random.default_rng(24)
    x = random_images((12, 12), rng)
    return x, correlate(x, rng.standard_normal((3, 3)))


def test_y_of_the_wrong_shape_says_the_expected_shape():
    x, y = _xy()
    with pytest.raises(ValueError, match=r"expected y of shape \(10, 10\)"):
        nsiter.estimate_kernel(x, y[:-1], 3)
    xb = np.stack([x, x])[:, None]
    with pytest.raises(ValueError, match=r"expected y of shape \(2, 10, 10\)"):
        nsiter.estimate_kernel(xb, y, 3)


def test_kernel_larger_than_x_is_rejected():
    x, y = _xy()
    with pytest.raises(ValueError, match="larger than"):
        nsiter.estimate_kernel(x, y, 13)


@pytest.mark.parametrize("which", ["x", "y"])
def test_non_finite_input_is_rejected(which):
    x, y = _xy()
    bad = (x if which == "x" else y).copy()
    bad[2, 3] = np.nan if which == "x" else np.inf
    args = (bad, y) if which == "x" else (x, bad)
    with pytest.raises(ValueError, match=f"finite values in {which}"):
        nsiter.estimate_kernel(*args, 3)


def test_unknown_method_lists_the_choices():
    x, y = _xy()
    with pytest.raises(ValueError, match="choose one of: 'lstsq', 'gd'.*'cg'"):
        nsiter.estimate_kernel(x, y, 3, method="adam")


@pytest.mark.parametrize("lr", [0.0, -1.0, np.inf])
def test_non_positive_learning_rate_is_rejected(lr):
    x, y = _xy()
    with pytest.raises(ValueError, match="lr > 0"):
        nsiter.estimate_kernel(x, y, 3, method="gd", lr=lr)


def test_n_iter_below_one_is_rejected():
    x, y = _xy()
    with pytest.raises(ValueError, match="n_iter >= 1"):
        nsiter.estimate_kernel(x, y, 3, method="gd", n_iter=0)
    with pytest.raises(TypeError, match="integer n_iter"):
        nsiter.estimate_kernel(x, y, 3, method="gd", n_iter=2.5)


def test_other_bad_options_are_rejected():
    x, y = _xy()
    with pytest.raises(ValueError, match="tol > 0"):
        nsiter.estimate_kernel(x, y, 3, method="cg", tol=0)
    with pytest.raises(ValueError, match="eps >= 0"):
        nsiter.estimate_kernel(x, y, 3, eps=-1)
    with pytest.raises(ValueError, match="batch_size applies to the gradient methods"):
        nsiter.estimate_kernel(x, y, 3, batch_size=8)
    with pytest.raises(ValueError, match="batch_size <= the number of patches 100"):
        nsiter.estimate_kernel(x, y, 3, method="gd", batch_size=101)
    with pytest.raises(TypeError, match="fit_intercept"):
        nsiter.estimate_kernel(x, y, 3, fit_intercept="yes")
    with pytest.raises(TypeError, match="callable"):
        nsiter.estimate_kernel(x, y, 3, callback=3)
    with pytest.raises(TypeError, match="complex"):
        nsiter.estimate_kernel(x + 0j, y, 3)


def test_singular_normal_matrix_asks_for_a_ridge():
    x = np.ones((10, 10))
    y = np.full((8, 8), 2.0)
    for method in ("lstsq", "gd_whitened", "preconditioned"):
        with pytest.raises(ValueError, match="singular.*eps > 0"):
            nsiter.estimate_kernel(x, y, 3, method=method, fit_intercept=True)
    est = nsiter.estimate_kernel(x, y, 3, eps=1e-6, fit_intercept=True)
    assert np.all(np.isfinite(est.kernel)) and est.loss == pytest.approx(0.0, abs=1e-12)
    gd = nsiter.estimate_kernel(x, y, 3, method="gd", n_iter=50)  # GD needs no factorisation
    assert gd.optimum_loss is None and gd.history[-1] < 1e-6 * gd.history[0]


@pytest.mark.parametrize("method", METHODS)
def test_zero_targets_give_the_zero_kernel(method):
    x = random_images((12, 12), np.random.default_rng(25))
    est = nsiter.estimate_kernel(x, np.zeros((10, 10)), 3, method=method, tol=1e-8)
    np.testing.assert_array_equal(est.kernel, 0.0)
    assert est.loss == 0.0 and est.converged is True
