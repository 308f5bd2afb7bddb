"""The numpy backend's Newton–Schulz kernels: allocation, serial/parallel choice, BLAS threads.

Thin wrappers around the Numba kernels of :mod:`nsiter._numba._newton_schulz`; the
algorithm that calls them is :mod:`nsiter.newton_schulz` (written once for numpy and
torch).  Each wrapper's choice depends on ``n`` only, so a matrix gets the same bits
alone or in a batch.  Why each size limit is where it is: ``analysis/results/newton_schulz.md``
and ``analysis/results/auto_cost.md`` (``analysis/bench_newton_schulz.py``,
``analysis/calibrate_auto.py``).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numba
import numpy as np

from ._newton_schulz import (
    _LANES64,
    _coupled_ns_parallel,
    _coupled_pipeline_parallel,
    _coupled_pipeline_serial,
    _coupled_ns_serial,
    _coupled_solve_parallel,
    _coupled_solve_serial,
    _eigh_power,
    _eigh_power_serial,
    _prepare,
    _prepare_serial,
    _psd_probe,
    _psd_probe_serial,
    _spectrum_estimates_serial,
)

__all__ = ["prepare", "probe", "eigh_power", "coupled_kernel", "coupled_solver", "coupled_pipeline",
           "auto_may_use_eigh"]

# One matrix per Numba thread for a batch up to this size; above it the batch runs in
# order and the BLAS library's own threads share each product.
PARALLEL_MAX_N = 64
# The pipeline kernel pairs matrices (two probes in lockstep) when the batch has at least this
# many per Numba thread (pairs are the units the threads share).
PAIRED_MIN_PER_THREAD = 4
# ... and runs the probes of 8 matrices (one float64 vector of lanes) at once up to this size,
# where each thread still gets 8 matrices: the whole range of the fused iteration, since
# the lanes beat pairs at n = 27, 48 and 64 (analysis/results/compare_81d7b29_lanes.md for
# the side-by-side effect on the public call).
LANES_MAX_N = 64
# The fused Numba iteration up to this size; above it the array-code runner of
# nsiter.newton_schulz on numpy ``@``: one BLAS library (numpy's) for probe and iteration,
# instead of numpy's and SciPy's OpenBLAS thread pools competing.
NUMBA_MAX_N = 64
# The spectrum probe factorises with Numba up to this size (no BLAS, so no OpenBLAS
# threads left spinning against the Numba kernels that follow), with LAPACK above.
PROBE_NUMBA_MAX_N = 256
# method="eigh" calls LAPACK from Numba threads (one matrix each, BLAS held to one thread
# by threadpoolctl) up to this size; numpy's batched eigh above.
EIGH_KERNEL_MAX_N = 128


def _use_thread_pool(n: int, nb: int) -> bool:
    """One matrix per Numba thread for small matrices in a batch; otherwise no Numba
    parallel region at all, so that BLAS/LAPACK threads never compete with a spinning pool."""
    return n <= PARALLEL_MAX_N and nb > 1


def prepare(A3, eps: float):
    """``(A64, fro, stats)``: ``A64 = ((A + A^T)/2 + eps I) / s`` in float64 (a new array),
    ``s = 4^k`` bringing ``max(max|a_ij|, eps)`` into ``[1, 4)`` (exact, overflow-free), and in
    the same kernel ``stats (nb, 6) = [all finite, max|a_ij|, max|a_ij - a_ji|, ||A64||_F,
    ||A64||_inf, s]``; ``fro`` is ``stats[:, 3]``."""
    n = A3.shape[-1]
    src = np.ascontiguousarray(A3)
    nb = src.shape[0]
    A64 = np.empty((nb, n, n))
    stats = np.empty((nb, 6))
    (_prepare if nb > 1 else _prepare_serial)(src, float(eps), A64, stats)
    return A64, stats[:, 3].copy(), stats


def probe(A64, delta, n_inverse: int, n_power: int):
    """``(ok, lmin, lmax)``: Cholesky of ``A + delta I`` succeeded; inverse-iteration estimate
    (from above) of ``lambda_min``; power-iteration estimate (from below) of ``lambda_max``
    (0 when ``n_power == 0``).  Numba up to :data:`PROBE_NUMBA_MAX_N`, LAPACK above."""
    nb, n, _ = A64.shape
    out = np.empty((nb, 3))
    if n <= PROBE_NUMBA_MAX_N:
        (_psd_probe if _use_thread_pool(n, nb) else _psd_probe_serial)(A64, delta, n_inverse, n_power, out)
        return out[:, 0] > 0, out[:, 1].copy(), out[:, 2].copy()
    S = A64.copy()
    S[:, np.arange(n), np.arange(n)] += delta[:, None]
    try:
        L = np.linalg.cholesky(S)
    except np.linalg.LinAlgError:
        _psd_probe_serial(A64, delta, n_inverse, n_power, out)
        return out[:, 0] > 0, out[:, 1].copy(), out[:, 2].copy()
    lmin, lmax = np.empty(nb), np.empty(nb)
    _spectrum_estimates_serial(A64, L, delta, n_inverse, n_power, lmin, lmax)
    return np.ones(nb, dtype=bool), lmin, lmax


@functools.lru_cache(maxsize=None)
def _blas_controller():
    """threadpoolctl's view of the loaded BLAS libraries, including SciPy's OpenBLAS (the
    LAPACK that ``np.linalg.eigh`` calls inside Numba; imported first so that it is seen)."""
    import scipy.linalg.cython_lapack  # noqa: F401  (loads SciPy's OpenBLAS)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def eigh_power(A64, power: float):
    """``(V diag(lambda^power) V^T, lambda)`` from a float64 ``eigh`` (ascending ``lambda``).

    For ``power > 0`` eigenvalues ``<= 0`` map to 0.  Up to :data:`EIGH_KERNEL_MAX_N` one
    matrix per Numba thread with BLAS held to one thread, formed as ``W W^T`` (symmetric to
    the last bit); above, numpy's batched ``eigh``.
    """
    nb, n, _ = A64.shape
    if n <= EIGH_KERNEL_MAX_N:
        D = np.empty_like(A64)
        lam = np.empty((nb, n))
        with _blas_controller().limit(limits=1, user_api="blas"):
            (_eigh_power if nb > 1 else _eigh_power_serial)(A64, float(power), D, lam)
        return D, lam
    lam, V = np.linalg.eigh(A64)
    lam_p = np.where(lam > 0, np.maximum(lam, np.finfo(float).tiny) ** power, 0.0)
    return (V * lam_p[:, None, :]) @ np.swapaxes(V, -1, -2), lam


def _coupled_fused(Y0, Y0_64, coefs, n_max, *, tol, record, stop_early, k_last=None):
    """The fused coupled iteration (``_coupled_ns_one``) over the batch, with the call and
    the result of ``newton_schulz._run_coupled`` (``coefs=None``: the classic step)."""
    nb, n, _ = Y0.shape
    Z = np.empty_like(Y0)
    Y = np.empty_like(Y0)
    hist = np.full((nb, n_max if record else 1), np.nan)
    info_i = np.zeros((nb, 3), dtype=np.int64)
    info_f = np.zeros((nb, 1))
    if coefs is None:
        coefs = np.tile(np.array([1.5, -0.5, 0.0], dtype=Y0.dtype), (nb, n_max, 1))
    coefs = np.ascontiguousarray(coefs[:, :n_max], dtype=Y0.dtype)
    k_last = np.zeros(nb, dtype=np.int64) if k_last is None else np.ascontiguousarray(k_last, dtype=np.int64)
    kernel = _coupled_ns_parallel if _use_thread_pool(n, nb) else _coupled_ns_serial
    kernel(np.ascontiguousarray(Y0), np.ascontiguousarray(Y0_64), coefs, n_max, k_last, record, stop_early,
           float(tol or 0.0), Z, Y, hist, info_i, info_f)
    return Z, Y, info_i[:, 0], info_i[:, 1], info_i[:, 2].astype(bool), info_f[:, 0], hist


def _coupled_solve(A64, c, s, dtype, want, coefs, n_max, *, tol, record, stop_early, k_last=None):
    """:func:`_coupled_fused` from the prepared input to the result (``_coupled_solve_one``:
    ``Y_0`` and the scaled result formed per matrix, no batch temporaries).  Returns
    ``(out, n_done, returned_iter, diverged, returned_r, hist, finite)``, ``finite``: the
    returned ``Z`` is finite."""
    nb, n, _ = A64.shape
    dtype = np.dtype(dtype)
    out = np.empty((nb, n, n), dtype=dtype)
    # (the kernel's threads write every entry, the unset steps of hist too: see _coupled_pipeline)
    hist = np.empty((nb, n_max if record else 1))
    info_i = np.empty((nb, 4), dtype=np.int64)
    info_f = np.empty((nb, 1))
    if coefs is None:
        coefs = np.ascontiguousarray(np.broadcast_to(_classic_coefs(dtype, n_max), (nb, n_max, 3)))
    else:
        coefs = np.ascontiguousarray(coefs[:, :n_max], dtype=dtype)
    k_last = _NO_K_LAST[:1].repeat(nb) if k_last is None else np.ascontiguousarray(k_last, dtype=np.int64)
    kernel = _coupled_solve_parallel if _use_thread_pool(n, nb) else _coupled_solve_serial
    kernel(np.ascontiguousarray(A64), np.ascontiguousarray(c, dtype=np.float64),
           np.ascontiguousarray(s, dtype=np.float64), want == "sqrt", coefs, n_max, k_last, record, stop_early,
           float(tol or 0.0), out, hist, info_i, info_f)
    return out, info_i[:, 0], info_i[:, 1], info_i[:, 2].astype(bool), info_f[:, 0], hist, info_i[:, 3].astype(bool)


_NO_K_LAST = np.zeros(1, dtype=np.int64)


@functools.lru_cache(maxsize=64)
def _classic_coefs(dtype, n_max):
    """The classic step's ``(3/2, -1/2, 0)`` for ``n_max`` steps, read-only."""
    coefs = np.tile(np.array([1.5, -0.5, 0.0], dtype=dtype), (n_max, 1))
    coefs.flags.writeable = False
    return coefs


def coupled_solver(n: int):
    """The fused Numba iteration for size ``n`` taking the prepared input to the result
    (:func:`_coupled_solve`), or ``None``."""
    return _coupled_solve if n <= NUMBA_MAX_N else None


class PipelineResult(NamedTuple):
    """The outputs of :func:`_coupled_pipeline`: those of :func:`prepare` (``A64``, ``stats``) and of
    the probe kernel (``probe (nb, 3) = [ok, lmin, lmax]``), the scaling ``c``, the result ``out``,
    ``clean`` (every matrix passed the driver's checks) and the solver's raw records (:meth:`solved`)."""

    A64: np.ndarray
    stats: np.ndarray
    probe: np.ndarray
    c: np.ndarray
    out: np.ndarray
    clean: bool
    info_i: np.ndarray
    info_f: np.ndarray
    hist: np.ndarray

    def solved(self):
        """The result as :func:`_coupled_solve` returns it (unset for a matrix with a non-finite
        entry or a failed Cholesky, which the driver rejects); formed on demand, so that a clean
        batch never reads the records back from the threads that wrote them."""
        info_i = self.info_i
        return (self.out, info_i[:, 0], info_i[:, 1], info_i[:, 2].astype(bool), self.info_f[:, 0], self.hist,
                info_i[:, 3].astype(bool))


def _coupled_pipeline(A3, eps, rel, n_inverse, n_power, spectral, dtype, want, n_max, *, tol, record, stop_early,
                      asym_rel, sing_rel):
    """:func:`prepare`, :func:`probe` and :func:`_coupled_solve` (the classic step, no
    ``k_last``) in ONE Numba call per batch (``_coupled_pipeline_two``): the probe's shift
    ``delta = rel ||A64||_F`` and the scaling ``c`` (``||A64||_F``, or the clipped power
    estimate when ``spectral``) formed inside it as ``newton_schulz._delta`` / ``_scale`` form them.
    Returns a :class:`PipelineResult`; its ``clean``: every matrix passed the driver's checks,
    with the thresholds ``asym_rel`` (asymmetry, relative to ``max|a_ij|``) and ``sing_rel``
    (numerical singularity, relative to ``||A||_F``) (``_pipeline_solve``).

    Every output is allocated without being written here: the kernel's threads write all of
    it (the records too), so no cache line the main thread has just written moves to another
    core (on the 2-core machine, zero-filling the small records first cost about 20 us a call).
    """
    src = np.ascontiguousarray(A3)
    nb, n, _ = src.shape
    dtype = np.dtype(dtype)
    A64 = np.empty((nb, n, n))
    stats = np.empty((nb, 6))
    probe_out = np.empty((nb, 3))
    c = np.empty(nb)
    out = np.empty((nb, n, n), dtype=dtype)
    hist = np.empty((nb, n_max if record else 1))
    info_i = np.empty((nb, 5), dtype=np.int64)
    info_f = np.empty((nb, 1))
    pool = _use_thread_pool(n, nb)
    # L matrices per step (their probes in the lanes of one vector), or two (their probes in
    # lockstep), where that still gives every thread work; the probe's bits are the same (the
    # thread count is asked only where the batch could be too small for the lanes at the most)
    most = numba.config.NUMBA_NUM_THREADS
    threads = (most if nb >= _LANES64 * most else numba.get_num_threads()) if pool else 1
    if n <= LANES_MAX_N and nb >= _LANES64 * threads:
        width = _LANES64
    elif not pool or nb >= PAIRED_MIN_PER_THREAD * threads:
        width = 2
    else:
        width = 1
    n_clean = (_coupled_pipeline_parallel if pool else _coupled_pipeline_serial)(
        src, width, float(eps), float(rel), int(n_inverse), int(n_power), bool(spectral), want == "sqrt",
        _classic_coefs(dtype, n_max), n_max, record, stop_early, float(tol or 0.0), float(asym_rel), float(sing_rel),
        A64, stats, probe_out, c, out, hist, info_i, info_f)
    return PipelineResult(A64, stats, probe_out, c, out, n_clean == nb, info_i, info_f, hist)


def coupled_pipeline(n: int):
    """:func:`_coupled_pipeline` (prepare, probe and the fused classic iteration in one call)
    for size ``n``, or ``None``."""
    return _coupled_pipeline if n <= NUMBA_MAX_N else None


def coupled_kernel(n: int):
    """The fused Numba iteration for size ``n``, or ``None`` (use the array-code runner)."""
    return _coupled_fused if n <= NUMBA_MAX_N else None


def auto_may_use_eigh(like) -> bool:
    """``method="auto"`` weighs LAPACK ``eigh`` against the iteration on the CPU."""
    return True
