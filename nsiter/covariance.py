r"""Covariances of data matrices and of convolution patches (Ye et al. 2020, Algorithm 1).

Validation, the block plan (:mod:`nsiter._moments`), the merge and the final scaling are written
once here for arrays and tensors; the moments come from ``backend(x).patches``
(:mod:`nsiter._numba.patches` or :mod:`nsiter._torch.patches`).
"""
from __future__ import annotations

import math
import os
import sys
import zipfile

import numpy as np

from ._backend import backend
from ._conventions import as_images, check_budget, geometry
from ._moments import merge_moments, plan as _plan
from ._validation import (as_float_array, as_pair, check_finite, check_ndim, check_nonempty, check_nonnegative_float,
                          check_option, check_positive_int, is_tensor)

__all__ = ["GROUPINGS", "covariance", "patch_covariance", "PatchStatistics"]

#: Channel groupings of ``patch_covariance`` / ``PatchStatistics`` (``block_size`` given).
GROUPINGS = ("contiguous", "reference")

#: The ``format`` string and version of the ``.npz`` shards of :meth:`PatchStatistics.save`.
SHARD_FORMAT, SHARD_VERSION = "nsiter.PatchStatistics", 1
#: The keys of a shard: ``format``, ``version``; the settings ``kernel_size``, ``stride``, ``padding``,
#: ``dilation`` (int64 (h, w) pairs), ``sampling_stride``, ``block_size`` (0: none), ``grouping`` (str);
#: ``channels`` (-1: nothing seen), ``dtype`` (``covariance()``'s result dtype, '' when empty),
#: ``count`` (rows seen); when ``count > 0`` the block layout ``layout`` ("full", "contiguous" or
#: "reference"), ``groups``, ``stack``, ``block_features`` and the float64 moments ``moments_mean``
#: ``(G, Fb)`` and ``moments_m2`` ``(G, Fb, Fb)`` (centred, unnormalised).
SHARD_KEYS = ("format", "version", "kernel_size", "stride", "padding", "dilation", "sampling_stride", "block_size",
              "grouping", "channels", "dtype", "count", "layout", "groups", "stack", "block_features",
              "moments_mean", "moments_m2")


def write_npz_atomic(path, arrays: dict) -> None:
    """``np.savez(path, **arrays)`` through a temporary file in ``path``'s folder, renamed into place
    (``os.replace``): readers see the old file or the complete new one, never a half-written one.
    The temporary file is removed if writing fails; the new file gets the permissions of a plain open."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, as for open(path, "w")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _check_finite_fast(arr, name: str) -> None:
    """``check_finite`` in one pass without a boolean temporary: the sum is finite unless the data holds
    NaN/inf or overflows, and only then runs the exact check (huge but finite data passes)."""
    if math.prod(arr.shape) and not math.isfinite(float((arr.detach() if is_tensor(arr) else arr).sum())):
        check_finite(arr, name)


def _scale_exponent(arr, name: str, dtype=None) -> int:
    """``e`` such that ``arr * 2**-e`` has magnitude in ``[1/2, 1)``, or 0 when ``max |arr|`` lies in
    ``[2**(minexp/4), 2**(maxexp/4)]`` of its dtype (float64: 2**+-256, float32: 2**+-32; ``dtype``: the
    computation's, if not ``arr``'s), where no second moment over- or underflows.  Finiteness is checked
    on the way (NaN and inf propagate through max and min; only then does the exact check count them)."""
    if is_tensor(arr):
        lo, hi = sys.modules["torch"].stack(sys.modules["torch"].aminmax(arr.detach())).tolist()
    else:
        lo, hi = float(arr.min()), float(arr.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        check_finite(arr, name)
    amax, fi = max(-lo, hi), _finfo(np.dtype(dtype) if dtype is not None else arr.dtype)
    if amax == 0.0 or 2.0 ** (fi.minexp // 4) <= amax <= 2.0 ** (fi.maxexp // 4):
        return 0
    return math.frexp(amax)[1]


def _moments(compute, arr, name: str):
    """``(compute(arr * 2**-e), e)``: moments ``(n, mean, M2)`` of data scaled by an exact power of two.

    ``e = 0`` unless the plain moments left ``[2**(minexp/2), 2**(maxexp/2)]`` of the dtype (or were
    0): only then is the data's magnitude taken (:func:`_scale_exponent`) and, if it is extreme, the
    moments computed again on scaled data.  Scaling by a power of two is exact, so ordinary data costs
    nothing and scaled moments, scaled back, are those of the data."""
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        stats = compute(arr)
        m2 = stats[2]
        # M2 is positive semidefinite, so |M2_ij| <= sqrt(M2_ii M2_jj) <= max_i M2_ii: the diagonal
        # bounds every entry (and overflows or turns NaN first), at O(F) instead of O(F^2)
        d = m2.diagonal(0, -2, -1)
        top = float(abs(d.detach() if is_tensor(d) else d).max()) / stats[0]
        fi = _finfo(arr.dtype)
        if 2.0 ** (fi.minexp // 2) <= top <= 2.0 ** (fi.maxexp // 2):  # False for inf and NaN
            return stats, 0
        e = _scale_exponent(arr, name)
        return (compute(_ldexp(arr, -e)), e) if e else (stats, 0)


def _finfo(dtype):
    """``np.finfo`` of a float32/float64 numpy or torch dtype."""
    return np.finfo(np.float32 if dtype.itemsize == 4 else np.float64)


def _ldexp(a, k: int):
    """``a * 2**k`` for arrays or tensors, in two exactly representable factors (``|k|`` up to 2300)."""
    return a * 2.0 ** (k // 2) * 2.0 ** (k - k // 2)


def _unscale(m, k: int, dtype, what: str):
    """``m * 2**k`` (``m`` finite), refused with a ``ValueError`` when its largest entry would over- or
    underflow ``dtype`` (an underflow would pass for exact zeros)."""
    amax = float(abs(m.detach() if is_tensor(m) else m).max())
    if amax:
        fi = _finfo(dtype)
        expo = math.frexp(amax)[1] + k
        if expo > fi.maxexp or expo <= fi.minexp:
            over = expo > fi.maxexp
            hint = " or pass float64 data" if fi.bits == 32 else ""
            raise ValueError(
                f"{what} has entries of magnitude ~1e{math.log10(amax) + k * math.log10(2):.0f}, "
                f"{'beyond the largest' if over else 'below the smallest normal'} {fi.dtype} "
                f"({float(fi.max if over else fi.tiny):.3g}): it would "
                f"{'overflow to inf' if over else 'underflow to 0'}; "
                f"rescale the data (e.g. x * 2**{-(expo // 2)}, the second moments scale by its square){hint}")
    return _ldexp(m, k)


def _sampled_geometry(shape4, kernel_size, stride, padding, dilation, sampling_stride):
    s = check_positive_int(sampling_stride, "sampling_stride")
    sh, sw = as_pair(stride, "stride", minimum=1)
    return geometry(shape4, kernel_size, (sh * s, sw * s), padding, dilation)


def _patch_grid(imgs, settings, block_size, channels=None):
    """``(geometry, block_size)`` of images, values and budget checked; ``settings`` as :func:`_sampled_geometry`."""
    g = _sampled_geometry(imgs.shape, *settings)
    if channels is not None and g.c != channels:
        raise ValueError(f"expected images with {channels} channels (fixed by the first update), got {g.c}; "
                         "use one PatchStatistics per channel count")
    if block_size is not None:
        block_size = check_positive_int(block_size, "block_size")
        if g.c % block_size:
            raise ValueError(f"block_size {block_size} does not divide the {g.c} channels of x; "
                             f"use block_size={math.gcd(block_size, g.c)} (gcd({block_size}, {g.c})) "
                             f"or another divisor of {g.c}")
    fb = (block_size or g.c) * g.kh * g.kw
    check_budget(g.n * g.n_patches * g.n_features, "MAX_WORK", f"the patch statistics of {g.n * g.n_patches} patches "
                 f"of {g.n_features} features", "pass fewer images per call (PatchStatistics.update batch by batch), "
                 "a larger sampling_stride or less padding")
    check_budget(g.c // (block_size or g.c) * fb * fb, "MAX_ELEMENTS", f"the {fb} x {fb} covariance blocks",
                 "use a smaller kernel_size or block_size")
    _check_finite_fast(imgs, "x")
    return g, block_size


def _merged(a, b):
    """:func:`merge_moments` of host statistics, refused if the merged second moment overflows float64."""
    out = merge_moments(a, b)
    if not np.isfinite(out[2]).all():
        raise ValueError("the merged second moment overflows float64; rescale the data before accumulating "
                         "(the second moments scale with its square)")
    return out


def _finish(be, stats, plan, eps: float, dtype, e: int = 0, check: bool = False):
    """``(M2 / n + eps I, mean)`` in ``dtype``, shaped as the plan's public result, from the moments of the
    data scaled by ``2**-e``; with ``e`` or ``check``, refused if the covariance leaves ``dtype``'s range.
    Always fresh arrays, never the caller's statistics."""
    n, mean, m2 = stats
    xp = be.xp
    if isinstance(m2, np.ndarray) and not (e or check):  # one pass: divided in float64, rounded once
        cov = np.divide(m2, n, out=np.empty(m2.shape, dtype), casting="same_kind")
    else:
        cov = m2 / n
        if e or check:
            cov, mean = _unscale(cov, 2 * e, dtype, "the covariance"), _ldexp(mean, e)
        cov = xp.astype(cov, dtype, copy=False)
    if eps:
        cov = cov + eps * be.eye(cov.shape[-1], cov)
    mean = xp.astype(mean, dtype, copy=True)
    if plan is None or plan.mode == "contiguous":
        return cov, mean
    return cov[0], mean[0]


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
    cov, mean : ndarray, shapes (F, F) and (F,)
        float32 for float32/float16 input, float64 otherwise.

    Raises
    ------
    ValueError
        ``X`` not 2-D, empty, holding NaN/inf, a negative ``eps``, ``F**2`` beyond
        :data:`nsiter._conventions.MAX_ELEMENTS`, or a covariance that over- or underflows the
        result dtype (the message names the magnitude; for float32, float64 input is the fix).
    TypeError
        Complex, non-numeric or masked ``X``.

    Notes
    -----
    Accumulated in float64 about a shift, without ``E[x x^T] - mu mu^T`` cancellation
    (:mod:`nsiter._numba.patches`); float32 with ``F >= 64`` runs its BLAS products in float32
    (about 1e-6 relative).  torch: two-pass in the input dtype on the device, differentiable.
    Moments that leave the safe part of the dtype's range are recomputed from data scaled by an exact
    power of two and scaled back, so the result is right at every scale it can be represented at.

    Examples
    --------
    >>> import numpy as np, nsiter
    >>> nsiter.covariance(np.array([[1.0, 2.0], [3.0, 6.0]]))[0]
    array([[1., 2.],
           [2., 4.]])
    """
    arr = as_float_array(X, "X")
    check_ndim(arr, "X", (2,), "(n_samples, n_features); for one feature use X[:, None]")
    check_nonempty(arr, "X")
    eps = check_nonnegative_float(eps, "eps")
    check_budget(arr.shape[1] ** 2, "MAX_ELEMENTS", f"the covariance of {arr.shape[1]} features",
                 "pass fewer features (columns), or samples as rows (X.T)")
    _check_finite_fast(arr, "X")
    be = backend(arr)
    with be.precision(arr):
        stats, e = _moments(be.patches.matrix_moments, arr, "X")
    return _finish(be, stats, None, eps, arr.dtype, e)


def patch_covariance(x, kernel_size, *, stride=1, padding=0, dilation=1, sampling_stride=1,
                     block_size=None, grouping="contiguous", eps=0.0):
    r"""Covariance of the im2col matrix of an image batch (Ye et al. 2020, Algorithm 1).

    ``Cov = (X - mu)^T (X - mu) / N + eps I`` (:func:`covariance`) of ``X = im2col(x, kernel_size,
    stride=stride*sampling_stride, padding=padding, dilation=dilation)`` per channel block, without
    materialising ``X``.
    ``sampling_stride = S`` is the subsampling of §4.5.2: patches on a grid of step ``S*stride``
    from offset 0, as in the reference implementation (``S^2`` times fewer rows).

    Parameters
    ----------
    x : array_like, shape (N, C, H, W), (C, H, W) or (H, W)
    kernel_size, stride, padding, dilation : int or (int, int)
        As in :func:`nsiter.im2col`.
    sampling_stride : int, optional
        Subsampling factor ``S >= 1`` of the patch grid.
    block_size : int, optional
        Channels per block ``B`` (must divide ``C``).  ``None``: one ``F x F`` covariance.
    grouping : {"contiguous", "reference"}, optional
        How channels form blocks when ``block_size`` is given (see Notes); validated even if not.
    eps : float, optional
        Ridge ``eps * I`` added to each returned covariance.

    Returns
    -------
    cov, mean : ndarray
        ``(F, F), (F,)`` for ``block_size=None``; ``(G, Fb, Fb), (G, Fb)`` for ``"contiguous"``
        (``G = C/B``, ``Fb = B*kh*kw``); ``(Fb, Fb), (Fb,)`` for ``"reference"``.  dtype as
        :func:`covariance`.

    Raises
    ------
    ValueError, TypeError
        As :func:`nsiter.im2col` and :func:`covariance`; also ``block_size`` not dividing ``C``
        (the message names ``gcd(B, C)``), an unknown ``grouping`` (listing :data:`GROUPINGS`), and
        ``N * L * F`` patch entries beyond :data:`nsiter._conventions.MAX_WORK` (before any work).

    Notes
    -----
    **Groupings.**  ``"contiguous"``: channels ``[gB, (g+1)B)`` form block ``g``, whose
    covariance is that of ``im2col(x[:, gB:(g+1)B])``, the statistic of a grouped convolution
    with ``groups = G``.  ``"reference"``: the grouping of the paper's reference code
    (FastDeconv, groups=1): im2col column ``j`` goes to group ``j mod G`` at feature ``j div G``
    and the groups are stacked as extra rows, so ONE ``Fb x Fb`` covariance (``N = G *
    patches``) is shared by groups that interleave channels and taps, averaging their second
    moments about the common mean.  With ``B = C`` both equal the full covariance.

    **Cost.**  numpy: pieces of at most 8-32 MB, for stride 1 down to ``O(C^2 k^2 HW)`` instead
    of ``O(C^2 k^4 HW)`` (:mod:`nsiter._numba.patches`); torch: im2col chunks of at most 64 Mi
    elements (:mod:`nsiter._torch.patches`).

    Examples
    --------
    >>> import numpy as np, nsiter
    >>> x = np.random.default_rng(0).standard_normal((2, 4, 16, 16))
    >>> cov, mean = nsiter.patch_covariance(x, 3, padding=1)
    >>> np.allclose(cov, nsiter.covariance(nsiter.im2col(x, 3, padding=1))[0])
    True
    >>> nsiter.patch_covariance(x, 3, block_size=2, grouping="reference", sampling_stride=2)[0].shape
    (18, 18)
    """
    arr = as_float_array(x, "x")
    imgs = as_images(arr, "x")
    check_nonempty(imgs, "x")
    check_option(grouping, "grouping", GROUPINGS)
    eps = check_nonnegative_float(eps, "eps")
    g, block_size = _patch_grid(imgs, (kernel_size, stride, padding, dilation, sampling_stride), block_size)
    plan = _plan(g.c, g.kh * g.kw, block_size, grouping)
    be = backend(imgs)
    with be.precision(imgs):
        stats, e = _moments(lambda a: be.patches.patch_moments(a, g, plan), imgs, "x")
    return _finish(be, stats, plan, eps, arr.dtype, e)


class PatchStatistics:
    r"""Streaming patch covariance: update batch by batch, merge shards, read ``(cov, mean)``.

    Holds the count, float64 mean and float64 centred second moment ``M2 = sum_r (x_r - mu)(x_r
    - mu)^T`` of the (grouped) im2col rows seen, combined by the pairwise update of Chan, Golub &
    LeVeque (:func:`nsiter._moments.merge_moments`): updates, or accumulators merged from other
    processes, equal the one-shot :func:`patch_covariance` of the concatenation up to rounding.
    :meth:`save` / :meth:`load` write and read it as an ``.npz`` shard (plain arrays, no pickle), so
    statistics computed anywhere merge exactly (:func:`nsiter.dataset_statistics` on Dask).

    Parameters
    ----------
    kernel_size, stride, padding, dilation, sampling_stride, block_size, grouping
        As in :func:`patch_covariance`; fixed for the lifetime of the accumulator.

    Attributes
    ----------
    count : int
        Rows seen: patches, times ``C/B`` for ``"reference"`` (the stacked rows).
    channels, dtype : int, numpy.dtype or None
        ``C`` (fixed by the first update); float32 while every update was float32/float16.

    Examples
    --------
    >>> import numpy as np, nsiter
    >>> a, b = np.random.default_rng(0).standard_normal((2, 3, 3, 20, 20))
    >>> cov, mean = nsiter.PatchStatistics(5, padding=2).update(a).update(b).covariance(eps=1e-5)
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
        """Add the patches of an image batch ``x``; returns ``self`` (unchanged if validation fails).

        Tensors go through the numpy kernels on a host copy (:class:`nsiter.torch.PatchStatistics`:
        on the device); the statistics are float64 numpy arrays."""
        arr = as_float_array(x, "x")
        if is_tensor(arr) and not self._device_moments:
            arr = backend(arr).host(arr)
        imgs = as_images(arr, "x")
        check_nonempty(imgs, "x")
        settings = (self.kernel_size, self.stride, self.padding, self.dilation, self.sampling_stride)
        g, block = _patch_grid(imgs, settings, self.block_size, self.channels)
        plan = self._plan if self._plan is not None else _plan(g.c, g.kh * g.kw, block, self.grouping)
        be = backend(imgs)
        with be.precision(imgs):
            (n, mean, m2), e = _moments(lambda a: be.patches.patch_moments(a, g, plan), imgs, "x")
        # float64 host copies: never a kernel's work buffer, never attached to a graph
        mean, m2 = np.array(be.host(mean), dtype=np.float64), np.array(be.host(m2), dtype=np.float64)
        stats = (n, _ldexp(mean, e), _unscale(m2, 2 * e, np.float64, "the second moment of x")) if e else (n, mean, m2)
        self._stats = stats if self._stats is None else _merged(self._stats, stats)
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
            raise ValueError("cannot merge PatchStatistics with different settings (" + "; ".join(diff) + "); "
                             "accumulate shards with identical kernel_size, stride, padding, dilation, "
                             "sampling_stride, block_size and grouping")
        if other._stats is None:
            return self
        if self.channels is not None and other.channels != self.channels:
            raise ValueError(f"cannot merge statistics of {other.channels}-channel images into an accumulator of "
                             f"{self.channels}-channel images; use one PatchStatistics per channel count")
        if self._stats is None:
            self.channels, self._plan, self.dtype = other.channels, other._plan, other.dtype
            self._stats = (other._stats[0], other._stats[1].copy(), other._stats[2].copy())
            return self
        self._stats = _merged(self._stats, other._stats)
        self.dtype = np.promote_types(self.dtype, other.dtype)
        return self

    def save(self, path) -> None:
        """Write the accumulator to ``path`` as an ``.npz`` shard that :meth:`load` reads back bit for bit.

        Plain arrays only (no pickle; keys in :data:`SHARD_KEYS`): the settings, the channel count,
        the result dtype, the block layout, the count and the float64 moments.  The file is written
        under a temporary name in the same folder and renamed, so ``path`` is never half-written;
        ``path`` is used as given (no ``.npz`` is appended)."""
        write_npz_atomic(path, self._to_arrays())

    @classmethod
    def load(cls, path) -> "PatchStatistics":
        """Read a shard written by :meth:`save` (or ``nsiter stats``); ``np.load(..., allow_pickle=False)``.

        The settings and block layout are checked against what they imply, so a shard merges with
        accumulators computed anywhere with the same settings (:meth:`merge` names any that differ).
        Keys other than :data:`SHARD_KEYS` are ignored.

        Raises
        ------
        FileNotFoundError
            ``path`` does not exist.
        ValueError
            Not an ``.npz`` file, not a shard, a missing key, or inconsistent settings or moments (the
            message names the file and the key)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"statistics file {path!r} does not exist (or is not a file); "
                                    "pass the path of a file written by PatchStatistics.save or nsiter stats")
        try:
            npz = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"cannot read {path!r} as an .npz file ({type(exc).__name__}: {exc}); "
                             "write it with PatchStatistics.save") from None
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError(f"{path!r} holds one array (.npy), not PatchStatistics; write it with "
                             "PatchStatistics.save")
        with npz:
            return cls._from_arrays(npz, path)

    def _to_arrays(self) -> dict:
        """The shard as ``{key: plain ndarray}`` (:data:`SHARD_KEYS`); moments are copies."""
        out = {"format": np.array(SHARD_FORMAT), "version": np.array(SHARD_VERSION, np.int64),
               "kernel_size": np.array(self.kernel_size, np.int64), "stride": np.array(self.stride, np.int64),
               "padding": np.array(self.padding, np.int64), "dilation": np.array(self.dilation, np.int64),
               "sampling_stride": np.array(self.sampling_stride, np.int64),
               "block_size": np.array(self.block_size or 0, np.int64), "grouping": np.array(self.grouping),
               "channels": np.array(-1 if self.channels is None else self.channels, np.int64),
               "dtype": np.array("" if self.dtype is None else self.dtype.name), "count": np.array(self.count, np.int64)}
        if self._stats is not None:
            p = self._plan
            out.update(layout=np.array(p.mode), groups=np.array(p.groups, np.int64),
                       stack=np.array(p.stack, np.int64), block_features=np.array(p.fb, np.int64),
                       moments_mean=np.array(self._stats[1], np.float64), moments_m2=np.array(self._stats[2], np.float64))
        return out

    @classmethod
    def _from_arrays(cls, arrays, path: str) -> "PatchStatistics":
        keys = set(arrays.files if hasattr(arrays, "files") else arrays)
        what = f"{path!r}"
        if "format" not in keys or str(arrays["format"]) != SHARD_FORMAT:
            raise ValueError(f"{what} is not a PatchStatistics shard (no 'format' key {SHARD_FORMAT!r}); "
                             "write it with PatchStatistics.save or nsiter stats")

        def get(key, kind="int", shape=()):
            if key not in keys:
                raise ValueError(f"{what} lacks the key {key!r} of a PatchStatistics shard; re-write it with "
                                 "PatchStatistics.save")
            try:
                a = arrays[key]
            except ValueError as exc:  # an object array: np.load(allow_pickle=False) refuses it
                raise ValueError(f"{what}: key {key!r} cannot be read ({exc}); shards hold plain arrays only") from None
            ok = {"int": a.dtype.kind in "iu", "str": a.dtype.kind == "U", "float64": a.dtype == np.float64}[kind]
            if not ok or (shape is not None and a.shape != shape):
                raise ValueError(f"{what}: key {key!r} holds a {a.dtype} array of shape {a.shape}, expected "
                                 f"{kind} of shape {shape}; the file is damaged or not written by nsiter")
            if kind == "float64":
                return a
            return tuple(int(v) for v in a) if a.ndim else a.item()

        version = get("version")
        if version > SHARD_VERSION:
            raise ValueError(f"{what} is a version-{version} shard, newer than this nsiter reads "
                             f"(version {SHARD_VERSION}); upgrade nsiter")
        pair = {k: get(k, shape=(2,)) for k in ("kernel_size", "stride", "padding", "dilation")}
        block = get("block_size")
        try:
            obj = cls(pair["kernel_size"], stride=pair["stride"], padding=pair["padding"], dilation=pair["dilation"],
                      sampling_stride=get("sampling_stride"), block_size=block or None, grouping=get("grouping", "str"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{what} holds invalid settings: {exc}") from None
        count, channels, dtype = get("count"), get("channels"), get("dtype", "str")
        if count < 0 or (count == 0) != (channels < 0) or (count == 0) != (dtype == ""):
            raise ValueError(f"{what}: count {count}, channels {channels} and dtype {dtype!r} disagree "
                             "(an empty shard has count 0, channels -1, dtype ''); the file is damaged")
        if count == 0:
            return obj
        if dtype not in ("float32", "float64"):
            raise ValueError(f"{what}: key 'dtype' is {dtype!r}, expected 'float32' or 'float64'")
        if obj.block_size is not None and channels % obj.block_size:
            raise ValueError(f"{what}: block_size {obj.block_size} does not divide its {channels} channels")
        kh, kw = obj.kernel_size
        plan = _plan(channels, kh * kw, obj.block_size, obj.grouping)
        stored = {"layout": get("layout", "str"), "groups": get("groups"), "stack": get("stack"),
                  "block_features": get("block_features")}
        implied = {"layout": plan.mode, "groups": plan.groups, "stack": plan.stack, "block_features": plan.fb}
        diff = [f"{k}: {stored[k]!r} stored, {implied[k]!r} implied" for k in stored if stored[k] != implied[k]]
        if diff:
            raise ValueError(f"{what}: the block layout disagrees with its settings ({'; '.join(diff)}); "
                             "the file is damaged or was edited")
        mean = get("moments_mean", "float64", (plan.groups, plan.fb))
        m2 = get("moments_m2", "float64", (plan.groups, plan.fb, plan.fb))
        if not (np.isfinite(mean).all() and np.isfinite(m2).all()):
            raise ValueError(f"{what}: the moments hold NaN/inf; the file is damaged")
        obj.channels, obj._plan, obj.dtype = channels, plan, np.dtype(dtype)
        obj._stats = (int(count), np.array(mean), np.array(m2))
        return obj

    def covariance(self, eps=0.0):
        """``(cov, mean)`` of everything seen, shaped as :func:`patch_covariance` returns them."""
        eps = check_nonnegative_float(eps, "eps")
        if self._stats is None:
            raise ValueError("PatchStatistics has seen no data (count 0); call update(x) or merge(other) first")
        return _finish(backend(), self._stats, self._plan, eps, self.dtype, check=True)
