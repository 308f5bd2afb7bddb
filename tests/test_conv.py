"""conv2d, conv_transpose2d, pixel (un)shuffle and the sub-pixel weight maps (Shi et al. 2016).

The loop references live here rather than in ``tests/reference.py`` so that this module stays
self-contained (``reference.py`` is shared by other suites); they are the definitions written
as loops, in float64.
"""
from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

import nsiter
from nsiter._numba import _conv as numba_conv


# ---------------------------------------------------------------------------------------------
# loop references
# ---------------------------------------------------------------------------------------------
def _pair(v):
    return (v, v) if np.isscalar(v) else tuple(v)


def ref_conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    og = o // groups
    xp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw))
    xp[:, :, ph:ph + h, pw:pw + wd] = x
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((n, o, oh, ow))
    for oc in range(o):
        c0 = (oc // og) * cg
        for r in range(oh):
            for q in range(ow):
                for i in range(kh):
                    for j in range(kw):
                        y[:, oc, r, q] += xp[:, c0:c0 + cg, r * sh + i * dh, q * sw + j * dw] @ w[oc, :, i, j]
    if b is not None:
        y += np.asarray(b, np.float64)[None, :, None, None]
    return y


def ref_conv_transpose2d(x, w, b=None, stride=1, padding=0, output_padding=0, dilation=1, groups=1):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    (sh, sw), (ph, pw), (dh, dw), (qh, qw) = _pair(stride), _pair(padding), _pair(dilation), _pair(output_padding)
    n, c, h, wd = x.shape
    _, og, kh, kw = w.shape
    cg = c // groups
    ho = (h - 1) * sh - 2 * ph + dh * (kh - 1) + qh + 1
    wo = (wd - 1) * sw - 2 * pw + dw * (kw - 1) + qw + 1
    full = np.zeros((n, og * groups, ho + 2 * ph, wo + 2 * pw))
    for ci in range(c):
        o0 = (ci // cg) * og
        for r in range(h):
            for q in range(wd):
                for i in range(kh):
                    for j in range(kw):
                        full[:, o0:o0 + og, r * sh + i * dh, q * sw + j * dw] += x[:, ci, r, q, None] * w[ci, :, i, j]
    y = full[:, :, ph:ph + ho, pw:pw + wo]
    if b is not None:
        y = y + np.asarray(b, np.float64)[None, :, None, None]
    return y


def ref_pixel_shuffle(x, r):
    *lead, c, h, w = x.shape
    y = np.empty((*lead, c // (r * r), h * r, w * r), x.dtype)
    for o in range(c // (r * r)):
        for i in range(r):
            for j in range(r):
                y[..., o, i::r, j::r] = x[..., o * r * r + i * r + j, :, :]
    return y


def ref_subpixel_weight(W, r, groups=1):
    cin, og, kr, lr = W.shape
    kh, kw = kr // r, lr // r
    cg = cin // groups
    w = np.empty((og * groups * r * r, cg, kh, kw), W.dtype)
    for g in range(groups):
        for o in range(og):
            for phi in range(r):
                for psi in range(r):
                    for c in range(cg):
                        for t in range(kh):
                            for u in range(kw):
                                w[(g * og + o) * r * r + phi * r + psi, c, t, u] = \
                                    W[g * cg + c, o, r * (kh - 1 - t) + phi, r * (kw - 1 - u) + psi]
    return w


def shi_route(x, W, r, padding, output_padding, groups=1):
    """The right-hand side of the relation in ``subpixel_weight``'s docstring, from public pieces."""
    (p_h, p_w), (q_h, q_w) = _pair(padding), _pair(output_padding)
    kh, kw = W.shape[2] // r, W.shape[3] // r
    n, c, h, w = x.shape
    ho = (h - 1) * r - 2 * p_h + kh * r + q_h
    wo = (w - 1) * r - 2 * p_w + kw * r + q_w
    a, b = kh - 1 - p_h // r, kh - 1 - (p_h - q_h) // r
    lf, rt = kw - 1 - p_w // r, kw - 1 - (p_w - q_w) // r
    ext = max(0, a, b, lf, rt)
    xp = np.pad(x, ((0, 0), (0, 0), (ext, ext), (ext, ext)))
    xw = xp[:, :, ext - a: ext + h + b, ext - lf: ext + w + rt]
    y = nsiter.pixel_shuffle(nsiter.conv2d(xw, nsiter.subpixel_weight(W, r, groups=groups), groups=groups), r)
    et, eb, el, er = p_h % r, (p_h - q_h) % r, p_w % r, (p_w - q_w) % r
    assert y.shape[-2:] == (et + ho + eb, el + wo + er)  # the docstring's row count
    return y[:, :, et:et + ho, el:el + wo]


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.fixture
def array_code(monkeypatch):
    """Run the array code of nsiter.conv instead of the backends' native kernels."""
    monkeypatch.setattr(numba_conv, "KERNELS", {})
    try:
        from nsiter._torch import conv as torch_conv
    except ImportError:
        return
    monkeypatch.setattr(torch_conv, "KERNELS", {})


# (x shape, weight shape, stride, padding, dilation, groups)
CONV_CASES = [
    ((2, 3, 7, 6), (4, 3, 3, 3), 1, 0, 1, 1),
    ((1, 4, 9, 8), (6, 2, 3, 2), (2, 1), (1, 0), (1, 2), 2),
    ((3, 2, 5, 5), (2, 2, 1, 1), 2, 0, 1, 1),
    ((1, 6, 11, 10), (6, 1, 3, 3), 3, 2, 2, 6),
    ((2, 1, 4, 4), (3, 1, 4, 4), 1, 0, 1, 1),
]

# (x shape, weight shape, stride, padding, output_padding, dilation, groups)
TRANSPOSED_CASES = [
    ((2, 3, 5, 4), (3, 2, 4, 4), 2, 1, 0, 1, 1),
    ((1, 4, 6, 5), (4, 3, 3, 2), (2, 3), (1, 0), (1, 2), 1, 2),
    ((2, 2, 3, 3), (2, 5, 1, 1), 1, 0, 0, 1, 1),
    ((1, 3, 4, 5), (3, 2, 3, 3), 3, (2, 1), (1, 2), 2, 1),
    ((1, 2, 4, 4), (2, 2, 3, 3), 1, 0, (1, 1), 2, 1),  # output_padding >= stride (below the dilation)
    ((2, 6, 3, 4), (6, 1, 6, 6), 3, 4, 2, 1, 3),
]


# ---------------------------------------------------------------------------------------------
# against the loop references
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("xs, ws, s, p, d, g", CONV_CASES)
def test_conv2d_matches_the_loop_reference(xs, ws, s, p, d, g):
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal(xs), rng.standard_normal(ws), rng.standard_normal(ws[0])
    y = nsiter.conv2d(x, w, b, stride=s, padding=p, dilation=d, groups=g)
    assert y.dtype == np.float64
    assert_close(y, ref_conv2d(x, w, b, s, p, d, g), n=w[0].size)
    assert_close(nsiter.conv2d(x[0], w, stride=s, padding=p, dilation=d, groups=g),
                 ref_conv2d(x[:1], w, None, s, p, d, g)[0], n=w[0].size)


@pytest.mark.parametrize("xs, ws, s, p, op, d, g", TRANSPOSED_CASES)
@pytest.mark.parametrize("method", nsiter.TRANSPOSED_METHODS)
def test_conv_transpose2d_matches_the_loop_reference(xs, ws, s, p, op, d, g, method):
    if method == "subpixel" and (d != 1 or not np.isscalar(s)):
        pytest.skip("the sub-pixel route needs one stride and dilation 1")
    rng = np.random.default_rng(2)
    x, w, b = rng.standard_normal(xs), rng.standard_normal(ws), rng.standard_normal(ws[1] * g)
    y = nsiter.conv_transpose2d(x, w, b, stride=s, padding=p, output_padding=op, dilation=d, groups=g,
                                method=method)
    assert_close(y, ref_conv_transpose2d(x, w, b, s, p, op, d, g), n=w.size)
    one = nsiter.conv_transpose2d(x[0], w, b, stride=s, padding=p, output_padding=op, dilation=d, groups=g,
                                  method=method)
    assert one.shape == y.shape[1:]
    assert_close(one, y[0], n=w.size)


def test_pixel_shuffle_and_unshuffle_match_the_loops_and_invert_each_other():
    rng = np.random.default_rng(3)
    for r, shape in ((2, (2, 8, 3, 5)), (3, (9, 2, 4)), (1, (1, 2, 3, 3, 2)), (4, (1, 16, 1, 1))):
        x = rng.standard_normal(shape)
        y = nsiter.pixel_shuffle(x, r)
        np.testing.assert_array_equal(y, ref_pixel_shuffle(x, r))
        np.testing.assert_array_equal(nsiter.pixel_unshuffle(y, r), x)
        assert not np.shares_memory(y, x)


def test_weight_maps_match_the_formula_and_invert_exactly():
    rng = np.random.default_rng(4)
    for (cin, og, kh, kw), r, g in (((3, 2, 4, 6), 2, 1), ((4, 1, 9, 3), 3, 2), ((2, 3, 1, 1), 1, 1),
                                    ((6, 2, 8, 4), 4, 3)):
        W = rng.standard_normal((cin, og, kh, kw))
        w = nsiter.subpixel_weight(W, r, groups=g)
        assert w.shape == (og * g * r * r, cin // g, kh // r, kw // r)
        np.testing.assert_array_equal(w, ref_subpixel_weight(W, r, g))
        np.testing.assert_array_equal(nsiter.transposed_weight(w, r, groups=g), W)
        np.testing.assert_array_equal(nsiter.subpixel_weight(nsiter.transposed_weight(w, r, groups=g), r,
                                                             groups=g), w)
        assert not np.shares_memory(w, W)


def test_the_notes_example_four_kernels_of_two_by_two():
    # Section 2: a (1, 1, 4, 4) deconvolution kernel is four (1, 2, 2) LR kernels
    W = np.arange(16.0).reshape(1, 1, 4, 4)
    w = nsiter.subpixel_weight(W, 2)
    assert w.shape == (4, 1, 2, 2)
    np.testing.assert_array_equal(w[0, 0], W[0, 0, 0::2, 0::2][::-1, ::-1])
    np.testing.assert_array_equal(w[3, 0], W[0, 0, 1::2, 1::2][::-1, ::-1])
    # Section 2, 1-D: f = (1, 2, 3, 4) -> f1 = (2, 4), f2 = (1, 3) applied as convolutions
    f = np.array([1.0, 2.0, 3.0, 4.0])
    x = np.array([1.0, -2.0, 0.5, 3.0, 1.5])
    y = nsiter.conv_transpose2d(x[None, None, None], f[None, None, None], stride=(1, 2))[0, 0, 0]
    y1, y2 = np.convolve(x, f[0::2]), np.convolve(x, f[1::2])
    np.testing.assert_allclose(y, np.stack([y1, y2], axis=1).ravel(), rtol=1e-15)


# ---------------------------------------------------------------------------------------------
# the Shi equivalence and the adjoint
# ---------------------------------------------------------------------------------------------
@st.composite
def shi_geometry(draw):
    r = draw(st.integers(2, 4))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    g = draw(st.sampled_from([1, 1, 2]))
    cin, og = g * draw(st.integers(1, 3)), draw(st.integers(1, 3))
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    q = (draw(st.integers(0, r - 1)), draw(st.integers(0, r - 1)))
    # padding keeping at least one output pixel: (H - 1) r - 2p + k r + q >= 1
    p = tuple(draw(st.integers(0, max(0, ((size - 1) * r + k * r + qq - 1) // 2)))
              for size, k, qq in ((h, kh, q[0]), (w, kw, q[1])))
    seed = draw(st.integers(0, 2**31))
    return r, (kh, kw), g, cin, og, (n, h, w), p, q, seed


@settings(max_examples=250)
@given(shi_geometry())
def test_transposed_convolution_equals_lr_convolution_and_shuffle(geom):
    r, (kh, kw), g, cin, og, (n, h, w), p, q, seed = geom
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cin, h, w))
    W = rng.standard_normal((cin, og, kh * r, kw * r))
    direct = nsiter.conv_transpose2d(x, W, stride=r, padding=p, output_padding=q, groups=g)
    assert rel_diff(shi_route(x, W, r, p, q, g), direct) <= 1e-13
    routed = nsiter.conv_transpose2d(x, W, stride=r, padding=p, output_padding=q, groups=g, method="subpixel")
    assert rel_diff(routed, direct) <= 1e-13


@pytest.mark.parametrize("k, r, p, q", [(3, 2, 1, 1), (5, 3, 2, 0), (2, 4, 0, 3), (7, 2, 3, 1)])
def test_subpixel_route_zero_extends_kernels_that_are_not_multiples_of_r(k, r, p, q):
    rng = np.random.default_rng(5)
    x, W = rng.standard_normal((2, 3, 5, 4)), rng.standard_normal((3, 2, k, k))
    want = ref_conv_transpose2d(x, W, None, r, p, q)
    got = nsiter.conv_transpose2d(x, W, stride=r, padding=p, output_padding=q, method="subpixel")
    assert rel_diff(got, want) <= 1e-13


@st.composite
def conv_geometry(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    p = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    g = draw(st.sampled_from([1, 2]))
    h = draw(st.integers(max(1, d[0] * (kh - 1) + 1 - 2 * p[0]), 9))
    w = draw(st.integers(max(1, d[1] * (kw - 1) + 1 - 2 * p[1]), 9))
    return (kh, kw), s, p, d, g, (draw(st.integers(1, 3)), g * draw(st.integers(1, 2)), h, w), \
        g * draw(st.integers(1, 3)), draw(st.integers(0, 2**31))


@settings(max_examples=80)
@given(conv_geometry())
def test_conv_transpose2d_is_the_adjoint_of_conv2d(geom):
    (kh, kw), s, p, d, g, (n, c, h, w), o, seed = geom
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w))
    W = rng.standard_normal((o, c // g, kh, kw))
    y = nsiter.conv2d(x, W, stride=s, padding=p, dilation=d, groups=g)
    v = rng.standard_normal(y.shape)
    # output_padding recovers H from the strided size (below the stride by construction)
    op = tuple(size - ((out - 1) * ss - 2 * pp + dd * (kk - 1) + 1)
               for size, out, ss, pp, dd, kk in ((h, y.shape[2], s[0], p[0], d[0], kh), (w, y.shape[3], s[1], p[1], d[1], kw)))
    u = nsiter.conv_transpose2d(v, W, stride=s, padding=p, output_padding=op, dilation=d, groups=g)
    assert u.shape == x.shape
    lhs, rhs = float(np.vdot(y, v)), float(np.vdot(x, u))
    scale = float(np.abs(y).ravel() @ np.abs(v).ravel()) + 1e-300
    assert abs(lhs - rhs) <= 1e-13 * scale


# ---------------------------------------------------------------------------------------------
# the Numba kernels against the array code (twins)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_kernels_agree_with_the_array_code(dtype, monkeypatch):
    rng = np.random.default_rng(6)
    fast = {}
    runs = []
    for xs, ws, s, p, d, g in CONV_CASES:
        x, w, b = (rng.standard_normal(xs).astype(dtype), rng.standard_normal(ws).astype(dtype),
                   rng.standard_normal(ws[0]).astype(dtype))
        runs.append(("conv2d", (x, w, b), dict(stride=s, padding=p, dilation=d, groups=g)))
    for xs, ws, s, p, op, d, g in TRANSPOSED_CASES:
        x, w = rng.standard_normal(xs).astype(dtype), rng.standard_normal(ws).astype(dtype)
        kw = dict(stride=s, padding=p, output_padding=op, dilation=d, groups=g)
        runs.append(("conv_transpose2d", (x, w, None), kw))
        if d == 1 and np.isscalar(s):
            runs.append(("conv_transpose2d", (x, w, rng.standard_normal(ws[1] * g).astype(dtype)),
                         dict(kw, method="subpixel")))
    for i, (name, args, kw) in enumerate(runs):
        fast[i] = getattr(nsiter, name)(*args, **kw)
    monkeypatch.setattr(numba_conv, "KERNELS", {})
    for i, (name, args, kw) in enumerate(runs):
        slow = getattr(nsiter, name)(*args, **kw)
        assert fast[i].dtype == slow.dtype == dtype
        assert_close(fast[i], slow, n=args[1].size)
        if name == "conv_transpose2d" and kw.get("method") is None and dtype == np.float64:
            # same products, same order of the overlaps: identical bits up to the GEMM's blocking
            assert_close(fast[i], slow, factor=0.02)


def test_numba_kernels_split_work_for_many_threads_and_large_blocks(monkeypatch):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 3, 40, 33))
    w = rng.standard_normal((5, 3, 3, 3))
    wt = rng.standard_normal((3, 7, 4, 4))
    monkeypatch.setattr(numba_conv, "_BLOCK_ELEMENTS", 50)  # tiny blocks: many tasks of one row/channel
    a = nsiter.conv2d(x, w, padding=1)
    b = nsiter.conv_transpose2d(x, wt, stride=2, padding=1)
    assert_close(a, ref_conv2d(x, w, None, 1, 1), n=27)
    assert_close(b, ref_conv_transpose2d(x, wt, None, 2, 1), n=wt.size)


# ---------------------------------------------------------------------------------------------
# dtypes and shapes
# ---------------------------------------------------------------------------------------------
def test_dtypes_are_preserved_promoted_and_integers_compute_in_float64():
    rng = np.random.default_rng(8)
    x32 = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    w32 = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    assert nsiter.conv2d(x32, w32).dtype == np.float32
    assert nsiter.conv2d(x32, w32.astype(np.float64)).dtype == np.float64
    assert nsiter.conv_transpose2d(x32, w32.transpose(1, 0, 2, 3), stride=2).dtype == np.float32
    xi = np.arange(50).reshape(1, 2, 5, 5)
    wi = np.ones((1, 2, 2, 2), dtype=np.int16)
    y = nsiter.conv2d(xi, wi)
    assert y.dtype == np.float64
    np.testing.assert_array_equal(y, ref_conv2d(xi, wi))
    assert nsiter.pixel_shuffle(np.ones((4, 2, 2), np.int32), 2).dtype == np.float64
    assert nsiter.subpixel_weight(w32.transpose(1, 0, 2, 3)[:, :, :2, :2], 2).dtype == np.float32
    assert nsiter.conv2d(x32.astype(np.float16), w32).dtype == np.float32


def test_float32_results_are_close_to_float64():
    rng = np.random.default_rng(9)
    x, W = rng.standard_normal((2, 8, 9, 9)), rng.standard_normal((8, 4, 4, 4))
    want = ref_conv_transpose2d(x, W, None, 2, 1)
    for method in nsiter.TRANSPOSED_METHODS:
        got = nsiter.conv_transpose2d(x.astype(np.float32), W.astype(np.float32), stride=2, padding=1,
                                      method=method)
        assert_close(got, want, dtype=np.float32, n=W.size)


def test_inputs_are_not_modified_and_strided_views_work():
    rng = np.random.default_rng(10)
    base = rng.standard_normal((2, 6, 10, 12))
    x = base[:, ::2, 1::2, ::-1]  # non-contiguous, negative strides
    w = rng.standard_normal((4, 3, 2, 3))
    keep = base.copy()
    y = nsiter.conv2d(x, w, stride=2, padding=1)
    assert_close(y, ref_conv2d(x, w, None, 2, 1), n=18)
    yt = nsiter.conv_transpose2d(x, w.transpose(1, 0, 2, 3)[:3], stride=2)
    assert_close(yt, ref_conv_transpose2d(x, w.transpose(1, 0, 2, 3)[:3], None, 2), n=18)
    np.testing.assert_array_equal(base, keep)


def test_padding_strings_follow_torch():
    rng = np.random.default_rng(11)
    x, w = rng.standard_normal((1, 2, 7, 6)), rng.standard_normal((3, 2, 4, 3))
    same = nsiter.conv2d(x, w, padding="same", dilation=(1, 2))
    assert same.shape == (1, 3, 7, 6)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 2), (2, 2)))  # span (4, 5): 3 and 4 zeros, the odd one at the end
    assert_close(same, ref_conv2d(xp, w, None, 1, 0, (1, 2)), n=24)
    assert_close(nsiter.conv2d(x, w, padding="valid"), ref_conv2d(x, w), n=24)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_bad_input_is_rejected_with_a_clear_message():
    x = np.ones((1, 4, 6, 6))
    w = np.ones((2, 4, 3, 3))
    wt = np.ones((4, 2, 4, 4))
    cases = [
        (ValueError, "ndim 3 or 4", lambda: nsiter.conv2d(np.ones((6, 6)), w)),
        (ValueError, "ndim 4", lambda: nsiter.conv2d(x, np.ones((2, 4, 3)))),
        (ValueError, "divisible by groups", lambda: nsiter.conv2d(x, np.ones((2, 4, 3, 3)), groups=3)),
        (ValueError, "divisible by groups", lambda: nsiter.conv2d(x, np.ones((3, 2, 3, 3)), groups=2)),
        (ValueError, r"C_in / groups", lambda: nsiter.conv2d(x, np.ones((2, 3, 3, 3)))),
        (ValueError, "positive stride", lambda: nsiter.conv2d(x, w, stride=0)),
        (ValueError, "positive dilation", lambda: nsiter.conv2d(x, w, dilation=(1, 0))),
        (ValueError, "padding", lambda: nsiter.conv2d(x, w, padding=-1)),
        (ValueError, "larger than the padded image", lambda: nsiter.conv2d(x, np.ones((2, 4, 7, 3)))),
        (ValueError, "stride 1", lambda: nsiter.conv2d(x, w, stride=2, padding="same")),
        (ValueError, "unknown padding", lambda: nsiter.conv2d(x, w, padding="full")),
        (ValueError, "bias of shape", lambda: nsiter.conv2d(x, w, np.ones(3))),
        (ValueError, "finite", lambda: nsiter.conv2d(np.full((1, 4, 6, 6), np.nan), w)),
        (ValueError, "finite", lambda: nsiter.conv_transpose2d(x, np.full((4, 2, 4, 4), np.inf))),
        (ValueError, "finite", lambda: nsiter.conv2d(x, w, np.array([0.0, np.nan]))),
        (ValueError, "non-empty", lambda: nsiter.conv2d(np.ones((0, 4, 6, 6)), w)),
        (TypeError, "complex", lambda: nsiter.conv2d(x + 0j, w)),
        (TypeError, "masked", lambda: nsiter.conv2d(np.ma.masked_array(x), w)),
        (TypeError, "masked", lambda: nsiter.pixel_shuffle(np.ma.masked_array(x), 2)),
        (TypeError, "int", lambda: nsiter.conv2d(x, w, stride=1.5)),
        (ValueError, "input channels first", lambda: nsiter.conv_transpose2d(x, np.ones((2, 4, 3, 3)))),
        (ValueError, "output_padding smaller than stride or dilation",
         lambda: nsiter.conv_transpose2d(x, wt, stride=2, output_padding=2)),
        (ValueError, "crops the whole output", lambda: nsiter.conv_transpose2d(x, wt, stride=1, padding=5)),
        (ValueError, "unknown method", lambda: nsiter.conv_transpose2d(x, wt, method="fft")),
        (ValueError, "one stride r", lambda: nsiter.conv_transpose2d(x, wt, stride=(2, 1), method="subpixel")),
        (ValueError, "dilation 1", lambda: nsiter.conv_transpose2d(x, wt, dilation=2, method="subpixel")),
        (ValueError, r"divisible by r\*\*2 = 9", lambda: nsiter.pixel_shuffle(x, 3)),
        (ValueError, "ndim >= 3", lambda: nsiter.pixel_shuffle(np.ones((4, 4)), 2)),
        (ValueError, "divisible by r = 4", lambda: nsiter.pixel_unshuffle(x, 4)),
        (ValueError, "r >= 1", lambda: nsiter.pixel_shuffle(x, 0)),
        (TypeError, "integer r", lambda: nsiter.pixel_shuffle(x, 2.0)),
        (ValueError, "multiple of r = 3", lambda: nsiter.subpixel_weight(wt, 3)),
        (ValueError, "divisible by groups", lambda: nsiter.subpixel_weight(wt, 2, groups=3)),
        (ValueError, r"groups \* r\*\*2 = 8", lambda: nsiter.transposed_weight(np.ones((12, 1, 2, 2)), 2, groups=2)),
        (ValueError, "ndim 4", lambda: nsiter.subpixel_weight(np.ones((4, 4)), 2)),
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()


def test_check_finite_false_skips_the_scan():
    x = np.ones((1, 1, 3, 3))
    x[0, 0, 1, 1] = np.nan
    y = nsiter.conv2d(x, np.ones((1, 1, 1, 1)), check_finite=False)
    assert np.isnan(y[0, 0, 1, 1]) and np.isfinite(y[0, 0, 0, 0])
    huge = np.full((1, 1, 2, 2), 1e308)  # finite, but its sum overflows: the exact check passes it
    assert nsiter.conv2d(huge, np.full((1, 1, 1, 1), 1e-10)).max() == pytest.approx(1e298)


# ---------------------------------------------------------------------------------------------
# torch: same functions, tensors in and out
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_equal_to_torch_functions(dtype):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(12)
    T = torch.from_numpy
    for xs, ws, s, p, d, g in CONV_CASES:
        x, w, b = (rng.standard_normal(xs).astype(dtype), rng.standard_normal(ws).astype(dtype),
                   rng.standard_normal(ws[0]).astype(dtype))
        want = F.conv2d(T(x), T(w), T(b), stride=s, padding=p, dilation=d, groups=g).numpy()
        assert_close(nsiter.conv2d(x, w, b, stride=s, padding=p, dilation=d, groups=g), want, n=w[0].size)
    for xs, ws, s, p, op, d, g in TRANSPOSED_CASES:
        x, w, b = (rng.standard_normal(xs).astype(dtype), rng.standard_normal(ws).astype(dtype),
                   rng.standard_normal(ws[1] * g).astype(dtype))
        kw = dict(stride=s, padding=p, output_padding=op, dilation=d, groups=g)
        want = F.conv_transpose2d(T(x), T(w), T(b), **kw).numpy()
        assert_close(nsiter.conv_transpose2d(x, w, b, **kw), want, n=w.size)
        if d == 1 and np.isscalar(s):
            assert_close(nsiter.conv_transpose2d(x, w, b, method="subpixel", **kw), want, n=w.size)
    z = rng.standard_normal((2, 3, 18, 4, 5)).astype(dtype)
    np.testing.assert_array_equal(nsiter.pixel_shuffle(z, 3), F.pixel_shuffle(T(z), 3).numpy())
    np.testing.assert_array_equal(nsiter.pixel_unshuffle(z, 1), F.pixel_unshuffle(T(z), 1).numpy())
    u = rng.standard_normal((2, 3, 8, 4)).astype(dtype)
    np.testing.assert_array_equal(nsiter.pixel_unshuffle(u, 2), F.pixel_unshuffle(T(u), 2).numpy())


def test_the_notes_9_32_3_3_kernel_maps_to_a_1_32_9_9_deconvolution_in_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    g = torch.Generator().manual_seed(0)
    W_lr = torch.randn(9, 32, 3, 3, generator=g, dtype=torch.float64)  # the note's (9, 32, 3, 3) kernel
    W = nsiter.transposed_weight(W_lr, 3)
    assert isinstance(W, torch.Tensor) and W.shape == (32, 1, 9, 9)
    x = torch.randn(2, 32, 6, 5, generator=g, dtype=torch.float64)
    # the full LR correlation (padding k - 1 = 2) shuffled is the uncropped transposed output;
    # padding=3 crops 3 HR rows/columns on each side
    lr = F.pixel_shuffle(F.conv2d(x, W_lr, padding=2), 3)
    direct = nsiter.conv_transpose2d(x, W, stride=3, padding=3, output_padding=0)
    assert direct.shape == (2, 1, 18, 15)
    assert rel_diff(direct.numpy(), lr[:, :, 3:21, 3:18].numpy()) <= 1e-13
    torch.testing.assert_close(nsiter.subpixel_weight(W, 3), W_lr, rtol=0, atol=0)


def test_tensors_in_tensors_out_with_autograd():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 2, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, generator=g, requires_grad=True)
    for method in nsiter.TRANSPOSED_METHODS:
        y = nsiter.conv_transpose2d(x, w, b, stride=2, padding=1, method=method)
        assert isinstance(y, torch.Tensor) and y.dtype == torch.float64 and y.requires_grad
        assert torch.autograd.gradcheck(
            lambda a, c, d, m=method: nsiter.conv_transpose2d(a, c, d, stride=2, padding=1, method=m), (x, w, b))
    wc = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c: nsiter.conv2d(a, c, stride=2, padding=1, groups=2), (x, wc))
    assert torch.autograd.gradcheck(lambda a: nsiter.pixel_shuffle(a, 2), (x,))
    assert torch.autograd.gradcheck(lambda c: nsiter.subpixel_weight(c, 2), (w,))
    y32 = nsiter.conv2d(x.detach().float(), wc.detach().float(), padding=1, groups=2)
    assert y32.dtype == torch.float32
    mixed = nsiter.conv2d(x.detach().numpy(), wc.detach(), padding=1, groups=2)  # numpy + tensor -> tensor
    assert isinstance(mixed, torch.Tensor)


def test_array_code_on_tensors_matches_torch_and_keeps_autograd(array_code):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 3, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    wc = torch.randn(6, 2, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    for kw in (dict(stride=2, padding=1, output_padding=1), dict(stride=(1, 3), dilation=(2, 1), groups=2)):
        want = F.conv_transpose2d(x, w if kw.get("groups", 1) == 1 else w[:, :2], **kw)
        got = nsiter.conv_transpose2d(x, w if kw.get("groups", 1) == 1 else w[:, :2], **kw)
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(nsiter.conv2d(x, wc, stride=2, groups=2), F.conv2d(x, wc, stride=2, groups=2),
                               rtol=1e-13, atol=1e-13)
    got = nsiter.conv_transpose2d(x, w, stride=3, padding=2, method="subpixel")
    torch.testing.assert_close(got, F.conv_transpose2d(x, w, stride=3, padding=2), rtol=1e-13, atol=1e-13)
    xs = x[:1, :, :3, :3].detach().clone().requires_grad_()
    ws = w[:, :2, :3, :2].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, c: nsiter.conv_transpose2d(a, c, stride=2, padding=1), (xs, ws))
    assert torch.autograd.gradcheck(lambda a, c: nsiter.conv2d(a, c, padding=1, groups=2), (xs, wc[:2]))
    assert torch.equal(nsiter.pixel_shuffle(x, 1), x) and nsiter.pixel_shuffle(x, 1).data_ptr() != x.data_ptr()
