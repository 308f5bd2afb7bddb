"""nsiter.deconvnet (Zeiler et al. 2010): operators, the x-subproblem, both inference methods, learning.

The references here are slow and obviously correct: the correlation matrix ``F`` is built entry by
entry from the definition of Eq. 1/3, the x-subproblem is minimised by a dense grid plus bounded
scalar minimisation, and Eq. 3 is minimised by L-BFGS-B on the split ``z = u - v, u, v >= 0``
with that explicit matrix.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize, minimize_scalar

from nsiter import deconvnet as dn

BOUNDARIES = dn.BOUNDARIES


# ----------------------------------------------------------------------------------------------- references
def correlation_matrix(filters, g, image_hw, boundary):
    """Explicit ``F`` of Eq. 3 (rows: (c, r, q) of the image, columns: (k, m, n) of the maps)."""
    k_maps, n_ch, kh, kw = filters.shape
    nh, nw = image_hw
    mh, mw = (nh + kh - 1, nw + kw - 1) if boundary == "valid" else (nh, nw)
    a = np.zeros((n_ch, nh, nw, k_maps, mh, mw))
    for c in range(n_ch):
        for r in range(nh):
            for q in range(nw):
                for k in range(k_maps):
                    if not g[k, c]:
                        continue
                    for i in range(kh):
                        for j in range(kw):
                            a[c, r, q, k, (r + i) % mh, (q + j) % mw] += filters[k, c, i, j]
    return a.reshape(n_ch * nh * nw, k_maps * mh * mw)


def eq3_reference(y, filters, g, boundary, lam):
    """``min_z lam/2 ||F z - y||^2 + ||z||_1`` by L-BFGS-B on ``z = u - v`` (one image)."""
    a = correlation_matrix(filters, g, y.shape[-2:], boundary)
    b = y.ravel()
    n = a.shape[1]

    def fun(w):
        z = w[:n] - w[n:]
        r = a @ z - b
        grad = lam * (a.T @ r)
        return 0.5 * lam * r @ r + w.sum(), np.concatenate([grad + 1.0, -grad + 1.0])

    res = minimize(fun, np.zeros(2 * n), jac=True, method="L-BFGS-B", bounds=[(0, None)] * (2 * n),
                   options=dict(maxiter=20000, maxfun=40000, ftol=1e-13, gtol=1e-10))
    return res.fun


def x_subproblem_reference(v, beta, p):
    """``min_x beta/2 (x - v)^2 + |x|^p``: dense grid between 0 and v, then bounded refinement."""
    cost = lambda x: 0.5 * beta * (x - v) ** 2 + np.abs(x) ** p  # noqa: E731
    grid = np.linspace(min(0.0, v), max(0.0, v), 4001)
    j = int(np.argmin(cost(grid)))
    lo, hi = grid[max(j - 1, 0)], grid[min(j + 1, grid.size - 1)]
    res = minimize_scalar(cost, bounds=(lo, hi), method="bounded", options=dict(xatol=1e-14))
    return min(cost(0.0), res.fun)


def problem(rng, n_img=1, n_ch=1, n_maps=3, hw=(6, 7), k=(3, 2), boundary="valid"):
    y = rng.standard_normal((n_img, n_ch) + hw)
    f = rng.standard_normal((n_maps, n_ch) + k)
    g = np.ones((n_maps, n_ch))
    if n_ch > 1:
        g[0, 1:] = 0  # a sparse connectivity: map 0 sees channel 0 only
        g[-1, 0] = 0
    return y, f, g


def operators(y, f, g, boundary):
    y4, f4, gg, geo, _ = dn._prepare(y, f, g, boundary)
    return y4, f4, gg, geo, dn._SpatialOperator(f4, gg, geo)


# ------------------------------------------------------------------------------------------ operators (Eq. 5-9)
@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 2, 3), (1, 3, 4)])
def test_spatial_operator_adjoint_dot_test(boundary, shape):
    rng = np.random.default_rng(11)
    n_img, n_ch, n_maps = shape
    y, f, g = problem(rng, n_img, n_ch, n_maps, boundary=boundary)
    y4, f4, gg, geo, sop = operators(y, f, g, boundary)
    z = rng.standard_normal(geo.map_shape)
    r = rng.standard_normal(y4.shape)
    lhs, rhs = np.vdot(sop.forward(z), r), np.vdot(z, sop.adjoint(r))
    assert abs(lhs - rhs) <= 1e-12 * max(abs(lhs), 1.0)


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_filter_operator_adjoint_dot_test(boundary):
    """Eq. 9's ``Z f`` and ``Z^T r`` are adjoint in ``f``."""
    rng = np.random.default_rng(12)
    y, f, g = problem(rng, 2, 2, 3, boundary=boundary)
    y4, f4, gg, geo, _ = operators(y, f, g, boundary)
    zp = dn._pad_maps(rng.standard_normal(geo.map_shape), geo)
    r = rng.standard_normal(y4.shape)
    lhs = np.vdot(dn._synthesize_filters(zp, f4, geo), r)
    rhs = np.vdot(f4, dn._filter_adjoint(zp, r, geo))
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_fourier_operator_matches_spatial_and_is_adjoint(boundary):
    rng = np.random.default_rng(13)
    y, f, g = problem(rng, 2, 2, 3, boundary=boundary)
    y4, f4, gg, geo, sop = operators(y, f, g, boundary)
    grid = (geo.mh + 3, geo.mw + 1) if boundary == "valid" else None  # any grid >= the maps (valid)
    fop = dn._FourierOperator(f4, gg, geo, grid=grid)
    z = np.zeros((geo.n_img, geo.n_maps) + fop.grid)
    z[:, :, :geo.mh, :geo.mw] = rng.standard_normal(geo.map_shape)
    np.testing.assert_allclose(fop.forward(z)[:, :, :geo.nh, :geo.nw], sop.forward(z[:, :, :geo.mh, :geo.mw]),
                               atol=1e-12)
    r = rng.standard_normal((geo.n_img, geo.n_ch) + fop.grid)
    lhs, rhs = np.vdot(fop.forward(z), r), np.vdot(z, fop.adjoint(r))
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)


@pytest.mark.parametrize("n_ch", [1, 3])
def test_fourier_solve_inverts_the_admm_system(n_ch):
    """The per-frequency Woodbury solve: ``(F^H F + rho I) x = b``."""
    rng = np.random.default_rng(14)
    y, f, g = problem(rng, 2, n_ch, 4, hw=(6, 6), boundary="circular")
    _, f4, gg, geo, _ = operators(y, f, g, "circular")
    fop = dn._FourierOperator(f4, gg, geo)
    x = rng.standard_normal(geo.map_shape)
    b = fop.adjoint(fop.forward(x)) + 0.7 * x
    np.testing.assert_allclose(fop.spatial(fop.solve(fop.spectrum(b), 0.7)), x, atol=1e-11)


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_normal_operator_matches_explicit_matrix(boundary):
    """``A z`` of Eq. 7 (two correlations) equals ``(F^T F + beta/lam I) z`` with ``F`` formed entrywise."""
    rng = np.random.default_rng(15)
    y, f, g = problem(rng, 1, 2, 3, hw=(5, 4), k=(3, 2), boundary=boundary)
    y4, f4, gg, geo, sop = operators(y, f, g, boundary)
    a = correlation_matrix(f4, gg, (geo.nh, geo.nw), boundary)
    z = rng.standard_normal(geo.map_shape)
    shift = 6.0 / 2.5
    np.testing.assert_allclose(sop.forward(z).ravel(), a @ z.ravel(), atol=1e-12)
    np.testing.assert_allclose(sop.normal(z, shift).ravel(), (a.T @ a + shift * np.eye(a.shape[1])) @ z.ravel(),
                               atol=1e-11)
    np.testing.assert_allclose(dn.reconstruct(z[0], f4, boundary=boundary, connectivity=gg).ravel(), a @ z.ravel(),
                               atol=1e-12)


# ----------------------------------------------------------------------------------------- x-subproblem (Eq. 8)
@pytest.mark.parametrize("p", [1.0, 0.8, 0.5, 0.2])
@pytest.mark.parametrize("beta", [0.5, 6.0, 1296.0])
def test_shrink_matches_brute_force_1d_minimisation(p, beta):
    scale = beta ** (-1.0 / (2.0 - p))
    v = scale * np.concatenate([np.linspace(-90, 90, 37), [1e-3, 2.0, 99.0, 500.0]])
    x = dn.shrink(v, beta, p)
    got = 0.5 * beta * (x - v) ** 2 + np.abs(x) ** p
    best = np.array([x_subproblem_reference(vi, beta, p) for vi in v])
    assert np.all(got <= best + 1e-10 * np.maximum(1.0, np.abs(best)))


def test_shrink_p1_is_eq8_and_keeps_dtype():
    v = np.array([[-3.0, -0.1, 0.0, 0.2, 2.5]], dtype=np.float32)
    x = dn.shrink(v, 2.0)
    assert x.dtype == np.float32 and x.shape == v.shape
    np.testing.assert_array_equal(x, np.maximum(np.abs(v) - 0.5, 0) * np.sign(v))


def test_shrink_jump_of_the_lookup_table():
    """For p < 1 the solution jumps from 0 to ``u_t`` at ``w_t`` (beta = 1)."""
    p = 0.5
    u_t = (2 * (1 - p)) ** (1 / (2 - p))
    w_t = u_t + p * u_t ** (p - 1)
    x = dn.shrink(np.array([w_t * (1 - 1e-9), w_t * (1 + 1e-9)]), 1.0, p)
    assert x[0] == 0.0 and abs(x[1] - u_t) < 1e-6


# ------------------------------------------------------------------------------------------ inference (Eq. 3/4)
@pytest.mark.parametrize("p", [1.0, 0.6])
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_auxiliary_cost_eq4_decreases_monotonically_at_fixed_beta(p, boundary):
    rng = np.random.default_rng(21)
    y, f, g = problem(rng, 2, 2, 3, hw=(8, 7), boundary=boundary)
    res = dn.infer_feature_maps(y, f, connectivity=g, p=p, lam=3.0, boundary=boundary, beta0=4.0, beta_max=5.0,
                                n_inner=12, cg_tol=1e-6)
    assert np.all(res.auxiliary_beta == 4.0) and res.auxiliary_history.size == 24
    h = res.auxiliary_history
    assert np.all(np.diff(h) <= 1e-10 * h[0])
    final = dn.auxiliary_objective(y, f, res.z, res.auxiliary, beta=4.0, lam=3.0, p=p, boundary=boundary,
                                   connectivity=g)
    assert abs(final - h[-1]) <= 1e-10 * h[-1]


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("n_ch", [1, 2])
def test_admm_reaches_the_eq3_minimum_of_an_independent_solver(boundary, n_ch):
    rng = np.random.default_rng(22 + n_ch)
    y, f, g = problem(rng, 1, n_ch, 3, hw=(7, 6), boundary=boundary)
    lam = 4.0
    ref = eq3_reference(y[0], f, g, boundary, lam)
    res = dn.infer_feature_maps(y, f, connectivity=g, lam=lam, method="admm", boundary=boundary, tol=1e-9,
                                max_iter=20000)
    assert res.converged
    assert abs(res.objective - ref) <= 1e-7 * ref
    assert res.objective == pytest.approx(dn.objective(y, f, res.z, lam=lam, boundary=boundary, connectivity=g))


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_cg_continuation_approaches_the_eq3_minimum(boundary):
    """The paper's method with a long schedule reaches the optimum; with its defaults it is above it."""
    rng = np.random.default_rng(24)
    y, f, g = problem(rng, 1, 2, 3, hw=(7, 6), boundary=boundary)
    lam = 4.0
    ref = eq3_reference(y[0], f, g, boundary, lam)
    fine = dn.infer_feature_maps(y, f, connectivity=g, lam=lam, boundary=boundary, beta0=1.0, beta_inc=4.0,
                                 beta_max=1e8, n_inner=30, cg_tol=1e-9, cg_max_iter=200)
    assert ref <= fine.objective * (1 + 1e-9) and fine.objective <= ref * (1 + 5e-3)  # block descent: slow at large beta
    paper = dn.infer_feature_maps(y, f, connectivity=g, lam=lam, boundary=boundary)
    assert paper.n_iter == 7 and np.allclose(paper.beta, 6.0 ** np.arange(7))  # 1, 6, ..., 46656 < 1e5
    assert ref <= paper.objective * (1 + 1e-9)
    assert np.max(np.abs(paper.z - paper.auxiliary)) <= 1.0 / paper.beta[-1] + 1e-12  # Eq. 8 threshold


@pytest.mark.parametrize("method", dn.METHODS)
def test_batched_inference_equals_looped(method):
    """cg: per-image CG scalars, so the same iterates; admm: one penalty for the batch, equal at convergence."""
    rng = np.random.default_rng(25)
    y, f, g = problem(rng, 3, 2, 3, hw=(6, 6))
    opts = dict(tol=1e-8, max_iter=20000) if method == "admm" else {}
    batch = dn.infer_feature_maps(y, f, connectivity=g, method=method, **opts)
    for i in range(3):
        one = dn.infer_feature_maps(y[i], f, connectivity=g, method=method, **opts)
        np.testing.assert_allclose(batch.z[i], one.z, atol=1e-6)


def test_shapes_dtypes_and_inputs_untouched():
    rng = np.random.default_rng(26)
    y = rng.standard_normal((6, 5)).astype(np.float32)
    f = rng.standard_normal((2, 3, 3)).astype(np.float32)
    y0, f0 = y.copy(), f.copy()
    for method in dn.METHODS:
        res = dn.infer_feature_maps(y, f, method=method)
        assert res.z.shape == (2, 8, 7) == dn.feature_map_shape(y.shape, 3, 2)
        assert res.z.dtype == np.float32 and res.auxiliary.dtype == np.float32
        assert isinstance(res.objective, float) and res.history.dtype == np.float64
    circ = dn.infer_feature_maps(y, f, boundary="circular")
    assert circ.z.shape == (2, 6, 5) == dn.feature_map_shape(y.shape, 3, 2, boundary="circular")
    assert dn.reconstruct(circ.z, f, boundary="circular").shape == (6, 5)
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(f, f0)
    assert dn.feature_map_shape((4, 1, 6, 5), (3, 2), 7) == (4, 7, 8, 6)


def test_zero_image_gives_zero_maps():
    f = np.ones((2, 1, 3, 3))
    for method in dn.METHODS:
        res = dn.infer_feature_maps(np.zeros((1, 1, 5, 5)), f, method=method)
        assert not res.z.any() and res.objective == 0.0 and res.n_iter == 0 and res.converged


def test_warm_start_and_disconnected_maps():
    rng = np.random.default_rng(27)
    y, f, g = problem(rng, 1, 2, 3, hw=(6, 6))
    g[1] = 0  # map 1 is connected to nothing: its optimum is zero
    res = dn.infer_feature_maps(y, f, connectivity=g, method="admm", tol=1e-7, max_iter=5000)
    assert np.max(np.abs(res.z[0, 1])) == 0.0
    warm = dn.infer_feature_maps(y, f, connectivity=g, method="admm", z0=res.z, tol=1e-7, max_iter=5000)
    assert warm.n_iter < res.n_iter and warm.objective == pytest.approx(res.objective, rel=1e-6)


# -------------------------------------------------------------------------------------- learning (Algorithm 1)
@pytest.mark.parametrize("filter_solver", dn.FILTER_SOLVERS)
@pytest.mark.parametrize("method", dn.METHODS)
def test_learn_filters_algorithm1(method, filter_solver):
    rng = np.random.default_rng(31)
    y = rng.standard_normal((2, 1, 12, 12))
    y[:, :, 3:9, 5] += 3.0  # a shared edge to learn
    res = dn.learn_filters(y, 3, 3, n_epochs=3, method=method, filter_solver=filter_solver, seed=4)
    assert res.history.shape == (7,) and res.steps[:3] == ("init", "infer 1", "filters 1")
    h = res.history
    assert np.all(h[2::2] <= h[1::2] * (1 + 1e-12))  # the filter step never raises Eq. 3
    assert h[-1] < h[1] < h[0]
    np.testing.assert_allclose(np.linalg.norm(res.filters.reshape(3, -1), axis=1), 1.0, rtol=1e-12)
    again = dn.learn_filters(y, 3, 3, n_epochs=3, method=method, filter_solver=filter_solver, seed=4)
    np.testing.assert_array_equal(res.filters, again.filters)  # deterministic
    # the history's last entry is Eq. 3 at the returned filters and maps
    assert res.history[-1] == pytest.approx(dn.objective(y, res.filters, res.z))


def test_learn_filters_respects_connectivity_and_layer2_map():
    g2 = dn.connectivity_map(9)
    assert g2.shape == (45, 9) and g2.sum(axis=1).tolist() == [1] * 9 + [2] * 36  # the paper's layer 2
    rng = np.random.default_rng(32)
    y = rng.standard_normal((1, 3, 8, 8))
    g = dn.connectivity_map(3, singles=False)
    res = dn.learn_filters(y, 3, 3, connectivity=g, n_epochs=1)
    assert np.all(res.filters[~g] == 0) and np.array_equal(res.connectivity, g)


# ------------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_rejected_with_a_fix():
    rng = np.random.default_rng(41)
    y, f = rng.standard_normal((6, 6)), rng.standard_normal((2, 3, 3))
    with pytest.raises(TypeError, match="complex"):
        dn.infer_feature_maps(y + 1j, f)
    with pytest.raises(TypeError, match="masked"):
        dn.infer_feature_maps(np.ma.masked_array(y), f)
    with pytest.raises(ValueError, match="ndim"):
        dn.infer_feature_maps(y[None, None, None], f)
    with pytest.raises(ValueError, match="finite"):
        dn.infer_feature_maps(np.full((6, 6), np.nan), f)
    with pytest.raises(ValueError, match="non-empty"):
        dn.infer_feature_maps(np.zeros((0, 6)), f)
    with pytest.raises(ValueError, match="one-channel"):
        dn.infer_feature_maps(np.zeros((2, 6, 6)), f)
    with pytest.raises(ValueError, match="input channels"):
        dn.infer_feature_maps(np.zeros((2, 6, 6)), np.zeros((2, 3, 3, 3)))
    with pytest.raises(ValueError, match="connectivity of shape"):
        dn.infer_feature_maps(y, f, connectivity=np.ones((3, 1)))
    with pytest.raises(ValueError, match="0/1"):
        dn.infer_feature_maps(y, f, connectivity=np.full((2, 1), 0.5))
    with pytest.raises(ValueError, match="unknown method 'ista'.*'cg', 'admm'"):
        dn.infer_feature_maps(y, f, method="ista")
    with pytest.raises(ValueError, match="unknown boundary"):
        dn.infer_feature_maps(y, f, boundary="same")
    with pytest.raises(ValueError, match="0 < p <= 1"):
        dn.infer_feature_maps(y, f, p=1.5)
    with pytest.raises(ValueError, match="method='cg'"):
        dn.infer_feature_maps(y, f, p=0.5, method="admm")
    with pytest.raises(ValueError, match="lam > 0"):
        dn.infer_feature_maps(y, f, lam=0.0)
    with pytest.raises(ValueError, match="beta_max > beta0"):
        dn.infer_feature_maps(y, f, beta0=10.0, beta_max=10.0)
    with pytest.raises(ValueError, match="beta_inc > 1"):
        dn.infer_feature_maps(y, f, beta_inc=1.0)
    with pytest.raises(ValueError, match="no larger than the image"):
        dn.infer_feature_maps(y, rng.standard_normal((2, 7, 3)), boundary="circular")
    with pytest.raises(ValueError, match="z0 of shape"):
        dn.infer_feature_maps(y, f, z0=np.zeros((2, 6, 6)))
    with pytest.raises(TypeError, match="integer n_inner"):
        dn.infer_feature_maps(y, f, n_inner=1.5)
    with pytest.raises(ValueError, match="0 < p <= 1"):
        dn.shrink(y, 1.0, p=2.0)
    with pytest.raises(ValueError, match="beta > 0"):
        dn.shrink(y, 0.0)
    with pytest.raises(ValueError, match="maps with 2 maps|with 2 maps"):
        dn.reconstruct(np.zeros((3, 8, 8)), f)
    with pytest.raises(ValueError, match="all-zero row"):
        dn.learn_filters(y, 2, 3, connectivity=np.array([[1], [0]]))
    with pytest.raises(ValueError, match="unknown filter_solver"):
        dn.learn_filters(y, 2, 3, filter_solver="sgd")
    with pytest.raises(ValueError, match="filters0 of shape"):
        dn.learn_filters(y, 2, 3, filters0=np.zeros((3, 3, 3)))
    with pytest.raises(ValueError, match="neither"):
        dn.connectivity_map(3, singles=False, pairs=False)


def test_work_beyond_the_stated_bound_is_refused(monkeypatch):
    monkeypatch.setattr(dn, "MAX_MAP_ELEMENTS", 100)
    with pytest.raises(ValueError, match="at most 100 elements"):
        dn.infer_feature_maps(np.zeros((6, 6)), np.ones((2, 3, 3)))


def test_torch_tensors_are_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="numpy"):
        dn.infer_feature_maps(torch.zeros(6, 6), np.ones((2, 3, 3)))
