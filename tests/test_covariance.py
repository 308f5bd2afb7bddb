"""covariance / patch_covariance / PatchStatistics against the loop references of Algorithm 1."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import nsiter
import reference
from helpers import assert_close, random_images
from nsiter import _backend
from nsiter._moments import plan as _plan
from nsiter._numba import patches as np_patches
from nsiter._numba.patches import KERNELS
from nsiter.covariance import GROUPINGS, _finish, _sampled_geometry


def _kernels_for(g):
    """The kernels that apply to a sampled geometry (rowshift: vertical step 1; shifted: step 1)."""
    out = ["gemm", "narrow"]
    if g.sh == 1:
        out.append("rowshift")
        if g.sw == 1:
            out.append("shifted")
    return out


def _forced(x, kernel_size, kernel, *, stride=1, padding=0, dilation=1, sampling_stride=1, block_size=None,
            grouping="contiguous"):
    """patch_covariance with one kernel forced (the public function picks by cost)."""
    x = np.asarray(x)
    imgs = x.reshape((1,) * (4 - x.ndim) + x.shape)
    g = _sampled_geometry(imgs.shape, kernel_size, stride, padding, dilation, sampling_stride)
    plan = _plan(g.c, g.kh * g.kw, block_size, grouping)
    return _finish(_backend.backend(), np_patches.patch_moments(imgs, g, plan, kernel), plan, 0.0, x.dtype)


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


# --------------------------------------------------------------------------------------
# covariance(X)
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (300, 7), (5000, 70)])
def test_covariance_matches_two_pass_float64_reference(shape):
    rng = np.random.default_rng(10)
    X = rng.standard_normal(shape) * rng.uniform(0.1, 10, shape[1]) + rng.uniform(-5, 5, shape[1])
    cov, mean = nsiter.covariance(X)
    want_cov, want_mean = reference.covariance(X)
    assert cov.shape == (shape[1], shape[1]) and mean.shape == (shape[1],)
    assert cov.dtype == mean.dtype == np.float64
    assert_close(cov, want_cov, n=shape[0])
    assert_close(mean, want_mean, n=shape[0])
    np.testing.assert_array_equal(cov, cov.T)


def test_covariance_docstring_values_and_ridge():
    cov, mean = nsiter.covariance([[1.0, 2.0], [3.0, 6.0]], eps=0.5)
    np.testing.assert_allclose(cov, [[1.5, 2.0], [2.0, 4.5]])
    np.testing.assert_allclose(mean, [2.0, 4.0])


@pytest.mark.parametrize("f", [8, 100])
def test_covariance_float32_with_large_mean_is_accurate_to_1e_5(f):
    rng = np.random.default_rng(11)
    X = (1000.0 + rng.standard_normal((20000, f))).astype(np.float32)
    cov, mean = nsiter.covariance(X)
    want, want_mean = reference.covariance(X)  # float64 on the same float32 data
    assert cov.dtype == mean.dtype == np.float32
    assert _rel(cov, want) < 1e-5
    # the reference code's single-pass float32 formula loses the digits
    naive = X.T @ X / len(X) - np.outer(X.mean(0), X.mean(0))
    assert _rel(naive, want) > 1e-3


@pytest.mark.parametrize("dtype, want", [(np.int64, np.float64), (np.bool_, np.float64), (np.float16, np.float32)])
def test_covariance_promotes_integer_bool_and_half(dtype, want):
    X = (np.arange(12).reshape(6, 2) % 3).astype(dtype)
    cov, mean = nsiter.covariance(X)
    assert cov.dtype == mean.dtype == want
    assert_close(cov, reference.covariance(X.astype(np.float64))[0], dtype=want)


def test_covariance_does_not_modify_its_input():
    X = np.random.default_rng(12).standard_normal((50, 4))
    X0 = X.copy()
    nsiter.covariance(X, eps=1.0)
    np.testing.assert_array_equal(X, X0)


def test_covariance_chunks_agree_with_one_shot(monkeypatch):
    rng = np.random.default_rng(13)
    X = rng.standard_normal((1001, 6)) + 3
    monkeypatch.setattr(np_patches, "_BUFFER_BYTES", 7 * 8 * 17)  # 17 rows per chunk
    cov, mean = nsiter.covariance(X)
    assert_close(cov, reference.covariance(X)[0], n=1001)
    assert_close(mean, X.mean(0))


@pytest.mark.parametrize("bad, err, match", [
    (np.ones(5), ValueError, "ndim 2"),
    (np.ones((2, 2, 2)), ValueError, "ndim 2"),
    (np.ones((0, 3)), ValueError, "non-empty"),
    (np.array([[1.0, np.nan], [0.0, 1.0]]), ValueError, "finite"),
    (np.array([[1.0, np.inf], [0.0, 1.0]]), ValueError, "finite"),
    (np.ones((3, 2), dtype=complex), TypeError, "complex"),
])
def test_covariance_rejects_bad_input(bad, err, match):
    with pytest.raises(err, match=match):
        nsiter.covariance(bad)


def test_covariance_rejects_negative_eps():
    with pytest.raises(ValueError, match="eps >= 0"):
        nsiter.covariance(np.ones((3, 2)), eps=-1.0)


# --------------------------------------------------------------------------------------
# patch_covariance against the loop reference, every kernel
# --------------------------------------------------------------------------------------

CASES = [
    # shape, kernel_size, stride, padding, dilation, sampling_stride
    ((2, 4, 9, 11), 3, 1, 1, 1, 1),
    ((2, 4, 9, 11), 3, 1, 0, 1, 2),
    ((1, 4, 12, 10), (3, 2), (1, 2), (2, 1), (1, 2), 1),
    ((3, 2, 8, 8), 2, 1, 0, 1, 1),
    ((1, 2, 10, 9), (3, 4), 1, (2, 1), (2, 1), 1),
    ((2, 4, 7, 7), 1, 1, 0, 1, 3),
    ((1, 4, 5, 6), 3, 1, 3, 1, 1),  # padding larger than the kernel: all-padding taps
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block_size, grouping", [(None, "contiguous"), (2, "contiguous"), (2, "reference"),
                                                  (1, "reference"), (4, "contiguous")])
def test_patch_covariance_every_kernel_matches_loop_reference(case, block_size, grouping):
    shape, k, s, p, d, S = case
    if block_size is not None and shape[1] % block_size:
        return
    rng = np.random.default_rng(20)
    x = random_images(shape, rng) + 4.0
    want_cov, want_mean = reference.patch_covariance(x, k, s, p, d, S, block_size, grouping)
    g = _sampled_geometry(x.shape, k, s, p, d, S)
    for kernel in _kernels_for(g):
        cov, mean = _forced(x, k, kernel, stride=s, padding=p, dilation=d, sampling_stride=S,
                            block_size=block_size, grouping=grouping)
        assert cov.shape == want_cov.shape and mean.shape == want_mean.shape, kernel
        assert_close(cov, want_cov, n=1000, err_msg=kernel)
        assert_close(mean, want_mean, n=1000, err_msg=kernel)
    cov, mean = nsiter.patch_covariance(x, k, stride=s, padding=p, dilation=d, sampling_stride=S,
                                        block_size=block_size, grouping=grouping)
    assert_close(cov, want_cov, n=1000)


geometries = st.fixed_dictionaries({
    "n": st.integers(1, 2), "c": st.sampled_from([1, 2, 4]), "h": st.integers(1, 9), "w": st.integers(1, 9),
    "k": st.tuples(st.integers(1, 3), st.integers(1, 3)), "s": st.tuples(st.integers(1, 2), st.integers(1, 2)),
    "p": st.tuples(st.integers(0, 2), st.integers(0, 2)), "d": st.tuples(st.integers(1, 2), st.integers(1, 2)),
    "S": st.integers(1, 3), "B": st.sampled_from([None, 1, 2]), "grouping": st.sampled_from(GROUPINGS),
})


@given(geometries)
def test_patch_covariance_equals_covariance_of_grouped_im2col(q):
    fits = all(q["d"][a] * (q["k"][a] - 1) + 1 <= (q["h"], q["w"])[a] + 2 * q["p"][a] for a in range(2))
    if not fits or (q["B"] is not None and q["c"] % q["B"]):
        return
    rng = np.random.default_rng(21)
    x = rng.standard_normal((q["n"], q["c"], q["h"], q["w"])) * 2 + 1
    kw = dict(stride=q["s"], padding=q["p"], dilation=q["d"], sampling_stride=q["S"], block_size=q["B"],
              grouping=q["grouping"])
    want_cov, want_mean = reference.patch_covariance(x, q["k"], q["s"], q["p"], q["d"], q["S"], q["B"],
                                                     q["grouping"])
    g = _sampled_geometry(x.shape, q["k"], q["s"], q["p"], q["d"], q["S"])
    for kernel in _kernels_for(g):
        cov, mean = _forced(x, q["k"], kernel, **kw)
        np.testing.assert_allclose(cov, want_cov, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(want_cov).max()),
                                   err_msg=kernel)
        np.testing.assert_allclose(mean, want_mean, rtol=1e-10, atol=1e-12, err_msg=kernel)


def test_block_size_none_equals_covariance_of_public_im2col():
    rng = np.random.default_rng(22)
    x = random_images((3, 3, 20, 17), rng)
    cov, mean = nsiter.patch_covariance(x, (3, 5), stride=2, padding=(1, 2), sampling_stride=2)
    want, want_mean = nsiter.covariance(nsiter.im2col(x, (3, 5), stride=4, padding=(1, 2)))
    assert_close(cov, want, n=100)
    assert_close(mean, want_mean, n=100)


def test_contiguous_blocks_equal_covariances_of_channel_slices():
    rng = np.random.default_rng(23)
    x = random_images((2, 6, 12, 12), rng)
    cov, mean = nsiter.patch_covariance(x, 3, padding=1, block_size=2)
    assert cov.shape == (3, 18, 18) and mean.shape == (3, 18)
    for g in range(3):
        want, want_mean = nsiter.patch_covariance(x[:, 2 * g:2 * g + 2], 3, padding=1)
        assert_close(cov[g], want, n=100)
        assert_close(mean[g], want_mean, n=100)


def test_reference_grouping_is_one_shared_matrix_over_interleaved_columns():
    rng = np.random.default_rng(24)
    x = random_images((2, 6, 10, 10), rng)
    cov, mean = nsiter.patch_covariance(x, 3, block_size=2, grouping="reference")
    assert cov.shape == (18, 18) and mean.shape == (18,)
    X = nsiter.im2col(x, 3)
    G = 3
    stacked = X.reshape(len(X), 18, G).transpose(0, 2, 1).reshape(-1, 18)  # FastDeconv's view
    want, want_mean = reference.covariance(stacked)
    assert_close(cov, want, n=100)
    assert_close(mean, want_mean, n=100)
    assert nsiter.PatchStatistics(3, block_size=2, grouping="reference").update(x).count == len(X) * G


def test_block_size_equal_to_channels_gives_the_full_matrix_both_ways():
    x = random_images((2, 3, 9, 9), np.random.default_rng(25))
    full, _ = nsiter.patch_covariance(x, 3)
    contiguous, _ = nsiter.patch_covariance(x, 3, block_size=3)
    shared, _ = nsiter.patch_covariance(x, 3, block_size=3, grouping="reference")
    assert contiguous.shape == (1, 27, 27) and shared.shape == (27, 27)
    assert_close(contiguous[0], full, n=100)
    assert_close(shared, full, n=100)


def test_eps_is_added_to_every_block():
    x = random_images((1, 4, 8, 8), np.random.default_rng(26))
    a, _ = nsiter.patch_covariance(x, 3, block_size=2)
    b, _ = nsiter.patch_covariance(x, 3, block_size=2, eps=0.25)
    assert_close(b - a, np.broadcast_to(0.25 * np.eye(18), a.shape), n=100)


@pytest.mark.parametrize("ndim", [2, 3])
def test_two_and_three_dimensional_images_are_one_image(ndim):
    x = random_images((1, 1, 10, 12)[-ndim:] if ndim == 2 else (2, 10, 12), np.random.default_rng(27))
    cov, mean = nsiter.patch_covariance(x, 3)
    want = reference.patch_covariance(x, 3)
    assert_close(cov, want[0], n=100)


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("mean_level, padding", [(0.0, 1), (1000.0, 0), (1000.0, 2)])
def test_float32_every_kernel_within_1e_5_of_float64(grouping, mean_level, padding):
    rng = np.random.default_rng(28)
    x = (mean_level + random_images((3, 8, 24, 24), rng)).astype(np.float32)
    want, want_mean = reference.covariance(nsiter.im2col(x.astype(np.float64), 5, padding=padding))
    want_b, _ = nsiter.patch_covariance(x.astype(np.float64), 5, padding=padding, block_size=4, grouping=grouping)
    g = _sampled_geometry(x.shape, 5, 1, padding, 1, 1)
    for kernel in _kernels_for(g):
        cov, mean = _forced(x, 5, kernel, padding=padding)
        assert cov.dtype == mean.dtype == np.float32
        assert _rel(cov, want) < 1e-5, kernel
        assert _rel(mean, want_mean) < 1e-6, kernel
        cov_b, _ = _forced(x, 5, kernel, padding=padding, block_size=4, grouping=grouping)
        assert _rel(cov_b, want_b) < 1e-5, kernel


@pytest.mark.parametrize("kernel", KERNELS)
def test_small_buffers_split_chunks_and_bands_without_changing_the_result(kernel, monkeypatch):
    rng = np.random.default_rng(29)
    x = random_images((3, 2, 15, 13), rng) + 2
    want = reference.patch_covariance(x, 3, 1, 1, 1, 1, 1, "reference")
    for name in ("_BUFFER_BYTES", "_ROWS_BYTES", "_DENSE_BYTES"):
        monkeypatch.setattr(np_patches, name, 3000)  # a few rows per chunk, bands of one image
    cov, mean = _forced(x, 3, kernel, padding=1, block_size=1, grouping="reference")
    assert_close(cov, want[0], n=1000)
    assert_close(mean, want[1], n=1000)


def test_patch_covariance_accepts_views_and_does_not_modify_input():
    rng = np.random.default_rng(30)
    base = random_images((2, 6, 20, 30), rng)
    x = base[:, ::2, 3:17, ::2]  # non-contiguous view
    x0 = x.copy()
    cov, _ = nsiter.patch_covariance(x, 3, padding=1, eps=1e-3)
    np.testing.assert_array_equal(x, x0)
    assert_close(cov, nsiter.patch_covariance(x0, 3, padding=1, eps=1e-3)[0])


def test_cost_model_picks_the_im2col_free_kernel_for_large_dense_kernels():
    def pick(shape, k, S=1, B=None, grouping="contiguous"):
        g = _sampled_geometry(shape, k, 1, k // 2, 1, S)
        return np_patches.choose_kernel(g, _plan(g.c, g.kh * g.kw, B, grouping), np.float32)

    assert pick((1, 1, 512, 512), 15) == "shifted"
    assert pick((8, 64, 32, 32), 3, S=3) in ("gemm", "narrow")  # strided grid: only the patch-row kernels apply
    assert pick((8, 64, 32, 32), 3) in ("rowshift", "gemm")


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, err, match", [
    (dict(block_size=3), ValueError, r"gcd\(3, 4\)"),
    (dict(block_size=8), ValueError, r"block_size=4 \(gcd\(8, 4\)\)"),
    (dict(block_size=0), ValueError, "block_size >= 1"),
    (dict(block_size=2.0), TypeError, "integer block_size"),
    (dict(grouping="interleaved"), ValueError, "choose one of: 'contiguous', 'reference'"),
    (dict(sampling_stride=0), ValueError, "sampling_stride >= 1"),
    (dict(sampling_stride=1.5), TypeError, "integer sampling_stride"),
    (dict(stride=0), ValueError, "positive stride"),
    (dict(padding=-1), ValueError, "padding"),
    (dict(eps=-1e-3), ValueError, "eps >= 0"),
])
def test_patch_covariance_rejects_bad_options(kwargs, err, match):
    x = np.zeros((1, 4, 8, 8))
    with pytest.raises(err, match=match):
        nsiter.patch_covariance(x, 3, **kwargs)


@pytest.mark.parametrize("bad, err, match", [
    (np.zeros(8), ValueError, "ndim 2 or 3 or 4"),
    (np.zeros((1, 1, 1, 8, 8)), ValueError, "ndim 2 or 3 or 4"),
    (np.zeros((1, 0, 8, 8)), ValueError, "non-empty"),
    (np.zeros((4, 4), dtype=complex), TypeError, "complex"),
    (np.zeros((2, 2)), ValueError, "larger than the padded image"),
])
def test_patch_covariance_rejects_bad_images(bad, err, match):
    with pytest.raises(err, match=match):
        nsiter.patch_covariance(bad, 3)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_patch_covariance_rejects_non_finite_pixels(value):
    x = np.zeros((1, 2, 8, 8), dtype=np.float32)
    x[0, 1, 7, 7] = value  # even a pixel that no subsampled patch reads
    with pytest.raises(ValueError, match="1 NaN/inf"):
        nsiter.patch_covariance(x, 3, sampling_stride=3)
    with pytest.raises(ValueError, match="finite"):
        nsiter.PatchStatistics(3).update(x)


# --------------------------------------------------------------------------------------
# PatchStatistics
# --------------------------------------------------------------------------------------

SETTINGS = [dict(), dict(padding=1, block_size=2), dict(padding=(2, 1), block_size=1, grouping="reference"),
            dict(stride=2, sampling_stride=2, dilation=2, block_size=2, grouping="reference")]


@pytest.mark.parametrize("settings", SETTINGS)
def test_streaming_updates_equal_one_shot_to_1e_12(settings):
    rng = np.random.default_rng(40)
    x = random_images((7, 4, 13, 13), rng) + 50.0
    stats = nsiter.PatchStatistics(3, **settings)
    for lo, hi in [(0, 1), (1, 4), (4, 7)]:
        assert stats.update(x[lo:hi]) is stats
    cov, mean = stats.covariance(eps=1e-3)
    want, want_mean = nsiter.patch_covariance(x, 3, eps=1e-3, **settings)
    np.testing.assert_allclose(cov, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    np.testing.assert_allclose(mean, want_mean, rtol=1e-12, atol=1e-12 * np.abs(want_mean).max())
    assert stats.count == 7 * stats.count // 7


@pytest.mark.parametrize("settings", SETTINGS)
def test_merged_shards_equal_one_shot_to_1e_12(settings):
    rng = np.random.default_rng(41)
    shards = [random_images((n, 4, 11, 11), rng) + off for n, off in [(2, -3.0), (1, 0.0), (3, 10.0)]]
    parts = [nsiter.PatchStatistics(3, **settings).update(s) for s in shards]
    merged = nsiter.PatchStatistics(3, **settings)
    for p in parts:
        assert merged.merge(p) is merged
    cov, mean = merged.covariance()
    want, want_mean = nsiter.patch_covariance(np.concatenate(shards), 3, **settings)
    np.testing.assert_allclose(cov, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    np.testing.assert_allclose(mean, want_mean, rtol=1e-12, atol=1e-12 * np.abs(want_mean).max())
    assert merged.count == sum(p.count for p in parts)


@given(st.integers(1, 5), st.integers(5, 12), st.integers(5, 12))
def test_streaming_over_images_of_different_sizes_equals_covariance_of_stacked_rows(split, h2, w2):
    rng = np.random.default_rng(42)
    a = rng.standard_normal((split, 2, 9, 10)) + 2
    b = rng.standard_normal((2, 2, h2, w2)) - 1
    stats = nsiter.PatchStatistics(3, padding=1).update(a).update(b)
    X = np.concatenate([nsiter.im2col(a, 3, padding=1), nsiter.im2col(b, 3, padding=1)])
    want, want_mean = reference.covariance(X)
    cov, mean = stats.covariance()
    np.testing.assert_allclose(cov, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    np.testing.assert_allclose(mean, want_mean, rtol=1e-12, atol=1e-12)
    assert stats.count == len(X)


def test_patch_statistics_dtype_follows_the_updates():
    x = random_images((1, 1, 8, 8), np.random.default_rng(43), dtype=np.float32)
    stats = nsiter.PatchStatistics(3).update(x)
    assert stats.covariance()[0].dtype == np.float32 and stats.dtype == np.float32
    stats.update(x.astype(np.float64))
    assert stats.covariance()[0].dtype == np.float64


def test_merge_with_empty_accumulators_in_both_directions():
    x = random_images((2, 2, 8, 8), np.random.default_rng(44))
    full = nsiter.PatchStatistics(3).update(x)
    empty = nsiter.PatchStatistics(3)
    assert full.merge(nsiter.PatchStatistics(3)).count == full.count
    empty.merge(full)
    np.testing.assert_array_equal(empty.covariance()[0], full.covariance()[0])
    full.update(x)  # the copy is independent of the source
    assert empty.count * 2 == full.count
    assert "count=" in repr(full) and "channels=2" in repr(full)


def test_patch_statistics_rejects_bad_use():
    x = np.zeros((1, 4, 8, 8))
    with pytest.raises(ValueError, match="seen no data"):
        nsiter.PatchStatistics(3).covariance()
    with pytest.raises(ValueError, match=r"different settings \(kernel_size: \(3, 3\) vs \(5, 5\)"):
        nsiter.PatchStatistics(3).merge(nsiter.PatchStatistics(5))
    with pytest.raises(ValueError, match="sampling_stride: 1 vs 2"):
        nsiter.PatchStatistics(3).merge(nsiter.PatchStatistics(3, sampling_stride=2))
    with pytest.raises(ValueError, match="grouping"):
        nsiter.PatchStatistics(3, block_size=2).merge(nsiter.PatchStatistics(3, block_size=2, grouping="reference"))
    with pytest.raises(TypeError, match="PatchStatistics to merge"):
        nsiter.PatchStatistics(3).merge(np.eye(3))
    stats = nsiter.PatchStatistics(3).update(x)
    with pytest.raises(ValueError, match="4 channels"):
        stats.update(np.zeros((1, 3, 8, 8)))
    with pytest.raises(ValueError, match="4-channel"):
        nsiter.PatchStatistics(3).update(np.zeros((1, 2, 8, 8))).merge(stats)
    with pytest.raises(ValueError, match=r"gcd\(3, 4\)"):
        nsiter.PatchStatistics(3, block_size=3).update(x)
    with pytest.raises(ValueError, match="choose one of"):
        nsiter.PatchStatistics(3, grouping="nope")
    with pytest.raises(ValueError, match="sampling_stride >= 1"):
        nsiter.PatchStatistics(3, sampling_stride=0)
    assert stats.count == 36  # failed updates left it unchanged


def test_patch_statistics_accepts_torch_tensors_on_the_host():
    torch = pytest.importorskip("torch")
    x = random_images((2, 3, 9, 9), np.random.default_rng(45))
    stats = nsiter.PatchStatistics(3, padding=1).update(torch.from_numpy(x))
    want, _ = nsiter.patch_covariance(x, 3, padding=1)
    cov, _ = stats.covariance()
    assert isinstance(cov, np.ndarray)
    np.testing.assert_allclose(cov, want, rtol=1e-12, atol=1e-14)


def test_float32_blas_kernels_stay_within_1e_5_on_long_products():
    """Thousands of rows per float32 BLAS product (the per-product row caps), large mean."""
    rng = np.random.default_rng(46)
    x = (1000.0 + random_images((4, 8, 128, 128), rng)).astype(np.float32)
    want, want_mean = _forced(x.astype(np.float64), 3, "shifted", padding=1)
    for kernel in ("gemm", "narrow", "rowshift"):
        cov, mean = _forced(x, 3, kernel, padding=1)
        assert cov.dtype == np.float32
        assert _rel(cov, want) < 1e-5, kernel
        assert _rel(mean, want_mean) < 1e-6, kernel
