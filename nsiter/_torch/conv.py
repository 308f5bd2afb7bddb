"""The torch backend's convolution kernels: torch's own functions (loaded only for tensors).

Twins of the array code of :mod:`nsiter.conv` (which validates, maps weights and runs the
sub-pixel route once for both backends): on tensors the layers run as
``torch.nn.functional`` runs them (oneDNN / cuDNN, autograd, any device).  Tests empty
:data:`KERNELS` to run the array code on tensors and compare the two.
"""
from __future__ import annotations

import torch.nn.functional as F

__all__ = ["KERNELS", "conv2d", "conv_transpose2d", "pixel_shuffle", "pixel_unshuffle"]


def conv2d(x, weight, bias, g, groups: int):
    """``F.conv2d`` on the validated geometry ``g`` of ``x``."""
    return F.conv2d(x, weight, bias, stride=(g.sh, g.sw), padding=(g.ph, g.pw), dilation=(g.dh, g.dw),
                    groups=groups)


def conv_transpose2d(x, weight, bias, g, groups: int):
    """``F.conv_transpose2d`` onto the output geometry ``g`` (its grid ``(g.oh, g.ow)`` is ``x``'s size)."""
    h, w = x.shape[-2], x.shape[-1]
    oph = g.h - ((h - 1) * g.sh - 2 * g.ph + g.dh * (g.kh - 1) + 1)
    opw = g.w - ((w - 1) * g.sw - 2 * g.pw + g.dw * (g.kw - 1) + 1)
    return F.conv_transpose2d(x, weight, bias, stride=(g.sh, g.sw), padding=(g.ph, g.pw),
                              output_padding=(oph, opw), groups=groups, dilation=(g.dh, g.dw))


def pixel_shuffle(x, r: int):
    return F.pixel_shuffle(x, r)


def pixel_unshuffle(x, r: int):
    return F.pixel_unshuffle(x, r)


#: Kernels of :mod:`nsiter.conv` this backend computes natively.
KERNELS = {"conv2d": conv2d, "conv_transpose2d": conv_transpose2d, "pixel_shuffle": pixel_shuffle,
           "pixel_unshuffle": pixel_unshuffle}
