r"""Newton–Schulz inverse square roots of symmetric positive (semi)definite matrices.

``D = inv_sqrtm(A)`` approximates ``A^{-1/2}``: the deconvolution (whitening) matrix
``D = (Cov + eps I)^{-1/2}`` of Ye et al. (2020), §4.5.3 and appendix A.3.  Written once
for numpy arrays and torch tensors (:mod:`nsiter._backend`); the backends supply kernels
only (:mod:`nsiter._numba.linalg`, :mod:`nsiter._torch.linalg`).  Every method works on
``A / s`` with ``s = 4^k`` bringing the largest entry near 1 (exact, so results are right at
every representable scale) and scales the result back by the exact ``sqrt(s)``.

Methods (registry :data:`METHODS`):

``"coupled"``
    Higham, *Functions of Matrices* (2008), Eq. (6.35), the iteration of the paper:
    ``c = scale(A)``, ``Y_0 = A/c``, ``Z_0 = I``,

    .. math::  T_k = \tfrac12 (3I - Z_k Y_k), \quad Y_{k+1} = Y_k T_k, \quad Z_{k+1} = T_k Z_k,

    ``D = Z_k / sqrt(c)``, ``Y_k sqrt(c) -> A^{1/2}``; stable for thousands of steps.  With
    ``n_iter=5, scaling="fro"`` it is the reference code's ``isqrt_newton_schulz_autograd``
    (same products in the same order; the first step uses ``Z_0 = I`` exactly).
``"uncoupled"``
    Higham (2008), Eq. (7.12), ``X_0 = I``, ``X_{k+1} = (3 X_k - X_k ((X_k X_k) Y_0)) / 2``,
    ``D = X_k/sqrt(c)``.  It amplifies rounding errors whenever ``cond(A) > 9`` and blows up
    (the paper's Fig. 7), so it is kept as it is, its float64 residual always tracked so
    that the best iterate can be returned.
``"accelerated"``
    The coupled iteration with per-step ``T_k = a_k I + b_k Z_k Y_k``: an eigenvalue ``p`` of
    ``Z Y`` maps to ``q(sqrt p)^2`` with the odd cubic ``q(s) = a s + b s^3``, the
    polar/sign-function iteration on ``sqrt(p)``, so the per-step minimax polynomials of
    Polar Express / CANS apply.  Step ``k`` maps the current interval of ``sqrt(p)`` into
    ``[1 - E_k, 1 + E_k]`` and becomes the classic step as ``E_k -> 0``.  The first interval
    comes from rigorous bounds on ``lambda_max`` (``||A||_F``, ``||A||_inf``) and the probe's
    ``lambda_min`` (inverse iteration on the Cholesky factor of the PSD check, halved for
    safety).  Small eigenvalues grow 6.75x per step instead of 2.25x.
``"eigh"``
    The exact ``V diag(lambda^{-1/2}) V^T`` from a float64 LAPACK eigendecomposition.
``"auto"``
    Per matrix, the cheaper of ``"accelerated"`` (its step count predicted from the schedule)
    and ``"eigh"``, by the cost model of :mod:`nsiter._tuning` (``analysis/calibrate_auto.py``);
    ``eigh`` also where the requested ``tol`` is below the iteration's rounding floor.  The
    probe is skipped where ``eigh`` beats even the best-conditioned schedule; a matrix the
    probe finds numerically singular goes to the iteration (which warns and returns its best
    iterate), never to ``eigh`` (which raises).  On the torch device path (CUDA) ``auto``
    always iterates: a GPU ``eigh`` is far slower than the CPU cost model assumes.

Stopping (``tol``, or :func:`default_tol` when neither ``n_iter`` nor ``tol`` is given): at
the first iterate with ``||D_k D_k A - I||_F <= tol`` (the float64 Fig. 7 residual), at the
rounding floor (stagnation), or on divergence — the one policy of :mod:`nsiter._policy`.
The test runs on the free by-product ``||Z_k Y_k - I||_F`` (equal in exact arithmetic; the
next step's first product); the float64 residual (2 products) only confirms a stop, or is
recorded every step with ``return_info=True``.

The coupled step exists twice, pinned together by tests of their decisions and results: as
array code here (:func:`_run_fixed`, :func:`_run_coupled`; numpy ``@`` or torch, autograd
flowing) and as the fused Numba kernel ``_coupled_ns_one`` the numpy backend runs for small
``n`` (one matrix per thread).  The backend chooses (``coupled_kernel(n)``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import _tuning
from ._backend import backend
from ._conventions import check_budget
from ._policy import BLOWUP_GROWTH, BLOWUP_SQRT_N, MAX_ITER, STAGNATION_BELOW, STAGNATION_RATIO
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
from ._warnings import IllConditionedWarning, NewtonSchulzDivergenceWarning, NsiterWarning, warn

__all__ = ["inv_sqrtm", "sqrtm_psd", "NewtonSchulzInfo", "METHODS", "SCALINGS", "MAX_ITER", "default_tol"]


class _Method(NamedTuple):
    """A method of :func:`inv_sqrtm`: which runner, whether it designs a schedule, and
    whether it weighs ``eigh`` against the iteration per matrix."""

    runner: str  # "coupled", "uncoupled" or "eigh"
    scheduled: bool = False
    auto: bool = False


_METHODS = {
    "coupled": _Method("coupled"),
    "uncoupled": _Method("uncoupled"),
    "accelerated": _Method("coupled", scheduled=True),
    "eigh": _Method("eigh"),
    "auto": _Method("coupled", scheduled=True, auto=True),
}
#: Methods accepted by :func:`inv_sqrtm` and :func:`sqrtm_psd`.
METHODS = tuple(_METHODS)
#: Scalings ``c`` of ``Y_0 = A / c``: Frobenius norm, trace, spectral-norm estimate.
SCALINGS = ("fro", "trace", "spectral")

# inverse-iteration steps of the spectrum probe: enough to flag a singular matrix, more
# where the estimate of lambda_min designs the accelerated schedule; power-iteration
# steps for the spectral scaling
_PROBE_INVERSE_STEPS = 3
_PROBE_INVERSE_STEPS_SCHEDULE = 4
_PROBE_POWER_STEPS = 8
# the inverse-iteration estimate of lambda_min is an upper bound; the accelerated
# schedule is designed for lambda_min / _LMIN_SAFETY
_LMIN_SAFETY = 2.0
# the classic step T = a I + b M + c M^2 of Eq. (6.35)
_CLASSIC = (1.5, -0.5, 0.0)


def default_tol(dtype, n: int) -> float:
    """Default stopping tolerance on ``||D_k D_k A - I||_F``: ``100 * sqrt(n) * eps(dtype)``.

    ``2.2e-14 sqrt(n)`` in float64, ``1.2e-5 sqrt(n)`` in float32 — the accuracy an
    exact inverse square root has for a well-conditioned ``A``.  For ill-conditioned
    ``A`` the residual floor is about ``cond(A) * eps``; the iteration then stops when
    the residual stops decreasing (see :func:`inv_sqrtm`, Notes).
    """
    return float(100.0 * math.sqrt(n) * _eps(dtype))


def _np_dtype(dtype) -> np.dtype:
    """The numpy dtype of a numpy dtype (or type) or of a torch float32/float64 dtype."""
    try:
        return np.dtype(dtype)
    except TypeError:  # a torch dtype
        return np.dtype(np.float32) if str(dtype) == "torch.float32" else np.dtype(np.float64)


@functools.lru_cache(maxsize=None)
def _eps(dtype) -> float:
    """Machine epsilon of a numpy or torch float dtype (cached: ``np.finfo`` is slow per call)."""
    return float(np.finfo(_np_dtype(dtype)).eps)


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
        Always numpy arrays on the host, whichever backend ran.
    n_iter : int
        Iterations run (the largest over the batch).
    converged : ndarray of bool, batch shape
        The returned result's residual is ``<= info.tol`` (never true when the residual
        was not evaluated).
    diverged : ndarray of bool, batch shape
        The residual became non-finite, or grew too far (:mod:`nsiter._policy`).
    best_iter : ndarray of int, batch shape
        1-based index of the iterate returned.
    scale : ndarray of float64, batch shape
        The ``c`` of ``Y_0 = A / c``.
    method, scaling : str
        As run (``"auto"`` reports the method it chose, e.g. ``"auto:accelerated"``).
    tol : float or ndarray of float64 (batch shape)
        What ``converged`` is judged against: ``tol`` when given; otherwise, per matrix, the
        default :func:`default_tol` raised to the matrix's rounding floor
        (``10 kappa sqrt(n) eps``, ``kappa`` from ``eigh`` or the spectrum probe).  The
        iteration itself stops at ``default_tol`` or at its rounding floor.
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
    """Options and shape checks (the entries are checked by :func:`_check_entries`)."""
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
            f"expected {name} of shape (..., n, n), got ndim {arr.ndim} with shape {tuple(arr.shape)}; "
            "pass a square matrix (a scalar a is the 1x1 matrix [[a]])"
        )
    if arr.shape[-1] != arr.shape[-2]:
        check_square(arr, name)  # raises with the house message
    n = arr.shape[-1]
    if n == 0:
        raise ValueError(f"expected {name} with n >= 1 (shape (..., n, n)), got shape {tuple(arr.shape)}")
    # one product per matrix at least: refuse what could not finish, before any allocation
    check_budget(math.prod(arr.shape[:-2]) * n ** 3, "MAX_WORK", lambda: f"the inverse square root of {tuple(arr.shape)}",
                 "split the batch or reduce n (a covariance of fewer features: a block_size)")
    check_budget(math.prod(arr.shape), "MAX_ELEMENTS", lambda: f"a result of shape {tuple(arr.shape)}", "split the batch")
    return arr, method, n_iter, tol, scaling, eps, bool(return_info)


def _asym_rel(dtype) -> float:
    """The asymmetry :func:`_check_entries` tolerates, relative to ``max|a_ij|``: ``100 eps(dtype)``."""
    return 100 * _eps(dtype)


def _check_entries(be, arr, stats, name="A"):
    """Raise the house errors for non-finite or asymmetric entries, from the ``stats`` of
    the backend's ``prepare`` kernel (host array); the error paths re-read ``arr``."""
    if not stats[:, 0].all():
        check_finite(arr, name)
    # relative to max|a_ij| (max|a_ij - a_ji| <= 2 max|a_ij|: a zero matrix passes)
    if (stats[:, 2] > _asym_rel(arr.dtype) * stats[:, 1]).any():
        check_symmetric(be.host(arr), name)


def _raise_zero(fro):
    if (fro == 0).any():
        raise ValueError(
            "expected a nonzero positive semidefinite matrix, got the zero matrix (all eigenvalues 0) "
            f"at flat batch index {int(np.flatnonzero(fro == 0)[0])}: its inverse square root does not "
            "exist; pass a ridge eps > 0 (A + eps I)"
        )


def _raise_indefinite(ok, delta, nb):
    """The probe's error for matrices (``~ok``) with an eigenvalue below ``-delta``."""
    if not ok.all():
        bad = np.flatnonzero(~ok)
        raise ValueError(
            f"expected symmetric positive semidefinite matrices, but {bad.size} of {nb} "
            f"(first at flat batch index {bad[0]}) have an eigenvalue below -{delta[bad[0]]:.3g} "
            f"(= 10 n eps ||A||_F, the rounding tolerance): Cholesky of A + {delta[bad[0]]:.3g} I "
            "failed; an inverse square root needs A >= 0 — check how A was formed, or add a "
            "ridge with eps > 0 large enough to make it positive definite"
        )


def _delta(fro, n, dtype):
    """Rounding tolerance of the PSD test, ``10 n eps(dtype) ||A||_F`` (1 for the zero matrix)."""
    return np.where(fro > 0, 10.0 * n * _eps(dtype) * fro, 1.0)


def _singular_rel(n, dtype) -> float:
    """``max(10 eps(dtype), n eps(float64))``: :func:`_singular_tol` relative to ``||A||_F``."""
    return max(10.0 * _eps(dtype), n * _eps(np.float64))


def _singular_tol(fro, n, dtype):
    """``max(10 eps(dtype), n eps(float64)) ||A||_F``: an eigenvalue at the rounding level of
    the entries (and above the float64 error of the Cholesky-based estimate)."""
    return _singular_rel(n, dtype) * fro


def _check_singular(lmin, fro, sing_tol, eps, nb):
    """Warn (naming ``eps``) when ``lambda_min <= sing_tol`` (:func:`_singular_tol`) for some matrix."""
    sing = lmin <= sing_tol
    if sing.any():
        i = int(np.flatnonzero(sing)[0])
        warn(
            f"{int(sing.sum())} of {nb} matrices are numerically singular (e.g. flat batch index {i}: "
            f"smallest eigenvalue ~{max(lmin[i], 0.0):.3g} <= {sing_tol[i]:.3g}, the rounding level, "
            f"||A||_F = {fro[i]:.3g}; eps={eps:g}): A^(-1/2) is unbounded and Newton–Schulz iterates grow "
            f"without limit on the null space; pass a ridge eps > 0 (e.g. eps={1e-5 * fro[i]:.1g})",
            IllConditionedWarning,
        )


class _SingularError(ValueError):
    """``eigh`` met a singular matrix (``auto`` then routes it to the iteration instead)."""


def _check_spectrum(lo, hi, delta, eps, power):
    """Reject indefinite matrices (``lo < -delta``) and, for ``power < 0``, singular ones (``lo <= 0``).

    ``lo``/``hi``: the smallest/largest eigenvalues per matrix; ``delta``: :func:`_delta`.
    """
    bad = lo < -delta
    if bad.any():
        b = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"expected symmetric positive semidefinite matrices, but {int(bad.sum())} of {len(lo)} "
            f"(first at flat batch index {b}) have eigenvalue {lo[b]:.3g} below -{delta[b]:.3g} "
            "(= 10 n eps ||A||_F, the rounding tolerance); check how A was formed, or add a ridge "
            "with eps > 0 large enough to make it positive definite"
        )
    if power < 0 and np.any(lo <= 0):
        b = int(np.flatnonzero(lo <= 0)[0])
        raise _SingularError(
            f"expected positive definite matrices for method='eigh', but matrix {b} (flat batch "
            f"index) is singular: eigenvalue {lo[b]:.3g} <= 0 (largest {hi[b]:.3g}, eps={eps:g}); "
            "A^(-1/2) does not exist — pass a ridge eps > 0 (A + eps I)"
        )


# --------------------------------------------------------------------------- the iteration, array code


def _scale(be, A64, scaling, lmax, fro):
    """``c`` of ``Y_0 = A / c`` (float64, per matrix, differentiable; zeros -> 1);
    ``fro = ||A||_F`` and ``lmax`` (power-iteration estimate) as backend arrays."""
    xp = be.xp
    if scaling == "fro":
        c = fro
    elif scaling == "trace":
        c = xp.sum(xp.linalg.diagonal(A64), axis=-1)
    else:
        # the power-iteration estimate is a lower bound of lambda_max; it is never allowed
        # below ||A||_F / sqrt(n) (another lower bound) nor above ||A||_F (an upper bound)
        c = xp.minimum(xp.maximum(lmax, fro / math.sqrt(A64.shape[-1])), fro)
    return xp.where(c > 0, c, xp.ones_like(c))


def _initial(be, A64, c, dtype):
    """``(Y_0, Y_0 in float64)``, ``Y_0 = A / c``; the reference code divides in the working dtype."""
    xp = be.xp
    Y0_64 = A64 / c[:, None, None]
    if _np_dtype(dtype) == np.float64:
        return Y0_64, Y0_64
    return xp.astype(A64, dtype) / xp.astype(c, dtype)[:, None, None], Y0_64


def _finish(be, Z, Y, A64, c, s, want, dtype):
    """The result in ``dtype``: ``Z / sqrt(c s)`` (``A^{-1/2}``) or ``Y sqrt(c s)`` (``A^{1/2}``;
    ``A Z / sqrt(c)`` when the runner has no ``Y``), for ``A = s A64`` (``s = 4^k``: the
    factor ``sqrt(s)`` is an exact power of two, applied last).

    ``Z / sqrt(c s)`` is ``Z`` times the float64 reciprocal ``1 / (sqrt(c) sqrt(s))``: within one
    float64 rounding of the quotient (far below the iteration's error, and below float32's
    half ulp), at the cost of a product per entry instead of a division (vector division
    costs about four times as much on the CPU)."""
    xp = be.xp
    sc = xp.sqrt(c)[:, None, None]
    rs = xp.sqrt(s)[:, None, None]  # a power of two: sc * rs and sc / rs are exact
    # (float64 scale factors promote Z or Y: one pass, the product in float64)
    if want == "isqrt":
        out = Z * (1.0 / (sc * rs))
    elif Y is not None:
        out = Y * (sc * rs)
    else:
        out = (A64 @ xp.astype(Z, xp.float64, copy=False)) * (rs / sc)
    return xp.astype(out, dtype, copy=False)


def _detached64(be, X):
    X = X.detach() if be.torch else X
    return be.xp.astype(X, be.xp.float64, copy=False)


def _residual64(be, X, Y0_64):
    """``||X X Y_0 - I||_F`` in float64, on the host (``= ||D D A - I||_F`` for ``D = X / sqrt(c)``)."""
    X64 = _detached64(be, X)
    R = (X64 @ X64) @ _detached64(be, Y0_64) - be.eye(X.shape[-1], X64)
    return be.host(be.fro(R))


def _fro_minus_identity(be, M):
    """``||M - I||_F`` in float64 on the host: the free by-product residual of a coupled step."""
    M64 = _detached64(be, M)
    return be.host(be.fro(M64 - be.eye(M.shape[-1], M64)))


def _step_coefs(be, coefs, rows, k, like):
    """Step-``k`` coefficients ``(a, b, c2, quadratic)`` of matrices ``rows``: ``(m, 1, 1)``
    arrays in the working dtype (``coefs=None``: the classic step, as scalars)."""
    if coefs is None:
        return _CLASSIC + (False,)
    ck = np.ascontiguousarray(coefs[rows, k])
    t = be.asarray(ck, like, dtype=like.dtype)
    return t[:, 0, None, None], t[:, 1, None, None], t[:, 2, None, None], bool((ck[:, 2] != 0).any())


def _make_T(M, a, b, c2, quadratic, eye):
    """``T = a I + b M + c2 M^2`` in the order of the Numba kernel (``c2 (M M) + b M``, then the diagonal)."""
    T = b * M
    if quadratic:
        T = c2 * (M @ M) + T
    return T + a * eye


def _run_fixed(be, Y0, n_iter, coefs, want_y):
    """Coupled iteration, fixed count, no residuals: the fast path (autograd flows; on the
    torch device path no host sync, so that it can be captured in a CUDA graph).

    Step 0 uses ``Z_0 = I`` (``M = Y_0``, ``Z_1 = T``: two products saved, bit-identical);
    the last step skips ``Y T`` unless the square root (``want_y``) is wanted.  ``coefs``:
    ``(nb, >= n_iter, 3)`` per-matrix ``(a, b, c2)`` (``None``: the classic step).
    Returns ``(Z, Y)``.
    """
    nb, n, _ = Y0.shape
    eye = be.eye(n, Y0)
    rows = np.arange(nb)
    Y, Z = Y0, None
    for k in range(n_iter):
        a, b, c2, quad = _step_coefs(be, coefs, rows, k, Y0)
        T = _make_T(Y if Z is None else Z @ Y, a, b, c2, quad, eye)
        if want_y or k < n_iter - 1:
            Y = Y @ T
        Z = T if Z is None else T @ Z
    return Z, Y


def _diverging(r, best, big):
    """The blow-up test of :mod:`nsiter._policy` (elementwise on host arrays)."""
    return ~np.isfinite(r) | (r > BLOWUP_GROWTH * best) | (r > big)


def _stagnating(r, prev):
    """The rounding-floor test of :mod:`nsiter._policy` (elementwise on host arrays)."""
    return (r < STAGNATION_BELOW) & (r > STAGNATION_RATIO * prev)


def _run_coupled(be, Y0, Y0_64, coefs, n_max, *, tol, record, stop_early, k_last=None):
    """The coupled iteration with the stopping policy, batched: the array-code twin of the
    fused Numba kernel ``_coupled_ns_one`` (same per-matrix decisions; see its docstring).

    With ``stop_early`` the free by-product ``rho_k = ||Z_k Y_k - I||_F`` gates divergence,
    tolerance and stagnation until the float64 metric ``r_k = ||Z_k Z_k Y_0 - I||_F``
    disagrees; ``k_last`` (predicted last iterate) forms ``Z`` first and stops without
    ``Y`` when ``r_k <= tol``; ``record`` stores every ``r_k`` and keeps the best iterate by
    ``r_k``.  A divergence seen in the by-product keeps no copy (the caller reruns the
    matrix with ``record``).  Active matrices are iterated as a sub-batch.  Returns
    ``(Z, Y, n_done, returned_iter, diverged, returned_r, hist)``.
    """
    nb, n, _ = Y0.shape
    eye = be.eye(n, Y0)
    tol = float(tol or 0.0)
    big = BLOWUP_SQRT_N * math.sqrt(n)
    k_last = np.zeros(nb, dtype=np.int64) if k_last is None else np.asarray(k_last, dtype=np.int64)
    Y = Y0
    Z = be.xp.broadcast_to(eye, (nb, n, n))
    Zb, Yb = Z, Y
    hist = np.full((nb, n_max if record else 1), np.nan)
    use_metric = np.zeros(nb, dtype=bool)  # decisions on r_k instead of rho_k
    best = np.full(nb, np.inf)  # best by-product rho_k
    best_m = np.full(nb, np.inf)  # best r_k seen (record / metric mode); its iterate in Zb, Yb
    best_mk = np.zeros(nb, dtype=np.int64)
    best_r = np.full(nb, np.nan)
    prev = np.full(nb, np.inf)
    best_k = np.zeros(nb, dtype=np.int64)
    diverged = np.zeros(nb, dtype=bool)
    done = np.zeros(nb, dtype=np.int64)
    restore = np.zeros(nb, dtype=bool)
    stopped = np.zeros(nb, dtype=bool)
    r_last = np.full(nb, np.nan)
    active = np.ones(nb, dtype=bool)

    def keep_best(sel, Zs, Ys, pos):
        nonlocal Zb, Yb
        if sel.size:
            Zb = be.put(Zb, sel, be.take(Zs, pos))
            Yb = be.put(Yb, sel, be.take(Ys, pos))

    def subset(keep, *ts):
        return tuple(be.take(t, keep) for t in ts)

    for k in range(n_max):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        Ya, Za = (Y, Z) if idx.size == nb else subset(idx, Y, Z)
        M = Ya if k == 0 else Za @ Ya
        if stop_early and k >= 1:
            loc = np.flatnonzero(~use_metric[idx])
            if loc.size:
                g = idx[loc]
                rho = _fro_minus_identity(be, be.take(M, loc))
                div = _diverging(rho, best[g], big)
                gd = g[div]
                diverged[gd] = True
                restore[gd] = bool(record)
                best_k[gd] = k
                active[gd] = False
                ok = ~div
                imp = ok & (rho < best[g])
                best[g[imp]] = rho[imp]
                stag = ok & _stagnating(rho, prev[g])
                prev[g[ok]] = rho[ok]
                cand = ok & ((rho <= tol) | stag)
                if cand.any():
                    cl, gc = loc[cand], g[cand]
                    if not record:
                        r_last[gc] = _residual64(be, be.take(Za, cl), be.take(Y0_64, gc))
                    r = r_last[gc]
                    fin = (r <= tol) | stag[cand]
                    best_r[gc[fin]] = r[fin]
                    best_k[gc[fin]] = k
                    stopped[gc[fin]] = True
                    active[gc[fin]] = False
                    sw, rs = gc[~fin], r[~fin]
                    use_metric[sw] = True
                    prev[sw] = best_m[sw] = rs
                    best_mk[sw] = k
                    keep_best(sw, Za, Ya, cl[~fin])
                keep = np.flatnonzero(active[idx])
                if keep.size < idx.size:  # matrices that stopped before this step
                    if keep.size == 0:
                        continue
                    idx = idx[keep]
                    Ya, Za, M = subset(keep, Ya, Za, M)
        a, b, c2, quad = _step_coefs(be, coefs, idx, k, Y0)
        T = _make_T(M, a, b, c2, quad, eye)
        Za = T if k == 0 else T @ Za
        done[idx] = k + 1
        need = record | use_metric[idx] | (stop_early & (k_last[idx] == k + 1))
        if need.any():
            loc = np.flatnonzero(need)
            g = idx[loc]
            r_last[g] = _residual64(be, be.take(Za, loc), be.take(Y0_64, g))
            if record:
                hist[g, k] = r_last[g]
            if stop_early:
                acc = (k_last[g] == k + 1) & ~use_metric[g] & (r_last[g] <= tol)
                if acc.any():  # accepted at the predicted step: Z is stored, Y is not formed
                    ga = g[acc]
                    best_r[ga] = r_last[ga]
                    best_k[ga] = k + 1
                    stopped[ga] = True
                    active[ga] = False
                    Z = be.put(Z, idx, Za)
                    keep = np.flatnonzero(~np.isin(idx, ga))
                    if keep.size == 0:
                        continue
                    idx = idx[keep]
                    Ya, Za, T = subset(keep, Ya, Za, T)
        Ya = Ya @ T
        Y, Z = be.put(Y, idx, Ya), be.put(Z, idx, Za)
        dec = record | use_metric[idx]
        if dec.any():
            loc = np.flatnonzero(dec)
            g = idx[loc]
            r = r_last[g]
            finite = np.isfinite(r)
            imp = finite & (r < best_m[g])
            best_m[g[imp]] = r[imp]
            best_mk[g[imp]] = k + 1
            keep_best(g[imp], Za, Ya, loc[imp])
            um = use_metric[g]
            check = um | (not stop_early)
            diverged[g[check & _diverging(r, best_m[g], big)]] = True
            stop = um & (diverged[g] | (r <= tol) | _stagnating(r, prev[g]))
            gs = g[stop]
            conv = r[stop] <= tol
            restore[gs[~conv]] = True
            best_k[gs[conv]] = k + 1
            best_r[gs[conv]] = r[stop][conv]
            stopped[gs] = True
            active[gs] = False
            prev[g[um & ~stop]] = r[um & ~stop]
    use_best = restore | (diverged & bool(record) & (not stop_early))
    Z_out = be.where_rows(use_best, Zb, Z)
    Y_out = be.where_rows(use_best, Yb, Y)
    best_k[use_best] = best_mk[use_best]
    best_r[use_best] = best_m[use_best]
    last = ~use_best & ~stopped & ~diverged
    if last.any():
        best_k[last] = done[last]
        if record:
            best_r[last] = r_last[last]
        elif stop_early:
            lt = np.flatnonzero(last)
            best_r[last] = _residual64(be, be.take(Z, lt), be.take(Y0_64, lt))
        else:
            best_r[last] = np.nan
    return Z_out, Y_out, done, best_k, diverged, best_r, hist


def _run_uncoupled(be, Y0, Y0_64, n_max, *, tol, stop_early):
    """Uncoupled iteration (7.12) ``X <- (3X - X((X X) Y_0))/2``, its float64 residual always
    tracked (the policy of :mod:`nsiter._policy`; stopping only in tolerance mode).

    Returns ``(X, n_done, n_run, returned_iter, diverged, returned_r, hist)``: the best
    iterate after a blow-up, else the one each matrix stopped at.
    """
    nb, n, _ = Y0.shape
    X = Xb = be.xp.broadcast_to(be.eye(n, Y0), (nb, n, n))
    hist = np.full((nb, n_max), np.nan)
    best, prev = np.full(nb, np.inf), np.full(nb, np.inf)
    best_it, stop = np.zeros(nb, dtype=np.int64), np.full(nb, n_max, dtype=np.int64)
    active, div = np.ones(nb, dtype=bool), np.zeros(nb, dtype=bool)
    big = BLOWUP_SQRT_N * math.sqrt(n)
    n_run = 0
    with np.errstate(all="ignore"):
        for k in range(n_max):
            idx = np.flatnonzero(active)
            if idx.size == 0:
                break
            Xa, Y0a = be.take(X, idx), be.take(Y0, idx)
            Xa = (3.0 * Xa - Xa @ ((Xa @ Xa) @ Y0a)) * 0.5
            X = be.put(X, idx, Xa)
            hist[idx, k] = r = _residual64(be, Xa, be.take(Y0_64, idx))
            imp = np.isfinite(r) & (r < best[idx])
            best[idx[imp]], best_it[idx[imp]] = r[imp], k + 1
            if imp.any():
                Xb = be.put(Xb, idx[imp], be.take(Xa, np.flatnonzero(imp)))
            d = _diverging(r, best[idx], big)
            div[idx[d]] = True
            if stop_early:
                done = d | _stagnating(r, prev[idx]) | (r <= tol)
                active[idx[done]], stop[idx[done]] = False, k + 1
            prev[idx] = r
            n_run = k + 1
    last = np.minimum(stop, n_run)
    ret_iter = np.where(div, best_it, last)
    ret_r = np.where(div, best, hist[np.arange(nb), np.maximum(last, 1) - 1])
    return be.where_rows(div, Xb, X), last, n_run, ret_iter, div, ret_r, hist[:, :n_run]


def _freeze_history(hist, n_done, n_run):
    """History up to ``n_run``; a matrix that stopped early repeats its last residual."""
    hist = hist[:, :n_run].copy()
    for b in np.flatnonzero(n_done < n_run):
        k = n_done[b]
        if k > 0:
            hist[b, k:] = hist[b, k - 1]
    return hist


# --------------------------------------------------------------------------- schedules


def _deg3_minimax(lo, hi):
    """Best odd cubic ``q(s) = a s + b s^3`` for ``q(s) ~= 1`` on ``[lo, hi]`` (``s = sqrt(p)``).

    Equioscillation at ``lo``, ``s*`` and ``hi``: ``q(lo) = q(hi) = 1 - E``,
    ``q(s*) = 1 + E`` with ``s*^2 = (hi^2 + hi lo + lo^2)/3`` (closed form).  In terms of
    the coupled iteration, ``T = a I + b M`` maps an eigenvalue ``p`` of ``M = Z Y`` to
    ``p (a + b p)^2 = q(sqrt p)^2``.  Works elementwise on arrays.  Returns ``(a, b, E)``.
    """
    S = hi * hi + hi * lo + lo * lo
    s_star = np.sqrt(S / 3.0)
    g = (2.0 / 3.0) * s_star + lo * hi * (hi + lo) / S
    a = 2.0 / g
    b = -a / S
    E = (2.0 / 3.0) * a * s_star - 1.0
    return a, b, E


def _design_schedule(p_lo, tol: float, n: int, n_max: int, with_coefs: bool = True):
    """Per-matrix, per-step coefficients of the accelerated coupled iteration.

    The eigenvalues of ``Y_0`` lie in ``[p_lo, 1]`` (``p_lo``: one value per matrix).
    Step ``k`` uses the minimax cubic of :func:`_deg3_minimax` for the current interval
    ``[lo_k, hi_k]`` of ``sqrt(p)`` (the polar/sign-function view of the iteration, as in
    Polar Express / CANS), which maps it into ``[1 - E_k, 1 + E_k]``; as ``E_k -> 0`` the
    step becomes the classic ``(3I - M)/2``, which is used from the predicted count on.
    The predicted count ``K`` is the first with ``sqrt(n) (2 E_K + E_K^2) <= tol`` (a bound
    on ``||D A D - I||_F`` in exact arithmetic).
    Returns ``(coefs (nb, n_max, 3) float64, K (nb,) int)`` (``coefs`` is ``None`` without
    ``with_coefs``).
    """
    p_lo = np.atleast_1d(np.asarray(p_lo, dtype=np.float64))
    nb = p_lo.shape[0]
    coefs = None
    if with_coefs:
        coefs = np.empty((nb, n_max, 3))
        coefs[:] = (1.5, -0.5, 0.0)
    lo = np.sqrt(np.maximum(p_lo, 1e-300))
    hi = np.ones(nb)
    K = np.full(nb, n_max, dtype=np.int64)
    active = np.ones(nb, dtype=bool)
    root_n = math.sqrt(n)
    for k in range(n_max):
        a, b, E = _deg3_minimax(lo, hi)
        if with_coefs:
            coefs[active, k, 0] = a[active]
            coefs[active, k, 1] = b[active]
        lo, hi = 1.0 - E, 1.0 + E
        done = active & ((root_n * (2 * E + E * E) <= tol) | (E < 1e-9))
        K[done] = k + 1
        active &= ~done
        if not active.any():
            break
    return coefs, K


# p_lo is rounded down to the grid 10^(-j / _GRID_PER_DECADE): a schedule designed for a
# smaller p_lo maps the true, narrower interval just as well (at most a fraction of a step
# more), and the grid's schedules are computed once
_GRID_PER_DECADE = 16
_GRID_MAX = 300 * _GRID_PER_DECADE  # p_lo = 1e-300


def _grid_index(p_lo):
    """Index ``j`` of the largest grid point ``10^(-j/16) <= p_lo`` (``p_lo <= 1``)."""
    x = -np.log10(np.clip(p_lo, 1e-300, 1.0)) * _GRID_PER_DECADE
    return np.minimum(np.ceil(x - 1e-9), _GRID_MAX).astype(np.int64)


@functools.lru_cache(maxsize=2048)
def _grid_schedule(j: int, tol: float, n: int, n_max: int):
    """:func:`_design_schedule` at grid point ``j``: ``(coefs (n_max, 3), K)``, read-only."""
    coefs, K = _design_schedule(np.array([10.0 ** (-j / _GRID_PER_DECADE)]), tol, n, n_max)
    coefs = coefs[0]
    coefs.flags.writeable = False
    return coefs, int(K[0])


@functools.lru_cache(maxsize=256)
def _grid_steps(tol: float, n: int, n_max: int) -> np.ndarray:
    """Predicted step count ``K`` at every grid point (index ``j``), read-only."""
    K = _design_schedule(10.0 ** (-np.arange(_GRID_MAX + 1) / _GRID_PER_DECADE), tol, n, n_max,
                         with_coefs=False)[1]
    K.flags.writeable = False
    return K


@functools.lru_cache(maxsize=256)
def _grid_plan(tol: float, n: int, n_max: int, dtype) -> np.ndarray:
    """:func:`_auto_plan` at every grid point: True where ``auto`` picks ``eigh``, read-only."""
    plan = _auto_plan(_grid_steps(tol, n, n_max), n, dtype)
    plan.flags.writeable = False
    return plan


def _accelerated_schedule(p_lo, tol: float, n: int, n_max: int):
    """:func:`_design_schedule` for ``p_lo`` rounded down to the grid (cached per grid point):
    ``(coefs (nb, n_max, 3) float64, a fresh array; K (nb,) int)``."""
    j = _grid_index(np.atleast_1d(np.asarray(p_lo, dtype=np.float64)))
    if j.size and (j == j[0]).all():  # the common case: one grid point for the batch
        uniq, inv = j[:1], np.zeros(j.size, dtype=np.intp)
    else:
        uniq, inv = np.unique(j, return_inverse=True)
    found = [_grid_schedule(int(u), float(tol), int(n), int(n_max)) for u in uniq]
    tables = np.stack([f[0] for f in found]) if found else np.empty((0, n_max, 3))
    return tables[inv.ravel()], np.array([f[1] for f in found], dtype=np.int64)[inv.ravel()]


# --------------------------------------------------------------------------- auto: eigh or iterate


def _cost(kind: str, n: int, dtype) -> float:
    """``_tuning.AUTO_COST[dtype][kind]`` at size ``n``, in steps of the iteration."""
    return _cost_at(kind, int(n), "float32" if _np_dtype(dtype) == np.float32 else "float64")


@functools.lru_cache(maxsize=1024)
def _cost_at(kind: str, n: int, dtype_name: str) -> float:
    return float(np.interp(math.log(n), np.log(_tuning.AUTO_COST_N), _tuning.AUTO_COST[dtype_name][kind]))


def _auto_plan(K, n, dtype):
    """Per matrix: True where ``eigh`` is cheaper than a run of ``K`` accelerated steps
    (``K + fixed`` steps against ``eigh``).  The choice depends on ``n``, ``K`` and the
    dtype only, so a matrix gets the same method alone or in a batch."""
    return np.asarray(K) + _cost("fixed", n, dtype) > _cost("eigh", n, dtype)


# the probe pays only where the iteration can beat eigh by more than this factor
_PROBE_MARGIN = 1.1


@functools.lru_cache(maxsize=256)
def _eigh_without_probe(tol: float, n: int, n_max: int, dtype) -> bool:
    """True when ``eigh`` costs less than ``_PROBE_MARGIN`` times the probe plus the fewest
    steps any matrix of size ``n`` needs (``p_lo = 1/2``, the largest value :func:`_solve`
    designs for): then ``auto`` goes straight to ``eigh``."""
    K = _grid_schedule(int(_grid_index(np.array([0.5]))[0]), float(tol), int(n), int(n_max))[1]
    return (K + _cost("fixed", n, dtype) + _cost("probe", n, dtype)) * _PROBE_MARGIN > _cost("eigh", n, dtype)


# --------------------------------------------------------------------------- eigh


def _eigh_subset(be, A64, dtype, delta, fro, eps, want, with_residual, s):
    """``method="eigh"`` on a stack: ``(result in dtype, float64 residual of A^{-1/2} or nan,
    condition number)``.

    Eigenvalues below ``-delta`` mean an indefinite matrix (``ValueError``); for the inverse
    root, eigenvalues ``<= 0`` a singular one (``_SingularError``, naming ``eps``), and
    ``lambda_min`` at the rounding level warns.
    """
    power = -0.5 if want == "isqrt" else 0.5
    D, lam = be.linalg.eigh_power(A64, power)
    ends = be.host(lam[:, [0, -1]])
    lo, hi = ends[:, 0], ends[:, -1]
    _check_spectrum(lo * s, hi * s, delta * s, eps, power)  # (messages in the units of A)
    if power < 0:
        _check_singular(lo * s, fro * s, _singular_tol(fro * s, A64.shape[-1], dtype), eps, len(lo))
    xp = be.xp
    # A = s A64: A^power = s^power A64^power, s^power = sqrt(s)^(+-1) an exact power of two
    out = xp.astype(D * be.asarray(np.sqrt(s) ** (2 * power), D)[:, None, None], dtype, copy=False)
    kappa = np.divide(hi, lo, out=np.full(len(lo), np.inf), where=lo > 0)
    if not with_residual:
        return out, np.full(A64.shape[0], np.nan), kappa
    Dinv = D if power < 0 else be.linalg.eigh_power(A64, -0.5)[0]
    return out, _residual64(be, xp.astype(Dinv, dtype, copy=False), A64), kappa


# --------------------------------------------------------------------------- the record


def _warn_diverged(diverged, best_r, best_iter, label, nb):
    if diverged.any():
        i = int(np.flatnonzero(diverged)[0])
        warn(
            f"the {label} Newton–Schulz iteration diverged for {int(diverged.sum())} of {nb} matrices "
            f"(e.g. flat batch index {i}: best residual {best_r[i]:.3g} at iteration "
            f"{best_iter[i]}); the best iterate is returned — use method='coupled' "
            "(stable) or fewer iterations",
            NewtonSchulzDivergenceWarning,
        )


def _judged_tol(tol, kappa, dtype, n):
    """The tolerance each matrix is judged against (``info.converged``, the missed-``tol``
    warning): ``tol`` when given; otherwise the default, :func:`default_tol` raised to the
    rounding floor of the matrix, ``default_tol * max(1, kappa / 10)`` (``= 10 kappa sqrt(n)
    eps``: every method's floor is below ``kappa sqrt(n) eps``), at most ``0.01 sqrt(n)``;
    ``kappa``: the condition number or its estimate, per matrix."""
    if tol is not None:
        return np.full(len(kappa), float(tol))
    with np.errstate(invalid="ignore"):
        raised = default_tol(dtype, n) * np.maximum(1.0, np.nan_to_num(kappa, nan=np.inf) / 10.0)
    return np.minimum(raised, 0.01 * math.sqrt(n))


def _warn_tol_missed(tol_j, diverged, best_r, n_done, dtype):
    """Warn when a matrix that did not diverge ended above its tolerance ``tol_j``."""
    missed = ~diverged & (best_r > tol_j)
    if missed.any():
        i = int(np.flatnonzero(missed)[0])
        warn(
            f"tol={tol_j[i]:.3g} was not reached for {int(missed.sum())} of {len(best_r)} matrices (e.g. flat "
            f"batch index {i}: residual {best_r[i]:.3g} after {n_done[i]} iterations); the residual floor "
            f"is about cond(A) * eps({_np_dtype(dtype)}) — raise tol, use float64, add a ridge eps, or raise n_iter",
            NsiterWarning,
        )


def _make_info(hist, best_r, best_iter, diverged, use_eigh, c, n_iter, batch, label, scaling, tol, tol_j):
    """The :class:`NewtonSchulzInfo` of a solved batch (flat per-matrix host arrays reshaped to ``batch``)."""
    return NewtonSchulzInfo(
        residuals=hist.reshape(batch + (hist.shape[1],)), n_iter=int(n_iter),
        converged=(np.isfinite(best_r) & (best_r <= tol_j)).reshape(batch), diverged=diverged.reshape(batch),
        best_iter=best_iter.reshape(batch), scale=np.where(use_eigh, 1.0, c).reshape(batch),
        method=label, scaling=scaling, tol=float(tol) if tol is not None else tol_j.reshape(batch),
    )


# --------------------------------------------------------------------------- the driver


#: columns of the flags of :func:`_device_solve`: the ``prepare`` stats, then the probe's
_DEVICE_FLAGS = ("finite", "amax", "asym", "fro", "norm_inf", "scale", "ok", "lmin", "delta", "out_finite")


def _device_solve(be, A3, n_iter, scaling, eps, want):
    """The classic coupled iteration with every check measured on the device: ``(out, flags)``
    with ``flags (nb, 10)`` (columns :data:`_DEVICE_FLAGS`), so that ONE host transfer raises
    or warns.  No host sync inside:
    the torch kernels replay it from a CUDA graph where eligible (``run_device``)."""
    xp = be.xp
    n = A3.shape[-1]
    n_power = _PROBE_POWER_STEPS if scaling == "spectral" else 0
    rel = 10.0 * n * _eps(A3.dtype)

    def core(A):
        A64, fro, stats = be.linalg.prepare(A, eps)
        f = fro.detach()
        delta = xp.where(f > 0, rel * f, xp.ones_like(f))
        ok, lmin, lmax = be.linalg.probe(A64, delta, _PROBE_INVERSE_STEPS, n_power)
        c = _scale(be, A64, scaling, lmax, fro)
        Y0, _ = _initial(be, A64, c, A.dtype)
        Z, Y = _run_fixed(be, Y0, n_iter, None, want_y=want == "sqrt")
        out = _finish(be, Z, Y, A64, c, stats[:, 5], want, A.dtype)
        fin = xp.all(xp.isfinite(out.detach()), axis=(-2, -1))
        extra = xp.stack([xp.astype(ok, xp.float64), lmin, delta, xp.astype(fin, xp.float64)], axis=1)
        return out, xp.concat([stats, extra], axis=1)

    return be.linalg.run_device(core, A3, (n_iter, scaling, float(eps), want))


def _solve(A, method, n_iter, tol, scaling, eps, return_info, *, want):
    """Shared body of :func:`inv_sqrtm` (``want="isqrt"``) and :func:`sqrtm_psd` (``"sqrt"``)."""
    arr, method, n_iter, tol, scaling, eps, return_info = _validate(A, method, n_iter, tol, scaling, eps, return_info)
    be = backend(arr)
    xp = be.xp
    spec = _METHODS[method]
    dtype = arr.dtype
    batch, n = tuple(arr.shape[:-2]), int(arr.shape[-1])
    nb = math.prod(batch)
    if spec.auto or (n_iter is None and tol is None):
        tol_used = tol if tol is not None else default_tol(dtype, n)
    else:
        tol_used = tol
    stop_early = tol_used is not None
    n_max = n_iter if n_iter is not None else MAX_ITER
    if nb == 0:
        out = xp.empty(arr.shape, dtype=dtype, device=getattr(arr, "device", None))
        if not return_info:
            return out
        e = np.zeros(0)
        info = _make_info(np.empty((0, 1 if spec.runner == "eigh" else 0)), e, e.astype(np.int64), e.astype(bool),
                          e.astype(bool), e, 0, batch, method, scaling, tol, e)
        return out, info
    A3 = arr.reshape((nb, n, n))  # (the method: numpy and torch alike, without a namespace wrapper)
    with be.precision(arr):
        if spec == _METHODS["coupled"] and not (return_info or stop_early) and be.device_path(arr):
            out, flags = _device_solve(be, A3, n_max, scaling, eps, want)
            flags = be.host(flags)
            f = dict(zip(_DEVICE_FLAGS, flags.T))
            _check_entries(be, arr, flags)
            fro, s = f["fro"], f["scale"]
            if want == "isqrt":
                _raise_zero(fro)
            _raise_indefinite(f["ok"] > 0, f["delta"] * s, nb)
            if want == "isqrt":
                _check_singular(f["lmin"] * s, fro * s, _singular_tol(fro * s, n, dtype), eps, nb)
            if f["out_finite"].all():
                return xp.reshape(out, arr.shape)
            # the fast path blew up: rerun below with residuals to return the best iterate
        out, info = _solve_tracked(be, arr, A3, spec, method, n_max, tol, tol_used, stop_early, scaling, eps,
                                   return_info, want, asked=tol is not None or n_iter is None)
    return (out, info) if return_info else out


def _solve_tracked(be, arr, A3, spec, method, n_max, tol, tol_used, stop_early, scaling, eps, return_info, want,
                   asked):
    """:func:`_solve` after the options: checks from the ``prepare`` kernel, probe, method
    choice, the iteration with its bookkeeping, warnings; returns ``(out, info or None)``.
    ``asked``: the caller asked for a tolerance (``tol``, or neither ``tol`` nor ``n_iter``),
    so that missing it warns."""
    xp = be.xp
    dtype = arr.dtype
    batch, n = tuple(arr.shape[:-2]), int(arr.shape[-1])
    nb = A3.shape[0]
    # the classic coupled iteration: prepare, probe and iteration in ONE backend call where the
    # backend has it; the checks below read its outputs as they read the separate calls'
    pipeline = getattr(be.linalg, "coupled_pipeline", None)
    if pipeline is not None and spec.runner == "coupled" and not spec.scheduled and scaling != "trace":
        pipeline = pipeline(n)
    else:
        pipeline = None
    if pipeline is not None:
        res = pipeline(A3, eps, 10.0 * n * _eps(dtype), _PROBE_INVERSE_STEPS,
                       _PROBE_POWER_STEPS if scaling == "spectral" else 0, scaling == "spectral", dtype, want, n_max,
                       tol=tol_used, record=return_info, stop_early=stop_early, asym_rel=_asym_rel(dtype),
                       sing_rel=_singular_rel(n, dtype))
        if res.clean and not (return_info or asked):
            # every check below would pass, nothing to record, warn about or rerun
            return res.out.reshape(arr.shape), None
        A64, stats_arr, probe_arr, c_pre, solved = res.A64, res.stats, res.probe, res.c, res.solved()
        fro_arr = stats_arr[:, 3]
    else:
        A64, fro_arr, stats_arr = be.linalg.prepare(A3, eps)  # A = s A64, s = 4^k
        solved = None
    stats = be.host(stats_arr)
    _check_entries(be, arr, stats)
    fro, norm_inf, s = stats[:, 3], stats[:, 4], stats[:, 5]
    s_arr = stats_arr[:, 5]
    if want == "isqrt":
        _raise_zero(fro)
    # (the pipeline shifted its probe by delta itself: here only for the error message)
    delta = _delta(fro, n, dtype) if solved is None or not probe_arr[:, 0].all() else None
    ones = np.ones(nb, dtype=bool)
    # the eigh residual is evaluated for the record, or to check a tolerance the caller gave
    eigh_residual = return_info or tol is not None

    def eigh_only(label):
        D, r, kappa = _eigh_subset(be, A64, dtype, delta, fro, eps, want, eigh_residual, s)
        tol_j = _judged_tol(tol, kappa, dtype, n)
        if asked:
            _warn_tol_missed(tol_j, ~ones, r, ones.astype(np.int64), dtype)
        out = xp.reshape(D, arr.shape)
        if not return_info:
            return out, None
        return out, _make_info(r[:, None], r, np.ones(nb, dtype=np.int64), ~np.isfinite(r), ones, np.ones(nb), 1,
                               batch, label, scaling, tol, tol_j)

    if spec.runner == "eigh":
        return eigh_only(method)
    may_eigh = spec.auto and be.linalg.auto_may_use_eigh(arr)
    if may_eigh and _eigh_without_probe(float(tol_used), n, n_max, _np_dtype(dtype)):
        # eigh is cheaper than even the best-conditioned accelerated run: no probe; a
        # singular matrix (eigh raises) takes the probe's path to the iteration below
        try:
            return eigh_only("auto:eigh")
        except _SingularError:
            pass

    if solved is not None:
        ok, lmin, lmax = probe_arr[:, 0] > 0, probe_arr[:, 1], probe_arr[:, 2]
    else:
        ok, lmin, lmax = be.linalg.probe(A64, delta, _PROBE_INVERSE_STEPS_SCHEDULE if spec.scheduled
                                         else _PROBE_INVERSE_STEPS, _PROBE_POWER_STEPS if scaling == "spectral" else 0)
        ok, lmin = be.host(ok), be.host(lmin)
    if delta is not None:
        _raise_indefinite(ok, delta * s, nb)
    # auto sends a numerically singular matrix to the iteration (which warns and returns
    # its best iterate) rather than to eigh (which raises)
    singular = None
    if want == "isqrt":
        sing_tol = _singular_tol(fro, n, dtype)
        _check_singular(lmin * s, fro * s, sing_tol * s, eps, nb)
        if spec.auto:
            singular = lmin <= sing_tol
    c = c_pre if solved is not None else _scale(be, A64, scaling, be.asarray(lmax, A64), fro_arr)
    c_host = be.host(c)
    if solved is not None and not (return_info or asked) and solved[6].all() and not solved[3].any():
        # the pipeline's result, nothing to record, warn about or rerun
        return solved[0].reshape(arr.shape), None
    coefs = k_last = None
    use_eigh = np.zeros(nb, dtype=bool)
    # condition estimate: a rigorous bound on lambda_max over the probe's lambda_min (from above)
    bound = np.minimum(fro, norm_inf)
    kappa = np.divide(bound, lmin, out=np.full(nb, np.inf), where=lmin > 0)
    if spec.scheduled:
        # eigenvalues of Y_0 = A/c lie in [p_lo, p_hi]: p_hi from rigorous bounds on
        # lambda_max (||A||_F, ||A||_inf), p_lo from the over-estimate of lambda_min / safety
        p_hi = np.where(bound > 0, bound / c_host, 1.0)  # (the zero matrix of sqrtm_psd: 1)
        p_lo = np.maximum(lmin, delta / 10.0) / c_host / _LMIN_SAFETY / p_hi
        tol_s = float(tol_used if tol_used else default_tol(dtype, n))
        if may_eigh:
            use_eigh = _grid_plan(tol_s, n, n_max, _np_dtype(dtype))[_grid_index(p_lo)]
            if tol is not None:
                # a tolerance below the iteration's rounding floor (about 0.1 kappa sqrt(n) eps in
                # the working dtype) is out of its reach: eigh, computed in float64, gets closer
                use_eigh |= tol < 0.1 * kappa * math.sqrt(n) * _eps(dtype)
            if singular is not None:
                use_eigh &= ~singular
            if use_eigh.all():  # (the probe has checked the spectrum; eigh checks it again, exactly)
                return eigh_only("auto:eigh")
        coefs, K = _accelerated_schedule(p_lo, tol_s, n, n_max)
        # the schedule is designed for s / h, h = sqrt(p_hi): q(s) = q'(s / h)
        h = np.sqrt(p_hi)
        coefs[:, 0, 0] /= h
        coefs[:, 0, 1] /= h ** 3
        if want == "isqrt" and stop_early:
            k_last = K
    label = method
    if spec.auto:
        label = "auto:" + "+".join(m for m, on in (("accelerated", not use_eigh.all()), ("eigh", use_eigh.any()))
                                   if on)

    # the backend's fused solver takes the prepared input to the result (Y_0 and the scaling
    # back formed per matrix inside it); otherwise Y_0 here and the result by _finish
    solver = getattr(be.linalg, "coupled_solver", None)
    solver = solver(n) if solver is not None and spec.runner == "coupled" else None
    Y0 = Y0_64 = None
    if solver is None:
        Y0, Y0_64 = _initial(be, A64, c, dtype)
    ns_idx, eig_idx = np.flatnonzero(~use_eigh), np.flatnonzero(use_eigh)
    n_done = np.ones(nb, dtype=np.int64)
    best_iter = np.ones(nb, dtype=np.int64)
    diverged = np.zeros(nb, dtype=bool)
    best_r = np.full(nb, np.nan)
    hist = None
    n_run = 1
    parts = []
    if eig_idx.size:
        D, best_r[eig_idx], kappa[eig_idx] = _eigh_subset(be, be.take(A64, eig_idx), dtype, delta[eig_idx],
                                                          fro[eig_idx], eps, want, eigh_residual, s[eig_idx])
        parts.append((eig_idx, D))
    if ns_idx.size and solver is not None:
        out_ns, n_d, b_it, div, b_r, h_ns = _solve_fused(
            be, solver, be.take(A64, ns_idx), be.take(c, ns_idx), be.take(s_arr, ns_idx), dtype, want,
            None if coefs is None else coefs[ns_idx], n_max, tol_used, return_info, stop_early,
            None if k_last is None else k_last[ns_idx], first=solved)
        n_run = int(n_d.max())
        parts.append((ns_idx, out_ns))
    elif ns_idx.size:
        Y0s, Y0s_64 = be.take(Y0, ns_idx), be.take(Y0_64, ns_idx)
        if spec.runner == "uncoupled":
            Z, n_d, n_run, b_it, div, b_r, h_ns = _run_uncoupled(be, Y0s, Y0s_64, n_max, tol=tol_used,
                                                                 stop_early=stop_early)
            Y = None
        else:
            Z, Y, n_d, b_it, div, b_r, h_ns = _iterate_coupled(be, Y0s, Y0s_64, None if coefs is None else
                                                               coefs[ns_idx], n_max, tol_used, return_info,
                                                               stop_early, None if k_last is None else k_last[ns_idx],
                                                               want)
            n_run = int(n_d.max())
        parts.append((ns_idx, _finish(be, Z, Y, be.take(A64, ns_idx), be.take(c, ns_idx), be.take(s_arr, ns_idx), want,
                                      dtype)))
    if ns_idx.size:
        n_done[ns_idx], best_iter[ns_idx], diverged[ns_idx], best_r[ns_idx] = n_d, b_it, div, b_r
        if return_info:
            hist = np.empty((nb, n_run))
            hist[ns_idx] = _freeze_history(h_ns, n_d, n_run)
    if return_info and eig_idx.size:
        if hist is None:
            hist = np.empty((nb, 1))
        hist[eig_idx] = best_r[eig_idx][:, None]
    out = parts[0][1]
    if len(parts) == 2:
        out = xp.empty((nb, n, n), dtype=dtype, device=getattr(arr, "device", None))
        for idx, part in parts:
            out = be.put(out, idx, part)
    _warn_diverged(diverged, best_r, best_iter, label, nb)
    tol_j = _judged_tol(tol, kappa, dtype, n) if asked or return_info else None
    if asked:
        _warn_tol_missed(tol_j, diverged, best_r, n_done, dtype)
    out = xp.reshape(out, arr.shape)
    if not return_info:
        return out, None
    n_it = hist.shape[1] if eig_idx.size < nb else 1
    return out, _make_info(hist, best_r, best_iter, diverged, use_eigh, c_host * s, n_it, batch, label, scaling, tol,
                           tol_j)


def _iterate_coupled(be, Y0, Y0_64, coefs, n_max, tol, record, stop_early, k_last, want):
    """The coupled iteration of a (sub-)batch on the backend's runner: its fused kernel for
    this ``n`` if it has one, else the array code (:func:`_run_fixed` when nothing is
    tracked).  A blown-up matrix of a run that kept no copies is rerun with residuals, over
    the iterations it ran, to return its best iterate.  Returns the runner contract
    ``(Z, Y, n_done, best_iter, diverged, best_r, hist)``."""
    nb = Y0.shape[0]
    fused = be.linalg.coupled_kernel(Y0.shape[-1])
    run = fused or functools.partial(_run_coupled, be)
    if fused or record or stop_early:
        res = run(Y0, Y0_64, coefs, n_max, tol=tol, record=record, stop_early=stop_early, k_last=k_last)
    else:
        n_d = np.full(nb, n_max, dtype=np.int64)
        res = _run_fixed(be, Y0, n_max, coefs, want_y=want == "sqrt") + (n_d, n_d.copy(), np.zeros(nb, dtype=bool),
                                                                         np.full(nb, np.nan), None)
    if record:
        return res
    Z, Y, n_d, b_it, div, b_r, hist = res
    redo = div | ~be.host(be.xp.all(be.xp.isfinite(Z.detach() if be.torch else Z), axis=(-2, -1)))
    if redo.any():
        j = np.flatnonzero(redo)
        Zr, Yr, _, it_r, _, r_r, _ = run(be.take(Y0, j), be.take(Y0_64, j), None if coefs is None else coefs[j],
                                         max(int(n_d[j].max()), 1), tol=None, record=True, stop_early=False)
        Z, Y = be.put(Z, j, Zr), None if Y is None else be.put(Y, j, Yr)
        b_it, b_r, div = b_it.copy(), b_r.copy(), div.copy()
        b_it[j], b_r[j], div[j] = it_r, r_r, True
    return Z, Y, n_d, b_it, div, b_r, hist


def _solve_fused(be, solver, A64, c, s, dtype, want, coefs, n_max, tol, record, stop_early, k_last, first=None):
    """:func:`_iterate_coupled` and :func:`_finish` in one call of the backend's fused solver
    (``A = s A64``, ``Y_0 = A64 / c``): the same decisions, the same rerun with residuals of a
    blown-up matrix.  ``first``: the solver's result on the whole batch, computed already (by
    the backend's ``coupled_pipeline``).  Returns ``(out, n_done, best_iter, diverged, best_r, hist)``."""
    if first is None:
        first = solver(A64, c, s, dtype, want, coefs, n_max, tol=tol, record=record, stop_early=stop_early,
                       k_last=k_last)
    out, n_d, b_it, div, b_r, hist, finite = first
    if record:
        return out, n_d, b_it, div, b_r, hist
    redo = div | ~finite
    if redo.any():
        j = np.flatnonzero(redo)
        o_r, _, it_r, _, r_r, _, _ = solver(be.take(A64, j), be.take(c, j), be.take(s, j), dtype, want,
                                            None if coefs is None else coefs[j], max(int(n_d[j].max()), 1),
                                            tol=None, record=True, stop_early=False)
        out = be.put(out, j, o_r)
        b_it, b_r, div = b_it.copy(), b_r.copy(), div.copy()
        b_it[j], b_r[j], div[j] = it_r, r_r, True
    return out, n_d, b_it, div, b_r, hist


def inv_sqrtm(A, *, method="coupled", n_iter=None, tol=None, scaling="fro", eps=0.0, return_info=False):
    r"""Inverse square root ``D ~= (A + eps I)^{-1/2}`` of symmetric PSD matrices by Newton–Schulz.

    Coupled iteration (Higham 2008, Eq. 6.35; Ye et al. 2020, §4.5.3): ``c = scale(A)``,
    ``Y_0 = A/c``, ``Z_0 = I``, ``T_k = (3I - Z_k Y_k)/2``, ``Y_{k+1} = Y_k T_k``,
    ``Z_{k+1} = T_k Z_k``, ``D = Z_k / sqrt(c)``.  See the module docstring for the other
    methods.

    Parameters
    ----------
    A : array_like or torch.Tensor, shape (..., n, n)
        Symmetric positive semidefinite matrices (a covariance).  float32/float64 kept,
        integers promote to float64, float16 to float32.  Never modified.  A tensor gives
        a tensor on its device, with autograd through the iterations.
    method : {"coupled", "uncoupled", "accelerated", "eigh", "auto"}
        See :data:`METHODS` and the module docstring.
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
        ``[||A||_F / sqrt(n), ||A||_F]``; saves ``log(||A||_F / lambda_max) / log 2.25``
        steps).  Ignored by ``"eigh"``; the accelerated schedule adapts to any of them.
    eps : float, default 0
        Ridge: the matrix inverted is ``A + eps I``.
    return_info : bool, default False
        Also return a :class:`NewtonSchulzInfo` with the float64 residual history.

    Returns
    -------
    D : ndarray or tensor, shape (..., n, n), dtype of ``A`` (float32 or float64)
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
    NsiterWarning
        An explicit ``tol`` was not reached (rounding floor or ``n_iter`` cap); the
        result is the iterate the matrix stopped at.

    Notes
    -----
    Positive semidefiniteness is checked by a Cholesky factorisation of ``A + delta I``,
    ``delta = 10 n eps(dtype) ||A||_F`` (it fails exactly when ``A`` has an eigenvalue below
    ``-delta``); inverse iteration with the factor estimates ``lambda_min`` for the
    singularity warning (threshold ``max(10 eps(dtype), n eps(float64)) ||A||_F``).

    After a divergence (:mod:`nsiter._policy`) ``D`` is the best iterate; with a fixed
    ``n_iter`` and neither ``tol`` nor ``return_info`` a non-finite result triggers a rerun
    with residuals, so the warning and the best iterate still come.  ``method="auto"``
    always stops on a tolerance (``n_iter`` is the cap); ``info.method`` says what ran
    (``"auto:accelerated"``, ``"auto:eigh"``, or both for a mixed batch).

    Examples
    --------
    >>> import numpy as np, nsiter
    >>> A = np.array([[4.0, 1.0], [1.0, 3.0]])
    >>> D = nsiter.inv_sqrtm(A, n_iter=20)
    >>> np.allclose(D @ A @ D, np.eye(2))
    True
    """
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
    return _solve(A, method, n_iter, tol, scaling, eps, return_info, want="sqrt")
