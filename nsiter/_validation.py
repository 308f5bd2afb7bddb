"""Input validation shared by every public function.

Each checker raises ``TypeError``/``ValueError`` whose message says what was
expected, what arrived, and how to fix it.  Public functions call these first,
then handle degenerate cases, then dispatch to one kernel; kernels never validate.
"""
from __future__ import annotations

import math
import numbers
import sys
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "is_tensor",
    "result_float_dtype",
    "as_float_array",
    "check_finite",
    "check_ndim",
    "check_nonempty",
    "as_pair",
    "as_shape",
    "check_option",
    "check_positive_int",
    "check_positive_float",
    "check_nonnegative_float",
    "check_square",
    "check_symmetric",
]


def is_tensor(*objs) -> bool:
    """True when any of ``objs`` is a ``torch.Tensor``, without importing torch.

    A tensor can only exist if the caller imported torch already, so looking in
    ``sys.modules`` first costs nothing for numpy users (the array-api-compat pattern).
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    return any(isinstance(o, torch.Tensor) for o in objs)


def _shape(arr) -> tuple:
    return tuple(int(s) for s in arr.shape)


def result_float_dtype(dtype) -> np.dtype:
    """The floating dtype nsiter computes in for input ``dtype``.

    float32/float64 are kept, float16 promotes to float32, bool/integers promote
    to float64.  Complex and non-numeric dtypes raise ``TypeError``.
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        raise TypeError(
            f"expected a real floating, integer or bool array, got complex dtype {dtype}; "
            "pass the real part (x.real) or the magnitude (abs(x)) explicitly"
        )
    if dtype.kind == "f":
        if dtype.itemsize <= 2:
            return np.dtype(np.float32)
        if dtype.itemsize == 4:
            return np.dtype(np.float32)
        return np.dtype(np.float64)
    if dtype.kind in "biu":
        return np.dtype(np.float64)
    raise TypeError(
        f"expected a real numeric array, got dtype {dtype!r}; convert it with np.asarray(x, dtype=float)"
    )


def as_float_array(x, name: str = "x", *, dtype=None) -> np.ndarray:
    """Return ``x`` as a float32/float64 ndarray without modifying the caller's data.

    The dtype follows :func:`result_float_dtype` unless ``dtype`` forces one.
    No copy is made when ``x`` already has the right dtype (callers never write
    into the result).  As in scipy, an ``np.matrix`` (or other ndarray subclass) is read as a
    plain ndarray, and a masked array is refused: its mask would be ignored.  A ``torch.Tensor``
    stays a tensor on its device, with the same dtype rules (bfloat16 and float16 -> float32);
    sparse, quantized and meta tensors are refused, naming the conversion.
    """
    if is_tensor(x):
        return _as_float_tensor(x, dtype, name)
    ma = sys.modules.get("numpy.ma")
    if ma is not None and isinstance(x, ma.MaskedArray):
        raise TypeError(f"expected a plain array for {name}, got a masked array, whose mask nsiter would ignore; "
                        f"fill the masked entries ({name}.filled(value)) or drop them ({name}.compressed(), "
                        "or select the unmasked samples) first")
    if type(x) is np.ndarray:
        arr = x
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"expected an array-like for {name}, got {type(x).__name__}: {exc}") from None
    if arr.dtype == object:
        raise TypeError(
            f"expected a numeric array for {name}, got an object array (ragged nesting or mixed types?); "
            "build it with np.asarray(..., dtype=float)"
        )
    target = result_float_dtype(arr.dtype) if dtype is None else result_float_dtype(dtype)
    if arr.dtype != target:
        arr = arr.astype(target)
    return arr


def _as_float_tensor(t, dtype=None, name: str = "x"):
    """The tensor rule of :func:`as_float_array` (``dtype``: a numpy dtype forcing the result)."""
    torch = sys.modules["torch"]
    if t.layout != torch.strided:
        raise TypeError(f"expected a dense (strided) tensor for {name}, got layout {t.layout}; "
                        f"convert it with {name}.to_dense()")
    if t.is_quantized:
        raise TypeError(f"expected a real-valued tensor for {name}, got a quantized tensor ({t.dtype}); "
                        f"convert it with {name}.dequantize()")
    if t.is_meta:
        raise TypeError(f"expected a tensor holding data for {name}, got a meta tensor (a shape without values); "
                        "create or load it on a real device (e.g. device='cpu')")
    if dtype is not None:
        target = torch.float32 if result_float_dtype(dtype) == np.float32 else torch.float64
    elif t.dtype.is_complex:
        raise TypeError(
            f"expected a real floating, integer or bool tensor, got complex dtype {t.dtype}; "
            "pass the real part (x.real) or the magnitude (x.abs()) explicitly"
        )
    elif t.dtype in (torch.float32, torch.float64):
        return t
    else:
        target = torch.float32 if t.dtype.is_floating_point else torch.float64
    return t if t.dtype == target else t.to(target)


def check_finite(arr, name: str = "x") -> None:
    """Raise ``ValueError`` when ``arr`` (ndarray or tensor) holds NaN or infinity."""
    if is_tensor(arr):
        finite = sys.modules["torch"].isfinite(arr.detach())
        n_bad = int(arr.numel() - int(finite.sum()))
    else:
        n_bad = 0 if np.isfinite(arr).all() else int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
    if n_bad:
        raise ValueError(
            f"expected finite values in {name}, found {n_bad} NaN/inf entries; "
            f"clean the data first (e.g. np.nan_to_num or drop the affected samples)"
        )


def check_ndim(arr, name: str, allowed: Iterable[int], meaning: str = "") -> None:
    allowed = tuple(allowed)
    if arr.ndim not in allowed:
        want = " or ".join(str(a) for a in allowed)
        extra = f" ({meaning})" if meaning else ""
        raise ValueError(f"expected {name} with ndim {want}{extra}, got ndim {arr.ndim} with shape {_shape(arr)}")


def check_nonempty(arr, name: str = "x") -> None:
    if math.prod(arr.shape) == 0:
        raise ValueError(f"expected a non-empty {name}, got shape {_shape(arr)} with no elements")


def _is_int(v) -> bool:
    if type(v) is int:  # the common case, without the ABC check
        return True
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def as_pair(value, name: str, *, minimum: int) -> tuple[int, int]:
    """Parse an int or an (h, w) pair of ints, each ``>= minimum``."""
    if _is_int(value):
        pair = (int(value), int(value))
    elif (isinstance(value, (Sequence, np.ndarray)) and np.ndim(value) == 1 and len(value) == 2
          and all(_is_int(v) for v in value)):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"expected {name} as an int or an (h, w) pair of ints, got {value!r}")
    if pair[0] < minimum or pair[1] < minimum:
        rel = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"expected {rel} {name}, got {value!r}; use values >= {minimum}")
    return pair


def as_shape(value, name: str) -> tuple[int, ...]:
    """Parse a shape argument: a sequence of non-negative ints (numpy integers, ``torch.Size``)."""
    seq = isinstance(value, Sequence) and not isinstance(value, str)
    if not (seq or isinstance(value, np.ndarray) and value.ndim == 1) or not all(_is_int(v) for v in value):
        raise TypeError(f"expected {name} as a tuple of ints, got {value!r}")
    shape = tuple(int(v) for v in value)
    if min(shape, default=0) < 0:
        raise ValueError(f"expected non-negative sizes in {name}, got {shape}")
    return shape


def check_option(value, name: str, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else list the valid ones."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(repr(c) for c in choices)}")
    return value


def check_positive_int(value, name: str, *, minimum: int = 1) -> int:
    if not _is_int(value):
        raise TypeError(f"expected an integer {name}, got {value!r} of type {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"expected {name} >= {minimum}, got {value}")
    return int(value)


def check_positive_float(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"expected a real number for {name}, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"expected a finite {name} > 0, got {value!r}")
    return v


def check_nonnegative_float(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"expected a real number for {name}, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"expected a finite {name} >= 0, got {value!r}")
    return v


def check_square(arr, name: str = "A") -> None:
    """Require ``arr`` of shape ``(..., n, n)`` with ``n >= 1``."""
    if arr.ndim < 2:
        raise ValueError(f"expected {name} of shape (..., n, n), got ndim {arr.ndim} with shape {_shape(arr)}")
    if arr.shape[-1] != arr.shape[-2]:
        raise ValueError(
            f"expected square matrices in {name} (shape (..., n, n)), got shape {_shape(arr)}; "
            "for a samples x features data matrix form its covariance first (nsiter.covariance)"
        )
    check_nonempty(arr, name)


def check_symmetric(arr: np.ndarray, name: str = "A", *, rtol: float | None = None) -> None:
    """Require ``arr`` symmetric up to ``rtol * max|arr|`` (default: 100 units in the last place)."""
    if rtol is None:
        rtol = 100 * np.finfo(arr.dtype).eps
    scale = np.max(np.abs(arr), axis=(-2, -1), keepdims=True)
    asym = np.max(np.abs(arr - np.swapaxes(arr, -1, -2)), axis=(-2, -1), keepdims=True)
    bad = asym > rtol * np.where(scale > 0, scale, 1.0)
    if np.any(bad):
        worst = float(np.max(asym / np.where(scale > 0, scale, 1.0)))
        raise ValueError(
            f"expected symmetric matrices in {name}, got relative asymmetry {worst:.3g} "
            f"(allowed {rtol:.3g}); symmetrise with (A + A.swapaxes(-1, -2)) / 2 if it is rounding"
        )
