"""The torch backend's Newton–Schulz kernels: device-side input measures, the
``cholesky_ex`` spectrum probe, ``eigh``, and CUDA-graph replay of the fixed-count solve.

The algorithm is :mod:`nsiter.newton_schulz`; these functions return tensors on the input's
device and never synchronise with the host, so that the fixed-count solve can be captured
in a CUDA graph.  Every function here runs on CPU tensors too (the test suite forces the
device path there); only :class:`_CapturedSolve` needs CUDA.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from .._numba import linalg as _numpy_linalg
from . import _LOCK, _SETTINGS, device_path, matmul_precision

__all__ = ["prepare", "probe", "eigh_power", "coupled_kernel", "auto_may_use_eigh", "run_device"]


def prepare(A3: torch.Tensor, eps: float):
    """``(A64, fro, stats)`` as the numpy kernel: ``A64 = ((A + A^T)/2 + eps I) / s`` in float64
    (differentiable; ``s = 4^k`` brings ``max(max|a_ij|, eps)`` into ``[1, 4)``), ``fro =
    ||A64||_F`` (differentiable) and ``stats (nb, 6)`` (detached, on the device) ``= [all
    finite, max|a_ij|, max|a_ij - a_ji|, ||A64||_F, ||A64||_inf, s]``."""
    n = A3.shape[-1]
    with torch.no_grad():
        a = A3.detach().to(torch.float64)
        finite = torch.isfinite(a).flatten(1).all(dim=1)
        amax = a.abs().amax(dim=(-2, -1))
        top = torch.clamp(torch.where(finite, amax, 0.0), min=eps)
        e = torch.frexp(top).exponent
        k2 = torch.div(e - 1, 2, rounding_mode="floor") * 2
        scale = torch.where(top > 0, torch.ldexp(torch.ones_like(top), k2), torch.ones_like(top))
    s3 = scale[:, None, None]
    A64 = A3.to(torch.float64) / s3
    A64 = (A64 * 0.5 + A64.transpose(-1, -2) * 0.5)
    if eps:
        A64 = A64 + (eps / s3) * torch.eye(n, dtype=torch.float64, device=A3.device)
    fro = torch.sqrt((A64 * A64).sum(dim=(-2, -1)))
    with torch.no_grad():
        stats = torch.stack([finite.to(torch.float64), amax, (a - a.transpose(-1, -2)).abs().amax(dim=(-2, -1)),
                             fro.detach(), A64.detach().abs().sum(dim=-1).amax(dim=-1), scale], dim=1)
    return A64, fro, stats


@torch.no_grad()
def probe(A64: torch.Tensor, delta, n_inverse: int, n_power: int):
    """``(ok, lmin, lmax)`` as the numpy kernel.  CPU tensors off the device path use the
    numpy kernel itself (host arrays, the same numbers); otherwise ``cholesky_ex`` of
    ``A + delta I`` and the numpy kernel's inverse/power iterations and start vectors on the
    device (tensors, no host sync; triangular solves are capturable in a CUDA graph)."""
    if not device_path(A64):
        return _numpy_linalg.probe(np.ascontiguousarray(A64.detach().numpy()), np.asarray(delta),
                                   n_inverse, n_power)
    A64 = A64.detach()
    delta = torch.as_tensor(delta, dtype=torch.float64, device=A64.device)
    nb, n, _ = A64.shape
    eye = torch.eye(n, dtype=torch.float64, device=A64.device)
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
    est_min = torch.minimum(torch.where(inv_est > 0, 1.0 / inv_est, min_pivot), min_pivot)
    lmin = torch.where(ok, est_min - delta, torch.full_like(est_min, float("nan")))
    return ok, lmin, lmax


def eigh_power(A64: torch.Tensor, power: float):
    """``(V diag(lambda^power) V^T, lambda)`` from ``torch.linalg.eigh`` (differentiable);
    eigenvalues ``< 0`` (rounding) are clipped to 0."""
    lam, V = torch.linalg.eigh(A64)
    D = torch.matmul(V * (torch.clamp(lam, min=0.0) ** power)[..., None, :], V.transpose(-1, -2))
    return D, lam


def coupled_kernel(n: int):
    """No fused kernel: torch runs the array-code iteration of :mod:`nsiter.newton_schulz`."""
    return None


def auto_may_use_eigh(like: torch.Tensor) -> bool:
    """``auto`` weighs ``eigh`` only on the CPU: a GPU ``eigh`` is far slower than the CPU
    cost model assumes, so on the device path ``auto`` always iterates."""
    return not device_path(like)


# ---- CUDA graphs for small fixed-count problems (the launch-bound regime) -------------
#
# A 27 x 27 coupled iteration is ~3 tiny kernels per step, each a CPU launch when run
# eagerly.  Capturing the device solve once per problem key and replaying it costs one
# launch.  Used only on CUDA, without autograd, for n <= _GRAPH_MAX_N and
# nb * n * n <= _GRAPH_MAX_ELEMS; a problem whose capture fails is remembered and runs eagerly.

_GRAPH_MAX_N = 128
_GRAPH_MAX_ELEMS = 2**20
_GRAPH_CACHE_SIZE = 16
_GRAPHS: "OrderedDict[tuple, object]" = OrderedDict()
_GRAPH_FAILURES: dict = {}  # key -> why its capture failed (read by analysis/bench_gpu.py)


class _CapturedSolve:  # pragma: no cover - needs CUDA
    """``fn`` captured in a CUDA graph with a static input and static outputs."""

    def __init__(self, fn, A3):
        dev = A3.device
        self.static_in = A3.detach().clone()
        with torch.no_grad(), torch.cuda.device(dev), matmul_precision(dev):
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # warm-up: cuBLAS/cuSOLVER handles and workspaces
                for _ in range(2):
                    fn(self.static_in)
            torch.cuda.current_stream(dev).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_out = fn(self.static_in)

    def __call__(self, A3):
        self.static_in.copy_(A3)
        self.graph.replay()
        return tuple(t.clone() for t in self.static_out)


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


def run_device(fn, A3: torch.Tensor, key: tuple):
    """``fn(A3)`` (a tuple of tensors, no host sync inside), replayed from a cached CUDA graph
    where eligible, eagerly otherwise."""
    if not _graph_eligible(A3):
        return fn(A3)
    key = (A3.device.index, A3.dtype, tuple(A3.shape), _SETTINGS["allow_tf32"]) + tuple(key)  # pragma: no cover
    with _LOCK:  # pragma: no cover - needs CUDA
        entry = _GRAPHS.get(key)
        if entry is None:
            try:
                entry = _CapturedSolve(fn, A3)
            except Exception as exc:  # capture unsupported for some kernel: remember, run eagerly
                _GRAPH_FAILURES[key] = repr(exc)
                torch.cuda.synchronize(A3.device)
                entry = False
            _GRAPHS[key] = entry
            while len(_GRAPHS) > _GRAPH_CACHE_SIZE:
                _GRAPHS.popitem(last=False)
        else:
            _GRAPHS.move_to_end(key)
    return entry(A3) if entry else fn(A3)  # pragma: no cover - needs CUDA
