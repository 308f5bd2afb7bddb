"""nsiter: the numerics of network deconvolution (Ye et al., ICLR 2020).

im2col, patch covariance, Newton–Schulz inverse square roots, whitening and the L2
kernel-estimation solvers, on numpy arrays with Numba kernels; torch tensors are
dispatched to an optional backend.
"""
from __future__ import annotations

import sys as _sys

from . import data
from ._warnings import IllConditionedWarning, NewtonSchulzDivergenceWarning, NsiterWarning
from .conv import (TRANSPOSED_METHODS, conv2d, conv_transpose2d, pixel_shuffle, pixel_unshuffle,
                   subpixel_weight, transposed_weight)
from .covariance import GROUPINGS, PatchStatistics, covariance, patch_covariance
from .dataset import dataset_statistics  # imports Dask only when called (the optional extra nsiter[dask])
from .im2col import col2im, im2col, output_shape
from .kernel_estimation import KernelEstimate, estimate_kernel
from .newton_schulz import NewtonSchulzInfo, inv_sqrtm, sqrtm_psd
from .verification import WhiteningReport, verify_whitening
from .whitening import deconvolution_kernel, deconvolve_image, fold_deconvolution, whiten

# Numba, SciPy, matplotlib, torch and Dask load on first use, and nsiter's Numba kernels with the
# first call that needs them.  A process that imported Numba already gets nsiter's threading-layer
# choice now, before its own parallel kernels can fix the layer (nsiter._config).
if "numba" in _sys.modules:
    from . import _config  # noqa: F401

__all__ = [
    "__version__",
    "data",
    "deconvnet",
    "im2col",
    "col2im",
    "output_shape",
    "covariance",
    "patch_covariance",
    "PatchStatistics",
    "GROUPINGS",
    "dataset_statistics",
    "whiten",
    "deconvolution_kernel",
    "deconvolve_image",
    "fold_deconvolution",
    "estimate_kernel",
    "KernelEstimate",
    "inv_sqrtm",
    "sqrtm_psd",
    "NewtonSchulzInfo",
    "verify_whitening",
    "WhiteningReport",
    "NsiterWarning",
    "NewtonSchulzDivergenceWarning",
    "IllConditionedWarning",
    "conv2d",
    "conv_transpose2d",
    "TRANSPOSED_METHODS",
    "pixel_shuffle",
    "pixel_unshuffle",
    "subpixel_weight",
    "transposed_weight",
]


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nsiter")
    except PackageNotFoundError:  # running from a source tree without installation
        return "0.0.0+unknown"


def __getattr__(name):
    """Loaded on first use, to keep ``import nsiter`` short: ``nsiter.deconvnet`` (its Numba
    kernels) and ``nsiter.__version__`` (:mod:`importlib.metadata` reads the installed metadata)."""
    if name == "deconvnet":
        import importlib

        return importlib.import_module("nsiter.deconvnet")
    if name == "__version__":
        globals()["__version__"] = value = _package_version()
        return value
    raise AttributeError(f"module 'nsiter' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
