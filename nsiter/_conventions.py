"""The layout conventions of nsiter, written once.

* Images are channels-first ``(N, C, H, W)``; ``(C, H, W)`` is one image and
  ``(H, W)`` one single-channel image.
* Convolutions are cross-correlations; ``im2col`` rows are ordered
  ``n*L + oh*W_out + ow`` and columns ``c*kh*kw + i*kw + j`` (the order of
  ``torch.nn.functional.unfold`` transposed).
* Output size per axis: ``(H + 2p - d*(k - 1) - 1) // s + 1``.
* Resource bounds: a call whose result would exceed :data:`MAX_ELEMENTS` elements, or whose work
  would exceed :data:`MAX_WORK`, is refused with a ``ValueError`` before anything is allocated
  (:func:`check_budget`); both are module constants, raise them deliberately if needed.
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np

from ._validation import as_pair, check_ndim

__all__ = ["MAX_ELEMENTS", "MAX_WORK", "Geometry", "as_images", "check_budget", "geometry"]

#: Largest array one call allocates for its result (elements): 2**30, 8 GiB of float64 (an im2col
#: matrix of 1024 x 1024 pixels with a 15 x 15 kernel holds 2.3e8).
MAX_ELEMENTS = 2**30
#: Largest work of one call, in patch-matrix elements streamed (``N * L * F``, also when the
#: matrix is never formed) or multiply-adds of one dense matrix function (``G * Fb**3``): 2**38,
#: minutes on a CPU; beyond it a call would look like a hang.
MAX_WORK = 2**38


def check_budget(amount: int, bound: str, what, fix: str) -> None:
    """Refuse ``what`` when ``amount`` exceeds the bound named ``bound`` (``"MAX_ELEMENTS"`` or ``"MAX_WORK"``).

    ``what``: the description, or a function returning it (formatted only for the error)."""
    limit = globals()[bound]
    if amount > limit:
        what = what() if callable(what) else what
        unit = "elements" if bound == "MAX_ELEMENTS" else "operations"
        raise ValueError(f"{what} would take {float(amount):.3g} {unit}, beyond nsiter's bound of {float(limit):.3g} "
                         f"(nsiter._conventions.{bound}); {fix}")


class Geometry(namedtuple("Geometry", "n c h w kh kw sh sw ph pw dh dw oh ow")):
    """Patch geometry of a convolution on an ``(N, C, H, W)`` batch: sizes, then kernel, stride,
    padding and dilation per axis, then the output grid (ints)."""

    __slots__ = ()

    @property
    def n_patches(self) -> int:
        """Patches per image, ``L = H_out * W_out``."""
        return self.oh * self.ow

    @property
    def n_features(self) -> int:
        """Columns of the im2col matrix, ``C * kh * kw``."""
        return self.c * self.kh * self.kw


def as_images(x: np.ndarray, name: str = "x") -> np.ndarray:
    """View ``x`` as ``(N, C, H, W)``: ``(H, W)`` -> N = C = 1, ``(C, H, W)`` -> N = 1."""
    check_ndim(x, name, (2, 3, 4), "(H, W), (C, H, W) or (N, C, H, W), channels first")
    return x if x.ndim == 4 else x[(None,) * (4 - x.ndim)]


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
        raise ValueError(f"kernel_size {(kh, kw)} with dilation {(dh, dw)} spans {(span_h, span_w)} pixels, "
                         f"larger than the padded image {(h + 2 * ph, w + 2 * pw)} of {name}; "
                         "use a smaller kernel or more padding")
    oh = (h + 2 * ph - span_h) // sh + 1
    ow = (w + 2 * pw - span_w) // sw + 1
    return Geometry(n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow)
