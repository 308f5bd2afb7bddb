"""Array backends: the one place where numpy and torch differ.

Every algorithm of nsiter is written once against a :class:`Backend`: ``be.xp`` is the
array-API namespace of the inputs (``array_api_compat``: numpy or torch), and the few
operations the standard does not cover (host transfer, functional row updates, the
matmul-precision context) are methods here.  Kernels that a backend does better natively
live in its kernel package, one module per topic: ``be.linalg`` (Newton–Schulz probe,
eigh, fused iterations) and ``be.patches`` (im2col, col2im, patch moments), from
:mod:`nsiter._numba` for numpy and :mod:`nsiter._torch` for torch.

``import nsiter`` never imports torch: :func:`backend` returns the torch backend only for
tensors (:func:`nsiter._validation.is_tensor` checks ``sys.modules`` first), and imports
:mod:`nsiter._torch` lazily then.  Nor does it import Numba: a kernel module loads on first use
(``be.linalg``, ``be.patches``), and the Numba kernels it defines with it.

Kernel selection of the numpy backend
-------------------------------------
numpy arrays have two kernel sets for the linear algebra (``be.linalg``), one algorithm:

* ``"numba"`` (the default): :mod:`nsiter._numba.linalg`, the fused Numba kernels;
* ``"array"``: :mod:`nsiter._numpy.linalg`, the same kernels written with numpy (LAPACK, BLAS
  ``@``), whose iteration is the array code of :mod:`nsiter.newton_schulz`.  Same decisions,
  results equal up to rounding (``tests/test_startup.py``).

The rule: the one-off check, :func:`nsiter.verify_whitening` (hence ``nsiter verify``), selects
``"array"`` with :func:`numpy_kernels`: it runs each method once on one matrix, where loading
Numba and its cached kernels costs far more than the kernels save (``analysis/results/startup.md``).
Every other call takes ``"numba"``, whatever its size, so that a matrix gets the same bits alone
or in a batch; the choice never depends on what the process has loaded before.
``be.patches`` is :mod:`nsiter._numba.patches` in both sets.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib

import numpy as np

from ._validation import is_tensor

__all__ = ["Backend", "backend", "is_tensor", "numpy_kernels", "NUMPY_KERNELS"]

#: The numpy backend's kernel sets: name -> the module of its ``be.linalg`` (see the module docstring).
NUMPY_KERNELS = {"numba": "nsiter._numba.linalg", "array": "nsiter._numpy.linalg"}
_NUMPY_KERNELS = contextvars.ContextVar("nsiter_numpy_kernels", default="numba")


class Backend:
    """Operations on the arrays of one library (see the module docstring)."""

    def __init__(self, name: str, xp, package: str, linalg: str | None = None, kernels: str = ""):
        self.name = name
        self.xp = xp
        self.torch = name == "torch"
        self._package = package
        self._linalg = linalg or package + ".linalg"
        self.kernels = kernels  #: the kernel set (numpy: a key of :data:`NUMPY_KERNELS`)
        self.base = importlib.import_module(package)

    @functools.cached_property
    def linalg(self):
        """Kernel module of the Newton–Schulz and eigh paths (imported on first use)."""
        return importlib.import_module(self._linalg)

    @functools.cached_property
    def patches(self):
        """Kernel module of im2col, col2im and the patch moments (imported on first use)."""
        return importlib.import_module(self._package + ".patches")

    def __repr__(self) -> str:
        return f"<nsiter backend {self.name!r}" + (f" kernels={self.kernels!r}>" if self.kernels else ">")

    # ------------------------------------------------------------------ transfers
    def host(self, a) -> np.ndarray:
        """``a`` as a numpy array on the host (no copy for numpy input; detached for tensors)."""
        if self.torch and not isinstance(a, np.ndarray):
            return a.detach().cpu().numpy()
        return np.asarray(a)

    def asarray(self, a, like, dtype=None):
        """Host data ``a`` as an array of this backend, on ``like``'s device."""
        if self.torch:
            torch = self.base.torch
            t = a.to(like.device) if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a), device=like.device)
            return t if dtype is None else t.to(dtype)
        return np.asarray(a, dtype=dtype)

    # ------------------------------------------------------------------ functional row updates
    def take(self, a, idx):
        """Rows ``idx`` (sorted, distinct host integers) of ``a`` along axis 0; ``a`` itself
        when ``idx`` holds every row (callers never write into the result)."""
        if len(idx) == a.shape[0]:
            return a
        if self.torch:
            return a.index_select(0, self.asarray(idx, a))
        return a[idx]

    def put(self, full, idx, part):
        """A new array equal to ``full`` with rows ``idx`` replaced by ``part`` (differentiable
        for torch; ``full`` itself is never modified, so it may alias other state)."""
        if len(idx) == full.shape[0]:
            return part
        if self.torch:
            return full.index_copy(0, self.asarray(idx, full), part)
        out = full.copy()
        out[idx] = part
        return out

    def where_rows(self, mask, a, b):
        """Row-wise select: ``a[i]`` where ``mask[i]`` (host bool array) else ``b[i]``."""
        return self.xp.where(self.asarray(mask, a)[:, None, None], a, b)

    def eye(self, n, like, dtype=None):
        """The identity of size ``n`` in ``like``'s dtype (or ``dtype``), on its device."""
        return self.xp.eye(n, dtype=like.dtype if dtype is None else dtype, device=getattr(like, "device", None))

    def fro(self, A):
        """Frobenius norms over the last two axes (in ``A``'s dtype)."""
        return self.xp.sqrt(self.xp.sum(A * A, axis=(-2, -1)))

    def precision(self, like):
        """Context for nsiter's matrix products (torch: TF32 off on CUDA unless opted in)."""
        if self.torch:
            return self.base.matmul_precision(like.device)
        return contextlib.nullcontext()

    def device_path(self, like) -> bool:
        """True where the torch kernels that avoid host syncs run (CUDA; CPU when forced)."""
        return self.torch and self.base.device_path(like)


@functools.lru_cache(maxsize=None)
def _numpy_backend(kernels: str = "numba") -> Backend:
    import array_api_compat.numpy as xp

    return Backend("numpy", xp, "nsiter._numba", NUMPY_KERNELS[kernels], kernels)


@functools.lru_cache(maxsize=None)
def _torch_backend() -> Backend:
    import array_api_compat.torch as xp

    return Backend("torch", xp, "nsiter._torch")


def backend(*arrays) -> Backend:
    """The backend of ``arrays``: torch if any is a tensor, else numpy (with the kernel set of
    :func:`numpy_kernels`)."""
    return _torch_backend() if is_tensor(*arrays) else _numpy_backend(_NUMPY_KERNELS.get())


@contextlib.contextmanager
def numpy_kernels(kernels: str):
    """Within the block, numpy arrays use the kernel set ``kernels`` (a key of
    :data:`NUMPY_KERNELS`) in this thread or task (a :mod:`contextvars` variable); restored after."""
    if kernels not in NUMPY_KERNELS:
        raise ValueError(f"unknown numpy kernel set {kernels!r}; choose from: {', '.join(NUMPY_KERNELS)}")
    token = _NUMPY_KERNELS.set(kernels)
    try:
        yield
    finally:
        _NUMPY_KERNELS.reset(token)
