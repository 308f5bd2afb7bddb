r"""Sample moments as every backend keeps them, written once: block plan, pieces and merge.

Statistics are the triple ``(count, mean (G, Fb), M2 (G, Fb, Fb))``, ``M2 = sum_r (x_r -
mean)(x_r - mean)^T`` per block (unnormalised, centred): the patch kernels of both backends
produce them, :class:`nsiter.PatchStatistics` stores them, :func:`merge_moments` combines them.
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np

from ._backend import backend

__all__ = ["Plan", "plan", "pieces", "merge_moments", "channel_means"]


class Plan(namedtuple("Plan", "mode c taps groups stack fb grp feat")):
    """How im2col columns of ``c`` channels of ``taps`` kernel taps map to covariance blocks.

    ``mode`` is ``"full"`` (one ``F x F`` matrix), ``"contiguous"`` (``groups`` matrices of
    ``fb x fb``) or ``"reference"`` (``stack`` column groups stacked as rows, one matrix; else
    ``stack = 1``).  Column ``j`` goes to block ``grp[j]`` at feature ``feat[j]`` (host ints).
    """

    __slots__ = ()

    @property
    def n_features(self) -> int:
        return self.c * self.taps


def plan(c: int, taps: int, block_size, grouping: str) -> Plan:
    """The plan of ``c`` channels of ``taps`` kernel taps (``block_size`` already validated)."""
    f = c * taps
    j = np.arange(f, dtype=np.int64)
    if block_size is None:
        return Plan("full", c, taps, 1, 1, f, np.zeros(f, np.int64), j)
    g = c // block_size
    fb = block_size * taps
    if grouping == "contiguous":
        return Plan("contiguous", c, taps, g, 1, fb, j // fb, j % fb)
    return Plan("reference", c, taps, 1, g, fb, j % g, j // g)


def pieces(g, per_row: int, halo: int, budget: int) -> list:
    """``(n0, n1, a0, a1)``: image ranges, or bands of output rows of one image, that fit ``budget``
    (output rows ``[a0, a1)`` need ``a1 - a0 + halo`` rows of ``per_row`` bytes or elements)."""
    per_image = (g.oh + halo) * per_row
    if per_image <= budget:
        step = max(1, budget // per_image)
        return [(n0, min(g.n, n0 + step), 0, g.oh) for n0 in range(0, g.n, step)]
    band = max(1, budget // per_row - halo)
    return [(n, n + 1, a0, min(g.oh, a0 + band)) for n in range(g.n) for a0 in range(0, g.oh, band)]


def merge_moments(a, b):
    r"""Chan–Golub–LeVeque: the statistics of the union of two sample sets.

    ``mean = m_a + d n_b / n``, ``M2 = M2_a + M2_b + (n_a n_b / n) d d^T`` with
    ``d = m_b - m_a``: exact in exact arithmetic, and free of the ``E[xx^T] - mu mu^T``
    cancellation.  Callers pass float64 moments (numpy arrays or tensors, not mixed).
    """
    na, ma, Ma = a
    nb, mb, Mb = b
    n = na + nb
    d = mb - ma
    mean = ma + d * (nb / n)
    m2 = Ma + Mb + (na * nb / n) * (d[..., :, None] * d[..., None, :])
    return n, mean, m2


def channel_means(imgs) -> np.ndarray:
    """Per-channel float64 host means of a strided sample of ``(N, C, H, W)`` images.

    The kernels use them only as a shift against cancellation, and any shift gives the same
    statistics: a sample (at most 16 images of about 8 x 8 pixels, a shift within a few percent of
    a standard deviation of the mean) keeps the cost negligible (a strided read: 64 images of
    16 x 16 pixels took 5% of a Table 3 covariance at batch 128).
    """
    n, _, h, w = imgs.shape
    sub = imgs[:: max(1, n // 16), :, :: max(1, h // 8), :: max(1, w // 8)]
    return backend(sub).host(sub).mean(axis=(0, 2, 3), dtype=np.float64)
