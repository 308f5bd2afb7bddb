r"""Sample moments as every backend keeps them, written once: the block plan and the merge.

Statistics of a set of samples are the triple ``(count, mean (G, Fb), M2 (G, Fb, Fb))`` with
``M2 = sum_r (x_r - mean)(x_r - mean)^T`` per block ``g`` (unnormalised, centred).  The
numpy and torch patch kernels produce such triples, :class:`nsiter.PatchStatistics` stores
them, and :func:`merge_moments` combines two of them exactly; the functions here use only
arithmetic and indexing that numpy arrays and torch tensors share.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._backend import backend

__all__ = ["Plan", "plan", "merge_moments", "channel_means"]


class Plan(NamedTuple):
    """How im2col columns map to covariance blocks.

    ``mode`` is ``"full"`` (one ``F x F`` matrix), ``"contiguous"`` (``groups`` matrices of
    ``fb x fb``) or ``"reference"`` (``stack`` column groups stacked as rows, one matrix).
    Column ``j`` goes to block ``grp[j]`` at feature ``feat[j]`` (host integer arrays).
    """

    mode: str
    c: int
    taps: int
    groups: int  # matrices returned
    stack: int  # column groups stacked as rows (reference grouping), else 1
    fb: int
    grp: np.ndarray
    feat: np.ndarray

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
    """Per-channel float64 means (host) of a strided sample of ``(N, C, H, W)`` images.

    At most 64 images x about 16 x 16 pixels: the kernels use the result only as a shift,
    which keeps float64 moments free of cancellation; any shift gives the same statistics,
    so a sample keeps its cost negligible.  Tensors: only the sample goes to the host.
    """
    n, _, h, w = imgs.shape
    sub = imgs[:: max(1, n // 64), :, :: max(1, h // 16), :: max(1, w // 16)]
    return backend(sub).host(sub).mean(axis=(0, 2, 3), dtype=np.float64)
