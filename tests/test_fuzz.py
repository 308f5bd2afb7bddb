"""Fuzz suite: every public function, over scale, mean offset, shape and dtype.

Each property draws an input the way a user might build one — any representable scale
(``1e-300 .. 1e300`` in float64, ``1e-35 .. 1e35`` in float32), a mean far from zero, odd
shapes and geometries — and requires the result to be right (against a float64 reference,
to a tolerance that follows the dtype and the scale of the data) or a clear refusal: a
``ValueError``/``TypeError`` with a message, or a warning from nsiter.  Anything else (a
silent NaN or inf, a wrong number, another exception) fails.

``NSITER_FUZZ_EXAMPLES`` multiplies the example counts (the CI runs the default; the
closing note of the issue that asked for this suite reports a run with 10x).
"""
from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nsiter
import reference
from helpers import spd_with_condition

_SCALE = max(1, int(os.environ.get("NSITER_FUZZ_EXAMPLES", "1")))


def fuzz(n):
    return settings(max_examples=n * _SCALE, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


DTYPES = st.sampled_from([np.float32, np.float64])


def scale_for(dtype):
    """log10 of a data scale that the dtype represents, products included for float64."""
    lim = 35 if dtype == np.float32 else 300
    return st.integers(-lim, lim)


def run(fn, *args, **kwargs):
    """``("ok", result, warnings)`` or ``("refused", exception)``; other exceptions propagate."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = fn(*args, **kwargs)
        except (ValueError, TypeError) as exc:
            assert str(exc), f"{type(exc).__name__} without a message"
            return "refused", exc, []
    return "ok", out, [w for w in caught if issubclass(w.category, nsiter.NsiterWarning)]


def finite(*arrays):
    return all(np.all(np.isfinite(np.asarray(a))) for a in arrays)


@st.composite
def images(draw, max_c=3, max_hw=9):
    dtype = draw(DTYPES)
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, max_c)), draw(st.integers(1, max_hw)),
             draw(st.integers(1, max_hw)))
    seed = draw(st.integers(0, 2**16))
    e = draw(scale_for(dtype))
    offset = draw(st.sampled_from([0.0, 1.0, 1e4, 1e8]))
    rng = np.random.default_rng(seed)
    with np.errstate(over="ignore"):  # float32 data beyond its range become inf: to be refused
        x = ((offset + rng.standard_normal(shape)) * 10.0 ** e).astype(dtype)
    return x, e, offset


geometry = st.fixed_dictionaries({
    "kernel_size": st.integers(1, 4), "stride": st.integers(1, 3), "padding": st.integers(0, 3),
    "dilation": st.integers(1, 2)})


@fuzz(40)
@given(images(), geometry)
def test_im2col_and_col2im_are_exact_or_refuse(img, geo):
    x, _, _ = img
    res = run(nsiter.im2col, x, **geo)
    if res[0] == "refused":
        return
    X = res[1]
    assert X.dtype == x.dtype
    np.testing.assert_array_equal(X, reference.im2col(x, **geo).astype(x.dtype))
    back = run(nsiter.col2im, X, x.shape, **geo)
    assert back[0] == "ok" and back[1].shape == x.shape and finite(back[1]) == finite(X)


def fits(ref, dtype, margin=1.0) -> bool:
    """Whether the float64 reference ``ref`` lies inside the dtype's range (below ``margin``
    times its largest value): beyond it nsiter must refuse."""
    ref = np.asarray(ref)
    return bool(np.all(np.isfinite(ref)) and np.abs(ref).max() < margin * np.finfo(dtype).max)


def moment_tolerance(ref, dtype):
    """Moments accumulate in float64 and are shifted by a mean estimate, so they carry
    ``~1e-12`` relative error at any offset (the issue's goal), plus the output rounding and
    the spacing of subnormal results."""
    u = np.finfo(dtype).eps
    return 64 * (u + 1e-12) * float(np.abs(ref).max()) + 8 * float(np.finfo(dtype).smallest_subnormal)


@fuzz(40)
@given(images(), geometry, st.sampled_from([1, 2]), st.sampled_from([None, 1]),
       st.sampled_from(["contiguous", "reference"]))
def test_patch_covariance_is_right_at_every_scale_and_offset(img, geo, sampling_stride, block, grouping):
    x, e, offset = img
    res = run(nsiter.patch_covariance, x, sampling_stride=sampling_stride, block_size=block, grouping=grouping,
              **geo)
    if res[0] == "refused":
        return
    with np.errstate(over="ignore", invalid="ignore"):
        ref_cov, ref_mean = reference.patch_covariance(x.astype(np.float64), sampling_stride=sampling_stride,
                                                       block_size=block, grouping=grouping, **geo)
    assert fits(ref_cov, x.dtype), "an unrepresentable covariance was returned"
    cov, mean = res[1]
    assert cov.dtype == x.dtype and finite(cov, mean)
    np.testing.assert_allclose(cov, ref_cov, rtol=0, atol=moment_tolerance(ref_cov, x.dtype))
    np.testing.assert_allclose(mean, ref_mean, rtol=0, atol=moment_tolerance(ref_mean, x.dtype))


@fuzz(40)
@given(DTYPES, st.integers(1, 12), st.integers(0, 2**16), st.data())
def test_covariance_is_right_at_every_scale(dtype, n_features, seed, data):
    e = data.draw(scale_for(dtype))
    offset = data.draw(st.sampled_from([0.0, 1.0, 1e6]))
    rng = np.random.default_rng(seed)
    X = ((offset + rng.standard_normal((data.draw(st.integers(1, 40)), n_features))) * 10.0 ** e).astype(dtype)
    res = run(nsiter.covariance, X)
    with np.errstate(over="ignore", invalid="ignore"):
        ref, ref_mean = reference.covariance(X.astype(np.float64))
    if not fits(ref, dtype):
        assert res[0] == "refused", "an unrepresentable covariance was returned"
        return
    if res[0] == "refused":
        return
    cov, mean = res[1]
    assert cov.dtype == dtype and finite(cov, mean)
    np.testing.assert_allclose(cov, ref, rtol=0, atol=moment_tolerance(ref, dtype))


@st.composite
def spd_batches(draw):
    dtype = draw(DTYPES)
    n = draw(st.integers(1, 12))
    nb = draw(st.integers(1, 3))
    cond = 10.0 ** draw(st.integers(0, 5 if dtype == np.float32 else 10))
    A = spd_with_condition(n, cond, np.random.default_rng(draw(st.integers(0, 2**16))), batch=(nb,))
    e = draw(scale_for(dtype))
    return (A * 10.0 ** e).astype(dtype), A, cond, e


METHODS = st.sampled_from(["coupled", "uncoupled", "accelerated", "eigh", "auto"])


@fuzz(60)
@given(spd_batches(), METHODS, st.sampled_from([{}, {"n_iter": 30}, {"tol": 1e-6}]),
       st.sampled_from(["isqrt", "sqrt"]))
def test_inv_sqrtm_and_sqrtm_psd_are_right_or_say_why(batch, method, mode, want):
    As, A, cond, e = batch
    dtype = As.dtype
    fn = nsiter.inv_sqrtm if want == "isqrt" else nsiter.sqrtm_psd
    res = run(fn, As, method=method, return_info=True, **mode)
    if res[0] == "refused":
        assert method == "eigh" and "singular" in str(res[1]) or "positive semidefinite" in str(res[1]), res[1]
        return
    (out, info), caught = res[1], res[2]
    assert out.dtype == dtype and out.shape == As.shape
    if not finite(out):  # only a result the dtype cannot represent may overflow, and it says so
        assert caught, "non-finite result without a warning"
        return
    ref = reference.inv_sqrtm(A) if want == "isqrt" else reference.sqrtm_psd(A)
    ref = ref * 10.0 ** (-e / 2 if want == "isqrt" else e / 2)
    err = np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max()
    u = np.finfo(dtype).eps
    good = err <= 1e3 * u * cond + 10 * mode.get("tol", 0.0)  # a tolerance the caller gave loosens it
    # a result is right, or its record and warnings say it is not
    if info.converged.all() and not info.diverged.any():
        assert good or method == "uncoupled" and caught, (err, cond, method, mode)
    elif not good:
        assert caught or "n_iter" in mode, "an inaccurate result neither warned nor flagged"


@fuzz(30)
@given(images(max_c=2, max_hw=7), st.sampled_from([1, 3]), st.sampled_from([1e-5, 1e-2]))
def test_whitening_helpers_are_finite_or_refuse(img, k, eps):
    x, e, _ = img
    res = run(nsiter.patch_covariance, x, k, padding=k // 2)
    if res[0] == "refused":
        return
    cov, mean = res[1]
    with np.errstate(over="ignore"):
        ridge = eps * np.power(10.0, 2.0 * e)  # inf when the covariance scale overflows: refused
    res = run(nsiter.inv_sqrtm, cov, method="eigh", eps=ridge)
    if res[0] == "refused":
        return
    D = res[1]
    X = nsiter.im2col(x, k, padding=k // 2)
    for fn, args in ((nsiter.whiten, (X, mean, D)),
                     (nsiter.deconvolution_kernel, (D, k, x.shape[1])),
                     (nsiter.fold_deconvolution, (np.ones((2, x.shape[1], k, k), dtype=x.dtype), None, D, mean))):
        out = run(fn, *args)
        assert out[0] == "refused" or finite(*(out[1] if isinstance(out[1], tuple) else (out[1],))), fn.__name__
    out = run(nsiter.deconvolve_image, x[0], k, eps=eps)
    assert out[0] == "refused" or finite(out[1]) or out[2]


@fuzz(20)
@given(DTYPES, st.integers(0, 2**16), st.data())
def test_estimate_kernel_is_right_at_every_scale(dtype, seed, data):
    e = data.draw(st.integers(-150, 150) if dtype == np.float64 else st.integers(-15, 15))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 10, 10)) * 10.0 ** e
    w = rng.standard_normal((1, 3, 3))
    y = reference.im2col(x, 3) @ w.ravel()
    res = run(nsiter.estimate_kernel, x.astype(dtype), y.reshape(8, 8).astype(dtype), 3)
    if res[0] == "refused":
        return
    est = res[1]
    assert finite(est.kernel)
    u = np.finfo(dtype).eps
    np.testing.assert_allclose(est.kernel.reshape(w.shape), w, rtol=0, atol=1e4 * u * np.abs(w).max())


@fuzz(20)
@given(spd_batches())
def test_verify_whitening_reports_or_refuses(batch):
    As = batch[0][0]
    res = run(nsiter.verify_whitening, As, methods=("coupled", "eigh"), n_iter=20)
    if res[0] == "refused":
        return
    report = res[1]
    for m in ("coupled", "eigh"):
        r = report[m]
        assert math.isfinite(r.residual) or r.blowup_iter is not None


def test_fuzz_scale_is_configurable():
    assert _SCALE >= 1
    with pytest.raises(TypeError):
        nsiter.im2col(np.ones((3, 3), dtype=complex), 2)
