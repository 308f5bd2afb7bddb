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

import importlib
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
    "sqrtm_psd",
    "whiten",
    "deconvolution_kernel",
    "deconvolve_image",
    "fold_deconvolution",
    "estimate_kernel",
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
    new_api = hasattr(mm, "fp32_precision")  # torch >= 2.9
    mkl = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    with warnings.catch_warnings():  # the legacy API warns about its deprecation; the caller's warnings pass
        warnings.simplefilter("ignore")
        if new_api:
            old_cuda = mm.fp32_precision
            old_mkl = getattr(mkl, "fp32_precision", None) if mkl is not None else None
            try:
                old_legacy = torch.get_float32_matmul_precision()
            except RuntimeError:  # the caller mixed the two APIs; the legacy value is "highest" then
                old_legacy = None
        else:
            old_flag = mm.allow_tf32
        mm.allow_tf32 = want
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if new_api:
                torch.set_float32_matmul_precision(old_legacy or "highest")
                mm.fp32_precision = old_cuda
                if old_mkl is not None:
                    mkl.fp32_precision = old_mkl
            else:
                mm.allow_tf32 = old_flag


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
    # reshape may return a view (1x1 kernels): always row-major, never the caller's memory
    if not out.is_contiguous():
        out = out.contiguous()
    if out.untyped_storage().data_ptr() == imgs.untyped_storage().data_ptr():
        out = out.clone()
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
    M2 = (M2 + M2.transpose(1, 2)) * 0.5  # exactly symmetric whatever the GEMM's blocking
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
    _check_ndim(t, "X", (2,), "(n_samples, n_features); for one feature use X[:, None]")
    _check_nonempty(t, "X")
    eps = check_nonnegative_float(eps, "eps")
    _check_finite(t, "X")
    with _matmul_precision(t.device):
        n, mean, M2 = _centred_stats(t[None])
    return _finish_covariance((n, mean[0], M2[0]), eps, t.dtype)


def _check_block(block_size, c: int):
    """Block-size check shared with the numpy backend (``nsiter.covariance._check_block``)."""
    return importlib.import_module("nsiter.covariance")._check_block(block_size, c)


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
    with _matmul_precision(t.device):
        stats = _patch_stats(imgs, g, block_size, grouping)
    cov, mean = _finish_covariance(stats, eps, t.dtype)
    if block_size is None or grouping == "reference":
        return cov[0], mean[0]
    return cov, mean


# --------------------------------------------------------------------------------------
# Newton–Schulz inverse square root (Higham 2008, Eqs. 6.35 and 7.12)
# --------------------------------------------------------------------------------------
#
# The semantics (validation, PSD probe, scaling, schedules, stopping rule, best iterate,
# warnings, info) are those of nsiter.newton_schulz; its pure-Python pieces (registries,
# default tolerance, schedules, the uncoupled tracker, warnings, the info record) are
# imported from there so the two backends cannot drift apart.  The matrix work runs in
# torch on the input's device.

def _ns():
    return importlib.import_module("nsiter.newton_schulz")


def _finfo_eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def _batched_eye(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


def _fro(A: torch.Tensor) -> torch.Tensor:
    return torch.sqrt((A * A).sum(dim=(-2, -1)))


def _np_dtype(dtype: torch.dtype):
    return np.dtype(np.float32) if dtype == torch.float32 else np.dtype(np.float64)


@torch.no_grad()
def _probe_device(A64: torch.Tensor, delta: torch.Tensor, n_inverse: int, n_power: int):
    """Torch twin of ``newton_schulz._probe`` without a host sync: ``(ok, lmin, lmax)``.

    Cholesky of ``A + delta I`` succeeds iff ``ok``; ``n_inverse`` steps of inverse
    iteration with the factor (two triangular solves each: cuBLAS trsm, capturable in a
    CUDA graph), bounded by the smallest pivot, over-estimate ``lambda_min``; ``n_power``
    steps of power iteration under-estimate ``lambda_max`` (0 when ``n_power == 0``) — the
    numpy probe's algorithm and start vectors.
    """
    nb, n, _ = A64.shape
    eye = _batched_eye(n, A64)
    L, info = torch.linalg.cholesky_ex(A64 + delta[:, None, None] * eye)
    ok = info == 0
    idx = torch.arange(n, dtype=torch.float64, device=A64.device)
    lmax = torch.zeros(nb, dtype=torch.float64, device=A64.device)
    if n_power > 0:
        v = torch.sqrt(torch.diagonal(A64, dim1=-2, dim2=-1).abs()) + 1e-3 * torch.cos(1.7 * idx + 0.3)
        for _ in range(n_power):
            nv = torch.linalg.vector_norm(v, dim=-1)
            live = nv > 0
            v = v / torch.where(live, nv, 1.0)[:, None]
            w = torch.matmul(A64, v[..., None])[..., 0]
            lmax = torch.where(live, torch.linalg.vector_norm(w, dim=-1), lmax)
            v = torch.where(live[:, None], w, v)
    Ls = torch.where(ok[:, None, None], L, eye)  # a harmless factor where Cholesky broke down
    piv = torch.diagonal(Ls, dim1=-2, dim2=-1)
    min_pivot = (piv * piv).min(dim=-1).values
    v = (torch.cos(2.3 * idx + 0.7) + 0.25).expand(nb, n)
    inv_est = torch.zeros(nb, dtype=torch.float64, device=A64.device)
    for _ in range(n_inverse):
        v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        w = torch.linalg.solve_triangular(Ls, v[..., None], upper=False)
        v = torch.linalg.solve_triangular(Ls.transpose(-1, -2), w, upper=True)[..., 0]
        inv_est = torch.linalg.vector_norm(v, dim=-1)
    est_min = torch.where(inv_est > 0, 1.0 / inv_est, min_pivot)
    est_min = torch.minimum(est_min, min_pivot)
    lmin = torch.where(ok, est_min - delta, torch.full_like(est_min, float("nan")))
    return ok, lmin, lmax


def _probe(A64: torch.Tensor, delta: torch.Tensor, n_inverse: int, n_power: int):
    """``(lmin, lmax)`` as float64 numpy arrays; raises on indefinite input (one host sync).

    CPU tensors use the numpy backend's (LAPACK + Numba) probe; CUDA tensors the device twin.
    """
    if A64.device.type == "cpu":
        return _ns()._probe(np.ascontiguousarray(A64.detach().numpy()), delta.detach().numpy(),
                            n_inverse, n_power)
    ok, lmin, lmax = _probe_device(A64.detach(), delta.detach(), n_inverse, n_power)
    host = torch.stack([ok.to(torch.float64), lmin, lmax]).cpu().numpy()
    ns._raise_indefinite(host[0] > 0, delta.detach().cpu().numpy(), A64.shape[0])
    return host[1], host[2]


def _scale(A64: torch.Tensor, scaling: str, lmax: torch.Tensor, fro: torch.Tensor) -> torch.Tensor:
    """``c`` of ``Y_0 = A / c`` in float64 (twin of ``newton_schulz._scale``), zeros -> 1; differentiable."""
    if scaling == "fro":
        c = fro
    elif scaling == "trace":
        c = torch.diagonal(A64, dim1=-2, dim2=-1).sum(-1)
    else:
        n = A64.shape[-1]
        c = torch.minimum(torch.maximum(lmax, fro / math.sqrt(n)), fro)
    return torch.where(c > 0, c, torch.ones_like(c))


def _residual64(X: torch.Tensor, Y0_64: torch.Tensor) -> torch.Tensor:
    """``||X X Y_0 - I||_F`` in float64 (``= ||D D A - I||_F`` for ``D = X / sqrt(c)``)."""
    with torch.no_grad():
        X64 = X.detach().to(torch.float64)
        R = torch.matmul(torch.matmul(X64, X64), Y0_64)
        R.diagonal(dim1=-2, dim2=-1).sub_(1.0)
        return _fro(R)


def _fro_minus_identity(M: torch.Tensor) -> torch.Tensor:
    """``||M - I||_F`` accumulated in float64 (the free by-product residual of a coupled step)."""
    with torch.no_grad():
        R = M.detach().to(torch.float64)
        R.diagonal(dim1=-2, dim2=-1).sub_(1.0)
        return _fro(R)


def _coef_tensors(coefs, rows, k, like):
    """Step-``k`` coefficients ``(a, b, c2)`` of matrices ``rows`` as ``(m, 1, 1)`` tensors (working dtype)."""
    ck = torch.as_tensor(np.ascontiguousarray(coefs[rows, k]), dtype=like.dtype, device=like.device)
    return ck[:, 0, None, None], ck[:, 1, None, None], ck[:, 2, None, None]


def _make_T(M, a, b, c2, eye):
    """``T = a I + b M + c2 M^2`` (per-matrix scalars), as the Numba kernel forms it."""
    T = b * M
    if bool((c2 != 0).any()):
        T = c2 * torch.matmul(M, M) + T
    return T + a * eye


def _run_coupled_fixed(Y0, n_iter, want_y, coefs=None):
    """Coupled iteration, fixed count, no residuals: the fast (and CUDA-graph) path.

    Step 0 uses ``Z_0 = I`` (``M = Y_0``, ``Z_1 = T``: two products saved, bit-identical);
    the last step skips ``Y T`` unless the square root is wanted.  ``coefs``: per-matrix
    ``(nb, >= n_iter, 3)`` table of ``(a, b, c2)`` (default: the classic ``(3/2, -1/2, 0)``,
    with ``a I + b Z Y`` fused into one ``baddbmm``).  Products: ``1 + 3 (n_iter - 2) + 2``.
    """
    nb, n, _ = Y0.shape
    eye = _batched_eye(n, Y0)
    rows = np.arange(nb)
    Y, Z = Y0, None
    for k in range(n_iter):
        first = k == 0
        if coefs is None:
            if first:
                T = -0.5 * Y + 1.5 * eye
            else:
                T = torch.baddbmm(1.5 * eye, Z, Y, beta=1.0, alpha=-0.5)
        else:
            a, b, c2 = _coef_tensors(coefs, rows, k, Y0)
            T = _make_T(Y if first else torch.matmul(Z, Y), a, b, c2, eye)
        if want_y or k < n_iter - 1:
            Y = torch.matmul(Y, T)
        Z = T if first else torch.matmul(T, Z)
    return Z, Y


def _run_coupled(Y0, Y0_64, coefs, n_max, *, tol, record, stop_early, k_last=None):
    """Torch twin of the fused Numba coupled kernel (``_coupled_ns_one``), batched.

    The same per-matrix state machine (see ``nsiter._numba._newton_schulz``): with
    ``stop_early`` the free by-product ``rho_k = ||Z_k Y_k - I||_F`` gates divergence,
    tolerance and stagnation until the float64 metric ``r_k = ||Z_k Z_k Y_0 - I||_F``
    disagrees; ``k_last`` (predicted last iterate) forms ``Z`` first and stops without
    ``Y`` when ``r_k <= tol``; ``record`` stores every ``r_k`` and keeps the best iterate by
    ``r_k``.  A divergence seen in the by-product keeps no copy (the caller reruns the
    matrix with ``record``).  Active matrices are iterated as a sub-batch; one host sync
    per step.  Returns ``(Z, Y, n_done, returned_iter, diverged, returned_r, hist)`` like
    the numpy runner.
    """
    nb, n, _ = Y0.shape
    dev = Y0.device
    eye = _batched_eye(n, Y0)
    tol = float(tol or 0.0)
    big = 10.0 * math.sqrt(n)
    k_last = np.zeros(nb, dtype=np.int64) if k_last is None else np.asarray(k_last, dtype=np.int64)
    Y = Y0
    Z = eye.expand(nb, n, n)
    Zb, Yb = Z, Y
    hist = np.full((nb, n_max if record else 1), np.nan)
    use_metric = np.zeros(nb, dtype=bool)  # decisions on r_k instead of rho_k
    best = np.full(nb, np.inf)  # best by-product rho_k
    best_m = np.full(nb, np.inf)  # best r_k seen (record / metric mode); its iterate in Zb, Yb
    best_mk = np.zeros(nb, dtype=np.int64)
    best_r = np.full(nb, np.nan)
    prev = np.full(nb, np.inf)
    best_k = np.zeros(nb, dtype=np.int64)
    diverged = np.zeros(nb, dtype=bool)
    done = np.zeros(nb, dtype=np.int64)
    restore = np.zeros(nb, dtype=bool)
    stopped = np.zeros(nb, dtype=bool)
    r_last = np.full(nb, np.nan)
    active = np.ones(nb, dtype=bool)

    def T_(a):
        return torch.as_tensor(a, device=dev)

    def keep_best(sel, Zs, Ys, pos):
        nonlocal Zb, Yb
        if sel.size:
            src = T_(pos)
            Zb = Zb.index_copy(0, T_(sel), Zs.index_select(0, src))
            Yb = Yb.index_copy(0, T_(sel), Ys.index_select(0, src))

    def subset(keep, *ts):
        kt = T_(keep)
        return tuple(t.index_select(0, kt) for t in ts)

    def put(full, part, sel):
        return part if sel.size == nb else full.index_copy(0, T_(sel), part)

    for k in range(n_max):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        Ya, Za = (Y, Z) if idx.size == nb else subset(idx, Y, Z)
        M = Ya if k == 0 else torch.matmul(Za, Ya)
        if stop_early and k >= 1:
            loc = np.flatnonzero(~use_metric[idx])
            if loc.size:
                g = idx[loc]
                rho = _fro_minus_identity(M.index_select(0, T_(loc))).cpu().numpy()
                div = ~np.isfinite(rho) | (rho > 1e3 * best[g]) | (rho > big)
                gd = g[div]
                diverged[gd] = True
                restore[gd] = bool(record)
                best_k[gd] = k
                active[gd] = False
                ok = ~div
                imp = ok & (rho < best[g])
                best[g[imp]] = rho[imp]
                stag = ok & (rho < 0.5) & (rho > 0.75 * prev[g])
                prev[g[ok]] = rho[ok]
                cand = ok & ((rho <= tol) | stag)
                if cand.any():
                    cl, gc = loc[cand], g[cand]
                    if not record:
                        r_last[gc] = _residual64(Za.index_select(0, T_(cl)),
                                                 Y0_64.index_select(0, T_(gc))).cpu().numpy()
                    r = r_last[gc]
                    fin = (r <= tol) | stag[cand]
                    best_r[gc[fin]] = r[fin]
                    best_k[gc[fin]] = k
                    stopped[gc[fin]] = True
                    active[gc[fin]] = False
                    sw, rs = gc[~fin], r[~fin]
                    use_metric[sw] = True
                    prev[sw] = best_m[sw] = rs
                    best_mk[sw] = k
                    keep_best(sw, Za, Ya, cl[~fin])
                keep = np.flatnonzero(active[idx])
                if keep.size < idx.size:  # matrices that stopped before this step
                    if keep.size == 0:
                        continue
                    idx = idx[keep]
                    Ya, Za, M = subset(keep, Ya, Za, M)
        a, b, c2 = _coef_tensors(coefs, idx, k, Y0)
        T = _make_T(M, a, b, c2, eye)
        Za = T if k == 0 else torch.matmul(T, Za)
        done[idx] = k + 1
        need = record | use_metric[idx] | (stop_early & (k_last[idx] == k + 1))
        if need.any():
            loc = np.flatnonzero(need)
            g = idx[loc]
            r_last[g] = _residual64(Za.index_select(0, T_(loc)), Y0_64.index_select(0, T_(g))).cpu().numpy()
            if record:
                hist[g, k] = r_last[g]
            if stop_early:
                acc = (k_last[g] == k + 1) & ~use_metric[g] & (r_last[g] <= tol)
                if acc.any():  # accepted at the predicted step: Z is stored, Y is not formed
                    ga = g[acc]
                    best_r[ga] = r_last[ga]
                    best_k[ga] = k + 1
                    stopped[ga] = True
                    active[ga] = False
                    Z = put(Z, Za, idx)
                    keep = np.flatnonzero(~np.isin(idx, ga))
                    if keep.size == 0:
                        continue
                    idx = idx[keep]
                    Ya, Za, T = subset(keep, Ya, Za, T)
        Ya = torch.matmul(Ya, T)
        Y, Z = put(Y, Ya, idx), put(Z, Za, idx)
        dec = record | use_metric[idx]
        if dec.any():
            loc = np.flatnonzero(dec)
            g = idx[loc]
            r = r_last[g]
            finite = np.isfinite(r)
            imp = finite & (r < best_m[g])
            best_m[g[imp]] = r[imp]
            best_mk[g[imp]] = k + 1
            keep_best(g[imp], Za, Ya, loc[imp])
            um = use_metric[g]
            check = um | (not stop_early)
            diverged[g[check & (~finite | (r > 1e3 * best_m[g]) | (r > big))]] = True
            stop = um & (diverged[g] | (r <= tol) | ((r < 0.5) & (r > 0.75 * prev[g])))
            gs = g[stop]
            conv = r[stop] <= tol
            restore[gs[~conv]] = True
            best_k[gs[conv]] = k + 1
            best_r[gs[conv]] = r[stop][conv]
            stopped[gs] = True
            active[gs] = False
            prev[g[um & ~stop]] = r[um & ~stop]
    use_best = restore | (diverged & bool(record) & (not stop_early))
    sel = T_(use_best)[:, None, None]
    Z_out = torch.where(sel, Zb, Z)
    Y_out = torch.where(sel, Yb, Y)
    best_k[use_best] = best_mk[use_best]
    best_r[use_best] = best_m[use_best]
    last = ~use_best & ~stopped & ~diverged
    if last.any():
        best_k[last] = done[last]
        if record:
            best_r[last] = r_last[last]
        elif stop_early:
            lt = T_(np.flatnonzero(last))
            best_r[last] = _residual64(Z.index_select(0, lt), Y0_64.index_select(0, lt)).cpu().numpy()
        else:
            best_r[last] = np.nan
    return Z_out, Y_out, done, best_k, diverged, best_r, hist


def _run_uncoupled(Y0, Y0_64, n_max, *, tol, stop_early):
    """Uncoupled iteration (Eq. 7.12) ``X <- (3X - X((X X) Y_0))/2``; residuals always tracked.

    Returns ``(X, tracker, n_run, returned_iter, returned_r)`` like the numpy runner: the
    best iterate after a blow-up, else the one each matrix stopped at.
    """
    ns = _ns()
    nb, n, _ = Y0.shape
    dev = Y0.device
    X = _batched_eye(n, Y0).expand(nb, n, n)
    Xb = X
    tracker = ns._Tracker(nb, n, n_max, tol, stop_early)
    n_run = 0
    for k in range(n_max):
        idx = np.flatnonzero(tracker.active)
        if idx.size == 0:
            break
        full = idx.size == nb
        it = None if full else torch.as_tensor(idx, device=dev)
        Xa = X if full else X[it]
        Y0a = Y0 if full else Y0[it]
        Q = torch.matmul(torch.matmul(Xa, Xa), Y0a)
        Xa = (3.0 * Xa - torch.matmul(Xa, Q)) * 0.5
        X = Xa if full else X.index_copy(0, it, Xa)
        r = _residual64(Xa, Y0_64 if full else Y0_64[it]).cpu().numpy()
        imp = tracker.update(k + 1, idx, r)
        if imp.any():
            sel = torch.as_tensor(idx[imp], device=dev)
            src = torch.as_tensor(np.flatnonzero(imp), device=dev)
            Xb = Xb.index_copy(0, sel, Xa.index_select(0, src))
        n_run = k + 1
    div = tracker.diverged
    last = np.minimum(tracker.stop_iter, n_run)
    X_out = torch.where(torch.as_tensor(div, device=dev)[:, None, None], Xb, X)
    ret_iter = np.where(div, tracker.best_iter, last)
    ret_r = np.where(div, tracker.best, tracker.hist[np.arange(nb), np.maximum(last, 1) - 1])
    return X_out, tracker, n_run, ret_iter, ret_r


def _validate_ns(A, method, n_iter, tol, scaling, eps, return_info):
    ns = _ns()
    method = check_option(method, "method", ns.METHODS)
    scaling = check_option(scaling, "scaling", ns.SCALINGS)
    if n_iter is not None:
        n_iter = check_positive_int(n_iter, "n_iter")
    if tol is not None:
        tol = check_positive_float(tol, "tol")
    eps = check_nonnegative_float(eps, "eps")
    if not isinstance(return_info, (bool, np.bool_)):
        raise TypeError(f"expected return_info as a bool, got {return_info!r}")
    t = _as_float(A, "A")
    if t.ndim < 2:
        raise ValueError(
            f"expected A of shape (..., n, n), got ndim {t.ndim} with shape {tuple(t.shape)}; "
            "pass a square matrix (a scalar a is the 1x1 matrix [[a]])"
        )
    if t.shape[-1] != t.shape[-2]:
        raise ValueError(
            f"expected square matrices in A (shape (..., n, n)), got shape {tuple(t.shape)}; "
            "for a samples x features data matrix form its covariance first (nsiter.covariance)"
        )
    if t.shape[-1] == 0:
        raise ValueError(f"expected A with n >= 1 (shape (..., n, n)), got shape {tuple(t.shape)}")
    return t, method, n_iter, tol, scaling, eps, bool(return_info)


@torch.no_grad()
def _input_flags(A3: torch.Tensor):
    """Device-side finiteness and symmetry measures of ``A3 (nb, n, n)`` (no sync)."""
    n_bad = (~torch.isfinite(A3)).sum()
    scale = A3.abs().amax(dim=(-2, -1))
    asym = (A3 - A3.transpose(-1, -2)).abs().amax(dim=(-2, -1))
    rel = asym / torch.where(scale > 0, scale, torch.ones_like(scale))
    return n_bad, rel


def _raise_input(n_bad: int, rel: np.ndarray, dtype: torch.dtype):
    """The numpy ``check_finite`` / ``check_symmetric`` errors."""
    if n_bad:
        raise ValueError(
            f"expected finite values in A, found {n_bad} NaN/inf entries; "
            "clean the data first (e.g. torch.nan_to_num or drop the affected samples)"
        )
    rtol = 100 * _finfo_eps(dtype)
    if rel.size and np.any(rel > rtol):
        raise ValueError(
            f"expected symmetric matrices in A, got relative asymmetry {float(rel.max()):.3g} "
            f"(allowed {rtol:.3g}); symmetrise with (A + A.transpose(-1, -2)) / 2 if it is rounding"
        )


def _eigh_power(A64: torch.Tensor, dtype: torch.dtype, delta: np.ndarray, eps: float, power: float):
    """Torch twin of ``newton_schulz._eigh_power``: ``V diag(lambda^power) V^T`` from a float64 ``eigh``."""
    ns = _ns()
    lam, V = torch.linalg.eigh(A64)
    ends = lam.detach()[:, [0, -1]].cpu().numpy()
    lo, hi = ends[:, 0], ends[:, 1]
    ns._check_spectrum(lo, hi, delta, eps, power)
    if power < 0:
        fro = _fro(A64.detach()).cpu().numpy()
        ns._check_singular(lo, fro, ns._singular_tol(fro, A64.shape[-1], _np_dtype(dtype)), eps, len(lo),
                           stacklevel=6)
    lam = torch.clamp(lam, min=0.0)
    D = torch.matmul(V * (lam ** power)[..., None, :], V.transpose(-1, -2))
    return D.to(dtype)


def _eigh_subset(A64, dtype, delta, eps, want, with_residual):
    """``method="eigh"`` on a stack: ``(result, float64 residual of A^{-1/2} or nan)``."""
    out = _eigh_power(A64, dtype, delta, eps, -0.5 if want == "isqrt" else 0.5)
    if not with_residual:
        return out, np.full(A64.shape[0], np.nan)
    Dinv = out if want == "isqrt" else _eigh_power(A64, dtype, delta, eps, -0.5)
    return out, _residual64(Dinv, A64).cpu().numpy()


def _prepare(A3: torch.Tensor, eps: float):
    """``A + eps I`` in float64, symmetrised (the matrix every method works on)."""
    n = A3.shape[-1]
    A64 = A3.to(torch.float64)
    if eps:
        A64 = A64 + eps * _batched_eye(n, A64)
    return (A64 + A64.transpose(-1, -2)) * 0.5


def _delta(fro: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Rounding tolerance of the PSD test, ``10 n eps(dtype) ||A||_F`` (1 for the zero matrix)."""
    f = fro.detach()
    return torch.where(f > 0, (10.0 * n * _finfo_eps(dtype)) * f, torch.ones_like(f))


def _initial(A64: torch.Tensor, c: torch.Tensor, dtype: torch.dtype):
    """``Y_0 = A / c`` in float64 and in the working dtype (the reference divides in the working dtype)."""
    Y0_64 = A64 / c[:, None, None]
    if dtype == torch.float64:
        return Y0_64, Y0_64
    return A64.to(dtype) / c.to(dtype)[:, None, None], Y0_64


def _finish(Z, Y, A64, c, want, dtype):
    sc = torch.sqrt(c)[:, None, None]
    if want == "isqrt":
        return (Z.to(torch.float64) / sc).to(dtype)
    if Y is not None:
        return (Y.to(torch.float64) * sc).to(dtype)
    return (torch.matmul(A64, Z.to(torch.float64)) / sc).to(dtype)


_FLAG_COLUMNS = ("n_bad", "asym", "fro", "ok", "lmin", "lmax", "delta", "out_finite")


def _fixed_core(A3: torch.Tensor, n_iter: int, scaling: str, eps: float, want: str):
    """Validation measures, probe, scaling and ``n_iter`` classic coupled steps, all on the device.

    Returns ``(out, flags)`` with ``flags (nb, 8)`` float64 (columns ``_FLAG_COLUMNS``) so
    that the caller needs ONE host sync to raise or warn.  This is the function captured
    in a CUDA graph for small problems; eagerly it is the fast path on CUDA.
    """
    ns = _ns()
    nb, n, _ = A3.shape
    n_bad, rel = _input_flags(A3)
    A64 = _prepare(A3, eps)
    fro = _fro(A64)
    delta = _delta(fro, n, A3.dtype)
    n_power = ns._PROBE_POWER_STEPS if scaling == "spectral" else 0
    ok, lmin, lmax = _probe_device(A64.detach(), delta, ns._PROBE_INVERSE_STEPS, n_power)
    c = _scale(A64, scaling, lmax, fro)
    Y0, _ = _initial(A64, c, A3.dtype)
    Z, Y = _run_coupled_fixed(Y0, n_iter, want_y=want == "sqrt")
    out = _finish(Z, Y, A64, c, want, A3.dtype)
    with torch.no_grad():
        fin = torch.isfinite(out).all(dim=-1).all(dim=-1)
        flags = torch.stack([n_bad.to(torch.float64).expand(nb), rel.to(torch.float64), fro.detach(),
                             ok.to(torch.float64), lmin, lmax, delta, fin.to(torch.float64)], dim=1)
    return out, flags


def _raise_zero(fro: np.ndarray):
    if np.any(fro == 0):
        raise ValueError(
            "expected a nonzero positive semidefinite matrix, got the zero matrix (all eigenvalues 0) "
            f"at flat batch index {int(np.flatnonzero(fro == 0)[0])}: its inverse square root does not "
            "exist; pass a ridge eps > 0 (A + eps I)"
        )


# ---- CUDA graphs for small fixed-count problems (the launch-bound regime) -------------
#
# A 27 x 27 coupled iteration is ~3 tiny kernels per step; eagerly each costs a CPU
# launch (~5-10 us), so 15 steps are launch-bound.  Capturing _fixed_core once per
# (shape, dtype, n_iter, scaling, eps, want, TF32) and replaying it costs one launch.
# Used only on CUDA, without autograd, when n <= _GRAPH_MAX_N and nb*n*n <= _GRAPH_MAX_ELEMS;
# a problem whose capture fails is remembered and runs eagerly.
# NOTE: written for CUDA and exercised by the gpu-marked tests; not measured on a GPU yet.

_GRAPH_MAX_N = 128
_GRAPH_MAX_ELEMS = 2**20
_GRAPH_CACHE_SIZE = 16
_GRAPHS: "OrderedDict[tuple, object]" = OrderedDict()
_GRAPH_FAILURES: dict = {}  # key -> why its capture failed (inspected by the GPU benchmark)


class _CapturedSolve:
    """A captured :func:`_fixed_core` with its static input and outputs."""

    def __init__(self, A3, n_iter, scaling, eps, want):
        dev = A3.device
        self.static_in = A3.detach().clone()
        fn = lambda: _fixed_core(self.static_in, n_iter, scaling, eps, want)  # noqa: E731
        with torch.no_grad(), torch.cuda.device(dev), _matmul_precision(dev):
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # warm-up: cuBLAS/cuSOLVER handles and workspaces
                for _ in range(2):
                    fn()
            torch.cuda.current_stream(dev).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_out, self.static_flags = fn()

    def __call__(self, A3):
        self.static_in.copy_(A3)
        self.graph.replay()
        return self.static_out.clone(), self.static_flags.clone()


def _graph_eligible(A3: torch.Tensor) -> bool:
    nb, n, _ = A3.shape
    return (
        _SETTINGS["cuda_graphs"]
        and A3.device.type == "cuda"
        and not (torch.is_grad_enabled() and A3.requires_grad)
        and n <= _GRAPH_MAX_N
        and nb * n * n <= _GRAPH_MAX_ELEMS
        and not torch.cuda.is_current_stream_capturing()
    )


def _fixed_solve(A3, n_iter, scaling, eps, want):
    """``_fixed_core`` through a cached CUDA graph where eligible, eagerly otherwise."""
    if _graph_eligible(A3):
        key = (A3.device.index, A3.dtype, tuple(A3.shape), n_iter, scaling, float(eps), want,
               _SETTINGS["allow_tf32"])
        with _LOCK:
            entry = _GRAPHS.get(key)
            if entry is None:
                try:
                    entry = _CapturedSolve(A3, n_iter, scaling, eps, want)
                except Exception as exc:  # capture unsupported for some kernel: remember, run eagerly
                    _GRAPH_FAILURES[key] = repr(exc)
                    try:
                        torch.cuda.synchronize(A3.device)
                    except Exception:  # pragma: no cover - the eager run below reports real errors
                        pass
                    entry = False
                _GRAPHS[key] = entry
                while len(_GRAPHS) > _GRAPH_CACHE_SIZE:
                    _GRAPHS.popitem(last=False)
            else:
                _GRAPHS.move_to_end(key)
            if entry:
                return entry(A3)
    with _matmul_precision(A3.device):
        return _fixed_core(A3, n_iter, scaling, eps, want)


def _solve(A, method, n_iter, tol, scaling, eps, return_info, *, want):
    """Torch twin of ``newton_schulz._solve`` (same steps, same messages, same info)."""
    ns = _ns()
    t, method, n_iter, tol, scaling, eps, return_info = _validate_ns(
        A, method, n_iter, tol, scaling, eps, return_info)
    dtype = t.dtype
    np_dtype = _np_dtype(dtype)
    batch, n = tuple(t.shape[:-2]), t.shape[-1]
    nb = int(np.prod(batch, dtype=np.int64))
    if method == "auto" or (n_iter is None and tol is None):
        tol_used = tol if tol is not None else ns.default_tol(np_dtype, n)
    else:
        tol_used = tol
    stop_early = tol_used is not None
    n_max = n_iter if n_iter is not None else ns.MAX_ITER
    if nb == 0:
        out = t.new_empty(t.shape)
        return (out, ns._empty_info(batch, method, scaling, tol_used)) if return_info else out

    A3 = t.reshape(nb, n, n)
    cuda = t.device.type == "cuda"
    if cuda and method == "coupled" and not (return_info or stop_early):
        # fast path: everything on the device, one host sync for all checks
        out, flags = _fixed_solve(A3, n_max, scaling, eps, want)
        f = flags.cpu().numpy()
        _raise_input(int(f[0, 0]), f[:, 1], dtype)
        if want == "isqrt":
            _raise_zero(f[:, 2])
        ns._raise_indefinite(f[:, 3] > 0, f[:, 6], nb)
        if want == "isqrt":
            ns._check_singular(f[:, 4], f[:, 2], ns._singular_tol(f[:, 2], n, np_dtype), eps, nb)
        if f[:, 7].all():
            return out.reshape(t.shape)
        # the fast path blew up: rerun below with residuals to return the best iterate

    n_bad, rel = _input_flags(A3)
    _raise_input(int(n_bad), rel.cpu().numpy(), dtype)
    with _matmul_precision(t.device):
        A64 = _prepare(A3, eps)
        fro = _fro(A64)
        fro_np = fro.detach().cpu().numpy()
        if want == "isqrt":
            _raise_zero(fro_np)
        delta_t = _delta(fro, n, dtype)
        delta = delta_t.cpu().numpy()

        # on the CPU, auto follows the numpy backend's cost model (a GPU eigh costs far more)
        eigh_auto = (method == "auto" and not cuda
                     and ns._eigh_without_probe(float(tol_used), n, n_max, np.dtype(np_dtype)))
        if eigh_auto:
            try:  # a singular matrix (eigh raises) takes the probe's path to the iteration below
                out, r = _eigh_subset(A64, dtype, delta, eps, want, return_info)
            except ns._SingularError:
                eigh_auto = False
        elif method == "eigh":
            out, r = _eigh_subset(A64, dtype, delta, eps, want, return_info)
        if method == "eigh" or eigh_auto:
            if not return_info:
                return out.reshape(t.shape)
            finite = np.isfinite(r)
            return out.reshape(t.shape), ns.NewtonSchulzInfo(
                residuals=r.reshape(batch + (1,)), n_iter=1,
                converged=(finite if tol is None else finite & (r <= tol)).reshape(batch),
                diverged=(~finite).reshape(batch), best_iter=np.ones(batch, dtype=np.int64),
                scale=np.ones(batch), method="auto:eigh" if eigh_auto else "eigh", scaling=scaling,
                tol=tol_used,
            )

        scheduled = method in ("accelerated", "auto")
        lmin, lmax = _probe(A64, delta_t, ns._PROBE_INVERSE_STEPS_SCHEDULE if scheduled else ns._PROBE_INVERSE_STEPS,
                            ns._PROBE_POWER_STEPS if scaling == "spectral" else 0)
        # auto sends a numerically singular matrix to the iteration, never to eigh (which raises)
        singular = np.zeros(nb, dtype=bool)
        if want == "isqrt":
            sing_tol = ns._singular_tol(fro_np, n, np_dtype)
            ns._check_singular(lmin, fro_np, sing_tol, eps, nb)
            singular = lmin <= sing_tol
        c = _scale(A64, scaling, torch.as_tensor(lmax, device=t.device), fro)
        c_np = c.detach().cpu().numpy()
        coefs = None
        k_last = None
        use_eigh = np.zeros(nb, dtype=bool)
        if scheduled:
            bound = np.minimum(fro_np, A64.detach().abs().sum(dim=-1).amax(dim=-1).cpu().numpy())
            p_hi = np.where(bound > 0, bound / c_np, 1.0)  # (the zero matrix of sqrtm_psd: 1)
            p_lo = np.maximum(lmin, delta / 10.0) / c_np / ns._LMIN_SAFETY / p_hi
            coefs, K = ns._accelerated_schedule(p_lo, tol_used if tol_used else ns.default_tol(np_dtype, n),
                                                n, n_max)
            h = np.sqrt(p_hi)
            coefs[:, 0, 0] /= h
            coefs[:, 0, 1] /= h ** 3
            if method == "auto" and not cuda:
                use_eigh = ns._auto_plan(K, n, np_dtype) & ~singular
            if want == "isqrt" and stop_early:
                k_last = K
        label = method
        if method == "auto":
            label = "auto:" + "+".join(m for m, on in (("accelerated", not use_eigh.all()),
                                                       ("eigh", use_eigh.any())) if on)

        Y0, Y0_64 = _initial(A64, c, dtype)
        ns_idx = np.flatnonzero(~use_eigh)
        eig_idx = np.flatnonzero(use_eigh)
        n_done = np.ones(nb, dtype=np.int64)
        best_iter = np.ones(nb, dtype=np.int64)
        diverged = np.zeros(nb, dtype=bool)
        best_r = np.full(nb, np.nan)
        hist = None
        n_run = 1
        parts = {}
        if eig_idx.size:
            sel = torch.as_tensor(eig_idx, device=t.device)
            # exact to rounding: the residual is evaluated for the history only
            parts["eigh"], best_r[eig_idx] = _eigh_subset(A64.index_select(0, sel), dtype, delta[eig_idx], eps,
                                                          want, return_info)
        if ns_idx.size:
            full = ns_idx.size == nb
            sel = torch.as_tensor(ns_idx, device=t.device)
            Y0s, Y0s_64 = (Y0, Y0_64) if full else (Y0.index_select(0, sel), Y0_64.index_select(0, sel))
            if method == "uncoupled":
                Z, tracker, n_run, b_it, b_r = _run_uncoupled(Y0s, Y0s_64, n_max, tol=tol_used,
                                                              stop_early=stop_early)
                Y = None
                h_ns = tracker.finish(n_run) if return_info else None
                n_d, div = np.minimum(tracker.stop_iter, n_run), tracker.diverged
            else:
                if coefs is None:
                    cf = np.empty((ns_idx.size, n_max, 3))
                    cf[:] = (1.5, -0.5, 0.0)
                else:
                    cf = coefs[ns_idx]
                if not (return_info or stop_early):
                    Z, Y = _run_coupled_fixed(Y0s, n_max, want_y=want == "sqrt",
                                              coefs=None if coefs is None else cf)
                    n_d = np.full(ns_idx.size, n_max, dtype=np.int64)
                    b_it, div, b_r = n_d.copy(), np.zeros(ns_idx.size, dtype=bool), np.full(ns_idx.size, np.nan)
                    h_ns = None
                else:
                    Z, Y, n_d, b_it, div, b_r, h_ns = _run_coupled(
                        Y0s, Y0s_64, cf, n_max, tol=tol_used, record=return_info, stop_early=stop_early,
                        k_last=None if k_last is None else k_last[ns_idx])
                if not return_info:
                    # the cheap paths keep no copies: rerun a blown-up matrix with residuals, over
                    # the iterations it ran, to return its best iterate
                    redo = div | ~torch.isfinite(Z.detach()).all(dim=-1).all(dim=-1).cpu().numpy()
                    if redo.any():
                        j = np.flatnonzero(redo)
                        jt = torch.as_tensor(j, device=t.device)
                        Zr, Yr, _, it_r, _, r_r, _ = _run_coupled(
                            Y0s.index_select(0, jt), Y0s_64.index_select(0, jt), cf[j], max(int(n_d[j].max()), 1),
                            tol=None, record=True, stop_early=False)
                        Z = Z.index_copy(0, jt, Zr)
                        Y = Y.index_copy(0, jt, Yr) if Y is not None else None
                        b_it[j], b_r[j] = it_r, r_r
                        div[j] = True
                n_run = int(n_d.max())
                if return_info:
                    h_ns = ns._freeze_history(h_ns, n_d, n_run)
            A64s = A64 if full else A64.index_select(0, sel)
            cs = c if full else c.index_select(0, sel)
            parts["ns"] = _finish(Z, Y, A64s, cs, want, dtype)
            n_done[ns_idx], best_iter[ns_idx], diverged[ns_idx], best_r[ns_idx] = n_d, b_it, div, b_r
            if return_info:
                hist = np.empty((nb, n_run))
                hist[ns_idx] = h_ns
        if return_info and eig_idx.size:
            if hist is None:
                hist = np.empty((nb, 1))
            hist[eig_idx] = best_r[eig_idx][:, None]
        if len(parts) == 2:
            out = torch.empty((nb, n, n), dtype=dtype, device=t.device)
            out = out.index_copy(0, torch.as_tensor(eig_idx, device=t.device), parts["eigh"])
            out = out.index_copy(0, torch.as_tensor(ns_idx, device=t.device), parts["ns"])
        else:
            out = next(iter(parts.values()))

        ns._warn_diverged(diverged, best_r, best_iter, label, nb)
        ns._warn_tol_missed(tol, diverged, best_r, use_eigh, n_done, np_dtype, stacklevel=5)
    out = out.reshape(t.shape)
    if not return_info:
        return out
    return out, ns._make_info(hist, best_r, best_iter, diverged, use_eigh, c_np, eig_idx.size, batch, label,
                              scaling, tol, tol_used)


def inv_sqrtm(A, *, method="coupled", n_iter=None, tol=None, scaling="fro", eps=0.0, return_info=False):
    """Torch twin of :func:`nsiter.inv_sqrtm`: ``D ~= (A + eps I)^{-1/2}``, autograd through the iterations.

    Same methods, validation, schedules, stopping rule, warnings and
    :class:`~nsiter.newton_schulz.NewtonSchulzInfo` (numpy fields, residuals float64, on the
    host) as the numpy backend.  A fixed ``n_iter`` without ``tol``/``return_info`` runs the
    iteration with no per-step host sync; on CUDA the classic coupled method also runs its
    checks on the device (one sync in all) and small problems without autograd are replayed
    from captured CUDA graphs.  Tolerance mode syncs once per step to apply the stopping
    rule.  ``method="auto"`` on CUDA always runs the accelerated iteration (a GPU ``eigh``
    is far slower than the CPU cost model assumes).
    """
    return _solve(A, method, n_iter, tol, scaling, eps, return_info, want="isqrt")


def sqrtm_psd(A, *, method="coupled", n_iter=None, tol=None, scaling="fro", eps=0.0, return_info=False):
    """Torch twin of :func:`nsiter.sqrtm_psd`: ``S ~= (A + eps I)^{1/2}`` (the ``Y`` sequence)."""
    return _solve(A, method, n_iter, tol, scaling, eps, return_info, want="sqrt")


# --------------------------------------------------------------------------------------
# kernel estimation (a host computation: the solvers are float64 numpy/scipy)
# --------------------------------------------------------------------------------------


def _to_host(t, name: str) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = _as_float(t.detach(), name)
        return t.cpu().numpy()
    return t


def estimate_kernel(x, y, kernel_size, *, method="lstsq", n_iter=None, lr=None, tol=None, eps=0.0,
                    fit_intercept=None, batch_size=None, rng=None, stride=1, padding=0, dilation=1,
                    sqrtm_method="eigh", callback=None):
    """Torch twin of :func:`nsiter.estimate_kernel`: tensors in, the kernel as a tensor out.

    The solvers are float64 host computations whose cost is ``O(F^2)`` per iteration once
    the normal equations are formed, so the tensors are copied to host memory
    (``detach().cpu()``), the numpy solver runs, and ``.kernel`` comes back as a tensor on
    the device of ``x`` (of ``y`` if only ``y`` is a tensor) in the promoted dtype of the
    inputs.  No gradient flows through the estimate.  ``callback`` receives the kernel as a
    float64 CPU tensor and the intercept as a float.
    """
    from . import kernel_estimation as ke

    ref = x if isinstance(x, torch.Tensor) else y
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.device != y.device:
        raise ValueError(f"expected x and y on the same device, got x on {x.device} and y on {y.device}; "
                         "move one of them with .to(device)")
    dtypes = [_result_dtype(t.dtype) if isinstance(t, torch.Tensor) else
              (torch.float32 if np.asarray(t).dtype in (np.float32, np.float16) else torch.float64)
              for t in (x, y)]
    out_dtype = torch.promote_types(*dtypes)
    cb = None
    if callback is not None:
        if not callable(callback):
            raise TypeError(f"expected a callable callback(kernel, intercept), got {type(callback).__name__}")

        def cb(w, b):
            callback(torch.from_numpy(np.asarray(w, dtype=np.float64)), b)

    est = ke.estimate_kernel(
        _to_host(x, "x"), _to_host(y, "y"), kernel_size, method=method, n_iter=n_iter, lr=lr, tol=tol,
        eps=eps, fit_intercept=fit_intercept, batch_size=batch_size, rng=rng, stride=stride,
        padding=padding, dilation=dilation, sqrtm_method=sqrtm_method, callback=cb)
    import dataclasses

    kernel = torch.as_tensor(est.kernel, dtype=out_dtype).to(ref.device)
    return dataclasses.replace(est, kernel=kernel)


# --------------------------------------------------------------------------------------
# whitening helpers (Ye et al. 2020, §4.2, §4.3.2, Fig. 4, §4.5.1)
# --------------------------------------------------------------------------------------
#
# The layouts of D (full (F, F), contiguous (G, Fb, Fb), shared reference (Fb, Fb)) and
# their validation come from nsiter.whitening._Layout, which reads only shapes; the
# arithmetic is torch, differentiable in X, mean, D, weight and bias.


def _wl():
    return importlib.import_module("nsiter.whitening")


def _tensor_like(a, name: str, ref: torch.Tensor) -> torch.Tensor:
    """``a`` as a float tensor on ``ref``'s device (arrays and lists are converted)."""
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    t = _as_float(t, name)
    if t.device != ref.device:
        raise ValueError(f"expected {name} on {ref.device} like the other tensors, got {t.device}; "
                         "move it with .to(device)")
    return t


def _prep_tensors(named, name_ref):
    """Float tensors on one device with finite values; returns them and the common dtype."""
    ref = next(v for _, v in named if isinstance(v, torch.Tensor))
    out = []
    for name, v in named:
        t = _tensor_like(v, name, ref)
        if t.numel():
            _check_finite(t, name)
        out.append(t)
    dtype = out[0].dtype
    for t in out[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return out, dtype


def _full_D(D: torch.Tensor, layout) -> torch.Tensor:
    """The equivalent ``F x F`` matrix: block diagonal (contiguous) or ``kron(D, I_G)`` (reference)."""
    if layout.mode == "full":
        return D
    if layout.mode == "contiguous":
        return torch.block_diag(*D.unbind(0))
    return torch.kron(D, torch.eye(layout.groups, dtype=D.dtype, device=D.device))


def _full_mean(mean: torch.Tensor, layout) -> torch.Tensor:
    if layout.mode == "reference":
        return mean.repeat_interleave(layout.groups)
    return mean.reshape(layout.F)


def whiten(X, mean, D, *, block_size=None, grouping="contiguous"):
    """Torch twin of :func:`nsiter.whiten`: ``(X - mu) D`` block by block (differentiable)."""
    (Xt, mt, Dt), dtype = _prep_tensors((("X", X), ("mean", mean), ("D", D)), "X")
    _check_ndim(Xt, "X", (2,), "(n_samples, n_features), e.g. an im2col matrix")
    _check_nonempty(Xt, "X")
    _check_nonempty(Dt, "D")
    layout = _wl()._Layout(Dt, Xt.shape[1], block_size, grouping)
    m = layout.mean(mt).to(dtype)
    Xc, Dc = Xt.to(dtype), Dt.to(dtype)
    n, F = Xc.shape
    with _matmul_precision(Xc.device):
        if layout.mode == "full":
            return torch.matmul(Xc - m, Dc)
        if layout.mode == "contiguous":
            part = Xc.reshape(n, layout.groups, layout.fb) - m  # (n, G, Fb)
            return torch.matmul(part.transpose(0, 1), Dc).transpose(0, 1).reshape(n, F)
        part = Xc.reshape(n, layout.fb, layout.groups).transpose(1, 2) - m  # (n, G, Fb)
        return torch.matmul(part, Dc).transpose(1, 2).reshape(n, F)


def deconvolution_kernel(D, kernel_size, channels, *, grouping="contiguous"):
    """Torch twin of :func:`nsiter.deconvolution_kernel`: centre-tap columns of ``D`` as ``(C, C, kh, kw)``."""
    Dt = _as_float(D, "D")
    _check_nonempty(Dt, "D")
    _check_finite(Dt, "D")
    channels = check_positive_int(channels, "channels")
    wl = _wl()
    kh, kw, centres = wl._centre_columns(kernel_size, channels)
    layout = wl._Layout(Dt, channels * kh * kw, None, grouping,
                        what=f"im2col of {channels} channels with a {kh}x{kw} kernel")
    cols = _full_D(Dt, layout)[:, torch.as_tensor(centres, device=Dt.device)]  # (F, C)
    return cols.T.reshape(channels, channels, kh, kw)


def deconvolve_image(x, kernel_size, *, eps=1e-5, method="coupled", n_iter=None, sampling_stride=1,
                     block_size=None, grouping="contiguous"):
    """Torch twin of :func:`nsiter.deconvolve_image` (Fig. 4): each pixel replaced by its whitened patch centre.

    ``y = conv2d(x - m, K) + bias`` with ``K`` the deconvolution kernel of
    ``D = inv_sqrtm(Cov, eps=eps)`` (float64), ``x - m`` shifted by per-channel means and
    zero-padded as ``x`` is (the shift cancels in the bias; it only keeps float32 input
    accurate), exactly the numpy recipe; computed in float64 and returned in ``x``'s dtype.
    """
    t = _as_float(x, "x")
    kh, kw = as_pair(kernel_size, "kernel_size", minimum=1)
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(
            f"expected an odd kernel_size for deconvolve_image (its centre tap defines the output pixel), "
            f"got {(kh, kw)}; use {(kh | 1, kw | 1)}"
        )
    imgs = _as_images(t, "x")
    ph, pw = kh // 2, kw // 2
    cov, mean = patch_covariance(imgs, (kh, kw), padding=(ph, pw), sampling_stride=sampling_stride,
                                 block_size=block_size, grouping=grouping)
    D = inv_sqrtm(cov.to(torch.float64), method=method, n_iter=n_iter, eps=eps)
    n, c, h, w = imgs.shape
    wl = _wl()
    layout = wl._Layout(D, c * kh * kw, None, grouping)
    _, _, centres = wl._centre_columns((kh, kw), c)
    cols = _full_D(D, layout)[:, torch.as_tensor(centres, device=D.device)]  # (F, C)
    with torch.no_grad():  # a shift: it cancels between the data and the bias
        h_step, w_step = max(1, h // 64), max(1, w // 64)
        m_c = imgs[:, :, ::h_step, ::w_step].to(torch.float64).mean(dim=(0, 2, 3))
    shift = m_c.repeat_interleave(kh * kw)
    bias = -torch.matmul(_full_mean(mean.to(torch.float64), layout) - shift, cols)  # (C,)
    K = cols.T.reshape(c, c, kh, kw)
    xs = F.pad(imgs.to(torch.float64), (pw, pw, ph, ph)) - m_c[None, :, None, None]
    y = F.conv2d(xs, K, bias)
    return y.to(t.dtype).reshape(t.shape)


def fold_deconvolution(weight, bias, D, mean, *, block_size=None, grouping="contiguous"):
    """Torch twin of :func:`nsiter.fold_deconvolution`: ``W' = D w``, ``b' = b - mu D w`` (differentiable)."""
    named = [("weight", weight), ("D", D), ("mean", mean)] + ([] if bias is None else [("bias", bias)])
    tensors, dtype = _prep_tensors(named, "weight")
    Wt, Dt, mt = tensors[:3]
    _check_ndim(Wt, "weight", (4,), "(C_out, C_in, kh, kw)")
    _check_nonempty(Wt, "weight")
    _check_nonempty(Dt, "D")
    c_out = Wt.shape[0]
    bt = torch.zeros(c_out, dtype=Wt.dtype, device=Wt.device) if bias is None else tensors[3]
    if tuple(bt.shape) != (c_out,):
        raise ValueError(f"expected bias of shape ({c_out},) for weight of shape {tuple(Wt.shape)}, "
                         f"got {tuple(bt.shape)}")
    wl = _wl()
    f_w = int(np.prod(Wt.shape[1:]))
    Wm = Wt.reshape(c_out, f_w).to(dtype)
    Dc = Dt.to(dtype)
    bc = bt.to(dtype)
    grouped = Dt.ndim == 3 and Dt.shape[0] > 1 and Dt.shape[-1] == f_w and grouping == "contiguous"
    with _matmul_precision(Wt.device):
        if grouped:
            G = Dt.shape[0]
            if c_out % G:
                raise ValueError(
                    f"a grouped convolution with {G} groups (weight {tuple(Wt.shape)} against D "
                    f"{tuple(Dt.shape)}) needs C_out divisible by {G}, got {c_out}"
                )
            wl._Layout(Dt, G * f_w, block_size, grouping, what="the layer input")
            if tuple(mt.shape) not in ((G, f_w), (G * f_w,)):
                raise ValueError(f"expected mean of shape ({G}, {f_w}) or ({G * f_w},), got {tuple(mt.shape)}")
            mg = mt.reshape(G, f_w).to(dtype)
            W2 = torch.matmul(Wm.reshape(G, c_out // G, f_w), Dc.transpose(-1, -2))
            b2 = bc - torch.einsum("gof,gf->go", W2, mg).reshape(c_out)
            return W2.reshape(Wt.shape), b2
        layout = wl._Layout(Dt, f_w, block_size, grouping, what=f"weight {tuple(Wt.shape)}")
        mu = _full_mean(layout.mean(mt), layout).to(dtype)
        if layout.mode == "full":
            W2 = Wm @ Dc.T
        elif layout.mode == "contiguous":
            fb = layout.fb
            W2 = torch.matmul(Wm.reshape(c_out, layout.groups, fb).transpose(0, 1), Dc.transpose(-1, -2))
            W2 = W2.transpose(0, 1).reshape(c_out, f_w)
        else:
            Wr = Wm.reshape(c_out, layout.fb, layout.groups)
            W2 = torch.einsum("ef,ofg->oeg", Dc, Wr).reshape(c_out, f_w)
        b2 = bc - W2 @ mu
    return W2.reshape(Wt.shape), b2
