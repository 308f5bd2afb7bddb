"""Sample data: the default test image and an image loader.

The paper's figures use Lenna, which cannot be redistributed; nsiter's default
image is matplotlib's bundled sample photograph ``grace_hopper.jpg``
(600 x 512 RGB), available wherever matplotlib is installed.
"""
from __future__ import annotations

import os

import numpy as np

__all__ = ["sample_image", "load_image", "SAMPLE_IMAGE"]

SAMPLE_IMAGE = "grace_hopper.jpg"


def _to_float(img: np.ndarray, channels_first: bool, gray: bool, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind != "f" or dtype.itemsize < 4:
        raise TypeError(f"expected dtype float32 or float64, got {dtype}")
    if img.dtype == np.uint8:
        out = img.astype(dtype) / dtype.type(255)
    elif img.dtype.kind == "u":
        out = img.astype(dtype) / dtype.type(np.iinfo(img.dtype).max)
    else:
        out = img.astype(dtype, copy=True)
    if out.ndim == 3 and out.shape[-1] == 4:  # drop alpha
        out = out[..., :3]
    if gray:
        if out.ndim == 3:
            # ITU-R BT.601 luma, the weights of PIL's "L" mode
            out = out @ np.array([0.299, 0.587, 0.114], dtype=dtype)
        return np.ascontiguousarray(out)
    if out.ndim == 2:
        out = out[..., None]
    if channels_first:
        out = np.moveaxis(out, -1, 0)
    return np.ascontiguousarray(out)


def load_image(path, *, channels_first: bool = True, gray: bool = False, dtype=np.float64) -> np.ndarray:
    """Read an image file as floats in [0, 1].

    Parameters
    ----------
    path : str or path-like
        Any format matplotlib/Pillow reads (PNG, JPEG, ...).
    channels_first : bool, default True
        Return ``(C, H, W)`` (nsiter's convention) instead of ``(H, W, C)``.
    gray : bool, default False
        Convert to one luma channel (BT.601 weights) and return ``(H, W)``.
    dtype : float32 or float64

    Returns
    -------
    ndarray, ``(C, H, W)``, ``(H, W, C)`` or ``(H, W)``
    """
    import matplotlib.image as mpimg

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file {path!r} does not exist; pass an existing image path")
    try:
        img = mpimg.imread(path)
    except Exception as exc:
        raise ValueError(f"could not read {path!r} as an image ({exc}); pass a PNG/JPEG/TIFF file") from None
    return _to_float(np.asarray(img), channels_first, gray, dtype)


def sample_image(*, channels_first: bool = True, gray: bool = False, dtype=np.float64) -> np.ndarray:
    """matplotlib's bundled ``grace_hopper.jpg`` as floats in [0, 1].

    Returns ``(3, 600, 512)`` by default (channels first, nsiter's convention);
    ``channels_first=False`` gives ``(600, 512, 3)``; ``gray=True`` gives ``(600, 512)``.
    """
    import matplotlib.cbook as cbook

    path = cbook.get_sample_data(SAMPLE_IMAGE, asfileobj=False)
    return load_image(path, channels_first=channels_first, gray=gray, dtype=dtype)
