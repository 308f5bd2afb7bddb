"""The torch backend's kernels: nsiter's algorithms on tensors (loaded only for tensors).

The algorithms live once, backend-neutral, in :mod:`nsiter.newton_schulz`,
:mod:`nsiter.covariance`, :mod:`nsiter.whitening` ...; this package holds only what torch
does natively and the settings of the CUDA paths:

* :mod:`nsiter._torch.linalg`: the device-side input measures, the ``cholesky_ex``
  spectrum probe, ``eigh``, CUDA-graph capture of the fixed-count iteration;
* :mod:`nsiter._torch.patches`: ``unfold``/``fold`` im2col and col2im, the chunked patch
  statistics.

On CUDA every matrix product nsiter issues runs with TF32 *off* (it costs three decimal
digits, which the Newton–Schulz residuals cannot afford) unless :func:`set_allow_tf32`
opts in; the caller's global flags are restored afterwards.

**The device path** (no host synchronisation per step; CUDA graphs where eligible) runs for
CUDA tensors.  ``_SETTINGS["force_device_path"] = True`` sends CPU tensors down it as well,
so that every branch except the graph capture itself and the ``torch.cuda`` queries runs in
the CPU test suite.
"""
from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager

import torch

__all__ = ["set_allow_tf32", "allow_tf32", "set_cuda_graphs", "matmul_precision", "device_path"]

_SETTINGS = {"allow_tf32": False, "cuda_graphs": True, "force_device_path": False}
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
    """Replay small fixed-count Newton–Schulz problems on CUDA from captured graphs
    (default ``True``); returns the old value."""
    old = _SETTINGS["cuda_graphs"]
    _SETTINGS["cuda_graphs"] = bool(enabled)
    return old


def device_path(like: torch.Tensor) -> bool:
    """True for CUDA tensors, and for CPU tensors when the device path is forced (tests)."""
    return like.device.type == "cuda" or _SETTINGS["force_device_path"]


@contextmanager
def matmul_precision(device: torch.device):
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
    mm = torch.backends.cuda.matmul
    new_api = hasattr(mm, "fp32_precision")  # torch >= 2.9
    mkl = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    with warnings.catch_warnings():  # the legacy API warns about its deprecation
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
        mm.allow_tf32 = _SETTINGS["allow_tf32"]
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
