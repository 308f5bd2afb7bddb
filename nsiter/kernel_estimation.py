r"""The L2 kernel-estimation problem and its solvers (Ye et al. 2020, §3.1, Proposition 1, §4.4.1, A.8).

:func:`estimate_kernel` minimises ``||X w + b - y||^2 / (2M) + eps ||w||^2 / 2``, ``X = im2col(x)`` (Eq. 1), by
a direct solve, gradient descent (Eq. 2; it crawls on the correlated columns of ``X``) on raw, standardised or
whitened features, preconditioned GD or CGLS.  One whitened step is optimal (Proposition 1) and equals
Cov⁻¹-preconditioned GD (A.8).  ``X`` is never built: the normal matrix comes from
:func:`nsiter.patch_covariance`, ``X w`` and ``X^T r`` from Numba correlation kernels.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ._backend import backend
from ._conventions import Geometry, as_images, geometry
from ._validation import (as_float_array, check_nonempty, check_nonnegative_float, check_option,
                          check_positive_float, check_positive_int, is_tensor, result_float_dtype)
from ._warnings import IllConditionedWarning, NsiterWarning, warn
from .covariance import _ldexp, _scale_exponent, patch_covariance
from .newton_schulz import inv_sqrtm

__all__ = ["estimate_kernel", "KernelEstimate", "METHODS"]


def _sla():
    import scipy.linalg  # on first use, so that ``import nsiter`` stays fast

    return scipy.linalg


def _kernels():
    """The Numba correlation kernels, imported on first use (``import nsiter`` loads no Numba)."""
    from ._numba import _kernel_estimation

    return _kernel_estimation


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
    """Result of :func:`estimate_kernel` (``method``, ``fit_intercept``, ``batch_size``: as used).

    Attributes
    ----------
    kernel : ndarray
        ``(kh, kw)`` for 2-D ``x``, else ``(C, kh, kw)``, in the inputs' dtype (arithmetic is float64).
    intercept : float
        The fitted bias ``b`` (``0.0`` when ``fit_intercept`` is False).
    history : ndarray of float64, shape (n_iter + 1,)
        ``L(w, b)`` at ``w = 0, b = 0`` and after each iteration, as ``L* + (theta - theta*)^T A (theta - theta*) / 2``
        so that the excess over ``L*`` is resolved far below ``1e-16 * history[0]`` (``cg``: ``||r||^2 / (2M)``
        of its own residual; a singular normal matrix: the expanded quadratic, to ``~1e-16 * history[0]``).
    n_iter : int
        Iterations run (``lstsq``: 1, the direct solve).
    lr : float or None
        Learning rate of the gradient methods (None for ``lstsq`` and ``cg``).
    converged : bool or None
        Whether ``grad_norm <= tol`` was reached (None without ``tol``; True for ``lstsq``).
    grad_norm : float
        ``||grad L(w, b)|| / ||grad L(0, 0)||``, the normal equations' relative residual (``cg``: centred).
    loss, optimum_loss : float, float or None
        ``history[-1]``; ``L*`` at the exact minimiser (Cholesky solve, one refinement step with the
        gradient from the correlations, loss from the residual), None for ``cg`` and a singular matrix.
    condition : float or None
        2-norm condition number of the Hessian ``X^T X / M + eps I`` (intercept-augmented); None for ``cg``.
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


class _Problem:
    """Padded float64 images ``xp`` (N, C, Hp, Wp), targets ``y`` (N, oh, ow), and ``X w``, ``X^T r``."""

    def __init__(self, imgs: np.ndarray, y: np.ndarray, g: Geometry, eps: float, fit_intercept: bool):
        self.imgs, self.g, self.eps, self.fit_intercept = imgs, g, eps, fit_intercept
        padded = np.pad(imgs, ((0, 0), (0, 0), (g.ph, g.ph), (g.pw, g.pw))) if g.ph or g.pw else imgs
        self.xp = np.ascontiguousarray(padded, dtype=np.float64)
        self.y = np.ascontiguousarray(y, dtype=np.float64).reshape(g.n, g.oh, g.ow)
        self.m, self.f, self.p = g.n * g.n_patches, g.n_features, g.n_features + int(fit_intercept)
        self.ybar = float(self.y.mean())
        self.yy = float(np.vdot(self.y, self.y)) / self.m
        self._moments = None

    def xw(self, w: np.ndarray) -> np.ndarray:
        g = self.g
        out = np.empty((g.n, g.oh, g.ow))
        _kernels()._correlate(self.xp, np.ascontiguousarray(w, dtype=np.float64).reshape(g.c, g.kh, g.kw),
                   g.sh, g.sw, g.dh, g.dw, out)
        return out

    def xtr(self, r: np.ndarray) -> np.ndarray:
        g = self.g
        kernels = _kernels()
        n_blocks = -(-(g.n * g.oh) // kernels.ROWS_PER_PARTIAL)
        partial = np.empty((n_blocks, g.c, g.kh, g.kw))
        kernels._correlate_adjoint(self.xp, np.ascontiguousarray(r, dtype=np.float64).reshape(g.n, g.oh, g.ow),
                           g.sh, g.sw, g.dh, g.dw, partial)
        return partial.reshape(n_blocks, -1).sum(axis=0)

    def moments(self):
        """``(H, mu, sigma)``: ``X^T X / M``, the patch mean and ``Cov = H - mu mu^T`` (float64; Algorithm 1)."""
        if self._moments is None:
            g = self.g
            cov, mu = patch_covariance(np.asarray(self.imgs, dtype=np.float64), (g.kh, g.kw), stride=(g.sh, g.sw),
                                       padding=(g.ph, g.pw), dilation=(g.dh, g.dw))
            cov, mu = np.asarray(cov, dtype=np.float64), np.asarray(mu, dtype=np.float64)
            sigma = (cov + cov.T) / 2
            self._moments = (sigma + np.outer(mu, mu), mu, sigma)
        return self._moments

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` of ``X`` (im2col), shape ``(len(rows), F)``."""
        g = self.g
        n, rem = np.divmod(rows, g.n_patches)
        r, q = np.divmod(rem, g.ow)
        span = ((g.kh - 1) * g.dh + 1, (g.kw - 1) * g.dw + 1)
        windows = np.lib.stride_tricks.sliding_window_view(self.xp, span, axis=(2, 3))[..., ::g.dh, ::g.dw]
        return windows[n, :, r * g.sh, q * g.sw].reshape(len(rows), self.f)


class _Quadratic:
    """``L = theta^T A theta / 2 - theta^T c + yy / 2`` in ``theta = (w, b)``: Hessian ``a``, right side ``c``."""

    def __init__(self, prob: _Problem):
        self.prob = prob
        self.h, self.mu, self.sigma = prob.moments()
        self.g = prob.xtr(prob.y) / prob.m
        a = self.h + prob.eps * np.eye(prob.f)
        self.a = np.block([[a, self.mu[:, None]], [self.mu[None, :], np.ones((1, 1))]]) if prob.fit_intercept else a
        self.c = np.append(self.g, prob.ybar) if prob.fit_intercept else self.g
        self.c_norm = float(np.linalg.norm(self.c))
        self._eigs = self._chol = self._optimum = None

    def loss(self, theta: np.ndarray) -> float:
        """``L(theta)``; once :meth:`optimum` is known, as ``L* + (theta - theta*)^T A (theta - theta*) / 2``,
        which has no cancellation near the optimum (the expanded form loses everything below ``u * yy``)."""
        if self._optimum is not None:
            theta_s, l_s = self._optimum
            e = theta - theta_s
            return float(l_s + 0.5 * e @ (self.a @ e))
        return float(0.5 * theta @ (self.a @ theta) - theta @ self.c + 0.5 * self.prob.yy)

    def rel_grad(self, theta: np.ndarray) -> float:
        with np.errstate(over="ignore", invalid="ignore"):  # inf after a (reported) blow-up
            gn = float(np.linalg.norm(self.a @ theta - self.c))
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
                    "or exactly dependent channels); pass eps > 0 (ridge) or use a smaller kernel") from None
            lam = self.eigs()
            if lam[0] <= 0 or lam[-1] / lam[0] > 1e-3 / np.finfo(np.float64).eps:
                warn(f"the normal matrix has condition number {self.condition():.3g}; the kernel is "
                     f"accurate to about cond * 1e-16 only; pass eps > 0 (ridge) to regularise",
                     IllConditionedWarning)
        return self._chol

    def precondition(self, grad: np.ndarray) -> np.ndarray:
        """``A^{-1} grad`` (the A.8 preconditioner ``T T^T``) via the Cholesky factor of the reduced system."""
        prob = self.prob
        if not prob.fit_intercept:
            return _sla().cho_solve(self.factor(), grad, check_finite=False)
        f = prob.f
        u = _sla().cho_solve(self.factor(), grad[:f] - self.mu * grad[f], check_finite=False)
        return np.append(u, grad[f] - self.mu @ u)

    def solve(self) -> np.ndarray:
        """The minimiser of Eq. (3), ``theta* = A^{-1} c``, via the reduced (centred) system."""
        return self.precondition(self.c)

    def optimum(self):
        """``(theta*, L*)`` (cached; then :meth:`loss` is anchored at it): Cholesky solve of Eq. (3) and one
        refinement step whose gradient comes from ``X`` itself (two correlations), not the rounded normal
        matrix, leaving an error of about ``(cond * u)^2``; ``L*`` is the residual's sum of squares."""
        if self._optimum is None:
            theta = self.solve()
            theta = theta - self.precondition(_exact_loss_grad(self.prob, theta)[1])
            self._optimum = (theta, _exact_loss_grad(self.prob, theta, grad=False)[0])
        return self._optimum

    def transform(self, method: str, sqrtm_method: str) -> np.ndarray:
        """``T`` of ``theta = T phi``: ``X T = X S``, or centred, ``(X | 1) T = ((X - 1 mu^T) S | 1)`` with
        ``T = [[S, 0], [-mu^T S, 1]]``.  ``S = diag(var + eps)^{-1/2}`` (``gd_standardized``: batch norm) or
        ``(Cov + eps I)^{-1/2}`` (``gd_whitened``: network deconvolution), ``Cov`` uncentred without intercept."""
        prob = self.prob
        f = prob.f
        second = self.sigma if prob.fit_intercept else self.h
        if method == "gd_standardized":
            d = np.diag(second) + prob.eps
            s = np.diag(np.where(d > 0, 1.0 / np.sqrt(np.where(d > 0, d, 1.0)), 1.0))
        else:
            if self.eigs()[0] <= 0 and prob.eps == 0:
                self.factor()  # raises the singular-matrix error with its fix
            s = np.asarray(inv_sqrtm(second, method=sqrtm_method, eps=prob.eps), dtype=np.float64)
            if not np.all(np.isfinite(s)):
                raise ValueError(
                    f"inv_sqrtm(method={sqrtm_method!r}) returned non-finite values for the "
                    f"{f} x {f} feature covariance (condition {self.condition():.3g}); pass eps > 0")
        if not prob.fit_intercept:
            return s
        return np.block([[s, np.zeros((f, 1))], [-(self.mu @ s)[None, :], np.ones((1, 1))]])


def _exact_loss_grad(prob: _Problem, theta: np.ndarray, *, grad: bool = True, rows: np.ndarray | None = None):
    """``(L(theta), grad L(theta))`` from the residual ``X w + b - y``, never the normal matrix: over all
    patches by the correlations, or over the patches ``rows`` only (Eq. 2 on a mini-batch)."""
    w = theta[:prob.f]
    if rows is None:
        n, res = prob.m, prob.xw(w) - prob.y
    else:
        xb = prob.gather(rows)
        n, res = len(rows), xb @ w - prob.y.reshape(-1)[rows]
    if prob.fit_intercept:
        res += theta[prob.f]
    loss = 0.5 * float(np.vdot(res, res)) / n + 0.5 * prob.eps * float(w @ w)
    if not grad:
        return loss, None
    gw = (prob.xtr(res) if rows is None else xb.T @ res) / n + prob.eps * w
    return loss, (np.append(gw, res.sum() / n) if prob.fit_intercept else gw)


def _descent(quad: _Quadratic, t, precondition: bool, lr, n_iter: int, tol, batch_size, rng, callback):
    """Gradient descent ``phi <- phi - lr * grad_phi`` in coordinates ``theta = T phi`` (``T`` None: identity):
    full batch ``grad_phi = T^T A T phi - T^T c`` (Eq. 2), mini-batch ``T^T grad_B(theta)``; ``precondition``:
    ``theta <- theta - lr * A^{-1} grad`` (A.8).  ``lr`` None: ``1 / lambda_max(T^T A T)``.  Stops at the first
    non-finite loss (warning), keeping the last finite iterate.  Returns ``(theta, history, it, converged, lr)``."""
    prob = quad.prob
    full = batch_size is None
    if t is not None and (full or lr is None):
        a_t, c_t = t.T @ quad.a @ t, t.T @ quad.c
    if lr is None:
        lam_max = float(_sla().eigvalsh(quad.a if t is None else a_t, subset_by_index=[prob.p - 1, prob.p - 1],
                                        check_finite=False)[0])
        lr = 1.0 / lam_max if lam_max > 0 else 1.0
    phi = theta = np.zeros(prob.p)
    history = [0.5 * prob.yy]  # L(0), exactly
    converged, it = None, 0
    with np.errstate(over="ignore", invalid="ignore"):  # a blow-up is detected and reported below
        for it in range(1, n_iter + 1):
            if tol is not None and quad.rel_grad(theta) <= tol:
                it, converged = it - 1, True
                break
            if not full:
                rows = np.sort(rng.choice(prob.m, batch_size, replace=False))
                grad = _exact_loss_grad(prob, theta, rows=rows)[1]
            elif t is None:
                grad = quad.a @ theta - quad.c
            theta_prev = theta
            if t is not None:
                phi = phi - lr * ((a_t @ phi - c_t) if full else t.T @ grad)
                theta = t @ phi
            else:
                theta = theta - lr * (quad.precondition(grad) if precondition else grad)
            loss = quad.loss(theta)
            if not np.isfinite(loss) or not np.all(np.isfinite(theta)):
                warn(f"gradient descent diverged at iteration {it} (loss {loss:.3g}); the learning rate "
                     f"{lr:.3g} is too large (full batch: above 2/lambda_max); pass a smaller lr", NsiterWarning)
                it, theta = it - 1, theta_prev
                break
            history.append(loss)
            if callback is not None:
                callback(theta)
    if tol is not None and converged is None:
        converged = quad.rel_grad(theta) <= tol
    return theta, np.asarray(history), it, converged, lr


def _cgls(prob: _Problem, n_iter: int, tol: float, callback):
    """Conjugate gradients on the normal equations, CGLS form (Björck 1996, §7.4), with ``X`` (centred with an
    intercept) and ``X^T`` applied as correlations; the residual ``r = y - X w`` is carried along, so the loss
    history is free.  Returns ``(theta, history, it, converged, grad_norm)``."""
    m, f, eps, fi = prob.m, prob.f, prob.eps, prob.fit_intercept
    mu = prob.xtr(np.ones(m)) / m if fi else None

    def matvec(v):
        return prob.xw(v).reshape(-1) - mu @ v if fi else prob.xw(v).reshape(-1)

    def rmatvec(r):
        return prob.xtr(r) - mu * r.sum() if fi else prob.xtr(r)

    def theta_of(w):
        return np.append(w, prob.ybar - mu @ w) if fi else w

    w = np.zeros(f)
    r = prob.y.reshape(-1) - prob.ybar if fi else prob.y.reshape(-1).copy()
    s = rmatvec(r) / m
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
        q = matvec(p)
        alpha = gamma / (float(q @ q) / m + eps * float(p @ p))
        w, r = w + alpha * p, r - alpha * q
        s = rmatvec(r) / m - eps * w
        gamma_new = float(s @ s)
        rel = np.sqrt(gamma_new) / s0
        history.append(0.5 * float(r @ r) / m + 0.5 * eps * float(w @ w))
        if callback is not None:
            callback(theta_of(w))
        p, gamma = s + (gamma_new / gamma) * p, gamma_new
    return theta_of(w), np.asarray(history), it, bool(rel <= tol), float(rel)


def estimate_kernel(x, y, kernel_size, *, method: str = "lstsq", n_iter: int | None = None,
                    lr: float | None = None, tol: float | None = None, eps: float = 0.0,
                    fit_intercept: bool | None = None, batch_size: int | None = None, rng=None,
                    stride=1, padding=0, dilation=1, sqrtm_method: str = "eigh",
                    callback: Callable | None = None) -> KernelEstimate:
    r"""Estimate the kernel ``k`` of ``y = x ⋆ k`` by L2 regression (Ye et al. 2020, Eq. 1–3, §4.4.1).

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

        - ``"lstsq"``: Eq. (3) by Cholesky in float64 plus one refinement step whose gradient
          ``X^T (X w - y)`` comes from the correlations, not the rounded normal matrix (``(cond u)^2``).
        - ``"gd"``: Eq. (2), by default with ``lr = 1 / lambda_max`` of the Hessian.
        - ``"gd_standardized"``: GD on standardised features ``(x - mu) / sqrt(var + eps)`` plus a bias
          (batch norm's analogue), by default with ``lr = 1 / lambda_max`` of the new Hessian.
        - ``"gd_whitened"``: GD on whitened features ``(X - 1 mu^T) D``, ``D = (Cov + eps I)^{-1/2}``
          (:func:`nsiter.inv_sqrtm`), plus a bias: network deconvolution; ONE step, ``lr = 1``, is exact.
        - ``"preconditioned"``: GD preconditioned by ``A^{-1}`` (Cholesky; appendix A.8), ``lr = 1``; its
          iterates equal those of ``"gd_whitened"`` for every ``lr``, ``n_iter`` and mini-batch sequence.
        - ``"cg"``: matrix-free conjugate gradients on the normal equations (CGLS).
    n_iter : int, optional
        Maximum iterations (>= 1).  Defaults: 100 for ``gd``/``gd_standardized``, 1 for
        ``gd_whitened``/``preconditioned``, ``10 * F`` for ``cg``; ignored by ``lstsq``.
    lr : float, optional
        Learning rate (> 0) of the gradient methods; full-batch GD is monotone for ``lr <= 2 / lambda_max``,
        smaller mini-batches need smaller steps (the paper's Table 4: 0.1, 0.5, 1 for 128, 512, 2048 patches).
    tol : float, optional
        Stop once ``||grad L|| <= tol * ||grad L(0)||``.  Default: none for GD, ``1e-12`` for ``cg``.
    eps : float, default 0.0
        Ridge on ``w`` (not ``b``); one whitened step (``D = (Cov + eps I)^{-1/2}``) stays exact.
    fit_intercept : bool, optional
        Fit a bias ``b`` (the paper's ``(X | 1)``); default True for the centring methods ``gd_standardized``
        and ``gd_whitened``.  Without it ``gd_whitened`` whitens with ``(X^T X / M + eps I)^{-1/2}`` and
        ``gd_standardized`` divides by the RMS.
    batch_size : int, optional
        Mini-batch SGD (gradient methods): ``batch_size`` distinct patches drawn per iteration; the
        coordinate changes use full-data statistics, the history records the full-data objective.
    rng : None, int or numpy.random.Generator
        Seed or generator for the mini-batches.
    stride, padding, dilation : int or (int, int)
        Geometry of the correlation, as in :func:`nsiter.im2col`.
    sqrtm_method : str, default "eigh"
        ``method`` of :func:`nsiter.inv_sqrtm` for ``gd_whitened`` (``"coupled"``: exact only as far as ``D`` is).
    callback : callable, optional
        ``callback(kernel, intercept)`` after every iteration (float64 copies).

    Returns
    -------
    KernelEstimate

    Raises
    ------
    ValueError
        A bad ``y`` shape (the message gives the expected one) or option, a kernel larger than ``x``,
        non-finite input, a singular normal matrix (fix: ``eps > 0``), a kernel, loss or ``gd`` step
        beyond the float64 range at the scale of ``x`` and ``y``.
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
    Once the normal matrix is formed (by :func:`nsiter.patch_covariance`; ``X`` itself never is) an iteration
    costs ``O(F^2)``, so torch tensors are solved on the host too (detached: no gradient flows through the
    estimate); ``.kernel`` comes back on the device of ``x`` (of ``y`` if only ``y`` is a tensor) in the
    promoted dtype, and ``callback`` gets float64 CPU tensors.  ``x`` or ``y`` of magnitude beyond ``2**+-256``
    is scaled by exact powers of two first and the results scaled back (the ridge with ``x**2``, the ``gd``
    step with ``x**-2``): ``lstsq``, ``cg`` and the whitened, standardised and preconditioned methods are
    equivariant; plain ``gd`` with an intercept, and ``condition`` with one, refer to the rescaled problem; a loss
    history below the float64 range is rounded to 0.

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
    # ---- validate
    method = check_option(method, "method", METHODS)
    xa, ya = as_float_array(x, "x"), as_float_array(y, "y")
    out_dtype = np.promote_types(result_float_dtype(xa.dtype), result_float_dtype(ya.dtype))
    imgs = as_images(xa, "x")
    check_nonempty(imgs, "x")
    g = geometry(imgs.shape, kernel_size, stride, padding, dilation)  # rejects kernels larger than x
    want = (g.n, g.oh, g.ow) if xa.ndim == 4 else (g.oh, g.ow)
    if ya.shape not in (want, want[:-2] + (1, g.oh, g.ow)):
        raise ValueError(
            f"y of shape {ya.shape} does not match x of shape {xa.shape} with kernel_size {(g.kh, g.kw)}, "
            f"stride {(g.sh, g.sw)}, padding {(g.ph, g.pw)}, dilation {(g.dh, g.dw)}: expected y of shape "
            f"{want} (the valid cross-correlation output); compute y with the same geometry or crop it")
    ex, ey = _scale_exponent(xa, "x", np.float64), _scale_exponent(ya, "y", np.float64)
    n_iter = None if n_iter is None else check_positive_int(n_iter, "n_iter")
    lr = None if lr is None else check_positive_float(lr, "lr")
    tol = None if tol is None else check_positive_float(tol, "tol")
    eps = check_nonnegative_float(eps, "eps")
    if fit_intercept is not None and not isinstance(fit_intercept, (bool, np.bool_)):
        raise TypeError(f"expected fit_intercept as True, False or None, got {fit_intercept!r}")
    fit_intercept = method in _CENTRING if fit_intercept is None else bool(fit_intercept)
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
    if ex or ey:  # beyond 2**+-256: solve for x 2**-ex, y 2**-ey (exact scalings), map back in split()
        imgs, ya = _ldexp(imgs, -ex), _ldexp(ya, -ey)
        try:
            eps, lr = math.ldexp(eps, -2 * ex), (math.ldexp(lr, 2 * ex) if lr and method == "gd" else lr)
        except OverflowError:
            raise ValueError(f"eps or lr is out of float64 range for x of magnitude ~2**{ex}: the ridge scales with "
                             "x**2 and the gd step with x**-2; rescale x or pass smaller values") from None

    prob = _Problem(imgs, ya, g, eps, fit_intercept)
    kshape = (g.kh, g.kw) if xa.ndim == 2 else (g.c, g.kh, g.kw)

    def split(theta):
        w, b = theta[:prob.f].reshape(kshape), (float(theta[prob.f]) if fit_intercept else 0.0)
        return (np.ldexp(w, ey - ex), math.ldexp(b, ey)) if ex or ey else (w, b)

    def report(theta):  # float64 copies (torch: a CPU tensor); the solvers keep their own iterates
        w, b = split(theta)
        callback(be.xp.asarray(w.copy()) if be.torch else w.copy(), b)

    notify = None if callback is None else report
    # ---- dispatch
    optimum = condition = None
    n_iter = _DEFAULT_N_ITER.get(method, 10 * prob.f) if n_iter is None else n_iter  # cg: 10 F; lstsq: unused
    if method == "cg":
        lr = None
        theta, history, it, converged, grad_norm = _cgls(prob, n_iter, _CG_DEFAULT_TOL if tol is None else tol, notify)
    else:
        quad = _Quadratic(prob)
        # the optimum anchors the loss history (and is the answer of "lstsq"); the plain and transformed
        # gradient methods need it only for that, so a singular normal matrix is not an error for them
        exact = method in ("lstsq", "preconditioned")
        try:
            with warnings.catch_warnings():
                if not exact:
                    warnings.simplefilter("ignore", IllConditionedWarning)
                theta, optimum = quad.optimum()
        except ValueError:
            if exact:
                raise
        if method == "lstsq":
            history = np.array([0.5 * prob.yy, optimum])
            it, converged, lr = 1, True, None
            if notify is not None:
                notify(theta)
        else:
            t = quad.transform(method, sqrtm_method) if method in _CENTRING else None
            if lr is None and method in ("gd_whitened", "preconditioned"):
                lr = 1.0  # the exact step of Proposition 1 / A.8
            theta, history, it, converged, lr = _descent(
                quad, t, method == "preconditioned", lr, n_iter, tol, batch_size, rng, notify)
        grad_norm = quad.rel_grad(theta)
        condition = quad.condition()
    with np.errstate(over="ignore"):
        w, b = split(theta)
        if ex or ey:
            history = np.ldexp(history, 2 * ey)
            optimum = None if optimum is None else float(np.ldexp(optimum, 2 * ey))
            lr = float(np.ldexp(lr, -2 * ex)) if lr and method == "gd" else lr
    if not (np.isfinite(w).all() and np.isfinite(history).all() and np.isfinite(lr or 0.0)):
        raise ValueError(f"the kernel, its loss history or the gd learning rate leaves the float64 range at this scale "
                         f"(x was rescaled by 2**{-ex} and y by 2**{-ey} internally; they scale like y/x, y**2 and "
                         "x**-2); rescale x and y")
    kernel = w.astype(out_dtype, copy=True)
    return KernelEstimate(
        kernel=be.asarray(kernel, ref) if be.torch else kernel, intercept=b, history=history, n_iter=int(it),
        method=method, fit_intercept=fit_intercept, lr=lr, batch_size=batch_size, converged=converged,
        grad_norm=float(grad_norm), loss=float(history[-1]), optimum_loss=optimum, condition=condition)
