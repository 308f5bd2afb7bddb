r"""Whitening ("deconvolution") with a patch covariance's inverse square root (Ye et al. 2020).

**Layouts of D** (read from its shape; ``F = C*kh*kw`` columns of ``X = im2col(x)``), as
:func:`nsiter.patch_covariance` returns them for ``block_size=None``, ``"contiguous"``, ``"reference"``:

* ``(F, F)``: one matrix for all columns, ``mean (F,)``;
* ``(G, Fb, Fb)`` with ``G*Fb = F``: contiguous channel blocks, ``D[g]`` acts on columns
  ``[g*Fb, (g+1)*Fb)``, ``mean`` of shape ``(G, Fb)`` or ``(F,)``;
* ``(Fb, Fb)`` with ``Fb < F`` and ``grouping="reference"``: one shared matrix acting on the
  interleaved column groups ``g, g + G, g + 2G, ...`` (``G = F/Fb``), ``mean (Fb,)`` — the
  FastDeconv layout.

``grouping`` tells a shared reference ``D`` from a mistake; ``block_size`` is only checked
against ``D``.  Array-API code on ``backend(...).xp``: tensors stay on their device, differentiable.
"""
from __future__ import annotations

import math

import numpy as np

from ._backend import backend
from ._conventions import as_images, check_budget
from ._moments import channel_means
from ._validation import (as_float_array, as_pair, check_ndim, check_nonempty, check_option, check_positive_int,
                          is_tensor)
from .covariance import GROUPINGS, _check_finite_fast, patch_covariance

__all__ = ["whiten", "deconvolution_kernel", "deconvolve_image", "fold_deconvolution"]

_CHUNK_BYTES = 16 * 2**20  # rows of a numpy X whitened at a time (tensors: one product)


class _Layout:
    """Block structure of ``D`` for data matrices of ``F`` columns (see the module docstring)."""

    def __init__(self, D, F: int, block_size, grouping: str, what: str = "X"):
        check_option(grouping, "grouping", GROUPINGS)
        check_ndim(D, "D", (2, 3), "(F, F), (G, Fb, Fb) or a shared (Fb, Fb)")
        shape = tuple(D.shape)
        if shape[-1] != shape[-2]:
            raise ValueError(f"expected square matrices in D, got shape {shape}")
        check_nonempty(D, "D")
        fb = shape[-1]
        if D.ndim == 3:
            if grouping == "reference":
                raise ValueError(f"grouping='reference' shares one (Fb, Fb) matrix, got a stack D of shape {shape}; "
                                 "use grouping='contiguous' for per-block matrices")
            if shape[0] * fb != F:
                raise ValueError(f"D of shape {shape} covers {shape[0] * fb} columns, but {what} has {F}; "
                                 "D must come from the same kernel size and channel count")
            self.mode, self.groups = "contiguous", shape[0]
        elif fb == F:
            self.mode, self.groups = "full", 1
        elif grouping == "reference" and fb < F and F % fb == 0:
            self.mode, self.groups = "reference", F // fb
        elif grouping == "reference":
            raise ValueError(f"a shared D of shape {shape} needs a multiple of {fb} columns, but {what} has {F}; "
                             "D must come from the same kernel size and channel count")
        else:
            raise ValueError(f"D of shape {shape} does not match the {F} columns of {what}: pass the (G, Fb, Fb) stack "
                             "for contiguous blocks, grouping='reference' for one shared matrix, or an (F, F) matrix")
        if block_size is not None:
            block_size = check_positive_int(block_size, "block_size")
            if fb % block_size:
                raise ValueError(f"D blocks of {fb} features cannot hold whole channels of block_size {block_size} "
                                 f"(Fb = block_size * kh * kw); check block_size or D")
        self.fb, self.F = fb, F

    def mean(self, mean):
        """``mean`` checked against the layout."""
        want = {"full": [(self.F,)], "contiguous": [(self.groups, self.fb), (self.F,)],
                "reference": [(self.fb,)]}[self.mode]
        if tuple(mean.shape) not in want:
            shapes = " or ".join(str(s) for s in want)
            raise ValueError(f"expected mean of shape {shapes} for D of this layout, got {tuple(mean.shape)}")
        return mean

    def full_mean(self, xp, mean):
        """The mean of every column of ``X`` (length ``F``)."""
        if self.mode == "reference":
            return xp.repeat(mean, self.groups)
        return xp.reshape(mean, (self.F,))

    def apply(self, xp, X, D):
        """``X @ M`` for ``X (n, F)`` and ``M`` the equivalent (block-diagonal, interleaved) ``F x F`` ``D``."""
        n, G, fb = X.shape[0], self.groups, self.fb
        if self.mode == "full":
            return xp.matmul(X, D)
        if self.mode == "contiguous":  # (n, G, Fb) -> (G, n, Fb): one product per block
            part = xp.permute_dims(xp.reshape(X, (n, G, fb)), (1, 0, 2))
            return xp.reshape(xp.permute_dims(xp.matmul(part, D), (1, 0, 2)), (n, self.F))
        part = xp.permute_dims(xp.reshape(X, (n, fb, G)), (0, 2, 1))  # column f*G + g -> [g, f]
        return xp.reshape(xp.permute_dims(xp.matmul(part, D), (0, 2, 1)), (n, self.F))

    def columns(self, be, D, idx: np.ndarray):
        """Columns ``idx`` (host ints) of the equivalent ``F x F`` matrix, as ``(F, len(idx))``."""
        xp = be.xp
        if self.mode == "full":
            return xp.take(D, be.asarray(idx, D), axis=1)
        G, fb = self.groups, self.fb
        # contiguous: column j = g*Fb + loc is D[g][:, loc] in block g; reference: column
        # j = f2*G + g is D[:, f2] on the rows f*G + g
        g = idx // fb if self.mode == "contiguous" else idx % G
        mask = be.asarray(np.arange(G)[:, None] == g[None, :], D, D.dtype)  # (G, k)
        if self.mode == "contiguous":
            sel = xp.take(xp.reshape(xp.permute_dims(D, (0, 2, 1)), (self.F, fb)), be.asarray(idx, D), axis=0)
            return xp.reshape(xp.permute_dims(sel, (1, 0))[None] * mask[:, None, :], (self.F, len(idx)))
        sel = xp.take(D, be.asarray(idx // G, D), axis=1)  # (Fb, k)
        return xp.reshape(sel[:, None, :] * mask[None, :, :], (self.F, len(idx)))


def _prep(*named):
    """``(backend, arrays)``: each input as a finite float array of the common backend (arrays
    next to a tensor become tensors on its device; tensors on another device are an error)."""
    be = backend(*(v for _, v in named))
    ref = next((v for _, v in named if is_tensor(v)), None)
    out = []
    for name, v in named:
        a = as_float_array(v, name)
        if ref is not None and not is_tensor(a):
            a = be.asarray(a, ref)
        elif ref is not None and a.device != ref.device:
            raise ValueError(f"expected {name} on {ref.device} like the other tensors, got {a.device}; "
                             "move it with .to(device)")
        _check_finite_fast(a, name)
        out.append(a)
    return be, out


def whiten(X, mean, D, *, block_size=None, grouping="contiguous"):
    r"""The deconvolved data matrix ``(X - mu) D``, block by block (Ye et al. 2020, §4.2).

    .. math::

        X_w = (X - \mu) D, \qquad \text{so that} \quad
        \frac{1}{N} X_w^T X_w = D\,\mathrm{Cov}\,D = I \ \text{when} \ D = \mathrm{Cov}^{-1/2}.

    Parameters
    ----------
    X : array_like, shape (N, F)
        A data matrix, typically ``im2col(x, k, ...)``.  Never modified.
    mean, D, block_size, grouping
        From :func:`nsiter.patch_covariance` and :func:`nsiter.inv_sqrtm` (:mod:`nsiter.whitening`).

    Returns
    -------
    Xw : ndarray or Tensor, shape (N, F)
        In the common float dtype of the inputs; a tensor if any input is one.

    Raises
    ------
    ValueError
        Wrong ndim, ``mean``/``D`` inconsistent with ``X``, NaN/inf, unknown grouping.

    Examples
    --------
    >>> import numpy as np, nsiter
    >>> x = np.random.default_rng(0).standard_normal((4, 2, 16, 16))
    >>> cov, mean = nsiter.patch_covariance(x, 3, block_size=1)
    >>> Xw = nsiter.whiten(nsiter.im2col(x, 3), mean, nsiter.inv_sqrtm(cov, method="eigh"))
    >>> bool(np.allclose(nsiter.covariance(Xw[:, :9])[0], np.eye(9)))
    True
    """
    be, (Xa, ma, Da) = _prep(("X", X), ("mean", mean), ("D", D))
    check_ndim(Xa, "X", (2,), "(n_samples, n_features), e.g. an im2col matrix")
    check_nonempty(Xa, "X")
    layout = _Layout(Da, Xa.shape[1], block_size, grouping)
    xp = be.xp
    dtype = xp.result_type(Xa, ma, Da)
    mu = xp.astype(layout.full_mean(xp, layout.mean(ma)), dtype, copy=False)
    Dc = xp.astype(Da, dtype, copy=False)
    n, F = Xa.shape
    rows = n if be.torch else max(1, _CHUNK_BYTES // (F * np.dtype(dtype).itemsize))
    with be.precision(Xa):
        if rows >= n:
            return layout.apply(xp, Xa - mu, Dc)
        out = np.empty((n, F), dtype=dtype)
        for r0 in range(0, n, rows):
            out[r0:r0 + rows] = layout.apply(xp, Xa[r0:r0 + rows] - mu, Dc)
        return out


def _centre_bank(be, D, kh: int, kw: int, channels: int, grouping: str, what: str = "X"):
    """``(layout, cols (F, C), K (C, C, kh, kw))``: the centre-tap columns of ``D`` and their bank."""
    layout = _Layout(D, channels * kh * kw, None, grouping, what=what)
    cols = layout.columns(be, D, np.arange(channels) * (kh * kw) + (kh // 2) * kw + kw // 2)
    return layout, cols, be.xp.reshape(be.xp.permute_dims(cols, (1, 0)), (channels, channels, kh, kw))


def deconvolution_kernel(D, kernel_size, channels, *, grouping="contiguous"):
    r"""The deconvolution filter bank: centre-tap columns of ``D`` reshaped to ``(C, C, kh, kw)``.

    ``K[c] = D[:, c*kh*kw + t0].reshape(C, kh, kw)`` with ``t0 = (kh//2)*kw + kw//2`` the
    centre tap: the "middle row/column of Cov^-0.5 reshaped into the kernel size" of
    Ye et al. 2020, §4.3.2 (Fig. 2; row and column agree for symmetric ``D``).  Correlating
    the zero-padded images with ``K`` gives ``(X D)[:, c*kh*kw + t0]``, the centre column of
    every whitened patch (:func:`deconvolve_image`).

    Parameters
    ----------
    D : array_like
        Any layout of :mod:`nsiter.whitening` for ``F = channels * kh * kw``.
    kernel_size, channels, grouping
        ``(kh, kw)`` (even sizes: centre tap ``(kh//2, kw//2)``), ``C`` and the layout of ``D``.

    Returns
    -------
    K : ndarray or Tensor, shape (C, C, kh, kw)
        ``K[c_out, c_in]``; dtype (and device) of ``D``.

    Examples
    --------
    >>> import nsiter
    >>> cov, _ = nsiter.patch_covariance(nsiter.data.sample_image(gray=True), 5, sampling_stride=2)
    >>> K = nsiter.deconvolution_kernel(nsiter.inv_sqrtm(cov, method="eigh", eps=1e-5), 5, 1)
    >>> bool(K[0, 0, 2, 2] > 0 > K[0, 0, 2, 1])  # centre-surround
    True
    """
    be, (Da,) = _prep(("D", D))
    channels = check_positive_int(channels, "channels")
    kh, kw = as_pair(kernel_size, "kernel_size", minimum=1)
    return _centre_bank(be, Da, kh, kw, channels, grouping, f"im2col of {channels} channels with a {kh}x{kw} kernel")[2]


def deconvolve_image(x, kernel_size, *, eps=1e-5, method="coupled", n_iter=None, sampling_stride=1,
                     block_size=None, grouping="contiguous"):
    r"""The deconvolved image of Ye et al. 2020, Fig. 4: each pixel replaced by its whitened patch centre.

    .. math::

        y[n, c, h, w] = \big((X - \mu) D\big)_{(n, h, w),\ (c, t_0)}, \qquad
        X = \mathrm{im2col}(x, k, \text{padding} = k/2), \quad D \approx (\mathrm{Cov} + \varepsilon I)^{-1/2}

    with ``Cov, mu = patch_covariance(x, k, padding=k//2, sampling_stride=...)`` and
    ``D = inv_sqrtm(Cov, method=method, n_iter=n_iter, eps=eps)``: the correlation of the
    zero-padded, centred image with :func:`deconvolution_kernel` ``(D)``.

    Parameters
    ----------
    x : array_like, shape (N, C, H, W), (C, H, W) or (H, W)
    kernel_size : int or (int, int)
        Odd patch size (the output keeps the shape of ``x``).
    eps : float
        Ridge of the inverse square root (absolute, in the units of ``x`` squared).
    method, n_iter, sampling_stride, block_size, grouping
        Passed to :func:`nsiter.inv_sqrtm` and :func:`nsiter.patch_covariance`.

    Returns
    -------
    y : ndarray or Tensor
        Same shape as ``x``; float32 for float32 input, else float64 (computed in float64).

    Raises
    ------
    ValueError
        Even kernel size, an inverse square root of ``G Fb**3`` beyond :data:`nsiter._conventions.MAX_WORK`,
        and all that :func:`nsiter.patch_covariance` / :func:`nsiter.inv_sqrtm` reject.

    Examples
    --------
    >>> import nsiter
    >>> nsiter.deconvolve_image(nsiter.data.sample_image(gray=True), 5, method="eigh").shape
    (600, 512)
    """
    from .newton_schulz import inv_sqrtm

    arr = as_float_array(x, "x")
    kh, kw = as_pair(kernel_size, "kernel_size", minimum=1)
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"expected an odd kernel_size for deconvolve_image (its centre tap defines the output pixel), "
                         f"got {(kh, kw)}; use {(kh | 1, kw | 1)}")
    imgs = as_images(arr, "x")
    b = imgs.shape[1] if block_size is None else check_positive_int(block_size, "block_size")
    fb = b * kh * kw
    check_budget(max(1, imgs.shape[1] // b if grouping == "contiguous" else 1) * fb ** 3, "MAX_WORK",
                 f"the inverse square root of the {fb} x {fb} patch covariance",
                 "use a smaller kernel_size or block_size")
    cov, mean = patch_covariance(imgs, (kh, kw), padding=(kh // 2, kw // 2), sampling_stride=sampling_stride,
                                 block_size=block_size, grouping=grouping)
    be = backend(imgs)
    xp = be.xp
    D = inv_sqrtm(xp.astype(cov, xp.float64), method=method, n_iter=n_iter, eps=eps)
    layout, cols, K = _centre_bank(be, D, kh, kw, imgs.shape[1], grouping)
    # a shift near the channel means (detached, host-computed): it cancels between the data
    # and the bias, and only keeps the float64 correlation free of cancellation
    m_c = be.asarray(channel_means(imgs), imgs)
    bias = -xp.matmul(layout.full_mean(xp, xp.astype(mean, xp.float64)) - xp.repeat(m_c, kh * kw), cols)
    with be.precision(imgs):
        y = be.patches.correlate_centred(xp.astype(imgs, xp.float64), m_c, K, bias, (kh // 2, kw // 2))
    return xp.reshape(xp.astype(y, arr.dtype, copy=False), tuple(arr.shape))


def fold_deconvolution(weight, bias, D, mean, *, block_size=None, grouping="contiguous"):
    r"""Implicit deconvolution: fold ``D`` and ``mu`` into convolution weights (Ye et al. 2020, §4.5.1).

    .. math::

        y = (X - \mu) D w + b = X (D w) + (b - \mu D w) = X w' + b'

    for every output channel's flattened weight ``w``: a plain correlation with ``(W', b')``
    equals :func:`whiten` followed by the correlation with ``(W, b)``.

    Parameters
    ----------
    weight : array_like, shape (C_out, C_in, kh, kw)
        ``torch.nn.Conv2d`` layout.  With a stack ``D (G, Fb, Fb)`` and ``C_in * kh * kw == Fb``,
        a grouped convolution (``groups = G``; output channel ``o`` in block ``o // (C_out / G)``),
        the grouped case of the reference code.
    bias : array_like, shape (C_out,), or None
        ``None`` is a zero bias (the folded bias is returned all the same).
    D, mean, block_size, grouping
        As for :func:`whiten`, for the im2col matrix of the layer's input.

    Returns
    -------
    weight_folded, bias_folded : ndarray or Tensor, shapes of ``weight`` and (C_out,)

    Examples
    --------
    >>> import numpy as np, nsiter
    >>> rng = np.random.default_rng(0)
    >>> x, w, b = rng.standard_normal((2, 4, 9, 9)), rng.standard_normal((3, 4, 3, 3)), rng.standard_normal(3)
    >>> cov, mean = nsiter.patch_covariance(x, 3)
    >>> D, X = nsiter.inv_sqrtm(cov, method="eigh"), nsiter.im2col(x, 3)
    >>> w2, b2 = nsiter.fold_deconvolution(w, b, D, mean)
    >>> bool(np.allclose(X @ w2.reshape(3, -1).T + b2, nsiter.whiten(X, mean, D) @ w.reshape(3, -1).T + b))
    True
    """
    named = [("weight", weight), ("D", D), ("mean", mean)] + ([] if bias is None else [("bias", bias)])
    be, (Wa, Da, ma, *rest) = _prep(*named)
    check_ndim(Wa, "weight", (4,), "(C_out, C_in, kh, kw)")
    check_nonempty(Wa, "weight")
    xp = be.xp
    c_out = Wa.shape[0]
    ba = rest[0] if rest else xp.zeros_like(Wa[:, 0, 0, 0])
    if tuple(ba.shape) != (c_out,):
        raise ValueError(f"expected bias of shape ({c_out},) for weight of shape {tuple(Wa.shape)}, "
                         f"got {tuple(ba.shape)}")
    dtype = xp.result_type(Wa, Da, ma, ba)
    f_w = math.prod(Wa.shape[1:])
    Wm = xp.astype(xp.reshape(Wa, (c_out, f_w)), dtype, copy=False)
    Dt = xp.matrix_transpose(xp.astype(Da, dtype, copy=False))  # rows w_o^T D^T = (D w_o)^T
    ba = xp.astype(ba, dtype, copy=False)
    with be.precision(Wa):
        if Da.ndim == 3 and Da.shape[0] > 1 and Da.shape[-1] == f_w and grouping == "contiguous":
            G = Da.shape[0]  # a grouped convolution: output channel o belongs to block o // (C_out / G)
            if c_out % G:
                raise ValueError(f"a grouped convolution with {G} groups (weight {tuple(Wa.shape)} against D "
                                 f"{tuple(Da.shape)}) needs C_out divisible by {G}, got {c_out}")
            _Layout(Da, G * f_w, block_size, grouping, what="the layer input")
            if tuple(ma.shape) not in ((G, f_w), (G * f_w,)):
                raise ValueError(f"expected mean of shape ({G}, {f_w}) or ({G * f_w},), got {tuple(ma.shape)}")
            W2 = xp.matmul(xp.reshape(Wm, (G, c_out // G, f_w)), Dt)  # w'_o = D_g w_o
            mg = xp.astype(xp.reshape(ma, (G, f_w, 1)), dtype, copy=False)
            b2 = ba - xp.reshape(xp.matmul(W2, mg), (c_out,))
        else:
            layout = _Layout(Da, f_w, block_size, grouping, what=f"weight {tuple(Wa.shape)}")
            mu = xp.astype(layout.full_mean(xp, layout.mean(ma)), dtype, copy=False)
            W2 = layout.apply(xp, Wm, Dt)
            b2 = ba - xp.matmul(W2, mu)
    return xp.reshape(W2, tuple(Wa.shape)), b2
