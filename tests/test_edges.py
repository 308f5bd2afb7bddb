"""Right or loudly wrong at the edges (issue 13): scale, cancellation, aliasing, array types, resources.

Each test is named for the defect it pins down (issue 13 numbering: 1 scale, 3 cancellation,
4 aliasing, 5 array types, 6 resources).
"""
from __future__ import annotations

import warnings
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import nsiter
import reference
from nsiter import _conventions
from nsiter._conventions import MAX_ELEMENTS, MAX_WORK
from nsiter.covariance import _sampled_geometry
from test_covariance import _forced, _kernels_for

BACKENDS = ["numpy", "torch"]


def _as(backend, a):
    if backend == "torch":
        return pytest.importorskip("torch").from_numpy(np.ascontiguousarray(a))
    return a


def _np(a):
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


def _corr_error(cov, want):
    """``max |cov - want| / sqrt(want_aa want_bb)``: the error on the correlation scale of each entry."""
    cov, want = np.asarray(cov, np.float64), np.asarray(want, np.float64)
    d = np.sqrt(np.diagonal(want, axis1=-2, axis2=-1))
    return float(np.max(np.abs(cov - want) / (d[..., :, None] * d[..., None, :])))


# --------------------------------------------------------------------------------------
# 1. scale: right at every representable scale, or a ValueError saying why
# --------------------------------------------------------------------------------------

def _right_or_refused(compute, want, scale2, dtype, rtol):
    """``compute()`` equals ``scale2 * want``, or raises the over/underflow ValueError; it must compute
    whenever the scaled covariance lies well inside ``dtype``'s normal range."""
    fi = np.finfo(dtype)
    top = scale2 * float(np.max(np.abs(want)))
    inside = 1e3 * float(fi.tiny) < top < 1e-3 * float(fi.max)
    try:
        cov, mean = compute()
    except ValueError as exc:
        assert not inside, f"refused a representable covariance (max {top:.3g}): {exc}"
        assert "overflow" in str(exc) or "underflow" in str(exc)
        return
    cov = _np(cov)
    assert np.isfinite(cov).all() and np.isfinite(_np(mean)).all()
    assert cov.dtype == dtype
    np.testing.assert_allclose(cov / scale2, want, rtol=rtol, atol=rtol * np.max(np.abs(want)))


@pytest.mark.parametrize("backend", BACKENDS)
@given(st.integers(-300, 300))
def test_scale_covariance_right_or_refused_float64(backend, k):
    rng = np.random.default_rng(100)
    X = rng.standard_normal((40, 3)) + 2.0
    want = reference.covariance(X)[0]
    s = 10.0 ** k
    _right_or_refused(lambda: nsiter.covariance(_as(backend, s * X)), want, s * s, np.float64, 1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
@given(st.integers(-35, 35))
def test_scale_covariance_right_or_refused_float32(backend, k):
    rng = np.random.default_rng(101)
    X = rng.standard_normal((40, 3)) + 2.0
    s = np.float32(10.0 ** k)
    Xs = (s * X.astype(np.float32)).astype(np.float32)
    want = reference.covariance(Xs.astype(np.float64) / np.float64(s))[0]
    _right_or_refused(lambda: nsiter.covariance(_as(backend, Xs)), want, float(s) ** 2, np.float32, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@given(st.integers(-300, 300), st.sampled_from(list(nsiter._numba.patches.KERNELS)))
def test_scale_patch_covariance_right_or_refused(backend, k, kernel):
    rng = np.random.default_rng(102)
    x = rng.standard_normal((2, 2, 7, 8)) + 3.0
    want = reference.patch_covariance(x, 3, padding=1)[0]
    s = 10.0 ** k
    with mock.patch.object(nsiter._numba.patches, "choose_kernel", lambda *a: kernel):  # numpy: every kernel
        _right_or_refused(lambda: nsiter.patch_covariance(_as(backend, s * x), 3, padding=1), want, s * s,
                          np.float64, 1e-12)


def test_scale_float32_overflow_is_refused_suggesting_float64():
    X = 1e30 * np.random.default_rng(103).standard_normal((50, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="float32.*overflow.*float64 data"):
        nsiter.covariance(X)
    with pytest.raises(ValueError, match="float32.*overflow"):
        nsiter.patch_covariance(X.reshape(1, 1, 10, 20), 3)
    with pytest.raises(ValueError, match="float32.*underflow"):
        nsiter.covariance((X.astype(np.float64) * 1e-65).astype(np.float32))


def test_scale_patch_statistics_accumulates_huge_data_exactly():
    rng = np.random.default_rng(104)
    a, b = rng.standard_normal((2, 1, 2, 9, 9)) + 1.0
    s = 2.0 ** 490
    st_ = nsiter.PatchStatistics(3, padding=1).update(s * a).update(s * b)
    want = reference.patch_covariance(np.concatenate([a, b]), 3, padding=1)[0]
    np.testing.assert_allclose(st_.covariance()[0] / s ** 2, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="overflow"):
        nsiter.PatchStatistics(3).update(1e200 * a)


@pytest.mark.parametrize("method", nsiter.kernel_estimation.METHODS)
def test_scale_estimate_kernel_right_or_refused(method):
    rng = np.random.default_rng(105)
    x = rng.standard_normal((16, 16))
    k = rng.standard_normal((3, 3))
    y = (nsiter.im2col(x, 3) @ k.ravel()).reshape(14, 14)
    plain = nsiter.estimate_kernel(x, y, 3, method=method)
    for sx, sy in [(1e150, 1e150), (1e-200, 1e-200), (1e300, 1.0), (1e-300, 1e-10)]:
        try:
            est = nsiter.estimate_kernel(sx * x, sy * y, 3, method=method)
        except ValueError as exc:  # gd's learning rate ~ x**-2 is not representable below 1e-154
            assert method == "gd" and sx < 1e-154 and "float64 range" in str(exc)
            continue
        np.testing.assert_allclose(est.kernel * (sx / sy), plain.kernel, rtol=1e-9, atol=1e-9)
        assert np.isfinite(est.history).all()
    with pytest.raises(ValueError, match="float64 range"):  # its loss ~1e400 has no float64
        nsiter.estimate_kernel(1e200 * x, 1e200 * y, 3, method=method)


# --------------------------------------------------------------------------------------
# 3. cancellation: every kernel exact to 1e-12 at |mean| / std = 1e8, padded or not
# --------------------------------------------------------------------------------------

LAYOUTS = [  # kernel_size, stride, padding, dilation, sampling_stride, block_size, grouping
    (3, 1, 1, 1, 1, None, "contiguous"),
    (3, 1, 0, 1, 1, None, "contiguous"),
    (5, 1, 1, 1, 1, 2, "contiguous"),
    (3, 1, 2, 1, 1, 2, "contiguous"),  # every tap partly in the padding
    ((3, 5), 1, (2, 1), (2, 1), 1, 2, "reference"),
    (3, 1, 1, 1, 1, 1, "reference"),
    (3, (1, 2), 1, 1, 1, None, "contiguous"),
    (3, 1, 1, 1, 2, 2, "contiguous"),
    (2, 1, 1, 1, 3, 4, "reference"),
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cancellation_every_kernel_exact_at_mean_over_std_1e8(layout):
    k, s, p, d, S, B, grouping = layout
    rng = np.random.default_rng(106)
    x = 1e8 + rng.standard_normal((2, 4, 11, 13))
    want = reference.patch_covariance(x, k, s, p, d, S, B, grouping)[0]
    g = _sampled_geometry(x.shape, k, s, p, d, S)
    for kernel in _kernels_for(g):
        cov, _ = _forced(x, k, kernel, stride=s, padding=p, dilation=d, sampling_stride=S, block_size=B,
                         grouping=grouping)
        assert _corr_error(cov, want) <= 1e-12, kernel


def test_cancellation_centre_tap_of_padded_offset_image():
    """The issue's case: ``1e7 + noise`` with padding 1 had 1.7e-3 relative error on the centre tap."""
    x = 1e7 + np.random.default_rng(107).standard_normal((1, 1, 32, 32))
    want = reference.patch_covariance(x, 3, padding=1)[0]
    for kernel in nsiter._numba.patches.KERNELS:
        cov, _ = _forced(x, 3, kernel, padding=1)
        assert abs(cov[4, 4] - want[4, 4]) <= 1e-12 * want[4, 4], kernel
    torch = pytest.importorskip("torch")
    cov = nsiter.patch_covariance(torch.from_numpy(x), 3, padding=1)[0].numpy()
    assert _corr_error(cov, want) <= 1e-12


# --------------------------------------------------------------------------------------
# 4. aliasing: returned arrays are never internal state or the caller's input
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_aliasing_patch_statistics_results_are_fresh(backend):
    cls = pytest.importorskip("nsiter.torch").PatchStatistics if backend == "torch" else nsiter.PatchStatistics
    rng = np.random.default_rng(108)
    a, b = rng.standard_normal((2, 2, 2, 8, 8))
    acc = cls(3, padding=1).update(_as(backend, a))
    cov, mean = acc.covariance()
    cov[...] = 7.0
    mean[...] = 1e9
    acc.update(_as(backend, b))
    want_cov, want_mean = reference.patch_covariance(np.concatenate([a, b]), 3, padding=1)
    np.testing.assert_allclose(_np(acc.covariance()[0]), want_cov, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_np(acc.covariance()[1]), want_mean, rtol=1e-12, atol=1e-12)


def test_aliasing_no_public_result_shares_memory_with_its_inputs():
    rng = np.random.default_rng(109)
    x = rng.standard_normal((2, 3, 6, 6))
    X1 = nsiter.im2col(x, 1)
    cov, mean = nsiter.patch_covariance(x, 3)
    D = nsiter.inv_sqrtm(cov, method="eigh", eps=1e-3)
    Xi = nsiter.im2col(x, 3)
    W, bias = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    xx = rng.standard_normal((12, 12))
    yy = (nsiter.im2col(xx, 3) @ rng.standard_normal(9)).reshape(10, 10)
    calls = [
        (lambda: nsiter.im2col(x, 1), [x]),
        (lambda: nsiter.col2im(X1, x.shape, 1), [X1]),
        (lambda: nsiter.covariance(X1[:1]), [X1]),
        (lambda: nsiter.patch_covariance(x, 1), [x]),
        (lambda: nsiter.whiten(Xi, 0 * mean, np.eye(27)), [Xi]),
        (lambda: nsiter.deconvolution_kernel(D, 3, 3), [D]),
        (lambda: nsiter.deconvolve_image(x, 3), [x]),
        (lambda: nsiter.fold_deconvolution(W, bias, np.eye(27), 0 * mean), [W, bias]),
        (lambda: (lambda e: (e.kernel, e.history))(nsiter.estimate_kernel(xx, yy, 3)), [xx, yy]),
    ]
    for call, inputs in calls:
        out = call()
        for o in out if isinstance(out, tuple) else (out,):
            assert not any(np.shares_memory(o, a) for a in inputs), call


# --------------------------------------------------------------------------------------
# 5. array types: as scipy reads them
# --------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix itself warns
def test_array_types_matrix_is_a_plain_two_dimensional_array():
    rng = np.random.default_rng(110)
    X = rng.standard_normal((30, 3))
    A = np.cov(X.T) + np.eye(3)
    for fn, arg in [(nsiter.covariance, X), (lambda a: nsiter.im2col(a, 2), X),
                    (lambda a: nsiter.inv_sqrtm(a, method="eigh"), A)]:
        got, want = fn(np.matrix(arg)), fn(arg)
        for g_, w_ in zip(*(r if isinstance(r, tuple) else (r,) for r in (got, want))):
            assert type(g_) is np.ndarray and g_.shape == w_.shape
            np.testing.assert_array_equal(g_, w_)


def test_array_types_masked_arrays_are_refused():
    X = np.ma.masked_invalid(np.array([[1.0, np.nan], [2.0, 3.0], [0.0, 1.0]]))
    for fn in (nsiter.covariance, lambda a: nsiter.im2col(a, 1), lambda a: nsiter.inv_sqrtm(a[:2])):
        with pytest.raises(TypeError, match=r"masked array.*filled.*compressed"):
            fn(X)


def test_array_types_torch_sparse_meta_quantized_are_refused():
    torch = pytest.importorskip("torch")
    X = torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"layout torch.sparse_coo.*to_dense\(\)"):
        nsiter.covariance(X.to_sparse())
    with pytest.raises(TypeError, match="meta tensor"):
        nsiter.im2col(torch.empty(1, 1, 4, 4, device="meta"), 3)
    with warnings.catch_warnings():  # torch deprecates quantized tensors: not ours to test
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(torch.rand(4, 4), 0.1, 0, torch.quint8)
    with pytest.raises(TypeError, match=r"quantized.*dequantize\(\)"):
        nsiter.patch_covariance(q, 3)


@pytest.mark.parametrize("shape, error, match", [
    ("abc", TypeError, "image_shape as a tuple of ints"),
    ((2.5, 8, 8), TypeError, "image_shape as a tuple of ints"),
    ((True, 8, 8), TypeError, "image_shape as a tuple of ints"),
    (8, TypeError, "image_shape as a tuple of ints"),
    ((2, -8, 8), ValueError, "non-negative sizes"),
])
def test_array_types_shape_arguments_are_validated(shape, error, match):
    X = np.zeros((36, 9))
    with pytest.raises(error, match=match):
        nsiter.col2im(X, shape, 3)
    with pytest.raises(error, match=match):
        nsiter.output_shape(shape, 3)
    assert nsiter.col2im(X, np.array([1, 8, 8]), 3).shape == (1, 8, 8)


# --------------------------------------------------------------------------------------
# 6. resources: refused before any allocation or loop, with the estimate
# --------------------------------------------------------------------------------------

def test_resources_oversized_geometries_are_refused_up_front():
    img = np.ones((8, 8))
    with pytest.raises(ValueError, match=r"3\.6e\+13 operations.*MAX_WORK"):
        nsiter.patch_covariance(img, 3, padding=10**6)
    with pytest.raises(ValueError, match="MAX_WORK"):
        nsiter.PatchStatistics(3, padding=10**6).update(img)
    with pytest.raises(ValueError, match=r"im2col matrix.*MAX_ELEMENTS.*patch_covariance"):
        nsiter.im2col(img, 3, padding=10**6)
    with pytest.raises(ValueError, match=r"9801 x 9801.*MAX_WORK.*smaller kernel_size"):
        nsiter.deconvolve_image(np.random.default_rng(111).standard_normal((16, 16)), 99)
    with pytest.raises(ValueError, match="covariance of 40000 features.*MAX_ELEMENTS"):
        nsiter.covariance(np.zeros((2, 40000)))
    with pytest.raises(ValueError, match="col2im.*MAX_ELEMENTS"):
        nsiter.col2im(np.zeros((1, 1)), (1, 1, 10**6, 10**6), 1, stride=10**7)


@pytest.mark.parametrize("shape, k, s, p, what", [
    ((1, 1, 1024, 1024), 15, 1, 0, "im2col"),     # analysis/bench_kernel_estimation.py
    ((8, 64, 64, 64), 3, 1, 1, "im2col"),         # Table 3 / bench_compare
    ((32, 128, 64, 64), 3, 1, 1, "im2col"),       # analysis/bench_gpu.py
    ((128, 3, 256, 256), 7, 3, 0, "im2col"),      # analysis/bench_gpu.py
    ((128, 64, 128, 128), 3, 3, 1, "im2col"),     # Table 3 at the paper's batch, S = 3
    ((1, 1, 2048, 2048), 15, 1, 7, "stats"),      # analysis/bench_covariance.py memory rows
    ((64, 16, 256, 256), 3, 1, 1, "stats"),
    ((64, 3, 1024, 1024), 15, 1, 7, "stats"),     # figures: 1024 x 1024 RGB, k = 15
])
def test_resources_bounds_admit_the_analysis_shapes(shape, k, s, p, what):
    g = _sampled_geometry(shape, k, s, p, 1, 1)
    work = g.n * g.n_patches * g.n_features
    assert work <= (MAX_ELEMENTS if what == "im2col" else MAX_WORK)
    assert g.n_features ** 3 <= MAX_WORK  # its inverse square root (deconvolve_image)
    assert _conventions.check_budget(work, "MAX_WORK", "x", "y") is None
