r"""Newton–Schulz inverse square roots of symmetric positive (semi)definite matrices.

``D = inv_sqrtm(A)`` approximates ``A^{-1/2}``: the deconvolution (whitening) matrix
``D = (Cov + eps I)^{-1/2}`` of Ye et al. (2020), §4.5.3 and appendix A.3.

Methods (registry :data:`METHODS`):

``"coupled"``
    Higham, *Functions of Matrices* (2008), Eq. (6.35), the coupled Newton–Schulz
    iteration used by the paper: ``c = scale(A)``, ``Y_0 = A/c``, ``Z_0 = I``,

    .. math::  T_k = \tfrac12 (3I - Z_k Y_k), \quad Y_{k+1} = Y_k T_k, \quad Z_{k+1} = T_k Z_k,

    ``D = Z_k / sqrt(c)`` and ``Y_k sqrt(c) -> A^{1/2}``.  Stable for thousands of steps.
``"uncoupled"``
    Higham (2008), Eq. (7.12), the single-sequence ("vanilla") iteration,
    ``X_0 = I``, ``X_{k+1} = (3 X_k - X_k^3 Y_0)/2``, ``D = X_k/sqrt(c)``.  Evaluated as
    ``X_{k+1} = (3 X_k - X_k ((X_k X_k) Y_0)) / 2``.  It is numerically unstable for
    ill-conditioned ``A`` (rounding errors are amplified), which is the point of the
    paper's Fig. 7; it is kept exactly as it is.
``"eigh"``
    The exact reference ``V diag(lambda^{-1/2}) V^T`` from a float64 eigendecomposition.
``"auto"``
    The cheapest way to reach ``tol``: an accelerated coupled iteration (per-step
    polynomial coefficients chosen for the current eigenvalue interval, then classic
    steps) with spectral scaling, or ``eigh`` where LAPACK is faster.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from ._dispatch import is_tensor, torch_backend
from ._numba._newton_schulz import _psd_probe
from ._validation import (
    as_float_array,
    check_finite,
    check_nonnegative_float,
    check_option,
    check_positive_float,
    check_positive_int,
    check_square,
    check_symmetric,
)
from ._warnings import IllConditionedWarning, NewtonSchulzDivergenceWarning

__all__ = ["inv_sqrtm", "sqrtm_psd", "NewtonSchulzInfo", "METHODS", "SCALINGS", "MAX_ITER", "default_tol"]

#: Methods accepted by :func:`inv_sqrtm` and :func:`sqrtm_psd`.
METHODS = ("coupled", "uncoupled", "eigh", "auto")
#: Scalings ``c`` of ``Y_0 = A / c``: Frobenius norm, trace, spectral-norm estimate.
SCALINGS = ("fro", "trace", "spectral")
#: Iteration cap when the count is driven by a tolerance.
MAX_ITER = 100

# power/inverse-iteration steps of the cheap spectrum probe
_PROBE_STEPS = 8
# the probe runs in Numba up to this size, via LAPACK above
_PROBE_NUMBA_MAX_N = 96


def default_tol(dtype, n: int) -> float:
    """Default stopping tolerance on ``||D_k D_k A - I||_F``: ``100 * sqrt(n) * eps(dtype)``.

    ``2.2e-14 sqrt(n)`` in float64, ``1.2e-5 sqrt(n)`` in float32 — the accuracy an
    exact inverse square root has for a well-conditioned ``A``.  For ill-conditioned
    ``A`` the residual floor is about ``cond(A) * eps``; the iteration then stops when
    the residual stops decreasing (see :func:`inv_sqrtm`, Notes).
    """
    return float(100.0 * math.sqrt(n) * np.finfo(np.dtype(dtype)).eps)


@dataclass(frozen=True)
class NewtonSchulzInfo:
    """Convergence record of :func:`inv_sqrtm` (``return_info=True``).

    Attributes
    ----------
    residuals : ndarray of float64, shape ``batch + (n_iter,)``
        ``||D_k D_k A - I||_F`` for ``k = 1..n_iter`` (the paper's Fig. 7 metric),
        evaluated in float64 from the iterate in the working dtype; ``A`` includes the
        ridge ``eps I``.  Non-finite values after a blow-up are kept.  A matrix that
        stopped early (tolerance, stagnation, divergence) repeats its last residual.
        ``method="eigh"``: shape ``batch + (1,)``, the residual of the exact result.
    n_iter : int
        Iterations run (the largest over the batch).
    converged : ndarray of bool, batch shape
        The returned iterate's residual is ``<= tol``.  When ``tol`` was not given
        (fixed ``n_iter`` or the default tolerance), every finite, non-diverged result
        counts as converged.
    diverged : ndarray of bool, batch shape
        The residual became non-finite, or grew above ``1000 x`` its best value, or
        above ``10 sqrt(n)`` (worse than ``D = 0``).
    best_iter : ndarray of int, batch shape
        1-based index of the iterate returned.
    scale : ndarray of float64, batch shape
        The ``c`` of ``Y_0 = A / c``.
    method, scaling : str
        As run (``"auto"`` reports the method it chose, e.g. ``"auto:accelerated"``).
    tol : float or None
        The tolerance used (the default one when neither ``n_iter`` nor ``tol`` was given).
    """

    residuals: np.ndarray
    n_iter: int
    converged: np.ndarray
    diverged: np.ndarray
    best_iter: np.ndarray
    scale: np.ndarray
    method: str
    scaling: str
    tol: float | None


# --------------------------------------------------------------------------- validation


def _validate(A, method, n_iter, tol, scaling, eps, return_info, name="A"):
    method = check_option(method, "method", METHODS)
    scaling = check_option(scaling, "scaling", SCALINGS)
    if n_iter is not None:
        n_iter = check_positive_int(n_iter, "n_iter")
    if tol is not None:
        tol = check_positive_float(tol, "tol")
    eps = check_nonnegative_float(eps, "eps")
    if not isinstance(return_info, (bool, np.bool_)):
        raise TypeError(f"expected return_info as a bool, got {return_info!r}")
    arr = as_float_array(A, name)
    if arr.ndim < 2:
        raise ValueError(
            f"expected {name} of shape (..., n, n), got ndim {arr.ndim} with shape {arr.shape}; "
            "pass a square matrix (a scalar a is the 1x1 matrix [[a]])"
        )
    if arr.shape[-1] != arr.shape[-2]:
        check_square(arr, name)  # raises with the house message
    if arr.shape[-1] == 0:
        raise ValueError(f"expected {name} with n >= 1 (shape (..., n, n)), got shape {arr.shape}")
    if arr.size:
        check_finite(arr, name)
        check_symmetric(arr, name)
    return arr, method, n_iter, tol, scaling, eps, bool(return_info)


def _probe(A64: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """PSD check + eigenvalue bounds; raises on indefinite input.

    The shift ``delta = 10 n eps(dtype) ||A||_F`` is the rounding tolerance: Cholesky of
    ``A + delta I`` fails exactly when ``A`` has an eigenvalue below ``-delta`` (up to
    float64 rounding), which is "indefinite beyond tolerance".
    """
    nb, n, _ = A64.shape
    fro = np.sqrt(np.einsum("bij,bij->b", A64, A64))
    delta = 10.0 * n * np.finfo(dtype).eps * fro
    lmin = np.empty(nb)
    lmax = np.empty(nb)
    ok = np.empty(nb, dtype=np.bool_)
    if n <= _PROBE_NUMBA_MAX_N:
        _psd_probe(A64, delta, _PROBE_STEPS, lmin, lmax, ok)
    else:
        _probe_lapack(A64, delta, lmin, lmax, ok)
    if not ok.all():
        bad = np.flatnonzero(~ok)
        raise ValueError(
            f"expected symmetric positive semidefinite matrices, but {bad.size} of {nb} "
            f"(first at flat batch index {bad[0]}) have an eigenvalue below -{delta[bad[0]]:.3g} "
            f"(= 10 n eps ||A||_F, the rounding tolerance): Cholesky of A + {delta[bad[0]]:.3g} I "
            "failed; an inverse square root needs A >= 0 — check how A was formed, or add a "
            "ridge with eps > 0 large enough to make it positive definite"
        )
    return lmin, lmax, delta


def _probe_lapack(A64, delta, lmin, lmax, ok):
    from scipy.linalg import lapack

    n = A64.shape[-1]
    for b in range(A64.shape[0]):
        a = A64[b] + delta[b] * np.eye(n)
        c, info = lapack.dpotrf(a, lower=1, clean=1)
        ok[b] = info == 0
        v = np.sqrt(np.abs(np.diag(A64[b]))) + 1e-3 * np.cos(1.7 * np.arange(n) + 0.3)
        est = 0.0
        for _ in range(_PROBE_STEPS):
            v = v / np.linalg.norm(v)
            v = A64[b] @ v
            est = float(np.linalg.norm(v))
        lmax[b] = est
        if info != 0:
            lmin[b] = np.nan
            continue
        v = np.cos(2.3 * np.arange(n) + 0.7) + 0.25
        inv_est = 0.0
        for _ in range(_PROBE_STEPS):
            v = v / np.linalg.norm(v)
            v, _info = lapack.dpotrs(c, v, lower=1)
            inv_est = float(np.linalg.norm(v))
        est_min = min(1.0 / inv_est, float(np.min(np.diag(c)) ** 2))
        lmin[b] = est_min - delta[b]


def _check_singular(lmin, lmax, delta, eps, nb):
    """Warn (naming ``eps``) when some matrix is numerically singular; raise for the zero matrix."""
    if np.any(lmax <= 0):
        raise ValueError(
            "expected a nonzero positive semidefinite matrix, got the zero matrix (all eigenvalues 0): "
            "its inverse square root does not exist; pass a ridge eps > 0 (A + eps I)"
        )
    sing = lmin <= delta
    if np.any(sing):
        i = int(np.flatnonzero(sing)[0])
        warnings.warn(
            f"{int(sing.sum())} of {nb} matrices are numerically singular (smallest eigenvalue "
            f"~{max(lmin[i], 0.0):.3g} <= {delta[i]:.3g}, largest ~{lmax[i]:.3g}; eps={eps:g}): "
            "A^(-1/2) is unbounded and Newton–Schulz iterates grow without limit on the null space; "
            f"pass a ridge eps > 0 (e.g. eps={max(1e-5 * lmax[i], np.finfo(float).tiny):.1g})",
            IllConditionedWarning,
            stacklevel=4,
        )


def _scale(A64, scaling, lmax):
    """``c`` of ``Y_0 = A / c`` (float64, per matrix)."""
    if scaling == "fro":
        return np.sqrt(np.einsum("bij,bij->b", A64, A64))
    if scaling == "trace":
        return np.einsum("bii->b", A64).copy()
    # spectral: the power-iteration estimate is a lower bound of lambda_max; it is never
    # allowed below ||A||_F / sqrt(n) (another lower bound) nor above ||A||_F (an upper bound).
    n = A64.shape[-1]
    fro = np.sqrt(np.einsum("bij,bij->b", A64, A64))
    return np.clip(lmax, fro / math.sqrt(n), fro)


# --------------------------------------------------------------------------- iterations


def _residual64(X: np.ndarray, Y0_64: np.ndarray) -> np.ndarray:
    """``||X X Y_0 - I||_F`` in float64 (``= ||D D A - I||_F`` for ``D = X / sqrt(c)``)."""
    X64 = X.astype(np.float64, copy=False)
    R = (X64 @ X64) @ Y0_64
    idx = np.arange(R.shape[-1])
    R[:, idx, idx] -= 1.0
    return np.sqrt(np.einsum("bij,bij->b", R, R))


class _Tracker:
    """Per-matrix stopping logic shared by the iterations (float64 residuals ``r_k``).

    A matrix stops when ``r_k <= tol`` (converged), when the residual stagnates at the
    rounding floor (``r_k < 0.5`` and ``r_k > 0.75 r_{k-1}``: in exact arithmetic the
    quadratic phase more than halves it), or when it diverges.  Stopping is only active
    in tolerance mode; with a fixed ``n_iter`` every matrix runs every step.
    """

    def __init__(self, nb, n, n_max, tol, stop_early):
        self.hist = np.full((nb, n_max), np.nan)
        self.best = np.full(nb, np.inf)
        self.best_iter = np.zeros(nb, dtype=np.int64)
        self.prev = np.full(nb, np.inf)
        self.active = np.ones(nb, dtype=bool)
        self.diverged = np.zeros(nb, dtype=bool)
        self.stop_iter = np.full(nb, n_max, dtype=np.int64)
        self.tol = tol
        self.stop_early = stop_early
        self.big = 10.0 * math.sqrt(n)

    def update(self, k, idx, r):
        """Record ``r`` (residuals of iterate ``k``, 1-based) for matrices ``idx``.

        Returns a mask over ``idx`` of matrices whose iterate improved on their best.
        """
        self.hist[idx, k - 1] = r
        finite = np.isfinite(r)
        improved = finite & (r < self.best[idx])
        self.best[idx[improved]] = r[improved]
        self.best_iter[idx[improved]] = k
        div = ~finite | (r > 1e3 * self.best[idx]) | (r > self.big)
        self.diverged[idx[div]] = True
        if self.stop_early:
            stag = (r < 0.5) & (r > 0.75 * self.prev[idx])
            done = div | stag | (r <= self.tol)
            self.active[idx[done]] = False
            self.stop_iter[idx[done]] = k
        self.prev[idx] = r
        return improved

    def finish(self, n_run):
        hist = self.hist[:, :n_run]
        # frozen matrices repeat their last residual
        for b in np.flatnonzero(self.stop_iter < n_run):
            k = self.stop_iter[b]
            hist[b, k:] = hist[b, k - 1]
        return hist


def _coef_classic(k):
    return 1.5, -0.5, 0.0


def _run_coupled(Y0, Y0_64, n_max, *, tol, record, stop_early, coefs=None):
    """Coupled iteration with per-step ``T = a I + b M + c M^2``, ``M = Z Y``.

    ``coefs(k) -> (a, b, c)`` for step ``k = 0, 1, ...`` (classic: ``(3/2, -1/2, 0)``).
    Returns ``(Z, Y, tracker or None, n_run)``; ``Z``/``Y`` are the best iterates when
    residuals were tracked, the last ones otherwise.
    """
    coefs = coefs or _coef_classic
    nb, n, _ = Y0.shape
    dt = Y0.dtype
    Y = Y0.copy()
    Z = np.broadcast_to(np.eye(n, dtype=dt), Y0.shape).copy()
    diag = np.arange(n)
    tracker = _Tracker(nb, n, n_max, tol, stop_early) if (record or stop_early) else None
    if tracker is not None:
        Zb = Z.copy()
        Yb = Y.copy()
    n_run = 0
    for k in range(n_max):
        if tracker is None:
            idx = slice(None)
            Ya, Za = Y, Z
        else:
            idx = np.flatnonzero(tracker.active)
            if idx.size == 0:
                break
            Ya, Za = (Y, Z) if idx.size == nb else (Y[idx], Z[idx])
        a, b, c2 = coefs(k)
        M = Za @ Ya
        if c2 != 0.0:
            T = (c2 * M) @ M
            T += b * M
        else:
            T = M
            T *= dt.type(b)
        T[:, diag, diag] += dt.type(a)
        Ya = Ya @ T
        Za = T @ Za
        if tracker is None:
            Y, Z = Ya, Za
        else:
            Y[idx] = Ya
            Z[idx] = Za
            r = _residual64(Za, Y0_64[idx])
            imp = tracker.update(k + 1, idx, r)
            Zb[idx[imp]] = Za[imp]
            Yb[idx[imp]] = Ya[imp]
        n_run = k + 1
    if tracker is not None:
        return Zb, Yb, tracker, n_run
    return Z, Y, None, n_run


def _run_uncoupled(Y0, Y0_64, n_max, *, tol, stop_early):
    """Uncoupled iteration (7.12): ``X <- (3X - X((X X) Y_0))/2``; residuals always tracked."""
    nb, n, _ = Y0.shape
    dt = Y0.dtype
    X = np.broadcast_to(np.eye(n, dtype=dt), Y0.shape).copy()
    Xb = X.copy()
    tracker = _Tracker(nb, n, n_max, tol, stop_early)
    n_run = 0
    half = dt.type(0.5)
    three = dt.type(3.0)
    for k in range(n_max):
        idx = np.flatnonzero(tracker.active)
        if idx.size == 0:
            break
        Xa = X if idx.size == nb else X[idx]
        Y0a = Y0 if idx.size == nb else Y0[idx]
        with np.errstate(all="ignore"):
            Q = (Xa @ Xa) @ Y0a
            Xa = (three * Xa - Xa @ Q) * half
            X[idx] = Xa
            r = _residual64(Xa, Y0_64[idx])
        imp = tracker.update(k + 1, idx, r)
        Xb[idx[imp]] = Xa[imp]
        n_run = k + 1
    return Xb, tracker, n_run


def _eigh_isqrt(A64, dtype, power=-0.5):
    lam, V = np.linalg.eigh(A64)
    if power < 0 and np.any(lam <= 0):
        b = int(np.flatnonzero((lam <= 0).any(axis=-1))[0])
        raise ValueError(
            f"expected positive definite matrices for method='eigh', but matrix {b} (flat batch index) "
            f"has eigenvalue {lam[b].min():.3g} <= 0 (largest {lam[b].max():.3g}): A^(-1/2) does not "
            "exist; pass a ridge eps > 0 (A + eps I)"
        )
    lam = np.maximum(lam, 0.0)
    D = (V * lam[:, None, :] ** power) @ np.swapaxes(V, -1, -2)
    return D.astype(dtype)


def _warn_diverged(tracker, method, nb):
    d = tracker.diverged
    if d.any():
        i = int(np.flatnonzero(d)[0])
        warnings.warn(
            f"the {method} Newton–Schulz iteration diverged for {int(d.sum())} of {nb} matrices "
            f"(e.g. flat batch index {i}: best residual {tracker.best[i]:.3g} at iteration "
            f"{tracker.best_iter[i]}); the best iterate is returned — use method='coupled' "
            "(stable) or fewer iterations",
            NewtonSchulzDivergenceWarning,
            stacklevel=4,
        )


# --------------------------------------------------------------------------- public API


def _solve(A, method, n_iter, tol, scaling, eps, return_info, *, want):
    arr, method, n_iter, tol, scaling, eps, return_info = _validate(
        A, method, n_iter, tol, scaling, eps, return_info
    )
    dtype = arr.dtype
    batch, n = arr.shape[:-2], arr.shape[-1]
    nb = int(np.prod(batch, dtype=np.int64))
    tol_used = tol if (tol is not None or n_iter is not None) else default_tol(dtype, n)

    if nb == 0:
        out = np.empty(arr.shape, dtype=dtype)
        if not return_info:
            return out
        z = np.zeros(batch, dtype=bool)
        info = NewtonSchulzInfo(
            residuals=np.empty(batch + (0 if method != "eigh" else 1,)), n_iter=0,
            converged=z.copy(), diverged=z.copy(), best_iter=np.zeros(batch, dtype=np.int64),
            scale=np.empty(batch), method=method, scaling=scaling, tol=tol_used,
        )
        return out, info

    A64 = arr.reshape(nb, n, n).astype(np.float64)  # copy: never touch the caller's data
    if eps:
        A64[:, np.arange(n), np.arange(n)] += eps
    A64 = (A64 + np.swapaxes(A64, -1, -2)) * 0.5

    if method == "auto":
        method = _auto_choice(n, nb, dtype)
    label = method

    if method == "eigh":
        lam_check = want == "isqrt"
        D = _eigh_isqrt(A64, dtype, power=-0.5 if lam_check else 0.5)
        out = D.reshape(arr.shape)
        if not return_info:
            return out
        Dinv = D if want == "isqrt" else _eigh_isqrt(A64, dtype)
        r = _residual64(Dinv, A64)
        finite = np.isfinite(r)
        info = NewtonSchulzInfo(
            residuals=r.reshape(batch + (1,)), n_iter=1,
            converged=(finite if tol_used is None else finite & (r <= tol_used)).reshape(batch),
            diverged=(~finite).reshape(batch), best_iter=np.ones(batch, dtype=np.int64),
            scale=np.ones(batch), method=label, scaling=scaling, tol=tol_used,
        )
        return out, info

    lmin, lmax, delta = _probe(A64, dtype)
    if want == "isqrt":
        _check_singular(lmin, lmax, delta, eps, nb)
    c = _scale(A64, scaling, lmax)
    c = np.where(c > 0, c, 1.0)
    Y0_64 = A64 / c[:, None, None]
    # the reference code divides A in the working precision by the norm
    Y0 = Y0_64 if dtype == np.float64 else A64.astype(dtype) / c.astype(dtype)[:, None, None]

    stop_early = tol_used is not None and (tol is not None or n_iter is None)
    n_max = n_iter if n_iter is not None else MAX_ITER
    record = return_info

    if method == "uncoupled":
        X, tracker, n_run = _run_uncoupled(Y0, Y0_64, n_max, tol=tol_used, stop_early=stop_early)
        Z, Y = X, None
    else:
        Z, Y, tracker, n_run = _run_coupled(Y0, Y0_64, n_max, tol=tol_used, record=record,
                                            stop_early=stop_early)
        if tracker is None and not np.isfinite(Z).all():
            # the cheap path blew up: rerun with residuals to return the best iterate
            Z, Y, tracker, n_run = _run_coupled(Y0, Y0_64, n_max, tol=tol_used, record=True,
                                                stop_early=False)
    if tracker is not None:
        _warn_diverged(tracker, label, nb)

    sc = np.sqrt(c)[:, None, None]
    if want == "isqrt":
        out = (Z / sc).astype(dtype)
    elif Y is not None:
        out = (Y * sc).astype(dtype)
    else:
        out = ((A64 @ Z.astype(np.float64)) / sc).astype(dtype)
    out = out.reshape(arr.shape)
    if not return_info:
        return out
    hist = tracker.finish(n_run)
    best_r = tracker.best
    finite = np.isfinite(best_r)
    if tol is None:  # fixed count or default tolerance: every finite, non-diverged result counts
        converged = finite & ~tracker.diverged
    else:
        converged = finite & (best_r <= tol)
    info = NewtonSchulzInfo(
        residuals=hist.reshape(batch + (n_run,)), n_iter=int(n_run),
        converged=converged.reshape(batch), diverged=tracker.diverged.reshape(batch),
        best_iter=tracker.best_iter.reshape(batch), scale=c.reshape(batch),
        method=label, scaling=scaling, tol=tol_used,
    )
    return out, info


def _auto_choice(n, nb, dtype):
    return "eigh" if n >= 256 else "coupled"


def inv_sqrtm(A, *, method="coupled", n_iter=None, tol=None, scaling="fro", eps=0.0, return_info=False):
    r"""Inverse square root ``D ~= (A + eps I)^{-1/2}`` of symmetric PSD matrices by Newton–Schulz.

    Coupled iteration (Higham 2008, Eq. 6.35; Ye et al. 2020, §4.5.3): ``c = scale(A)``,
    ``Y_0 = A/c``, ``Z_0 = I``, ``T_k = (3I - Z_k Y_k)/2``, ``Y_{k+1} = Y_k T_k``,
    ``Z_{k+1} = T_k Z_k``, ``D = Z_k / sqrt(c)``.  See the module docstring for the other
    methods.

    Parameters
    ----------
    A : array_like, shape (..., n, n)
        Symmetric positive semidefinite matrices (a covariance).  float32/float64 kept,
        integers promote to float64, float16 to float32.  Never modified.
    method : {"coupled", "uncoupled", "eigh", "auto"}
        See :data:`METHODS`.
    n_iter : int, optional
        Number of iterations (``>= 1``).  With ``tol`` as well it is the cap.
    tol : float, optional
        Stop a matrix when ``||D_k D_k A - I||_F <= tol`` (absolute, Frobenius norm,
        evaluated in float64; ``||I||_F = sqrt(n)``), or when the residual stops
        decreasing at its rounding floor.  Cap: ``n_iter`` or :data:`MAX_ITER`.
        With neither ``n_iter`` nor ``tol``: ``tol = default_tol(dtype, n)``.
    scaling : {"fro", "trace", "spectral"}
        ``c = ||A||_F`` (the reference code), ``trace(A)``, or an estimate of
        ``lambda_max(A)`` (8 power-iteration steps, kept within
        ``[||A||_F / sqrt(n), ||A||_F]``).  Ignored by ``"eigh"``.
    eps : float, default 0
        Ridge: the matrix inverted is ``A + eps I``.
    return_info : bool, default False
        Also return a :class:`NewtonSchulzInfo` with the float64 residual history.

    Returns
    -------
    D : ndarray, shape (..., n, n), dtype of ``A`` (float32 or float64)
    info : NewtonSchulzInfo
        Only with ``return_info=True``.

    Raises
    ------
    ValueError
        ndim < 2, non-square, empty matrices, non-finite values, asymmetry beyond
        ``100 eps max|A|``, an eigenvalue below ``-10 n eps(dtype) ||A||_F`` (indefinite),
        the zero matrix, ``method="eigh"`` on a singular matrix, unknown ``method`` or
        ``scaling``, ``n_iter < 1``, ``tol <= 0``, ``eps < 0``.
    TypeError
        Complex input, non-integer ``n_iter``.

    Warns
    -----
    NewtonSchulzDivergenceWarning
        The iteration blew up; ``D`` is the best iterate.
    IllConditionedWarning
        ``A + eps I`` is numerically singular (pass ``eps > 0``).

    Notes
    -----
    Positive semidefiniteness is checked by a Cholesky factorisation of
    ``A + delta I``, ``delta = 10 n eps(dtype) ||A||_F`` (``n^3/3`` flops, less than a
    sixth of one iteration); the same factor gives an estimate of ``lambda_min`` for the
    singularity warning.

    Examples
    --------
    >>> import numpy as np, nsiter
    >>> A = np.array([[4.0, 1.0], [1.0, 3.0]])
    >>> D = nsiter.inv_sqrtm(A, n_iter=20)
    >>> np.allclose(D @ A @ D, np.eye(2))
    True
    """
    if is_tensor(A):
        return torch_backend().inv_sqrtm(A, method=method, n_iter=n_iter, tol=tol, scaling=scaling,
                                         eps=eps, return_info=return_info)
    return _solve(A, method, n_iter, tol, scaling, eps, return_info, want="isqrt")


def sqrtm_psd(A, *, method="coupled", n_iter=None, tol=None, scaling="fro", eps=0.0, return_info=False):
    r"""Square root ``S ~= (A + eps I)^{1/2}`` of symmetric PSD matrices: the ``Y`` sequence.

    The coupled iteration of :func:`inv_sqrtm` (Higham 2008, Eq. 6.35) also gives
    ``Y_k sqrt(c) -> A^{1/2}``; ``"eigh"`` returns ``V diag(lambda^{1/2}) V^T`` (negative
    rounding-level eigenvalues clipped to 0); ``"uncoupled"`` returns ``A X_k / sqrt(c)``.
    Parameters, stopping rule and ``info`` are those of :func:`inv_sqrtm` (the residuals
    are those of the inverse root ``Z_k``).

    Examples
    --------
    >>> import numpy as np, nsiter
    >>> S = nsiter.sqrtm_psd(np.diag([4.0, 9.0]), n_iter=30)
    >>> np.round(np.diag(S), 6)
    array([2., 3.])
    """
    if is_tensor(A):
        return torch_backend().sqrtm_psd(A, method=method, n_iter=n_iter, tol=tol, scaling=scaling,
                                         eps=eps, return_info=return_info)
    return _solve(A, method, n_iter, tol, scaling, eps, return_info, want="sqrt")
