r"""Covariances of data matrices and of convolution patches (Ye et al. 2020, Algorithm 1).

``covariance(X)`` is the paper's ``Cov = (X - mu)^T (X - mu) / N`` of a samples x features
matrix.  ``patch_covariance(x, k, ...)`` is the same statistic for the im2col matrix of an
image batch, per channel block and on a subsampled patch grid (§4.5.2, Algorithm 1),
computed without materialising the im2col matrix.  ``PatchStatistics`` accumulates it
batch by batch and merges shards exactly.

Each function is written once for numpy arrays and torch tensors: validation, the block plan
(:mod:`nsiter._moments`), the exact merge and the final scaling are here; the moments
themselves come from the backend's kernels (``backend(x).patches``): for numpy the float64
Numba/BLAS kernels of :mod:`nsiter._numba.patches` (three kernels and a cost model that
picks one; no ``E[x x^T] - mu mu^T`` cancellation), for torch the chunked two-pass
statistics of :mod:`nsiter._torch.patches` on the tensor's device, differentiable.
"""
from __future__ import annotations

import math

import numpy as np

from ._backend import backend
from ._conventions import as_images, geometry
from ._moments import merge_moments, plan as _plan
from ._validation import (
    as_float_array,
    as_pair,
    check_finite,
    check_ndim,
    check_nonempty,
    check_nonnegative_float,
    check_option,
    check_positive_int,
    is_tensor,
)

__all__ = ["GROUPINGS", "covariance", "patch_covariance", "PatchStatistics"]

#: Channel groupings of ``patch_covariance`` / ``PatchStatistics`` (``block_size`` given).
GROUPINGS = ("contiguous", "reference")


def _check_finite_fast(arr, name: str) -> None:
    """``check_finite`` in one pass without a boolean temporary (arrays and tensors).

    The sum of the array is finite unless it holds NaN/inf or overflows; only then is the
    exact (element-wise) check run, so huge but finite data is still accepted.
    """
    if math.prod(arr.shape) and not math.isfinite(float((arr.detach() if is_tensor(arr) else arr).sum())):
        check_finite(arr, name)


def _check_block(block_size, c: int):
    if block_size is None:
        return None
    block_size = check_positive_int(block_size, "block_size")
    if c % block_size:
        fix = math.gcd(block_size, c)
        raise ValueError(
            f"block_size {block_size} does not divide the {c} channels of x; "
            f"use block_size={fix} (gcd({block_size}, {c})) or another divisor of {c}"
        )
    return block_size



def _sampled_geometry(shape4, kernel_size, stride, padding, dilation, sampling_stride):
    s = check_positive_int(sampling_stride, "sampling_stride")
    sh, sw = as_pair(stride, "stride", minimum=1)
    return geometry(shape4, kernel_size, (sh * s, sw * s), padding, dilation)



def _finish(be, stats, plan, eps: float, dtype):
    """``(M2 / n + eps I, mean)`` in ``dtype``, shaped as the plan's public result."""
    n, mean, m2 = stats
    xp = be.xp
    cov = xp.astype(m2 / n, dtype, copy=False)
    if eps:
        cov = cov + eps * be.eye(cov.shape[-1], cov)
    mean = xp.astype(mean, dtype, copy=False)
    if plan is None or plan.mode == "contiguous":
        return cov, mean
    return cov[0], mean[0]



# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------

def covariance(X, *, eps=0.0):
    r"""Covariance and mean of a samples x features matrix, with the paper's 1/N normalisation.

    .. math::

        \mu = \frac{1}{N} \sum_r X_{r,:}, \qquad
        \mathrm{Cov} = \frac{1}{N} (X - \mu)^T (X - \mu) + \varepsilon I

    (Ye et al. 2020, §4.2; ``eps`` is the ridge of Algorithm 1, line 8).

    Parameters
    ----------
    X : array_like, shape (N, F)
        Rows are samples, columns features.  Never modified.
    eps : float, optional
        Ridge added to the diagonal (``>= 0``).

    Returns
    -------
    cov : ndarray, shape (F, F)
        Symmetric.  float32 for float32/float16 input, float64 otherwise.
    mean : ndarray, shape (F,)
        Same dtype as ``cov``.

    Raises
    ------
    ValueError
        ``X`` not 2-D, empty, holding NaN/inf, or a negative ``eps``.
    TypeError
        Complex or non-numeric ``X``.

    Notes
    -----
    numpy: chunks of rows shifted by the mean of a row sample (each chunk augmented by a
    column of ones) are multiplied by BLAS and summed in float64, then corrected exactly for
    the shift (``M2 = S_2 - s s^T / N``): the extra memory is a few MB whatever ``N``, and
    there is no ``E[x x^T] - mu mu^T`` cancellation.  For float32 input with ``F >= 64`` the
    product of one chunk (at most 2048 rows) runs in float32 BLAS, which keeps float32 speed
    at about 1e-6 relative accuracy; float64 input is float64 throughout.  torch tensors: the
    two-pass (centred) product in the input dtype on the tensor's device, differentiable.

    Examples
    --------
    >>> import numpy as np, nsiter
    >>> X = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> cov, mean = nsiter.covariance(X)
    >>> cov
    array([[1., 2.],
           [2., 4.]])
    >>> mean
    array([2., 4.])
    """
    arr = as_float_array(X, "X")
    check_ndim(arr, "X", (2,), "(n_samples, n_features); for one feature use X[:, None]")
    check_nonempty(arr, "X")
    eps = check_nonnegative_float(eps, "eps")
    _check_finite_fast(arr, "X")
    be = backend(arr)
    with be.precision(arr):
        stats = be.patches.matrix_moments(arr)
    return _finish(be, stats, None, eps, arr.dtype)


def patch_covariance(x, kernel_size, *, stride=1, padding=0, dilation=1, sampling_stride=1,
                     block_size=None, grouping="contiguous", eps=0.0):
    r"""Covariance of the im2col matrix of an image batch (Ye et al. 2020, Algorithm 1).

    With ``X = im2col(x, kernel_size, stride=stride*sampling_stride, padding=padding,
    dilation=dilation)`` (one row per patch, ``F = C*kh*kw`` columns) this returns

    .. math::

        \mathrm{Cov} = \frac{1}{N} (X - \mu)^T (X - \mu) + \varepsilon I, \qquad
        \mu = \frac{1}{N} \sum_r X_{r,:}

    per channel block, without materialising ``X``.  ``sampling_stride = S`` is the
    subsampling of §4.5.2: patches on a grid of step ``S*stride`` from offset 0, as in the
    reference implementation (``S^2`` times fewer rows).

    Parameters
    ----------
    x : array_like, shape (N, C, H, W), (C, H, W) or (H, W)
        Channels-first images (never modified).
    kernel_size, stride, padding, dilation : int or (int, int)
        As in :func:`nsiter.im2col` (zero padding).
    sampling_stride : int, optional
        Subsampling factor ``S >= 1`` of the patch grid.
    block_size : int, optional
        Channels per block ``B`` (must divide ``C``).  ``None``: one ``F x F`` covariance.
    grouping : {"contiguous", "reference"}, optional
        How channels form blocks when ``block_size`` is given (see Notes).  Ignored for
        ``block_size=None`` (but still validated).
    eps : float, optional
        Ridge ``eps * I`` added to each returned covariance.

    Returns
    -------
    cov : ndarray
        ``(F, F)`` for ``block_size=None``; ``(G, Fb, Fb)`` for ``"contiguous"`` with
        ``G = C/B`` and ``Fb = B*kh*kw``; ``(Fb, Fb)`` for ``"reference"``.
    mean : ndarray
        ``(F,)``, ``(G, Fb)`` or ``(Fb,)`` accordingly.  float32 for float32/float16 input,
        float64 otherwise.

    Raises
    ------
    ValueError
        Wrong ndim or empty ``x``, NaN/inf in ``x``, kernel larger than the padded image,
        non-positive stride/dilation/sampling_stride, negative padding or ``eps``,
        ``block_size`` not dividing ``C`` (the message names ``gcd(B, C)``), unknown
        ``grouping`` (the message lists :data:`GROUPINGS`).
    TypeError
        Complex input, non-integer sizes.

    Notes
    -----
    **Groupings.**  ``"contiguous"``: channels ``[gB, (g+1)B)`` form block ``g``, whose
    covariance is that of ``im2col(x[:, gB:(g+1)B])`` (columns ``c*kh*kw + i*kw + j`` within
    the block); this is also the statistic of a grouped convolution with ``groups = G``.
    ``"reference"``: the grouping of the paper's reference code (FastDeconv, groups=1):
    im2col column ``j`` goes to group ``j mod G`` at feature ``j div G``, and the ``G`` groups
    are stacked as extra rows, so ONE covariance of ``Fb x Fb`` is shared by all groups and
    ``N = G * patches``.  Its blocks interleave channels and taps (group ``g`` holds columns
    ``g, g + G, g + 2G, ...``), and the shared matrix averages the groups' second moments
    about the common mean; ``"contiguous"`` keeps one exact covariance per channel block.
    With ``B = C`` both equal the full covariance (``"contiguous"`` keeps a leading axis of 1).

    **Cost.**  The im2col matrix is never built.  numpy: a cost model picks one of three
    kernels (:mod:`nsiter._numba.patches`): shifted patch rows in chunks of at most 8 MB times
    BLAS (any geometry); BLAS products of 1-row patch matrices, one per row shift (vertical
    step 1; pieces of at most 32 MB); or shifted inner products of the image with itself,
    ``O(C^2 k^2 HW)`` instead of ``O(C^2 k^4 HW)`` (step 1; padded, shifted float64 copies of
    at most 32 MB).  Beyond those pieces the extra memory is the ``G (Fb+1)^2`` float64
    accumulators.  All accumulate in float64 about a per-feature shift and agree to rounding.
    torch tensors: im2col chunks of at most 64 Mi elements on the tensor's device; one chunk
    is the two-pass computation in the input dtype (differentiable), several are merged
    exactly in float64.

    Examples
    --------
    >>> import numpy as np, nsiter
    >>> x = np.random.default_rng(0).standard_normal((2, 4, 16, 16))
    >>> cov, mean = nsiter.patch_covariance(x, 3, padding=1)
    >>> cov.shape, mean.shape
    ((36, 36), (36,))
    >>> np.allclose(cov, nsiter.covariance(nsiter.im2col(x, 3, padding=1))[0])
    True
    >>> cov, mean = nsiter.patch_covariance(x, 3, padding=1, block_size=2)
    >>> cov.shape
    (2, 18, 18)
    >>> cov, mean = nsiter.patch_covariance(x, 3, block_size=2, grouping="reference", sampling_stride=2)
    >>> cov.shape
    (18, 18)
    """
    arr = as_float_array(x, "x")
    imgs = as_images(arr, "x")
    check_nonempty(imgs, "x")
    check_option(grouping, "grouping", GROUPINGS)
    eps = check_nonnegative_float(eps, "eps")
    g = _sampled_geometry(imgs.shape, kernel_size, stride, padding, dilation, sampling_stride)
    block_size = _check_block(block_size, g.c)
    _check_finite_fast(imgs, "x")
    plan = _plan(g.c, g.kh * g.kw, block_size, grouping)
    be = backend(imgs)
    with be.precision(imgs):
        stats = be.patches.patch_moments(imgs, g, plan)
    return _finish(be, stats, plan, eps, arr.dtype)


def _host64(be, a) -> np.ndarray:
    """A float64 host copy (never a kernel's work buffer, never attached to a graph)."""
    return np.array(be.host(a), dtype=np.float64)


class PatchStatistics:
    r"""Streaming patch covariance: update batch by batch, merge shards, read ``(cov, mean)``.

    Holds the count, the float64 mean and the float64 centred second moment
    ``M2 = sum_r (x_r - mu)(x_r - mu)^T`` of the (grouped) im2col rows seen so far.  Batches
    and shards combine with the pairwise update of Chan, Golub & LeVeque
    (``M2 = M2_a + M2_b + n_a n_b / n * d d^T``, ``d = mu_b - mu_a``), so the statistics of
    several updates (or of merged accumulators from other processes) equal the one-shot
    :func:`patch_covariance` of the concatenated batch up to rounding (~1e-15 relative).

    Parameters
    ----------
    kernel_size, stride, padding, dilation, sampling_stride, block_size, grouping
        As in :func:`patch_covariance`; fixed for the lifetime of the accumulator.

    Attributes
    ----------
    count : int
        Samples seen: patches for ``block_size=None`` / ``"contiguous"``, patches times
        ``C/B`` for ``"reference"`` (the stacked rows).
    channels : int or None
        ``C``, fixed by the first update (``None`` before).
    dtype : numpy.dtype or None
        Output dtype: float32 while every update was float32/float16, else float64.

    Examples
    --------
    >>> import numpy as np, nsiter
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.standard_normal((2, 3, 3, 20, 20))
    >>> stats = nsiter.PatchStatistics(5, padding=2).update(a).update(b)
    >>> cov, mean = stats.covariance(eps=1e-5)
    >>> ref, _ = nsiter.patch_covariance(np.concatenate([a, b]), 5, padding=2, eps=1e-5)
    >>> bool(np.allclose(cov, ref, rtol=1e-12, atol=1e-14))
    True
    """

    _device_moments = False  # tensors: moments by the numpy kernels on a host copy

    def __init__(self, kernel_size, *, stride=1, padding=0, dilation=1, sampling_stride=1,
                 block_size=None, grouping="contiguous"):
        self.kernel_size = as_pair(kernel_size, "kernel_size", minimum=1)
        self.stride = as_pair(stride, "stride", minimum=1)
        self.padding = as_pair(padding, "padding", minimum=0)
        self.dilation = as_pair(dilation, "dilation", minimum=1)
        self.sampling_stride = check_positive_int(sampling_stride, "sampling_stride")
        self.block_size = None if block_size is None else check_positive_int(block_size, "block_size")
        self.grouping = check_option(grouping, "grouping", GROUPINGS)
        self.channels = None
        self.dtype = None
        self._plan = None
        self._stats = None  # (count, mean (G, fb), M2 (G, fb, fb)) in float64, on the host

    def _settings(self) -> dict:
        return {"kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "dilation": self.dilation, "sampling_stride": self.sampling_stride,
                "block_size": self.block_size, "grouping": self.grouping}

    @property
    def count(self) -> int:
        return 0 if self._stats is None else int(self._stats[0])

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._settings().items())
        return f"PatchStatistics({args}; channels={self.channels}, count={self.count})"

    def update(self, x):
        """Add the patches of an image batch ``x`` ((N, C, H, W), (C, H, W) or (H, W)); returns ``self``.

        torch tensors are copied to host memory and go through the numpy kernels
        (:class:`nsiter.torch.PatchStatistics` computes the moments on the tensor's device
        instead); the statistics are float64 numpy arrays either way.  Validation as in
        :func:`patch_covariance`; a failed update leaves ``self`` unchanged.
        """
        arr = as_float_array(x, "x")
        if is_tensor(arr) and not self._device_moments:
            arr = backend(arr).host(arr)
        imgs = as_images(arr, "x")
        check_nonempty(imgs, "x")
        g = _sampled_geometry(imgs.shape, self.kernel_size, self.stride, self.padding, self.dilation,
                              self.sampling_stride)
        if self.channels is not None and g.c != self.channels:
            raise ValueError(
                f"expected images with {self.channels} channels (fixed by the first update), got {g.c}; "
                "use one PatchStatistics per channel count"
            )
        block = _check_block(self.block_size, g.c)
        _check_finite_fast(imgs, "x")
        plan = self._plan if self._plan is not None else _plan(g.c, g.kh * g.kw, block, self.grouping)
        be = backend(imgs)
        with be.precision(imgs):
            n, mean, m2 = be.patches.patch_moments(imgs, g, plan)
        stats = (n, _host64(be, mean), _host64(be, m2))
        self._stats = stats if self._stats is None else merge_moments(self._stats, stats)
        self.channels, self._plan = g.c, plan
        dtype = np.dtype(f"float{8 * arr.itemsize}")  # float32 / float64 (as_float_array), also for tensors
        self.dtype = dtype if self.dtype is None else np.promote_types(self.dtype, dtype)
        return self

    def merge(self, other: "PatchStatistics"):
        """Add the statistics of another accumulator with the same settings, in place; returns ``self``."""
        if not isinstance(other, PatchStatistics):
            raise TypeError(f"expected a PatchStatistics to merge, got {type(other).__name__}")
        mine, theirs = self._settings(), other._settings()
        diff = [f"{k}: {mine[k]!r} vs {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]
        if diff:
            raise ValueError(
                "cannot merge PatchStatistics with different settings (" + "; ".join(diff) + "); "
                "accumulate shards with identical kernel_size, stride, padding, dilation, "
                "sampling_stride, block_size and grouping"
            )
        if other._stats is None:
            return self
        if self.channels is not None and other.channels != self.channels:
            raise ValueError(
                f"cannot merge statistics of {other.channels}-channel images into an accumulator of "
                f"{self.channels}-channel images; use one PatchStatistics per channel count"
            )
        if self._stats is None:
            self.channels, self._plan, self.dtype = other.channels, other._plan, other.dtype
            n, mean, m2 = other._stats
            self._stats = (n, mean.copy(), m2.copy())
            return self
        self.dtype = np.promote_types(self.dtype, other.dtype)
        self._stats = merge_moments(self._stats, other._stats)
        return self

    def covariance(self, eps=0.0):
        """``(cov, mean)`` of everything seen, shaped as :func:`patch_covariance` returns them."""
        eps = check_nonnegative_float(eps, "eps")
        if self._stats is None:
            raise ValueError("PatchStatistics has seen no data (count 0); call update(x) or merge(other) first")
        return _finish(backend(), self._stats, self._plan, eps, self.dtype)
