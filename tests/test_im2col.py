"""im2col / col2im: exact data movement against loop references, adjointness, layout, errors."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import nsiter
import reference


geometries = st.fixed_dictionaries(
    {
        "n": st.integers(1, 2),
        "c": st.integers(1, 3),
        "h": st.integers(1, 9),
        "w": st.integers(1, 9),
        "k": st.tuples(st.integers(1, 4), st.integers(1, 4)),
        "s": st.tuples(st.integers(1, 3), st.integers(1, 3)),
        "p": st.tuples(st.integers(0, 2), st.integers(0, 2)),
        "d": st.tuples(st.integers(1, 3), st.integers(1, 3)),
    }
)


def _fits(g):
    return all(
        g["d"][a] * (g["k"][a] - 1) + 1 <= (g["h"], g["w"])[a] + 2 * g["p"][a] for a in range(2)
    )


@given(geometries, st.sampled_from([np.float32, np.float64]))
def test_im2col_equals_loop_reference_exactly(g, dtype):
    if not _fits(g):
        return
    rng = np.random.default_rng(1)
    x = rng.standard_normal((g["n"], g["c"], g["h"], g["w"])).astype(dtype)
    got = nsiter.im2col(x, g["k"], stride=g["s"], padding=g["p"], dilation=g["d"])
    want = reference.im2col(x, g["k"], g["s"], g["p"], g["d"])
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want.astype(dtype))


@given(geometries)
def test_col2im_equals_loop_reference(g):
    if not _fits(g):
        return
    rng = np.random.default_rng(2)
    shape = (g["n"], g["c"], g["h"], g["w"])
    oh, ow = nsiter.output_shape(shape, g["k"], stride=g["s"], padding=g["p"], dilation=g["d"])
    cols = rng.standard_normal((g["n"] * oh * ow, g["c"] * g["k"][0] * g["k"][1]))
    got = nsiter.col2im(cols, shape, g["k"], stride=g["s"], padding=g["p"], dilation=g["d"])
    want = reference.col2im(cols, shape, g["k"], g["s"], g["p"], g["d"])
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


@given(geometries)
def test_col2im_is_the_adjoint_of_im2col(g):
    if not _fits(g):
        return
    rng = np.random.default_rng(3)
    x = rng.standard_normal((g["n"], g["c"], g["h"], g["w"]))
    kw = dict(stride=g["s"], padding=g["p"], dilation=g["d"])
    X = nsiter.im2col(x, g["k"], **kw)
    Y = rng.standard_normal(X.shape)
    lhs = np.vdot(X, Y)
    rhs = np.vdot(x, nsiter.col2im(Y, x.shape, g["k"], **kw))
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, np.abs(X).sum() * np.abs(Y).max())


def test_im2col_matvec_is_valid_cross_correlation():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 7, 6))
    w = rng.standard_normal((3, 3, 2))
    y = nsiter.im2col(x, (3, 2)) @ w.ravel()
    want = np.zeros((2, 5, 5))
    for n in range(2):
        for r in range(5):
            for q in range(5):
                want[n, r, q] = np.sum(x[n, :, r:r + 3, q:q + 2] * w)
    np.testing.assert_allclose(y.reshape(2, 5, 5), want, rtol=1e-13, atol=1e-13)


def test_im2col_layout_matches_torch_unfold():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 11, 10)).astype(np.float32)
    for k, s, p, d in [(3, 1, 1, 1), ((2, 3), (2, 1), (1, 0), (1, 2)), (5, 3, 2, 1)]:
        got = nsiter.im2col(x, k, stride=s, padding=p, dilation=d)
        t = torch.nn.functional.unfold(torch.from_numpy(x), k, dilation=d, padding=p, stride=s)
        np.testing.assert_array_equal(got, t.transpose(1, 2).reshape(got.shape).numpy())


@pytest.mark.parametrize("ndim", [2, 3])
def test_lower_rank_images_are_one_image(ndim):
    rng = np.random.default_rng(6)
    x4 = rng.standard_normal((1, 1, 6, 7))
    x = x4.reshape(x4.shape[4 - ndim:])
    np.testing.assert_array_equal(nsiter.im2col(x, 3), nsiter.im2col(x4, 3))
    cols = rng.standard_normal((20, 9))
    assert nsiter.col2im(cols, x.shape, 3).shape == x.shape


def test_non_contiguous_input_gives_same_result_and_is_not_modified():
    rng = np.random.default_rng(7)
    base = rng.standard_normal((2, 8, 12, 14))
    x = base[:, ::2, ::-1, 1::2]  # strided, reversed, offset view
    assert not x.flags.c_contiguous
    before = x.copy()
    got = nsiter.im2col(x, 3, padding=1)
    np.testing.assert_array_equal(got, nsiter.im2col(np.ascontiguousarray(x), 3, padding=1))
    np.testing.assert_array_equal(x, before)
    xt = np.asfortranarray(rng.standard_normal((3, 9, 9)))
    np.testing.assert_array_equal(nsiter.im2col(xt, 2), nsiter.im2col(np.ascontiguousarray(xt), 2))


@pytest.mark.parametrize(
    "dtype, expected",
    [(np.float32, np.float32), (np.float64, np.float64), (np.float16, np.float32),
     (np.int32, np.float64), (np.uint8, np.float64), (bool, np.float64)],
)
def test_dtype_rules(dtype, expected):
    x = (np.arange(25) % 7).reshape(5, 5).astype(dtype)
    X = nsiter.im2col(x, 2)
    assert X.dtype == expected
    np.testing.assert_array_equal(X, reference.im2col(x.astype(np.float64), 2).astype(expected))
    assert nsiter.col2im(X, x.shape, 2).dtype == expected


def test_one_by_one_kernel_is_a_transpose():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 4, 3, 5))
    X = nsiter.im2col(x, 1)
    np.testing.assert_array_equal(X, x.transpose(0, 2, 3, 1).reshape(-1, 4))


def test_col2im_counts_overlaps():
    ones = np.ones((4 * 4, 9))
    counts = nsiter.col2im(ones, (6, 6), 3)
    want = np.zeros((6, 6))
    for r in range(4):
        for q in range(4):
            want[r:r + 3, q:q + 3] += 1
    np.testing.assert_array_equal(counts, want)


def test_col2im_of_transposed_conv_weight_is_transposed_convolution():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    z = rng.standard_normal((2, 3, 4, 5))  # (N, Cin, h, w) low-res input
    wt = rng.standard_normal((3, 2, 3, 3))  # conv_transpose2d weight (Cin, Cout, kh, kw)
    stride = 2
    # rows: input pixels; columns: (cout, i, j)
    cols = z.transpose(0, 2, 3, 1).reshape(-1, 3) @ wt.reshape(3, -1)
    H = (4 - 1) * stride + 3
    W = (5 - 1) * stride + 3
    got = nsiter.col2im(cols, (2, 2, H, W), 3, stride=stride)
    want = torch.nn.functional.conv_transpose2d(torch.from_numpy(z), torch.from_numpy(wt), stride=stride).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_output_shape_formula():
    assert nsiter.output_shape((10, 11), 3) == (8, 9)
    assert nsiter.output_shape((1, 1, 10, 11), (3, 5), stride=2, padding=(1, 2), dilation=(1, 2)) == (5, 4)


# ---------------------------------------------------------------- bad input
def test_kernel_larger_than_padded_image_is_rejected():
    with pytest.raises(ValueError, match="larger than the padded image"):
        nsiter.im2col(np.zeros((4, 4)), 5)
    with pytest.raises(ValueError, match="dilation"):
        nsiter.im2col(np.zeros((4, 4)), 3, dilation=2)
    nsiter.im2col(np.zeros((4, 4)), 5, padding=1)  # fits once padded


@pytest.mark.parametrize("kw, match", [
    (dict(kernel_size=0), "positive kernel_size"),
    (dict(kernel_size=(3, -1)), "positive kernel_size"),
    (dict(kernel_size=3, stride=0), "positive stride"),
    (dict(kernel_size=3, dilation=(1, 0)), "positive dilation"),
    (dict(kernel_size=3, padding=-1), "padding"),
    (dict(kernel_size=2.5), "int or an"),
    (dict(kernel_size=(1, 2, 3)), "int or an"),
    (dict(kernel_size=True), "int or an"),
])
def test_bad_geometry_parameters(kw, match):
    exc = TypeError if match == "int or an" else ValueError
    with pytest.raises(exc, match=match):
        nsiter.im2col(np.zeros((5, 5)), **kw)


def test_wrong_ndim_complex_and_empty_inputs():
    with pytest.raises(ValueError, match="ndim 2 or 3 or 4"):
        nsiter.im2col(np.zeros(5), 1)
    with pytest.raises(ValueError, match="ndim 2 or 3 or 4"):
        nsiter.im2col(np.zeros((1, 1, 1, 5, 5)), 1)
    with pytest.raises(TypeError, match="complex"):
        nsiter.im2col(np.zeros((5, 5), complex), 3)
    with pytest.raises(ValueError, match="non-empty"):
        nsiter.im2col(np.zeros((0, 3, 5, 5)), 3)
    with pytest.raises(TypeError, match="numeric"):
        nsiter.im2col(np.array([["a", "b"], ["c", "d"]]), 1)


def test_col2im_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match=r"expected X of shape \(16, 9\)"):
        nsiter.col2im(np.zeros((15, 9)), (6, 6), 3)
    with pytest.raises(ValueError, match="ndim 2"):
        nsiter.col2im(np.zeros(9), (6, 6), 3)
    with pytest.raises(ValueError, match="image_shape"):
        nsiter.col2im(np.zeros((16, 9)), (6,), 3)
    with pytest.raises(ValueError, match="larger than the padded image"):
        nsiter.col2im(np.zeros((16, 9)), (2, 2), 3)
