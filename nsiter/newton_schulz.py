r"""Newton–Schulz inverse square roots of symmetric positive (semi)definite matrices.

``D = inv_sqrtm(A)`` approximates ``A^{-1/2}``: the deconvolution (whitening) matrix
``D = (Cov + eps I)^{-1/2}`` of Ye et al. (2020), §4.5.3 and appendix A.3.

Methods (registry :data:`METHODS`):

``"coupled"``
    Higham, *Functions of Matrices* (2008), Eq. (6.35), the coupled Newton–Schulz
    iteration used by the paper: ``c = scale(A)``, ``Y_0 = A/c``, ``Z_0 = I``,

    .. math::  T_k = \tfrac12 (3I - Z_k Y_k), \quad Y_{k+1} = Y_k T_k, \quad Z_{k+1} = T_k Z_k,

    ``D = Z_k / sqrt(c)`` and ``Y_k sqrt(c) -> A^{1/2}``.  Stable for thousands of steps.
    With ``n_iter=5, scaling="fro"`` it is the reference code's
    ``isqrt_newton_schulz_autograd`` (same products in the same order; the first step
    uses ``Z_0 = I`` without multiplying by it, which is exact).
``"uncoupled"``
    Higham (2008), Eq. (7.12), the single-sequence ("vanilla") iteration,
    ``X_0 = I``, ``X_{k+1} = (3 X_k - X_k^3 Y_0)/2``, ``D = X_k/sqrt(c)``, evaluated in
    the order ``X_{k+1} = (3 X_k - X_k ((X_k X_k) Y_0)) / 2`` (numpy ``@``).  It amplifies
    rounding errors whenever ``cond(A) > 9`` and blows up — the paper's Fig. 7 — so it is
    kept exactly as it is, with its float64 residual always tracked so that the best
    iterate can be returned.
``"accelerated"``
    The coupled iteration with per-step coefficients, ``T_k = a_k I + b_k Z_k Y_k``.  An
    eigenvalue ``p`` of ``M = Z Y`` maps to ``p (a + b p)^2 = q(sqrt p)^2`` with the odd
    cubic ``q(s) = a s + b s^3``: the polar/sign-function iteration on ``s = sqrt(p)``, so
    the per-step optimal (minimax) polynomials of Polar Express / CANS apply.  Step ``k``
    uses the closed-form minimax cubic for the current interval ``[lo_k, hi_k]`` of
    ``sqrt(p)`` (maps it into ``[1 - E_k, 1 + E_k]``); as ``E_k -> 0`` the step becomes the
    classic one, which it continues with.  The first interval comes from rigorous upper
    bounds on ``lambda_max`` (``||A||_F``, ``||A||_inf``) and an estimate of
    ``lambda_min`` (inverse iteration on the Cholesky factor of the PSD check, divided by
    2 for safety).  Small eigenvalues grow about 6.75x per step instead of 2.25x: at
    ``cond = 1e6`` it needs 11–12 steps where the classic one needs 22.
``"eigh"``
    The exact reference ``V diag(lambda^{-1/2}) V^T`` from a float64 LAPACK
    eigendecomposition, returned in the input dtype.  Up to ``n = 128`` one matrix per
    Numba thread with SciPy's OpenBLAS held to one thread for the call (measured with two
    threads: 8.5 ms for 32 x 64 x 64 against 13-18 ms for numpy's batched ``eigh``); above,
    numpy's batched ``eigh``.  The result is formed as ``W W^T`` with
    ``W = V diag(lambda^{-1/4})``: symmetric to the last bit.
``"auto"``
    Per matrix, the cheaper of ``"accelerated"`` (its step count predicted from the
    schedule) and ``"eigh"``, by a cost model in units of one step of the iteration
    (:data:`_AUTO_COST`, measured by ``analysis/calibrate_auto.py``): LAPACK wins for
    ill-conditioned or large matrices (at ``n = 64``, float64, two threads: ``eigh`` costs
    about 8.4 steps and a run 1.7 steps plus ``K``, so the iteration is kept up to ``K = 6``).
    Where ``eigh`` is cheaper than even the best-conditioned schedule (large ``n``), the
    spectrum probe is skipped; where every matrix of the batch picks ``eigh``, nothing of
    the iteration is prepared.  A matrix the probe finds numerically singular goes to the
    iteration (which warns and returns its best iterate), never to ``eigh`` (which raises).

Stopping (``tol``, or the default :func:`default_tol` when neither ``n_iter`` nor ``tol``
is given): a matrix stops at the first iterate with ``||D_k D_k A - I||_F <= tol`` (the
float64 Fig. 7 residual), or when the residual stagnates at its rounding floor (about
``cond(A) eps``).  Cheaply: the test runs on the free by-product ``||Z_k Y_k - I||_F``
(equal to it in exact arithmetic; ``Z_k Y_k`` is the next step's first product) and the
float64 residual is evaluated only to confirm a stop (2 products).  The residual history
(``return_info=True``) costs 2 float64 products per step; nothing else does.

CPU kernels (``nsiter/_numba/_newton_schulz.py``): for ``n <= 64`` all steps of one matrix
are fused in one Numba function (no temporaries, no Python per step), one matrix per
thread for a batch.  Its products use BLAS (``np.dot`` in Numba) except for ``n <= 6``,
where hand-written loops win (per-call overhead: 2.4 vs 1.0 GFLOP/s at n = 4, 5.0 vs 5.4
at n = 8).  Against the same iteration on numpy's batched ``@`` the fused kernel was
about 2x faster for float32 at n = 27-64 and on par for float64 (single thread; e.g.
2.9 vs 6.1 ms for 5 steps on 64 x 27 x 27 float32), and it parallelises over the batch.
For ``n > 64`` the same per-matrix logic runs on numpy ``@`` (a line-by-line twin): with
two threads the Numba kernel there was 2-5x slower, because numpy's OpenBLAS (probe)
and SciPy's OpenBLAS (BLAS inside Numba) keep two thread pools that compete.  The
implementation depends on ``n`` only, so a matrix gives the same bits alone or in a
batch.  ``analysis/bench_newton_schulz.py`` re-measures all of this (rows
``coupled[numpy @]``).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np

from ._dispatch import is_tensor, torch_backend
from ._numba._newton_schulz import (
    _coupled_ns_parallel,
    _coupled_ns_serial,
    _eigh_power_serial,
    _prepare,
    _prepare_serial,
    _psd_probe,
    _psd_probe_serial,
    _spectrum_estimates_serial,
)
from ._numba._newton_schulz import _eigh_power as _eigh_power_kernel
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
from ._warnings import IllConditionedWarning, NewtonSchulzDivergenceWarning, NsiterWarning

__all__ = ["inv_sqrtm", "sqrtm_psd", "NewtonSchulzInfo", "METHODS", "SCALINGS", "MAX_ITER", "default_tol"]

#: Methods accepted by :func:`inv_sqrtm` and :func:`sqrtm_psd`.
METHODS = ("coupled", "uncoupled", "accelerated", "eigh", "auto")
#: Scalings ``c`` of ``Y_0 = A / c``: Frobenius norm, trace, spectral-norm estimate.
SCALINGS = ("fro", "trace", "spectral")
#: Iteration cap when the count is driven by a tolerance.
MAX_ITER = 100

# inverse-iteration steps of the spectrum probe: enough to flag a singular matrix, more
# where the estimate of lambda_min designs the accelerated schedule; power-iteration
# steps for the spectral scaling
_PROBE_INVERSE_STEPS = 3
_PROBE_INVERSE_STEPS_SCHEDULE = 4
_PROBE_POWER_STEPS = 8
# the fused kernel runs one matrix per thread up to this size; above it the batch is
# processed in order and the BLAS library's own threads share each product
_PARALLEL_MAX_N = 64
# method="eigh" runs LAPACK inside a Numba kernel (one matrix per thread) up to this size;
# above it numpy's batched eigh: concurrent calls into a threaded OpenBLAS from several
# threads serialise (measured: 2 threads at n = 64 slower than one)
_EIGH_KERNEL_MAX_N = 32
# ... and up to this size when SciPy's OpenBLAS (the LAPACK that Numba calls) can be held
# to one thread for the call (:func:`_single_thread_blas`): then the per-thread eigh has
# no pool to compete for (measured, 2 threads: 32 x 64 x 64 in 8.5 ms vs 13-18 ms for
# numpy's batched eigh; 8 x 128 x 128 in 11.6 vs 14-17 ms)
_EIGH_KERNEL_MAX_N_SINGLE_BLAS = 128
# the spectrum probe factorises with Numba up to this size (measured, two threads: 1.2-1.9 ms
# for 16 x 96^2 ... 2 x 256^2 against 2.6-3.0 ms for numpy's LAPACK, whose spinning threads
# also slow the kernel that follows), with LAPACK above
_PROBE_NUMBA_MAX_N = 256
# the fused Numba kernel up to this size; above it the same steps on numpy ``@`` (one BLAS
# library for probe and iteration: measured 2-5x faster at n = 128-512 with two threads,
# where numpy's and SciPy's OpenBLAS thread pools otherwise compete)
_NUMBA_MAX_N = 64
# the inverse-iteration estimate of lambda_min is an upper bound; the accelerated
# schedule is designed for lambda_min / _LMIN_SAFETY
_LMIN_SAFETY = 2.0


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
    """Options and shape checks (:func:`_prepare_input` checks the entries in its one pass)."""
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
    return arr, method, n_iter, tol, scaling, eps, bool(return_info)


def _prepare_input(arr, eps, name="A"):
    """``(A64, fro, norm_inf)``: the stack ``(nb, n, n)`` as float64 ``(A + A^T)/2 + eps I``
    (a new array: the caller's data is never touched) with its Frobenius and infinity norms,
    in one pass that also checks the entries (finite; symmetric up to 100 ulp of the
    largest entry, as :func:`~nsiter._validation.check_symmetric`)."""
    n = arr.shape[-1]
    src = np.ascontiguousarray(arr.reshape(-1, n, n))
    nb = src.shape[0]
    A64 = np.empty((nb, n, n))
    stats = np.empty((nb, 5))
    (_prepare if nb > 1 else _prepare_serial)(src, float(eps), A64, stats)
    if not stats[:, 0].all():
        check_finite(arr, name)  # raises with the house message
    scale = np.where(stats[:, 1] > 0, stats[:, 1], 1.0)
    if np.any(stats[:, 2] > 100 * np.finfo(arr.dtype).eps * scale):
        check_symmetric(arr, name)  # raises with the house message
    return A64, stats[:, 3].copy(), stats[:, 4].copy()


def _use_thread_pool(n: int, nb: int) -> bool:
    """One matrix per Numba thread for small matrices in a batch; otherwise no Numba
    parallel region at all, so that BLAS/LAPACK threads never compete with a spinning pool."""
    return n <= _PARALLEL_MAX_N and nb > 1


_BLAS_THREADS = []  # [(get, set) ctypes functions of SciPy's OpenBLAS, or None]; filled lazily


def _blas_thread_functions():
    """``(get_num_threads, set_num_threads)`` of the OpenBLAS bundled with SciPy (the
    BLAS/LAPACK that ``np.dot`` / ``np.linalg.eigh`` call inside Numba), or ``None``."""
    if not _BLAS_THREADS:
        fns = None
        try:
            import scipy

            root = os.path.dirname(os.path.dirname(scipy.__file__))
            for path in sorted(glob.glob(os.path.join(root, "scipy.libs", "libscipy_openblas*.so*"))):
                lib = ctypes.CDLL(path)
                get = getattr(lib, "scipy_openblas_get_num_threads", None)
                set_ = getattr(lib, "scipy_openblas_set_num_threads", None)
                if get is not None and set_ is not None:
                    get.restype, get.argtypes = ctypes.c_int, []
                    set_.restype, set_.argtypes = None, [ctypes.c_int]
                    fns = (get, set_)
                    break
        except (ImportError, OSError):
            fns = None
        _BLAS_THREADS.append(fns)
    return _BLAS_THREADS[0]


@contextlib.contextmanager
def _single_thread_blas():
    """Hold SciPy's OpenBLAS to one thread (restored on exit) while Numba threads each call
    LAPACK; yields whether the limit is in force (``False`` where the library is not found)."""
    fns = _blas_thread_functions()
    if fns is None:
        yield False
        return
    get, set_ = fns
    old = int(get())
    if old <= 1:
        yield True
        return
    set_(1)
    try:
        yield True
    finally:
        set_(old)


def _eigh_kernel_max_n() -> int:
    """Largest ``n`` for which ``method="eigh"`` runs the per-matrix Numba LAPACK kernel."""
    return _EIGH_KERNEL_MAX_N_SINGLE_BLAS if _blas_thread_functions() is not None else _EIGH_KERNEL_MAX_N


def _probe(A64: np.ndarray, delta: np.ndarray, n_inverse: int, n_power: int) -> tuple[np.ndarray, np.ndarray]:
    """PSD check + eigenvalue estimates ``(lmin, lmax)``; raises on indefinite input.

    ``delta = 10 n eps(dtype) ||A||_F`` is the rounding tolerance: the Cholesky
    factorisation of ``A + delta I`` fails exactly when ``A`` has an eigenvalue below
    ``-delta`` (up to float64 rounding), i.e. ``A`` is indefinite beyond tolerance.
    ``n <= _PROBE_NUMBA_MAX_N``: a Numba Cholesky (one matrix per thread for a batch of
    ``n <= 64``, in order above; no BLAS, so no OpenBLAS thread pool is left spinning
    against the Numba threads of the eigh or iteration kernels that follow); larger:
    LAPACK (batched ``numpy.linalg.cholesky``).  The choice depends on ``n`` only, so that a
    matrix gets the same estimates alone or in a batch.  From the factor, ``n_inverse``
    steps of inverse iteration over-estimate ``lambda_min``; ``n_power`` steps of power
    iteration under-estimate ``lambda_max`` (0 when ``n_power == 0``).
    """
    nb, n, _ = A64.shape
    if n <= _PROBE_NUMBA_MAX_N:
        out = np.empty((nb, 3))
        (_psd_probe if _use_thread_pool(n, nb) else _psd_probe_serial)(A64, delta, n_inverse, n_power, out)
        ok, lmin, lmax = out[:, 0] > 0, out[:, 1].copy(), out[:, 2].copy()
    else:
        lmin = np.empty(nb)
        lmax = np.empty(nb)
        ok = np.ones(nb, dtype=np.bool_)
        S = A64.copy()
        S[:, np.arange(n), np.arange(n)] += delta[:, None]
        try:
            L = np.linalg.cholesky(S)
        except np.linalg.LinAlgError:
            out = np.empty((nb, 3))
            _psd_probe_serial(A64, delta, n_inverse, n_power, out)
            ok = out[:, 0] > 0
        else:
            _spectrum_estimates_serial(A64, L, delta, n_inverse, n_power, lmin, lmax)
    _raise_indefinite(ok, delta, nb)
    return lmin, lmax


def _raise_indefinite(ok, delta, nb):
    """The probe's error for matrices (``~ok``) with an eigenvalue below ``-delta``; shared by
    the numpy and torch backends."""
    if not ok.all():
        bad = np.flatnonzero(~ok)
        raise ValueError(
            f"expected symmetric positive semidefinite matrices, but {bad.size} of {nb} "
            f"(first at flat batch index {bad[0]}) have an eigenvalue below -{delta[bad[0]]:.3g} "
            f"(= 10 n eps ||A||_F, the rounding tolerance): Cholesky of A + {delta[bad[0]]:.3g} I "
            "failed; an inverse square root needs A >= 0 — check how A was formed, or add a "
            "ridge with eps > 0 large enough to make it positive definite"
        )


def _singular_tol(fro, n, dtype):
    """``max(10 eps(dtype), n eps(float64)) ||A||_F``: an eigenvalue at the rounding level of
    the entries (and above the float64 error of the Cholesky-based estimate)."""
    return max(10.0 * np.finfo(dtype).eps, n * np.finfo(np.float64).eps) * fro


def _check_singular(lmin, fro, sing_tol, eps, nb, stacklevel=4):
    """Warn (naming ``eps``) when ``lambda_min <= sing_tol`` for some matrix.

    ``sing_tol``: :func:`_singular_tol`.
    """
    sing = lmin <= sing_tol
    if np.any(sing):
        i = int(np.flatnonzero(sing)[0])
        warnings.warn(
            f"{int(sing.sum())} of {nb} matrices are numerically singular (e.g. flat batch index {i}: "
            f"smallest eigenvalue ~{max(lmin[i], 0.0):.3g} <= {sing_tol[i]:.3g}, the rounding level, "
            f"||A||_F = {fro[i]:.3g}; eps={eps:g}): A^(-1/2) is unbounded and Newton–Schulz iterates grow "
            f"without limit on the null space; pass a ridge eps > 0 (e.g. eps={1e-5 * fro[i]:.1g})",
            IllConditionedWarning,
            stacklevel=stacklevel,
        )


def _scale(A64, scaling, lmax, fro):
    """``c`` of ``Y_0 = A / c`` (float64, per matrix); ``fro = ||A||_F``."""
    if scaling == "fro":
        return fro
    if scaling == "trace":
        return np.einsum("bii->b", A64).copy()
    # spectral: the power-iteration estimate is a lower bound of lambda_max; it is never
    # allowed below ||A||_F / sqrt(n) (another lower bound) nor above ||A||_F (an upper bound).
    return np.clip(lmax, fro / math.sqrt(A64.shape[-1]), fro)


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


def _run_uncoupled(Y0, Y0_64, n_max, *, tol, stop_early):
    """Uncoupled iteration (7.12): ``X <- (3X - X((X X) Y_0))/2`` on numpy ``@``.

    The float64 residual is always tracked (the iteration is unstable by design, so the
    best iterate must be known).  Returns ``(X, tracker, n_run, returned_iter, returned_r)``.
    """
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
    # the iterate returned: the best one after a blow-up, else the one the matrix stopped at
    div = tracker.diverged
    last = np.minimum(tracker.stop_iter, n_run)
    X_out = np.where(div[:, None, None], Xb, X)
    ret_iter = np.where(div, tracker.best_iter, last)
    ret_r = np.where(div, tracker.best, tracker.hist[np.arange(nb), np.maximum(last, 1) - 1])
    return X_out, tracker, n_run, ret_iter, ret_r


def _run_coupled_numpy(Y0, n_iter, coefs):
    """Reference backend on numpy ``@`` (batched BLAS): fixed count, no residuals.

    Same step as the Numba kernel (``Z_0 = I`` shortcut included); kept to measure the
    kernels against and as a cross-check in the tests.
    """
    nb, n, _ = Y0.shape
    diag = np.arange(n)
    Y = Y0.copy()
    Z = None
    for k in range(n_iter):
        a, b, c2 = coefs[k]
        M = Y.copy() if Z is None else Z @ Y
        T = (c2 * M) @ M + b * M if c2 != 0 else b * M
        T[:, diag, diag] += a
        Y = Y @ T
        Z = T if Z is None else T @ Z
    return Z, Y


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


def _schedule_lookup(p_lo, tol: float, n: int, n_max: int):
    """The grid schedules for ``p_lo``: ``(tables (m, n_max, 3), inv (nb,), K (nb,))``;
    matrix ``b`` uses ``tables[inv[b]]`` and ``K[b]`` steps (``m`` distinct grid points)."""
    j = _grid_index(np.atleast_1d(np.asarray(p_lo, dtype=np.float64)))
    if j.size and (j == j[0]).all():  # the common case: one grid point for the batch
        uniq, inv = j[:1], np.zeros(j.size, dtype=np.intp)
    else:
        uniq, inv = np.unique(j, return_inverse=True)
    found = [_grid_schedule(int(u), float(tol), int(n), int(n_max)) for u in uniq]
    tables = np.stack([f[0] for f in found]) if found else np.empty((0, n_max, 3))
    K = np.array([f[1] for f in found], dtype=np.int64)[inv.ravel()]
    return tables, inv.ravel(), K


def _accelerated_schedule(p_lo, tol: float, n: int, n_max: int):
    """:func:`_design_schedule` for ``p_lo`` rounded down to the grid (cached per grid point).

    Returns ``(coefs (nb, n_max, 3) float64, a fresh array; K (nb,) int)``.
    """
    tables, inv, K = _schedule_lookup(p_lo, tol, n, n_max)
    return tables[inv], K


def _coupled_ns_one_numpy(Y0, Y0_64, coefs, n_max, k_last, record, stop_early, tol,
                          Z_out, Y_out, hist, info_i, info_f):
    """numpy twin of the Numba ``_coupled_ns_one`` for large ``n`` (same decisions, line
    by line), with products on numpy ``@``: one BLAS library (and thread pool) throughout,
    instead of numpy's for the probe and SciPy's inside Numba for the iteration."""
    n = Y0.shape[0]
    eye = np.eye(n)
    Y = Y0.copy()
    Z = np.eye(n, dtype=Y0.dtype)
    T = np.empty_like(Y0)
    Zb, Yb = Z.copy(), Y.copy()
    big = 10.0 * math.sqrt(n)

    def metric(X):
        X64 = X.astype(np.float64, copy=False)
        return float(np.linalg.norm((X64 @ X64) @ Y0_64 - eye))

    use_metric = False
    best = best_m = prev = math.inf
    best_mk = best_k = done = 0
    best_r = r = math.nan
    diverged = restore = stopped = False
    diag = np.arange(n)
    for k in range(n_max):
        M = Y.copy() if k == 0 else Z @ Y
        if stop_early and k >= 1 and not use_metric:
            rho = float(np.linalg.norm(M - eye))
            if not math.isfinite(rho) or rho > 1e3 * best or rho > big:
                diverged, restore, best_k = True, record, k
                break
            best = min(best, rho)
            stag = rho < 0.5 and rho > 0.75 * prev
            prev = rho
            if rho <= tol or stag:
                if not record:
                    r = metric(Z)
                if r <= tol or stag:
                    best_r, best_k, stopped = r, k, True
                    break
                use_metric, prev, best_m, best_mk = True, r, r, k
                Zb[...] = Z
                Yb[...] = Y
        a, b, c = coefs[k]
        if c != 0.0:
            np.matmul(M, M, out=T)
            T *= c
            T += b * M
        else:
            np.multiply(M, b, out=T)
        T[diag, diag] += a
        Z = T.copy() if k == 0 else T @ Z
        done = k + 1
        if record or use_metric or (stop_early and done == k_last):
            r = metric(Z)
            if record:
                hist[k] = r
            if stop_early and done == k_last and not use_metric and r <= tol:
                best_r, best_k, stopped = r, done, True
                break
        Y = Y @ T
        if record or use_metric:
            finite = math.isfinite(r)
            if finite and r < best_m:
                best_m, best_mk = r, done
                Zb[...] = Z
                Yb[...] = Y
            if (use_metric or not stop_early) and (not finite or r > 1e3 * best_m or r > big):
                diverged = True
            if use_metric:
                if diverged or r <= tol or (r < 0.5 and r > 0.75 * prev):
                    restore = not (r <= tol)
                    if not restore:
                        best_k, best_r = done, r
                    stopped = True
                    break
                prev = r
    if restore or (diverged and record and not stop_early):
        Z_out[...], Y_out[...] = Zb, Yb
        best_k, best_r = best_mk, best_m
    else:
        Z_out[...], Y_out[...] = Z, Y
        if not stopped and not diverged:
            best_k = done
            best_r = r if record else (metric(Z) if stop_early else math.nan)
    info_i[0], info_i[1], info_i[2] = done, best_k, 1 if diverged else 0
    info_f[0] = best_r


def _run_coupled(Y0, Y0_64, coefs, n_max, *, tol, record, stop_early, k_last=None):
    """Run the fused Numba kernel; returns ``(Z, Y, n_done, best_iter, diverged, best_r, hist)``."""
    nb, n, _ = Y0.shape
    Z = np.empty_like(Y0)
    Y = np.empty_like(Y0)
    hist = np.full((nb, n_max if record else 1), np.nan)
    info_i = np.zeros((nb, 3), dtype=np.int64)
    info_f = np.zeros((nb, 1))
    coefs = np.ascontiguousarray(coefs[:, :n_max], dtype=Y0.dtype)
    k_last = np.zeros(nb, dtype=np.int64) if k_last is None else np.ascontiguousarray(k_last, dtype=np.int64)
    tol = float(tol or 0.0)
    if n > _NUMBA_MAX_N:
        for b in range(nb):
            _coupled_ns_one_numpy(Y0[b], Y0_64[b], coefs[b], n_max, int(k_last[b]), record, stop_early, tol,
                                  Z[b], Y[b], hist[b], info_i[b], info_f[b])
    else:
        kernel = _coupled_ns_parallel if _use_thread_pool(n, nb) else _coupled_ns_serial
        kernel(Y0, Y0_64, coefs, n_max, k_last, record, stop_early, tol, Z, Y, hist, info_i, info_f)
    return Z, Y, info_i[:, 0], info_i[:, 1], info_i[:, 2].astype(bool), info_f[:, 0], hist


def _freeze_history(hist, n_done, n_run):
    """History up to ``n_run``; a matrix that stopped early repeats its last residual."""
    hist = hist[:, :n_run].copy()
    for b in np.flatnonzero(n_done < n_run):
        k = n_done[b]
        if k > 0:
            hist[b, k:] = hist[b, k - 1]
    return hist


class _SingularError(ValueError):
    """``eigh`` met a singular matrix (``auto`` then routes it to the iteration instead)."""


def _check_spectrum(lo, hi, delta, eps, power):
    """Reject indefinite matrices (``lo < -delta``) and, for ``power < 0``, singular ones (``lo <= 0``).

    ``lo``/``hi`` are the smallest/largest eigenvalues per matrix (float64 arrays), ``delta``
    the rounding tolerance ``10 n eps ||A||_F``.  Shared by the numpy and torch backends.
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


def _eigh_power(A64, dtype, delta, eps, power=-0.5):
    """``V diag(lambda^power) V^T`` from a float64 ``eigh``, cast to ``dtype``.

    Eigenvalues below ``-delta`` mean an indefinite matrix (``ValueError``); for
    ``power < 0`` eigenvalues ``<= 0`` are a singular matrix (``ValueError`` naming
    ``eps``) and ``0 < lambda_min <= delta`` warns.  For ``power > 0`` eigenvalues in
    ``[-delta, 0]`` are rounding noise and are clipped to 0.
    """
    nb, n, _ = A64.shape
    if n <= _eigh_kernel_max_n():
        D = np.empty_like(A64)
        lam = np.empty((nb, n))
        with _single_thread_blas():
            (_eigh_power_kernel if nb > 1 else _eigh_power_serial)(
                A64, float(power), D, lam)
    else:
        lam, V = np.linalg.eigh(A64)
        D = None
    lo = lam[:, 0]
    _check_spectrum(lo, lam[:, -1], delta, eps, power)
    if power < 0:
        fro = np.sqrt(np.einsum("bij,bij->b", A64, A64))
        _check_singular(lo, fro, _singular_tol(fro, n, dtype), eps, nb, stacklevel=5)
    if D is None:
        lam_p = np.where(lam > 0, np.maximum(lam, np.finfo(float).tiny) ** power, 0.0)
        D = (V * lam_p[:, None, :]) @ np.swapaxes(V, -1, -2)
    return D.astype(dtype, copy=False), lam


def _warn_diverged(diverged, best_r, best_iter, method, nb):
    if diverged.any():
        i = int(np.flatnonzero(diverged)[0])
        warnings.warn(
            f"the {method} Newton–Schulz iteration diverged for {int(diverged.sum())} of {nb} matrices "
            f"(e.g. flat batch index {i}: best residual {best_r[i]:.3g} at iteration "
            f"{best_iter[i]}); the best iterate is returned — use method='coupled' "
            "(stable) or fewer iterations",
            NewtonSchulzDivergenceWarning,
            stacklevel=4,
        )


# Costs behind method="auto", per matrix, in steps of the iteration (one step: three n x n
# products in the working dtype and the by-product residual): ``fixed``, the fixed cost of
# an iteration run (set-up, float64 confirmation of the last step, output); ``eigh``,
# method="eigh" (float64 LAPACK eigh + reconstruction, :func:`_eigh_power`); ``probe``, the
# spectrum probe (:func:`_probe`).  Measured with the kernels of each size and two threads
# by ``analysis/calibrate_auto.py`` (``analysis/results/auto_cost.md``); interpolated in
# log n, constant outside.  Up to n = 64 the iteration and eigh both run one matrix per
# thread, so there the ratios do not depend on the thread count.
_AUTO_COST_N = (8, 16, 27, 48, 64, 96, 128, 192, 256, 512)
_AUTO_COST = {
    "float64": {
        "fixed": (1.7, 1.6, 1.8, 2.1, 1.7, 1.4, 1.7, 1.2, 1.1, 0.9),
        "eigh": (6.4, 10.6, 9.4, 10.0, 8.4, 5.2, 5.6, 5.0, 4.0, 3.2),
        "probe": (1.0, 1.2, 0.8, 0.9, 0.6, 0.8, 0.7, 0.6, 0.5, 0.6),
    },
    "float32": {
        "fixed": (0.7, 1.2, 2.6, 2.9, 2.2, 2.3, 3.1, 2.7, 2.6, 2.6),
        "eigh": (2.9, 6.6, 12.0, 14.9, 17.2, 6.5, 8.6, 9.7, 9.0, 6.8),
        "probe": (0.4, 0.7, 1.0, 1.1, 1.1, 0.8, 1.0, 1.1, 1.3, 1.4),
    },
}


def _cost(kind: str, n: int, dtype) -> float:
    """``_AUTO_COST[dtype][kind]`` at size ``n``, in steps of the iteration."""
    return _cost_at(kind, int(n), "float32" if np.dtype(dtype) == np.float32 else "float64")


@functools.lru_cache(maxsize=1024)
def _cost_at(kind: str, n: int, dtype_name: str) -> float:
    return float(np.interp(math.log(n), np.log(_AUTO_COST_N), _AUTO_COST[dtype_name][kind]))


def _auto_plan(K, n, dtype):
    """Per matrix: True where ``eigh`` is cheaper than a run of ``K`` accelerated steps
    (``K + fixed`` steps against ``eigh``, :data:`_AUTO_COST`).  The choice depends on
    ``n``, ``K`` and the dtype only, so a matrix gets the same method alone or in a batch."""
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


def _empty_info(batch, method, scaling, tol):
    z = np.zeros(batch, dtype=bool)
    return NewtonSchulzInfo(
        residuals=np.empty(batch + (1 if method == "eigh" else 0,)), n_iter=0,
        converged=z, diverged=z.copy(), best_iter=np.zeros(batch, dtype=np.int64),
        scale=np.empty(batch), method=method, scaling=scaling, tol=tol,
    )


def _solve(A, method, n_iter, tol, scaling, eps, return_info, *, want):
    """Shared body of :func:`inv_sqrtm` (``want="isqrt"``) and :func:`sqrtm_psd` (``"sqrt"``)."""
    arr, method, n_iter, tol, scaling, eps, return_info = _validate(
        A, method, n_iter, tol, scaling, eps, return_info
    )
    dtype = arr.dtype
    batch, n = arr.shape[:-2], arr.shape[-1]
    nb = int(np.prod(batch, dtype=np.int64))
    if method == "auto" or (n_iter is None and tol is None):
        tol_used = tol if tol is not None else default_tol(dtype, n)
    else:
        tol_used = tol
    stop_early = tol_used is not None
    n_max = n_iter if n_iter is not None else MAX_ITER
    if nb == 0:
        out = np.empty(arr.shape, dtype=dtype)
        return (out, _empty_info(batch, method, scaling, tol_used)) if return_info else out

    A64, fro, norm_inf = _prepare_input(arr, eps)
    if want == "isqrt" and np.any(fro == 0):
        raise ValueError(
            "expected a nonzero positive semidefinite matrix, got the zero matrix (all eigenvalues 0) "
            f"at flat batch index {int(np.flatnonzero(fro == 0)[0])}: its inverse square root does not "
            "exist; pass a ridge eps > 0 (A + eps I)"
        )
    # rounding tolerance of the PSD test (the zero matrix, allowed by sqrtm_psd, gets 1)
    delta = np.where(fro > 0, 10.0 * n * np.finfo(dtype).eps * fro, 1.0)

    if method == "eigh":
        return _eigh_only(A64, arr.shape, dtype, delta, eps, want, return_info, tol, tol_used, scaling, "eigh")
    if method == "auto" and _eigh_without_probe(float(tol_used), n, n_max, np.dtype(dtype)):
        # eigh is cheaper than even the best-conditioned accelerated run: no probe; a
        # singular matrix (eigh raises) takes the probe's path to the iteration below
        try:
            return _eigh_only(A64, arr.shape, dtype, delta, eps, want, return_info, tol, tol_used, scaling,
                              "auto:eigh")
        except _SingularError:
            pass

    scheduled = method in ("accelerated", "auto")
    lmin, lmax = _probe(A64, delta, _PROBE_INVERSE_STEPS_SCHEDULE if scheduled else _PROBE_INVERSE_STEPS,
                        _PROBE_POWER_STEPS if scaling == "spectral" else 0)
    # auto sends a numerically singular matrix to the iteration (which warns and returns
    # its best iterate) rather than to eigh (which raises)
    singular = np.zeros(nb, dtype=bool)
    if want == "isqrt":
        sing_tol = _singular_tol(fro, n, dtype)
        _check_singular(lmin, fro, sing_tol, eps, nb)
        singular = lmin <= sing_tol
    c = _scale(A64, scaling, lmax, fro)
    c = np.where(c > 0, c, 1.0)
    coefs = None
    k_last = None
    use_eigh = np.zeros(nb, dtype=bool)
    if method in ("accelerated", "auto"):
        # eigenvalues of Y_0 = A/c lie in [p_lo, p_hi]: p_hi from rigorous bounds on
        # lambda_max (||A||_F, ||A||_inf), p_lo from the over-estimate of lambda_min / safety
        bound = np.minimum(fro, norm_inf)
        p_hi = np.where(bound > 0, bound / c, 1.0)  # (the zero matrix of sqrtm_psd: 1)
        p_lo = np.maximum(lmin, delta / 10.0) / c / _LMIN_SAFETY / p_hi
        tol_s = float(tol_used if tol_used else default_tol(dtype, n))
        if method == "auto":
            use_eigh = _grid_plan(tol_s, n, n_max, np.dtype(dtype))[_grid_index(p_lo)] & ~singular
            if use_eigh.all():
                # (the probe has checked the spectrum; eigh checks it again, exactly)
                return _eigh_only(A64, arr.shape, dtype, delta, eps, want, return_info, tol, tol_used,
                                  scaling, "auto:eigh")
        coefs, K = _accelerated_schedule(p_lo, tol_s, n, n_max)
        # the schedule is designed for s / h, h = sqrt(p_hi): q(s) = q'(s / h)
        h = np.sqrt(p_hi)
        coefs[:, 0, 0] /= h
        coefs[:, 0, 1] /= h ** 3
        if want == "isqrt" and stop_early:
            k_last = K
    label = method
    if method == "auto":
        label = "auto:" + "+".join(m for m, on in (("accelerated", not use_eigh.all()), ("eigh", use_eigh.any()))
                                   if on)

    Y0_64 = A64 / c[:, None, None]
    # the reference code divides A in the working precision by the norm
    Y0 = Y0_64 if dtype == np.float64 else A64.astype(dtype) / c.astype(dtype)[:, None, None]

    out = np.empty((nb, n, n), dtype=dtype)
    ns_idx = np.flatnonzero(~use_eigh)
    eig_idx = np.flatnonzero(use_eigh)
    n_done = np.ones(nb, dtype=np.int64)
    best_iter = np.ones(nb, dtype=np.int64)
    diverged = np.zeros(nb, dtype=bool)
    best_r = np.full(nb, np.nan)
    hist = None
    n_run = 1
    if eig_idx.size:
        # exact to rounding: the residual is evaluated for the history only
        out[eig_idx], best_r[eig_idx] = _eigh_subset(A64[eig_idx], dtype, delta[eig_idx], eps, want,
                                                     return_info)
    if ns_idx.size:
        sub = slice(None) if ns_idx.size == nb else ns_idx
        Y0s, Y0s_64 = Y0[sub], Y0_64[sub]
        if method == "uncoupled":
            X, tracker, n_run, b_it, b_r = _run_uncoupled(Y0s, Y0s_64, n_max, tol=tol_used, stop_early=stop_early)
            Z, Y = X, None
            h_ns = tracker.finish(n_run) if return_info else None
            n_d, div = np.minimum(tracker.stop_iter, n_run), tracker.diverged
        else:
            if coefs is None:
                cf = np.empty((ns_idx.size, n_max, 3))
                cf[:] = (1.5, -0.5, 0.0)
            else:
                cf = coefs[sub]
            Z, Y, n_d, b_it, div, b_r, h_ns = _run_coupled(
                Y0s, Y0s_64, cf, n_max, tol=tol_used, record=return_info, stop_early=stop_early,
                k_last=None if k_last is None else k_last[sub])
            if not return_info:
                # the cheap paths keep no copies: rerun a blown-up matrix with residuals, over
                # the iterations it ran, to return its best iterate
                redo = div | ~np.isfinite(Z).all(axis=(-2, -1))
                if redo.any():
                    j = np.flatnonzero(redo)
                    Zr, Yr, n_r, it_r, div_r, r_r, _ = _run_coupled(
                        Y0s[j], Y0s_64[j], cf[j], max(int(n_d[j].max()), 1), tol=None, record=True,
                        stop_early=False)
                    Z[j], Y[j], b_it[j], b_r[j] = Zr, Yr, it_r, r_r
                    div[j] = True
            n_run = int(n_d.max())
            if return_info:
                h_ns = _freeze_history(h_ns, n_d, n_run)
        sc = np.sqrt(c[sub])[:, None, None]
        if want == "isqrt":
            out[sub] = Z / sc
        elif Y is not None:
            out[sub] = Y * sc
        else:
            out[sub] = (A64[sub] @ Z.astype(np.float64)) / sc
        n_done[sub], best_iter[sub], diverged[sub], best_r[sub] = n_d, b_it, div, b_r
        if return_info:
            hist = np.empty((nb, n_run))
            hist[sub] = h_ns
    if return_info and eig_idx.size:
        if hist is None:
            hist = np.empty((nb, 1))
        hist[eig_idx] = best_r[eig_idx][:, None]

    _warn_diverged(diverged, best_r, best_iter, label, nb)
    _warn_tol_missed(tol, diverged, best_r, use_eigh, n_done, dtype, stacklevel=4)
    out = out.reshape(arr.shape)
    if not return_info:
        return out
    return out, _make_info(hist, best_r, best_iter, diverged, use_eigh, c, eig_idx.size, batch, label,
                           scaling, tol, tol_used)


def _warn_tol_missed(tol, diverged, best_r, use_eigh, n_done, dtype, stacklevel):
    """Warn when an explicit ``tol`` was not reached by some non-diverged iterated matrix
    (shared by the numpy and torch backends)."""
    if tol is None:
        return
    missed = ~diverged & ~(best_r <= tol) & ~use_eigh
    if missed.any():
        i = int(np.flatnonzero(missed)[0])
        warnings.warn(
            f"tol={tol:g} was not reached for {int(missed.sum())} of {len(best_r)} matrices (e.g. flat batch "
            f"index {i}: residual {best_r[i]:.3g} after {n_done[i]} iterations); the residual floor "
            f"is about cond(A) * eps({dtype}) — raise tol, use float64, add a ridge eps, or raise n_iter",
            NsiterWarning,
            stacklevel=stacklevel,
        )


def _make_info(hist, best_r, best_iter, diverged, use_eigh, c, n_eigh, batch, label, scaling, tol, tol_used):
    """The :class:`NewtonSchulzInfo` of a solved batch (flat per-matrix arrays reshaped to ``batch``);
    shared by the numpy and torch backends."""
    nb = len(best_r)
    finite = np.isfinite(best_r)
    converged = finite & ~diverged if tol is None else finite & (best_r <= tol)
    if tol is None:
        converged |= ~diverged & np.isnan(best_r) & use_eigh
    return NewtonSchulzInfo(
        residuals=hist.reshape(batch + (hist.shape[1],)), n_iter=int(hist.shape[1]) if n_eigh < nb else 1,
        converged=converged.reshape(batch), diverged=diverged.reshape(batch),
        best_iter=best_iter.reshape(batch), scale=np.where(use_eigh, 1.0, c).reshape(batch),
        method=label, scaling=scaling, tol=tol_used,
    )


def _eigh_only(A64, shape, dtype, delta, eps, want, return_info, tol, tol_used, scaling, label):
    """Every matrix by ``eigh``: the result (``shape``) and, with ``return_info``, its info."""
    batch = shape[:-2]
    out, r = _eigh_subset(A64, dtype, delta, eps, want, return_info)
    if not return_info:
        return out.reshape(shape)
    finite = np.isfinite(r)
    info = NewtonSchulzInfo(
        residuals=r.reshape(batch + (1,)), n_iter=1,
        converged=(finite if tol is None else finite & (r <= tol)).reshape(batch),
        diverged=(~finite).reshape(batch), best_iter=np.ones(batch, dtype=np.int64),
        scale=np.ones(batch), method=label, scaling=scaling, tol=tol_used,
    )
    return out.reshape(shape), info


def _eigh_subset(A64, dtype, delta, eps, want, with_residual):
    """``method="eigh"`` on a stack: ``(result, float64 residual of A^{-1/2} or nan)``."""
    out, _ = _eigh_power(A64, dtype, delta, eps, power=-0.5 if want == "isqrt" else 0.5)
    if not with_residual:
        return out, np.full(A64.shape[0], np.nan)
    Dinv = out if want == "isqrt" else _eigh_power(A64, dtype, delta, eps)[0]
    return out, _residual64(Dinv, A64)


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
    NsiterWarning
        An explicit ``tol`` was not reached (rounding floor or ``n_iter`` cap); the
        result is the iterate the matrix stopped at.

    Notes
    -----
    Positive semidefiniteness is checked by a (LAPACK, batched) Cholesky factorisation of
    ``A + delta I``, ``delta = 10 n eps(dtype) ||A||_F``: it fails exactly when ``A`` has an
    eigenvalue below ``-delta``.  A few steps of inverse iteration with the factor
    estimate ``lambda_min`` for the singularity warning (threshold: the rounding level
    ``max(10 eps(dtype), n eps(float64)) ||A||_F``).  Cost: about one product.

    Divergence (``info.diverged``): the residual became non-finite, grew above 1000x its
    best value, or above ``10 sqrt(n)``.  Then ``D`` is the best iterate and a
    :class:`~nsiter.NewtonSchulzDivergenceWarning` is emitted.  With a fixed ``n_iter``
    and neither ``tol`` nor ``return_info`` no residual is computed: a non-finite result
    triggers a rerun with residuals, so the warning and the best iterate still come.

    ``method="auto"`` always stops on a tolerance (``tol`` or the default); ``n_iter`` is
    then only the cap.  ``info.method`` says what ran (``"auto:accelerated"``,
    ``"auto:eigh"``, or both for a mixed batch).

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
