"""Newton–Schulz at the edges of floating point, and the honesty of its record.

Each test is named for a defect it pins down: results are right at every representable
scale (the input is scaled by an exact power of four first), and ``info.converged`` and the
warnings say what happened.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import nsiter
import reference
from helpers import spd_with_condition

METHODS = ("coupled", "uncoupled", "accelerated", "eigh", "auto")
SCALES = {np.float64: [10.0 ** e for e in (-300, -170, -60, -1, 0, 3, 60, 160, 300)],
          np.float32: [10.0 ** e for e in (-35, -20, -5, 0, 7, 20, 35)]}


def _kw(method):
    # the uncoupled iteration is unstable for cond > 9: a short count in its stable regime
    return dict(method=method, n_iter=6) if method == "uncoupled" else dict(method=method)


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("method", METHODS)
def test_scale_invariance_at_every_representable_scale(method, dtype):
    """inv_sqrtm(s A) sqrt(s) = inv_sqrtm(A) and sqrtm_psd(s A) = sqrt(s) sqrtm_psd(A), eps
    included, to 100 u kappa for s over the dtype's range."""
    kappa = 5.0 if method == "uncoupled" else 100.0
    A = spd_with_condition(6, kappa, np.random.default_rng(1))
    u = np.finfo(dtype).eps / 2
    kw = _kw(method)
    D0 = nsiter.inv_sqrtm(A.astype(dtype), **kw)
    S0 = nsiter.sqrtm_psd(A.astype(dtype), **kw)
    De0 = nsiter.inv_sqrtm(A.astype(dtype), eps=0.5, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no spurious singular / divergence / tolerance warnings
        for s in SCALES[dtype]:
            As = (s * A).astype(dtype)
            assert _rel(nsiter.inv_sqrtm(As, **kw) * np.float64(math.sqrt(s)), D0) <= 100 * u * kappa, s
            assert _rel(nsiter.sqrtm_psd(As, **kw) / np.float64(math.sqrt(s)), S0) <= 100 * u * kappa, s
            assert _rel(nsiter.inv_sqrtm(As, eps=0.5 * s, **kw) * np.float64(math.sqrt(s)), De0) <= 100 * u * kappa


def test_eigh_of_a_tiny_matrix_is_not_the_zero_matrix():
    A = 1e-170 * np.array([[2.0, 1.0], [1.0, 2.0]])
    D = nsiter.inv_sqrtm(A, method="eigh")
    np.testing.assert_allclose(D * 1e-85, reference.inv_sqrtm(A / 1e-170), rtol=1e-14)


def test_huge_matrix_is_solved_not_zeroed_and_its_record_is_true():
    A = spd_with_condition(5, 10.0, np.random.default_rng(2))
    D, info = nsiter.inv_sqrtm(1e160 * A, n_iter=30, return_info=True)
    np.testing.assert_allclose(D * 1e80, reference.inv_sqrtm(A), rtol=1e-12)
    assert info.converged and info.residuals[-1] < 1e-12
    assert info.scale == pytest.approx(1e160 * np.linalg.norm(A), rel=1e-12)


def test_accelerated_on_a_huge_matrix_raises_no_overflow_error():
    A = spd_with_condition(5, 1e3, np.random.default_rng(3))
    D = nsiter.inv_sqrtm(1e300 * A, method="accelerated")
    np.testing.assert_allclose(D * 1e150, reference.inv_sqrtm(A), rtol=1e-11)


@pytest.mark.parametrize("s", [1e160, 1e-170])
def test_sqrtm_psd_of_huge_and_tiny_matrices_is_right(s):
    A = spd_with_condition(5, 10.0, np.random.default_rng(4))
    S = nsiter.sqrtm_psd(s * A, n_iter=30)
    np.testing.assert_allclose(S / math.sqrt(s), reference.sqrtm_psd(A), rtol=1e-12)


def test_a_huge_ridge_is_applied_not_zeroed():
    A = spd_with_condition(4, 10.0, np.random.default_rng(5))
    D = nsiter.inv_sqrtm(A, eps=1e160, n_iter=20)
    np.testing.assert_allclose(D * 1e80, np.eye(4), rtol=1e-12, atol=1e-14)


def test_eigh_of_a_huge_well_conditioned_matrix_does_not_warn_singular():
    A = 1e160 * np.array([[2.0, 1.0], [1.0, 2.0]])  # kappa = 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        D = nsiter.inv_sqrtm(A, method="eigh")
    np.testing.assert_allclose(D * 1e80, reference.inv_sqrtm(A / 1e160), rtol=1e-14)


def test_float32_identity_near_overflow():
    D = nsiter.inv_sqrtm(np.float32(3e38) * np.eye(3, dtype=np.float32), n_iter=10)
    assert D.dtype == np.float32
    np.testing.assert_allclose(np.diag(D), 1 / math.sqrt(3e38), rtol=1e-6)


# ----------------------------------------------------------------------------- the record


def test_fixed_n_iter_tells_the_truth_and_does_not_warn():
    A = spd_with_condition(12, 1e6, np.random.default_rng(6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fixed count is the caller's choice: no warning
        _, info = nsiter.inv_sqrtm(A, n_iter=3, return_info=True)
    assert info.residuals[-1] > 1 and not info.converged


def test_uncoupled_stalling_under_the_default_tol_warns_and_is_not_converged():
    A = spd_with_condition(27, 1e3, np.random.default_rng(0))  # stagnates near 0.13 (no blow-up)
    with pytest.warns(nsiter.NsiterWarning, match="not reached"):
        _, info = nsiter.inv_sqrtm(A, method="uncoupled", return_info=True)
    assert not info.converged and not info.diverged and info.residuals[-1] > 0.1


@pytest.mark.parametrize("method", METHODS)
def test_numerically_singular_input_is_flagged_for_every_method(method):
    A = spd_with_condition(27, 1e17, np.random.default_rng(8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _, info = nsiter.inv_sqrtm(A, return_info=True, **_kw(method))
        except ValueError as err:  # eigh: a non-positive eigenvalue
            assert method == "eigh" and "eps" in str(err)
            return
    assert nsiter.IllConditionedWarning in {w.category for w in caught}
    assert not info.converged


@pytest.mark.parametrize("method", ["eigh", "auto", "coupled", "accelerated"])
def test_a_tol_below_the_rounding_floor_warns_for_every_method(method):
    A = spd_with_condition(16, 1e4, np.random.default_rng(9))
    with pytest.warns(nsiter.NsiterWarning, match="tol=1e-20 was not reached"):
        _, info = nsiter.inv_sqrtm(A, method=method, tol=1e-20, return_info=True)
    assert not info.converged


def test_auto_float32_with_an_unreachable_tol_is_as_accurate_as_eigh():
    A = spd_with_condition(27, 1e4, np.random.default_rng(10), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nsiter.NsiterWarning)
        D_auto, info = nsiter.inv_sqrtm(A, method="auto", tol=1e-9, return_info=True)
        D_eigh = nsiter.inv_sqrtm(A, method="eigh")
    assert info.method == "auto:eigh"
    np.testing.assert_array_equal(D_auto, D_eigh)


@pytest.mark.parametrize("device_path", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("method", METHODS)
def test_scale_invariance_on_tensors(method, dtype, device_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from nsiter import _torch

    monkeypatch.setitem(_torch._SETTINGS, "force_device_path", device_path)
    kappa = 5.0 if method == "uncoupled" else 100.0
    A = spd_with_condition(6, kappa, np.random.default_rng(11))
    u = np.finfo(dtype).eps / 2
    kw = _kw(method)
    D0 = nsiter.inv_sqrtm(torch.from_numpy(A.astype(dtype)), **kw).numpy()
    S0 = nsiter.sqrtm_psd(torch.from_numpy(A.astype(dtype)), **kw).numpy()
    for s in SCALES[dtype][::2]:
        As = torch.from_numpy((s * A).astype(dtype))
        assert _rel(nsiter.inv_sqrtm(As, **kw).numpy() * np.float64(math.sqrt(s)), D0) <= 100 * u * kappa, s
        assert _rel(nsiter.sqrtm_psd(As, **kw).numpy() / np.float64(math.sqrt(s)), S0) <= 100 * u * kappa, s


def test_a_matrix_too_large_to_finish_is_refused_before_any_work():
    A = np.broadcast_to(np.eye(1), (1, 9801, 9801))  # the 6.4 GiB covariance of a 99x99 kernel
    with pytest.raises(ValueError, match="MAX_WORK.*block_size"):
        nsiter.inv_sqrtm(A)
