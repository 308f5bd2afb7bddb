"""im2col and its adjoint col2im: the patch matrix of a convolution layer (Ye et al. 2020, §4.1).

``X = im2col(x, k)`` has one row per patch and one column per kernel tap, so that the valid
cross-correlation of ``x`` with ``w`` of shape ``(C, kh, kw)`` is ``y = X @ w.ravel()`` (the
paper's ``y = X w``, Fig. 3); layouts as in :mod:`nsiter._conventions`.
"""
from __future__ import annotations

import math
import sys

import numpy as np

from ._backend import backend
from ._conventions import as_images, check_budget, geometry
from ._validation import as_float_array, as_shape, check_ndim, check_nonempty

__all__ = ["im2col", "col2im", "output_shape"]


def output_shape(image_shape, kernel_size, *, stride=1, padding=0, dilation=1) -> tuple[int, int]:
    """``(H_out, W_out)`` of a convolution on ``image_shape`` (2-, 3- or 4-D): ``(H + 2p - d(k - 1) - 1) // s + 1``."""
    _, g = _shape_geometry(image_shape, kernel_size, stride, padding, dilation)
    return g.oh, g.ow


def _shape_geometry(image_shape, kernel_size, stride, padding, dilation):
    """``(shape, geometry)`` of an ``image_shape`` argument, validated."""
    shape = as_shape(image_shape, "image_shape")
    if len(shape) not in (2, 3, 4):
        raise ValueError(f"expected image_shape (H, W), (C, H, W) or (N, C, H, W), got {shape}")
    shape4 = (1,) * (4 - len(shape)) + shape
    return shape, geometry(shape4, kernel_size, stride, padding, dilation, name="image_shape")


def im2col(x, kernel_size, *, stride=1, padding=0, dilation=1, out=None):
    r"""Patch matrix of a convolution: ``X[n*L + oh*W_out + ow, c*kh*kw + i*kw + j]``.

    .. math::

        X_{(n, o_h, o_w),\,(c, i, j)} = x_{\mathrm{pad}}[n, c,\; o_h s_h + i d_h,\; o_w s_w + j d_w]

    where ``x_pad`` is ``x`` zero-padded by ``padding`` on each side;
    ``im2col(x).reshape(N, L, F)`` equals ``torch.nn.functional.unfold(x).transpose(1, 2)``.

    Parameters
    ----------
    x : array_like, shape (N, C, H, W), (C, H, W) or (H, W)
        Channels-first images.  Any strides are accepted; ``x`` is never modified.
    kernel_size, stride, padding, dilation : int or (int, int)
        Kernel size, step between patches, zero padding on both sides (``>= 0``), tap spacing.
    out : ndarray or Tensor, optional
        Where to write the result (as numpy's ``out=``): exactly shape ``(N * H_out * W_out, C * kh *
        kw)`` and the result dtype, C-contiguous, writeable, not sharing memory with ``x`` (a tensor
        for tensor input, on its device).  Reusing one buffer skips the allocation and the page
        faults of a fresh result.  Tensors: the result is computed, then copied into ``out``.

    Returns
    -------
    X : ndarray or Tensor, shape (N * H_out * W_out, C * kh * kw)
        float32 for float32/float16 input, float64 otherwise; NaN/inf are copied as they are.
        ``C*kh*kw / (sh*sw)`` times the size of ``x``: :func:`nsiter.patch_covariance` never builds it.
        ``out`` itself when given.

    Raises
    ------
    ValueError
        Wrong ndim, empty input, bad sizes, kernel larger than the padded image, a result beyond
        :data:`nsiter._conventions.MAX_ELEMENTS` (refused before allocating); an ``out`` of another
        shape or dtype, not C-contiguous, read-only, or overlapping ``x``.
    TypeError
        Complex, non-numeric or masked input; ``out`` not a plain ndarray (a tensor for tensors).

    Examples
    --------
    >>> import numpy as np, nsiter
    >>> nsiter.im2col(np.arange(16.0).reshape(4, 4), 3).shape
    (4, 9)
    """
    arr = as_float_array(x, "x")
    imgs = as_images(arr, "x")
    check_nonempty(imgs, "x")
    g = geometry(imgs.shape, kernel_size, stride, padding, dilation)
    check_budget(g.n * g.n_patches * g.n_features, "MAX_ELEMENTS", f"the im2col matrix of {g.n * g.n_patches} patches "
                 f"x {g.n_features} features", "use nsiter.patch_covariance (it never forms the matrix), fewer images "
                 "per call, a larger stride or less padding")
    be = backend(imgs)
    if out is None:
        return be.patches.im2col(imgs, g)
    _check_out(out, (x, imgs), (g.n * g.n_patches, g.n_features), imgs.dtype, be.torch)
    if be.torch:
        return out.copy_(be.patches.im2col(imgs, g))
    return be.patches.im2col(imgs, g, out)


def _check_out(out, sources, shape: tuple, dtype, torch: bool) -> None:
    """Refuse an ``out`` that :func:`im2col` cannot write its result into (what came, what fits, the fix)."""
    kind = "torch.Tensor" if torch else "numpy.ndarray"
    alloc = f"torch.empty({shape}, dtype={dtype})" if torch else f"np.empty({shape}, dtype=np.{dtype})"
    if torch:
        tt = sys.modules["torch"]
        if not isinstance(out, tt.Tensor):
            raise TypeError(f"expected out to be a torch.Tensor (x is a tensor), got {type(out).__name__}; "
                            f"pass {alloc} on x's device")
    elif type(out) is not np.ndarray:
        raise TypeError(f"expected out to be a numpy.ndarray, got {type(out).__name__} "
                        "(subclasses such as masked arrays and np.matrix are refused); "
                        f"pass {alloc}")
    if tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape} (N*H_out*W_out patches x C*kh*kw "
                         f"features) for this x and geometry; pass {alloc}")
    if out.dtype != dtype:
        raise ValueError(f"out has dtype {out.dtype}, expected {dtype} (the result dtype of this x: float32 for "
                         f"float32/float16 input, float64 otherwise); pass {alloc}")
    if torch:
        src = sources[1]
        if out.device != src.device:
            raise ValueError(f"out is on {out.device}, expected x's device {src.device}; allocate out there")
        if not out.is_contiguous():
            raise ValueError(f"out is not contiguous (strides {out.stride()}); pass a contiguous {kind}, e.g. {alloc}")
        lo, hi = out.data_ptr(), out.data_ptr() + out.numel() * out.element_size()
        for a in sources:
            if isinstance(a, tt.Tensor) and a.numel():
                span = a.untyped_storage()
                if lo < span.data_ptr() + span.nbytes() and span.data_ptr() < hi:
                    raise ValueError("out shares storage with x; pass a separate buffer (im2col reads x while "
                                     "writing out, and never modifies its input)")
        if out.requires_grad:
            raise ValueError("out requires grad; pass a buffer that does not (out=... is not differentiable)")
        return
    if not out.flags.c_contiguous or not out.flags.aligned:
        raise ValueError(f"out is not C-contiguous and aligned (strides {out.strides}); pass a fresh {kind}, "
                         f"e.g. {alloc}")
    if not out.flags.writeable:
        raise ValueError(f"out is read-only; pass a writeable {kind}, e.g. {alloc}")
    for a in sources:
        if isinstance(a, np.ndarray) and _overlaps(out, a):
            raise ValueError("out shares memory with x; pass a separate buffer (im2col reads x while writing out, "
                             "and never modifies its input)")


def _overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` and ``b`` share memory (exact, or True when the exact answer is too costly)."""
    try:
        return bool(np.shares_memory(a, b, max_work=10**6))
    except np.exceptions.TooHardError:
        return True


def col2im(X, image_shape, kernel_size, *, stride=1, padding=0, dilation=1):
    r"""Adjoint of :func:`im2col`: scatter patch rows back into images, summing overlaps.

    .. math::

        x[n, c, h, w] = \sum_{(o_h, o_w, i, j):\ o_h s_h + i d_h - p_h = h,\ o_w s_w + j d_w - p_w = w}
                        X_{(n, o_h, o_w),\,(c, i, j)}

    so that ``<im2col(x), X> == <x, col2im(X, x.shape)>`` (entries in the zero padding are
    dropped).  Applied to a transposed convolution's input-times-weight matrix, it is the
    transposed convolution (the "deconvolution layer" of Shi et al. 2016), not network
    deconvolution.

    Parameters
    ----------
    X : array_like, shape (N * H_out * W_out, C * kh * kw)
    image_shape : tuple
        ``(H, W)``, ``(C, H, W)`` or ``(N, C, H, W)``; the result has this shape.
    kernel_size, stride, padding, dilation
        As in :func:`im2col`.

    Returns
    -------
    x : ndarray or Tensor of shape ``image_shape``, dtype of ``X`` (rules as im2col).

    Raises
    ------
    ValueError
        ``X`` not 2-D, or its shape inconsistent with ``image_shape`` and the geometry.
    """
    arr = as_float_array(X, "X")
    check_ndim(arr, "X", (2,), "(N*H_out*W_out, C*kh*kw)")
    shape, g = _shape_geometry(image_shape, kernel_size, stride, padding, dilation)
    want = (g.n * g.n_patches, g.n_features)
    if tuple(arr.shape) != want:
        raise ValueError(f"X of shape {tuple(arr.shape)} does not match image_shape {shape} with kernel "
                         f"{(g.kh, g.kw)}, stride {(g.sh, g.sw)}, padding {(g.ph, g.pw)}, dilation {(g.dh, g.dw)}: "
                         f"expected X of shape {want}; check image_shape and the convolution parameters")
    check_budget(math.prod(shape), "MAX_ELEMENTS", f"col2im into images of shape {shape}", "pass fewer images per call")
    return backend(arr).patches.col2im(arr, g).reshape(shape)
