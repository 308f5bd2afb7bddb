"""im2col's ``out=`` contract and the vector-run im2col / symmetric covariance kernels against references."""
from __future__ import annotations

import numpy as np
import pytest

import nsiter
import reference


def _cases():
    rng = np.random.default_rng(17)
    out = [((8, 64, 12, 12), 3, 1, 1, 1), ((2, 3, 40, 41), 7, 3, 0, 1), ((1, 2, 9, 30), (2, 13), (1, 3), (3, 0), (2, 1)),
           ((1, 1, 8, 40), (3, 17), 1, 2, 1), ((2, 3, 11, 19), (3, 5), 2, (1, 2), 2), ((1, 5, 7, 7), 1, 1, 0, 1),
           ((3, 2, 5, 6), (5, 6), 1, 2, 1), ((1, 130, 4, 5), 3, 1, 1, 1)]
    for _ in range(12):  # odd sizes, strides, dilations, paddings
        k = tuple(int(v) for v in rng.integers(1, 10, 2))
        d = tuple(int(v) for v in rng.integers(1, 3, 2))
        p = tuple(int(v) for v in rng.integers(0, 4, 2))
        s = tuple(int(v) for v in rng.integers(1, 4, 2))
        hw = [max(1, d[a] * (k[a] - 1) + 1 - 2 * p[a] + int(rng.integers(0, 9))) for a in range(2)]
        out.append(((int(rng.integers(1, 3)), int(rng.integers(1, 5)), *hw), k, s, p, d))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", _cases())
def test_im2col_with_and_without_out_equals_loop_reference(case, dtype):
    shape, k, s, p, d = case
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    want = reference.im2col(x, k, s, p, d).astype(dtype)
    got = nsiter.im2col(x, k, stride=s, padding=p, dilation=d)
    np.testing.assert_array_equal(got, want)
    out = np.full(want.shape, np.nan, dtype)
    res = nsiter.im2col(x, k, stride=s, padding=p, dilation=d, out=out)
    assert res is out
    np.testing.assert_array_equal(out, want)


def test_im2col_out_is_reused_and_overwritten_completely():
    rng = np.random.default_rng(2)
    out = np.full((2 * 100, 27), 7.0, np.float32)
    for _ in range(2):
        x = rng.standard_normal((2, 3, 10, 10), dtype=np.float32)
        nsiter.im2col(x, 3, padding=1, out=out)
        np.testing.assert_array_equal(out, nsiter.im2col(x, 3, padding=1))


def test_im2col_out_does_not_modify_the_input():
    x = np.random.default_rng(3).standard_normal((1, 2, 6, 6))
    keep = x.copy()
    nsiter.im2col(x, 3, out=np.empty((16, 18)))
    np.testing.assert_array_equal(x, keep)


def test_im2col_out_float16_input_takes_a_float32_out():
    x = np.random.default_rng(4).standard_normal((1, 1, 5, 5)).astype(np.float16)
    out = np.empty((9, 9), np.float32)
    assert nsiter.im2col(x, 3, out=out) is out
    with pytest.raises(ValueError, match=r"out has dtype float16, expected float32"):
        nsiter.im2col(x, 3, out=np.empty((9, 9), np.float16))


@pytest.mark.parametrize("bad, match", [
    (np.empty((16, 19), np.float32), r"out has shape \(16, 19\), expected \(16, 18\).*np\.empty\(\(16, 18\), dtype=np\.float32\)"),
    (np.empty((288,), np.float32), r"out has shape \(288,\), expected \(16, 18\)"),
    (np.empty((16, 18)), r"out has dtype float64, expected float32.*pass np\.empty"),
    (np.empty((16, 18), ">f4"), r"out has dtype >f4, expected float32"),
    (np.empty((18, 16), np.float32).T, r"not C-contiguous"),
    (np.empty((16, 36), np.float32)[:, ::2], r"not C-contiguous"),
])
def test_im2col_out_of_wrong_shape_dtype_or_layout_is_refused(bad, match):
    x = np.zeros((1, 2, 6, 6), np.float32)
    with pytest.raises(ValueError, match=match):
        nsiter.im2col(x, 3, out=bad)


def test_im2col_read_only_out_is_refused():
    out = np.empty((16, 18), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only; pass a writeable"):
        nsiter.im2col(np.zeros((1, 2, 6, 6), np.float32), 3, out=out)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
@pytest.mark.parametrize("bad", [[[0.0] * 18] * 16, np.ma.zeros((16, 18), np.float32),
                                 np.asmatrix(np.zeros((16, 18), np.float32))])
def test_im2col_out_that_is_not_a_plain_ndarray_is_refused(bad):
    with pytest.raises(TypeError, match="expected out to be a numpy.ndarray"):
        nsiter.im2col(np.zeros((1, 2, 6, 6), np.float32), 3, out=bad)


def test_im2col_out_overlapping_the_input_is_refused():
    buf = np.zeros(2000, np.float32)
    x = buf[:72].reshape(1, 2, 6, 6)
    with pytest.raises(ValueError, match="out shares memory with x"):
        nsiter.im2col(x, 3, out=buf[40:40 + 288].reshape(16, 18))
    # disjoint parts of one buffer are fine
    out = buf[100:100 + 288].reshape(16, 18)
    assert nsiter.im2col(x, 3, out=out) is out


def test_im2col_out_overlapping_an_input_that_is_converted_is_refused():
    buf = np.zeros(4000, np.float32)
    x = buf[:72].view(np.float16)[:72].reshape(1, 2, 6, 6)  # float16 view of the buffer: converted to float32
    with pytest.raises(ValueError, match="out shares memory with x"):
        nsiter.im2col(x, 3, out=buf[:288].reshape(16, 18))


def test_im2col_out_with_tensors():
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(np.random.default_rng(5).standard_normal((2, 3, 7, 7), dtype=np.float32))
    out = torch.empty(2 * 25, 27)
    assert nsiter.im2col(x, 3, out=out) is out
    assert torch.equal(out, nsiter.im2col(x, 3))
    with pytest.raises(TypeError, match="expected out to be a torch.Tensor"):
        nsiter.im2col(x, 3, out=np.empty((50, 27), np.float32))
    with pytest.raises(ValueError, match="out has dtype torch.float64, expected torch.float32"):
        nsiter.im2col(x, 3, out=torch.empty(50, 27, dtype=torch.float64))
    with pytest.raises(ValueError, match="not contiguous"):
        nsiter.im2col(x, 3, out=torch.empty(27, 50).T)
    buf = torch.zeros(4000)  # tensors: any part of x's storage is refused
    with pytest.raises(ValueError, match="shares storage"):
        nsiter.im2col(buf[:294].reshape(2, 3, 7, 7), 3, out=buf[1000:1000 + 1350].reshape(50, 27))


@pytest.mark.parametrize("kernel", ["rowshift", "shifted", "gemm", "narrow"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("geom", [(3, 1, 1), ((3, 5), (2, 0), 1), (3, 2, 2), (5, (1, 3), (2, 1))])
def test_symmetric_covariance_kernels_equal_the_reference_and_are_exactly_symmetric(kernel, dtype, geom):
    from nsiter._moments import plan as _plan
    from nsiter._numba.patches import patch_moments
    from nsiter.covariance import _sampled_geometry

    k, p, d = geom
    x = (np.random.default_rng(6).standard_normal((2, 3, 11, 13)) + 3.0).astype(dtype)
    g = _sampled_geometry(x.shape, k, 1, p, d, 1)
    n, mean, m2 = patch_moments(x, g, _plan(g.c, g.kh * g.kw, None, "contiguous"), kernel)
    X = reference.im2col(x.astype(np.float64), k, 1, p, d)
    mu = X.mean(axis=0)
    want = (X - mu).T @ (X - mu)
    tol = 1e-4 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(mean[0], mu, rtol=tol, atol=tol)
    np.testing.assert_allclose(m2[0], want, rtol=tol, atol=tol * np.abs(want).max())
    np.testing.assert_array_equal(m2[0], m2[0].T)


# --------------------------------------------------------------------------------------
# the fused "narrow" kernel: fill and register-tiled Gram products in cache-sized tasks
# --------------------------------------------------------------------------------------

def _narrow(x, k, block_size, grouping, *, sampling_stride=1, padding=1, kernel="narrow"):
    from nsiter._moments import plan as _plan
    from nsiter._numba.patches import patch_moments
    from nsiter.covariance import _sampled_geometry

    g = _sampled_geometry(x.shape, k, 1, padding, 1, sampling_stride)
    return patch_moments(x, g, _plan(g.c, g.kh * g.kw, block_size, grouping), kernel)


def _want(x, k, block_size, grouping, *, sampling_stride=1, padding=1):
    """Unnormalised centred moments from the loop reference (float64)."""
    cov, mean = reference.patch_covariance(x.astype(np.float64), k, 1, padding, 1, sampling_stride, block_size,
                                           grouping)
    return np.asarray(cov), np.asarray(mean)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels, block_size, grouping, sampling_stride", [
    (32, 1, "reference", 3),  # 32 lanes of 16 float64 columns: 4 KiB patch rows, one zero lane row added
    (12, 4, "contiguous", 1),  # three groups of 36 features: 4 x 4-vector tiles, the diagonal ones skipped
    (6, 2, "reference", 2),  # 18 features: rows of three vectors
    (3, None, "reference", 1),  # one block of 27 features
    (4, 1, "contiguous", 3),  # 9 features: a whole 8-row tile plus a 4-row one
])
def test_narrow_kernel_equals_the_loop_reference_and_is_exactly_symmetric(dtype, channels, block_size, grouping,
                                                                           sampling_stride, monkeypatch):
    from nsiter._numba import patches

    x = (np.random.default_rng(8).standard_normal((3, channels, 13, 14)) + 2.0).astype(dtype)
    want_cov, want_mean = _want(x, 3, block_size, grouping, sampling_stride=sampling_stride)
    for task_bytes in (patches._NARROW_TASK_BYTES, 4096 * 5):  # one task per part, and many partial tasks
        monkeypatch.setattr(patches, "_NARROW_TASK_BYTES", task_bytes)
        n, mean, m2 = _narrow(x, 3, block_size, grouping, sampling_stride=sampling_stride)
        cov = m2 / n
        want = want_cov.reshape(cov.shape)
        tol = 1e-12  # float64 products below 64 features, for float32 data too
        np.testing.assert_allclose(cov, want, rtol=tol, atol=tol * np.abs(want).max())
        np.testing.assert_allclose(mean, want_mean.reshape(mean.shape), rtol=tol, atol=tol)
        np.testing.assert_array_equal(m2, np.swapaxes(m2, -1, -2))


def test_narrow_kernel_rows_of_4k_strides_get_a_zero_row(monkeypatch):
    """Contiguous groups whose task buffers would be 4 KiB apart: one unwritten row in between."""
    from nsiter._numba import patches

    x = np.random.default_rng(9).standard_normal((2, 8, 20, 20)) + 1.0
    lanes, cols, rows = 8, 16, 32  # 8 groups of 9 features (+ the ones column): 16 float64 columns
    assert rows * cols * 8 % 4096 == 0
    monkeypatch.setattr(patches, "_NARROW_TASK_BYTES", rows * lanes * cols * 8)
    want_cov, _ = _want(x, 3, 1, "contiguous")
    n, _, m2 = _narrow(x, 3, 1, "contiguous")
    np.testing.assert_allclose(m2 / n, want_cov, rtol=1e-12, atol=1e-12 * np.abs(want_cov).max())


def test_narrow_kernel_does_not_depend_on_the_thread_count():
    """The partial sums are fixed parts of the rows, not threads: the same floats on 1 and 2 threads."""
    import numba

    x = np.random.default_rng(10).standard_normal((4, 16, 24, 24)).astype(np.float32) + 3.0
    saved = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = _narrow(x, 3, 1, "reference", sampling_stride=3)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = _narrow(x, 3, 1, "reference", sampling_stride=3)
    finally:
        numba.set_num_threads(saved)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


def test_narrow_kernel_agrees_with_the_blas_kernel_in_float64():
    x = np.random.default_rng(11).standard_normal((2, 6, 17, 15)) * 1e3 + 1e4
    a = _narrow(x, 5, 2, "reference", padding=2)
    b = _narrow(x, 5, 2, "reference", padding=2, kernel="gemm")
    assert a[0] == b[0]
    np.testing.assert_allclose(a[1], b[1], rtol=1e-13)
    np.testing.assert_allclose(a[2], b[2], rtol=1e-10, atol=1e-12 * np.abs(b[2]).max())


def test_cost_model_picks_narrow_on_strided_grids_rowshift_when_dense_and_blas_for_a_few_wide_rows():
    """The picks that analysis/results/covariance_narrow.md measures."""
    from nsiter._moments import plan as _plan
    from nsiter._numba.patches import choose_kernel
    from nsiter.covariance import _sampled_geometry

    def pick(shape, block_size, sampling_stride=3, grouping="reference"):
        g = _sampled_geometry(shape, 3, 1, 1, 1, sampling_stride)
        return choose_kernel(g, _plan(g.c, 9, block_size, grouping), np.float32)

    assert pick((128, 128, 64, 64), 1) == "narrow"  # Table 3, 64x64x128 g128: 9 features
    assert pick((128, 128, 64, 64), 4) == "narrow"  # g32: 36 features
    assert pick((128, 128, 64, 64), 64) == "narrow"  # g2: 576 features in float32 tiles
    assert pick((8, 64, 32, 32), None, 1, "contiguous") == "rowshift"  # dense: kh times less fill
    assert pick((1, 64, 12, 12), None) == "gemm"  # 16 rows: the accumulators would dominate


@pytest.mark.parametrize("geometry", [
    dict(k=3, stride=3, padding=1, dilation=1, shape=(3, 5, 20, 17)),
    dict(k=3, stride=1, padding=2, dilation=2, shape=(2, 4, 9, 11)),
    dict(k=5, stride=2, padding=0, dilation=1, shape=(2, 3, 16, 13)),
    dict(k=2, stride=3, padding=1, dilation=3, shape=(4, 2, 12, 12)),
])
def test_patch_rows_every_band_writes_the_im2col_rows(geometry):
    """The fill of the "gemm" and "narrow" kernels, one output row per pass or bands of several,
    over chunks that start and end inside output rows and images: every destination holds its
    im2col value minus the column's shift, and the ones columns hold 1, in every band."""
    from nsiter._numba import _covariance as kern

    rng = np.random.default_rng(5)
    k, s, p, d = geometry["k"], geometry["stride"], geometry["padding"], geometry["dilation"]
    x = rng.standard_normal(geometry["shape"]).astype(np.float32)
    n, c, h, w = x.shape
    oh, ow = ((size + 2 * p - d * (k - 1) - 1) // s + 1 for size in (h, w))
    X = nsiter.im2col(x, k, stride=s, padding=p, dilation=d).astype(np.float64)
    f = c * k * k
    rs = f + 3  # a row: the features scattered in reverse order, a ones column, two cells never written
    order = rng.permutation(f)
    tap_c, tap = np.divmod(order, k * k)
    ti, tj = np.divmod(tap, k)
    dest = f - 1 - order
    cols = np.ascontiguousarray(np.stack([tap_c, ti, tj, dest], axis=1), dtype=np.int64)
    shift = rng.standard_normal(f)[order]
    ones = np.array([f], dtype=np.int64)
    total = n * oh * ow
    for p0, rows in ((0, total), (ow // 2 + 1, total - ow // 2 - 2), (oh * ow - 1, ow + 2)):
        expected = np.full((rows, rs), 7.0, dtype=np.float32)
        expected[:, dest] = (X[p0:p0 + rows, order] - shift).astype(np.float32)
        expected[:, f] = 1.0
        for band in (1, 2, 3, oh + 1):
            got = np.full(rows * rs, 7.0, dtype=np.float32)
            kern._patch_rows(x, cols, shift, ones, k, s, s, p, p, d, d, oh, ow, p0, rows, rs, band, got)
            np.testing.assert_array_equal(got.reshape(rows, rs), expected, err_msg=f"band {band}, rows from {p0}")
