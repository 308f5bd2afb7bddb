"""Shared test utilities: dtype-aware tolerances and matrices of chosen condition number."""
from __future__ import annotations

import numpy as np

__all__ = ["tol", "assert_close", "random_orthogonal", "spd_with_condition", "random_images"]


def tol(dtype, factor: float = 1.0, *, n: int = 1) -> float:
    """Relative tolerance for results computed in ``dtype``.

    ``factor * sqrt(n) * eps(dtype) * 50``: a small multiple of the unit roundoff,
    growing like ``sqrt(n)`` with the number of accumulated terms ``n``.
    """
    eps = np.finfo(np.dtype(dtype)).eps
    return float(factor * 50.0 * eps * np.sqrt(max(n, 1)))


def assert_close(actual, desired, *, dtype=None, factor: float = 1.0, n: int = 1, err_msg: str = ""):
    """``assert_allclose`` with a relative tolerance from :func:`tol`, scaled by ``max|desired|``.

    Absolute tolerance is ``rtol * max|desired|`` so that entries near zero do not fail
    on pure cancellation noise.
    """
    actual = np.asarray(actual)
    desired = np.asarray(desired)
    dtype = actual.dtype if dtype is None else dtype
    rtol = tol(dtype, factor, n=n)
    scale = float(np.max(np.abs(desired))) if desired.size else 1.0
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale, err_msg=err_msg)


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """Haar-distributed orthogonal ``n x n`` matrix (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def spd_with_condition(n: int, cond: float, rng: np.random.Generator, *, batch=(), dtype=np.float64,
                       lam_max: float = 1.0) -> np.ndarray:
    """Symmetric positive definite matrices ``Q diag(lam) Q^T`` with ``lam_max/lam_min == cond``.

    Eigenvalues are log-spaced from ``lam_max/cond`` to ``lam_max`` (both ends included), so the
    2-norm condition number is exactly ``cond`` up to rounding.  ``batch`` adds leading axes.
    """
    batch = tuple(np.atleast_1d(batch)) if batch != () else ()
    out = np.empty(batch + (n, n))
    lam = lam_max * np.logspace(-np.log10(cond), 0.0, n)
    for idx in np.ndindex(*batch) if batch else [()]:
        q = random_orthogonal(n, rng)
        a = (q * lam) @ q.T
        out[idx] = (a + a.T) / 2
    return out.astype(dtype)


def random_images(shape, rng: np.random.Generator, dtype=np.float64) -> np.ndarray:
    """Smooth-ish random images (correlated neighbours, like natural images)."""
    x = rng.standard_normal(shape)
    # a cheap low-pass: average with shifted copies along the two spatial axes
    x = x + np.roll(x, 1, axis=-1) + np.roll(x, 1, axis=-2)
    return x.astype(dtype)
