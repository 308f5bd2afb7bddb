"""Slow, obviously-correct reference implementations (loops and float64 LAPACK).

Named like the public functions they check.  Never used by the package itself.
"""
from __future__ import annotations

import numpy as np


def _pair(v):
    return (v, v) if np.isscalar(v) else tuple(v)


def _as4(x):
    x = np.asarray(x)
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def im2col(x, kernel_size, stride=1, padding=0, dilation=1):
    """Loop im2col in float64: rows n*L + oh*W_out + ow, columns c*kh*kw + i*kw + j."""
    x = _as4(np.asarray(x, dtype=np.float64))
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    n, c, h, w = x.shape
    xp = np.zeros((n, c, h + 2 * ph, w + 2 * pw))
    xp[:, :, ph:ph + h, pw:pw + w] = x
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n * oh * ow, c * kh * kw))
    for b in range(n):
        for r in range(oh):
            for q in range(ow):
                row = b * oh * ow + r * ow + q
                for ch in range(c):
                    for i in range(kh):
                        for j in range(kw):
                            out[row, ch * kh * kw + i * kw + j] = xp[b, ch, r * sh + i * dh, q * sw + j * dw]
    return out


def col2im(cols, image_shape, kernel_size, stride=1, padding=0, dilation=1):
    """Loop adjoint of :func:`im2col` (overlaps summed, padding dropped), float64."""
    shape = tuple(image_shape)
    n, c, h, w = (1,) * (4 - len(shape)) + shape
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = np.zeros((n, c, h + 2 * ph, w + 2 * pw))
    cols = np.asarray(cols, dtype=np.float64)
    for b in range(n):
        for r in range(oh):
            for q in range(ow):
                row = b * oh * ow + r * ow + q
                for ch in range(c):
                    for i in range(kh):
                        for j in range(kw):
                            xp[b, ch, r * sh + i * dh, q * sw + j * dw] += cols[row, ch * kh * kw + i * kw + j]
    return xp[:, :, ph:ph + h, pw:pw + w].reshape(shape)


def covariance(X):
    """Two-pass float64 covariance with 1/N normalisation: ``((X - mu)^T (X - mu)) / N``.

    The mean is refined once by the mean of ``X - mu`` (corrected two-pass), so that it is exact to
    rounding even when ``|mean| >> std`` (a plain column sum errs by ``N u |mean|``)."""
    X = np.asarray(X, dtype=np.float64)
    mu = X.mean(axis=0)
    mu = mu + (X - mu).mean(axis=0)
    Xc = X - mu
    return Xc.T @ Xc / X.shape[0], mu


def inv_sqrtm(A):
    """Exact float64 inverse square root via ``eigh``: ``V diag(lam^-1/2) V^T``."""
    A = np.asarray(A, dtype=np.float64)
    lam, V = np.linalg.eigh(A)
    return (V * lam[..., None, :] ** -0.5) @ np.swapaxes(V, -1, -2)


def newton_schulz_history(A, method, n_iter, eps=0.0):
    """Float64 loop of the coupled (Higham 6.35) or uncoupled (7.12) iteration, Frobenius scaling.

    Returns ``(iterates, residuals)``: ``D_k = Z_k / sqrt(c)`` (or ``X_k / sqrt(c)``) for
    ``k = 1..n_iter`` and ``||D_k D_k A_eps - I||_F`` with ``A_eps = A + eps I``, every product
    written out.  Reference for :func:`nsiter.verify_whitening`.
    """
    A = np.asarray(A, dtype=np.float64) + eps * np.eye(np.shape(A)[-1])
    n = A.shape[0]
    eye = np.eye(n)
    c = np.sqrt(np.sum(A * A))
    Y0 = A / c
    Y, Z, X = Y0.copy(), eye.copy(), eye.copy()
    iterates, residuals = [], []
    with np.errstate(all="ignore"):
        for _ in range(n_iter):
            if method == "coupled":
                T = 0.5 * (3.0 * eye - Z @ Y)
                Y, Z = Y @ T, T @ Z
                D = Z / np.sqrt(c)
            elif method == "uncoupled":
                X = 0.5 * (3.0 * X - X @ X @ X @ Y0)
                D = X / np.sqrt(c)
            else:
                raise ValueError(method)
            iterates.append(D)
            residuals.append(np.sqrt(np.sum((D @ D @ A - eye) ** 2)))
    return iterates, np.array(residuals)


def isqrt_newton_schulz_autograd(A, num_iters):
    """numpy transcription of the paper's reference code (FastDeconv, ``isqrt_newton_schulz_autograd``).

    ``norm = ||A||_F``, ``Y = A / norm``, ``Z = I``; ``num_iters`` times
    ``T = 0.5 (3I - Z Y)``, ``Y = Y T``, ``Z = T Z``; returns ``Z / sqrt(norm)``, in the dtype of ``A``
    (every operation in that dtype, as the torch original does).
    """
    A = np.asarray(A)
    dim = A.shape[0]
    norm = np.sqrt(np.sum(A * A, dtype=A.dtype))
    Y = A / norm
    I = np.eye(dim, dtype=A.dtype)
    Z = np.eye(dim, dtype=A.dtype)
    for _ in range(num_iters):
        T = A.dtype.type(0.5) * (A.dtype.type(3.0) * I - Z @ Y)
        Y = Y @ T
        Z = T @ Z
    return Z / np.sqrt(norm)


def estimate_kernel(x, y, kernel_size, stride=1, padding=0, dilation=1, fit_intercept=False, eps=0.0):
    """Float64 least squares on the loop im2col: ``min ||X w + b - y||^2 / (2M) + eps ||w||^2 / 2``.

    Solved by ``np.linalg.lstsq`` (SVD) on ``(X | 1)`` stacked with ``sqrt(M eps) I`` rows for the
    ridge (not on ``b``).  Returns ``(w, b)`` with ``w`` flat, ``b = 0.0`` without intercept.
    """
    X = im2col(x, kernel_size, stride, padding, dilation)
    m, f = X.shape
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if fit_intercept:
        X = np.hstack([X, np.ones((m, 1))])
    p = X.shape[1]
    if eps > 0:
        ridge = np.zeros((f, p))
        ridge[:, :f] = np.sqrt(m * eps) * np.eye(f)
        X = np.vstack([X, ridge])
        y = np.concatenate([y, np.zeros(f)])
    theta = np.linalg.lstsq(X, y, rcond=None)[0]
    return theta[:f], (float(theta[f]) if fit_intercept else 0.0)


def patch_covariance(x, kernel_size, stride=1, padding=0, dilation=1, sampling_stride=1, block_size=None,
                     grouping="contiguous"):
    """Algorithm 1 spelled out: loop im2col on the subsampled grid, explicit column groups, two-pass cov.

    ``"contiguous"``: one covariance per channel block ``[gB, (g+1)B)``; ``"reference"``:
    column ``j`` -> group ``j % G`` feature ``j // G``, groups stacked as rows (FastDeconv).
    """
    x4 = _as4(np.asarray(x, dtype=np.float64))
    sh, sw = _pair(stride)
    X = im2col(x4, kernel_size, (sh * sampling_stride, sw * sampling_stride), padding, dilation)
    if block_size is None:
        return covariance(X)
    c = x4.shape[1]
    G = c // block_size
    F = X.shape[1]
    fb = F // G
    if grouping == "contiguous":
        covs, means = zip(*(covariance(X[:, g * fb:(g + 1) * fb]) for g in range(G)))
        return np.stack(covs), np.stack(means)
    rows = []
    for r in range(X.shape[0]):
        for g in range(G):
            rows.append([X[r, f * G + g] for f in range(fb)])
    return covariance(np.asarray(rows))


def whiten(X, mean, D, block_size_features, grouping="contiguous"):
    """Loop whitening of a data matrix: ``(X - mu) D`` per block of ``block_size_features`` columns.

    ``"contiguous"``: ``D[g]`` acts on columns ``[g fb, (g+1) fb)``; ``"reference"``: the
    shared ``D`` acts on columns ``g, g + G, g + 2G, ...`` of every group ``g``.
    """
    X = np.asarray(X, dtype=np.float64)
    n, F = X.shape
    fb = block_size_features
    G = F // fb
    out = np.zeros((n, F))
    for g in range(G):
        if grouping == "contiguous":
            cols = np.arange(g * fb, (g + 1) * fb)
            Dg = np.asarray(D, dtype=np.float64).reshape(G, fb, fb)[g]
            mg = np.asarray(mean, dtype=np.float64).reshape(G, fb)[g]
        else:
            cols = np.arange(fb) * G + g
            Dg = np.asarray(D, dtype=np.float64)
            mg = np.asarray(mean, dtype=np.float64).reshape(fb)
        for r in range(n):
            for b in range(fb):
                out[r, cols[b]] = sum((X[r, cols[a]] - mg[a]) * Dg[a, b] for a in range(fb))
    return out


def sqrtm_psd(A):
    """``V diag(lambda^{1/2}) V^T`` from float64 ``eigh`` (negative rounding-level eigenvalues clipped to 0)."""
    lam, V = np.linalg.eigh(np.asarray(A, dtype=np.float64))
    return (V * np.sqrt(np.maximum(lam, 0.0))[..., None, :]) @ np.swapaxes(V, -1, -2)
