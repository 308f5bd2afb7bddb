"""The torch backend's patch kernels: ``Tensor.unfold`` im2col, col2im, chunked two-pass moments.

Twins of :mod:`nsiter._numba.patches`.  Every kernel keeps autograd intact and works in the
input dtype; moments are two-pass (centred first), so float32 loses no more than the rounding
of one GEMM.  im2col and the CPU col2im are bit-identical to numpy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._moments import merge_moments, pieces
from . import device_path

__all__ = ["im2col", "col2im", "centred_stats", "matrix_moments", "patch_moments", "correlate_centred"]

_CHUNK_ELEMENTS = 64 * 2**20  # bound on one im2col chunk in patch_moments (256 MB of float32)


def im2col(imgs: torch.Tensor, g) -> torch.Tensor:
    """Gather ``(N, C, H, W)`` into the final ``(N*L, C*kh*kw)`` layout in ONE copy.

    Two ``Tensor.unfold`` views, sliced by the dilation and permuted to ``(N, oh, ow, C, kh,
    kw)``, leave one gather for ``reshape`` (``F.unfold`` + ``transpose`` writes the data twice);
    the backward of ``Tensor.unfold`` is a dedicated scatter-add kernel.
    """
    xp = F.pad(imgs, (g.pw, g.pw, g.ph, g.ph)) if (g.ph or g.pw) else imgs
    u = xp.unfold(2, g.dh * (g.kh - 1) + 1, g.sh).unfold(3, g.dw * (g.kw - 1) + 1, g.sw)
    if g.dh > 1 or g.dw > 1:
        u = u[..., :: g.dh, :: g.dw]
    out = u.permute(0, 2, 3, 1, 4, 5).reshape(g.n * g.oh * g.ow, g.c * g.kh * g.kw)
    # reshape may return a view (1x1 kernels): always row-major, never the caller's memory
    if not out.is_contiguous():
        out = out.contiguous()
    if out.untyped_storage().data_ptr() == imgs.untyped_storage().data_ptr():
        out = out.clone()
    return out


def col2im(X: torch.Tensor, g) -> torch.Tensor:
    """Scatter-add patch rows into ``(N, C, H, W)``: on the CPU one strided add per tap, ``i`` descending
    and ``j`` ascending as the Numba kernel adds overlaps (bit-identical); device path ``F.fold``."""
    if device_path(X):
        cols = X.reshape(g.n, g.oh * g.ow, g.c * g.kh * g.kw).transpose(1, 2)
        return F.fold(cols, (g.h, g.w), (g.kh, g.kw), dilation=(g.dh, g.dw),
                      padding=(g.ph, g.pw), stride=(g.sh, g.sw))
    v = X.reshape(g.n, g.oh, g.ow, g.c, g.kh, g.kw)
    out = X.new_zeros((g.n, g.c, g.h + 2 * g.ph, g.w + 2 * g.pw))
    for i in reversed(range(g.kh)):
        rows = slice(i * g.dh, i * g.dh + g.sh * (g.oh - 1) + 1, g.sh)
        for j in range(g.kw):
            cols = slice(j * g.dw, j * g.dw + g.sw * (g.ow - 1) + 1, g.sw)
            out[:, :, rows, cols] += v[:, :, :, :, i, j].permute(0, 3, 1, 2)
    if g.ph or g.pw:
        out = out[:, :, g.ph: g.ph + g.h, g.pw: g.pw + g.w].contiguous()
    return out


def centred_stats(Xg: torch.Tensor):
    """Two-pass ``(R, mean (G, F), M2 (G, F, F))`` of row blocks ``Xg (G, R, F)``: one batched GEMM in
    the input dtype, symmetrised exactly whatever the GEMM's blocking."""
    mean = Xg.mean(dim=1)
    Xc = Xg - mean[:, None, :]
    M2 = torch.matmul(Xc.transpose(1, 2), Xc)
    return Xg.shape[1], mean, (M2 + M2.transpose(1, 2)) * 0.5


def matrix_moments(X: torch.Tensor):
    """``(N, mean (F,), M2 (F, F))`` of the rows of ``X (N, F)``, two-pass in its dtype."""
    n, mean, M2 = centred_stats(X[None])
    return n, mean[0], M2[0]


def _group_columns(X: torch.Tensor, plan) -> torch.Tensor:
    """Rows of the im2col matrix ``X (R, F)`` as the plan's ``(G, R', Fb)`` sample blocks:
    ``(1, R, F)``, ``(C/B, R, Fb)`` or, stacked as rows, ``(1, R*C/B, Fb)`` (reference)."""
    R = X.shape[0]
    if plan.mode == "full":
        return X[None]
    if plan.mode == "contiguous":
        return X.reshape(R, plan.groups, plan.fb).transpose(0, 1)
    return X.reshape(R, plan.fb, plan.stack).transpose(1, 2).reshape(1, R * plan.stack, plan.fb)


def _chunks(g, n_features: int, budget: int):
    """Pieces of images and output rows whose im2col has at most ``budget`` elements."""
    return pieces(g, g.ow * n_features, 0, budget)


def patch_moments(imgs: torch.Tensor, g, plan):
    """``(count, mean (G, fb), M2 (G, fb, fb))`` of the planned im2col rows: one chunk of at most
    ``_CHUNK_ELEMENTS`` in the input dtype (autograd-friendly), several merged exactly in float64."""
    blocks = _chunks(g, plan.n_features, _CHUNK_ELEMENTS)
    if len(blocks) == 1:
        return centred_stats(_group_columns(im2col(imgs, g), plan))
    xp = F.pad(imgs, (g.pw, g.pw, g.ph, g.ph)) if (g.ph or g.pw) else imgs
    span_h = g.dh * (g.kh - 1) + 1
    acc = None
    for n0, n1, r0, r1 in blocks:
        h0, h1 = r0 * g.sh, (r1 - 1) * g.sh + span_h
        gp = g._replace(n=n1 - n0, h=h1 - h0, w=xp.shape[3], ph=0, pw=0, oh=r1 - r0)
        n, mean, M2 = centred_stats(_group_columns(im2col(xp[n0:n1, :, h0:h1], gp), plan))
        stats = (n, mean.double(), M2.double())
        acc = stats if acc is None else merge_moments(acc, stats)
    return acc


def correlate_centred(x: torch.Tensor, shift, K, bias, padding) -> torch.Tensor:
    """``conv2d(pad(x, padding) - shift, K, bias)``: as the numpy kernel, one ``F.conv2d``."""
    ph, pw = padding
    return F.conv2d(F.pad(x, (pw, pw, ph, ph)) - shift[None, :, None, None], K, bias)
