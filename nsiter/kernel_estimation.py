r"""The L2 kernel-estimation problem and its solvers (Ye et al. 2020, §3.1, Proposition 1, §4.4.1, A.8).

Given sharp images ``x`` and their valid cross-correlation ``y = x ⋆ k`` with an unknown
kernel ``k`` (plus noise), estimate ``k`` by minimising

.. math::

    L(w, b) = \frac{1}{2M} \lVert X w + b\,\mathbf 1 - y \rVert^2 + \frac{\varepsilon}{2} \lVert w \rVert^2,
    \qquad X = \mathrm{im2col}(x)\ (M \times F),

the paper's Eq. (1) with its ``1/N`` normalisation of Eq. (2) (``M`` = number of patches).
Gradient descent on it (Eq. 2) crawls because the columns of ``X`` are strongly correlated;
on whitened features ``X D`` with ``D = Cov^{-1/2}`` one step with learning rate 1 lands on
the optimum of Eq. (3) (Proposition 1), and the same step is Cov⁻¹-preconditioned gradient
descent in the original coordinates (appendix A.8).

``X`` is never built whole: the normal matrix ``X^T X / M = Cov + mu mu^T`` comes from
:func:`nsiter.patch_covariance`, ``X^T y`` and ``X w`` from Numba correlation kernels.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ._backend import backend
from ._conventions import Geometry, as_images, geometry
from ._numba._kernel_estimation import ROWS_PER_PARTIAL, _correlate, _correlate_adjoint
from ._validation import (
    as_float_array,
    check_finite,
    check_nonempty,
    check_nonnegative_float,
    check_option,
    check_positive_float,
    check_positive_int,
    is_tensor,
    result_float_dtype,
)
from ._warnings import IllConditionedWarning, NsiterWarning

__all__ = ["estimate_kernel", "KernelEstimate", "METHODS"]


def _sla():
    """:mod:`scipy.linalg`, imported on first use so that ``import nsiter`` stays fast."""
    import scipy.linalg

    return scipy.linalg


def _linear_operator():
    """:class:`scipy.sparse.linalg.LinearOperator`, imported on first use."""
    from scipy.sparse.linalg import LinearOperator

    return LinearOperator

#: Solver registry of :func:`estimate_kernel`.
METHODS = ("lstsq", "gd", "gd_standardized", "gd_whitened", "preconditioned", "cg")

# Methods that centre the features (batch norm / network deconvolution) and so fit a bias by default.
_CENTRING = ("gd_standardized", "gd_whitened")
# Gradient methods that accept mini-batches.
_GRADIENT = ("gd", "gd_standardized", "gd_whitened", "preconditioned")
_DEFAULT_N_ITER = {"gd": 100, "gd_standardized": 100, "gd_whitened": 1, "preconditioned": 1}
_CG_DEFAULT_TOL = 1e-12


@dataclass(frozen=True)
class KernelEstimate:
    """Result of :func:`estimate_kernel`.

    Attributes
    ----------
    kernel : ndarray
        ``(kh, kw)`` for 2-D ``x``, ``(C, kh, kw)`` for ``(C, H, W)`` / ``(N, C, H, W)`` ``x``;
        dtype of the inputs (float32 stays float32; all arithmetic is float64).
    intercept : float
        The fitted bias ``b`` (``0.0`` when ``fit_intercept`` is False).
    history : ndarray of float64, shape (n_iter + 1,)
        Objective ``L(w, b)`` (module docstring; the data loss ``||Xw + b - y||^2 / (2M)`` when
        ``eps == 0``) before the first iteration (``history[0] = ||y||^2 / (2M)``, at ``w = 0, b = 0``)
        and after each iteration.  Evaluated as ``L* + (theta - theta*)^T A (theta - theta*) / 2``
        with the refined optimum ``theta*`` and its residual loss ``L*`` (see ``optimum_loss``), so
        that the excess over the optimum is resolved far below ``1e-16 * history[0]``; ``cg``
        records ``||r||^2 / (2M)`` of its own residual; a singular normal matrix falls back to
        the expanded quadratic (absolute accuracy ``~1e-16 * history[0]``).
    n_iter : int
        Iterations run (``lstsq``: 1, the direct solve).
    method : str
    fit_intercept : bool
    lr : float or None
        Learning rate used by the gradient methods (None for ``lstsq`` and ``cg``).
    batch_size : int or None
        Patches per mini-batch (None: full batch).
    converged : bool or None
        Whether ``grad_norm <= tol`` was reached (None when no ``tol`` was given; True for ``lstsq``).
    grad_norm : float
        ``||grad L(w, b)|| / ||grad L(0, 0)||`` at the returned estimate: the relative residual of
        the normal equations (full batch; ``cg`` with an intercept: of the centred problem).
    loss : float
        ``history[-1]``.
    optimum_loss : float or None
        ``L*``, the objective at the exact minimiser: Cholesky solve of the normal equations, one
        refinement step with the gradient from the correlations, the loss from the residual.
        None for ``cg`` (matrix-free) and when the normal matrix is singular.
    condition : float or None
        2-norm condition number of the problem's Hessian (``X^T X / M + eps I``, augmented by the
        intercept row/column when ``fit_intercept``); None for ``cg``.
    """

    kernel: np.ndarray
    intercept: float
    history: np.ndarray
    n_iter: int
    method: str
    fit_intercept: bool
    lr: float | None = None
    batch_size: int | None = None
    converged: bool | None = None
    grad_norm: float = float("nan")
    loss: float = float("nan")
    optimum_loss: float | None = None
    condition: float | None = None


# ----------------------------------------------------------------------------------------------
# the problem: padded images, targets, and the correlation operators X w, X^T r
# ----------------------------------------------------------------------------------------------
class _Problem:
    """Padded float64 images ``xp`` (N, C, Hp, Wp), targets ``y`` (N, oh, ow) and the geometry."""

    def __init__(self, imgs: np.ndarray, y: np.ndarray, g: Geometry, eps: float, fit_intercept: bool):
        self.imgs = imgs
        self.g = g
        if g.ph or g.pw:
            xp = np.pad(imgs, ((0, 0), (0, 0), (g.ph, g.ph), (g.pw, g.pw)))
        else:
            xp = imgs
        self.xp = np.ascontiguousarray(xp, dtype=np.float64)
        self.y = np.ascontiguousarray(y, dtype=np.float64).reshape(g.n, g.oh, g.ow)
        self.m = g.n * g.n_patches
        self.f = g.n_features
        self.eps = eps
        self.fit_intercept = fit_intercept
        self.p = self.f + int(fit_intercept)
        self.ybar = float(self.y.mean())
        self.yy = float(np.vdot(self.y, self.y)) / self.m
        self._moments = None

    # X w (N, oh, ow) and X^T r (F,), never forming X
    def xw(self, w: np.ndarray) -> np.ndarray:
        g = self.g
        out = np.empty((g.n, g.oh, g.ow))
        _correlate(self.xp, np.ascontiguousarray(w, dtype=np.float64).reshape(g.c, g.kh, g.kw),
                   g.sh, g.sw, g.dh, g.dw, out)
        return out

    def xtr(self, r: np.ndarray) -> np.ndarray:
        g = self.g
        n_blocks = -(-(g.n * g.oh) // ROWS_PER_PARTIAL)
        partial = np.empty((n_blocks, g.c, g.kh, g.kw))
        _correlate_adjoint(self.xp, np.ascontiguousarray(r, dtype=np.float64).reshape(g.n, g.oh, g.ow),
                           g.sh, g.sw, g.dh, g.dw, partial)
        return partial.reshape(n_blocks, -1).sum(axis=0)

    def moments(self):
        """``(H, mu, sigma)``: ``X^T X / M``, the patch mean and ``Cov = H - mu mu^T`` (float64)."""
        if self._moments is None:
            sigma, mu = _patch_moments(self.imgs, self.g)
            h = sigma + np.outer(mu, mu)
            self._moments = (h, mu, sigma)
        return self._moments

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` of ``X`` (im2col), shape ``(len(rows), F)``."""
        g = self.g
        n, rem = np.divmod(rows, g.n_patches)
        r, q = np.divmod(rem, g.ow)
        ii = (r * g.sh)[:, None, None, None] + (np.arange(g.kh) * g.dh)[None, None, :, None]
        jj = (q * g.sw)[:, None, None, None] + (np.arange(g.kw) * g.dw)[None, None, None, :]
        cc = np.arange(g.c)[None, :, None, None]
        return self.xp[n[:, None, None, None], cc, ii, jj].reshape(len(rows), self.f)


def _patch_moments(imgs: np.ndarray, g: Geometry):
    """Patch covariance and mean of ``imgs`` in float64 (Algorithm 1 of the paper)."""
    from .covariance import patch_covariance

    cov, mean = patch_covariance(np.asarray(imgs, dtype=np.float64), (g.kh, g.kw), stride=(g.sh, g.sw), padding=(g.ph, g.pw),
                                 dilation=(g.dh, g.dw))
    cov = np.asarray(cov, dtype=np.float64)
    return (cov + cov.T) / 2, np.asarray(mean, dtype=np.float64)


def _inv_sqrtm(a: np.ndarray, eps: float, method: str) -> np.ndarray:
    from .newton_schulz import inv_sqrtm

    return np.asarray(inv_sqrtm(a, method=method, eps=eps), dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# the quadratic L(theta) = 0.5 theta^T A theta - theta^T c + yy/2, theta = (w, b)
# ----------------------------------------------------------------------------------------------
class _Quadratic:
    """Normal equations of the (ridge, intercept-augmented) problem: Hessian ``a``, right side ``c``."""

    def __init__(self, prob: _Problem):
        h, mu, sigma = prob.moments()
        f, eps = prob.f, prob.eps
        g = prob.xtr(prob.y) / prob.m
        self.prob = prob
        self.h, self.mu, self.sigma = h, mu, sigma
        self.g = g
        a = h + eps * np.eye(f)
        if prob.fit_intercept:
            aug = np.empty((f + 1, f + 1))
            aug[:f, :f] = a
            aug[:f, f] = mu
            aug[f, :f] = mu
            aug[f, f] = 1.0
            a = aug
            c = np.append(g, prob.ybar)
        else:
            c = g
        self.a, self.c = a, c
        self.c_norm = float(np.linalg.norm(c))
        self._eigs = None
        self._chol = None
        self._optimum = None

    def loss(self, theta: np.ndarray) -> float:
        """``L(theta)``; once :meth:`optimum` is known, as ``L* + (theta - theta*)^T A (theta - theta*) / 2``.

        The anchored form has no cancellation near the optimum (the expanded
        ``theta^T A theta / 2 - theta^T c + yy / 2`` loses everything below ``u * yy``).
        """
        if self._optimum is not None:
            theta_s, l_s = self._optimum
            e = theta - theta_s
            return float(l_s + 0.5 * e @ (self.a @ e))
        return float(0.5 * theta @ (self.a @ theta) - theta @ self.c + 0.5 * self.prob.yy)

    def grad(self, theta: np.ndarray) -> np.ndarray:
        return self.a @ theta - self.c

    def rel_grad(self, theta: np.ndarray) -> float:
        with np.errstate(over="ignore", invalid="ignore"):  # inf after a (reported) blow-up
            gn = float(np.linalg.norm(self.grad(theta)))
        return gn / self.c_norm if self.c_norm > 0 else gn

    def eigs(self) -> np.ndarray:
        if self._eigs is None:
            self._eigs = _sla().eigvalsh(self.a, check_finite=False)
        return self._eigs

    def condition(self) -> float:
        lam = self.eigs()
        return float(lam[-1] / lam[0]) if lam[0] > 0 else float("inf")

    def factor(self):
        """Cholesky factor of the reduced system: ``Cov + eps I`` (intercept) or ``H + eps I``."""
        if self._chol is None:
            prob = self.prob
            m = (self.sigma if prob.fit_intercept else self.h) + prob.eps * np.eye(prob.f)
            try:
                self._chol = _sla().cho_factor(m, lower=True, check_finite=False)
            except np.linalg.LinAlgError:
                what = "patch covariance" if prob.fit_intercept else "normal matrix X^T X / M"
                raise ValueError(
                    f"the {what} ({prob.f} x {prob.f}) is singular: the patches of x do not span "
                    f"all {prob.f} kernel taps (constant image, fewer patches ({prob.m}) than taps, "
                    "or exactly dependent channels); pass eps > 0 (ridge) or use a smaller kernel"
                ) from None
            lam = self.eigs()
            if lam[0] <= 0 or lam[-1] / lam[0] > 1e-3 / np.finfo(np.float64).eps:
                warnings.warn(
                    f"the normal matrix has condition number {self.condition():.3g}; the kernel is "
                    f"accurate to about cond * 1e-16 only; pass eps > 0 (ridge) to regularise",
                    IllConditionedWarning, stacklevel=5)
        return self._chol

    def precondition(self, grad: np.ndarray) -> np.ndarray:
        """``P grad`` with ``P = A^{-1}`` (the A.8 preconditioner ``T T^T``, via Cholesky of Cov)."""
        prob = self.prob
        chol = self.factor()
        if not prob.fit_intercept:
            return _sla().cho_solve(chol, grad, check_finite=False)
        f = prob.f
        u = _sla().cho_solve(chol, grad[:f] - self.mu * grad[f], check_finite=False)
        return np.append(u, grad[f] - self.mu @ u)

    def solve(self) -> np.ndarray:
        """The minimiser of Eq. (3), ``theta* = A^{-1} c``, via the reduced (centred) system."""
        prob = self.prob
        chol = self.factor()
        if not prob.fit_intercept:
            return _sla().cho_solve(chol, self.c, check_finite=False)
        w = _sla().cho_solve(chol, self.g - self.mu * prob.ybar, check_finite=False)
        return np.append(w, prob.ybar - self.mu @ w)

    def optimum(self):
        """``(theta*, L*)``: Cholesky solve of Eq. (3), one refinement step, ``L*`` from the residual.

        The refinement step takes the gradient from ``X`` itself (two correlations), not from the
        rounded normal matrix, which removes the error of the solve down to about
        ``(cond * u)^2``; ``L*`` is evaluated from the residual ``X w* + b* - y`` (a sum of squares,
        accurate to ``u * L*``).  Cached; afterwards :meth:`loss` is anchored at it.
        """
        if self._optimum is None:
            theta = self.solve()
            _, grad = _exact_loss_grad(self.prob, theta)
            theta = theta - self.precondition(grad)
            loss, _ = _exact_loss_grad(self.prob, theta, grad=False)
            self._optimum = (theta, loss)
        return self._optimum

    def transform(self, kind: str, sqrtm_method: str) -> np.ndarray:
        """Change of coordinates ``theta = T phi`` onto standardised or whitened features.

        With an intercept the features are centred: ``(X | 1) T = ((X - 1 mu^T) S | 1)`` with
        ``T = [[S, 0], [-mu^T S, 1]]``; without, ``X T = X S``.  ``S`` is
        ``diag(var + eps)^{-1/2}`` (standardised: batch norm) or ``(Cov + eps I)^{-1/2}``
        (whitened: network deconvolution; ``X^T X / M + eps I`` without intercept).
        """
        prob = self.prob
        f = prob.f
        second = self.sigma if prob.fit_intercept else self.h
        if kind == "standardized":
            d = np.diag(second) + prob.eps
            s = np.diag(np.where(d > 0, 1.0 / np.sqrt(np.where(d > 0, d, 1.0)), 1.0))
        else:
            lam = self.eigs()
            if lam[0] <= 0 and prob.eps == 0:
                self.factor()  # raises the singular-matrix error with its fix
            s = _inv_sqrtm(second, prob.eps, sqrtm_method)
            if not np.all(np.isfinite(s)):
                raise ValueError(
                    f"inv_sqrtm(method={sqrtm_method!r}) returned non-finite values for the "
                    f"{f} x {f} feature covariance (condition {self.condition():.3g}); pass eps > 0"
                )
        if not prob.fit_intercept:
            return s
        t = np.zeros((f + 1, f + 1))
        t[:f, :f] = s
        t[f, :f] = -(self.mu @ s)
        t[f, f] = 1.0
        return t


# ----------------------------------------------------------------------------------------------
# solvers
# ----------------------------------------------------------------------------------------------
def _minibatch_grad(prob: _Problem, theta: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Gradient of the objective on the patches ``rows`` only (Eq. 2 on a mini-batch)."""
    xb = prob.gather(rows)
    f = prob.f
    w = theta[:f]
    res = xb @ w - prob.y.reshape(-1)[rows]
    if prob.fit_intercept:
        res += theta[f]
    gw = xb.T @ res / len(rows) + prob.eps * w
    return np.append(gw, res.mean()) if prob.fit_intercept else gw


def _exact_loss_grad(prob: _Problem, theta: np.ndarray, *, grad: bool = True):
    """``(L(theta), grad L(theta))`` from the residual ``X w + b - y`` (correlations, no normal matrix)."""
    f, m = prob.f, prob.m
    w = theta[:f]
    res = prob.xw(w) - prob.y
    if prob.fit_intercept:
        res += theta[f]
    loss = 0.5 * float(np.vdot(res, res)) / m + 0.5 * prob.eps * float(w @ w)
    if not grad:
        return loss, None
    gw = prob.xtr(res) / m + prob.eps * w
    return loss, (np.append(gw, res.sum() / m) if prob.fit_intercept else gw)


def _descent(quad: _Quadratic, *, t, precondition: bool, lr: float, n_iter: int, tol, batch_size,
             rng, callback, emit):
    """Gradient descent ``phi <- phi - lr * grad_phi`` in coordinates ``theta = T phi`` (``T`` None: identity).

    Full batch, ``grad_phi = T^T A T phi - T^T c`` (Eq. 2 on the transformed features); mini-batch,
    ``grad_phi = T^T grad_B(theta)``.  ``precondition=True`` steps
    ``theta <- theta - lr * A^{-1} grad`` instead (appendix A.8).  Stops at the first non-finite
    loss (warning) and returns the last finite iterate.
    Returns ``(theta, history, n_iter_run, converged)``.
    """
    prob = quad.prob
    full = batch_size is None
    if t is not None and full:
        a_t = t.T @ quad.a @ t
        c_t = t.T @ quad.c
    phi = np.zeros(prob.p)
    theta = np.zeros(prob.p)
    history = [0.5 * prob.yy]  # L(0), exactly
    converged = None
    it = 0
    with np.errstate(over="ignore", invalid="ignore"):  # a blow-up is detected and reported below
        for it in range(1, n_iter + 1):
            if tol is not None and quad.rel_grad(theta) <= tol:
                it -= 1
                converged = True
                break
            if not full:
                rows = np.sort(rng.choice(prob.m, batch_size, replace=False))
                grad_theta = _minibatch_grad(prob, theta, rows)
            elif t is None:
                grad_theta = quad.grad(theta)
            theta_prev = theta
            if t is not None:
                grad_phi = (a_t @ phi - c_t) if full else t.T @ grad_theta
                phi = phi - lr * grad_phi
                theta = t @ phi
            elif precondition:
                theta = theta - lr * quad.precondition(grad_theta)
            else:
                theta = theta - lr * grad_theta
            loss = quad.loss(theta)
            if not np.isfinite(loss) or not np.all(np.isfinite(theta)):
                warnings.warn(
                    f"gradient descent diverged at iteration {it} (loss {loss:.3g}); the learning rate "
                    f"{lr:.3g} is too large (full batch: above 2/lambda_max); pass a smaller lr",
                    NsiterWarning, stacklevel=3)
                it -= 1
                theta = theta_prev
                break
            history.append(loss)
            if callback is not None:
                emit(callback, theta)
    if tol is not None and converged is None:
        converged = quad.rel_grad(theta) <= tol
    return theta, np.asarray(history), it, converged


def _cgls(prob: _Problem, *, n_iter: int, tol: float, callback, emit):
    """Conjugate gradients on the normal equations in the CGLS form (Björck 1996, §7.4).

    Matrix-free: ``X`` (centred when an intercept is fitted) is a
    :class:`scipy.sparse.linalg.LinearOperator` whose ``matvec``/``rmatvec`` are the correlation
    kernels.  Minimises ``||X w - y||^2 / (2M) + eps ||w||^2 / 2``; the residual ``r = y - X w`` is
    carried along, so the loss history costs nothing extra.
    """
    m, f, eps = prob.m, prob.f, prob.eps
    if prob.fit_intercept:
        mu = prob.xtr(np.ones(m)) / m
        op = _linear_operator()((m, f), dtype=np.float64,
                            matvec=lambda v: prob.xw(v).reshape(-1) - mu @ v,
                            rmatvec=lambda r: prob.xtr(r) - mu * r.sum())
        ytil = prob.y.reshape(-1) - prob.ybar
    else:
        mu = None
        op = _linear_operator()((m, f), dtype=np.float64,
                            matvec=lambda v: prob.xw(v).reshape(-1), rmatvec=lambda r: prob.xtr(r))
        ytil = prob.y.reshape(-1)

    def theta_of(w):
        return np.append(w, prob.ybar - mu @ w) if prob.fit_intercept else w

    w = np.zeros(f)
    r = ytil.copy()
    s = op.rmatvec(r) / m
    p = s.copy()
    gamma = float(s @ s)
    s0 = np.sqrt(gamma)
    history = [0.5 * prob.yy]
    rel = 1.0 if s0 > 0 else 0.0
    it = 0
    for it in range(1, n_iter + 1):
        if rel <= tol:
            it -= 1
            break
        q = op.matvec(p)
        delta = float(q @ q) / m + eps * float(p @ p)
        alpha = gamma / delta
        w = w + alpha * p
        r = r - alpha * q
        s = op.rmatvec(r) / m - eps * w
        gamma_new = float(s @ s)
        rel = np.sqrt(gamma_new) / s0
        history.append(0.5 * float(r @ r) / m + 0.5 * eps * float(w @ w))
        if callback is not None:
            emit(callback, theta_of(w))
        p = s + (gamma_new / gamma) * p
        gamma = gamma_new
    return theta_of(w), np.asarray(history), it, bool(rel <= tol), float(rel)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def _expected_y_shapes(x_ndim: int, g: Geometry):
    if x_ndim == 4:
        return (g.n, g.oh, g.ow), ((g.n, g.oh, g.ow), (g.n, 1, g.oh, g.ow))
    return (g.oh, g.ow), ((g.oh, g.ow), (1, g.oh, g.ow))


def estimate_kernel(x, y, kernel_size, *, method: str = "lstsq", n_iter: int | None = None,
                    lr: float | None = None, tol: float | None = None, eps: float = 0.0,
                    fit_intercept: bool | None = None, batch_size: int | None = None, rng=None,
                    stride=1, padding=0, dilation=1, sqrtm_method: str = "eigh",
                    callback: Callable | None = None) -> KernelEstimate:
    r"""Estimate the kernel ``k`` of ``y = x ⋆ k`` by L2 regression (Ye et al. 2020, Eq. 1–3).

    Minimises :math:`L(w, b) = \frac{1}{2M}\lVert Xw + b - y\rVert^2 + \frac{\varepsilon}{2}\lVert w\rVert^2`
    with ``X = im2col(x, kernel_size, ...)`` (``M`` patches × ``F = C kh kw`` taps) and ``b = 0``
    unless ``fit_intercept``.  Gradient steps follow Eq. (2),
    ``w <- w - lr (X^T X w - X^T y) / M``; the optimum is Eq. (3), ``w = (X^T X)^{-1} X^T y``.
    Proposition 1: on whitened features (``X^T X / M = I``) one step with ``lr = 1`` is exact.

    Parameters
    ----------
    x : array_like, shape (H, W), (C, H, W) or (N, C, H, W)
        Sharp images, channels first.
    y : array_like
        Valid cross-correlation output(s): ``(H_out, W_out)`` for 2-D/3-D ``x``, ``(N, H_out, W_out)``
        for 4-D ``x`` (a singleton output-channel axis is accepted too).
    kernel_size : int or (int, int)
    method : str, default "lstsq"
        One of :data:`METHODS`:

        - ``"lstsq"``: the normal equations, solved by Cholesky in float64 plus one step of
          iterative refinement whose gradient ``X^T (X w - y)`` comes from the correlation kernels
          (not from the rounded normal matrix) — the optimum, to about ``(cond u)^2`` relative.
        - ``"gd"``: Eq. (2) with a fixed ``lr`` (default ``1 / lambda_max`` of the Hessian).
        - ``"gd_standardized"``: GD on per-feature standardised features ``(x - mu) / sqrt(var + eps)``
          plus a bias — the batch-norm analogue (default ``lr = 1 / lambda_max`` of the new Hessian).
        - ``"gd_whitened"``: GD on centred, whitened features ``(X - 1 mu^T) D``,
          ``D = (Cov + eps I)^{-1/2}`` from :func:`nsiter.inv_sqrtm`, plus a bias — network
          deconvolution; ``lr = 1`` by default and ONE full-batch step reaches the optimum.
        - ``"preconditioned"``: GD preconditioned by ``A^{-1}`` (``Cov^{-1}`` with the intercept
          correction, via Cholesky; appendix A.8); its iterates equal those of ``"gd_whitened"``
          for every ``lr``, ``n_iter`` and mini-batch sequence.  Default ``lr = 1``.
        - ``"cg"``: matrix-free conjugate gradients on the normal equations (CGLS), the operator being
          the correlation kernels wrapped as a :class:`scipy.sparse.linalg.LinearOperator`.
    n_iter : int, optional
        Maximum iterations (>= 1).  Defaults: 100 for ``gd``/``gd_standardized``, 1 for
        ``gd_whitened``/``preconditioned``, ``10 * F`` for ``cg``; ignored by ``lstsq``.
    lr : float, optional
        Learning rate (> 0) of the gradient methods; defaults above; ignored by ``lstsq`` and ``cg``.
        Full-batch GD decreases the objective monotonically for ``lr <= 2 / lambda_max``; with
        mini-batches smaller steps are needed as the batch shrinks (the paper's Table 4 uses
        lr = 0.1, 0.5, 1 for batch sizes 128, 512, 2048).
    tol : float, optional
        Stop once ``||grad L|| <= tol * ||grad L(0)||`` (relative residual of the normal equations).
        Default: no early stop for the gradient methods, ``1e-12`` for ``cg``.
    eps : float, default 0.0
        Ridge ``eps >= 0`` (on ``w`` only, not on ``b``); with ``eps > 0`` every method solves ridge
        regression, and one whitened step (``D = (Cov + eps I)^{-1/2}``) is still exact.
    fit_intercept : bool, optional
        Fit a bias ``b`` (the paper's augmented matrix ``(X | 1)``).  Default: True for the centring
        methods ``gd_standardized`` and ``gd_whitened``, False for the others.  Pass it explicitly to
        compare methods on the same problem.  Without an intercept ``gd_whitened`` whitens with
        the uncentred ``(X^T X / M + eps I)^{-1/2}`` and ``gd_standardized`` divides by the RMS.
    batch_size : int, optional
        Mini-batch SGD (gradient methods only): each iteration draws ``batch_size`` distinct patches
        uniformly at random.  The coordinate changes (standardisation, whitening) use full-data
        statistics; the history records the full-data objective.
    rng : None, int or numpy.random.Generator
        Seed or generator for the mini-batches.
    stride, padding, dilation : int or (int, int)
        Geometry of the correlation, as in :func:`nsiter.im2col`.
    sqrtm_method : str, default "eigh"
        ``method`` passed to :func:`nsiter.inv_sqrtm` for ``gd_whitened`` (``"coupled"`` for
        Newton–Schulz whitening; then one step is exact only as far as ``D`` is).
    callback : callable, optional
        ``callback(kernel, intercept)`` after every iteration (float64 copies).

    Returns
    -------
    KernelEstimate
        ``.kernel``, ``.intercept``, ``.history``, ``.n_iter``, ``.method``, ``.converged``,
        ``.grad_norm``, ``.optimum_loss``, ``.condition``, ...

    Raises
    ------
    ValueError
        ``y`` of the wrong shape (the message gives the expected one), kernel larger than ``x``,
        non-finite ``x`` or ``y``, unknown ``method``, ``lr <= 0``, ``n_iter < 1``, ``tol <= 0``,
        ``eps < 0``, ``batch_size`` with a non-gradient method or above the number of patches, a
        singular normal matrix (fix: ``eps > 0``).
    TypeError
        Complex input, non-integer ``n_iter``/``batch_size``.

    Warns
    -----
    IllConditionedWarning
        The normal matrix is numerically singular (condition > 1e13).
    NsiterWarning
        Gradient descent diverged (``lr`` too large); the last finite iterate is returned.

    Notes
    -----
    All arithmetic is float64: the normal matrix ``X^T X / M = Cov + mu mu^T`` from
    :func:`nsiter.patch_covariance`, ``X^T y`` by a Numba correlation kernel, never the ``M x F``
    im2col matrix (``cg`` applies ``X`` and ``X^T`` as correlations; mini-batches gather only their
    own patches).  One iteration of the full-batch gradient methods costs ``O(F^2)``.

    torch tensors are a host computation too (the solvers' cost is ``O(F^2)`` per iteration
    once the normal equations are formed): ``x`` and ``y`` are copied to host memory
    (detached: no gradient flows through the estimate), and ``.kernel`` comes back as a
    tensor on the device of ``x`` (of ``y`` if only ``y`` is a tensor) in the promoted dtype;
    ``callback`` then receives the kernel as a float64 CPU tensor.

    Examples
    --------
    >>> import numpy as np, nsiter
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((64, 64))
    >>> k = rng.standard_normal((5, 5))
    >>> y = nsiter.im2col(x, 5) @ k.ravel()
    >>> est = nsiter.estimate_kernel(x, y.reshape(60, 60), 5)
    >>> bool(np.allclose(est.kernel, k))
    True
    >>> one = nsiter.estimate_kernel(x, y.reshape(60, 60), 5, method="gd_whitened")
    >>> one.n_iter, bool(np.allclose(one.kernel, k))
    (1, True)
    """
    be = backend(x, y)
    if be.torch:  # a host computation: the solvers are float64 numpy/scipy, O(F^2) per iteration
        ref = x if is_tensor(x) else y
        if is_tensor(x) and is_tensor(y) and x.device != y.device:
            raise ValueError(f"expected x and y on the same device, got x on {x.device} and y on {y.device}; "
                             "move one of them with .to(device)")
        x, y = (be.host(as_float_array(a, name)) if is_tensor(a) else a for a, name in ((x, "x"), (y, "y")))
        if callable(callback):  # the kernel as a float64 CPU tensor, the intercept as a float
            user_callback = callback
            callback = lambda w, b: user_callback(be.xp.asarray(w), b)  # noqa: E731
    # ---- validate
    method = check_option(method, "method", METHODS)
    xa = as_float_array(x, "x")
    ya = as_float_array(y, "y")
    out_dtype = np.promote_types(result_float_dtype(xa.dtype), result_float_dtype(ya.dtype))
    imgs = as_images(xa, "x")
    check_nonempty(imgs, "x")
    g = geometry(imgs.shape, kernel_size, stride, padding, dilation)
    if g.oh == 0 or g.ow == 0:  # pragma: no cover - geometry() rejects kernels larger than x
        raise ValueError(f"kernel_size {kernel_size} leaves no valid output for x of shape {xa.shape}")
    want, accepted = _expected_y_shapes(xa.ndim, g)
    if ya.shape not in accepted:
        raise ValueError(
            f"y of shape {ya.shape} does not match x of shape {xa.shape} with kernel_size {(g.kh, g.kw)}, "
            f"stride {(g.sh, g.sw)}, padding {(g.ph, g.pw)}, dilation {(g.dh, g.dw)}: expected y of shape "
            f"{want} (the valid cross-correlation output); compute y with the same geometry or crop it"
        )
    check_finite(xa, "x")
    check_finite(ya, "y")
    if n_iter is not None:
        n_iter = check_positive_int(n_iter, "n_iter")
    if lr is not None:
        lr = check_positive_float(lr, "lr")
    if tol is not None:
        tol = check_positive_float(tol, "tol")
    eps = check_nonnegative_float(eps, "eps")
    if fit_intercept is None:
        fit_intercept = method in _CENTRING
    elif not isinstance(fit_intercept, (bool, np.bool_)):
        raise TypeError(f"expected fit_intercept as True, False or None, got {fit_intercept!r}")
    fit_intercept = bool(fit_intercept)
    if batch_size is not None:
        batch_size = check_positive_int(batch_size, "batch_size")
        if method not in _GRADIENT:
            raise ValueError(
                f"batch_size applies to the gradient methods {_GRADIENT}, got method {method!r}; "
                "drop batch_size or choose one of those methods")
        if batch_size > g.n * g.n_patches:
            raise ValueError(
                f"expected batch_size <= the number of patches {g.n * g.n_patches}, got {batch_size}; "
                "pass a smaller batch_size or None for the full batch")
    if callback is not None and not callable(callback):
        raise TypeError(f"expected a callable callback(kernel, intercept), got {type(callback).__name__}")
    rng = np.random.default_rng(rng)

    prob = _Problem(imgs, ya, g, eps, fit_intercept)
    kshape = (g.kh, g.kw) if xa.ndim == 2 else (g.c, g.kh, g.kw)

    def split(theta):
        w = theta[:prob.f].reshape(kshape)
        return w, (float(theta[prob.f]) if fit_intercept else 0.0)

    def emit(cb, theta):
        w, b = split(theta)
        cb(w.copy(), b)

    # ---- dispatch
    lr_used = None
    optimum = condition = None
    if method == "cg":
        n_max = 10 * prob.f if n_iter is None else n_iter
        theta, history, it, converged, grad_norm = _cgls(
            prob, n_iter=n_max, tol=_CG_DEFAULT_TOL if tol is None else tol, callback=callback, emit=emit)
    else:
        quad = _Quadratic(prob)
        # the optimum anchors the loss history (and is the answer of "lstsq"); the gradient
        # methods need it only for that, so a singular normal matrix is not an error for them
        try:
            with warnings.catch_warnings():
                if method in ("gd", "gd_standardized", "gd_whitened"):
                    warnings.simplefilter("ignore", IllConditionedWarning)
                theta_star, optimum = quad.optimum()
        except ValueError:
            if method in ("lstsq", "preconditioned"):
                raise
        if method == "lstsq":
            theta = theta_star
            history = np.array([0.5 * prob.yy, optimum])
            it, converged = 1, True
            if callback is not None:
                emit(callback, theta)
        else:
            n_max = _DEFAULT_N_ITER[method] if n_iter is None else n_iter
            t = None
            if method == "gd_standardized":
                t = quad.transform("standardized", sqrtm_method)
            elif method == "gd_whitened":
                t = quad.transform("whitened", sqrtm_method)
            if lr is not None:
                lr_used = lr
            elif method in ("gd_whitened", "preconditioned"):
                lr_used = 1.0
            else:
                a_t = quad.a if t is None else t.T @ quad.a @ t
                lam_max = float(_sla().eigvalsh(a_t, subset_by_index=[prob.p - 1, prob.p - 1],
                                                      check_finite=False)[0])
                lr_used = 1.0 / lam_max if lam_max > 0 else 1.0
            theta, history, it, converged = _descent(
                quad, t=t, precondition=method == "preconditioned", lr=lr_used, n_iter=n_max, tol=tol,
                batch_size=batch_size, rng=rng, callback=callback, emit=emit)
        grad_norm = quad.rel_grad(theta)
        condition = quad.condition()
        if tol is None and method != "lstsq":
            converged = None
    if method == "cg" and tol is None:
        converged = bool(converged)
    w, b = split(theta)
    kernel = w.astype(out_dtype, copy=True)
    return KernelEstimate(
        kernel=be.asarray(kernel, ref) if be.torch else kernel, intercept=b, history=history, n_iter=int(it),
        method=method, fit_intercept=fit_intercept, lr=lr_used, batch_size=batch_size, converged=converged,
        grad_norm=float(grad_norm), loss=float(history[-1]), optimum_loss=optimum, condition=condition)
