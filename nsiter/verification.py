r"""Accuracy certificate for whitening a covariance: :func:`verify_whitening`.

How well does each inverse-square-root method whiten a covariance ``C``?  For every method
``D ≈ (C + εI)^{-1/2}`` is computed with :func:`nsiter.inv_sqrtm` and measured in float64.

A check runs each method once on one matrix, so numpy input takes the numpy backend's array
kernels (the kernel-selection rule of :mod:`nsiter._backend`): the same algorithm and decisions
as the Numba kernels, results equal up to rounding, without loading Numba (whose load would
dominate ``nsiter verify`` on a small matrix).

Why :math:`\kappa u` is a floor: storing ``C`` in the working precision perturbs it by
:math:`\Delta C`, :math:`\|\Delta C\|_2 \lesssim u \|C\|_2`, and a backward-stable method
(``eigh`` is one) returns the exact answer for some such perturbed matrix.  The relative
condition number of :math:`A \mapsto A^{-1/2}` at a symmetric positive definite ``A`` is
:math:`\kappa(A)/2` (the Fréchet derivative scales entry ``(i, j)`` of a perturbation in the
eigenbasis by :math:`-1/(\sqrt{\lambda_i}\sqrt{\lambda_j}(\sqrt{\lambda_i}+\sqrt{\lambda_j}))`),
so ``D`` moves by up to :math:`\approx \kappa u/2` relative, and :math:`D C D - I = -D\,\Delta C\,D`
(``D`` exact for ``C + ΔC``) has norm up to :math:`\|D\|_2^2 \|\Delta C\|_2 = \kappa u`; likewise
:math:`DDC - I`.  So :math:`\kappa u` is the worst-case level of all three measures; actual
rounding errors usually land somewhat below it (they rarely align with the smallest eigenvector).
"""
from __future__ import annotations

import json
import math
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from ._backend import numpy_kernels
from ._policy import BLOWUP_GROWTH, BLOWUP_SQRT_N
from ._validation import (as_float_array, check_finite, check_nonnegative_float, check_option, check_positive_float,
                          check_positive_int, check_square, check_symmetric, is_tensor, result_float_dtype)
from ._warnings import IllConditionedWarning, NewtonSchulzDivergenceWarning
from .newton_schulz import METHODS, SCALINGS, inv_sqrtm

__all__ = ["verify_whitening", "WhiteningReport", "MethodResult", "DEFAULT_METHODS", "DEFAULT_N_ITER",
           "DEFAULT_THRESHOLDS", "BLOWUP_GROWTH", "BLOWUP_SQRT_N"]

#: Methods run when none are named: the paper's two iterations and the exact reference.
DEFAULT_METHODS = ("coupled", "uncoupled", "eigh")
#: Iterations per iterative method (why 50: ``n_iter`` of :func:`verify_whitening`).
DEFAULT_N_ITER = 50
#: Residual levels whose first-reaching iteration the report lists.
DEFAULT_THRESHOLDS = (1e-2, 1e-4, 1e-6, 1e-8, 1e-10, 1e-12)
# BLOWUP_GROWTH, BLOWUP_SQRT_N: the blow-up test of inv_sqrtm, from the one policy in nsiter._policy


# --------------------------------------------------------------------------- results
def _fmt(x, spec: str = ".2e") -> str:
    return "-" if x is None else format(float(x), spec)  # format() spells nan, inf, -inf


def _json_float(x):
    """float for JSON: non-finite values (overflowed residuals) become ``None`` (``null``)."""
    return None if x is None or not math.isfinite(float(x)) else float(x)


def _threshold_key(t: float) -> str:
    return f"{t:.0e}"


@dataclass(frozen=True)
class MethodResult:
    r"""What one method achieved on the covariance (one entry of :class:`WhiteningReport`).

    Attributes
    ----------
    method : str
        Name in :data:`nsiter.newton_schulz.METHODS`.
    ran_as, n_iter, converged, diverged, scale
        ``method``, ``n_iter``, ... of the :class:`nsiter.NewtonSchulzInfo` of the
        :func:`nsiter.inv_sqrtm` call, for this one matrix (``ran_as``: what ``"auto"`` chose).
    residuals : ndarray of float64, shape (n_iter,)
        :math:`r_k = \|D_k D_k C_\varepsilon - I\|_F` after iteration ``k = 1..n_iter``,
        evaluated in float64; non-finite entries after a blow-up are kept; ``eigh`` has one.
    D, returned_iter : ndarray (n, n) of the working dtype, int
        The matrix returned and its 1-based iterate (``info.best_iter``: the last one, or the
        best one when the iteration diverged).
    residual, symmetric_residual, forward_error : float
        :math:`\|D D C_\varepsilon - I\|_F`, :math:`\|D C_\varepsilon D - I\|_F / \sqrt{n}` and
        :math:`\|D - D_\star\|_F / \|D_\star\|_F` of the returned ``D`` (:func:`verify_whitening`).
    best_iter, best_residual : int, float
        1-based iteration with the smallest finite residual (the first one on ties), and that residual.
    blowup_iter : int or None
        First iteration ``k`` that fails the divergence test of :func:`nsiter.inv_sqrtm`
        (:data:`BLOWUP_GROWTH`, :data:`BLOWUP_SQRT_N`); ``None`` when none does.
    iterations_to_reach : dict float -> int or None
        For each threshold ``t``, the first iteration ``k`` with ``r_k <= t``; ``None`` for never.
    seconds : float
        Wall time of the :func:`nsiter.inv_sqrtm` call.
    """

    method: str
    ran_as: str
    residuals: np.ndarray = field(repr=False)
    n_iter: int
    D: np.ndarray = field(repr=False)
    returned_iter: int
    residual: float
    symmetric_residual: float
    forward_error: float
    best_iter: int
    best_residual: float
    converged: bool
    diverged: bool
    blowup_iter: int | None
    iterations_to_reach: Mapping[float, int | None]
    scale: float
    seconds: float

    @property
    def final_residual(self) -> float:
        r"""Residual of the last iterate, :math:`r_{n\_iter}` (what ``tol`` is checked against)."""
        return float(self.residuals[-1])

    def passed(self, tol: float) -> bool:
        """True when the last iterate's ``||D_k D_k C - I||_F <= tol`` (NaN/inf fail)."""
        r = self.final_residual
        return bool(math.isfinite(r) and r <= check_positive_float(tol, "tol"))

    def status(self) -> str:
        if self.diverged:
            return "diverged" + (f" (iteration {self.blowup_iter})" if self.blowup_iter is not None else "")
        return "direct" if self.method == "eigh" else "stable"

    def to_dict(self, *, include_matrix: bool = False) -> dict:
        """JSON-ready dict; non-finite floats become ``None``.  ``D`` only on request."""
        d = dict(
            method=self.method, ran_as=self.ran_as, n_iter=int(self.n_iter),
            final_residual=_json_float(self.final_residual), residual=_json_float(self.residual),
            symmetric_residual=_json_float(self.symmetric_residual), forward_error=_json_float(self.forward_error),
            returned_iter=int(self.returned_iter), best_iter=int(self.best_iter),
            best_residual=_json_float(self.best_residual), converged=bool(self.converged),
            diverged=bool(self.diverged), blowup_iter=None if self.blowup_iter is None else int(self.blowup_iter),
            iterations_to_reach={_threshold_key(t): k for t, k in self.iterations_to_reach.items()},
            scale=_json_float(self.scale), seconds=float(self.seconds),
            residuals=[_json_float(r) for r in self.residuals],
        )
        if include_matrix:
            d["D"] = np.asarray(self.D, dtype=np.float64).tolist()
        return d


@dataclass(frozen=True)
class WhiteningReport:
    r"""Accuracy certificate of :func:`verify_whitening`: the matrix and one result per method.

    ``str(report)`` is a readable table, :meth:`to_dict` / :meth:`to_json` give the numbers,
    :meth:`plot` draws the residual histories, :meth:`passed` checks a tolerance.
    ``report["coupled"]`` is the :class:`MethodResult` of one method.

    Attributes
    ----------
    n, dtype, input_dtype : int, str, str
        Matrix size, working dtype of the methods, and the dtype ``C`` arrived in.
    eps, n_iter, scaling, tol, thresholds
        The settings of :func:`verify_whitening` (``tol`` may be ``None``).
    eigenvalues : ndarray of float64, shape (n,)
        Ascending eigenvalues of the input :math:`C + \varepsilon I` (float64 ``eigh``).
    unit_roundoff, floor : float
        ``u = eps(dtype) / 2`` of the working dtype (``2**-24`` float32, ``2**-53`` float64),
        and the accuracy floor :math:`\kappa u` no method can be relied on to beat (see the
        module docstring).
    D_exact : ndarray of float64
        The ``eigh`` reference :math:`D_\star = (C + \varepsilon I)^{-1/2}`.
    methods : dict str -> MethodResult
        In the order requested.
    notes, source, seconds : tuple of str, str or None, float
        Plain-language remarks (floor too high for the dtype, divergence, ...), where ``C``
        came from (the CLI sets the file name), wall time of the whole check.
    """

    n: int
    dtype: str
    input_dtype: str
    eps: float
    eigenvalues: np.ndarray = field(repr=False)
    unit_roundoff: float
    floor: float
    D_exact: np.ndarray = field(repr=False)
    methods: Mapping[str, MethodResult]
    n_iter: int
    scaling: str
    tol: float | None
    thresholds: tuple
    notes: tuple = ()
    source: str | None = None
    seconds: float = 0.0

    @property
    def eig_min(self) -> float:
        """Smallest eigenvalue of :math:`C + \\varepsilon I`."""
        return float(self.eigenvalues[0])

    @property
    def eig_max(self) -> float:
        """Largest eigenvalue of :math:`C + \\varepsilon I`."""
        return float(self.eigenvalues[-1])

    @property
    def condition_number(self) -> float:
        """2-norm condition number ``eig_max / eig_min`` of :math:`C + \\varepsilon I`."""
        return float(self.eigenvalues[-1] / self.eigenvalues[0])

    def __getitem__(self, method: str) -> MethodResult:
        return self.methods[method]

    def failures(self, tol: float | None = None) -> list[str]:
        """Methods whose last iterate has ``||D_k D_k C - I||_F > tol`` (or non-finite)."""
        tol = self.tol if tol is None else tol
        if tol is None:
            raise ValueError("no tolerance to check: pass tol=... here or to verify_whitening(..., tol=...)")
        tol = check_positive_float(tol, "tol")
        return [m for m, r in self.methods.items() if not r.passed(tol)]

    def passed(self, tol: float | None = None) -> bool:
        r"""True when every method's last iterate has :math:`\|D_k D_k C_\varepsilon - I\|_F \le` ``tol``.

        ``tol`` defaults to that of :func:`verify_whitening` (``ValueError`` when neither was given).  A method
        that diverged fails even if an earlier iterate was good: that iterate count is unusable.
        """
        return not self.failures(tol)

    def to_dict(self, *, include_matrices: bool = False) -> dict:
        """JSON-ready dict (non-finite floats become ``None``); ``include_matrices`` adds ``D``, ``D_exact``."""
        d = dict(
            source=self.source, n=int(self.n), dtype=self.dtype, input_dtype=self.input_dtype, eps=float(self.eps),
            eig_min=float(self.eig_min), eig_max=float(self.eig_max),
            condition_number=_json_float(self.condition_number), unit_roundoff=float(self.unit_roundoff),
            floor=_json_float(self.floor),
            floor_applies_to=("worst-case level of ||D D C - I||_F, ||D C D - I||_F and "
                              "||D - D_exact||_F/||D_exact||_F set by rounding C to the working dtype"),
            n_iter=int(self.n_iter), scaling=self.scaling, tol=None if self.tol is None else float(self.tol),
            tol_applies_to="||D_k D_k C - I||_F of the last iterate of every method",
            thresholds=[float(t) for t in self.thresholds], passed=None if self.tol is None else self.passed(),
            failed=[] if self.tol is None else self.failures(), notes=list(self.notes), seconds=float(self.seconds),
            methods={m: r.to_dict(include_matrix=include_matrices) for m, r in self.methods.items()},
        )
        if include_matrices:
            d["D_exact"] = self.D_exact.tolist()
        return d

    def to_json(self, *, indent: int | None = 2, include_matrices: bool = False) -> str:
        """:meth:`to_dict` as strict JSON text (``null`` for non-finite values)."""
        return json.dumps(self.to_dict(include_matrices=include_matrices), indent=indent, allow_nan=False)

    def __str__(self) -> str:
        dt = self.dtype if self.dtype == self.input_dtype else f"{self.dtype} (input {self.input_dtype})"
        lines = [
            f"Whitening check of a {self.n} x {self.n} covariance" + (f" ({self.source})" if self.source else ""),
            f"  dtype {dt}, eps = {self.eps:g}, n_iter = {self.n_iter}, scaling = {self.scaling!r}; "
            "residuals evaluated in float64",
            f"  eigenvalues of C + eps*I: min {_fmt(self.eig_min, '.3e')}, max {_fmt(self.eig_max, '.3e')}; "
            f"condition number kappa = {_fmt(self.condition_number, '.3e')}",
            f"  accuracy floor kappa*u = {_fmt(self.floor)} (u = {self.unit_roundoff:.2e}, {self.dtype} unit "
            "roundoff): rounding C alone can cause",
            "    errors this large in ||DDC-I||_F and ||D-D*||_F/||D*||_F; no method can be relied on to beat it",
            "",
            "  residual ||D_k D_k C - I||_F per iteration; columns 1e-xx = first iteration below it",
        ]
        w = max([6] + [len(m) for m in self.methods])
        lines.append(f"  {'method':<{w}}  {'iters':>5}  {'final':>9}  {'best (iter)':>15}"
                     + "".join(f"  {_threshold_key(t):>6}" for t in self.thresholds) + "  status")
        for m, r in self.methods.items():
            best = f"{_fmt(r.best_residual)} ({r.best_iter})"
            reach = (r.iterations_to_reach.get(t) for t in self.thresholds)
            lines.append(f"  {m:<{w}}  {r.n_iter:>5}  {_fmt(r.final_residual):>9}  {best:>15}"
                         + "".join(f"  {'never' if k is None else k:>6}" for k in reach) + "  " + r.status())
        lines += ["", "  returned D (the last iterate; the best one if the iteration diverged) against the "
                      "float64 eigh solution D*",
                  f"  {'method':<{w}}  {'iter':>5}  {'||DDC-I||_F':>11}  {'||DCD-I||_F/sqrt(n)':>19}  "
                  f"{'||D-D*||_F/||D*||_F':>19}  {'time':>9}"]
        for m, r in self.methods.items():
            lines.append(f"  {m:<{w}}  {r.returned_iter:>5}  {_fmt(r.residual):>11}  {_fmt(r.symmetric_residual):>19}  "
                         f"{_fmt(r.forward_error):>19}  {r.seconds * 1e3:>7.2f}ms")
        if self.tol is not None:
            verdicts = ", ".join(f"{m} {'PASS' if r.passed(self.tol) else 'FAIL'}" for m, r in self.methods.items())
            lines += ["", f"  tol {self.tol:g} on the last iterate's ||D_k D_k C - I||_F: {verdicts}"]
        if self.notes:
            lines.append("")
        for s in self.notes:
            lines.extend(textwrap.wrap(s, width=100, initial_indent="  note: ", subsequent_indent="        "))
        return "\n".join(lines)

    def plot(self, path=None, ax=None):
        r"""Residual :math:`\|D_k D_k C - I\|_F` against iteration, one line per method.

        Log y axis; dashed: the floor :math:`\kappa u`; dotted: ``eigh`` (one direct step) and a
        diverged method's blow-up iteration (marked ``x``).  Non-finite residuals are not drawn.

        Parameters
        ----------
        path : str or path-like, optional
            Save the figure there (format from the extension: png, pdf, svg, ...).
        ax : matplotlib Axes, optional
            Draw into this axes instead of a new figure.

        Returns
        -------
        matplotlib.figure.Figure
            Built without pyplot, so it works with any backend (and headless, Agg).
        """
        import matplotlib as mpl
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7.0, 4.5), layout="constrained") if ax is None else ax.figure
        ax = fig.add_subplot() if ax is None else ax
        n_max = max(2, max(r.n_iter for r in self.methods.values()))
        finite_all = [self.floor] + [x for r in self.methods.values()
                                     for x in r.residuals if np.isfinite(x) and x > 0]
        y_lo = max(min(finite_all) / 30.0, 1e-300)
        y_hi = min(max(finite_all) * 5.0, 1e8)
        colors = mpl.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
        for i, r in enumerate(self.methods.values()):
            res = np.asarray(r.residuals, dtype=np.float64)
            color = colors[i % len(colors)]
            if r.n_iter == 1:
                ax.axhline(res[0], ls=":", lw=1.5, color=color, label=f"{r.method} (direct): {_fmt(res[0])}")
                continue
            k = np.arange(1, res.size + 1)
            ok = np.isfinite(res) & (res > 0)
            ax.plot(k[ok], res[ok], marker=".", ms=3, lw=1.2, color=color, label=r.method)
            if r.diverged and r.blowup_iter is not None:
                b = r.blowup_iter
                yb = res[b - 1] if np.isfinite(res[b - 1]) and res[b - 1] <= y_hi else y_hi
                ax.axvline(b, color=color, ls=":", lw=1)
                ax.plot([b], [yb], marker="x", ms=9, mew=2, color=color, ls="none",
                        label=f"{r.method} blows up (iteration {b})")
        ax.axhline(self.floor, color="k", ls="--", lw=1,
                   label=rf"floor $\kappa u$ = {_fmt(self.floor)} ({self.dtype})")
        ax.set(yscale="log", ylim=(y_lo, y_hi), xlim=(0.5, n_max + 0.5), xlabel="iteration k",
               ylabel=r"$\|D_k D_k C - I\|_F$")
        title = f"{self.n}x{self.n} covariance, kappa = {self.condition_number:.3g}, {self.dtype}"
        ax.set_title(f"{self.source}: " + title if self.source else title, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


# --------------------------------------------------------------------------- computation
def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor (the backend may return tensors in info)
        x = x.detach()
        if x.is_floating_point() and x.element_size() < 4:  # float16 / bfloat16: no numpy twin
            x = x.float()
        x = x.cpu().numpy()
    return np.asarray(x)


def _first(x):
    """First entry of a (batched, maybe torch) ``info`` field."""
    return _to_numpy(x).reshape(-1)[0]


def _blowup_iter(res: np.ndarray, n: int) -> int | None:
    """First 1-based ``k`` at which the residual history ``res`` fails the blow-up test."""
    finite = np.isfinite(res)
    best_so_far = np.minimum.accumulate(np.where(finite, res, np.inf))
    with np.errstate(invalid="ignore"):
        bad = ~finite | (res > BLOWUP_GROWTH * best_so_far) | (res > BLOWUP_SQRT_N * math.sqrt(n))
    return int(np.argmax(bad) + 1) if bad.any() else None


def verify_whitening(C, *, methods: Sequence[str] = DEFAULT_METHODS, n_iter: int = DEFAULT_N_ITER,
                     eps: float = 0.0, dtype=None, tol: float | None = None, scaling: str = "fro",
                     thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                     progress: Callable[[str, int, int], None] | None = None) -> WhiteningReport:
    r"""Check how accurately each method whitens the covariance ``C``: an accuracy certificate.

    For every method, :math:`D \approx (C + \varepsilon I)^{-1/2}` is computed by
    :func:`nsiter.inv_sqrtm` and measured in float64: the residual history
    :math:`\|D_k D_k C_\varepsilon - I\|_F` (Ye et al. 2020, Appendix A.3, Fig. 7),
    :math:`\|D D C_\varepsilon - I\|_F`, :math:`\|D C_\varepsilon D - I\|_F / \sqrt{n}`, the
    forward error :math:`\|D - D_\star\|_F / \|D_\star\|_F` against the float64 ``eigh``
    solution :math:`D_\star = V \Lambda^{-1/2} V^T` of the *input* :math:`C + \varepsilon I`,
    the iterations needed to reach each threshold, and divergence (Higham 2008: coupled
    Eq. (6.35) is stable, the uncoupled Eq. (7.12) is not).  The matrix is described by its
    eigenvalue range, 2-norm condition number :math:`\kappa` and the accuracy floor
    :math:`\kappa u` of the working dtype (``u`` = unit roundoff).

    Parameters
    ----------
    C : array_like, shape (n, n)
        Symmetric positive definite covariance (positive definite after adding ``eps*I``).
        One matrix: a stack ``(..., n, n)`` is rejected; verify its matrices one by one.
        ``C`` is never modified.  A ``torch.Tensor`` runs the methods through the torch
        backend on its device; the diagnostics are computed on the CPU in float64.
    methods : sequence of str, default ("coupled", "uncoupled", "eigh")
        Names from :data:`nsiter.newton_schulz.METHODS`, run in this order.
    n_iter : int, default 50
        Iterations of each iterative method (``eigh`` is direct).  50 lets the coupled
        iteration reach the float64 floor on condition numbers up to ~1e8 and makes the
        uncoupled blow-up visible.
    eps : float, default 0.0
        Ridge: the methods invert :math:`C_\varepsilon = C + \varepsilon I`, and every number
        in the report refers to :math:`C_\varepsilon`.
    dtype : {None, "float32", "float64"}, optional
        Working dtype of the methods; default: the dtype of ``C`` (float32 stays float32,
        integers and float64 give float64).  Residuals are always evaluated in float64.
    tol : float, optional
        Tolerance for :meth:`WhiteningReport.passed`: a method passes when its *last*
        iterate has :math:`\|D_k D_k C_\varepsilon - I\|_F \le` ``tol``.  It does not stop
        the iterations (every method runs ``n_iter`` so the whole history is shown).
    scaling : str, default "fro"
        Initial scaling of the iterations, passed to :func:`nsiter.inv_sqrtm`.
    thresholds : sequence of float, default (1e-2, 1e-4, ..., 1e-12)
        Levels for ``iterations_to_reach``.
    progress : callable, optional
        Called as ``progress(step, i, total)`` before each step: the ``eigh`` reference, then each method.

    Returns
    -------
    WhiteningReport
        ``str(report)`` is a table; see :class:`WhiteningReport` and :class:`MethodResult`.

    Raises
    ------
    ValueError
        ``C`` not one square, non-empty, finite, symmetric matrix, or ``C + eps*I`` not positive
        definite (the message gives a ridge ``eps`` that would do); an unknown method or
        scaling, a non-positive ``n_iter`` / ``tol``, a negative ``eps``.
    TypeError
        Complex or non-numeric ``C``; ``dtype`` other than float32/float64.

    Notes
    -----
    A method near the floor :math:`\kappa u` (module docstring) is as accurate as the dtype
    allows; to do better use float64, or a ridge ``eps`` (which lowers :math:`\kappa`).  For
    ``method="eigh"`` in float64 the forward error is 0 by construction: it is the reference.
    Residuals refer to the matrix the methods saw (``C`` in the working dtype, plus ``eps*I``);
    the forward error to the input ``C + eps*I`` as given, so for a float64 ``C`` checked in
    float32 it includes the rounding of ``C``.
    numpy input runs on the numpy backend's array kernels (module docstring): the numbers equal
    those of ``inv_sqrtm`` on the Numba kernels up to rounding.

    Examples
    --------
    >>> import numpy as np, nsiter
    >>> x = nsiter.data.sample_image()
    >>> cov, _ = nsiter.covariance(nsiter.im2col(x, 3))            # 27 x 27
    >>> report = nsiter.verify_whitening(cov, tol=1e-8, methods=("coupled", "eigh"))
    >>> report.passed(), report["coupled"].iterations_to_reach[1e-8] is not None
    (True, True)
    """
    t_start = time.perf_counter()
    tensor = is_tensor(C)
    A = as_float_array(C, "C")  # (tensors too: sparse, quantised and meta layouts are refused here)
    A = as_float_array(_to_numpy(A), "C") if tensor else A
    if A.ndim > 2:
        raise ValueError(f"expected one covariance matrix C of shape (n, n), got a stack of shape {A.shape}; "
                         "verify_whitening checks one matrix: call it per matrix, e.g. "
                         "[verify_whitening(c) for c in C]")
    if A.ndim != 2:
        raise ValueError(f"expected a covariance matrix C of shape (n, n), got shape {A.shape}")
    check_square(A, "C")
    check_finite(A, "C")
    check_symmetric(A, "C")
    if dtype is not None and np.dtype(dtype).kind != "f":
        raise TypeError(f"expected dtype float32 or float64, got {np.dtype(dtype)}; pass dtype='float32' or 'float64'")
    work = A.dtype if dtype is None else result_float_dtype(dtype)
    eps = check_nonnegative_float(eps, "eps")
    n_iter = check_positive_int(n_iter, "n_iter")
    tol = None if tol is None else check_positive_float(tol, "tol")
    check_option(scaling, "scaling", SCALINGS)
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    if not methods:
        raise ValueError(f"expected at least one method, got none; choose from: {', '.join(METHODS)}")
    for m in methods:
        check_option(m, "method", METHODS)
    if len(set(methods)) != len(methods):
        raise ValueError(f"expected each method once, got {methods}; drop the repeats")
    thresholds = tuple(sorted((check_positive_float(t, "threshold") for t in thresholds), reverse=True))

    n = A.shape[0]
    eye = np.eye(n)
    total = len(methods) + 1
    progress = progress or (lambda *args: None)
    progress("eigh reference (float64)", 1, total)
    lam, V = np.linalg.eigh(A.astype(np.float64) + eps * eye if eps else A.astype(np.float64))  # exact upcast
    if not lam[0] > 0:
        fix = max(-lam[0], 0.0) + 1e-6 * max(abs(lam[-1]), np.finfo(np.float64).tiny)
        raise ValueError(f"expected C + eps*I positive definite, got smallest eigenvalue {lam[0]:.3e} "
                         f"(largest {lam[-1]:.3e}, eps = {eps:g}): C is indefinite or singular; add a ridge, "
                         f"e.g. eps = {fix:.1e}, or check how C was computed (fewer samples than features gives "
                         "a singular C)")
    D_exact = (V * lam ** -0.5) @ V.T
    nrm_exact = np.linalg.norm(D_exact)
    kappa = float(lam[-1] / lam[0])
    u = float(np.finfo(work).eps) / 2.0
    floor = kappa * u

    # the matrix the methods see, and the same in float64 for the residuals
    Cw = A.astype(work, copy=False)
    Ceps64 = Cw.astype(np.float64) + eps * eye if eps else Cw.astype(np.float64)
    Cm = C.detach().to(dtype=getattr(sys.modules["torch"], work.name)) if tensor else Cw

    results = {}
    notes = []
    for i, m in enumerate(methods, start=2):
        progress(m if m == "eigh" else f"{m} ({n_iter} iterations)", i, total)
        t0 = time.perf_counter()
        # (numpy_kernels: the one-off check's kernel set, see the module docstring)
        with warnings.catch_warnings(), numpy_kernels("array"):
            # divergence and ill-conditioning are what the report measures and states
            warnings.simplefilter("ignore", NewtonSchulzDivergenceWarning)
            warnings.simplefilter("ignore", IllConditionedWarning)
            D, info = inv_sqrtm(Cm, method=m, n_iter=None if m == "eigh" else n_iter, scaling=scaling, eps=eps,
                                return_info=True)
        seconds = time.perf_counter() - t0
        D = _to_numpy(D)
        res = np.asarray(_to_numpy(info.residuals), dtype=np.float64).reshape(-1)
        D64 = D.astype(np.float64)
        with np.errstate(all="ignore"):
            residual = float(np.linalg.norm(D64 @ D64 @ Ceps64 - eye))
            symmetric_residual = float(np.linalg.norm(D64 @ Ceps64 @ D64 - eye) / math.sqrt(n))
            forward = float(np.linalg.norm(D64 - D_exact) / nrm_exact)
        finite = np.isfinite(res)
        best_iter = int(np.argmin(np.where(finite, res, np.inf))) + 1 if finite.any() else 1
        best_res = float(res[best_iter - 1])
        blowup = _blowup_iter(res, n)
        reach = {t: next((k for k, hit in enumerate(finite & (res <= t), start=1) if hit), None)
                 for t in thresholds}
        results[m] = MethodResult(
            method=m, ran_as=str(info.method), residuals=res, n_iter=int(res.size), D=D,
            returned_iter=int(_first(info.best_iter)), residual=residual, symmetric_residual=symmetric_residual,
            forward_error=forward, best_iter=best_iter, best_residual=best_res, converged=bool(_first(info.converged)),
            diverged=bool(_first(info.diverged)), blowup_iter=blowup, iterations_to_reach=reach,
            scale=float(_first(info.scale)), seconds=seconds,
        )
        if results[m].diverged:
            at = f", blew up at iteration {blowup} ({_fmt(res[blowup - 1])})" if blowup is not None else ""
            why = ""
            if str(info.method) == "uncoupled":
                # Linearising X -> (3X - X^3 Y)/2 at X = Y^{-1/2} in the eigenbasis of Y multiplies
                # entry (i, j) of a perturbation by (2 - rho - rho^2)/2, rho = sqrt(lambda_j/lambda_i):
                # at most (kappa + sqrt(kappa) - 2)/2 in magnitude, above 1 once kappa > 2.44.
                growth = (kappa + math.sqrt(kappa) - 2.0) / 2.0
                why = (f" Near its fixed point the uncoupled iteration multiplies rounding errors by up to "
                       f"(kappa + sqrt(kappa) - 2)/2 = {_fmt(growth, '.3g')} per step "
                       "(stable only for kappa < 2.44).")
            advice = (f"Use the coupled iteration, or stop after {best_iter} iterations." if best_res < 1e-2
                      else "It never whitened C: use the coupled iteration.")
            notes.append(f"{m} diverged: best residual {_fmt(best_res)} at iteration {best_iter}{at}; the returned D "
                         f"is that best iterate.{why} {advice}")
    if floor >= 1e-2:
        notes.insert(0, f"kappa*u = {_fmt(floor)}: rounding in {work.name} alone can leave errors of about this size "
                        "in ||DDC-I||_F; to whiten this matrix reliably use float64, or a ridge eps (smaller kappa)")
    return WhiteningReport(
        n=n, dtype=work.name, input_dtype=A.dtype.name, eps=eps, eigenvalues=lam, unit_roundoff=u, floor=floor,
        D_exact=D_exact, methods=results, n_iter=n_iter, scaling=scaling, tol=tol, thresholds=thresholds,
        notes=tuple(notes), seconds=time.perf_counter() - t_start,
    )
