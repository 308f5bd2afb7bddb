r"""Whitening ("deconvolution") with a patch covariance's inverse square root (Ye et al. 2020).

With ``X = im2col(x)`` and ``D ~ (Cov + eps I)^{-1/2}`` from :func:`nsiter.patch_covariance`
and :func:`nsiter.inv_sqrtm`:

* :func:`whiten` — the deconvolved data matrix ``(X - mu) D`` (§4.2), block by block;
* :func:`deconvolution_kernel` — the centre-tap columns of ``D`` as a ``(C, C, kh, kw)``
  filter bank (§4.3.2, Fig. 2: "the middle row/column of Cov^-0.5 reshaped");
* :func:`deconvolve_image` — the deconvolved image of Fig. 4: each pixel replaced by the
  centre entry of its whitened patch;
* :func:`fold_deconvolution` — implicit deconvolution (§4.5.1): ``W' = D w`` and
  ``b' = b - mu D w`` so that a plain correlation with ``W', b'`` equals whitening followed
  by the correlation with ``w, b``.

**Layouts of D** (read from its shape; ``F = C*kh*kw`` columns of ``X``):

* ``(F, F)``: one matrix for all columns (``block_size=None``);
* ``(G, Fb, Fb)`` with ``G*Fb = F``: contiguous channel blocks, ``D[g]`` acts on columns
  ``[g*Fb, (g+1)*Fb)``, ``mean`` of shape ``(G, Fb)`` or ``(F,)``;
* ``(Fb, Fb)`` with ``Fb < F`` and ``grouping="reference"``: one shared matrix acting on the
  interleaved column groups ``g, g + G, g + 2G, ...`` (``G = F/Fb``), ``mean`` of shape
  ``(Fb,)`` — the FastDeconv layout.

These are exactly the shapes :func:`nsiter.patch_covariance` returns for
``block_size=None``, ``"contiguous"`` and ``"reference"``.  The optional ``block_size``
(channels per block) is only checked against ``D`` (``Fb`` must be a multiple of it).
"""
from __future__ import annotations

import numpy as np

from ._dispatch import is_tensor, torch_backend
from ._validation import (
    as_float_array,
    as_pair,
    check_ndim,
    check_nonempty,
    check_option,
    check_positive_int,
)
from .covariance import GROUPINGS, _check_finite_fast

__all__ = ["whiten", "deconvolution_kernel", "deconvolve_image", "fold_deconvolution"]

_CHUNK_BYTES = 16 * 2**20  # rows of X whitened at a time


def _torch_twin(name: str):
    """The torch backend's function ``name``, or a TypeError saying it is not there yet."""
    fn = getattr(torch_backend(), name, None)
    if fn is None:
        raise TypeError(
            f"nsiter.{name} has no torch implementation in this version; pass numpy arrays "
            "(t.detach().cpu().numpy()) and convert the result back with torch.from_numpy"
        )
    return fn


class _Layout:
    """Block structure of ``D`` for data matrices of ``F`` columns (see the module docstring)."""

    def __init__(self, D: np.ndarray, F: int, block_size, grouping: str, what: str = "X"):
        check_option(grouping, "grouping", GROUPINGS)
        check_ndim(D, "D", (2, 3), "(F, F), (G, Fb, Fb) or a shared (Fb, Fb)")
        if D.shape[-1] != D.shape[-2]:
            raise ValueError(f"expected square matrices in D, got shape {D.shape}")
        check_nonempty(D, "D")
        fb = D.shape[-1]
        if D.ndim == 3:
            if grouping == "reference":
                raise ValueError(
                    f"grouping='reference' shares one (Fb, Fb) matrix, got a stack D of shape {D.shape}; "
                    "use grouping='contiguous' for per-block matrices"
                )
            if D.shape[0] * fb != F:
                raise ValueError(
                    f"D of shape {D.shape} covers {D.shape[0] * fb} columns, but {what} has {F}; "
                    "D must come from the same kernel size and channel count"
                )
            self.mode, self.groups = "contiguous", D.shape[0]
        elif fb == F:
            self.mode, self.groups = "full", 1
        elif grouping == "reference" and fb < F and F % fb == 0:
            self.mode, self.groups = "reference", F // fb
        elif grouping == "reference":
            raise ValueError(
                f"a shared D of shape {D.shape} needs a multiple of {fb} columns, but {what} has {F}; "
                "D must come from the same kernel size and channel count"
            )
        else:
            raise ValueError(
                f"D of shape {D.shape} does not match the {F} columns of {what}: pass the (G, Fb, Fb) stack "
                "for contiguous blocks, grouping='reference' for one shared matrix, or an (F, F) matrix"
            )
        if block_size is not None:
            block_size = check_positive_int(block_size, "block_size")
            if fb % block_size:
                raise ValueError(
                    f"D blocks of {fb} features cannot hold whole channels of block_size {block_size} "
                    f"(Fb = block_size * kh * kw); check block_size or D"
                )
        self.fb, self.F = fb, F

    def mean(self, mean: np.ndarray) -> np.ndarray:
        """``mean`` as ``(G, Fb)`` (contiguous), ``(F,)`` (full) or ``(Fb,)`` (reference)."""
        want = {"full": [(self.F,)], "contiguous": [(self.groups, self.fb), (self.F,)],
                "reference": [(self.fb,)]}[self.mode]
        if mean.shape not in want:
            shapes = " or ".join(str(s) for s in want)
            raise ValueError(f"expected mean of shape {shapes} for D of this layout, got {mean.shape}")
        return mean.reshape(self.groups, self.fb) if self.mode == "contiguous" else mean

    def full_mean(self, mean: np.ndarray) -> np.ndarray:
        """The mean of every column of ``X`` (length ``F``)."""
        if self.mode == "reference":
            return np.repeat(mean, self.groups)
        return mean.reshape(self.F)

    def column(self, D: np.ndarray, j: int) -> np.ndarray:
        """Column ``j`` of the equivalent ``F x F`` (block-diagonal / interleaved) matrix."""
        out = np.zeros(self.F, dtype=D.dtype)
        if self.mode == "full":
            out[:] = D[:, j]
        elif self.mode == "contiguous":
            g, loc = divmod(j, self.fb)
            out[g * self.fb:(g + 1) * self.fb] = D[g][:, loc]
        else:
            f2, g = divmod(j, self.groups)
            out[np.arange(self.fb) * self.groups + g] = D[:, f2]
        return out


def _prep(a, name: str, dtype=None) -> np.ndarray:
    arr = as_float_array(a, name, dtype=dtype)
    if arr.size:
        _check_finite_fast(arr, name)
    return arr


def whiten(X, mean, D, *, block_size=None, grouping="contiguous"):
    r"""The deconvolved data matrix ``(X - mu) D``, block by block (Ye et al. 2020, §4.2).

    .. math::

        X_w = (X - \mu) D, \qquad \text{so that} \quad
        \frac{1}{N} X_w^T X_w = D\,\mathrm{Cov}\,D = I \ \text{when} \ D = \mathrm{Cov}^{-1/2}.

    Parameters
    ----------
    X : array_like, shape (N, F)
        A data matrix, typically ``im2col(x, k, ...)``.  Never modified.
    mean, D : array_like
        As returned by :func:`nsiter.patch_covariance` (``mean``) and
        :func:`nsiter.inv_sqrtm` (``D``) for the same ``block_size``/``grouping``: ``D`` of
        shape ``(F, F)``, ``(G, Fb, Fb)`` (contiguous blocks, ``mean (G, Fb)`` or ``(F,)``) or
        a shared ``(Fb, Fb)`` with ``grouping="reference"`` (``mean (Fb,)``).
    block_size : int, optional
        Channels per block, only checked against ``D`` (the layout is read from its shape).
    grouping : {"contiguous", "reference"}
        Needed to tell a shared reference-grouping ``D`` from a mistake.

    Returns
    -------
    Xw : ndarray, shape (N, F)
        In the common float dtype of the inputs (float32 if all are float32).

    Raises
    ------
    ValueError
        Wrong ndim, shapes of ``mean``/``D`` inconsistent with ``X``, non-finite values,
        unknown grouping.

    Examples
    --------
    >>> import numpy as np, nsiter
    >>> x = np.random.default_rng(0).standard_normal((4, 2, 16, 16))
    >>> cov, mean = nsiter.patch_covariance(x, 3, block_size=1)
    >>> D = nsiter.inv_sqrtm(cov, method="eigh")
    >>> Xw = nsiter.whiten(nsiter.im2col(x, 3), mean, D)
    >>> bool(np.allclose(nsiter.covariance(Xw[:, :9])[0], np.eye(9)))
    True
    """
    if is_tensor(X, mean, D):
        return _torch_twin("whiten")(X, mean, D, block_size=block_size, grouping=grouping)
    Xa = _prep(X, "X")
    check_ndim(Xa, "X", (2,), "(n_samples, n_features), e.g. an im2col matrix")
    check_nonempty(Xa, "X")
    Da = _prep(D, "D")
    ma = _prep(mean, "mean")
    layout = _Layout(Da, Xa.shape[1], block_size, grouping)
    ma = layout.mean(ma)
    dtype = np.result_type(Xa.dtype, Da.dtype, ma.dtype)
    n, F = Xa.shape
    out = np.empty((n, F), dtype=dtype)
    Dc, mc = Da.astype(dtype, copy=False), ma.astype(dtype, copy=False)
    rows = max(1, _CHUNK_BYTES // (F * dtype.itemsize))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        if layout.mode == "full":
            np.matmul(Xa[r0:r1] - mc, Dc, out=out[r0:r1])
        elif layout.mode == "contiguous":
            fb = layout.fb
            for g in range(layout.groups):
                cols = slice(g * fb, (g + 1) * fb)
                np.matmul(Xa[r0:r1, cols] - mc[g], Dc[g], out=out[r0:r1, cols])
        else:
            G = layout.groups
            part = Xa[r0:r1].reshape(r1 - r0, layout.fb, G).transpose(0, 2, 1) - mc  # (r, G, Fb)
            out[r0:r1] = np.matmul(part, Dc).transpose(0, 2, 1).reshape(r1 - r0, F)
    return out


def _centre_columns(kernel_size, channels: int):
    kh, kw = as_pair(kernel_size, "kernel_size", minimum=1)
    taps = kh * kw
    centre = (kh // 2) * kw + kw // 2
    return kh, kw, np.arange(channels) * taps + centre


def deconvolution_kernel(D, kernel_size, channels, *, grouping="contiguous"):
    r"""The deconvolution filter bank: centre-tap columns of ``D`` reshaped to ``(C, C, kh, kw)``.

    ``K[c] = D[:, c*kh*kw + t0].reshape(C, kh, kw)`` with ``t0 = (kh//2)*kw + kw//2`` the
    centre tap: the "middle row/column of Cov^-0.5 reshaped into the kernel size" of
    Ye et al. 2020, §4.3.2 (Fig. 2; row and column agree for symmetric ``D``).  Correlating
    the zero-padded images with ``K`` (as a ``C -> C`` convolution weight) gives the
    centre column of every whitened patch, ``(X D)[:, c*kh*kw + t0]``; see
    :func:`deconvolve_image`.

    Parameters
    ----------
    D : array_like
        ``(F, F)``, a contiguous-block stack ``(G, Fb, Fb)`` (the bank is then block diagonal
        over channels) or a shared ``(Fb, Fb)`` with ``grouping="reference"``;
        ``F = channels * kh * kw``.
    kernel_size : int or (int, int)
        ``(kh, kw)``; for even sizes the centre tap is ``(kh//2, kw//2)``.
    channels : int
        ``C``.
    grouping : {"contiguous", "reference"}
        Layout of a block-shaped ``D`` (see :mod:`nsiter.whitening`).

    Returns
    -------
    K : ndarray, shape (C, C, kh, kw)
        ``K[c_out, c_in]``; dtype of ``D``.

    Examples
    --------
    >>> import numpy as np, nsiter
    >>> x = nsiter.data.sample_image(gray=True)
    >>> cov, _ = nsiter.patch_covariance(x, 5, sampling_stride=2)
    >>> K = nsiter.deconvolution_kernel(nsiter.inv_sqrtm(cov, method="eigh", eps=1e-5), 5, 1)
    >>> K.shape
    (1, 1, 5, 5)
    >>> bool(K[0, 0, 2, 2] > 0 > K[0, 0, 2, 1])  # centre-surround
    True
    """
    if is_tensor(D):
        return _torch_twin("deconvolution_kernel")(D, kernel_size, channels, grouping=grouping)
    Da = _prep(D, "D")
    channels = check_positive_int(channels, "channels")
    kh, kw, centres = _centre_columns(kernel_size, channels)
    layout = _Layout(Da, channels * kh * kw, None, grouping, what=f"im2col of {channels} channels with a "
                                                               f"{kh}x{kw} kernel")
    K = np.stack([layout.column(Da, int(j)) for j in centres])
    return K.reshape(channels, channels, kh, kw)


def deconvolve_image(x, kernel_size, *, eps=1e-5, method="coupled", n_iter=None, sampling_stride=1,
                     block_size=None, grouping="contiguous"):
    r"""The deconvolved image of Ye et al. 2020, Fig. 4: each pixel replaced by its whitened patch centre.

    .. math::

        y[n, c, h, w] = \big((X - \mu) D\big)_{(n, h, w),\ (c, t_0)}, \qquad
        X = \mathrm{im2col}(x, k, \text{padding} = k/2), \quad D \approx (\mathrm{Cov} + \varepsilon I)^{-1/2}

    with ``Cov, mu = patch_covariance(x, k, padding=k//2, sampling_stride=...)`` and
    ``D = inv_sqrtm(Cov, method=method, n_iter=n_iter, eps=eps)``.  Equivalently ``y`` is the
    correlation of the zero-padded, centred image with :func:`deconvolution_kernel` ``(D)``.

    Parameters
    ----------
    x : array_like, shape (N, C, H, W), (C, H, W) or (H, W)
    kernel_size : int or (int, int)
        Odd patch size (the output keeps the shape of ``x``).
    eps : float
        Ridge of the inverse square root (absolute, in the units of ``x`` squared).
    method, n_iter
        Passed to :func:`nsiter.inv_sqrtm` (``n_iter=None``: its default).
    sampling_stride, block_size, grouping
        Passed to :func:`nsiter.patch_covariance`.

    Returns
    -------
    y : ndarray
        Same shape as ``x``; float32 for float32 input, else float64.

    Raises
    ------
    ValueError
        Even kernel size, and everything :func:`nsiter.patch_covariance` / :func:`nsiter.inv_sqrtm` reject.

    Examples
    --------
    >>> import numpy as np, nsiter
    >>> x = nsiter.data.sample_image(gray=True)
    >>> y = nsiter.deconvolve_image(x, 5, method="eigh")
    >>> y.shape == x.shape
    True
    """
    if is_tensor(x):
        return _torch_twin("deconvolve_image")(x, kernel_size, eps=eps, method=method, n_iter=n_iter,
                                               sampling_stride=sampling_stride, block_size=block_size,
                                               grouping=grouping)
    from scipy.signal import correlate

    from .covariance import _channel_means, patch_covariance
    from .newton_schulz import inv_sqrtm

    arr = as_float_array(x, "x")
    kh, kw = as_pair(kernel_size, "kernel_size", minimum=1)
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(
            f"expected an odd kernel_size for deconvolve_image (its centre tap defines the output pixel), "
            f"got {(kh, kw)}; use {(kh | 1, kw | 1)}"
        )
    imgs = arr.reshape((1,) * (4 - arr.ndim) + arr.shape) if arr.ndim in (2, 3) else arr
    cov, mean = patch_covariance(imgs, (kh, kw), padding=(kh // 2, kw // 2), sampling_stride=sampling_stride,
                                 block_size=block_size, grouping=grouping)
    D = np.asarray(inv_sqrtm(cov.astype(np.float64), method=method, n_iter=n_iter, eps=eps))
    n, c, h, w = imgs.shape
    layout = _Layout(D, c * kh * kw, None, grouping)
    _, _, centres = _centre_columns((kh, kw), c)
    cols = np.stack([layout.column(D, int(j)) for j in centres], axis=1)  # (F, C)
    m_c = _channel_means(imgs)
    shift = np.repeat(m_c, kh * kw)
    bias = -(layout.full_mean(mean.astype(np.float64)) - shift) @ cols  # (C,)
    K = cols.T.reshape(c, c, kh, kw)
    ph, pw = kh // 2, kw // 2
    y = np.empty((n, c, h, w))
    for i in range(n):
        xs = np.empty((c, h + 2 * ph, w + 2 * pw))
        xs[...] = -m_c[:, None, None]
        xs[:, ph:ph + h, pw:pw + w] = imgs[i] - m_c[:, None, None]
        for co in range(c):
            acc = np.full((h, w), bias[co])
            for ci in range(c):
                acc += correlate(xs[ci], K[co, ci], mode="valid")
            y[i, co] = acc
    return y.astype(arr.dtype, copy=False).reshape(arr.shape)


def fold_deconvolution(weight, bias, D, mean, *, block_size=None, grouping="contiguous"):
    r"""Implicit deconvolution: fold ``D`` and ``mu`` into convolution weights (Ye et al. 2020, §4.5.1).

    .. math::

        y = (X - \mu) D w + b = X (D w) + (b - \mu D w) = X w' + b'

    for every output channel's flattened weight ``w`` (a column of length ``F``).  A plain
    correlation with ``(W', b')`` then equals whitening the im2col matrix with
    :func:`whiten` and correlating with ``(W, b)``.

    Parameters
    ----------
    weight : array_like, shape (C_out, C_in, kh, kw)
        Correlation weights (``torch.nn.Conv2d`` layout).  With a contiguous-block stack
        ``D (G, Fb, Fb)`` and ``C_in * kh * kw == Fb``, ``weight`` is read as a grouped
        convolution with ``groups = G`` (``C_out`` divisible by ``G``; output channel ``o``
        belongs to block ``o // (C_out / G)``), the grouped case of the reference code.
    bias : array_like, shape (C_out,), or None
        ``None`` is a zero bias (the folded bias is returned all the same).
    D, mean
        As for :func:`whiten`, for the im2col matrix of the layer's input.
    block_size, grouping
        As for :func:`whiten`.

    Returns
    -------
    weight_folded : ndarray, shape of ``weight``
    bias_folded : ndarray, shape (C_out,)
        In the common float dtype of the inputs.

    Examples
    --------
    >>> import numpy as np, nsiter
    >>> rng = np.random.default_rng(0)
    >>> x, w, b = rng.standard_normal((2, 4, 9, 9)), rng.standard_normal((3, 4, 3, 3)), rng.standard_normal(3)
    >>> cov, mean = nsiter.patch_covariance(x, 3, block_size=2, grouping="reference")
    >>> D = nsiter.inv_sqrtm(cov, method="eigh")
    >>> w2, b2 = nsiter.fold_deconvolution(w, b, D, mean, grouping="reference")
    >>> X = nsiter.im2col(x, 3)
    >>> explicit = nsiter.whiten(X, mean, D, grouping="reference") @ w.reshape(3, -1).T + b
    >>> bool(np.allclose(X @ w2.reshape(3, -1).T + b2, explicit))
    True
    """
    if is_tensor(weight, bias, D, mean):
        return _torch_twin("fold_deconvolution")(weight, bias, D, mean, block_size=block_size, grouping=grouping)
    Wa = _prep(weight, "weight")
    check_ndim(Wa, "weight", (4,), "(C_out, C_in, kh, kw)")
    check_nonempty(Wa, "weight")
    Da = _prep(D, "D")
    ma = _prep(mean, "mean")
    c_out = Wa.shape[0]
    ba = np.zeros(c_out, dtype=Wa.dtype) if bias is None else _prep(bias, "bias")
    if ba.shape != (c_out,):
        raise ValueError(f"expected bias of shape ({c_out},) for weight of shape {Wa.shape}, got {ba.shape}")
    dtype = np.result_type(Wa.dtype, Da.dtype, ma.dtype, ba.dtype)
    f_w = int(np.prod(Wa.shape[1:]))
    Wm = Wa.reshape(c_out, f_w).astype(dtype, copy=False)
    Dc = Da.astype(dtype, copy=False)
    grouped = Da.ndim == 3 and Da.shape[0] > 1 and Da.shape[-1] == f_w and grouping == "contiguous"
    if grouped:
        G = Da.shape[0]
        if c_out % G:
            raise ValueError(
                f"a grouped convolution with {G} groups (weight {Wa.shape} against D {Da.shape}) needs C_out "
                f"divisible by {G}, got {c_out}"
            )
        _Layout(Da, G * f_w, block_size, grouping, what="the layer input")
        if ma.shape not in ((G, f_w), (G * f_w,)):
            raise ValueError(f"expected mean of shape ({G}, {f_w}) or ({G * f_w},), got {ma.shape}")
        mg = ma.reshape(G, f_w).astype(dtype, copy=False)
        Wg = Wm.reshape(G, c_out // G, f_w)
        W2 = np.matmul(Wg, np.swapaxes(Dc, -1, -2))  # w'_o = D_g w_o
        b2 = ba.astype(dtype) - np.einsum("gof,gf->go", W2, mg).reshape(c_out)
        return W2.reshape(Wa.shape), b2
    layout = _Layout(Da, f_w, block_size, grouping, what=f"weight {Wa.shape}")
    mu = layout.full_mean(layout.mean(ma)).astype(dtype, copy=False)
    if layout.mode == "full":
        W2 = Wm @ Dc.T
    elif layout.mode == "contiguous":
        fb = layout.fb
        W2 = np.matmul(Wm.reshape(c_out, layout.groups, fb).transpose(1, 0, 2), np.swapaxes(Dc, -1, -2))
        W2 = W2.transpose(1, 0, 2).reshape(c_out, f_w)
    else:
        Wr = Wm.reshape(c_out, layout.fb, layout.groups)
        W2 = np.einsum("ef,ofg->oeg", Dc, Wr).reshape(c_out, f_w)
    b2 = ba.astype(dtype) - W2 @ mu
    return W2.reshape(Wa.shape), b2
