"""Package-wide configuration: the one jit decorator every Numba kernel uses.

All kernels are compiled with ``cache=True`` (a second process loads machine code
from ``__pycache__`` instead of recompiling) and without ``fastmath``: nsiter checks
finiteness and reports divergence, so the ``nnan``/``ninf`` assumptions of fastmath
would be wrong.  ``error_model="numpy"`` lets division follow IEEE rules instead of
raising, which keeps inner loops free of Python-style zero checks.
"""
from __future__ import annotations

import numba

__all__ = ["jit", "prange"]

prange = numba.prange

_JIT_OPTIONS = dict(nopython=True, cache=True, nogil=True, fastmath=False, error_model="numpy")


def jit(func=None, *, parallel: bool = False):
    """Compile ``func`` with nsiter's Numba options (``cache=True``, no fastmath).

    Use as ``@jit`` or ``@jit(parallel=True)``.  ``parallel=True`` kernels use
    ``prange`` only over disjoint output slices; reductions are done with
    per-thread partials merged serially.
    """
    def wrap(f):
        return numba.jit(**_JIT_OPTIONS, parallel=parallel)(f)

    if func is None:
        return wrap
    return wrap(func)
