"""Package-wide configuration of Numba: the one jit decorator every kernel uses, and the threading layer.

Compilation
-----------
All kernels are compiled with ``cache=True`` (a second process loads machine code
from ``__pycache__`` instead of recompiling) and without ``fastmath``: nsiter checks
finiteness and reports divergence, so the ``nnan``/``ninf`` assumptions of fastmath
would be wrong.  ``error_model="numpy"`` lets division follow IEEE rules instead of
raising, which keeps inner loops free of Python-style zero checks.

Threading layer
---------------
Numba picks the layer that runs ``prange`` loops when the first parallel kernel runs, and by
default it takes GNU OpenMP on Linux, which is not fork-safe: a ``multiprocessing`` fork pool
or a torch ``DataLoader(num_workers > 0)`` whose workers call nsiter then dies with "fork()
called from a process already using GNU OpenMP".  ``workqueue`` is fork-safe but not
thread-safe (two Python threads in parallel kernels abort the process).  So, when this module
is imported, which happens before any kernel is defined (every kernel module imports it first;
``import nsiter`` imports no Numba, and imports this module only when Numba is imported already,
so that a user's own parallel kernels run under nsiter's choice too):

1. TBB (fork- and thread-safe) is made loadable: the ``tbb`` wheel, a dependency of nsiter
   where wheels exist, puts ``libtbb`` in ``sys.prefix/lib``, where the dynamic loader does
   not look, so Numba's ``tbbpool`` cannot import.  The library is located from the files
   the ``tbb`` distribution recorded (:mod:`importlib.metadata`, no guessed paths; else the
   loader's own search, e.g. a conda or system TBB), preloaded with ``RTLD_GLOBAL``, its
   interface version checked against Numba's minimum, and ``tbbpool`` imported.
2. The layer: a layer the user chose (``NUMBA_THREADING_LAYER`` or
   ``NUMBA_THREADING_LAYER_PRIORITY``, in the environment, ``.numba_config.yaml`` or
   ``numba.config`` before nsiter's kernels load) is kept; else ``"tbb"`` when
   step 1 worked (as fast as OpenMP); else ``"workqueue"``: fork-safe, but with more overhead
   per parallel region on small batched ``inv_sqrtm`` -- fork safety first; a user who never
   forks may set ``NUMBA_THREADING_LAYER=omp`` (measurements: ``analysis/results/threading.md``).  Under workqueue the parallel kernel calls are
   serialised process-wide by :data:`_KERNEL_LOCK`, so concurrent Python threads wait instead
   of aborting.  The lock is held across ``os.fork`` so a child never inherits it locked nor a
   parallel region half-run.  It also serialises user-chosen layers that may turn out to be
   ``workqueue``.  If a parallel Numba kernel ran before this module was imported, the
   layer is fixed already and only reported.

:data:`THREADING` records the decision; ``numba.threading_layer()`` confirms it once a parallel
kernel has run (``tests/test_parallel.py``; speed: ``analysis/results/threading.md``).
"""
from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.metadata
import os
import sys
import threading
from typing import NamedTuple

import numba

__all__ = ["jit", "prange", "THREADING", "ThreadingChoice"]

prange = numba.prange

_JIT_OPTIONS = dict(nopython=True, cache=True, nogil=True, fastmath=False, error_model="numpy")

# the name Numba's tbbpool links against, per platform (as numba.np.ufunc.parallel spells it)
_TBB_LIBRARY = {"linux": "libtbb.so.12", "win32": "tbb12.dll", "darwin": "libtbb.12.dylib"}
_TBB_MIN_INTERFACE = 12060  # TBB 2021.6: the oldest Numba's tbbpool accepts
# layers that are thread-safe when they load at all ("default"/"forksafe" may end up as workqueue)
_THREAD_SAFE_LAYERS = ("tbb", "safe", "threadsafe", "omp")


class ThreadingChoice(NamedTuple):
    """nsiter's threading-layer decision (see the module docstring)."""

    layer: str  #: the ``numba.config.THREADING_LAYER`` in force, or the layer already running
    source: str  #: ``"nsiter"`` (chosen here), ``"user"`` (kept) or ``"running"`` (launched before nsiter)
    tbb: str | None  #: the TBB library made loadable for Numba, or None
    serialised: bool  #: parallel kernel calls hold :data:`_KERNEL_LOCK`


def _tbb_from_distribution(name: str) -> str | None:
    """Path of ``name`` among the files the ``tbb`` distribution installed, or None."""
    try:
        files = importlib.metadata.distribution("tbb").files or ()
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == name:
            path = os.path.abspath(f.locate())
            if os.path.isfile(path):
                return path
    return None


def _load_tbb() -> str | None:
    """Preload TBB for Numba's ``tbbpool``; the library loaded when ``tbbpool`` then imports, else None."""
    name = _TBB_LIBRARY.get(sys.platform)
    if name is None:
        return None
    target = _tbb_from_distribution(name) or name  # the bare name: the loader's own search
    try:
        lib = ctypes.CDLL(target, mode=ctypes.RTLD_GLOBAL)
        version = lib.TBB_runtime_interface_version
        version.restype = ctypes.c_int
        if version() < _TBB_MIN_INTERFACE:
            return None
        importlib.import_module("numba.np.ufunc.tbbpool")
    except (OSError, AttributeError, ImportError):
        return None
    return target


def _choose_threading_layer() -> ThreadingChoice:
    try:
        running = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet: the layer is still ours to choose
        running = None
    if running is not None:
        return ThreadingChoice(running, "running", None, running == "workqueue")
    tbb = _load_tbb()
    requested = str(numba.config.THREADING_LAYER).lower()
    priority = list(numba.config.THREADING_LAYER_PRIORITY)
    if ("NUMBA_THREADING_LAYER" in os.environ or "NUMBA_THREADING_LAYER_PRIORITY" in os.environ
            or requested != "default" or priority != ["tbb", "omp", "workqueue"]):
        layer, source = requested, "user"
    else:
        layer, source = ("tbb" if tbb else "workqueue"), "nsiter"
        numba.config.THREADING_LAYER = layer
    # "forksafe" tries TBB first, "default" the priority list's first entry
    takes_tbb = tbb is not None and (layer == "forksafe" or (layer == "default" and priority[0] == "tbb"))
    return ThreadingChoice(layer, source, tbb, not (layer in _THREAD_SAFE_LAYERS or takes_tbb))


#: The threading-layer decision, made once, when this module is imported.
THREADING = _choose_threading_layer()

#: Held by every parallel kernel call when :attr:`ThreadingChoice.serialised` (and across ``os.fork``).
_KERNEL_LOCK = threading.Lock()

if THREADING.serialised and hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_KERNEL_LOCK.acquire, after_in_parent=_KERNEL_LOCK.release,
                        after_in_child=_KERNEL_LOCK.release)


def _serialised(kernel):
    """``kernel`` called under :data:`_KERNEL_LOCK` (a non-thread-safe threading layer)."""
    @functools.wraps(kernel, updated=())
    def call(*args):
        with _KERNEL_LOCK:
            return kernel(*args)

    return call


def jit(func=None, *, parallel: bool = False):
    """Compile ``func`` with nsiter's Numba options (``cache=True``, no fastmath).

    Use as ``@jit`` or ``@jit(parallel=True)``.  ``parallel=True`` kernels use
    ``prange`` only over disjoint output slices; reductions are done with
    per-thread partials merged serially.  They are called from Python only, never
    from another kernel: under a non-thread-safe threading layer they are wrapped
    to hold :data:`_KERNEL_LOCK`.
    """
    def wrap(f):
        kernel = numba.jit(**_JIT_OPTIONS, parallel=parallel)(f)
        return _serialised(kernel) if parallel and THREADING.serialised else kernel

    if func is None:
        return wrap
    return wrap(func)
