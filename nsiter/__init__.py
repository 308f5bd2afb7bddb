"""nsiter: the numerics of network deconvolution (Ye et al., ICLR 2020).

im2col, patch covariance, Newton–Schulz inverse square roots, whitening and the L2
kernel-estimation solvers, on numpy arrays with Numba kernels; torch tensors are
dispatched to an optional backend.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _version

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

try:
    __version__ = _version("nsiter")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

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


def __getattr__(name):
    """``nsiter.deconvnet`` loads on first use: its Numba kernels stay out of ``import nsiter``."""
    if name == "deconvnet":
        import importlib

        return importlib.import_module("nsiter.deconvnet")
    raise AttributeError(f"module 'nsiter' has no attribute {name!r}")
