"""whiten / deconvolution_kernel / deconvolve_image / fold_deconvolution against explicit im2col algebra."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import nsiter
import reference
from helpers import assert_close, random_images

whitening_module = importlib.import_module("nsiter.whitening")

LAYOUTS = [(None, "contiguous"), (2, "contiguous"), (2, "reference"), (1, "reference"), (4, "reference")]


def _stats(x, k, block_size, grouping, eps=1e-3, **kw):
    cov, mean = nsiter.patch_covariance(x, k, block_size=block_size, grouping=grouping, **kw)
    return cov, mean, nsiter.inv_sqrtm(cov, method="eigh", eps=eps)


def _full_matrix(D, F, grouping):
    """The equivalent F x F matrix of a block layout, built with loops."""
    D = np.asarray(D, dtype=np.float64)
    out = np.zeros((F, F))
    if D.ndim == 2 and D.shape[0] == F:
        return D.copy()
    if D.ndim == 3:
        fb = D.shape[-1]
        for g in range(D.shape[0]):
            out[g * fb:(g + 1) * fb, g * fb:(g + 1) * fb] = D[g]
        return out
    fb = D.shape[0]
    G = F // fb
    for g in range(G):
        for a in range(fb):
            for b in range(fb):
                out[a * G + g, b * G + g] = D[a, b]
    return out


def _full_mean(mean, F, grouping):
    mean = np.asarray(mean, dtype=np.float64)
    if grouping == "reference" and mean.size < F:
        return np.repeat(mean, F // mean.size)
    return mean.reshape(F)


# --------------------------------------------------------------------------------------
# whiten
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("block_size, grouping", LAYOUTS)
def test_whiten_matches_loop_reference(block_size, grouping):
    rng = np.random.default_rng(50)
    x = random_images((2, 4, 7, 7), rng) + 3
    cov, mean, D = _stats(x, 3, block_size, grouping)
    X = nsiter.im2col(x, 3)
    fb = D.shape[-1]
    want = reference.whiten(X, mean, D, fb, grouping)
    got = nsiter.whiten(X, mean, D, block_size=block_size, grouping=grouping)
    assert_close(got, want, n=fb)
    if D.ndim == 3:  # a flat mean of length F is accepted for contiguous blocks
        assert_close(nsiter.whiten(X, mean.reshape(-1), D), want, n=fb)


@pytest.mark.parametrize("block_size, grouping", LAYOUTS)
def test_whitened_patches_have_identity_covariance(block_size, grouping):
    rng = np.random.default_rng(51)
    x = random_images((4, 4, 12, 12), rng)
    cov, mean, D = _stats(x, 3, block_size, grouping, eps=0.0, padding=1)
    Xw = nsiter.whiten(nsiter.im2col(x, 3, padding=1), mean, D, grouping=grouping)
    if grouping == "reference" and block_size is not None:
        G = Xw.shape[1] // D.shape[0]
        Xw = Xw.reshape(len(Xw), D.shape[0], G).transpose(0, 2, 1).reshape(-1, D.shape[0])
        blocks = [Xw]
    elif block_size is None:
        blocks = [Xw]
    else:
        fb = D.shape[-1]
        blocks = [Xw[:, g * fb:(g + 1) * fb] for g in range(D.shape[0])]
    for B in blocks:
        c, m = nsiter.covariance(B)
        np.testing.assert_allclose(c, np.eye(B.shape[1]), atol=1e-9)
        np.testing.assert_allclose(m, 0, atol=1e-9)


def test_whiten_float32_stays_float32_and_chunks_do_not_matter(monkeypatch):
    rng = np.random.default_rng(52)
    x = random_images((3, 4, 9, 9), rng, dtype=np.float32)
    cov, mean = nsiter.patch_covariance(x, 3, block_size=2, grouping="reference")
    D = nsiter.inv_sqrtm(cov, method="eigh", eps=1e-3)
    X = nsiter.im2col(x, 3)
    one = nsiter.whiten(X, mean, D, grouping="reference")
    monkeypatch.setattr(whitening_module, "_CHUNK_BYTES", 500)
    many = nsiter.whiten(X, mean, D, grouping="reference")
    assert one.dtype == many.dtype == np.float32
    np.testing.assert_array_equal(one, many)
    assert nsiter.whiten(X, mean.astype(np.float64), D, grouping="reference").dtype == np.float64


@given(st.integers(1, 3), st.sampled_from([1, 2, 4]), st.sampled_from(["contiguous", "reference"]),
       st.integers(1, 30))
def test_whiten_equals_multiplication_by_the_equivalent_full_matrix(taps, groups, grouping, n):
    rng = np.random.default_rng(53)
    fb = 2 * taps
    F = fb * groups
    X = rng.standard_normal((n, F))
    if grouping == "reference":
        D, mean = rng.standard_normal((fb, fb)), rng.standard_normal(fb)
    else:
        D, mean = rng.standard_normal((groups, fb, fb)), rng.standard_normal((groups, fb))
    got = nsiter.whiten(X, mean, D, grouping=grouping)
    want = (X - _full_mean(mean, F, grouping)) @ _full_matrix(D, F, grouping)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("X, mean, D, kw, match", [
    (np.ones(6), np.zeros(6), np.eye(6), {}, "ndim 2"),
    (np.ones((3, 6)), np.zeros(6), np.eye(5), {}, r"does not match the 6 columns"),
    (np.ones((3, 6)), np.zeros(6), np.eye(3), {}, "grouping='reference' for one shared matrix"),
    (np.ones((3, 6)), np.zeros(4), np.eye(4), dict(grouping="reference"), "multiple of 4 columns"),
    (np.ones((3, 6)), np.zeros((2, 3)), np.stack([np.eye(3)] * 2), dict(grouping="reference"), "shares one"),
    (np.ones((3, 6)), np.zeros((3, 2)), np.stack([np.eye(2)] * 2), {}, "covers 4 columns"),
    (np.ones((3, 6)), np.zeros(5), np.eye(6), {}, r"mean of shape \(6,\)"),
    (np.ones((3, 6)), np.zeros(6), np.ones((6, 5)), {}, "square"),
    (np.ones((3, 6)), np.zeros(6), np.eye(6), dict(grouping="rows"), "choose one of"),
    (np.ones((3, 6)), np.zeros(6), np.eye(6), dict(block_size=4), "block_size 4"),
    (np.ones((3, 6)), np.zeros(6), np.full((6, 6), np.nan), {}, "finite"),
    (np.full((3, 6), np.inf), np.zeros(6), np.eye(6), {}, "finite"),
])
def test_whiten_rejects_inconsistent_input(X, mean, D, kw, match):
    with pytest.raises(ValueError, match=match):
        nsiter.whiten(X, mean, D, **kw)


# --------------------------------------------------------------------------------------
# deconvolution_kernel and deconvolve_image
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("block_size, grouping", LAYOUTS)
@pytest.mark.parametrize("k", [3, (3, 5), 2])
def test_deconvolution_kernel_is_the_centre_tap_columns_of_D(block_size, grouping, k):
    rng = np.random.default_rng(60)
    x = random_images((2, 4, 9, 9), rng)
    cov, mean, D = _stats(x, k, block_size, grouping)
    kh, kw = (k, k) if np.isscalar(k) else k
    K = nsiter.deconvolution_kernel(D, k, 4, grouping=grouping)
    assert K.shape == (4, 4, kh, kw) and K.dtype == D.dtype
    full = _full_matrix(D, 4 * kh * kw, grouping)
    for c in range(4):
        j = c * kh * kw + (kh // 2) * kw + kw // 2
        np.testing.assert_array_equal(K[c].reshape(-1), full[:, j])
        np.testing.assert_allclose(K[c].reshape(-1), full[j], atol=1e-12)  # the middle row: D symmetric


@pytest.mark.parametrize("shape", [(17, 19), (3, 17, 19), (2, 2, 17, 19)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_deconvolve_image_equals_centre_columns_of_whitened_im2col(shape, dtype):
    rng = np.random.default_rng(61)
    x = (random_images(shape, rng) + 5).astype(dtype)
    k = 5
    y = nsiter.deconvolve_image(x, k, eps=1e-3, method="eigh")
    assert y.shape == x.shape and y.dtype == dtype
    x4 = x.reshape((1,) * (4 - x.ndim) + x.shape).astype(np.float64)
    n, c, h, w = x4.shape
    cov, mean = nsiter.patch_covariance(x4, k, padding=2)
    D = nsiter.inv_sqrtm(cov, method="eigh", eps=1e-3)
    Xw = (nsiter.im2col(x4, k, padding=2) - mean) @ D
    cols = np.arange(c) * k * k + (k // 2) * k + k // 2
    want = Xw[:, cols].reshape(n, h, w, c).transpose(0, 3, 1, 2).reshape(shape)
    assert_close(y, want, dtype=dtype, factor=100 if dtype == np.float32 else 10, n=k * k * c)


@pytest.mark.parametrize("block_size, grouping", [(1, "contiguous"), (1, "reference")])
def test_deconvolve_image_with_blocks_and_subsampling(block_size, grouping):
    rng = np.random.default_rng(62)
    x = random_images((3, 16, 16), rng)
    y = nsiter.deconvolve_image(x, 3, method="eigh", eps=1e-4, sampling_stride=2, block_size=block_size,
                                grouping=grouping)
    cov, mean = nsiter.patch_covariance(x, 3, padding=1, sampling_stride=2, block_size=block_size,
                                        grouping=grouping)
    D = nsiter.inv_sqrtm(cov, method="eigh", eps=1e-4)
    Xw = nsiter.whiten(nsiter.im2col(x, 3, padding=1), mean, D, grouping=grouping)
    want = Xw[:, [4, 13, 22]].reshape(16, 16, 3).transpose(2, 0, 1)
    assert_close(y, want, n=27, factor=10)


def test_deconvolve_image_default_coupled_newton_schulz_is_close_to_exact():
    x = nsiter.data.sample_image(gray=True)[::4, ::4]
    exact = nsiter.deconvolve_image(x, 5, method="eigh", eps=1e-2)
    ns = nsiter.deconvolve_image(x, 5, eps=1e-2, n_iter=60)
    assert np.max(np.abs(ns - exact)) < 1e-3 * np.max(np.abs(exact))


def test_deconvolution_rejects_bad_input():
    D = np.eye(9)
    with pytest.raises(ValueError, match="channels >= 1"):
        nsiter.deconvolution_kernel(D, 3, 0)
    with pytest.raises(ValueError, match="does not match"):
        nsiter.deconvolution_kernel(D, 3, 2)
    with pytest.raises(ValueError, match="odd kernel_size"):
        nsiter.deconvolve_image(np.ones((8, 8)), 4)
    with pytest.raises(ValueError, match="finite"):
        nsiter.deconvolve_image(np.full((8, 8), np.nan), 3)
    with pytest.raises(ValueError, match="ndim"):
        nsiter.deconvolve_image(np.ones(8), 3)


# --------------------------------------------------------------------------------------
# fold_deconvolution
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("block_size, grouping", LAYOUTS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_folded_correlation_equals_whitening_then_correlation(block_size, grouping, with_bias):
    rng = np.random.default_rng(70)
    x = random_images((2, 4, 9, 9), rng) + 2
    cov, mean, D = _stats(x, 3, block_size, grouping, padding=1)
    w = rng.standard_normal((5, 4, 3, 3))
    b = rng.standard_normal(5) if with_bias else None
    w2, b2 = nsiter.fold_deconvolution(w, b, D, mean, block_size=block_size, grouping=grouping)
    assert w2.shape == w.shape and b2.shape == (5,)
    X = nsiter.im2col(x, 3, padding=1)
    explicit = nsiter.whiten(X, mean, D, grouping=grouping) @ w.reshape(5, -1).T + (0 if b is None else b)
    folded = X @ w2.reshape(5, -1).T + b2
    assert_close(folded, explicit, n=36, factor=10)


def test_fold_deconvolution_of_a_grouped_convolution():
    rng = np.random.default_rng(71)
    x = random_images((2, 4, 8, 8), rng)
    cov, mean, D = _stats(x, 3, 2, "contiguous")  # D (2, 18, 18): groups = 2
    w = rng.standard_normal((6, 2, 3, 3))  # grouped conv weight: C_in / groups = 2
    b = rng.standard_normal(6)
    w2, b2 = nsiter.fold_deconvolution(w, b, D, mean)
    Xw = nsiter.whiten(nsiter.im2col(x, 3), mean, D)
    for o in range(6):
        g = o // 3
        explicit = Xw[:, g * 18:(g + 1) * 18] @ w[o].reshape(-1) + b[o]
        folded = nsiter.im2col(x[:, 2 * g:2 * g + 2], 3) @ w2[o].reshape(-1) + b2[o]
        assert_close(folded, explicit, n=18, factor=10)


def test_folded_weights_in_torch_conv2d_match_explicit_deconvolution():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(72)
    x = random_images((2, 4, 10, 10), rng)
    cov, mean, D = _stats(x, 3, 2, "reference", padding=1)
    w, b = rng.standard_normal((3, 4, 3, 3)), rng.standard_normal(3)
    w2, b2 = nsiter.fold_deconvolution(w, b, D, mean, grouping="reference")
    y = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w2), torch.from_numpy(b2), padding=1)
    Xw = nsiter.whiten(nsiter.im2col(x, 3, padding=1), mean, D, grouping="reference")
    want = (Xw @ w.reshape(3, -1).T + b).reshape(2, 10, 10, 3).transpose(0, 3, 1, 2)
    assert_close(y.numpy(), want, n=36, factor=10)


def test_fold_deconvolution_rejects_bad_input():
    w = np.ones((4, 2, 3, 3))
    D = np.eye(18)
    with pytest.raises(ValueError, match=r"bias of shape \(4,\)"):
        nsiter.fold_deconvolution(w, np.ones(3), D, np.zeros(18))
    with pytest.raises(ValueError, match="ndim 4"):
        nsiter.fold_deconvolution(np.ones((4, 18)), None, D, np.zeros(18))
    with pytest.raises(ValueError, match="does not match"):
        nsiter.fold_deconvolution(w, None, np.eye(9), np.zeros(9))
    with pytest.raises(ValueError, match="divisible by 3"):
        nsiter.fold_deconvolution(w, None, np.stack([np.eye(18)] * 3), np.zeros((3, 18)))
    with pytest.raises(ValueError, match="mean of shape"):
        nsiter.fold_deconvolution(w, None, D, np.zeros(9))
    with pytest.raises(ValueError, match="finite"):
        nsiter.fold_deconvolution(w, np.array([0, 0, 0, np.nan]), D, np.zeros(18))
