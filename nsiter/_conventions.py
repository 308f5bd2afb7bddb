"""The layout conventions of nsiter, written once.

* Images are channels-first ``(N, C, H, W)``; ``(C, H, W)`` is one image and
  ``(H, W)`` one single-channel image.
* Convolutions are cross-correlations; ``im2col`` rows are ordered
  ``n*L + oh*W_out + ow`` and columns ``c*kh*kw + i*kw + j`` (the order of
  ``torch.nn.functional.unfold`` transposed).
* Output size per axis: ``(H + 2p - d*(k - 1) - 1) // s + 1``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._validation import as_pair, check_ndim

__all__ = ["Geometry", "as_images", "geometry", "output_size"]


class Geometry(NamedTuple):
    """Patch geometry of a convolution on an ``(N, C, H, W)`` batch."""

    n: int
    c: int
    h: int
    w: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    dh: int
    dw: int
    oh: int
    ow: int

    @property
    def n_patches(self) -> int:
        """Patches per image, ``L = H_out * W_out``."""
        return self.oh * self.ow

    @property
    def n_features(self) -> int:
        """Columns of the im2col matrix, ``C * kh * kw``."""
        return self.c * self.kh * self.kw


def output_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """Number of patch positions along one axis (0 when the kernel does not fit)."""
    span = d * (k - 1) + 1
    padded = size + 2 * p
    if padded < span:
        return 0
    return (padded - span) // s + 1


def as_images(x: np.ndarray, name: str = "x") -> np.ndarray:
    """View ``x`` as ``(N, C, H, W)``: ``(H, W)`` -> N = C = 1, ``(C, H, W)`` -> N = 1."""
    check_ndim(x, name, (2, 3, 4), "(H, W), (C, H, W) or (N, C, H, W), channels first")
    if x.ndim == 2:
        return x[None, None]
    if x.ndim == 3:
        return x[None]
    return x


def geometry(image_shape, kernel_size, stride=1, padding=0, dilation=1, *, name: str = "x") -> Geometry:
    """Validate the convolution parameters against a 4-D ``image_shape``."""
    n, c, h, w = (int(v) for v in image_shape)
    kh, kw = as_pair(kernel_size, "kernel_size", minimum=1)
    sh, sw = as_pair(stride, "stride", minimum=1)
    ph, pw = as_pair(padding, "padding", minimum=0)
    dh, dw = as_pair(dilation, "dilation", minimum=1)
    if min(n, c, h, w) == 0:
        raise ValueError(f"expected a non-empty image batch {name}, got shape {tuple(image_shape)}")
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    if span_h > h + 2 * ph or span_w > w + 2 * pw:
        raise ValueError(
            f"kernel_size {(kh, kw)} with dilation {(dh, dw)} spans {(span_h, span_w)} pixels, larger than "
            f"the padded image {(h + 2 * ph, w + 2 * pw)} of {name}; use a smaller kernel or more padding"
        )
    oh = output_size(h, kh, sh, ph, dh)
    ow = output_size(w, kw, sw, pw, dw)
    return Geometry(n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow)
