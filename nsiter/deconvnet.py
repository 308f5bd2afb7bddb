r"""Deconvolutional Networks (Zeiler, Krishnan, Taylor & Fergus, CVPR 2010): convolutional sparse coding.

One layer represents each channel ``c`` of an image ``y`` as a sum of ``K`` feature maps ``z_k``
convolved with filters ``f_{k,c}`` (Eq. 1); inference minimises, for fixed filters,

.. math::

    C(y) = \frac{\lambda}{2} \sum_c \Big\| \sum_k g_{k,c}\, (z_k \oplus f_{k,c}) - y_c \Big\|_2^2
           + \sum_k |z_k|^p                                                   \qquad\text{(Eq. 2/3)}

with a binary connectivity map ``g`` (all ones in layer 1, sparse above).  nsiter's conventions:

- Convolutions are cross-correlations, ``(z \oplus f)[r, q] = sum_{i,j} f[i, j] z[r + i, q + j]``
  (the paper's ``conv2(z, f, 'valid')`` with the filter flipped: the same model, filters stored
  flipped).  ``F`` is that operator and ``F^T`` its adjoint, the full convolution (footnote 3).
- ``boundary="valid"`` (the paper's): maps are ``(H + kh - 1) x (W + kw - 1)`` and every image
  pixel sees a whole filter; ``boundary="circular"``: maps are ``H x W`` and the correlation wraps
  around (periodic images; the boundary of SPORCO's ``ConvBPDN``).
- Images are channels-first, ``(N, C, H, W)`` (``(C, H, W)`` and ``(H, W)`` accepted); filters are
  ``(K, C, kh, kw)`` (``(K, kh, kw)`` for one channel); maps ``(N, K, Mh, Mw)`` (``(K, Mh, Mw)``
  for a single image); ``connectivity`` is ``(K, C)``.  The images of a batch are independent
  problems (Eq. 3 sums over them).

Solvers of :func:`infer_feature_maps` (registry :data:`METHODS`):

- ``"cg"`` — the paper's (Section 3.2): the auxiliary cost Eq. 4 is minimised alternately over
  ``x`` (Eq. 8 shrinkage for ``p = 1``, a lookup table for ``0 < p < 1``) and ``z`` (the linear
  system Eq. 6/7 by conjugate gradients, ``A z = F^T F z + (beta / lambda) z`` computed by two
  correlations, ``A`` never formed), with ``beta`` raised from ``beta0`` by ``beta_inc`` while
  ``beta < beta_max`` (Algorithm 1, lines 4-9).
- ``"admm"`` (``p = 1``) — FFT-domain ADMM on the same objective (Wohlberg, "Efficient algorithms
  for convolutional sparse representations", IEEE TIP 2016, the algorithm of SPORCO's ``ConvBPDN``,
  with its relaxation and residual-balancing penalty rule, the penalty frozen after
  100 iterations so that the iteration provably converges): the z-step is solved exactly per
  frequency (Sherman-Morrison / Woodbury).  ``boundary="circular"`` is solved directly;
  ``"valid"`` by mask decoupling (Wohlberg, "Boundary handling for convolutional sparse
  representations", ICIP 2016) on the periodic grid of the map size, on which the valid
  correlation is the top-left ``H x W`` window of the circular one, so no boundary effect enters.

:func:`learn_filters` is Algorithm 1: inference for every image, then the filter update with the
gradient of Eq. 9 (projected gradient on unit-norm-bounded filters, or CG on its least-squares
problem), filters normalised, over ``n_epochs``.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from ._numba._deconvnet import (CHUNK, _lut_shrink, _soft_threshold, _update_maps, _update_masked_data,
                                _xsolve_masked, _zsolve_circular)
from ._numba._kernel_estimation import ROWS_PER_PARTIAL, _correlate, _correlate_adjoint
from ._validation import (as_float_array, as_pair, check_finite, check_nonempty, check_option, check_positive_float,
                          check_positive_int, is_tensor, result_float_dtype)

__all__ = [
    "METHODS", "BOUNDARIES", "FILTER_SOLVERS", "FeatureMaps", "LearnedFilters", "infer_feature_maps", "learn_filters",
    "reconstruct", "objective", "auxiliary_objective", "shrink", "feature_map_shape", "connectivity_map",
]

#: Inference methods of :func:`infer_feature_maps`.
METHODS = ("cg", "admm")
#: Boundary handling of the data term.
BOUNDARIES = ("valid", "circular")

# Largest feature-map array (elements) a call may allocate: 2**28 float64 = 2 GiB.
MAX_MAP_ELEMENTS = 2 ** 28

# SPORCO ConvBPDN / ConvBPDNMaskDcpl defaults (Wohlberg 2015, "ADMM penalty parameter selection
# by residual balancing", arXiv:1704.06209): over-relaxation, penalty scaling cap and ratio.
_ADMM_RELAX = 1.8
_ADMM_RHO_SCALING = 1000.0
_ADMM_RSDL_RATIO = 1.2
# Iterations after which the penalty is frozen: ADMM with a penalty that keeps changing need not
# converge (SPORCO's every-iteration rule cycles on small problems); with rho fixed it does.
_ADMM_RHO_FREEZE = 100


# ----------------------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class FeatureMaps:
    """Result of :func:`infer_feature_maps`.

    Attributes
    ----------
    z : ndarray
        The feature maps, ``(N, K, Mh, Mw)`` (``(K, Mh, Mw)`` for one image), in the inputs' dtype
        (arithmetic is float64).  ``cg``: the z of Eq. 6 at the last ``beta``; ``admm``: the
        shrinkage (split) variable, exactly sparse.
    auxiliary : ndarray
        The other variable of the splitting, same shape: ``cg``: the x of Eq. 4/8 at the last
        ``beta`` (exactly sparse, ``|z - x| <= 1/beta`` elementwise for ``p = 1``); ``admm``: the
        least-squares variable of the z-step.
    objective : float
        Eq. 3 at ``z``, evaluated in the spatial domain (summed over the images).
    history : ndarray of float64
        Eq. 3 per outer step: ``cg``: at z after every z-step (Eq. 6); ``admm``: at the
        least-squares variable after every iteration (as SPORCO's ``ObjFun``).
    n_iter : int
        Outer steps: ``cg``: z-steps (``beta`` values times ``n_inner``); ``admm``: iterations.
    method, boundary : str
    lam, p : float
        The ``lambda`` and ``p`` of Eq. 3.
    converged : bool
        ``cg``: every CG solve met ``cg_tol``; ``admm``: the normalised primal and dual residuals
        fell below ``tol`` within ``max_iter``.
    beta : ndarray of float64
        ``cg``: ``beta`` of every z-step; ``admm``: the penalty ``rho`` of every iteration.
    cg_iterations : ndarray of int64
        ``cg``: CG iterations of every z-step (the most over the images); ``admm``: empty.
    auxiliary_history : ndarray of float64
        ``cg``: Eq. 4 after every half step (x-step, then z-step) at its ``beta``
        (``auxiliary_beta``); non-increasing at fixed ``beta``.  ``admm``: empty.
    auxiliary_beta : ndarray of float64
    """

    z: np.ndarray
    auxiliary: np.ndarray
    objective: float
    history: np.ndarray
    n_iter: int
    method: str
    boundary: str
    lam: float
    p: float
    converged: bool
    beta: np.ndarray
    cg_iterations: np.ndarray
    auxiliary_history: np.ndarray
    auxiliary_beta: np.ndarray


@dataclass(frozen=True)
class LearnedFilters:
    """Result of :func:`learn_filters` (Algorithm 1).

    Attributes
    ----------
    filters : ndarray, ``(K, C, kh, kw)``
        Unit-norm filters (each ``f_k`` over its connected channels), zero where ``g_{k,c} = 0``.
    z : ndarray
        Feature maps of the training images with the final filters, as :attr:`FeatureMaps.z`.
    history : ndarray of float64, shape (1 + 2 n_epochs,)
        Eq. 3 summed over the images: at the initialisation, then per epoch after the inference
        (lines 3-10) and after the filter update with normalisation (line 11, never an increase).
    steps : tuple of str
        Labels of ``history``: ``"init"``, ``"infer 1"``, ``"filters 1"``, ...
    n_epochs : int
    filter_solver : str
    connectivity : ndarray of bool, ``(K, C)``
    method, boundary : str
    lam, p : float
    """

    filters: np.ndarray
    z: np.ndarray
    history: np.ndarray
    steps: tuple
    n_epochs: int
    connectivity: np.ndarray
    method: str
    boundary: str
    lam: float
    p: float
    filter_solver: str = "projected"


# -------------------------------------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class _Geometry:
    n_img: int
    n_ch: int
    nh: int
    nw: int
    n_maps: int
    kh: int
    kw: int
    boundary: str
    image_ndim: int  # 2, 3 or 4: how the caller passed the images

    @property
    def mh(self) -> int:
        return self.nh + self.kh - 1 if self.boundary == "valid" else self.nh

    @property
    def mw(self) -> int:
        return self.nw + self.kw - 1 if self.boundary == "valid" else self.nw

    @property
    def map_shape(self) -> tuple:
        """Internal maps: ``(N, K, Mh, Mw)``."""
        return (self.n_img, self.n_maps, self.mh, self.mw)

    def public_maps(self, z: np.ndarray) -> np.ndarray:
        return z if self.image_ndim == 4 else z[0]


def _reject_tensor(*objs) -> None:
    if is_tensor(*objs):
        raise TypeError("expected numpy arrays, got a torch.Tensor; nsiter.deconvnet is numpy + Numba only: "
                        "pass t.detach().cpu().numpy()")


def _float_input(a, name: str) -> np.ndarray:
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"expected a plain ndarray for {name}, got a masked array; fill it first (a.filled(0.0))")
    arr = as_float_array(a, name)
    check_nonempty(arr, name)
    check_finite(arr, name)
    return arr


def _images(y, name: str = "y") -> tuple[np.ndarray, int]:
    """``y`` as float ``(N, C, H, W)`` and the ndim it came with."""
    arr = _float_input(y, name)
    if arr.ndim not in (2, 3, 4):
        raise ValueError(f"expected {name} of shape (H, W), (C, H, W) or (N, C, H, W), got ndim {arr.ndim} "
                         f"with shape {tuple(arr.shape)}; images are channels-first")
    return arr.reshape((1,) * (4 - arr.ndim) + arr.shape), arr.ndim


def _filters(f, n_ch: int, name: str = "filters") -> np.ndarray:
    """``f`` as float ``(K, C, kh, kw)``."""
    arr = _float_input(f, name)
    if arr.ndim == 3:
        if n_ch != 1:
            raise ValueError(f"expected {name} of shape (K, {n_ch}, kh, kw) for images with {n_ch} channels, "
                             f"got shape {tuple(arr.shape)}; (K, kh, kw) is for one-channel images only")
        arr = arr[:, None]
    elif arr.ndim != 4:
        raise ValueError(f"expected {name} of shape (K, C, kh, kw) or (K, kh, kw), got ndim {arr.ndim} with "
                         f"shape {tuple(arr.shape)}")
    if arr.shape[1] != n_ch:
        raise ValueError(f"expected {name} with {n_ch} input channels (shape (K, {n_ch}, kh, kw)), got shape "
                         f"{tuple(arr.shape)}; the second axis must match the images' channel axis")
    return arr


def _connectivity(g, n_maps: int, n_ch: int) -> np.ndarray:
    """``g`` as a float64 0/1 ``(K, C)`` array (all ones when None)."""
    if g is None:
        return np.ones((n_maps, n_ch))
    arr = np.asarray(g)
    if arr.dtype.kind == "c" or arr.dtype == object or arr.dtype.kind not in "biuf":
        raise TypeError(f"expected a binary (K, C) connectivity array, got dtype {arr.dtype}")
    if arr.shape != (n_maps, n_ch):
        raise ValueError(f"expected connectivity of shape (K, C) = ({n_maps}, {n_ch}), got shape "
                         f"{tuple(arr.shape)}; g[k, c] = 1 connects map k to input channel c")
    if not np.all((arr == 0) | (arr == 1)):
        raise ValueError("expected connectivity entries 0/1 (or bool), got other values; "
                         "g is the fixed binary matrix of Eq. 3, use (g != 0)")
    return arr.astype(np.float64)


def _geometry(y4: np.ndarray, f4: np.ndarray, boundary: str, image_ndim: int) -> _Geometry:
    n_img, n_ch, nh, nw = y4.shape
    n_maps, _, kh, kw = f4.shape
    if boundary == "circular" and (kh > nh or kw > nw):
        raise ValueError(f"expected filters no larger than the image for boundary='circular', got "
                         f"{kh}x{kw} filters and {nh}x{nw} images; use boundary='valid' or smaller filters")
    geo = _Geometry(n_img, n_ch, nh, nw, n_maps, kh, kw, boundary, image_ndim)
    n_el = math.prod(geo.map_shape)
    if n_el > MAX_MAP_ELEMENTS:
        raise ValueError(f"expected feature maps of at most {MAX_MAP_ELEMENTS} elements, got shape {geo.map_shape} "
                         f"({n_el} elements); split the batch into fewer or smaller images")
    return geo


def _out_dtype(*arrays) -> np.dtype:
    dt = np.result_type(*[a.dtype for a in arrays])
    return result_float_dtype(dt)


def _prepare(y, filters, connectivity, boundary):
    boundary = check_option(boundary, "boundary", BOUNDARIES)
    _reject_tensor(y, filters, connectivity)
    y4, ndim = _images(y)
    f4 = _filters(filters, y4.shape[1])
    g = _connectivity(connectivity, f4.shape[0], y4.shape[1])
    geo = _geometry(y4, f4, boundary, ndim)
    dtype = _out_dtype(y4, f4)
    return (np.ascontiguousarray(y4, dtype=np.float64), np.ascontiguousarray(f4, dtype=np.float64), g, geo, dtype)


def _maps(z, geo: _Geometry, name: str = "z") -> np.ndarray:
    """Caller's maps as float64 ``(N, K, Mh, Mw)``, shape-checked against ``geo``."""
    arr = _float_input(z, name)
    want = geo.map_shape if geo.image_ndim == 4 else geo.map_shape[1:]
    if tuple(arr.shape) != want:
        raise ValueError(f"expected {name} of shape {want} for these images and filters (boundary="
                         f"{geo.boundary!r}), got shape {tuple(arr.shape)}; see feature_map_shape()")
    return np.ascontiguousarray(arr.reshape(geo.map_shape), dtype=np.float64)


def _lam_p(lam, p) -> tuple[float, float]:
    lam = check_positive_float(lam, "lam")
    p = check_positive_float(p, "p")
    if p > 1:
        raise ValueError(f"expected 0 < p <= 1 (the sparse norm of Eq. 2), got p = {p}; p = 1 is the convex case")
    return lam, p


# ------------------------------------------------------------------------------------------------- spatial operators
def _pad_maps(z: np.ndarray, geo: _Geometry) -> np.ndarray:
    """Maps ready for the valid correlation: as they are (valid) or periodically extended (circular)."""
    if geo.boundary == "valid":
        return np.ascontiguousarray(z)
    return np.pad(z, ((0, 0), (0, 0), (0, geo.kh - 1), (0, geo.kw - 1)), mode="wrap")


def _pad_residual(r: np.ndarray, geo: _Geometry) -> np.ndarray:
    """Residual images ready for the adjoint correlation with flipped filters (footnote 3)."""
    if geo.boundary == "valid":
        return np.pad(r, ((0, 0), (0, 0), (geo.kh - 1, geo.kh - 1), (geo.kw - 1, geo.kw - 1)))
    return np.pad(r, ((0, 0), (0, 0), (geo.kh - 1, 0), (geo.kw - 1, 0)), mode="wrap")


def _correlate_channels(xp: np.ndarray, w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[n, o] = sum_c xp[n, c] (valid-correlated with) w[o, c]`` by the kernel of ``estimate_kernel``."""
    for n in range(xp.shape[0]):
        xn = xp[n:n + 1]
        for o in range(w.shape[0]):
            _correlate(xn, w[o], 1, 1, 1, 1, out[n, o:o + 1])
    return out


class _SpatialOperator:
    """``F`` (maps -> images) and ``F^T`` of Eq. 5-7 for fixed filters, by spatial correlations."""

    def __init__(self, filters: np.ndarray, g: np.ndarray, geo: _Geometry):
        self.geo = geo
        fg = filters * g[:, :, None, None]
        self.w_forward = np.ascontiguousarray(fg.transpose(1, 0, 2, 3))  # (C, K, kh, kw)
        self.w_adjoint = np.ascontiguousarray(fg[:, :, ::-1, ::-1])  # (K, C, kh, kw), flipped (footnote 3)

    def forward(self, z: np.ndarray) -> np.ndarray:
        """``sum_k g_{k,c} z_k (+) f_{k,c}``: ``(N, K, Mh, Mw) -> (N, C, H, W)`` (Eq. 1)."""
        g = self.geo
        return _correlate_channels(_pad_maps(z, g), self.w_forward, np.empty((g.n_img, g.n_ch, g.nh, g.nw)))

    def adjoint(self, r: np.ndarray) -> np.ndarray:
        """``F^T r = sum_c g_{k,c} r_c (+) flip(f_{k,c})`` (full correlation): ``(N, C, H, W) -> maps``."""
        g = self.geo
        return _correlate_channels(_pad_residual(r, g), self.w_adjoint, np.empty(g.map_shape))

    def normal(self, z: np.ndarray, shift: float = 0.0) -> np.ndarray:
        """``A z`` of Eq. 7: ``F^T F z + shift z`` with ``shift = beta / lambda``."""
        out = self.adjoint(self.forward(z))
        if shift:
            out += shift * z
        return out


def _synthesize_filters(zp: np.ndarray, f: np.ndarray, geo: _Geometry) -> np.ndarray:
    """``Z f`` of Eq. 9 (the same sum as Eq. 1, linear in ``f``) on padded maps ``zp``."""
    w = np.ascontiguousarray(f.transpose(1, 0, 2, 3))
    return _correlate_channels(zp, w, np.empty((geo.n_img, geo.n_ch, geo.nh, geo.nw)))


def _filter_adjoint(zp: np.ndarray, r: np.ndarray, geo: _Geometry) -> np.ndarray:
    """``Z^T r`` of Eq. 9: ``out[k, c, i, j] = sum_{n,r,q} zp[n, k, r + i, q + j] r[n, c, r, q]``."""
    n_blocks = -(-(geo.n_img * geo.nh) // ROWS_PER_PARTIAL)
    partial = np.empty((n_blocks, geo.n_maps, geo.kh, geo.kw))
    out = np.empty((geo.n_maps, geo.n_ch, geo.kh, geo.kw))
    for c in range(geo.n_ch):
        _correlate_adjoint(zp, np.ascontiguousarray(r[:, c]), 1, 1, 1, 1, partial)
        out[:, c] = partial.sum(axis=0)
    return out


# ------------------------------------------------------------------------------------------------- Fourier operators
def _fft_workers() -> int:
    return os.cpu_count() or 1


def _fast_len(n: int) -> int:
    import scipy.fft

    return int(scipy.fft.next_fast_len(n, real=True))


def _rfft2(a):
    import scipy.fft

    return scipy.fft.rfft2(a, workers=_fft_workers())


def _irfft2(a, shape):
    import scipy.fft

    return scipy.fft.irfft2(a, s=shape, workers=_fft_workers())


class _FourierOperator:
    """``F`` on a periodic grid: ``D[f] (C x K) = g_{k,c} conj(fft(f_{k,c}))[f]``.

    boundary='circular': the grid is the image (= map) size and the correlation is the whole
    circular one.  boundary='valid': the valid correlation is the top-left ``H x W`` window of
    the circular one on any grid at least as large as the maps (``H + kh - 1`` tall, so nothing
    wraps into the window; map entries beyond the map size never reach it), so ``grid`` may be
    the next FFT-friendly size.
    """

    def __init__(self, filters: np.ndarray, g: np.ndarray, geo: _Geometry, grid: tuple | None = None):
        self.geo = geo
        self.grid = (geo.mh, geo.mw) if grid is None else tuple(grid)
        ph, pw = self.grid
        fhat = _rfft2(np.pad(filters, ((0, 0), (0, 0), (0, ph - geo.kh), (0, pw - geo.kw))))
        self.half = fhat.shape[-1]
        self.n_freq = ph * self.half
        d = np.conj(fhat) * g[:, :, None, None]  # (K, C, Ph, half)
        self.dmat = np.ascontiguousarray(d.reshape(geo.n_maps, geo.n_ch, self.n_freq).transpose(2, 1, 0))
        self.gram = np.einsum("fck,fdk->fcd", self.dmat, np.conj(self.dmat))  # D D^H, (F, C, C)
        w = np.full(self.half, 2.0)  # Parseval weights of the half spectrum
        w[0] = 1.0
        if pw % 2 == 0:
            w[-1] = 1.0
        self.weights = np.ascontiguousarray(np.broadcast_to(w, (ph, self.half)).ravel())

    def spectrum(self, a: np.ndarray) -> np.ndarray:
        """``rfft2`` of ``(N, P, Mh, Mw)`` as ``(N, P, F)``."""
        return np.ascontiguousarray(_rfft2(a)).reshape(a.shape[0], a.shape[1], self.n_freq)

    def spatial(self, ahat: np.ndarray) -> np.ndarray:
        n, p = ahat.shape[:2]
        return _irfft2(ahat.reshape(n, p, self.grid[0], self.half), self.grid)

    def forward(self, z: np.ndarray) -> np.ndarray:
        """``F z`` on the grid, ``(N, K, Ph, Pw) -> (N, C, Ph, Pw)``."""
        return self.spatial(np.einsum("fck,ikf->icf", self.dmat, self.spectrum(z)))

    def adjoint(self, r: np.ndarray) -> np.ndarray:
        """``F^H r`` on the grid, ``(N, C, Ph, Pw) -> (N, K, Ph, Pw)``."""
        return self.spatial(np.einsum("fck,icf->ikf", np.conj(self.dmat), self.spectrum(r)))

    def inverse_gram(self, rho: float) -> np.ndarray:
        """``(rho I + D D^H)^-1`` per frequency, ``(F, C, C)``."""
        c = self.geo.n_ch
        if c == 1:
            return np.ascontiguousarray((1.0 / (rho + self.gram.real)).astype(np.complex128))
        return np.ascontiguousarray(np.linalg.inv(self.gram + rho * np.eye(c)))

    def solve(self, b: np.ndarray, rho: float) -> np.ndarray:
        """``(D^H D + rho I)^-1 b`` per frequency for ``b`` (N, K, F) (the ADMM z-step; Woodbury)."""
        dhat = np.zeros((b.shape[0], self.geo.n_ch, self.n_freq), dtype=np.complex128)
        out = np.empty_like(b)
        partial = np.empty(-(-self.n_freq // CHUNK))
        _zsolve_circular(self.dmat, self.inverse_gram(rho), np.ascontiguousarray(b), np.zeros_like(b), rho,
                         dhat, self.weights, out, partial)
        return out


# ------------------------------------------------------------------------------------------------------ x-subproblem
@functools.lru_cache(maxsize=32)
def _lookup_table(p: float, n: int = 4097, span: float = 64.0):
    """``(w_t, w0, dw, table)``: ``u*(w) = argmin_u (u - w)^2 / 2 + |u|^p`` on ``w0 + j dw`` (0 < p < 1).

    ``u* = 0`` up to the jump ``w_t = u_t + p u_t^(p-1)``, ``u_t = (2 (1 - p))^(1 / (2 - p))`` (where
    the nonzero stationary point and 0 cost the same); above, ``u*`` is the largest root of
    ``u + p u^(p-1) = w``, found by Newton from ``u = w`` to convergence.
    """
    u_t = (2.0 * (1.0 - p)) ** (1.0 / (2.0 - p))
    w_t = u_t + p * u_t ** (p - 1.0)
    w = w_t + np.linspace(0.0, span, n)
    u = w.copy()
    for _ in range(100):
        step = (u + p * u ** (p - 1.0) - w) / (1.0 + p * (p - 1.0) * u ** (p - 2.0))
        u -= step
        if np.all(np.abs(step) <= 1e-15 * u):
            break
    u[0] = u_t
    table = np.ascontiguousarray(u)
    table.setflags(write=False)
    return w_t, float(w[0]), float(w[1] - w[0]), table


def _shrink_into(v: np.ndarray, beta: float, p: float, out: np.ndarray) -> np.ndarray:
    """x-subproblem on flat float64 arrays: ``argmin_x beta/2 (x - v)^2 + |x|^p``."""
    if p == 1.0:
        _soft_threshold(v, 1.0 / beta, out)
    else:
        w_t, w0, dw, table = _lookup_table(p)
        _lut_shrink(v, beta ** (-1.0 / (2.0 - p)), p, w_t, w0, dw, table, out)
    return out


def shrink(v, beta, p=1.0):
    r"""The x-subproblem of Eq. 4: ``argmin_x beta/2 (x - v)^2 + |x|^p``, elementwise.

    ``p = 1``: the closed form Eq. 8, ``x = max(|v| - 1/beta, 0) sign(v)``.  ``0 < p < 1``: the
    lookup table of Krishnan & Fergus (NIPS 2009; the paper's ref. [11]).  With
    ``s = beta^(-1/(2-p))`` the problem is ``s`` times the ``beta = 1`` problem at ``v / s``, so one
    table per ``p`` serves every ``beta``: ``x = 0`` for ``|v|/s <= w_t`` (the jump, where the
    nonzero stationary point and 0 cost the same), above it linear interpolation on a 4097-point
    grid refined by one Newton step on the stationarity condition ``u + p u^(p-1) = w``.

    Parameters
    ----------
    v : array_like
        The z of Eq. 4 (any shape).
    beta : float
        Continuation parameter, ``> 0``.
    p : float, default 1
        Sparse norm, ``0 < p <= 1``.

    Returns
    -------
    ndarray
        ``x``, same shape and float dtype as ``v``.
    """
    _reject_tensor(v)
    arr = as_float_array(v, "v")
    check_finite(arr, "v")
    beta = check_positive_float(beta, "beta")
    p = check_positive_float(p, "p")
    if p > 1:
        raise ValueError(f"expected 0 < p <= 1, got p = {p}; for p > 1 the x-subproblem is smooth: "
                         "minimise it directly")
    if arr.size == 0:
        return arr.copy()
    flat = np.ascontiguousarray(arr, dtype=np.float64).ravel()
    out = _shrink_into(flat, beta, p, np.empty_like(flat))
    return out.reshape(arr.shape).astype(arr.dtype, copy=False)


# ------------------------------------------------------------------------------------------------------- objectives
def _sparsity(z: np.ndarray, p: float) -> float:
    a = np.abs(z)
    return float(a.sum() if p == 1.0 else (a ** p).sum())


def _data_term(sop: _SpatialOperator, y: np.ndarray, z: np.ndarray) -> float:
    r = sop.forward(z) - y
    return float(np.vdot(r, r))


def feature_map_shape(image_shape, kernel_size, n_maps, *, boundary="valid") -> tuple:
    """Shape of the feature maps for images of ``image_shape`` (``(H, W)``, ``(C, H, W)`` or
    ``(N, C, H, W)``): ``(K, Mh, Mw)`` or ``(N, K, Mh, Mw)`` with ``Mh = H + kh - 1`` (valid, the
    paper's ``(N_r + H - 1) x (N_c + H - 1)`` of Section 3) or ``Mh = H`` (circular)."""
    boundary = check_option(boundary, "boundary", BOUNDARIES)
    shape = tuple(int(s) for s in image_shape)
    if len(shape) not in (2, 3, 4) or min(shape) < 1:
        raise ValueError(f"expected an image shape (H, W), (C, H, W) or (N, C, H, W) of positive sizes, got {shape}")
    kh, kw = as_pair(kernel_size, "kernel_size", minimum=1)
    k = check_positive_int(n_maps, "n_maps")
    h, w = shape[-2:]
    mh, mw = (h + kh - 1, w + kw - 1) if boundary == "valid" else (h, w)
    return ((shape[0],) if len(shape) == 4 else ()) + (k, mh, mw)


def reconstruct(z, filters, *, boundary="valid", connectivity=None):
    r"""The images a layer synthesises from its maps: ``y_c = sum_k g_{k,c} (z_k (+) f_{k,c})`` (Eq. 1/3).

    Parameters
    ----------
    z : array_like, ``(K, Mh, Mw)`` or ``(N, K, Mh, Mw)``
        Feature maps (valid: ``Mh = H + kh - 1``; circular: ``Mh = H``).
    filters : array_like, ``(K, C, kh, kw)`` or ``(K, kh, kw)``
    boundary : {"valid", "circular"}
    connectivity : array_like of 0/1, ``(K, C)``, optional
        The ``g`` of Eq. 3 (default: all ones).

    Returns
    -------
    ndarray
        ``(C, H, W)`` for 3-D ``z`` (``(H, W)`` when the filters are 3-D), ``(N, C, H, W)`` for 4-D.
    """
    boundary = check_option(boundary, "boundary", BOUNDARIES)
    _reject_tensor(z, filters, connectivity)
    zz = _float_input(z, "z")
    ff = _float_input(filters, "filters")
    if zz.ndim not in (3, 4):
        raise ValueError(f"expected z of shape (K, Mh, Mw) or (N, K, Mh, Mw), got shape {tuple(zz.shape)}")
    if ff.ndim not in (3, 4):
        raise ValueError(f"expected filters of shape (K, C, kh, kw) or (K, kh, kw), got shape {tuple(ff.shape)}")
    f4 = ff[:, None] if ff.ndim == 3 else ff
    z4 = zz.reshape((1,) * (4 - zz.ndim) + zz.shape)
    n_maps, n_ch, kh, kw = f4.shape
    if z4.shape[1] != n_maps:
        raise ValueError(f"expected z with {n_maps} maps (one per filter), got shape {tuple(zz.shape)}")
    mh, mw = z4.shape[2:]
    nh, nw = (mh - kh + 1, mw - kw + 1) if boundary == "valid" else (mh, mw)
    if nh < 1 or nw < 1:
        raise ValueError(f"expected maps at least as large as the {kh}x{kw} filters for boundary='valid', "
                         f"got {mh}x{mw} maps; maps are (H + kh - 1) x (W + kw - 1)")
    if boundary == "circular" and (kh > mh or kw > mw):
        raise ValueError(f"expected filters no larger than the {mh}x{mw} maps for boundary='circular', "
                         f"got {kh}x{kw}")
    g = _connectivity(connectivity, n_maps, n_ch)
    geo = _Geometry(z4.shape[0], n_ch, nh, nw, n_maps, kh, kw, boundary, 4)
    out = _SpatialOperator(np.asarray(f4, dtype=np.float64), g, geo).forward(np.asarray(z4, dtype=np.float64))
    out = out.astype(_out_dtype(zz, ff), copy=False)
    if zz.ndim == 3:
        out = out[0]
        if ff.ndim == 3:
            out = out[0]
    return out


def objective(y, filters, z, *, lam=1.0, p=1.0, boundary="valid", connectivity=None) -> float:
    r"""Eq. 3: ``lam/2 sum_{i,c} ||sum_k g_{k,c} (z_k (+) f_{k,c}) - y_c||^2 + sum_{i,k} |z_k|^p``.

    ``y`` images as in :func:`infer_feature_maps`, ``z`` maps of :func:`feature_map_shape`.
    Evaluated in float64 in the spatial domain.
    """
    y4, f4, g, geo, _ = _prepare(y, filters, connectivity, boundary)
    lam, p = _lam_p(lam, p)
    z4 = _maps(z, geo)
    sop = _SpatialOperator(f4, g, geo)
    return 0.5 * lam * _data_term(sop, y4, z4) + _sparsity(z4, p)


def auxiliary_objective(y, filters, z, x, *, beta, lam=1.0, p=1.0, boundary="valid", connectivity=None) -> float:
    r"""Eq. 4: Eq. 3's data term at ``z`` plus ``beta/2 ||z - x||^2 + sum |x|^p``."""
    y4, f4, g, geo, _ = _prepare(y, filters, connectivity, boundary)
    lam, p = _lam_p(lam, p)
    beta = check_positive_float(beta, "beta")
    z4, x4 = _maps(z, geo, "z"), _maps(x, geo, "x")
    sop = _SpatialOperator(f4, g, geo)
    d = z4 - x4
    return 0.5 * lam * _data_term(sop, y4, z4) + 0.5 * beta * float(np.vdot(d, d)) + _sparsity(x4, p)


# ------------------------------------------------------------------------------------------------------ CG (Eq. 6/7)
def _image_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image inner products, shape ``(N, 1, 1, 1)``."""
    return np.einsum("nkij,nkij->n", a, b)[:, None, None, None]


def _cg(apply_a, b: np.ndarray, x: np.ndarray, tol: float, max_iter: int) -> tuple[np.ndarray, int, bool]:
    """Conjugate gradients on the per-image SPD systems ``A x = b`` (one set of scalars per image),
    warm-started at ``x``; stops an image when ``||r|| <= tol ||b||``.  Returns x, iterations, converged."""
    x = x.copy()
    r = b - apply_a(x)
    p = r.copy()
    rr = _image_dot(r, r)
    bound = (tol * tol) * _image_dot(b, b)
    it = 0
    while it < max_iter:
        active = rr > bound
        if not active.any():
            break
        q = apply_a(p)
        pq = _image_dot(p, q)
        alpha = np.where(active & (pq > 0), rr / np.where(pq > 0, pq, 1.0), 0.0)
        x += alpha * p
        r -= alpha * q
        rr_new = _image_dot(r, r)
        beta = np.where(active & (rr > 0), rr_new / np.where(rr > 0, rr, 1.0), 0.0)
        p = r + beta * p
        rr = rr_new
        it += 1
    return x, it, bool(np.all(rr <= bound))


def _infer_cg(y, sop, lam, p, z, beta0, beta_inc, beta_max, n_inner, cg_tol, cg_max_iter):
    fty = sop.adjoint(y)
    x = np.empty_like(z)
    data = _data_term(sop, y, z)
    hist, betas, its, aux, aux_beta = [], [], [], [], []
    converged = True
    beta = beta0
    while beta < beta_max:
        shift = beta / lam
        for _ in range(n_inner):
            _shrink_into(z.ravel(), beta, p, x.ravel())  # Eq. 8 (x-subproblem)
            d = z - x
            aux.append(0.5 * lam * data + 0.5 * beta * float(np.vdot(d, d)) + _sparsity(x, p))
            z, n_cg, ok = _cg(lambda v: sop.normal(v, shift), fty + shift * x, z, cg_tol, cg_max_iter)  # Eq. 6
            converged &= ok
            data = _data_term(sop, y, z)
            d = z - x
            aux.append(0.5 * lam * data + 0.5 * beta * float(np.vdot(d, d)) + _sparsity(x, p))
            aux_beta += [beta, beta]
            hist.append(0.5 * lam * data + _sparsity(z, p))
            betas.append(beta)
            its.append(n_cg)
        beta *= beta_inc
    return z, x, dict(history=hist, beta=betas, cg_iterations=its, auxiliary_history=aux, auxiliary_beta=aux_beta,
                      n_iter=len(hist), converged=converged)


# ------------------------------------------------------------------------------------------------- ADMM (p = 1, FFT)
def _rho_update(k, r, s, rho, xi, period):
    """Residual-balancing penalty factor (SPORCO ``ADMM.update_rho`` with ``AutoScaling``), 1 after
    :data:`_ADMM_RHO_FREEZE` iterations (SPORCO keeps adapting, and then cycles on small problems)."""
    if k == 0 or (k + 1) % period or k >= _ADMM_RHO_FREEZE:
        return 1.0
    if r == 0.0 or s == 0.0:
        mult = _ADMM_RHO_SCALING
    else:
        mult = min(math.sqrt(r / (s * xi) if r > s * xi else (s * xi) / r), _ADMM_RHO_SCALING)
    if r > xi * _ADMM_RSDL_RATIO * s:
        return mult
    if s > (_ADMM_RSDL_RATIO / xi) * r:
        return 1.0 / mult
    return 1.0


def _admm_circular(y, fop, lam, z0, rho, tol, max_iter):
    """ConvBPDN: ``min 1/2 ||D z - y||^2 + (1/lam) ||x||_1, z = x`` (Eq. 3 divided by lam)."""
    lam_s = 1.0 / lam
    yhat = fop.spectrum(y)
    dhy = np.ascontiguousarray(np.einsum("fck,icf->ikf", np.conj(fop.dmat), yhat))
    rho = 50.0 * lam_s + 1.0 if rho is None else rho
    xi = 1.0 + 18.3 ** (math.log10(lam_s) + 1.0)
    x = z0.copy()
    u = (lam_s / rho) * np.sign(x)
    v = x - u
    z = np.zeros_like(x)
    minv = fop.inverse_gram(rho)
    zhat = np.empty_like(dhy)
    part_f = np.empty(-(-fop.n_freq // CHUNK))
    part_s = np.empty((-(-x.size // CHUNK), 6))
    scale = 1.0 / (fop.grid[0] * fop.grid[1])
    hist, rhos = [], []
    converged = False
    for k in range(max_iter):
        _zsolve_circular(fop.dmat, minv, dhy, fop.spectrum(v), rho, yhat, fop.weights, zhat, part_f)
        z = np.ascontiguousarray(fop.spatial(zhat))
        _update_maps(z.ravel(), x.ravel(), u.ravel(), _ADMM_RELAX, lam_s / rho, v.ravel(), part_s)
        s0, s1, s2, s3, s4, s5 = part_s.sum(axis=0)
        hist.append(0.5 * lam * scale * float(part_f.sum()) + float(s5))
        rhos.append(rho)
        rn = max(math.sqrt(s0), math.sqrt(s1)) or 1.0
        sn = math.sqrt(s4) or 1.0
        r, s = math.sqrt(s2) / rn, math.sqrt(s3) / sn
        if r < tol and s < tol:
            converged = True
            break
        f = _rho_update(k, r, s, rho, xi, 1)
        if f != 1.0:
            rho *= f
            u /= f
            np.subtract(x, u, out=v)
            minv = fop.inverse_gram(rho)
    return x, z, dict(history=hist, beta=rhos, n_iter=len(hist), converged=converged)


def _admm_masked(y, fop, lam, z0, rho, tol, max_iter):
    """ConvBPDNMaskDcpl: ``min 1/2 ||W y0||^2 + (1/lam) ||y1||_1`` s.t. ``D x - y0 = s``, ``x = y1``
    on the periodic grid of the map size, ``W`` the indicator of the image window, ``s`` the image."""
    geo = fop.geo
    lam_s = 1.0 / lam
    n_img, n_ch = y.shape[:2]
    ph, pw = fop.grid
    sig = np.zeros((n_img, n_ch, ph, pw))
    sig[:, :, :geo.nh, :geo.nw] = y
    rho = 1.0 if rho is None else rho
    xi, period = 1.0, 10
    minv = fop.inverse_gram(1.0)
    y1 = np.zeros((n_img, geo.n_maps, ph, pw))
    y1[:, :, :geo.mh, :geo.mw] = z0
    u1 = (lam_s / rho) * np.sign(y1)
    v1 = y1 - u1
    if y1.any():  # a warm start: y0 on the constraint, u0 dual-optimal for 1/2 ||W y0||^2 (SPORCO's uinit)
        y0 = fop.forward(y1) - sig
        u0 = np.zeros_like(y0)
        u0[:, :, :geo.nh, :geo.nw] = y0[:, :, :geo.nh, :geo.nw] / rho
    else:
        y0, u0 = np.zeros_like(sig), np.zeros_like(sig)
    v0 = y0 + sig - u0
    xhat = np.empty((n_img, geo.n_maps, fop.n_freq), dtype=np.complex128)
    dxhat = np.empty((n_img, n_ch, fop.n_freq), dtype=np.complex128)
    part0 = np.empty((n_img * n_ch, 6))
    part1 = np.empty((-(-y1.size // CHUNK), 6))
    sig_norm = math.sqrt(float(np.vdot(sig, sig)))
    x = np.zeros_like(y1)
    hist, rhos = [], []
    converged = False
    for k in range(max_iter):
        _xsolve_masked(fop.dmat, minv, fop.spectrum(v0), fop.spectrum(v1), xhat, dxhat)
        x = np.ascontiguousarray(fop.spatial(xhat))
        dx = np.ascontiguousarray(fop.spatial(dxhat))
        _update_masked_data(dx.reshape(-1, ph, pw), y0.reshape(-1, ph, pw), u0.reshape(-1, ph, pw),
                            sig.reshape(-1, ph, pw), rho, _ADMM_RELAX, geo.nh, geo.nw, v0.reshape(-1, ph, pw), part0)
        _update_maps(x.ravel(), y1.ravel(), u1.ravel(), _ADMM_RELAX, lam_s / rho, v1.ravel(), part1)
        a = part0.sum(axis=0) + part1.sum(axis=0)
        hist.append(0.5 * lam * float(part0[:, 5].sum()) + float(part1[:, 5].sum()))
        rhos.append(rho)
        rn = max(math.sqrt(a[0]), math.sqrt(a[1]), sig_norm) or 1.0
        sn = math.sqrt(a[4]) or 1.0
        r, s = math.sqrt(a[2]) / rn, math.sqrt(a[3]) / sn
        if r < tol and s < tol:
            converged = True
            break
        f = _rho_update(k, r, s, rho, xi, period)
        if f != 1.0:
            rho *= f
            u0 /= f
            u1 /= f
            np.subtract(y0 + sig, u0, out=v0)
            np.subtract(y1, u1, out=v1)
    crop = (slice(None), slice(None), slice(0, geo.mh), slice(0, geo.mw))
    return (np.ascontiguousarray(y1[crop]), np.ascontiguousarray(x[crop]),
            dict(history=hist, beta=rhos, n_iter=len(hist), converged=converged))


# ---------------------------------------------------------------------------------------------------- public driver
def _check_inference_options(method, p, beta0, beta_inc, beta_max, n_inner, cg_tol, cg_max_iter, tol, max_iter, rho):
    method = check_option(method, "method", METHODS)
    beta0 = check_positive_float(beta0, "beta0")
    beta_inc = check_positive_float(beta_inc, "beta_inc")
    beta_max = check_positive_float(beta_max, "beta_max")
    if method == "cg":
        if beta_inc <= 1.0:
            raise ValueError(f"expected beta_inc > 1 (beta grows until beta_max), got {beta_inc}; the paper uses 6")
        if beta_max <= beta0:
            raise ValueError(f"expected beta_max > beta0 (Algorithm 1 runs while beta < beta_max), got beta0 = "
                             f"{beta0}, beta_max = {beta_max}")
    if method == "admm" and p != 1.0:
        raise ValueError(f"method='admm' solves the convex p = 1 problem, got p = {p}; use method='cg' "
                         "(the lookup-table x-step) for 0 < p < 1")
    opts = dict(n_inner=check_positive_int(n_inner, "n_inner"), cg_tol=check_positive_float(cg_tol, "cg_tol"),
                cg_max_iter=check_positive_int(cg_max_iter, "cg_max_iter"), tol=check_positive_float(tol, "tol"),
                max_iter=check_positive_int(max_iter, "max_iter"),
                rho=None if rho is None else check_positive_float(rho, "rho"))
    return method, beta0, beta_inc, beta_max, opts


def _infer(y4, f4, g, geo, lam, p, z, method, beta0, beta_inc, beta_max, opts):
    """Inference on validated float64 inputs; returns (z, auxiliary, record)."""
    if not y4.any() or not (f4 * g[:, :, None, None]).any():
        # degenerate: z = 0 minimises Eq. 3 when there is nothing to explain or nothing to explain it with
        zero = np.zeros(geo.map_shape)
        return zero, zero.copy(), dict(history=[], beta=[], cg_iterations=[], auxiliary_history=[],
                                       auxiliary_beta=[], n_iter=0, converged=True)
    if method == "cg":
        sop = _SpatialOperator(f4, g, geo)
        return _infer_cg(y4, sop, lam, p, z, beta0, beta_inc, beta_max, opts["n_inner"], opts["cg_tol"],
                         opts["cg_max_iter"])
    if geo.boundary == "circular":
        return _admm_circular(y4, _FourierOperator(f4, g, geo), lam, z, opts["rho"], opts["tol"], opts["max_iter"])
    fop = _FourierOperator(f4, g, geo, grid=(_fast_len(geo.mh), _fast_len(geo.mw)))
    return _admm_masked(y4, fop, lam, z, opts["rho"], opts["tol"], opts["max_iter"])


def _feature_maps(geo, dtype, y4, f4, g, lam, p, method, z, aux, rec) -> FeatureMaps:
    sop = _SpatialOperator(f4, g, geo)
    obj = 0.5 * lam * _data_term(sop, y4, z) + _sparsity(z, p)
    return FeatureMaps(
        z=geo.public_maps(z).astype(dtype, copy=True), auxiliary=geo.public_maps(aux).astype(dtype, copy=True),
        objective=float(obj), history=np.asarray(rec["history"], dtype=np.float64), n_iter=int(rec["n_iter"]),
        method=method, boundary=geo.boundary, lam=lam, p=p, converged=bool(rec["converged"]),
        beta=np.asarray(rec["beta"], dtype=np.float64),
        cg_iterations=np.asarray(rec.get("cg_iterations", []), dtype=np.int64),
        auxiliary_history=np.asarray(rec.get("auxiliary_history", []), dtype=np.float64),
        auxiliary_beta=np.asarray(rec.get("auxiliary_beta", []), dtype=np.float64))


def infer_feature_maps(y, filters, *, lam=1.0, p=1.0, method="cg", boundary="valid", connectivity=None, z0=None,
                       beta0=1.0, beta_inc=6.0, beta_max=1e5, n_inner=1, cg_tol=1e-4, cg_max_iter=100,
                       tol=1e-3, max_iter=1000, rho=None) -> FeatureMaps:
    r"""Infer the feature maps of Eq. 3 for fixed filters: ``argmin_z C(y)``.

    ``C(y) = lam/2 sum_c ||sum_k g_{k,c} (z_k (+) f_{k,c}) - y_c||^2 + sum_k |z_k|^p`` (Eq. 2/3), one
    independent problem per image of the batch.

    ``method="cg"`` (the paper's, Section 3.2; defaults ``lam = 1, p = 1, beta0 = 1, beta_inc = 6,
    beta_max = 1e5`` of Section 4): minimise the auxiliary cost Eq. 4 by alternating, for
    ``beta = beta0, beta0 beta_inc, ...`` while ``beta < beta_max`` (Algorithm 1, lines 4-9),
    ``n_inner`` times: the x-subproblem (Eq. 8 for ``p = 1``; the lookup table of :func:`shrink`
    for ``p < 1``) and the z-subproblem, the linear system ``A z = F^T y + (beta/lam) x`` of Eq. 6
    with ``A = F^T F + (beta/lam) I`` (Eq. 7), by conjugate gradients warm-started at the current
    ``z``; ``A z`` is two correlations (Eq. 5), never a matrix.

    ``method="admm"`` (``p = 1`` only): FFT-domain ADMM on the same objective (divided by ``lam``:
    ``1/2 ||F z - y||^2 + (1/lam) ||z||_1``, SPORCO's ``ConvBPDN`` with ``lmbda = 1/lam``), the
    z-step solved exactly per frequency, over-relaxation 1.8 and residual-balancing penalty updates;
    ``boundary="valid"`` by mask decoupling on the periodic grid of the map size (exact, no
    boundary effects).  Stops when the normalised primal and dual residuals are below ``tol``.
    A batch is one ADMM problem (one penalty, one stopping test); ``cg`` keeps per-image CG
    scalars, so its maps do not depend on the batch.

    Parameters
    ----------
    y : array_like, ``(H, W)``, ``(C, H, W)`` or ``(N, C, H, W)``
        Input images (layer 1) or the maps of the layer below (layer ``l``; Eq. 3's ``z_{c,l-1}``).
    filters : array_like, ``(K, C, kh, kw)`` or ``(K, kh, kw)`` (one channel)
    lam : float, default 1
        ``lambda`` of Eq. 3 (weight of the data term).
    p : float, default 1
        Sparse norm, ``0 < p <= 1``.
    method : {"cg", "admm"}
    boundary : {"valid", "circular"}
        ``"valid"``: maps ``(H + kh - 1) x (W + kw - 1)``, the paper's; ``"circular"``: ``H x W``,
        periodic.
    connectivity : array_like of 0/1, ``(K, C)``, optional
        ``g`` of Eq. 3 (default all ones, layer 1); see :func:`connectivity_map`.
    z0 : array_like, optional
        Starting maps (default zeros), shape of :func:`feature_map_shape`.
    beta0, beta_inc, beta_max : float
        Continuation of Eq. 4 (``cg``).
    n_inner : int, default 1
        x/z alternations per ``beta`` (``cg``; the paper's Algorithm 1 does one).
    cg_tol, cg_max_iter : float, int
        CG stops when ``||A z - b|| <= cg_tol ||b||`` per image, or after ``cg_max_iter`` iterations.
    tol, max_iter : float, int
        ADMM stopping rule (SPORCO's ``RelStopTol``, ``MaxMainIter``).
    rho : float, optional
        Initial ADMM penalty (default: SPORCO's, ``50/lam + 1`` circular, ``1`` valid).

    Returns
    -------
    FeatureMaps
        ``z``, the objective Eq. 3 at ``z``, histories and iteration counts.

    Raises
    ------
    TypeError
        Complex, non-numeric, masked or tensor inputs.
    ValueError
        Bad shapes, non-finite values, ``p`` outside ``(0, 1]`` (or ``p != 1`` with ``admm``), unknown
        method/boundary, filters larger than a circular image, a ``beta`` schedule that never runs,
        maps beyond :data:`MAX_MAP_ELEMENTS`.
    """
    y4, f4, g, geo, dtype = _prepare(y, filters, connectivity, boundary)
    lam, p = _lam_p(lam, p)
    method, beta0, beta_inc, beta_max, opts = _check_inference_options(
        method, p, beta0, beta_inc, beta_max, n_inner, cg_tol, cg_max_iter, tol, max_iter, rho)
    z = np.zeros(geo.map_shape) if z0 is None else _maps(z0, geo, "z0")
    z, aux, rec = _infer(y4, f4, g, geo, lam, p, z, method, beta0, beta_inc, beta_max, opts)
    return _feature_maps(geo, dtype, y4, f4, g, lam, p, method, z, aux, rec)


# --------------------------------------------------------------------------------------------- learning (Algorithm 1)
def connectivity_map(n_inputs, *, singles=True, pairs=True) -> np.ndarray:
    """A layer-2 connectivity ``g`` (Eq. 3) as in Section 4.1: one map per input (singly connected)
    and one per pair of inputs; 9 layer-1 maps give 9 + 36 = 45 layer-2 maps, the paper's layer 2.

    Returns
    -------
    ndarray of bool, ``(K, n_inputs)``
    """
    n = check_positive_int(n_inputs, "n_inputs")
    rows = []
    if singles:
        rows += [(c,) for c in range(n)]
    if pairs:
        rows += list(combinations(range(n), 2))
    if not rows:
        raise ValueError("expected singles or pairs (or both), got neither; the map would have no rows")
    g = np.zeros((len(rows), n), dtype=bool)
    for k, cs in enumerate(rows):
        g[k, list(cs)] = True
    return g


def _normalise(f: np.ndarray, z: np.ndarray | None = None) -> np.ndarray:
    """Unit-norm filters ``f_k`` (over channels and taps), in place; with ``z``, the maps ``z_k`` are
    scaled by the old norm, so the reconstruction is unchanged.  Zero filters stay zero."""
    norms = np.sqrt(np.einsum("kcij,kcij->k", f, f))
    safe = np.where(norms > 0, norms, 1.0)
    f /= safe[:, None, None, None]
    if z is not None:
        z *= safe[None, :, None, None]
    return f


def _filter_step_cg(y4, z, f, g, geo, n_iter):
    """Line 11 of Algorithm 1 by CG on Eq. 9, never raising Eq. 3 (``z`` is rescaled in place).

    1. ``n_iter`` CG (CGLS) steps on ``min_f 1/2 sum_{i,c} ||sum_k g_{k,c} Z_k f_{k,c} - y_c||^2`` (the
       problem whose gradient is Eq. 9) from the current unit-norm filters;
    2. the result normalised (projected onto the unit sphere);
    3. the exact minimiser of the data term on the segment from the current filters to it (both in
       the unit ball, a convex set; the step is 0 if the normalised solution is worse);
    4. each filter normalised to unit norm and its map scaled by the norm (``<= 1``): the data term
       is unchanged and the sparsity term does not grow.
    """
    zp = _pad_maps(z, geo)
    mask = g[:, :, None, None]
    f_old = f * mask
    r_old = _synthesize_filters(zp, f_old, geo) - y4
    f_ls = f_old.copy()
    r = -r_old
    s = _filter_adjoint(zp, r, geo) * mask
    d = s.copy()
    gamma = float(np.vdot(s, s))
    for _ in range(n_iter):
        if gamma == 0.0:
            break
        q = _synthesize_filters(zp, d, geo)
        qq = float(np.vdot(q, q))
        if qq == 0.0:
            break
        alpha = gamma / qq
        f_ls += alpha * d
        r -= alpha * q
        s = _filter_adjoint(zp, r, geo) * mask
        gamma_new = float(np.vdot(s, s))
        d = s + (gamma_new / gamma) * d
        gamma = gamma_new
    step = _normalise(f_ls) - f_old
    q = _synthesize_filters(zp, step, geo)
    qq = float(np.vdot(q, q))
    t = min(max(-float(np.vdot(r_old, q)) / qq, 0.0), 1.0) if qq > 0 else 0.0
    return _renormalise(f_old + t * step, f_old, z)


def _renormalise(f, f_old, z):
    """Filters in the unit ball to unit norm, maps scaled by the norm (``<= 1``: the data term is
    unchanged, the sparsity term does not grow); a filter that shrank to zero gets its old value
    back and its map zeroed (the reconstruction is unchanged again)."""
    norms = np.sqrt(np.einsum("kcij,kcij->k", f, f))
    dead = norms <= 1e-12
    if dead.any():
        f[dead] = f_old[dead]
        z[:, dead] = 0.0
        norms[dead] = 1.0
    f /= norms[:, None, None, None]
    z *= norms[None, :, None, None]
    return f


def _filter_step_projected(y4, z, f, g, geo, n_iter):
    """Line 11 of Algorithm 1 by projected gradient descent on Eq. 9, never raising Eq. 3.

    Accelerated projected gradient (FISTA, Beck & Teboulle 2009) on
    ``min_f 1/2 sum_{i,c} ||sum_k g_{k,c} Z_k f_{k,c} - y_c||^2`` subject to ``||f_k|| <= 1`` (the
    gradient is Eq. 9 divided by ``lam``), ``n_iter`` steps of length ``1/L`` from the current
    filters, ``L`` by power iteration on ``Z^T Z``; the result is kept only if its data term is not
    above the current one; then :func:`_renormalise`.
    """
    zp = _pad_maps(z, geo)
    mask = g[:, :, None, None]
    f_old = f * mask

    def grad_at(w):
        r = _synthesize_filters(zp, w, geo) - y4
        return r, _filter_adjoint(zp, r, geo) * mask

    v = np.random.default_rng(0).standard_normal(f.shape) * mask
    lip = 0.0
    for _ in range(10):
        v = _filter_adjoint(zp, _synthesize_filters(zp, v, geo), geo) * mask
        lip = float(np.sqrt(np.vdot(v, v)))
        if lip == 0.0:
            return _renormalise(f_old.copy(), f_old, z)
        v /= lip
    step = 1.0 / (1.1 * lip)
    r_old, _ = grad_at(f_old)
    x, w, t = f_old, f_old, 1.0
    for _ in range(n_iter):
        _, grad = grad_at(w)
        x_new = w - step * grad
        x_new /= np.maximum(np.sqrt(np.einsum("kcij,kcij->k", x_new, x_new)), 1.0)[:, None, None, None]
        t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        w = x_new + ((t - 1.0) / t_new) * (x_new - x)
        x, t = x_new, t_new
    r_new = _synthesize_filters(zp, x, geo) - y4
    if float(np.vdot(r_new, r_new)) > float(np.vdot(r_old, r_old)):
        x = f_old.copy()
    return _renormalise(x, f_old, z)


_FILTER_STEPS = {"projected": _filter_step_projected, "cg": _filter_step_cg}
#: Filter-update solvers of :func:`learn_filters`.
FILTER_SOLVERS = tuple(_FILTER_STEPS)


def learn_filters(images, n_filters, kernel_size, *, lam=1.0, p=1.0, n_epochs=3, connectivity=None, method="cg",
                  boundary="valid", filter_solver="projected", filter_iter=20, filters0=None, seed=0,
                  init_scale=1e-2, beta0=1.0, beta_inc=6.0, beta_max=1e5, n_inner=1, cg_tol=1e-4, cg_max_iter=100,
                  tol=1e-3, max_iter=1000, callback=None) -> LearnedFilters:
    r"""Learn one Deconvolutional Network layer by Algorithm 1 (Section 3.2).

    Initialise ``f ~ N(0, 1)`` (normalised) and ``z ~ N(0, init_scale^2)`` (line 1); per epoch infer
    the maps of every image with :func:`infer_feature_maps` (lines 3-10, warm-started at the last
    maps, ``beta`` restarting at ``beta0``), then update the filters (line 11) with the gradient
    of Eq. 9, ``dC/df_{k,c} = lam sum_i Z_k^{iT} (sum_k' g_{k',c} Z_k'^i f_{k',c} - y_c^i)`` (``Z``
    the correlation matrix of the maps; the maps fixed), and normalise every filter ``f_k`` to unit
    norm, its map scaled by the norm.  ``filter_solver`` (registry :data:`FILTER_SOLVERS`):

    - ``"projected"`` (default): ``filter_iter`` accelerated projected-gradient steps on the data
      term with ``||f_k|| <= 1``, then normalised (norm ``<= 1``, so the maps shrink);
    - ``"cg"``: ``filter_iter`` conjugate-gradient (CGLS) steps on the unconstrained least-squares
      problem of Eq. 9, normalised, and the exact line minimum of the data term between the current
      and the normalised filters.

    Both never raise Eq. 3 in the filter step.  CG's unconstrained solution grows past unit norm to
    undo the shrinkage of the maps, and normalising it afterwards is a poor step: on natural images
    it stalls at a visibly worse optimum (noisy filters) than the constrained step.

    Parameters
    ----------
    images : array_like, ``(N, C, H, W)``, ``(C, H, W)`` or ``(H, W)``
        Training images ``y`` (or the maps of the layer below).
    n_filters : int
        ``K``, feature maps per image.
    kernel_size : int or (kh, kw)
        Filter size (the paper: 7).
    lam, p, method, boundary, connectivity
        As in :func:`infer_feature_maps` (``connectivity`` ``(K, C)``).
    n_epochs : int, default 3
        ``E`` (the paper's Section 4 value).
    filters0 : array_like, optional
        Starting filters ``(K, C, kh, kw)`` (normalised before use) instead of the random ones.
    seed : int
        Seed of the initialisation (``numpy.random.default_rng``).
    init_scale : float
        The ``epsilon`` of line 1 (standard deviation of the initial maps).
    filter_solver : {"projected", "cg"}
        Solver of the filter update (line 11), see above.
    filter_iter : int
        Iterations of each filter update.
    callback : callable, optional
        ``callback(epoch, filters, feature_maps)`` after every epoch (copies).
    beta0, beta_inc, beta_max, n_inner, cg_tol, cg_max_iter, tol, max_iter
        Inference options, see :func:`infer_feature_maps`.

    Returns
    -------
    LearnedFilters
    """
    boundary = check_option(boundary, "boundary", BOUNDARIES)
    _reject_tensor(images, filters0, connectivity)
    y4, ndim = _images(images, "images")
    n_maps = check_positive_int(n_filters, "n_filters")
    kh, kw = as_pair(kernel_size, "kernel_size", minimum=1)
    n_epochs = check_positive_int(n_epochs, "n_epochs", minimum=0)
    filter_step = _FILTER_STEPS[check_option(filter_solver, "filter_solver", FILTER_SOLVERS)]
    filter_iter = check_positive_int(filter_iter, "filter_iter")
    init_scale = check_positive_float(init_scale, "init_scale") if init_scale else 0.0
    lam, p = _lam_p(lam, p)
    method, beta0, beta_inc, beta_max, opts = _check_inference_options(
        method, p, beta0, beta_inc, beta_max, n_inner, cg_tol, cg_max_iter, tol, max_iter, None)
    n_ch = y4.shape[1]
    g = _connectivity(connectivity, n_maps, n_ch)
    if not g.any(axis=1).all():
        raise ValueError("expected every filter connected to at least one input channel, got an all-zero row "
                         "in connectivity; drop that map or connect it")
    rng = np.random.default_rng(seed)
    if filters0 is None:
        f = rng.standard_normal((n_maps, n_ch, kh, kw))
    else:
        f = np.array(_filters(filters0, n_ch, "filters0"), dtype=np.float64)
        if f.shape != (n_maps, n_ch, kh, kw):
            raise ValueError(f"expected filters0 of shape {(n_maps, n_ch, kh, kw)} (n_filters, C, kernel_size), "
                             f"got {tuple(f.shape)}")
    dtype = _out_dtype(y4) if filters0 is None else _out_dtype(y4, np.asarray(filters0))
    y4 = np.ascontiguousarray(y4, dtype=np.float64)
    geo = _geometry(y4, f, boundary, ndim)
    f = _normalise(f * g[:, :, None, None])
    z = init_scale * rng.standard_normal(geo.map_shape)

    def cost():
        return 0.5 * lam * _data_term(_SpatialOperator(f, g, geo), y4, z) + _sparsity(z, p)

    history, steps = [cost()], ["init"]
    for epoch in range(1, n_epochs + 1):
        z, _, _ = _infer(y4, f, g, geo, lam, p, z, method, beta0, beta_inc, beta_max, opts)
        history.append(cost())
        steps.append(f"infer {epoch}")
        f = filter_step(y4, z, f, g, geo, filter_iter)
        history.append(cost())
        steps.append(f"filters {epoch}")
        if callback is not None:
            callback(epoch, f.astype(dtype, copy=True), geo.public_maps(z).astype(dtype, copy=True))
    return LearnedFilters(filters=f.astype(dtype, copy=True), z=geo.public_maps(z).astype(dtype, copy=True),
                          history=np.asarray(history), steps=tuple(steps), n_epochs=n_epochs,
                          connectivity=g.astype(bool), method=method, boundary=boundary, lam=lam, p=p,
                          filter_solver=filter_solver)
