r"""Convolution, transposed convolution and the sub-pixel (LR-space) convolution of Shi et al.

The "deconvolution layer" of the literature is the transposed convolution: the adjoint of a
strided convolution.  Shi et al. (2016), *Is the deconvolution layer the same as a convolutional
layer?* (``papers/deconvolution-layer-vs-subpixel-shi2016.md``), show that a transposed convolution
with stride ``r`` and an ``(i, o, k r, k r)`` kernel equals a convolution in low-resolution (LR)
space with an ``(o r², i, k, k)`` kernel followed by the periodic shuffle (Section 2).  This module
computes both sides exactly and maps the weights between them:

* :func:`conv2d` — ``y = im2col(x) W_mat^T`` (cross-correlation, the layout of :mod:`nsiter.im2col`);
* :func:`conv_transpose2d` — ``y = col2im(x_cols W_mat)``, the exact adjoint of :func:`conv2d`
  (Section 1, Fig. 3a), or by ``method="subpixel"`` the LR convolution + shuffle (Section 2, Fig. 7);
* :func:`pixel_shuffle` / :func:`pixel_unshuffle` — the periodic shuffle ``PS`` and its inverse;
* :func:`subpixel_weight` / :func:`transposed_weight` — the invertible weight maps of Section 2.

Semantics (shapes, channel orders, output sizes) are those of ``torch.nn.functional``.  Each
function validates, handles the degenerate cases, and runs one kernel of the array's backend:
numpy arrays take the array code below (Numba ``im2col``/``col2im``, BLAS) or the fused Numba
kernel of :mod:`nsiter._numba._conv`; torch tensors take torch's own functions
(:mod:`nsiter._torch.conv`), so autograd and devices work as in torch.
"""
from __future__ import annotations

import math

import numpy as np

from ._backend import backend
from ._conventions import Geometry, geometry
from ._validation import as_float_array, as_pair, check_ndim, check_nonempty, check_option, check_positive_int, \
    is_tensor
from ._validation import check_finite as _count_non_finite

__all__ = ["conv2d", "conv_transpose2d", "pixel_shuffle", "pixel_unshuffle", "subpixel_weight",
           "transposed_weight", "TRANSPOSED_METHODS"]

#: Methods of :func:`conv_transpose2d`.
TRANSPOSED_METHODS = ("col2im", "subpixel")

# Bound on the im2col / column matrix of one block of images in the array code (elements).
_BLOCK_ELEMENTS = 16 * 2**20

_PADDING_STRINGS = ("valid", "same")


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _array(a, name: str, ndims, meaning: str):
    """``a`` as a non-empty float32/float64 array or tensor of one of ``ndims`` (no copy if already so)."""
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"expected a plain array for {name}, got a numpy masked array; fill or drop the "
                        f"masked entries first (e.g. {name}.filled(0.0))")
    arr = as_float_array(a, name)
    check_ndim(arr, name, ndims, meaning)
    check_nonempty(arr, name)
    return arr


def _common(be, *arrays):
    """The arrays (None kept) in one backend and one dtype: float64 if any is float64, else float32."""
    present = [a for a in arrays if a is not None]
    if be.torch:
        torch = be.base.torch
        like = next(a for a in present if is_tensor(a))
        dtype = torch.float64 if any(a.dtype in (np.float64, torch.float64) for a in present) else torch.float32
        return tuple(None if a is None else be.asarray(a, like, dtype) for a in arrays)
    dtype = np.float64 if any(a.dtype == np.float64 for a in present) else np.float32
    return tuple(None if a is None else a.astype(dtype, copy=False) for a in arrays)


def _check_finite_fast(arr, name: str) -> None:
    """``check_finite`` in one pass: the sum is finite unless the data holds NaN/inf (or overflows,
    and only then the exact count runs, so huge but finite data passes)."""
    if is_tensor(arr):
        total = float(arr.detach().sum())
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            total = float(arr.sum())
    if not math.isfinite(total):
        _count_non_finite(arr, name)


def _check_groups(groups, cin: int, cout: int, x_name: str = "x"):
    groups = check_positive_int(groups, "groups")
    for what, c in (("input", cin), ("output", cout)):
        if c % groups:
            raise ValueError(f"expected the number of {what} channels to be divisible by groups, got {c} {what} "
                             f"channels and groups={groups}; use groups dividing both, e.g. "
                             f"{math.gcd(cin, cout, groups)}")
    return groups


def _check_bias(bias, cout: int):
    if bias is None:
        return None
    b = _array(bias, "bias", (1,), "(C_out,)")
    if b.shape[0] != cout:
        raise ValueError(f"expected bias of shape ({cout},) (one value per output channel), got "
                         f"{tuple(b.shape)}; pass a bias with C_out = {cout} entries or bias=None")
    return b


def _same_padding(kernel, dilation, stride):
    """``(top, bottom, left, right)`` zeros of ``padding='same'`` (torch: the odd one at the end)."""
    if as_pair(stride, "stride", minimum=1) != (1, 1):
        raise ValueError(f"padding='same' needs stride 1 (as in torch), got stride={stride!r}; "
                         "use an explicit padding for strided convolutions")
    (kh, kw), (dh, dw) = kernel, as_pair(dilation, "dilation", minimum=1)
    th, tw = dh * (kh - 1), dw * (kw - 1)
    return th // 2, th - th // 2, tw // 2, tw - tw // 2


def _conv_inputs(x, weight, bias, stride, padding, dilation, groups, check):
    """Validated ``(be, x4, weight, bias, geometry, groups, unbatched, window)`` of :func:`conv2d`."""
    x = _array(x, "x", (3, 4), "(C_in, H, W) or (N, C_in, H, W); for one (H, W) image pass x[None]")
    w = _array(weight, "weight", (4,), "(C_out, C_in / groups, kh, kw)")
    cin, cout = int(x.shape[-3]), int(w.shape[0])
    groups = _check_groups(groups, cin, cout)
    if int(w.shape[1]) * groups != cin:
        raise ValueError(f"expected weight of shape (C_out, C_in / groups, kh, kw) = ({cout}, {cin // groups}, kh, kw) "
                         f"for x with C_in = {cin} and groups = {groups}, got {tuple(w.shape)}; "
                         "check the channel axis of x (channels first) and groups")
    b = _check_bias(bias, cout)
    be = backend(x, w, b)
    x, w, b = _common(be, x, w, b)
    unbatched = x.ndim == 3
    x4 = x[None] if unbatched else x
    kernel = (int(w.shape[2]), int(w.shape[3]))
    window = None
    if isinstance(padding, str):
        check_option(padding, "padding", _PADDING_STRINGS)
        if padding == "same":
            t, bt, lf, rt = _same_padding(kernel, dilation, stride)
            if (t, lf) != (bt, rt):
                window = (t, bt, lf, rt)  # asymmetric: zeros added explicitly
                padding = 0
            else:
                padding = (t, lf)
        else:
            padding = 0
    shape = tuple(x4.shape)
    if window is not None:
        shape = shape[:2] + (shape[2] + window[0] + window[1], shape[3] + window[2] + window[3])
    g = geometry(shape, kernel, stride, padding, dilation)
    if check:
        for arr, name in ((x4, "x"), (w, "weight"), (b, "bias")):
            if arr is not None:
                _check_finite_fast(arr, name)
    return be, x4, w, b, g, groups, unbatched, window


def _transposed_inputs(x, weight, bias, stride, padding, output_padding, dilation, groups, check):
    """Validated ``(be, x4, weight, bias, geometry of the output, groups, unbatched, output_padding)``."""
    x = _array(x, "x", (3, 4), "(C_in, H, W) or (N, C_in, H, W); for one (H, W) image pass x[None]")
    w = _array(weight, "weight", (4,), "(C_in, C_out / groups, kh, kw)")
    cin = int(x.shape[-3])
    if int(w.shape[0]) != cin:
        raise ValueError(f"expected weight of shape (C_in, C_out / groups, kh, kw) with C_in = {cin} (the channels "
                         f"of x), got {tuple(w.shape)}; a transposed convolution's weight has the input channels "
                         "first (the weight of the convolution it transposes)")
    groups = check_positive_int(groups, "groups")
    cout = int(w.shape[1]) * groups
    groups = _check_groups(groups, cin, cout)
    b = _check_bias(bias, cout)
    sh, sw = as_pair(stride, "stride", minimum=1)
    ph, pw = as_pair(padding, "padding", minimum=0)
    dh, dw = as_pair(dilation, "dilation", minimum=1)
    oph, opw = as_pair(output_padding, "output_padding", minimum=0)
    for op, s, d, axis in ((oph, sh, dh, "height"), (opw, sw, dw, "width")):
        if op >= s and op >= d:
            raise ValueError(f"expected output_padding smaller than stride or dilation, got output_padding {op} "
                             f"with stride {s} and dilation {d} along the {axis}; use output_padding < {max(s, d)}")
    be = backend(x, w, b)
    x, w, b = _common(be, x, w, b)
    unbatched = x.ndim == 3
    x4 = x[None] if unbatched else x
    n, _, h, wd = (int(v) for v in x4.shape)
    kh, kw = int(w.shape[2]), int(w.shape[3])
    ho = (h - 1) * sh - 2 * ph + dh * (kh - 1) + oph + 1
    wo = (wd - 1) * sw - 2 * pw + dw * (kw - 1) + opw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"padding {(ph, pw)} crops the whole output of the transposed convolution of a "
                         f"{(h, wd)} input with kernel {(kh, kw)}, stride {(sh, sw)}: the output would be "
                         f"{(ho, wo)}; use a smaller padding")
    g = geometry((n, cout, ho, wo), (kh, kw), (sh, sw), (ph, pw), (dh, dw), name="the output")
    if check:
        for arr, name in ((x4, "x"), (w, "weight"), (b, "bias")):
            if arr is not None:
                _check_finite_fast(arr, name)
    return be, x4, w, b, g, groups, unbatched, (oph, opw)


def _batched_array(x, meaning: str):
    """``x`` of :func:`pixel_shuffle` / :func:`pixel_unshuffle`: at least 3-D (torch's ``(*, C, H, W)``)."""
    if isinstance(x, np.ma.MaskedArray):
        return _array(x, "x", (), meaning)  # raises the masked-array TypeError
    arr = as_float_array(x, "x")
    if arr.ndim < 3:
        raise ValueError(f"expected x with ndim >= 3 {meaning}, got ndim {arr.ndim} with shape "
                         f"{tuple(arr.shape)}; add the channel axis (x[None]) for a single image")
    check_nonempty(arr, "x")
    return arr


def _check_factor(r) -> int:
    return check_positive_int(r, "r")


# ---------------------------------------------------------------------------------------------
# array helpers (backend-neutral)
# ---------------------------------------------------------------------------------------------
def _kernel(be, name: str):
    """The backend's native kernel for ``name``, or None (then the array code runs)."""
    if be.torch:
        from ._torch import conv as torch_conv

        return torch_conv.KERNELS.get(name)
    from ._numba import _conv as numba_conv  # Numba loads with the first convolution, not with nsiter

    return numba_conv.KERNELS.get(name)


def _fresh(be, out, src):
    """``out``, copied if it shares memory with ``src`` (results never alias the caller's data)."""
    if be.torch:
        if out.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
            return out.clone()
        return out
    return out.copy() if np.may_share_memory(out, src) else out


def _window(be, x, top: int, bottom: int, left: int, right: int):
    """Rows ``[-top, H + bottom)`` and columns ``[-left, W + right)`` of ``x`` extended by zeros
    (a negative amount removes rows/columns)."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    x = x[..., max(0, -top): h - max(0, -bottom), max(0, -left): w - max(0, -right)]
    t, b, lf, rt = max(0, top), max(0, bottom), max(0, left), max(0, right)
    if not (t or b or lf or rt):
        return x
    hh, ww = int(x.shape[-2]), int(x.shape[-1])
    out = be.xp.zeros(tuple(x.shape[:-2]) + (hh + t + b, ww + lf + rt), dtype=x.dtype,
                      device=getattr(x, "device", None))
    out[..., t: t + hh, lf: lf + ww] = x
    return out


def _add_bias(be, y, b):
    return y if b is None else y + be.xp.reshape(b, (1, -1, 1, 1))


def _blocks(n: int, per_image: int):
    step = max(1, min(n, _BLOCK_ELEMENTS // max(per_image, 1)))
    return [(n0, min(n, n0 + step)) for n0 in range(0, n, step)]


def _conv2d_array(be, x, w, b, g: Geometry, groups: int):
    """``y[n, o] = (im2col(x_n) W_mat^T)``: per block of images one im2col and one (batched) GEMM
    whose transposed operand BLAS reads in place, giving channels-first output directly."""
    xp = be.xp
    cout = int(w.shape[0])
    fg = g.n_features // groups
    L = g.n_patches
    wm = xp.reshape(w, (groups, cout // groups, fg))
    parts = []
    for n0, n1 in _blocks(g.n, L * g.n_features):
        m = n1 - n0
        cols = be.patches.im2col(x[n0:n1], g._replace(n=m))
        cols = xp.permute_dims(xp.reshape(cols, (m, L, groups, fg)), (0, 2, 3, 1))  # (m, G, Fg, L)
        parts.append(xp.reshape(xp.matmul(wm, cols), (m, cout, g.oh, g.ow)))
    y = parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)
    return _add_bias(be, y, b)


def _conv_transpose2d_array(be, x, w, b, g: Geometry, groups: int):
    """``y = col2im(x_cols W_mat)`` (the adjoint of :func:`_conv2d_array`), per block of images."""
    xp = be.xp
    n, cin, h, wd = (int(v) for v in x.shape)
    cin_g = cin // groups
    fg = g.n_features // groups
    L = h * wd
    wm = xp.reshape(w, (groups, cin_g, fg))
    parts = []
    for n0, n1 in _blocks(n, L * g.n_features):
        m = n1 - n0
        xc = xp.permute_dims(xp.reshape(x[n0:n1], (m, groups, cin_g, L)), (0, 1, 3, 2))  # (m, G, L, Cin_g)
        cols = xp.permute_dims(xp.matmul(xc, wm), (0, 2, 1, 3))  # (m, L, G, Fg): columns (c_out, i, j)
        cols = xp.reshape(cols, (m * L, g.n_features))
        parts.append(be.patches.col2im(cols, g._replace(n=m)))
    y = parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)
    return _add_bias(be, y, b)


def _conv2d_core(be, x, w, b, g, groups):
    kern = _kernel(be, "conv2d")
    if kern is not None:
        return kern(x, w, b, g, groups)
    return _conv2d_array(be, x, w, b, g, groups)


def _transposed_core(be, x, w, b, g, groups):
    """Transposed convolution onto the output geometry ``g`` (``x`` extended to the grid of ``g``)."""
    h, wd = int(x.shape[2]), int(x.shape[3])
    if (g.oh, g.ow) != (h, wd):  # output_padding >= stride (allowed when below the dilation)
        x = _window(be, x, 0, g.oh - h, 0, g.ow - wd)
    kern = _kernel(be, "conv_transpose2d")
    if kern is not None:
        return kern(x, w, b, g, groups)
    return _conv_transpose2d_array(be, x, w, b, g, groups)


def _shuffle_array(be, x, r: int):
    xp = be.xp
    *lead, c, h, w = (int(v) for v in x.shape)
    y = xp.reshape(x, (*lead, c // (r * r), r, r, h, w))
    k = len(lead)
    y = xp.permute_dims(y, (*range(k), k, k + 3, k + 1, k + 4, k + 2))
    return xp.reshape(y, (*lead, c // (r * r), h * r, w * r))


def _unshuffle_array(be, x, r: int):
    xp = be.xp
    *lead, c, h, w = (int(v) for v in x.shape)
    y = xp.reshape(x, (*lead, c, h // r, r, w // r, r))
    k = len(lead)
    y = xp.permute_dims(y, (*range(k), k, k + 2, k + 4, k + 1, k + 3))
    return xp.reshape(y, (*lead, c * r * r, h // r, w // r))


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------
def conv2d(x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1, check_finite=True):
    r"""2-D convolution layer (cross-correlation), as ``torch.nn.functional.conv2d``.

    .. math::

        y[n, o, h, w] = b[o] + \sum_{c, i, j} W[o, c, i, j]\;
                        x_{\mathrm{pad}}[n,\; g(o) C_g + c,\; h s_h + i d_h,\; w s_w + j d_w]

    with ``C_g = C_in / groups`` and ``g(o)`` the group of output channel ``o``; computed as
    ``im2col(x) @ W_mat^T`` (:func:`nsiter.im2col`, the paper's ``y = X w``).  With stride ``s``
    this is the downsampling of Shi et al. (2016), Section 1, Fig. 2.

    Parameters
    ----------
    x : array_like or Tensor, shape (N, C_in, H, W) or (C_in, H, W)
    weight : array_like or Tensor, shape (C_out, C_in / groups, kh, kw)
    bias : array_like or Tensor, shape (C_out,), optional
    stride, dilation : int or (int, int)
        Positive.
    padding : int, (int, int), ``"valid"`` or ``"same"``
        Zeros on each side; ``"same"`` (stride 1 only) keeps ``H, W``, the extra zero of an even
        span going to the bottom/right, as in torch.
    groups : int
        Divides ``C_in`` and ``C_out``.
    check_finite : bool, default True
        Reject NaN/inf in the inputs (one summation pass; ``False`` skips it, e.g. in training loops).

    Returns
    -------
    y : ndarray or Tensor, shape (N, C_out, H_out, W_out) (no batch axis for 3-D ``x``)
        ``H_out = (H + 2 p_h - d_h (kh - 1) - 1) // s_h + 1``.  float64 if any input is float64,
        else float32; integers compute in float64.  Tensors go to ``torch.nn.functional.conv2d``
        (autograd, any device); numpy arrays to Numba im2col + BLAS, equal to torch to rounding.

    Raises
    ------
    ValueError
        Wrong ndim, empty input, channels not divisible by ``groups``, a weight or bias shape that
        does not fit, non-positive stride or dilation, negative padding, a kernel larger than the
        padded image, NaN/inf.
    TypeError
        Complex, masked or non-numeric input; non-integer sizes.

    Examples
    --------
    >>> import numpy as np, nsiter
    >>> nsiter.conv2d(np.ones((1, 2, 5, 5)), np.ones((3, 2, 3, 3)), padding=1)[0, :, 2, 2]
    array([18., 18., 18.])
    """
    be, x4, w, b, g, groups, unbatched, window = _conv_inputs(x, weight, bias, stride, padding, dilation,
                                                              groups, check_finite)
    if window is not None:
        x4 = _window(be, x4, *window)
    y = _conv2d_core(be, x4, w, b, g, groups)
    return y[0] if unbatched else y


def conv_transpose2d(x, weight, bias=None, *, stride=1, padding=0, output_padding=0, dilation=1, groups=1,
                     method="col2im", check_finite=True):
    r"""Transposed convolution (the "deconvolution layer"), as ``torch.nn.functional.conv_transpose2d``.

    The adjoint of :func:`conv2d` with the same weight, stride, padding and dilation
    (Shi et al. 2016, Section 1, Fig. 3a: "the transposed version of the matrix in Fig. 2"):

    .. math::

        y = \operatorname{col2im}(X_{\mathrm{cols}}\, W_{\mathrm{mat}}) + b, \qquad
        \langle \mathrm{conv2d}(u, W), v\rangle = \langle u, \mathrm{conv\_transpose2d}(v, W)\rangle,

    ``X_cols[(n, h, w), c] = x[n, c, h, w]``, ``W_mat[c, (o, i, j)] = W[c, o, i, j]`` per group,
    and :func:`nsiter.col2im` summing the overlapping taps into the output grid
    ``H_out = (H - 1) s_h - 2 p_h + d_h (kh - 1) + op_h + 1``.

    Parameters
    ----------
    x : array_like or Tensor, shape (N, C_in, H, W) or (C_in, H, W)
    weight : array_like or Tensor, shape (C_in, C_out / groups, kh, kw)
        Input channels first: the weight of the convolution being transposed.
    bias : array_like or Tensor, shape (C_out,), optional
    stride, dilation : int or (int, int)
        Positive.
    padding : int or (int, int)
        Rows/columns cropped from each side of the full output (``>= 0``).
    output_padding : int or (int, int)
        Extra rows/columns at the bottom/right, smaller than the stride or the dilation; it picks
        one of the ``s`` input sizes that a strided convolution maps to ``H``.
    groups : int
        Divides ``C_in`` and ``C_out``.
    method : {"col2im", "subpixel"}
        ``"col2im"``: the formula above (numpy: one GEMM per block of images and a fused Numba
        col2im; tensors: torch's kernel).  ``"subpixel"``: the LR-space convolution with
        :func:`subpixel_weight` followed by :func:`pixel_shuffle` and a crop (Section 2; needs
        ``stride`` equal along both axes, ``dilation`` 1; the relation is in :func:`subpixel_weight`;
        a kernel that is not a multiple of ``r`` is zero-extended at the top/left, adding the extension
        to ``padding`` and ``output_padding``).  Both give the same result to rounding.
    check_finite : bool, default True
        Reject NaN/inf in the inputs.

    Returns
    -------
    y : ndarray or Tensor, shape (N, C_out, H_out, W_out) (no batch axis for 3-D ``x``)
        dtype as in :func:`conv2d`.

    Raises
    ------
    ValueError
        As :func:`conv2d`; also ``output_padding`` not below the stride or the dilation, a padding
        that crops the whole output, an unknown method, ``"subpixel"`` with unequal strides or dilation.
    TypeError
        Complex, masked or non-numeric input.

    Examples
    --------
    >>> import numpy as np, nsiter
    >>> nsiter.conv_transpose2d(np.ones((1, 1, 2, 2)), np.ones((1, 1, 2, 2)), stride=2).shape
    (1, 1, 4, 4)
    """
    check_option(method, "method", TRANSPOSED_METHODS)
    be, x4, w, b, g, groups, unbatched, op = _transposed_inputs(x, weight, bias, stride, padding, output_padding,
                                                                dilation, groups, check_finite)
    if method == "subpixel":
        y = _subpixel_route(be, x4, w, b, g, groups, op)
    else:
        y = _transposed_core(be, x4, w, b, g, groups)
    return y[0] if unbatched else y


def _subpixel_route(be, x, w, b, g: Geometry, groups: int, op):
    """Transposed convolution as ``crop(PS(conv2d(pad(x), subpixel_weight(W))))`` (Section 2)."""
    if g.sh != g.sw or (g.dh, g.dw) != (1, 1):
        raise ValueError(f"method='subpixel' needs one stride r along both axes and dilation 1, got stride "
                         f"{(g.sh, g.sw)} and dilation {(g.dh, g.dw)}; use method='col2im'")
    r = g.sh
    mh, mw = (-g.kh) % r, (-g.kw) % r  # zero taps at the top/left make the kernel a multiple of r
    ph, pw, oph, opw = g.ph + mh, g.pw + mw, op[0] + mh, op[1] + mw
    if mh or mw:
        w = _window(be, w, mh, 0, mw, 0)
    kh, kw = (g.kh + mh) // r, (g.kw + mw) // r
    top, bottom = kh - 1 - ph // r, kh - 1 - (ph - oph) // r
    left, right = kw - 1 - pw // r, kw - 1 - (pw - opw) // r
    w_lr = _subpixel_weight_array(be, w, r, groups)
    xw = x
    pad = (0, 0)
    if top == bottom >= 0 and left == right >= 0:
        pad = (top, left)  # symmetric: conv2d pads on the fly
    else:
        xw = _window(be, x, top, bottom, left, right)
    gl = geometry(tuple(xw.shape), (kh, kw), 1, pad, 1, name="the padded input")
    eh, ew = ph % r, pw % r
    fused = _kernel(be, "conv_shuffle")
    if fused is not None:
        return fused(xw, w_lr, b, gl, groups, r, (eh, ew), (g.h, g.w))
    z = _conv2d_core(be, xw, w_lr, None, gl, groups)
    y = _shuffle(be, z, r)
    if eh or ew or y.shape[-2] != g.h or y.shape[-1] != g.w:
        y = y[..., eh: eh + g.h, ew: ew + g.w]
        y = y.contiguous() if be.torch else np.ascontiguousarray(y)
    return _add_bias(be, y, b)


def _shuffle(be, x, r):
    kern = _kernel(be, "pixel_shuffle")
    return kern(x, r) if kern is not None else _shuffle_array(be, x, r)


def pixel_shuffle(x, r):
    r"""Periodic shuffle ``PS`` (Shi et al. 2016): ``(*, C r², H, W) -> (*, C, H r, W r)``.

    .. math::  y[\ldots, c, h r + i, w r + j] = x[\ldots, c r^2 + i r + j, h, w]

    The channel order of ``torch.nn.functional.pixel_shuffle`` (bit-for-bit equal: a permutation),
    the reshaping of the note's Section 2, Fig. 7 ("periodic shuffling ... to reshape the output
    channels to the HR output").

    Parameters
    ----------
    x : array_like or Tensor, shape (*, C r², H, W)
        At least 3-D.  Integers are converted to float64; NaN/inf are moved as they are.
    r : int
        Upscaling factor, positive.

    Returns
    -------
    y : ndarray or Tensor, shape (*, C, H r, W r)
        A new array (never a view of ``x``).

    Raises
    ------
    ValueError
        ``x`` below 3-D or empty, channels not divisible by ``r**2``, ``r < 1``.
    TypeError
        Complex, masked or non-numeric input; non-integer ``r``.
    """
    arr = _batched_array(x, "(*, C * r**2, H, W)")
    r = _check_factor(r)
    c = int(arr.shape[-3])
    if c % (r * r):
        raise ValueError(f"expected the channels of x (axis -3) divisible by r**2 = {r * r}, got {c} channels; "
                         f"use an r with r**2 dividing {c}, or pad the channels")
    be = backend(arr)
    return _fresh(be, _shuffle(be, arr, r), arr)


def pixel_unshuffle(x, r):
    r"""Inverse periodic shuffle: ``(*, C, H r, W r) -> (*, C r², H, W)``.

    .. math::  y[\ldots, c r^2 + i r + j, h, w] = x[\ldots, c, h r + i, w r + j]

    ``pixel_unshuffle(pixel_shuffle(x, r), r) == x`` exactly; equal to
    ``torch.nn.functional.pixel_unshuffle`` bit-for-bit.

    Parameters
    ----------
    x : array_like or Tensor, shape (*, C, H r, W r)
    r : int
        Downscaling factor, positive; divides both spatial sizes.

    Returns
    -------
    y : ndarray or Tensor, shape (*, C r², H, W)

    Raises
    ------
    ValueError
        ``x`` below 3-D or empty, ``H`` or ``W`` not divisible by ``r``, ``r < 1``.
    TypeError
        Complex, masked or non-numeric input; non-integer ``r``.
    """
    arr = _batched_array(x, "(*, C, H * r, W * r)")
    r = _check_factor(r)
    h, w = int(arr.shape[-2]), int(arr.shape[-1])
    if h % r or w % r:
        raise ValueError(f"expected the height and width of x divisible by r = {r}, got {(h, w)}; crop x to "
                         f"{(h - h % r, w - w % r)} or choose an r dividing both")
    be = backend(arr)
    kern = _kernel(be, "pixel_unshuffle")
    y = kern(arr, r) if kern is not None else _unshuffle_array(be, arr, r)
    return _fresh(be, y, arr)


def _weight_array(w, name: str):
    return _array(w, name, (4,), "4-D")


def _subpixel_weight_array(be, w, r: int, groups: int):
    xp = be.xp
    cin, cout_g, kr, lr = (int(v) for v in w.shape)
    kh, kw = kr // r, lr // r
    w7 = xp.reshape(w, (groups, cin // groups, cout_g, kh, r, kw, r))
    w7 = xp.flip(w7, axis=(3, 5))
    w7 = xp.permute_dims(w7, (0, 2, 4, 6, 1, 3, 5))  # (G, o, phi, psi, i, t, s)
    return xp.reshape(w7, (groups * cout_g * r * r, cin // groups, kh, kw))


def subpixel_weight(weight, r, *, groups=1):
    r"""LR-space convolution weight of a stride-``r`` transposed convolution (Shi et al. 2016, Section 2).

    Maps an ``(i, o, k_h r, k_w r)`` weight ``W`` of :func:`conv_transpose2d` to the
    ``(o r², i, k_h, k_w)`` weight of a :func:`conv2d` in low-resolution space,

    .. math::

        w[o r^2 + \varphi r + \psi,\; c,\; t,\; u] = W[c,\; o,\; r (k_h - 1 - t) + \varphi,\; r (k_w - 1 - u) + \psi],

    (the note writes the deconvolution kernel ``(o, i, k r, k r)``; torch and nsiter store a transposed
    convolution's weight input channels first), i.e. the ``r²`` independent sub-kernels
    ``W[..., φ::r, ψ::r]`` of the note's Fig. 6 ("the
    different sets of weights ... are activated independently"), each with its element order
    reversed (Section 1: reversing the indices turns the sub-pixel convolution into the transposed
    one).  A permutation: exact, invertible by :func:`transposed_weight`.

    **The equivalence, with its cropping.**  For ``x`` of ``H`` rows, stride ``r``, padding ``p``,
    output padding ``q`` and dilation 1, the full transposed output row ``u = r m + φ`` sums
    ``x[m - t] W[r t + φ]`` over ``t`` (write the tap as ``a = r t + φ``): a true convolution of
    ``x`` with the sub-kernel ``φ``, i.e. a correlation with its reversal over ``x`` padded by
    ``k - 1``.  Cropping ``p`` rows at the top and keeping ``H_out = (H - 1) r - 2p + k r + q``
    rows gives, per axis,

    .. math::

        \mathrm{conv\_transpose2d}(x, W, r, p, q) =
        \mathrm{PS}_r\big(\mathrm{conv2d}(\mathrm{pad}_{a, b}(x),\ w)\big)[e_t : e_t + H_{out}],

        a = k - 1 - \lfloor p / r \rfloor, \quad b = k - 1 - \lfloor (p - q) / r \rfloor, \quad
        e_t = p \bmod r, \quad e_b = (p - q) \bmod r,

    where ``pad_{a,b}`` adds ``a`` zero rows at the top and ``b`` at the bottom (a negative amount
    removes rows), ``PS_r`` is :func:`pixel_shuffle`, the shuffled output has
    ``e_t + H_out + e_b`` rows, and floors/mods are floored (Python's ``//``, ``%``).  Examples:
    ``p = q = 0``: pad ``k - 1`` on both sides, no crop; ``k = 1, p = 0`` (kernel ``r``):
    ``PS_r(conv2d(x, w))`` exactly; ``r = 2``, kernel 4, ``p = 1`` (DCGAN): pad 1, crop 1 on each side.
    :func:`conv_transpose2d` ``(method="subpixel")`` computes this right-hand side.

    Parameters
    ----------
    weight : array_like or Tensor, shape (C_in, C_out / groups, k_h r, k_w r)
    r : int
        The stride of the transposed convolution (upscaling factor), positive.
    groups : int
        Groups of the transposed convolution (the LR convolution has the same).

    Returns
    -------
    w : ndarray or Tensor, shape (C_out r², C_in / groups, k_h, k_w)
        Same dtype (integers -> float64); a new array; NaN/inf are moved as they are.

    Raises
    ------
    ValueError
        ``weight`` not 4-D or empty, kernel not a multiple of ``r``, ``C_in`` not divisible by ``groups``.
    TypeError
        Complex, masked or non-numeric input.
    """
    w = _weight_array(weight, "weight")
    r = _check_factor(r)
    groups = check_positive_int(groups, "groups")
    cin, _, kr, lr = (int(v) for v in w.shape)
    if kr % r or lr % r:
        raise ValueError(f"expected a kernel size that is a multiple of r = {r}, got {(kr, lr)}; zero-extend the "
                         f"weight at the top/left by {((-kr) % r, (-lr) % r)} and add that to padding and "
                         "output_padding (conv_transpose2d(method='subpixel') does this)")
    if cin % groups:
        raise ValueError(f"expected C_in (axis 0 of weight) divisible by groups, got {cin} and groups={groups}; "
                         f"use groups dividing {cin}")
    be = backend(w)
    return _fresh(be, _subpixel_weight_array(be, w, r, groups), w)


def transposed_weight(weight, r, *, groups=1):
    r"""Inverse of :func:`subpixel_weight`: ``(o r², i, k_h, k_w) -> (i, o, k_h r, k_w r)``.

    .. math::

        W[c,\; o,\; r t + \varphi,\; r u + \psi] = w[o r^2 + \varphi r + \psi,\; c,\; k_h - 1 - t,\; k_w - 1 - u]

    The note's "inverse operation" that recreates the ``(1, 32, 9, 9)`` deconvolution kernel from
    the trained ``(9, 32, 3, 3)`` LR kernel (Section 2): ``transposed_weight(subpixel_weight(W, r), r)
    == W`` exactly, and conversely.

    Parameters
    ----------
    weight : array_like or Tensor, shape (C_out r², C_in / groups, k_h, k_w)
        An LR-space :func:`conv2d` weight.
    r : int
        Upscaling factor, positive.
    groups : int
        Groups of the convolution.

    Returns
    -------
    W : ndarray or Tensor, shape (C_in, C_out / groups, k_h r, k_w r)
        A :func:`conv_transpose2d` weight for stride ``r``; same dtype, a new array.

    Raises
    ------
    ValueError
        ``weight`` not 4-D or empty, output channels not divisible by ``groups * r**2``.
    TypeError
        Complex, masked or non-numeric input.
    """
    w = _weight_array(weight, "weight")
    r = _check_factor(r)
    groups = check_positive_int(groups, "groups")
    co, ci_g, kh, kw = (int(v) for v in w.shape)
    if co % (groups * r * r):
        raise ValueError(f"expected the output channels of weight (axis 0) divisible by groups * r**2 = "
                         f"{groups * r * r}, got {co}; an LR weight has C_out * r**2 channels, ordered as "
                         "pixel_shuffle reads them")
    be = backend(w)
    xp = be.xp
    cout_g = co // (groups * r * r)
    w7 = xp.reshape(w, (groups, cout_g, r, r, ci_g, kh, kw))
    w7 = xp.permute_dims(w7, (0, 4, 1, 5, 2, 6, 3))  # (G, i, o, t, phi, u, psi)
    w7 = xp.flip(w7, axis=(3, 5))
    out = xp.reshape(w7, (groups * ci_g, cout_g, kh * r, kw * r))
    return _fresh(be, out, w)
