"""verify_whitening: every number of the report against independent float64 computations."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import nsiter
from nsiter.verification import DEFAULT_THRESHOLDS, MethodResult, WhiteningReport, verify_whitening

import reference
from helpers import spd_with_condition

U64 = np.finfo(np.float64).eps / 2
U32 = np.finfo(np.float32).eps / 2


@pytest.fixture(scope="module")
def image_cov():
    """The paper's Fig. 7 matrix: 27 x 27 covariance of 3x3 RGB patches of the sample image."""
    X = nsiter.im2col(nsiter.data.sample_image(), 3)
    cov, _ = reference.covariance(X)
    return (cov + cov.T) / 2


@pytest.fixture(scope="module")
def image_report(image_cov):
    return verify_whitening(image_cov, tol=1e-6)


def _fro(M):
    return math.sqrt(float(np.sum(np.asarray(M, dtype=np.float64) ** 2)))


def _blowup_rule(res, n):
    """The divergence test written out: non-finite, > 1000 x best so far, or > 10 sqrt(n)."""
    best = math.inf
    for k, r in enumerate(res, start=1):
        if not math.isfinite(r) or r > 1e3 * min(best, r) or r > 10 * math.sqrt(n):
            return k
        best = min(best, r)
    return None


def _check_method_numbers(rep, C, C_ref_input, eps=0.0):
    """Recompute every per-method number of ``rep`` from its ``D`` and float64 references."""
    n = C.shape[0]
    Ce = np.asarray(C, dtype=np.float64) + eps * np.eye(n)
    D_star = reference.inv_sqrtm(np.asarray(C_ref_input, dtype=np.float64) + eps * np.eye(n))
    # the reference D* itself
    np.testing.assert_allclose(rep.D_exact, D_star, rtol=0, atol=1e3 * rep.floor * np.abs(D_star).max())
    for m, r in rep.methods.items():
        D = r.D.astype(np.float64)
        floor_abs = 100 * max(rep.floor, U64) * math.sqrt(n)  # evaluation noise of a residual near the floor
        ddc = _fro(D @ (D @ Ce) - np.eye(n))
        dcd = _fro((D @ Ce) @ D - np.eye(n)) / math.sqrt(n)
        fwd = _fro(D - D_star) / _fro(D_star)
        assert r.residual == pytest.approx(ddc, rel=1e-6, abs=floor_abs), m
        assert r.symmetric_residual == pytest.approx(dcd, rel=1e-6, abs=floor_abs), m
        assert r.forward_error == pytest.approx(fwd, rel=1e-6, abs=100 * rep.floor), m
        # the returned D is iterate returned_iter: its residual is that entry of the history
        assert r.best_residual == r.residuals[r.best_iter - 1]
        assert r.residual == pytest.approx(r.residuals[r.returned_iter - 1], rel=1e-6, abs=floor_abs), m
        assert r.returned_iter == (r.best_iter if r.diverged else r.n_iter), m
        np.testing.assert_array_equal(r.final_residual, r.residuals[-1])
        assert r.n_iter == r.residuals.size
        finite = np.isfinite(r.residuals)
        assert r.best_residual == np.min(r.residuals[finite])
        assert r.best_iter == int(np.flatnonzero(r.residuals == r.best_residual)[0]) + 1
        for t, k in r.iterations_to_reach.items():
            below = np.flatnonzero(finite & (r.residuals <= t))
            assert k == (int(below[0]) + 1 if below.size else None), (m, t)
        assert r.blowup_iter == _blowup_rule(r.residuals, n), m
        assert r.diverged == (r.blowup_iter is not None), m


def _check_matrix_numbers(rep, C_input, eps=0.0):
    n = C_input.shape[0]
    lam = np.linalg.eigvalsh(np.asarray(C_input, dtype=np.float64) + eps * np.eye(n))
    u = np.finfo(np.dtype(rep.dtype)).eps / 2
    assert rep.n == n
    assert rep.eig_min == pytest.approx(lam[0], rel=1e-9)
    assert rep.eig_max == pytest.approx(lam[-1], rel=1e-12)
    kappa = np.linalg.cond(np.asarray(C_input, dtype=np.float64) + eps * np.eye(n), 2)
    assert rep.condition_number == pytest.approx(kappa, rel=1e-6)
    assert rep.unit_roundoff == u
    assert rep.floor == pytest.approx(kappa * u, rel=1e-6)


# --------------------------------------------------------------------------- the Fig. 7 matrix


def test_image_covariance_report_matches_float64_references(image_cov, image_report):
    rep = image_report
    assert isinstance(rep, WhiteningReport) and list(rep.methods) == ["coupled", "uncoupled", "eigh"]
    assert rep.dtype == rep.input_dtype == "float64" and rep.eps == 0.0 and rep.n_iter == 50
    _check_matrix_numbers(rep, image_cov)
    _check_method_numbers(rep, image_cov, image_cov)
    assert all(isinstance(r, MethodResult) for r in rep.methods.values())


def test_image_covariance_coupled_history_follows_the_float64_loop(image_cov, image_report):
    r = image_report["coupled"]
    iterates, ref = reference.newton_schulz_history(image_cov, "coupled", 50)
    # identical maths: agreement while the residual is far above the rounding floor
    above = ref > 1e4 * image_report.floor
    assert above.sum() >= 15
    np.testing.assert_allclose(r.residuals[above], ref[above], rtol=1e-6, atol=10 * image_report.floor)
    # then both sit at the floor (kappa*u, up to a small factor) and never diverge
    assert np.all(r.residuals[~above] < 1e2 * image_report.floor)
    assert not r.diverged and r.blowup_iter is None and r.status() == "stable"
    # the returned D is the reference's last iterate (to rounding at the floor)
    D_ref = iterates[r.returned_iter - 1]
    assert _fro(r.D - D_ref) / _fro(D_ref) < 1e2 * image_report.floor
    # iterations to reach the thresholds well above the floor agree with the loop
    for t in DEFAULT_THRESHOLDS:
        if t > 1e4 * image_report.floor:
            assert r.iterations_to_reach[t] == int(np.argmax(ref <= t)) + 1


def test_image_covariance_uncoupled_blows_up_and_fails_tol(image_cov, image_report):
    r = image_report["uncoupled"]
    _, ref = reference.newton_schulz_history(image_cov, "uncoupled", 50)
    k = r.blowup_iter
    assert r.diverged and k is not None and abs(k - _blowup_rule(ref, 27)) <= 1
    # before the blow-up the history is the loop's; the instability amplifies rounding
    # differences by up to (kappa + sqrt(kappa) - 2)/2 per step, so only the start agrees tightly
    np.testing.assert_allclose(r.residuals[:k // 2], ref[:k // 2], rtol=1e-6)
    np.testing.assert_allclose(r.residuals[:k - 1], ref[:k - 1], rtol=1e-2)
    assert not np.isfinite(r.residuals[-1]) or r.residuals[-1] > 1e3
    assert r.status() == f"diverged (iteration {k})"
    assert not r.passed(1e-6) and image_report.failures() == ["uncoupled"] and not image_report.passed()
    assert image_report["coupled"].passed(1e-6) and image_report["eigh"].passed(1e-6)
    assert any(note.startswith("uncoupled diverged") for note in image_report.notes)


def test_eigh_method_is_the_reference_in_float64(image_cov, image_report):
    r = image_report["eigh"]
    assert r.n_iter == 1 and r.best_iter == 1 and r.status() == "direct"
    assert r.forward_error < 10 * U64
    # the eigh residual sits at the floor's order of magnitude, never far above
    assert r.residual < 10 * image_report.floor


# --------------------------------------------------------------------------- constructed matrices


def test_kappa_below_2_44_every_method_converges_to_the_floor():
    # linearised at its fixed point, the uncoupled iteration multiplies errors by up to
    # (kappa + sqrt(kappa) - 2)/2 per step: stable only for kappa < 2.44
    rng = np.random.default_rng(1)
    C = spd_with_condition(12, 2.0, rng, lam_max=3.0)
    rep = verify_whitening(C, n_iter=40)
    _check_matrix_numbers(rep, C)
    _check_method_numbers(rep, C, C)
    for m in ("coupled", "uncoupled"):
        r = rep[m]
        assert not r.diverged
        _, ref = reference.newton_schulz_history(C, m, 40)
        above = ref > 1e-8
        np.testing.assert_allclose(r.residuals[above], ref[above], rtol=1e-8)
        assert r.final_residual < 1e-13 and r.forward_error < 1e-14
        assert r.iterations_to_reach[1e-12] is not None


def test_uncoupled_error_growth_per_step_is_kappa_plus_sqrt_kappa_minus_2_over_2():
    rng = np.random.default_rng(9)
    # 6 eigenvalues: the fastest-growing error mode leads within two steps (with many, a pair of
    # rate close to it, seeded by how the rounding fell, can lead for a dozen steps)
    C = spd_with_condition(6, 10.0, rng)
    r = verify_whitening(C, methods=("uncoupled",), n_iter=40)["uncoupled"]
    assert r.diverged
    # after convergence the residual grows geometrically at the predicted rate (10 + 3.16 - 2)/2
    res = r.residuals
    k0 = r.best_iter
    grow = res[k0 + 3:k0 + 12] / res[k0 + 2:k0 + 11]
    assert np.median(grow) == pytest.approx((10 + math.sqrt(10) - 2) / 2, rel=0.05)


def test_ill_conditioned_matrix_uncoupled_diverges_coupled_does_not():
    rng = np.random.default_rng(2)
    C = spd_with_condition(20, 1e6, rng)
    rep = verify_whitening(C, methods=["uncoupled", "coupled"])
    assert list(rep.methods) == ["uncoupled", "coupled"]
    _check_method_numbers(rep, C, C)
    assert rep["uncoupled"].diverged and not rep["coupled"].diverged
    assert rep["coupled"].final_residual < 1e2 * rep.floor
    assert rep.notes and "uncoupled diverged" in rep.notes[0]


def test_float32_working_dtype_uses_float32_floor_and_float64_forward_reference():
    rng = np.random.default_rng(3)
    C = spd_with_condition(10, 1e3, rng)
    rep = verify_whitening(C, dtype="float32", methods=("coupled", "eigh"))
    assert rep.dtype == "float32" and rep.input_dtype == "float64"
    assert all(r.D.dtype == np.float32 for r in rep.methods.values())
    _check_matrix_numbers(rep, C)
    assert rep.floor == pytest.approx(np.linalg.cond(C) * U32, rel=1e-6)
    # residuals refer to C as the methods saw it (rounded to float32), the forward error to C as given
    _check_method_numbers(rep, C.astype(np.float32), C)
    for r in rep.methods.values():
        assert r.forward_error < 10 * rep.floor and r.residual < 10 * rep.floor


def test_float32_input_is_kept_float32_by_default():
    rng = np.random.default_rng(4)
    C = spd_with_condition(6, 50.0, rng, dtype=np.float32)
    rep = verify_whitening(C, methods=("coupled",), n_iter=30)
    assert rep.dtype == rep.input_dtype == "float32" and rep["coupled"].D.dtype == np.float32
    _check_method_numbers(rep, C, C)


def test_ridge_eps_makes_a_singular_covariance_verifiable():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((5, 8))  # fewer samples than features: rank 4
    C, _ = reference.covariance(X)
    C = (C + C.T) / 2
    with pytest.raises(ValueError, match=r"positive definite.*add a ridge, e\.g\. eps ="):
        verify_whitening(C)
    rep = verify_whitening(C, eps=1e-2, methods=("coupled", "eigh"))
    assert rep.eps == 1e-2
    assert rep.eig_min == pytest.approx(1e-2, rel=1e-9)  # the null space is lifted to eps
    _check_matrix_numbers(rep, C, eps=1e-2)
    _check_method_numbers(rep, C, C, eps=1e-2)


def test_one_by_one_matrix():
    rep = verify_whitening([[4.0]], methods=("coupled", "eigh"), n_iter=10)
    assert rep.n == 1 and rep.condition_number == 1.0
    assert rep["eigh"].D[0, 0] == pytest.approx(0.5, rel=1e-15)
    assert rep["coupled"].D[0, 0] == pytest.approx(0.5, rel=1e-15)
    assert rep["coupled"].iterations_to_reach[1e-12] == 1


def test_input_is_not_modified_and_lists_and_ints_are_accepted():
    rng = np.random.default_rng(6)
    C = spd_with_condition(5, 20.0, rng)
    C_copy = C.copy()
    verify_whitening(C, eps=0.1)
    np.testing.assert_array_equal(C, C_copy)
    rep = verify_whitening([[2, 1], [1, 2]], methods="coupled", n_iter=25)
    assert rep.dtype == "float64" and rep.input_dtype == "float64" and list(rep.methods) == ["coupled"]
    assert rep["coupled"].final_residual < 1e-14


def test_thresholds_are_sorted_and_custom():
    rng = np.random.default_rng(7)
    C = spd_with_condition(4, 100.0, rng)
    rep = verify_whitening(C, methods=("coupled",), thresholds=(1e-3, 0.5, 1e-9))
    assert rep.thresholds == (0.5, 1e-3, 1e-9)
    ks = [rep["coupled"].iterations_to_reach[t] for t in rep.thresholds]
    assert all(k is not None for k in ks) and ks == sorted(ks)


def test_passed_and_failures_use_the_last_iterate():
    rng = np.random.default_rng(8)
    C = spd_with_condition(8, 1e2, rng)
    rep = verify_whitening(C, methods=("coupled", "eigh"), n_iter=3)  # 3 steps: far from converged
    r = rep["coupled"]
    assert r.final_residual > 1e-3
    assert not r.passed(1e-3) and r.passed(2 * r.final_residual)
    assert rep.failures(1e-3) == ["coupled"] and rep.passed(2 * r.final_residual)
    with pytest.raises(ValueError, match="no tolerance"):
        rep.passed()
    with pytest.raises(ValueError, match="tol > 0"):
        rep.passed(-1.0)


# --------------------------------------------------------------------------- conversions


def test_to_dict_and_json_schema(image_report):
    rep = image_report
    d = rep.to_dict()
    for key, typ in [("n", int), ("dtype", str), ("input_dtype", str), ("eps", float), ("eig_min", float),
                     ("eig_max", float), ("condition_number", float), ("unit_roundoff", float),
                     ("floor", float), ("floor_applies_to", str), ("n_iter", int), ("scaling", str),
                     ("tol", float), ("tol_applies_to", str), ("thresholds", list), ("passed", bool),
                     ("failed", list), ("notes", list), ("seconds", float), ("methods", dict)]:
        assert isinstance(d[key], typ), key
    assert d["passed"] is False and d["failed"] == ["uncoupled"]
    assert d["condition_number"] == rep.condition_number and d["floor"] == rep.floor
    method_keys = {"method", "ran_as", "n_iter", "returned_iter", "final_residual", "residual", "symmetric_residual",
                   "forward_error", "best_iter", "best_residual", "converged", "diverged", "blowup_iter",
                   "iterations_to_reach", "scale", "seconds", "residuals"}
    for m, md in d["methods"].items():
        assert set(md) == method_keys
        r = rep[m]
        assert md["residual"] == r.residual and md["forward_error"] == r.forward_error
        assert list(md["iterations_to_reach"]) == ["1e-02", "1e-04", "1e-06", "1e-08", "1e-10", "1e-12"]
        assert len(md["residuals"]) == r.n_iter
        for x, y in zip(md["residuals"], r.residuals):
            assert (x is None) == (not np.isfinite(y)) and (x is None or x == y)
    assert d["methods"]["uncoupled"]["blowup_iter"] == rep["uncoupled"].blowup_iter
    text = rep.to_json()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: non-finite -> null
    assert json.loads(text) == d
    full = rep.to_dict(include_matrices=True)
    np.testing.assert_array_equal(np.array(full["D_exact"]), rep.D_exact)
    np.testing.assert_array_equal(np.array(full["methods"]["coupled"]["D"]), rep["coupled"].D)


def test_str_is_a_table_with_the_numbers(image_report):
    rep = image_report
    s = str(rep)
    assert "27 x 27" in s and f"{rep.condition_number:.3e}" in s and f"{rep.floor:.2e}" in s
    assert f"{rep.eig_min:.3e}" in s and f"{rep.eig_max:.3e}" in s
    for m, r in rep.methods.items():
        row = next(line for line in s.splitlines() if line.strip().startswith(m + " ")
                   and ("stable" in line or "diverged" in line or "direct" in line))
        assert f"{r.best_residual:.2e} ({r.best_iter})" in row
        for t in rep.thresholds:
            k = r.iterations_to_reach[t]
            assert ("never" if k is None else str(k)) in row
    assert f"{rep['coupled'].forward_error:.2e}" in s
    assert f"diverged (iteration {rep['uncoupled'].blowup_iter})" in s
    assert "coupled PASS, uncoupled FAIL, eigh PASS" in s


def test_plot_writes_png_with_floor_and_blowup_marks(image_report, tmp_path):
    from matplotlib.figure import Figure

    path = tmp_path / "residuals.png"
    fig = image_report.plot(path)
    assert isinstance(fig, Figure)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    ys = [tuple(line.get_ydata()) for line in ax.lines]
    assert (image_report.floor, image_report.floor) in ys  # the floor as a horizontal line
    assert any(line.get_marker() == "x" for line in ax.lines)  # the blow-up marker
    labels = ax.get_legend_handles_labels()[1]
    assert "coupled" in labels and "uncoupled" in labels and any(lab.startswith("eigh") for lab in labels)
    # drawing into a caller's axes
    own = Figure()
    ax2 = own.add_subplot()
    assert image_report.plot(ax=ax2) is own and len(ax2.lines) == len(ax.lines)
    assert image_report.plot(tmp_path / "r.svg") is not None and (tmp_path / "r.svg").stat().st_size > 0


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("C, exc, match", [
    (np.ones((2, 3, 3)), ValueError, r"one covariance matrix.*stack of shape \(2, 3, 3\).*per matrix"),
    (np.ones(3), ValueError, r"shape \(n, n\), got shape \(3,\)"),
    (np.ones((3, 4)), ValueError, r"square.*covariance first"),
    (np.zeros((0, 0)), ValueError, r"non-empty"),
    (np.array([[1.0, np.nan], [np.nan, 1.0]]), ValueError, r"finite"),
    (np.array([[2.0, 1.0], [0.0, 2.0]]), ValueError, r"symmetric.*\(A \+ A.swapaxes"),
    (np.array([[1.0, 2.0], [2.0, 1.0]]), ValueError, r"positive definite.*smallest eigenvalue -1\.000e\+00"),
    (np.eye(2, dtype=complex), TypeError, r"complex"),
])
def test_bad_matrices_are_rejected(C, exc, match):
    with pytest.raises(exc, match=match):
        verify_whitening(C)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(methods=("coupled", "newton")), ValueError, r"unknown method 'newton'; choose one of: 'coupled'"),
    (dict(methods=()), ValueError, r"at least one method"),
    (dict(methods=("eigh", "eigh")), ValueError, r"each method once"),
    (dict(n_iter=0), ValueError, r"n_iter >= 1"),
    (dict(n_iter=2.5), TypeError, r"integer n_iter"),
    (dict(eps=-1.0), ValueError, r"eps >= 0"),
    (dict(tol=0.0), ValueError, r"tol > 0"),
    (dict(dtype="int32"), TypeError, r"float32 or float64"),
    (dict(thresholds=(1e-3, -1.0)), ValueError, r"threshold > 0"),
    (dict(scaling="max"), ValueError, r"unknown scaling 'max'"),
])
def test_bad_options_are_rejected(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        verify_whitening(np.eye(3), **kwargs)


def test_progress_callback_sees_every_step():
    calls = []
    verify_whitening(np.eye(3) * 2.0, methods=("coupled", "eigh"), n_iter=5,
                     progress=lambda step, i, total: calls.append((step, i, total)))
    assert [c[1:] for c in calls] == [(1, 3), (2, 3), (3, 3)]
    assert calls[0][0].startswith("eigh reference") and calls[1][0].startswith("coupled")


# --------------------------------------------------------------------------- properties


@given(n=st.integers(1, 10), log_cond=st.floats(0.0, 8.0), seed=st.integers(0, 2**16))
def test_coupled_reaches_the_floor_and_report_numbers_are_consistent(n, log_cond, seed):
    rng = np.random.default_rng(seed)
    C = spd_with_condition(n, 10.0 ** log_cond, rng, lam_max=float(rng.uniform(0.1, 10.0)))
    rep = verify_whitening(C, methods=("coupled", "eigh"))
    _check_method_numbers(rep, C, C)
    for r in rep.methods.values():
        # at or below the floor, up to the sqrt(n) of the Frobenius norm and a small factor
        assert r.final_residual <= 50 * math.sqrt(n) * max(rep.floor, U64), r.method
        assert r.forward_error <= 50 * max(rep.floor, U64), r.method


# --------------------------------------------------------------------------- torch tensors


def test_torch_tensor_runs_the_methods_through_the_torch_backend():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(20)
    C = spd_with_condition(9, 1e3, rng)
    rep_t = verify_whitening(torch.from_numpy(C), methods=("coupled", "eigh"), n_iter=30)
    rep_n = verify_whitening(C, methods=("coupled", "eigh"), n_iter=30)
    assert rep_t.dtype == "float64" and isinstance(rep_t["coupled"].D, np.ndarray)
    _check_matrix_numbers(rep_t, C)
    _check_method_numbers(rep_t, C, C)
    above = rep_n["coupled"].residuals > 1e4 * rep_n.floor
    np.testing.assert_allclose(rep_t["coupled"].residuals[above], rep_n["coupled"].residuals[above], rtol=1e-8)
    C16 = torch.from_numpy(spd_with_condition(5, 10.0, rng)).half()  # float16 promotes to float32
    rep16 = verify_whitening(C16, methods=("eigh",))
    assert rep16.dtype == rep16.input_dtype == "float32"


@pytest.mark.gpu
def test_cuda_tensor_is_verified_on_the_device():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(21)
    C = spd_with_condition(27, 1e4, rng)
    rep = verify_whitening(torch.from_numpy(C).float().cuda(), methods=("coupled", "eigh"), n_iter=40)
    assert rep.dtype == "float32"
    _check_method_numbers(rep, C.astype(np.float32), C)
    assert rep["coupled"].final_residual < 10 * rep.floor
