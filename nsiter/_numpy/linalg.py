"""The Newton–Schulz kernels of the numpy backend on numpy alone: the twins of
:mod:`nsiter._numba.linalg`, with the same contract and the same numbers up to rounding.

Selected by :func:`nsiter._backend.numpy_kernels` (``"array"``): a one-off check of one matrix
(:func:`nsiter.verify_whitening`, ``nsiter verify``) is dominated by loading Numba and its
cached kernels, not by the arithmetic.  The iteration itself is the array code of
:mod:`nsiter.newton_schulz` on numpy ``@`` (:func:`coupled_kernel` returns ``None``), the
runner the Numba kernel set also takes above its fused-kernel size.  Every function mirrors
its Numba kernel step by step (start vectors, step counts, clipping); only the order of the
floating-point sums differs.
"""
from __future__ import annotations

import numpy as np

__all__ = ["prepare", "probe", "eigh_power", "coupled_kernel", "coupled_solver", "auto_may_use_eigh"]


def prepare(A3, eps: float):
    """``(A64, fro, stats)`` as :func:`nsiter._numba.linalg.prepare`: ``A64 = ((A + A^T)/2 + eps I) / s``
    in float64, ``s = 4^k`` bringing ``max(max|a_ij|, eps)`` into ``[1, 4)`` (exact, overflow-free),
    ``stats (nb, 6) = [all finite, max|a_ij|, max|a_ij - a_ji|, ||A64||_F, ||A64||_inf, s]``."""
    a = np.asarray(A3, dtype=np.float64)
    nb, n, _ = a.shape
    at = np.swapaxes(a, -1, -2)
    finite = np.isfinite(a).all(axis=(-2, -1))
    with np.errstate(all="ignore"):  # non-finite entries are reported by stats[:, 0]
        amax = np.abs(a).max(axis=(-2, -1))
        asym = np.abs(a - at).max(axis=(-2, -1))
    top = np.maximum(np.where(finite, amax, 0.0), float(eps))
    e = np.frexp(top)[1]  # top = f 2^e, f in [1/2, 1)
    scale = np.where(finite & (top > 0), np.ldexp(1.0, 2 * ((e - 1) // 2)), 1.0)
    s3 = scale[:, None, None]
    with np.errstate(all="ignore"):
        A64 = (a / s3) * 0.5 + (at / s3) * 0.5  # halved before the sum: no overflow near the largest float
    if eps:
        idx = np.arange(n)
        A64[:, idx, idx] += float(eps) / scale[:, None]
    with np.errstate(all="ignore"):
        fro = np.sqrt(np.einsum("bij,bij->b", A64, A64))
        norm_inf = np.abs(A64).sum(axis=-1).max(axis=-1) if n else np.zeros(nb)
    stats = np.stack([finite.astype(np.float64), amax, asym, fro, norm_inf, scale], axis=1)
    return A64, fro.copy(), stats


def _power(A64, n_power: int):
    """:func:`nsiter._numba._newton_schulz._power_one` over the batch: an estimate ``<= lambda_max``."""
    nb, n, _ = A64.shape
    lmax = np.zeros(nb)
    if n_power <= 0:
        return lmax
    i = np.arange(n)
    v = np.sqrt(np.abs(np.diagonal(A64, axis1=-2, axis2=-1))) + 1e-3 * np.cos(1.7 * i + 0.3)
    for _ in range(n_power):
        nv = np.linalg.norm(v, axis=-1)
        live = nv > 0
        if not live.any():
            break
        w = np.matmul((v / np.where(live, nv, 1.0)[:, None])[:, None, :], A64)[:, 0]  # v^T A = (A v)^T
        lmax = np.where(live, np.linalg.norm(w, axis=-1), lmax)
        v = np.where(live[:, None], w, v)
    return lmax


def _inverse(L, n_inverse: int):
    """:func:`nsiter._numba._newton_schulz._inverse_lu` over the batch: an estimate
    ``>= lambda_min(L L^T)``, bounded by the smallest pivot ``L_jj^2``."""
    nb, n, _ = L.shape
    piv = np.diagonal(L, axis1=-2, axis2=-1)
    min_pivot = (piv * piv).min(axis=-1)
    Linv = np.linalg.inv(L)  # triangular; the solves of the Numba kernel, as products
    v = np.broadcast_to(np.cos(2.3 * np.arange(n) + 0.7) + 0.25, (nb, n))
    inv_est = np.zeros(nb)
    for _ in range(n_inverse):
        v = v / np.linalg.norm(v, axis=-1, keepdims=True)
        y = np.matmul(Linv, v[..., None])
        v = np.matmul(np.swapaxes(Linv, -1, -2), y)[..., 0]
        inv_est = np.linalg.norm(v, axis=-1)
    with np.errstate(divide="ignore"):
        est = np.where(inv_est > 0, 1.0 / np.where(inv_est > 0, inv_est, 1.0), min_pivot)
    return np.minimum(est, min_pivot)


def probe(A64, delta, n_inverse: int, n_power: int):
    """``(ok, lmin, lmax)`` as :func:`nsiter._numba.linalg.probe`: Cholesky of ``A + delta I``
    succeeded; inverse-iteration estimate (from above) of ``lambda_min`` (NaN where the
    factorisation failed); power-iteration estimate (from below) of ``lambda_max`` (0 when
    ``n_power == 0``)."""
    nb, n, _ = A64.shape
    delta = np.asarray(delta, dtype=np.float64).reshape(nb)
    S = A64.copy()
    idx = np.arange(n)
    S[:, idx, idx] += delta[:, None]
    ok = np.ones(nb, dtype=bool)
    L = np.empty_like(S)
    try:
        L[:] = np.linalg.cholesky(S)
    except np.linalg.LinAlgError:  # which matrices: one at a time
        for b in range(nb):
            try:
                L[b] = np.linalg.cholesky(S[b])
            except np.linalg.LinAlgError:
                ok[b] = False
                L[b] = np.eye(n)  # a harmless factor; lmin is NaN there
    lmin = np.where(ok, _inverse(L, n_inverse) - delta, np.nan)
    return ok, lmin, _power(A64, n_power)


def eigh_power(A64, power: float):
    """``(V diag(lambda^power) V^T, lambda)`` from numpy's float64 ``eigh`` (ascending ``lambda``),
    as :func:`nsiter._numba.linalg.eigh_power`: eigenvalues ``<= 0`` contribute 0; formed as
    ``W W^T``, ``W = V diag(lambda^(power/2))``, one matrix at a time (numpy computes ``W @ W.T``
    with a symmetric rank-k update: symmetric to the last bit)."""
    lam, V = np.linalg.eigh(A64)
    pos = lam > 0
    s = np.where(pos, np.where(pos, lam, 1.0) ** (0.5 * float(power)), 0.0)
    W = V * s[:, None, :]
    D = np.empty_like(A64)
    for b in range(A64.shape[0]):
        D[b] = W[b] @ W[b].T
    return D, lam


def coupled_kernel(n: int):
    """No fused kernel: the array-code iteration of :mod:`nsiter.newton_schulz` on numpy ``@``."""
    return None


def coupled_solver(n: int):
    """No fused solver either: ``Y_0`` and the result are formed by :mod:`nsiter.newton_schulz`."""
    return None


def auto_may_use_eigh(like) -> bool:
    """``method="auto"`` weighs LAPACK ``eigh`` against the iteration (the CPU cost model)."""
    return True
