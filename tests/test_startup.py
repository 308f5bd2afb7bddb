"""Start-up: what ``import nsiter`` and ``nsiter verify`` load, and the numpy backend's two kernel sets.

``import nsiter`` imports none of Numba, SciPy, matplotlib, torch, Dask (each loads on first
use), and ``nsiter verify`` on a small matrix runs on the array kernels of the numpy backend
(:mod:`nsiter._numpy.linalg`) without loading Numba.  The array kernels and the Numba kernels
(:mod:`nsiter._numba.linalg`) are one algorithm: the tests below pin their decisions equal and
their results equal up to rounding.  Timings live in ``analysis/bench_startup.py``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest

import nsiter
from helpers import assert_close, spd_with_condition
from nsiter import _backend, verification
from nsiter._backend import NUMPY_KERNELS, backend, numpy_kernels
from nsiter._numba import linalg as numba_linalg
from nsiter._numpy import linalg as array_linalg

HEAVY = ("numba", "scipy", "matplotlib", "torch", "dask", "distributed", "array_api_compat")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def _loaded(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; ``{"heavy": [...], "kernels": [...]}`` it left loaded."""
    r = _python(code + "\nimport json, sys\n"
                f"print(json.dumps({{'heavy': [m for m in {HEAVY!r} if m in sys.modules], "
                "'kernels': sorted(m for m in sys.modules if m.startswith(('nsiter._numba.', 'nsiter._torch')))}))")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- what loads


def test_import_nsiter_loads_no_numba_scipy_matplotlib_torch_or_dask():
    got = _loaded("import nsiter")
    assert got == {"heavy": [], "kernels": []}


def test_public_names_resolve_without_loading_kernels():
    got = _loaded("import nsiter\nfor name in nsiter.__all__:\n"
                  "    if name != 'deconvnet':\n        getattr(nsiter, name)\nnsiter.__version__")
    assert got == {"heavy": [], "kernels": []}


def test_kernels_load_with_the_first_call_that_needs_them():
    got = _loaded("import numpy as np, nsiter\nnsiter.im2col(np.zeros((1, 4, 4)), 3)")
    assert "numba" in got["heavy"] and "nsiter._numba.patches" in got["kernels"]
    assert "nsiter._numba.linalg" not in got["kernels"]  # the Newton–Schulz kernels wait for inv_sqrtm


def test_import_nsiter_after_numba_applies_the_threading_choice_first():
    r = _python("import numba, sys, nsiter\nprint('nsiter._config' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"


def test_nsiter_verify_runs_without_numba_scipy_or_matplotlib(tmp_path):
    rng = np.random.default_rng(40)
    path = tmp_path / "cov.npy"
    np.save(path, spd_with_condition(27, 1e5, rng))
    got = _loaded("import io, contextlib\nfrom nsiter.cli import main\n"
                  "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
                  f"    rc = main(['verify', {str(path)!r}])\n"
                  "assert rc == 0, rc\nassert 'coupled' in out.getvalue()")
    assert got == {"heavy": ["array_api_compat"], "kernels": []}


def test_cli_still_works_as_a_process(tmp_path):
    rng = np.random.default_rng(41)
    path = tmp_path / "cov.npy"
    C = spd_with_condition(9, 1e3, rng)
    np.save(path, C)
    run = [sys.executable, "-m", "nsiter.cli"]
    r = subprocess.run(run + ["verify", str(path), "--json", "--tol", "1e-8", "--method", "coupled"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["methods"]["coupled"]["residual"] <= 1e-8
    r = subprocess.run(run + ["--version"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == f"nsiter {nsiter.__version__}"
    r = subprocess.run(run + ["verify", str(tmp_path / "missing.npy")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(run + ["info", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["numba_threading_layer"] == nsiter._config.THREADING.layer


# ----------------------------------------------------------------------------- kernel selection


def test_kernel_sets_are_selected_per_context_and_restored():
    assert backend(np.eye(2)).linalg is numba_linalg
    with numpy_kernels("array"):
        be = backend(np.eye(2))
        assert be.linalg is array_linalg and be.kernels == "array"
        assert be.patches is backend(np.eye(2)).patches  # only the linear algebra differs
        seen = []
        t = threading.Thread(target=lambda: seen.append(backend(np.eye(2)).kernels))
        t.start()
        t.join()
        assert seen == ["numba"]  # a context variable: other threads keep the default
        with pytest.raises(RuntimeError):
            with numpy_kernels("numba"):
                assert backend(np.eye(2)).linalg is numba_linalg
                raise RuntimeError
        assert backend(np.eye(2)).kernels == "array"
    assert backend(np.eye(2)).kernels == "numba"
    assert sorted(NUMPY_KERNELS) == ["array", "numba"]


def test_unknown_kernel_set_lists_the_choices():
    with pytest.raises(ValueError, match="unknown numpy kernel set 'fast'.*array, numba|numba, array"):
        with numpy_kernels("fast"):
            pass


def test_verify_whitening_runs_on_the_array_kernels(monkeypatch):
    used = []
    real = _backend.backend

    def spy(*arrays):
        be = real(*arrays)
        used.append(be.kernels)
        return be

    monkeypatch.setattr("nsiter.newton_schulz.backend", spy)
    verification.verify_whitening(spd_with_condition(5, 10.0, np.random.default_rng(42)))
    assert used and set(used) == {"array"}


@pytest.mark.parametrize("kernels", sorted(NUMPY_KERNELS))
def test_both_kernel_sets_whiten(kernels):
    rng = np.random.default_rng(43)
    A = spd_with_condition(16, 1e4, rng, batch=(3,))
    with numpy_kernels(kernels):
        D = nsiter.inv_sqrtm(A, tol=1e-10)
    R = D @ A @ D - np.eye(16)
    assert np.all(np.linalg.norm(R, axis=(-2, -1)) <= 1e-9)


# ----------------------------------------------------------------------------- one algorithm, two kernel sets


def _both(fn):
    with warnings.catch_warnings(record=True) as wa:
        warnings.simplefilter("always")
        with numpy_kernels("array"):
            a = fn()
    with warnings.catch_warnings(record=True) as wn:
        warnings.simplefilter("always")
        n = fn()
    assert [type(w.message) for w in wa] == [type(w.message) for w in wn]
    return a, n


@pytest.mark.parametrize("method", ["coupled", "accelerated", "auto", "eigh", "uncoupled"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kw", [{}, dict(n_iter=9), dict(tol=1e-9, return_info=True), dict(scaling="spectral"),
                                dict(scaling="trace", eps=1e-3), dict(n_iter=30, return_info=True)])
def test_array_kernels_make_the_numba_kernels_decisions(method, dtype, kw):
    rng = np.random.default_rng(44)
    cond = 3.0 if method == "uncoupled" else 1e5
    A = spd_with_condition(27, cond, rng, batch=(2,), dtype=dtype)
    if method == "uncoupled":
        kw = {**kw, "n_iter": min(kw.get("n_iter", 12), 12)}
    (Da, ia), (Dn, inn) = _both(lambda: nsiter.inv_sqrtm(A, method=method, **{**kw, "return_info": True}))
    assert ia.method == inn.method
    np.testing.assert_array_equal(ia.converged, inn.converged)
    np.testing.assert_array_equal(ia.diverged, inn.diverged)
    # at the rounding floor the stagnation test may stop one iteration apart; above it the runs agree
    assert abs(ia.n_iter - inn.n_iter) <= 1
    assert np.all(np.abs(ia.best_iter - inn.best_iter) <= 1)
    k = min(ia.n_iter, inn.n_iter)
    ra, rn = ia.residuals[..., :k], inn.residuals[..., :k]
    above = rn > 100 * cond * np.finfo(dtype).eps  # well above the floor kappa * u
    np.testing.assert_allclose(ra[above], rn[above], rtol=1e-3)
    np.testing.assert_allclose(ia.scale, inn.scale, rtol=1e-6 if dtype == np.float32 else 1e-13)
    assert_close(Da, Dn, factor=1e3 if method == "uncoupled" else 10, n=27)


def test_array_kernels_return_the_best_iterate_after_a_blow_up():
    rng = np.random.default_rng(45)
    A = spd_with_condition(12, 1e3, rng)
    (Da, ia), (Dn, inn) = _both(lambda: nsiter.inv_sqrtm(A, method="uncoupled", n_iter=60, return_info=True))
    assert ia.diverged and inn.diverged and ia.best_iter == inn.best_iter
    assert_close(Da, Dn, factor=1e3, n=12)


def _outcome(fn):
    """What ``fn()`` did: the error it raised (type, message) or the warnings it gave (types)."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            fn()
        except (ValueError, TypeError) as exc:
            return type(exc), str(exc)
    return "returned", sorted(type(x.message).__name__ for x in w)


def test_array_kernels_refuse_and_warn_as_the_numba_kernels_do():
    hard = {"indefinite": np.diag([1.0, -1.0, 2.0]), "singular": np.diag([1.0, 0.0, 2.0]),
            "zero": np.zeros((3, 3)), "asymmetric": np.array([[2.0, 1.0], [0.0, 2.0]]),
            "near-singular": np.diag([1.0, 1e-15, 2.0]), "nan": np.diag([1.0, np.nan])}
    seen = set()
    for name, A in hard.items():
        for call in (lambda: nsiter.inv_sqrtm(A), lambda: nsiter.sqrtm_psd(A, method="coupled", n_iter=20),
                     lambda: nsiter.inv_sqrtm(A, method="auto", tol=1e-8)):
            with numpy_kernels("array"):
                got = _outcome(call)
            assert got == _outcome(call), name
            seen.add(got[0])
    assert {ValueError, "returned"} <= seen  # both refusals and warned results were compared


def test_sqrtm_psd_of_a_singular_matrix_on_both_kernel_sets():
    v = np.array([[1.0, 2.0, 2.0]])
    for method in ("eigh", "coupled"):
        Sa, Sn = _both(lambda: nsiter.sqrtm_psd(v.T @ v, method=method, n_iter=30 if method != "eigh" else None))
        assert_close(Sa, Sn, factor=1e6, n=3)


def test_verify_whitening_equals_its_numba_twin_to_rounding(monkeypatch):
    rng = np.random.default_rng(46)
    C = spd_with_condition(27, 1e6, rng)
    got = verification.verify_whitening(C)
    monkeypatch.setattr(verification, "numpy_kernels", lambda kernels: numpy_kernels("numba"))
    ref = verification.verify_whitening(C)
    for m in ("coupled", "eigh"):
        g, r = got[m], ref[m]
        for t, k in r.iterations_to_reach.items():  # thresholds at the floor kappa * u may be reached a step apart
            if t > 100 * ref.floor:
                assert g.iterations_to_reach[t] == k, (m, t)
        assert g.returned_iter == r.returned_iter
        assert g.residual == pytest.approx(r.residual, rel=0.5, abs=1e-11)
        assert_close(g.D, r.D, factor=1e4, n=27)
    assert got["uncoupled"].diverged and ref["uncoupled"].diverged
    assert got["uncoupled"].best_iter == ref["uncoupled"].best_iter


# ----------------------------------------------------------------------------- the kernels themselves


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_prepare_probe_and_eigh_power_agree_with_the_numba_kernels(dtype):
    rng = np.random.default_rng(47)
    A = spd_with_condition(20, 1e4, rng, batch=(3,), lam_max=1e30).astype(dtype)
    A[1] *= 1e-60 if dtype == np.float64 else 1e-20
    A[2, 0, 1] += 1e-3 * A[2, 0, 1]  # a little asymmetry
    for eps in (0.0, 1e-5):
        Aa, fa, sa = array_linalg.prepare(A, eps)
        An, fn, sn = numba_linalg.prepare(A, eps)
        np.testing.assert_array_equal(sa[:, [0, 1, 5]], sn[:, [0, 1, 5]])  # exact: flags, max|a_ij|, scale
        # the Numba kernel forms a_ij + a_ji in the input's dtype (Numba's float() keeps float32), the
        # array kernel in float64: equal for float64 input and symmetric entries, float32 rounding apart else
        rtol = 1e-14 if dtype == np.float64 else 1e-7
        np.testing.assert_allclose(sa[:, 2:5], sn[:, 2:5], rtol=rtol)
        np.testing.assert_allclose(fa, fn, rtol=rtol)
        if dtype == np.float64:
            np.testing.assert_array_equal(Aa, An)  # the scaled symmetric part is exact
        else:
            np.testing.assert_allclose(Aa, An, rtol=1e-7)
            np.testing.assert_array_equal(Aa[:2], An[:2])
    delta = 1e-12 * fn
    ok_a, lmin_a, lmax_a = array_linalg.probe(An, delta, 3, 8)
    ok_n, lmin_n, lmax_n = numba_linalg.probe(An, delta, 3, 8)
    np.testing.assert_array_equal(ok_a, ok_n)
    np.testing.assert_allclose(lmin_a, lmin_n, rtol=1e-10)
    np.testing.assert_allclose(lmax_a, lmax_n, rtol=1e-12)
    for power in (-0.5, 0.5):
        Da, la = array_linalg.eigh_power(An, power)
        Dn, ln = numba_linalg.eigh_power(An, power)
        np.testing.assert_array_equal(Da, np.swapaxes(Da, -1, -2))  # symmetric to the last bit
        np.testing.assert_allclose(la, ln, rtol=1e-12)
        assert_close(Da, Dn, factor=100, n=20)
    assert array_linalg.coupled_kernel(20) is None and array_linalg.coupled_solver(20) is None
    assert array_linalg.auto_may_use_eigh(A)


def test_probe_reports_each_indefinite_matrix_of_a_batch():
    A = np.stack([np.eye(4), np.diag([1.0, 1.0, -1.0, 1.0]), 2 * np.eye(4)])
    delta = np.full(3, 1e-12)
    ok_a, lmin_a, _ = array_linalg.probe(A, delta, 3, 0)
    ok_n, lmin_n, _ = numba_linalg.probe(A, delta, 3, 0)
    np.testing.assert_array_equal(ok_a, [True, False, True])
    np.testing.assert_array_equal(ok_a, ok_n)
    assert np.isnan(lmin_a[1]) and np.isnan(lmin_n[1])
    np.testing.assert_allclose(lmin_a[[0, 2]], lmin_n[[0, 2]], rtol=1e-12)


def test_array_kernels_import_neither_numba_nor_scipy():
    got = _loaded("import numpy as np, nsiter\nfrom nsiter._backend import numpy_kernels\n"
                  "with numpy_kernels('array'):\n"
                  "    for m in ('coupled', 'accelerated', 'auto', 'eigh', 'uncoupled'):\n"
                  "        nsiter.inv_sqrtm(np.diag([1.0, 2.0, 3.0]), method=m, n_iter=5, return_info=True)\n"
                  "    nsiter.inv_sqrtm(np.diag([1.0, 2.0, 3.0]), scaling='spectral', tol=1e-8)")
    assert got == {"heavy": ["array_api_compat"], "kernels": []}
