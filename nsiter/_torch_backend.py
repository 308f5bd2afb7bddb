"""The torch backend: nsiter's public functions on ``torch.Tensor`` inputs.

Reached only through :mod:`nsiter._dispatch` (``import nsiter`` never imports this
module, nor torch).  Every function here has the name and signature of the numpy
public function it stands in for, returns tensors on the input's device and dtype,
and keeps autograd intact: gradients flow through :func:`im2col`, :func:`col2im`,
:func:`covariance`, :func:`patch_covariance` and the unrolled Newton–Schulz iterations
of :func:`inv_sqrtm` (what the paper's appendix A.8 relies on).

Differences from the numpy side, on purpose:

* Products run in the input dtype (float32 stays float32 on the GPU); the numpy side
  accumulates covariances in float64.  Covariances are computed two-pass (centred
  first), so float32 loses no more than the rounding of one GEMM.
* On CUDA, every matrix product nsiter issues runs with TF32 *off* (it costs three
  decimal digits, which the Newton–Schulz residuals cannot afford); the caller's
  global TF32 setting is restored afterwards.  Opt in with :func:`set_allow_tf32` or
  the :func:`allow_tf32` context manager (re-exported by :mod:`nsiter.torch`).
* Small Newton–Schulz problems on CUDA without autograd are replayed from captured
  CUDA graphs (one launch instead of ~20); see :func:`set_cuda_graphs`.
* ``info`` objects from ``inv_sqrtm(..., return_info=True)`` hold numpy arrays
  (residuals in float64, on the host), exactly like the numpy backend, so that
  downstream reporting code does not care which backend produced them.
"""
from __future__ import annotations

import math
import threading
import warnings
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from ._conventions import Geometry, geometry
from ._validation import (
    as_pair,
    check_nonnegative_float,
    check_option,
    check_positive_float,
    check_positive_int,
)

__all__ = [
    "im2col",
    "col2im",
    "covariance",
    "patch_covariance",
    "inv_sqrtm",
    "set_allow_tf32",
    "allow_tf32",
    "set_cuda_graphs",
]

# --------------------------------------------------------------------------------------
# settings: TF32 opt-in and the CUDA-graph path
# --------------------------------------------------------------------------------------

_SETTINGS = {"allow_tf32": False, "cuda_graphs": True}
_LOCK = threading.Lock()


def set_allow_tf32(enabled: bool) -> bool:
    """Let nsiter's CUDA matrix products use TF32 (default ``False``); returns the old value.

    TF32 keeps 10 mantissa bits: Newton–Schulz residuals then stall near ``1e-3``
    instead of ``1e-6`` in float32.  Enable it only when that is acceptable.
    """
    old = _SETTINGS["allow_tf32"]
    _SETTINGS["allow_tf32"] = bool(enabled)
    return old


@contextmanager
def allow_tf32(enabled: bool = True):
    """Context manager form of :func:`set_allow_tf32`."""
    old = set_allow_tf32(enabled)
    try:
        yield
    finally:
        set_allow_tf32(old)


def set_cuda_graphs(enabled: bool) -> bool:
    """Switch the CUDA-graph path for small Newton–Schulz problems; returns the old value."""
    old = _SETTINGS["cuda_graphs"]
    _SETTINGS["cuda_graphs"] = bool(enabled)
    return old


@contextmanager
def _matmul_precision(device: torch.device):
    """Run CUDA matmuls with nsiter's TF32 setting, restoring the caller's flags exactly.

    torch >= 2.9 keeps two TF32 states (the legacy ``float32_matmul_precision`` and the
    per-backend ``fp32_precision``) and refuses to run a cuBLAS matmul when they disagree.
    The legacy setter ``matmul.allow_tf32`` writes both consistently; on exit the legacy
    precision and the new per-backend values (CUDA and oneDNN matmul) are written back.
    CPU tensors are unaffected (no TF32 there).  Not thread-safe: the flags are global.
    """
    if device.type != "cuda":
        yield
        return
    want = _SETTINGS["allow_tf32"]
    mm = torch.backends.cuda.matmul
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not hasattr(mm, "fp32_precision"):  # torch < 2.9: one flag
            old = mm.allow_tf32
            mm.allow_tf32 = want
            try:
                yield
            finally:
                mm.allow_tf32 = old
            return
        old_cuda = mm.fp32_precision
        mkl = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
        old_mkl = getattr(mkl, "fp32_precision", None) if mkl is not None else None
        try:
            old_legacy = torch.get_float32_matmul_precision()
        except RuntimeError:  # the caller mixed the two APIs; the legacy value is "highest" then
            old_legacy = None
        mm.allow_tf32 = want
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.set_float32_matmul_precision(old_legacy or "highest")
            mm.fp32_precision = old_cuda
            if old_mkl is not None:
                mkl.fp32_precision = old_mkl


# --------------------------------------------------------------------------------------
# validation helpers for tensors (the numpy checkers use ndarray-only attributes)
# --------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float32, torch.float64)


def _result_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32/float64 kept, float16/bfloat16 -> float32, bool/int -> float64, complex -> TypeError."""
    if dtype.is_complex:
        raise TypeError(
            f"expected a real floating, integer or bool tensor, got complex dtype {dtype}; "
            "pass the real part (x.real) or the magnitude (x.abs()) explicitly"
        )
    if dtype in _FLOAT_DTYPES:
        return dtype
    if dtype.is_floating_point:  # float16, bfloat16, float8 ...
        return torch.float32
    return torch.float64


def _as_float(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` in its nsiter compute dtype (no copy when it already is)."""
    dtype = _result_dtype(x.dtype)
    return x if x.dtype == dtype else x.to(dtype)


def _check_ndim(t: torch.Tensor, name: str, allowed, meaning: str = "") -> None:
    allowed = tuple(allowed)
    if t.ndim not in allowed:
        want = " or ".join(str(a) for a in allowed)
        extra = f" ({meaning})" if meaning else ""
        raise ValueError(f"expected {name} with ndim {want}{extra}, got ndim {t.ndim} with shape {tuple(t.shape)}")


def _check_nonempty(t: torch.Tensor, name: str) -> None:
    if t.numel() == 0:
        raise ValueError(f"expected a non-empty {name}, got shape {tuple(t.shape)} with no elements")


def _check_finite(t: torch.Tensor, name: str) -> None:
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        n_bad = int(t.numel() - int(finite.sum()))
        raise ValueError(
            f"expected finite values in {name}, found {n_bad} NaN/inf entries; "
            "clean the data first (e.g. torch.nan_to_num or drop the affected samples)"
        )


def _as_images(t: torch.Tensor, name: str) -> torch.Tensor:
    _check_ndim(t, name, (2, 3, 4), "(H, W), (C, H, W) or (N, C, H, W), channels first")
    if t.ndim == 2:
        return t[None, None]
    if t.ndim == 3:
        return t[None]
    return t


def _image_shape(image_shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in image_shape)
    except TypeError:
        raise TypeError(f"expected image_shape as a tuple of ints, got {image_shape!r}") from None
    if len(shape) not in (2, 3, 4):
        raise ValueError(f"expected image_shape (H, W), (C, H, W) or (N, C, H, W), got {shape}")
    return shape


# --------------------------------------------------------------------------------------
# im2col / col2im
# --------------------------------------------------------------------------------------


def _im2col(imgs: torch.Tensor, g: Geometry) -> torch.Tensor:
    """Gather ``(N, C, H, W)`` into the final ``(N*L, C*kh*kw)`` layout in ONE copy.

    ``Tensor.unfold`` twice gives a strided view ``(N, C, oh, ow, span_h, span_w)`` of the
    padded images; slicing by the dilation and permuting to ``(N, oh, ow, C, kh, kw)``
    leaves a view whose ``reshape`` is the single gather.  ``F.unfold`` followed by
    ``transpose(1, 2).contiguous()`` writes the data twice.  Autograd: the backward of
    ``Tensor.unfold`` is a dedicated scatter-add kernel.
    """
    xp = F.pad(imgs, (g.pw, g.pw, g.ph, g.ph)) if (g.ph or g.pw) else imgs
    span_h = g.dh * (g.kh - 1) + 1
    span_w = g.dw * (g.kw - 1) + 1
    u = xp.unfold(2, span_h, g.sh).unfold(3, span_w, g.sw)
    if g.dh > 1 or g.dw > 1:
        u = u[..., :: g.dh, :: g.dw]
    out = u.permute(0, 2, 3, 1, 4, 5).reshape(g.n * g.oh * g.ow, g.c * g.kh * g.kw)
    if out.untyped_storage().data_ptr() == imgs.untyped_storage().data_ptr():
        out = out.clone()  # reshape returned a view (1x1 kernels): never alias the caller's data
    return out


def im2col(x, kernel_size, *, stride=1, padding=0, dilation=1):
    """Torch twin of :func:`nsiter.im2col` (same layout; exact, pure data movement)."""
    t = _as_float(x, "x")
    imgs = _as_images(t, "x")
    _check_nonempty(imgs, "x")
    g = geometry(tuple(imgs.shape), kernel_size, stride, padding, dilation)
    return _im2col(imgs, g)


def _col2im(X: torch.Tensor, g: Geometry) -> torch.Tensor:
    """Scatter-add patch rows into ``(N, C, H, W)``.

    CPU: one strided add per kernel tap, taps in the order ``i`` descending, ``j``
    ascending, which is the order the Numba kernel adds overlaps in, so the result is
    bit-identical to the numpy backend.  CUDA: ``F.fold`` (one kernel; overlaps summed in
    its own order, so results may differ from the CPU in the last bit).
    """
    if X.device.type == "cuda":
        cols = X.reshape(g.n, g.oh * g.ow, g.c * g.kh * g.kw).transpose(1, 2)
        return F.fold(cols, (g.h, g.w), (g.kh, g.kw), dilation=(g.dh, g.dw),
                      padding=(g.ph, g.pw), stride=(g.sh, g.sw))
    hp, wp = g.h + 2 * g.ph, g.w + 2 * g.pw
    v = X.reshape(g.n, g.oh, g.ow, g.c, g.kh, g.kw)
    out = X.new_zeros((g.n, g.c, hp, wp))
    for i in reversed(range(g.kh)):
        r0 = i * g.dh
        rows = slice(r0, r0 + g.sh * (g.oh - 1) + 1, g.sh)
        for j in range(g.kw):
            c0 = j * g.dw
            out[:, :, rows, c0: c0 + g.sw * (g.ow - 1) + 1: g.sw] += v[:, :, :, :, i, j].permute(0, 3, 1, 2)
    if g.ph or g.pw:
        out = out[:, :, g.ph: g.ph + g.h, g.pw: g.pw + g.w].contiguous()
    return out


def col2im(X, image_shape, kernel_size, *, stride=1, padding=0, dilation=1):
    """Torch twin of :func:`nsiter.col2im`: the adjoint of :func:`im2col` (overlaps summed)."""
    t = _as_float(X, "X")
    _check_ndim(t, "X", (2,), "(N*H_out*W_out, C*kh*kw)")
    shape = _image_shape(image_shape)
    shape4 = (1,) * (4 - len(shape)) + shape
    g = geometry(shape4, kernel_size, stride, padding, dilation, name="image_shape")
    want = (g.n * g.n_patches, g.n_features)
    if tuple(t.shape) != want:
        raise ValueError(
            f"X of shape {tuple(t.shape)} does not match image_shape {shape} with kernel {(g.kh, g.kw)}, "
            f"stride {(g.sh, g.sw)}, padding {(g.ph, g.pw)}, dilation {(g.dh, g.dw)}: expected X of shape "
            f"{want}; check image_shape and the convolution parameters"
        )
    return _col2im(t, g).reshape(shape)


# --------------------------------------------------------------------------------------
# covariance and patch covariance (Algorithm 1)
# --------------------------------------------------------------------------------------

GROUPINGS = ("contiguous", "reference")

# bound on the elements of one im2col chunk in patch_covariance (256 MB of float32)
_CHUNK_ELEMENTS = 64 * 2**20


def _eye_like(t: torch.Tensor, n: int) -> torch.Tensor:
    return torch.eye(n, dtype=t.dtype, device=t.device)


def _centred_stats(Xg: torch.Tensor):
    """Two-pass statistics of row blocks ``Xg (G, R, F)``: ``(R, mean (G, F), M2 (G, F, F))``.

    ``M2 = (X - mean)^T (X - mean)`` (unnormalised), one batched GEMM in the input dtype.
    """
    mean = Xg.mean(dim=1)
    Xc = Xg - mean[:, None, :]
    M2 = torch.matmul(Xc.transpose(1, 2), Xc)
    return Xg.shape[1], mean, M2


def _merge_stats(a, b):
    """Chan–Golub–LeVeque pairwise update: statistics of the union of two row sets.

    ``mean = m_a + d n_b / n``, ``M2 = M2_a + M2_b + (n_a n_b / n) d d^T``, ``d = m_b - m_a``:
    exact in exact arithmetic, and free of the ``E[xx^T] - mu mu^T`` cancellation.
    """
    na, ma, Ma = a
    nb, mb, Mb = b
    n = na + nb
    d = mb - ma
    mean = ma + d * (nb / n)
    M2 = Ma + Mb + (na * nb / n) * (d[..., :, None] * d[..., None, :])
    return n, mean, M2


def _group_columns(X: torch.Tensor, c: int, khkw: int, block_size, grouping: str) -> torch.Tensor:
    """Rows of the im2col matrix ``X (R, C*kh*kw)`` arranged as ``(G, R', Fb)`` sample blocks.

    * ``block_size=None``: ``(1, R, F)``.
    * ``"contiguous"``: channels ``[gB, (g+1)B)`` form group ``g``: ``(C/B, R, B*kh*kw)``.
    * ``"reference"``: column ``j`` goes to group ``j mod (C/B)`` at feature ``j div (C/B)``
      and the groups are stacked as extra rows: ``(1, R*C/B, B*kh*kw)`` (FastDeconv).
    """
    R = X.shape[0]
    if block_size is None:
        return X[None]
    G = c // block_size
    fb = block_size * khkw
    if grouping == "contiguous":
        return X.reshape(R, G, fb).transpose(0, 1)
    return X.reshape(R, fb, G).transpose(1, 2).reshape(1, R * G, fb)


def _chunks(g: Geometry, n_features: int, budget: int):
    """Blocks ``(n0, n1, r0, r1)`` of images and output rows whose im2col has <= budget elements."""
    rows_max = max(1, budget // max(n_features, 1))
    L = g.oh * g.ow
    if g.n * L <= rows_max:
        return [(0, g.n, 0, g.oh)]
    if L <= rows_max:
        step = max(1, rows_max // L)
        return [(n0, min(g.n, n0 + step), 0, g.oh) for n0 in range(0, g.n, step)]
    band = max(1, rows_max // max(g.ow, 1))
    return [(n0, n0 + 1, r0, min(g.oh, r0 + band)) for n0 in range(g.n) for r0 in range(0, g.oh, band)]


def _patch_stats(imgs: torch.Tensor, g: Geometry, block_size, grouping: str, budget: int = _CHUNK_ELEMENTS):
    """``(count, mean, M2)`` of the grouped im2col rows of ``imgs``, chunked to ``budget`` elements.

    ``g`` already holds the sampling grid (stride times sampling stride).  A single chunk
    is the plain two-pass computation in the input dtype (autograd-friendly); several
    chunks are merged pairwise in float64.
    """
    khkw = g.kh * g.kw
    blocks = _chunks(g, g.c * khkw, budget)
    if len(blocks) == 1:
        X = _im2col(imgs, g)
        return _centred_stats(_group_columns(X, g.c, khkw, block_size, grouping))
    xp = F.pad(imgs, (g.pw, g.pw, g.ph, g.ph)) if (g.ph or g.pw) else imgs
    span_h = g.dh * (g.kh - 1) + 1
    acc = None
    for n0, n1, r0, r1 in blocks:
        h0, h1 = r0 * g.sh, (r1 - 1) * g.sh + span_h
        part = xp[n0:n1, :, h0:h1]
        gp = g._replace(n=n1 - n0, h=h1 - h0, w=xp.shape[3], ph=0, pw=0, oh=r1 - r0)
        X = _im2col(part, gp)
        n, mean, M2 = _centred_stats(_group_columns(X, g.c, khkw, block_size, grouping))
        stats = (n, mean.double(), M2.double())
        acc = stats if acc is None else _merge_stats(acc, stats)
    return acc


def _finish_covariance(stats, eps: float, dtype: torch.dtype):
    n, mean, M2 = stats
    cov = M2 / n
    if eps:
        cov = cov + eps * _eye_like(cov, cov.shape[-1])
    return cov.to(dtype), mean.to(dtype)


def covariance(X, *, eps=0.0):
    """Torch twin of :func:`nsiter.covariance`: ``Cov = (X - mu)^T (X - mu) / N + eps I``.

    Two-pass (centred) in the input dtype; autograd flows through it.
    """
    t = _as_float(X, "X")
    _check_ndim(t, "X", (2,), "(n_samples, n_features)")
    _check_nonempty(t, "X")
    eps = check_nonnegative_float(eps, "eps")
    _check_finite(t, "X")
    n, mean, M2 = _centred_stats(t[None])
    return _finish_covariance((n, mean[0], M2[0]), eps, t.dtype)


def _check_block(block_size, c: int):
    if block_size is None:
        return None
    block_size = check_positive_int(block_size, "block_size")
    if c % block_size:
        fix = math.gcd(block_size, c)
        raise ValueError(
            f"block_size {block_size} does not divide the {c} channels of x; "
            f"use block_size={fix} (gcd({block_size}, {c})) or another divisor of {c}"
        )
    return block_size


def _sampled_geometry(shape4, kernel_size, stride, padding, dilation, sampling_stride) -> Geometry:
    s = check_positive_int(sampling_stride, "sampling_stride")
    sh, sw = as_pair(stride, "stride", minimum=1)
    return geometry(shape4, kernel_size, (sh * s, sw * s), padding, dilation)


def patch_covariance(x, kernel_size, *, stride=1, padding=0, dilation=1, sampling_stride=1,
                     block_size=None, grouping="contiguous", eps=0.0):
    """Torch twin of :func:`nsiter.patch_covariance` (Algorithm 1).

    Equal to ``covariance(im2col(x, k, stride=stride*sampling_stride, ...))`` per channel
    block.  The im2col matrix is built in chunks of at most 64 Mi elements; one chunk is
    the two-pass computation in the input dtype, several are merged pairwise in float64.
    """
    t = _as_float(x, "x")
    imgs = _as_images(t, "x")
    _check_nonempty(imgs, "x")
    check_option(grouping, "grouping", GROUPINGS)
    eps = check_nonnegative_float(eps, "eps")
    g = _sampled_geometry(tuple(imgs.shape), kernel_size, stride, padding, dilation, sampling_stride)
    block_size = _check_block(block_size, g.c)
    _check_finite(imgs, "x")
    stats = _patch_stats(imgs, g, block_size, grouping)
    cov, mean = _finish_covariance(stats, eps, t.dtype)
    if block_size is None or grouping == "reference":
        return cov[0], mean[0]
    return cov, mean
