"""Array-type dispatch: numpy by default, the torch backend only when a tensor arrives.

``import nsiter`` never imports torch.  A tensor can only exist if the caller
imported torch already, so checking ``sys.modules`` first costs nothing for
numpy users (the opt_einsum / array-api-compat pattern).
"""
from __future__ import annotations

import importlib
import sys

__all__ = ["is_tensor", "torch_backend"]


def is_tensor(*objs) -> bool:
    """True when any of ``objs`` is a ``torch.Tensor`` (without importing torch)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    tensor = torch.Tensor
    return any(isinstance(o, tensor) for o in objs)


def torch_backend():
    """The lazily imported torch implementation module (``nsiter._torch_backend``)."""
    return importlib.import_module("nsiter._torch_backend")
