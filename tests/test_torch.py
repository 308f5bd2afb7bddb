"""The torch backend and nsiter.torch: parity with numpy, dtype/device rules, autograd, Deconv2d, TF32 flags."""
from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import nsiter  # noqa: E402
import nsiter.torch as nt  # noqa: E402
import reference  # noqa: E402
from helpers import random_images, spd_with_condition, tol  # noqa: E402
from nsiter import _torch as tb  # noqa: E402
from nsiter import newton_schulz as ns  # noqa: E402
from nsiter._torch import linalg as tlinalg  # noqa: E402
from nsiter._torch import patches as tpatches  # noqa: E402
from nsiter.covariance import _sampled_geometry  # noqa: E402

F = torch.nn.functional
CUDA = torch.device("cuda") if torch.cuda.is_available() else None


def gradcheck(fn, inputs, fast=False):
    """``torch.autograd.gradcheck`` (float64); ``fast``: its fast mode (random Jacobian projections)."""
    return torch.autograd.gradcheck(fn, inputs, fast_mode=fast)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The matrices here are tiny: one intra-op thread avoids OpenMP spin-waits on a busy CI
    machine (a 27 x 27 product can take milliseconds with two contended threads)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same torch RNG state (numpy draws use their own seeded rng)."""
    torch.manual_seed(0)


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------ import hygiene

def test_import_nsiter_does_not_import_torch_or_the_backend():
    r = _run("import sys, nsiter; nsiter.inv_sqrtm([[2.0]], n_iter=3); nsiter.covariance([[1.0], [2.0]]); "
             "print('torch' in sys.modules, 'nsiter._torch' in sys.modules, 'nsiter.torch' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False", "False"]


# ------------------------------------------------------------------------------ im2col / col2im

geometries = st.fixed_dictionaries({
    "n": st.integers(1, 2), "c": st.integers(1, 3), "h": st.integers(1, 8), "w": st.integers(1, 8),
    "k": st.tuples(st.integers(1, 3), st.integers(1, 3)), "s": st.tuples(st.integers(1, 3), st.integers(1, 3)),
    "p": st.tuples(st.integers(0, 2), st.integers(0, 2)), "d": st.tuples(st.integers(1, 2), st.integers(1, 2)),
})


def _fits(g):
    return all(g["d"][a] * (g["k"][a] - 1) + 1 <= (g["h"], g["w"])[a] + 2 * g["p"][a] for a in range(2))


@settings(max_examples=25)
@given(geometries, st.sampled_from([np.float32, np.float64]))
def test_im2col_and_col2im_equal_numpy_bit_for_bit(g, dtype):
    if not _fits(g):
        return
    rng = np.random.default_rng(3)
    x = rng.standard_normal((g["n"], g["c"], g["h"], g["w"])).astype(dtype)
    kw = dict(stride=g["s"], padding=g["p"], dilation=g["d"])
    want = nsiter.im2col(x, g["k"], **kw)
    got = nsiter.im2col(_t(x), g["k"], **kw)
    assert isinstance(got, torch.Tensor) and got.dtype == _t(x).dtype and got.is_contiguous()
    np.testing.assert_array_equal(got.numpy(), want)
    Y = rng.standard_normal(want.shape).astype(dtype)
    back = nsiter.col2im(_t(Y), x.shape, g["k"], **kw)
    np.testing.assert_array_equal(back.numpy(), nsiter.col2im(Y, x.shape, g["k"], **kw))


def test_im2col_is_unfold_transposed():
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    got = nsiter.im2col(x, (2, 3), stride=(2, 1), padding=(1, 2), dilation=(2, 1))
    want = F.unfold(x, (2, 3), dilation=(2, 1), padding=(1, 2), stride=(2, 1)).transpose(1, 2).reshape(-1, 18)
    assert torch.equal(got, want)


def test_col2im_is_fold_of_the_transposed_layout():
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    X = torch.randn(2 * 7 * 9, 27, dtype=torch.float64)
    got = nsiter.col2im(X, x.shape, 3, padding=1)
    want = F.fold(X.reshape(2, 63, 27).transpose(1, 2), (7, 9), 3, padding=1)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=1e-14)


def test_col2im_device_path_runs_on_cpu_when_forced_and_agrees(monkeypatch):
    """The CUDA branch of col2im (F.fold) on CPU tensors, under the private switch."""
    rng = np.random.default_rng(2)
    for shape, k, kw in [((2, 3, 7, 9), 3, dict(padding=1)), ((1, 2, 8, 7), (2, 3), dict(stride=(2, 1),
                                                                                        dilation=(1, 2)))]:
        oh, ow = nsiter.output_shape(shape, k, **kw)
        kh, kw_ = (k, k) if isinstance(k, int) else k
        X = _t(rng.standard_normal((shape[0] * oh * ow, shape[1] * kh * kw_)))
        normal = nsiter.col2im(X, shape, k, **kw)
        monkeypatch.setitem(tb._SETTINGS, "force_device_path", True)
        forced = nsiter.col2im(X, shape, k, **kw)
        monkeypatch.undo()
        assert forced.shape == normal.shape and forced.dtype == normal.dtype
        torch.testing.assert_close(forced, normal, rtol=1e-15, atol=1e-14)
        np.testing.assert_array_equal(normal.numpy(), nsiter.col2im(X.numpy(), shape, k, **kw))


def test_im2col_never_aliases_its_input():
    x = torch.randn(1, 1, 4, 4)
    X = nsiter.im2col(x, 1)  # a 1x1 kernel on one channel is a pure reshape
    X[0, 0] = 123.0
    assert x[0, 0, 0, 0] != 123.0


def test_im2col_accepts_non_contiguous_and_2d_3d_input():
    x = torch.randn(3, 8, 6, dtype=torch.float64).transpose(1, 2)  # (C, H, W) non-contiguous
    np.testing.assert_array_equal(nsiter.im2col(x, 3).numpy(), nsiter.im2col(x.numpy(), 3))
    np.testing.assert_array_equal(nsiter.im2col(x[0], 2).numpy(), nsiter.im2col(x[0].numpy(), 2))


@pytest.mark.parametrize("dtype, want", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                         (torch.int64, torch.float64), (torch.bool, torch.float64),
                                         (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_dtype_rules_follow_numpy(dtype, want):
    x = torch.ones(2, 5, 5).to(dtype)
    assert nsiter.im2col(x, 3).dtype == want
    assert nsiter.patch_covariance(x, 3)[0].dtype == want


def test_complex_tensors_are_rejected():
    with pytest.raises(TypeError, match="complex"):
        nsiter.im2col(torch.ones(4, 4, dtype=torch.complex64), 2)
    with pytest.raises(TypeError, match="complex"):
        nsiter.inv_sqrtm(torch.eye(2, dtype=torch.complex128))


def test_im2col_col2im_errors():
    with pytest.raises(ValueError, match="ndim 2 or 3 or 4"):
        nsiter.im2col(torch.ones(5), 1)
    with pytest.raises(ValueError, match="larger than the padded image"):
        nsiter.im2col(torch.ones(3, 3), 4)
    with pytest.raises(ValueError, match="non-empty"):
        nsiter.im2col(torch.ones(0, 1, 3, 3), 1)
    with pytest.raises(ValueError, match=r"expected X of shape \(4, 9\)"):
        nsiter.col2im(torch.ones(5, 9), (4, 4), 3)
    with pytest.raises(ValueError, match="ndim 2"):
        nsiter.col2im(torch.ones(4, 9, 1), (4, 4), 3)


# ------------------------------------------------------------------------------ covariance

def test_covariance_matches_the_float64_reference():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((200, 7)) + 5.0
    cov, mean = nsiter.covariance(_t(X), eps=0.25)
    want, mu = reference.covariance(X)
    np.testing.assert_allclose(cov.numpy(), want + 0.25 * np.eye(7), rtol=0, atol=1e-12)
    np.testing.assert_allclose(mean.numpy(), mu, rtol=0, atol=1e-12)
    c32, _ = nsiter.covariance(_t(X.astype(np.float32)))
    assert c32.dtype == torch.float32
    np.testing.assert_allclose(c32.numpy(), want, rtol=0, atol=tol(np.float32, n=200) * np.abs(want).max())


def test_covariance_errors():
    with pytest.raises(ValueError, match="for one feature use"):
        nsiter.covariance(torch.ones(5))
    with pytest.raises(ValueError, match="1 NaN/inf"):
        nsiter.covariance(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="eps >= 0"):
        nsiter.covariance(torch.ones(3, 2), eps=-1.0)


@pytest.mark.parametrize("block_size, grouping", [(None, "contiguous"), (2, "contiguous"), (2, "reference"),
                                                  (1, "reference"), (4, "contiguous")])
@pytest.mark.parametrize("stride, sampling_stride, padding", [(1, 1, 1), (1, 3, 0), (2, 2, 2)])
def test_patch_covariance_matches_numpy(block_size, grouping, stride, sampling_stride, padding):
    rng = np.random.default_rng(5)
    x = random_images((3, 4, 13, 11), rng) + 2.0
    kw = dict(stride=stride, padding=padding, sampling_stride=sampling_stride, block_size=block_size,
              grouping=grouping, eps=1e-3)
    cov, mean = nsiter.patch_covariance(_t(x), 3, **kw)
    want_cov, want_mean = nsiter.patch_covariance(x, 3, **kw)
    assert cov.shape == want_cov.shape and mean.shape == want_mean.shape
    np.testing.assert_allclose(cov.numpy(), want_cov, rtol=0, atol=1e-10)
    np.testing.assert_allclose(mean.numpy(), want_mean, rtol=0, atol=1e-10)


def test_patch_covariance_float32_matches_numpy_to_float32_accuracy():
    rng = np.random.default_rng(6)
    x = random_images((2, 8, 12, 12), rng, dtype=np.float32)
    cov, mean = nsiter.patch_covariance(_t(x), 3, padding=1, block_size=4)
    want, _ = nsiter.patch_covariance(x.astype(np.float64), 3, padding=1, block_size=4)
    assert cov.dtype == torch.float32
    np.testing.assert_allclose(cov.numpy(), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_patch_covariance_in_chunks_equals_one_shot(monkeypatch):
    rng = np.random.default_rng(7)
    x = _t(random_images((3, 4, 12, 10), rng) + 3.0)
    for grouping in ("contiguous", "reference"):
        one = nsiter.patch_covariance(x, 3, padding=1, block_size=2, grouping=grouping)
        # budgets forcing image chunks, then row bands inside one image
        for budget in (36 * 150, 36 * 7):
            monkeypatch.setattr(tpatches, "_CHUNK_ELEMENTS", budget)
            got = nsiter.patch_covariance(x, 3, padding=1, block_size=2, grouping=grouping)
            monkeypatch.undo()
            for a, b in zip(got, one):
                np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-13)
    assert len(tpatches._chunks(_sampled_geometry((3, 4, 12, 10), 3, 1, 1, 1, 1), 36, 36 * 7)) > 3


def test_patch_covariance_errors():
    x = torch.ones(1, 6, 8, 8)
    with pytest.raises(ValueError, match=r"use block_size=2 \(gcd\(4, 6\)\)"):
        nsiter.patch_covariance(x, 3, block_size=4)
    with pytest.raises(ValueError, match="unknown grouping 'rows'; choose one of: 'contiguous', 'reference'"):
        nsiter.patch_covariance(x, 3, grouping="rows")
    with pytest.raises(ValueError, match="sampling_stride >= 1"):
        nsiter.patch_covariance(x, 3, sampling_stride=0)
    with pytest.raises(ValueError, match="NaN/inf"):
        nsiter.patch_covariance(torch.full((1, 1, 4, 4), float("inf")), 2)


def test_patch_statistics_on_tensors_streams_and_merges_with_numpy_shards():
    rng = np.random.default_rng(8)
    a, b, c = (random_images((2, 4, 10, 9), rng) + 1.0 for _ in range(3))
    kw = dict(padding=1, sampling_stride=2, block_size=2, grouping="reference")
    stats = nt.PatchStatistics(3, **kw).update(_t(a)).update(_t(b))
    stats.merge(nsiter.PatchStatistics(3, **kw).update(c))  # a numpy shard
    cov, mean = stats.covariance(eps=1e-4)
    want_cov, want_mean = nsiter.patch_covariance(np.concatenate([a, b, c]), 3, eps=1e-4, **kw)
    assert isinstance(cov, torch.Tensor) and cov.dtype == torch.float64
    np.testing.assert_allclose(cov.numpy(), want_cov, rtol=0, atol=1e-12)
    np.testing.assert_allclose(mean.numpy(), want_mean, rtol=0, atol=1e-12)
    assert stats.count == 3 * 2 * 5 * 5 * 2
    with pytest.raises(ValueError, match="expected images with 4 channels"):
        stats.update(torch.ones(1, 2, 6, 6))


# ------------------------------------------------------------------------------ inv_sqrtm

def _ref_isqrt_newton_schulz(A, n_iter):
    """The paper's reference code (FastDeconv ``isqrt_newton_schulz_autograd``), transcribed."""
    dim = A.shape[0]
    normA = A.norm()
    Y = A.div(normA)
    I = torch.eye(dim, dtype=A.dtype)
    Z = torch.eye(dim, dtype=A.dtype)
    for _ in range(n_iter):
        T = 0.5 * (3.0 * I - Z @ Y)
        Y = Y @ T
        Z = T @ Z
    return Z / torch.sqrt(normA)


def test_coupled_five_steps_reproduce_the_reference_code():
    rng = np.random.default_rng(9)
    C = _t(spd_with_condition(27, 1e3, rng))
    D = nsiter.inv_sqrtm(C, n_iter=5)
    torch.testing.assert_close(D, _ref_isqrt_newton_schulz(C, 5), rtol=0, atol=1e-14)
    D32 = nsiter.inv_sqrtm(C.float(), n_iter=5)
    torch.testing.assert_close(D32, _ref_isqrt_newton_schulz(C.float(), 5), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["coupled", "accelerated", "eigh", "auto"])
@pytest.mark.parametrize("scaling", ["fro", "trace", "spectral"])
@pytest.mark.parametrize("mode, cond", [(dict(n_iter=7), 1e4), (dict(tol=1e-9), 1e4), (dict(), 10.0)])
def test_inv_sqrtm_matches_numpy_with_the_same_info(method, scaling, mode, cond):
    """Same iterates, stopping decisions and info as the numpy backend (float64; the
    tolerance, not the rounding floor, decides when to stop, so BLAS differences cannot)."""
    rng = np.random.default_rng(10)
    A = spd_with_condition(9, cond, rng, batch=(2, 2))
    D, info = nsiter.inv_sqrtm(A, method=method, scaling=scaling, eps=1e-4, return_info=True, **mode)
    Dt, it = nsiter.inv_sqrtm(_t(A), method=method, scaling=scaling, eps=1e-4, return_info=True, **mode)
    np.testing.assert_allclose(Dt.numpy(), D, rtol=0, atol=1e-10 * np.abs(D).max())
    assert (it.n_iter, it.method, it.scaling) == (info.n_iter, info.method, info.scaling)
    np.testing.assert_allclose(it.tol, info.tol, rtol=1e-6)  # (default: raised by the condition estimate)
    for field in ("converged", "diverged", "best_iter"):
        np.testing.assert_array_equal(getattr(it, field), getattr(info, field))
    assert it.residuals.dtype == np.float64 and it.residuals.shape == info.residuals.shape
    np.testing.assert_allclose(it.residuals, info.residuals, rtol=1e-6, atol=1e-10)  # floor ~ cond * u
    np.testing.assert_allclose(it.scale, info.scale, rtol=1e-14)
    plain = nsiter.inv_sqrtm(_t(A), method=method, scaling=scaling, eps=1e-4, **mode)
    np.testing.assert_allclose(plain.numpy(), nsiter.inv_sqrtm(A, method=method, scaling=scaling, eps=1e-4, **mode),
                               rtol=0, atol=1e-10 * np.abs(D).max())


@pytest.mark.parametrize("n", [2, 20])  # auto without the probe (n = 2) and with it
def test_auto_sends_a_singular_matrix_to_the_iteration_like_numpy(n):
    v = np.arange(1.0, n + 1.0)[None, :]
    A = np.stack([v.T @ v, spd_with_condition(n, 10.0, np.random.default_rng(5))])  # rank 1, regular
    for X in (A, _t(A)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            D, info = nsiter.inv_sqrtm(X, method="auto", return_info=True)
        # (the iteration may also report that the singular matrix diverged)
        assert any(w.category is nsiter.IllConditionedWarning and "eps" in str(w.message) for w in caught)
        assert info.method.startswith("auto:accelerated") and info.best_iter[0] > 1 and info.best_iter[1] >= 1
        assert np.all(np.isfinite(np.asarray(D)))


def test_uncoupled_and_sqrtm_psd_match_numpy():
    rng = np.random.default_rng(11)
    A = spd_with_condition(6, 10.0, rng, batch=3)
    for fn in (nsiter.inv_sqrtm, nsiter.sqrtm_psd):
        for method in ("uncoupled", "coupled", "eigh"):
            want, info = fn(A, method=method, n_iter=6, return_info=True)
            got, it = fn(_t(A), method=method, n_iter=6, return_info=True)
            np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
            np.testing.assert_allclose(it.residuals, info.residuals, rtol=1e-8, atol=1e-13)


def test_inv_sqrtm_float32_matches_numpy_float32():
    rng = np.random.default_rng(12)
    A = spd_with_condition(16, 1e3, rng, batch=4).astype(np.float32)
    want = nsiter.inv_sqrtm(A, n_iter=12)
    got = nsiter.inv_sqrtm(_t(A), n_iter=12)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=tol(np.float32, 10, n=16) * np.abs(want).max())


def test_inv_sqrtm_whitens():
    rng = np.random.default_rng(13)
    A = _t(spd_with_condition(20, 1e5, rng, batch=3))
    D = nsiter.inv_sqrtm(A, tol=1e-9)
    R = D @ A @ D - torch.eye(20, dtype=torch.float64)
    assert float(torch.linalg.matrix_norm(R).max()) < 1e-9


def test_inv_sqrtm_errors_and_warnings():
    with pytest.raises(ValueError, match="symmetric matrices"):
        nsiter.inv_sqrtm(torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="finite values in A"):
        nsiter.inv_sqrtm(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), n_iter=3)
    with pytest.raises(ValueError, match="positive semidefinite"):
        nsiter.inv_sqrtm(torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=torch.float64), n_iter=3)
    with pytest.raises(ValueError, match="square matrices"):
        nsiter.inv_sqrtm(torch.ones(2, 3))
    with pytest.raises(ValueError, match="unknown method 'newton'; choose one of"):
        nsiter.inv_sqrtm(torch.eye(2), method="newton")
    with pytest.raises(ValueError, match="eigenvalue"):
        nsiter.inv_sqrtm(torch.zeros(2, 2, dtype=torch.float64), method="eigh")
    with pytest.raises(ValueError, match="zero matrix"):
        nsiter.inv_sqrtm(torch.zeros(2, 2, dtype=torch.float64), n_iter=2)
    with pytest.warns(nsiter.IllConditionedWarning, match="eps"):
        nsiter.inv_sqrtm(torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64), n_iter=3)
    rng = np.random.default_rng(14)
    A = _t(spd_with_condition(27, 1e6, rng))
    with pytest.warns(nsiter.NewtonSchulzDivergenceWarning, match="best iterate"):
        D, info = nsiter.inv_sqrtm(A, method="uncoupled", n_iter=80, return_info=True)
    assert info.diverged.all() and torch.isfinite(D).all()
    assert not np.isfinite(info.residuals).all() or info.residuals.max() > 1e3 * info.residuals.min()


def test_coupled_blow_up_returns_the_best_iterate_like_numpy():
    """A singular float32 matrix: the null space grows until the iteration blows up; fixed count,
    tolerance mode (seen in the by-product first) and record mode all return a finite best iterate."""
    v = np.arange(1.0, 7.0)[None, :]
    A = (v.T @ v + np.diag([1.0, 1, 1, 1, 1, 0])).astype(np.float32)
    A[-1, :] = A[:, -1] = 0.0
    for kw in (dict(n_iter=400), dict(tol=1e-3, n_iter=400)):
        for info_flag in (False, True):
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                res = nsiter.inv_sqrtm(_t(A), return_info=info_flag, **kw)
            kinds = {type(x.message) for x in w}
            assert nsiter.IllConditionedWarning in kinds and nsiter.NewtonSchulzDivergenceWarning in kinds
            D = res[0] if info_flag else res
            assert D.dtype == torch.float32 and torch.isfinite(D).all()
            if info_flag:
                info = res[1]
                assert info.diverged and not info.converged
                assert info.residuals[int(info.best_iter) - 1] == np.nanmin(info.residuals)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    want = nsiter.inv_sqrtm(A, return_info=True, **kw)[1]
                # rounding decides the exact blow-up step; the best residual agrees to float32 accuracy
                np.testing.assert_allclose(np.nanmin(info.residuals), np.nanmin(want.residuals), rtol=1e-2)


def test_inv_sqrtm_empty_batch_and_shapes():
    out, info = nsiter.inv_sqrtm(torch.ones(0, 3, 3), return_info=True)
    assert out.shape == (0, 3, 3) and info.residuals.shape == (0, 0)
    A = torch.eye(3, dtype=torch.float64).expand(2, 4, 3, 3) * 4.0
    assert torch.allclose(nsiter.inv_sqrtm(A, n_iter=20), 0.5 * A / 4.0)


def test_fast_path_blow_up_falls_back_to_the_best_tracked_iterate(monkeypatch):
    rng = np.random.default_rng(15)
    A = _t(spd_with_condition(5, 10.0, rng))
    real = ns._device_solve

    def blown(be, A3, n_iter, scaling, eps, want):
        out, flags = real(be, A3, n_iter, scaling, eps, want)
        flags = flags.clone()
        flags[:, ns._DEVICE_FLAGS.index("out_finite")] = 0.0  # pretend the output was not finite
        return out * float("nan"), flags

    monkeypatch.setitem(tb._SETTINGS, "force_device_path", True)
    monkeypatch.setattr(ns, "_device_solve", blown)
    D = nsiter.inv_sqrtm(A, n_iter=10)
    np.testing.assert_allclose(D.numpy(), reference.inv_sqrtm(A.numpy()), rtol=0, atol=1e-10)


_DEVICE_CASES = [dict(n_iter=7), dict(n_iter=7, scaling="spectral"), dict(n_iter=7, scaling="trace"), dict(),
                 dict(tol=1e-9), dict(n_iter=20, return_info=True), dict(method="accelerated"),
                 dict(method="auto"), dict(method="auto", return_info=True), dict(method="eigh"),
                 dict(method="uncoupled", n_iter=6, return_info=True)]


@pytest.mark.parametrize("want", ["isqrt", "sqrt"])
@pytest.mark.parametrize("kw", _DEVICE_CASES)
def test_device_path_on_cpu_tensors_equals_the_host_path(kw, want, monkeypatch):
    """The branches that run on CUDA (device-side checks and probe, no host sync, auto
    without eigh) run here on CPU tensors: same results as the host path, same info."""
    rng = np.random.default_rng(21)
    A = _t(spd_with_condition(9, 1e3, rng, batch=(3,)))
    fn = nsiter.inv_sqrtm if want == "isqrt" else nsiter.sqrtm_psd
    ref = fn(A, **kw)
    monkeypatch.setitem(tb._SETTINGS, "force_device_path", True)
    got = fn(A, **kw)
    if kw.get("return_info"):
        (ref, ri), (got, gi) = ref, got
        if kw.get("method") != "auto":  # (device auto never picks eigh)
            for field in ("converged", "diverged", "best_iter"):
                np.testing.assert_array_equal(getattr(gi, field), getattr(ri, field))
    tol = 1e-9 if kw.get("method") in ("auto", "accelerated") or kw == {} else 1e-12
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=0, atol=tol * float(ref.abs().max()))


def test_device_path_on_cpu_tensors_raises_and_warns_like_the_host_path(monkeypatch):
    monkeypatch.setitem(tb._SETTINGS, "force_device_path", True)
    A = _t(spd_with_condition(4, 10.0, np.random.default_rng(22)))
    for bad, match in ((A * float("nan"), "finite"), (A + torch.triu(torch.ones(4, 4), 1), "symmetric"),
                       (-A, "positive semidefinite"), (0 * A, "zero matrix")):
        with pytest.raises(ValueError, match=match):
            nsiter.inv_sqrtm(bad, n_iter=5)
    v = torch.arange(1.0, 5.0, dtype=torch.float64)[:, None]
    with pytest.warns(nsiter.IllConditionedWarning, match="eps"):
        nsiter.inv_sqrtm(v @ v.T, n_iter=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nsiter.inv_sqrtm(v @ v.T, tol=1e-8)  # (the singular matrix also diverges)
    assert nsiter.IllConditionedWarning in {w.category for w in caught}


def test_settings_setters_return_the_old_value_and_the_context_restores_it():
    assert tb.set_cuda_graphs(False) is True and tb.set_cuda_graphs(True) is False
    assert tb.set_allow_tf32(False) is False
    with tb.allow_tf32(True):
        assert tb._SETTINGS["allow_tf32"] is True
    assert tb._SETTINGS["allow_tf32"] is False


def test_cuda_graph_runner_runs_eagerly_off_cuda():
    A = _t(spd_with_condition(4, 10.0, np.random.default_rng(23)))[None]
    calls = []
    out = tlinalg.run_device(lambda X: (calls.append(1), X * 2.0)[1:], A, ("key",))
    assert calls and torch.equal(out[0], A * 2.0) and not tlinalg._GRAPHS


# ------------------------------------------------------------------------------ autograd

def _sym(S, n, shift=3.0):
    return (S + S.transpose(-1, -2)) / 2 + shift * torch.eye(n, dtype=S.dtype)


def test_gradcheck_im2col_col2im():
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda t: nsiter.im2col(t, (2, 3), stride=(1, 2), padding=1, dilation=(2, 1)), (x,))
    X = torch.randn(2 * 16, 8, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda t: nsiter.col2im(t, (2, 2, 5, 5), 2), (X,))


def test_gradcheck_covariance_and_patch_covariance():
    X = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda t: nsiter.covariance(t, eps=0.1), (X,))
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    for grouping in ("contiguous", "reference"):
        assert gradcheck(
            lambda t: nsiter.patch_covariance(t, 3, padding=1, sampling_stride=2, block_size=1, grouping=grouping),
            (x,), fast=True)


@pytest.mark.parametrize("kw, fast", [(dict(n_iter=5), False), (dict(n_iter=4, scaling="trace"), False),
                                      (dict(method="eigh"), False), (dict(tol=1e-8), True),
                                      (dict(method="accelerated", tol=1e-8), True),
                                      (dict(method="uncoupled", n_iter=4), True)])
def test_gradcheck_inv_sqrtm(kw, fast):
    """The unrolled iterations are differentiable (fixed count, tolerance mode, schedules, eigh)."""
    g = torch.Generator().manual_seed(7)
    S = (0.5 * torch.randn(4, 4, dtype=torch.float64, generator=g)).requires_grad_()  # _sym(S) is SPD
    assert gradcheck(lambda s: nsiter.inv_sqrtm(_sym(s, 4), **kw), (S,), fast=fast)


def test_gradcheck_whitening_of_a_data_matrix():
    X = torch.randn(15, 3, dtype=torch.float64, requires_grad=True)

    def whiten(t):
        cov, mean = nsiter.covariance(t, eps=1e-2)
        return (t - mean) @ nsiter.inv_sqrtm(cov, n_iter=6)

    assert gradcheck(whiten, (X,))


# ------------------------------------------------------------------------------ TF32 flags

_FLAG_SCRIPT = r"""
import sys, torch, warnings
warnings.simplefilter("ignore")
from nsiter import _torch as tb
m = torch.backends.cuda.matmul
def state():
    out = []
    for f in (lambda: m.fp32_precision, lambda: torch.backends.mkldnn.matmul.fp32_precision,
              torch.get_float32_matmul_precision, lambda: m.allow_tf32):
        try:
            out.append(str(f()))
        except RuntimeError:
            out.append("ERR")
    return out
setups = ["pass", "m.allow_tf32 = True", "torch.set_float32_matmul_precision('medium')",
          "m.fp32_precision = 'tf32'", "torch.backends.fp32_precision = 'tf32'", "m.allow_tf32 = False"]
for setup in setups:  # each leaves the flags in a new (possibly mixed-API) state
    exec(setup)
    before = state()
    with tb.matmul_precision(torch.device("cuda")):
        inside_off = m.allow_tf32
    with tb.allow_tf32(True), tb.matmul_precision(torch.device("cuda")):
        inside_on = m.allow_tf32
    print(setup.replace(" ", ""), before == state(), inside_off, inside_on)
import nsiter.torch
print("nsiter.torch", hasattr(nsiter.torch, "Deconv2d"))
"""


def test_tf32_is_off_inside_and_the_callers_flags_are_restored():
    """Whichever API the caller set TF32 with (legacy flag, precision API, per-backend API, a mix),
    the flags are restored exactly, and inside nsiter's products TF32 is off unless opted in.
    (CPU builds of torch keep the CUDA flags too; a subprocess keeps this process's flags clean.)"""
    r = _run(_FLAG_SCRIPT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 7 and lines[-1] == "nsiter.torch True", r.stdout
    for line in lines[:-1]:
        assert line.split()[1:] == ["True", "False", "True"], line


# ------------------------------------------------------------------------------ Deconv2d

def _explicit(layer, x, mean, D):
    """im2col -> per block (X - mu) D -> @ w + b, in float64 numpy (the definition)."""
    x = x.detach().numpy()
    W = layer.weight.detach().numpy()
    b = 0.0 if layer.bias is None else layer.bias.detach().numpy()
    mean, D = mean.detach().numpy(), D.detach().numpy()
    G, O = layer.groups, layer.out_channels
    cg = layer.in_channels // G
    B = layer.block_size
    nb = cg // B
    kh, kw = layer.kernel_size
    fb = B * kh * kw
    X = reference.im2col(x, layer.kernel_size, layer.stride, layer.padding, layer.dilation)
    Y = np.zeros((X.shape[0], O))
    og = O // G
    for g in range(G):
        Xg = X[:, g * cg * kh * kw:(g + 1) * cg * kh * kw]
        Xw = np.empty_like(Xg)
        for c in range(nb):
            if layer.grouping == "reference":
                cols, m, Dm = np.arange(fb) * nb + c, mean[g, 0], D[g, 0]
            else:
                cols, m, Dm = c * fb + np.arange(fb), mean[g, c], D[g, c]
            Xw[:, cols] = (Xg[:, cols] - m) @ Dm
        Y[:, g * og:(g + 1) * og] = Xw @ W[g * og:(g + 1) * og].reshape(og, -1).T
    Y = Y + b
    oh, ow = nsiter.output_shape(x.shape, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                                 dilation=layer.dilation)
    return Y.reshape(x.shape[0], oh, ow, O).transpose(0, 3, 1, 2)


LAYERS = [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, block_size=2),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, block_size=2, grouping="contiguous"),
    dict(in_channels=6, out_channels=4, kernel_size=(2, 3), stride=2, dilation=(1, 2), groups=2, block_size=1,
         grouping="contiguous", bias=False),
    dict(in_channels=6, out_channels=4, kernel_size=(3, 2), padding=(1, 0), groups=2, block_size=1),
    dict(in_channels=3, out_channels=5, kernel_size=1),
]


@pytest.mark.parametrize("kw", LAYERS)
def test_deconv2d_equals_explicit_whitening_in_train_and_eval(kw):
    torch.manual_seed(0)
    layer = nt.Deconv2d(**kw, dtype=torch.float64)
    x = torch.randn(3, layer.in_channels, 9, 10, dtype=torch.float64)
    y = layer(x)  # train: batch statistics (and one running-average update)
    mean, D = layer.batch_statistics(x)
    np.testing.assert_allclose(y.detach().numpy(), _explicit(layer, x, mean, D), rtol=0, atol=1e-10)
    layer.eval()
    y = layer(torch.randn(2, layer.in_channels, 7, 8, dtype=torch.float64))
    x2 = torch.randn(2, layer.in_channels, 7, 8, dtype=torch.float64)
    np.testing.assert_allclose(layer(x2).detach().numpy(),
                               _explicit(layer, x2, layer.running_mean, layer.running_deconv), rtol=0, atol=1e-10)


def test_deconv2d_statistics_are_patch_covariance_and_inv_sqrtm():
    torch.manual_seed(1)
    for grouping, want_shape in (("reference", (1, 1, 18)), ("contiguous", (1, 2, 18))):
        layer = nt.Deconv2d(4, 3, 3, padding=1, block_size=2, grouping=grouping, sampling_stride=2, eps=1e-3,
                            n_iter=7, dtype=torch.float64)
        x = torch.randn(2, 4, 10, 10, dtype=torch.float64)
        mean, D = layer.batch_statistics(x)
        assert mean.shape == want_shape
        cov, mu = nsiter.patch_covariance(x, 3, padding=1, sampling_stride=2, block_size=2, grouping=grouping,
                                          eps=1e-3)
        cov, mu = cov.reshape(D.shape), mu.reshape(mean.shape)
        torch.testing.assert_close(mean, mu, rtol=0, atol=1e-12)
        torch.testing.assert_close(D, nsiter.inv_sqrtm(cov, n_iter=7), rtol=0, atol=1e-10)


def test_deconv2d_reproduces_the_reference_fastdeconv_forward():
    """groups=1, reference grouping: the reference code's forward pass, transcribed."""
    torch.manual_seed(2)
    layer = nt.Deconv2d(4, 5, 3, padding=1, block_size=2, dtype=torch.float64)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    C, B, nf = 4, 2, 18
    X = F.unfold(x, 3, 1, 1, 3).transpose(1, 2).contiguous()
    X = X.view(-1, nf, C // B).transpose(1, 2).contiguous().view(-1, nf)
    X_mean = X.mean(0)
    X = X - X_mean.unsqueeze(0)
    Cov = torch.addmm(torch.eye(nf, dtype=X.dtype), X.t(), X, beta=1e-5, alpha=1.0 / X.shape[0])
    deconv = _ref_isqrt_newton_schulz(Cov, 5)
    w = layer.weight.view(-1, nf, C // B).transpose(1, 2).contiguous().view(-1, nf) @ deconv
    b = layer.bias - (w @ (X_mean.unsqueeze(1))).view(layer.weight.shape[0], -1).sum(1)
    w = w.view(-1, C // B, nf).transpose(1, 2).contiguous().view(layer.weight.shape)
    want = F.conv2d(x, w, b, 1, 1)
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.running_mean[0, 0], 0.1 * X_mean, rtol=0, atol=1e-14)
    torch.testing.assert_close(layer.running_deconv[0, 0], 0.9 * torch.eye(nf, dtype=x.dtype) + 0.1 * deconv,
                               rtol=0, atol=1e-12)


def test_deconv2d_untrained_eval_is_a_plain_convolution():
    layer = nt.Deconv2d(3, 4, 3, padding=1).eval()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, layer.bias, padding=1))


def test_deconv2d_gradients_flow_through_the_whitening():
    torch.manual_seed(3)
    layer = nt.Deconv2d(2, 2, 2, block_size=1, sampling_stride=1, n_iter=3, dtype=torch.float64)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda t: layer(t), (x,), fast=True)
    layer(x).square().sum().backward()
    assert layer.weight.grad.abs().sum() > 0 and layer.bias.grad.abs().sum() > 0
    # the input gradient differs from the one with D held fixed: D depends on x (appendix A.8, Eq. 12)
    mean, D = (t.detach() for t in layer.batch_statistics(x))
    w, b = layer.folded_weights(mean, D)
    gx_fixed, = torch.autograd.grad(F.conv2d(x, w, b).square().sum(), x)
    gx, = torch.autograd.grad(layer(x).square().sum(), x)
    assert (gx - gx_fixed).abs().max() > 1e-6


def test_deconv2d_trains_and_state_dict_round_trips():
    torch.manual_seed(4)
    net = torch.nn.Sequential(nt.Deconv2d(3, 8, 3, padding=1), torch.nn.ReLU(), nt.Deconv2d(8, 2, 3, block_size=4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(8, 3, 8, 8)
    target = torch.randn(8, 2, 6, 6)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.mse_loss(net(x), target)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert int(net[0].num_batches_tracked) == 3
    clone = torch.nn.Sequential(nt.Deconv2d(3, 8, 3, padding=1), torch.nn.ReLU(), nt.Deconv2d(8, 2, 3, block_size=4))
    clone.load_state_dict(net.state_dict())
    torch.testing.assert_close(clone.eval()(x), net.eval()(x))


def test_deconv2d_block_size_is_clamped_and_checked():
    assert nt.Deconv2d(3, 8, 3).block_size == 3
    assert nt.Deconv2d(128, 8, 3).block_size == 64
    assert nt.Deconv2d(8, 8, 3, groups=4).block_size == 2
    with pytest.raises(ValueError, match=r"use block_size=32 \(gcd\(64, 96\)\)"):
        nt.Deconv2d(96, 8, 3)
    with pytest.raises(ValueError, match="groups=3 must divide"):
        nt.Deconv2d(4, 6, 3, groups=3)
    with pytest.raises(ValueError, match="momentum in"):
        nt.Deconv2d(4, 6, 3, momentum=0.0)
    with pytest.raises(ValueError, match="unknown grouping"):
        nt.Deconv2d(4, 6, 3, grouping="interleaved")
    with pytest.raises(ValueError, match="expected 4 input channels"):
        nt.Deconv2d(4, 6, 3)(torch.ones(1, 3, 5, 5))


def test_deconv2d_whitening_runs_in_float32_under_autocast():
    layer = nt.Deconv2d(4, 4, 3, padding=1, block_size=2)
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mean, D = layer.batch_statistics(x)
        y = layer(x)
    assert D.dtype == torch.float32 and mean.dtype == torch.float32
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_deconv2d_refuses_a_non_finite_batch_and_leaves_its_buffers_unchanged(bad):
    layer = nt.Deconv2d(4, 3, 3, padding=1, block_size=2)
    layer(torch.randn(2, 4, 8, 8))  # one clean update: buffers away from their initial values
    before = copy.deepcopy(layer.state_dict())
    x = torch.randn(2, 4, 8, 8)
    x[1, 2, 3, 4] = bad
    for train in (True, False):
        layer.train(train)
        with pytest.raises(ValueError, match=r"1 of its 512 values NaN or inf in (training|eval) mode.*"
                                             r"unchanged.*nan_to_num"):
            layer(x)
        for name, value in layer.state_dict().items():
            torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    clean = torch.randn(1, 4, 8, 8)
    assert torch.isfinite(layer.eval()(clean)).all()


# ------------------------------------------------------------------------------ whitening helpers

LAYOUTS = [(None, "contiguous"), (2, "contiguous"), (2, "reference"), (1, "reference")]


@pytest.mark.parametrize("block_size, grouping", LAYOUTS)
def test_whitening_helpers_match_numpy(block_size, grouping):
    rng = np.random.default_rng(20)
    x = random_images((2, 4, 9, 10), rng) + 1.0
    X = nsiter.im2col(x, 3, padding=1)
    cov, mean = nsiter.patch_covariance(x, 3, padding=1, block_size=block_size, grouping=grouping)
    D = nsiter.inv_sqrtm(cov, method="eigh", eps=1e-3)
    Xw = nsiter.whiten(_t(X), _t(mean), _t(D), grouping=grouping)
    assert isinstance(Xw, torch.Tensor)
    np.testing.assert_allclose(Xw.numpy(), nsiter.whiten(X, mean, D, grouping=grouping), rtol=0, atol=1e-12)
    K = nsiter.deconvolution_kernel(_t(D), 3, 4, grouping=grouping)
    np.testing.assert_array_equal(K.numpy(), nsiter.deconvolution_kernel(D, 3, 4, grouping=grouping))
    w, b = rng.standard_normal((5, 4, 3, 3)), rng.standard_normal(5)
    w2, b2 = nsiter.fold_deconvolution(_t(w), _t(b), _t(D), _t(mean), grouping=grouping)
    w1, b1 = nsiter.fold_deconvolution(w, b, D, mean, grouping=grouping)
    np.testing.assert_allclose(w2.numpy(), w1, rtol=0, atol=1e-12)
    np.testing.assert_allclose(b2.numpy(), b1, rtol=0, atol=1e-12)
    y = nsiter.deconvolve_image(_t(x), 3, method="eigh", block_size=block_size, grouping=grouping)
    want = nsiter.deconvolve_image(x, 3, method="eigh", block_size=block_size, grouping=grouping)
    np.testing.assert_allclose(y.numpy(), want, rtol=0, atol=1e-10)


def test_fold_deconvolution_grouped_and_without_bias_matches_numpy():
    rng = np.random.default_rng(21)
    x = random_images((2, 4, 8, 8), rng)
    cov, mean = nsiter.patch_covariance(x, 3, block_size=2)
    D = nsiter.inv_sqrtm(cov, method="eigh", eps=1e-3)
    w = rng.standard_normal((6, 2, 3, 3))  # a grouped convolution: groups = 2
    got = nsiter.fold_deconvolution(_t(w), None, _t(D), _t(mean))
    want = nsiter.fold_deconvolution(w, None, D, mean)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.numpy(), b, rtol=0, atol=1e-12)


def test_deconvolve_image_float32_and_shapes():
    rng = np.random.default_rng(22)
    x = random_images((12, 13), rng).astype(np.float32)
    y = nsiter.deconvolve_image(_t(x), 5, n_iter=10)
    assert y.shape == x.shape and y.dtype == torch.float32
    want = nsiter.deconvolve_image(x, 5, n_iter=10)
    np.testing.assert_allclose(y.numpy(), want, rtol=0, atol=1e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match="odd kernel_size"):
        nsiter.deconvolve_image(_t(x), 4)


def test_deconv2d_folding_is_fold_deconvolution():
    torch.manual_seed(6)
    layer = nt.Deconv2d(4, 3, 3, padding=1, block_size=2, dtype=torch.float64)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    mean, D = layer.batch_statistics(x)
    w, b = layer.folded_weights(mean, D)
    w2, b2 = nsiter.fold_deconvolution(layer.weight, layer.bias, D[0, 0], mean[0, 0], grouping="reference")
    torch.testing.assert_close(w, w2, rtol=0, atol=1e-13)
    torch.testing.assert_close(b, b2, rtol=0, atol=1e-13)


def test_gradcheck_whiten_and_fold():
    rng = np.random.default_rng(23)
    X = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    m = torch.randn(4, dtype=torch.float64, requires_grad=True)
    Dm = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a, b, c: nsiter.whiten(a, b, c, grouping="reference"), (X, m, Dm))
    w = torch.randn(2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    Ds = _t(rng.standard_normal((2, 4, 4))).requires_grad_()
    ms = _t(rng.standard_normal((2, 4))).requires_grad_()
    assert gradcheck(lambda *a: nsiter.fold_deconvolution(*a), (w, b, Ds, ms))


def test_whitening_helper_errors():
    D = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="does not match the 9 columns"):
        nsiter.whiten(torch.ones(3, 9, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), D)
    with pytest.raises(ValueError, match="expected mean of shape"):
        nsiter.whiten(torch.ones(3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), D)
    with pytest.raises(ValueError, match="NaN/inf"):
        nsiter.whiten(torch.full((3, 4), float("nan")), torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match=r"expected bias of shape \(2,\)"):
        nsiter.fold_deconvolution(torch.ones(2, 1, 2, 2), torch.ones(3), D, torch.zeros(4))


# ------------------------------------------------------------------------------ estimate_kernel

def test_estimate_kernel_on_tensors_returns_a_tensor_kernel():
    rng = np.random.default_rng(16)
    x = random_images((24, 24), rng)
    k = rng.standard_normal((3, 3))
    y = (nsiter.im2col(x, 3) @ k.ravel()).reshape(22, 22)
    want = nsiter.estimate_kernel(x, y, 3, method="gd_whitened")
    seen = []
    got = nsiter.estimate_kernel(_t(x).float(), _t(y), 3, method="gd_whitened", callback=lambda w, b: seen.append(w))
    assert isinstance(got.kernel, torch.Tensor) and got.kernel.dtype == torch.float64
    np.testing.assert_allclose(got.kernel.numpy(), want.kernel, rtol=0, atol=1e-6)
    assert isinstance(seen[0], torch.Tensor) and got.n_iter == 1
    est32 = nsiter.estimate_kernel(_t(x).float(), _t(y).float(), 3)
    assert est32.kernel.dtype == torch.float32
    np.testing.assert_allclose(est32.kernel.numpy(), k, atol=1e-4)


# ------------------------------------------------------------------------------ GPU (skipped without CUDA)

@pytest.mark.gpu
def test_gpu_round_trips_keep_device_and_dtype():
    rng = np.random.default_rng(17)
    x = random_images((2, 4, 12, 12), rng)
    xc = _t(x).to(CUDA)
    X = nsiter.im2col(xc, 3, padding=1)
    assert X.device.type == "cuda"
    np.testing.assert_array_equal(X.cpu().numpy(), nsiter.im2col(x, 3, padding=1))
    back = nsiter.col2im(X, x.shape, 3, padding=1)
    np.testing.assert_allclose(back.cpu().numpy(), nsiter.col2im(nsiter.im2col(x, 3, padding=1), x.shape, 3, padding=1),
                               rtol=1e-14, atol=1e-13)
    cov, mean = nsiter.patch_covariance(xc.float(), 3, padding=1, block_size=2)
    assert cov.device.type == "cuda" and cov.dtype == torch.float32
    A = _t(spd_with_condition(27, 1e3, rng, batch=16))
    D = nsiter.inv_sqrtm(A.to(CUDA), n_iter=10)
    assert D.device.type == "cuda"
    np.testing.assert_allclose(D.cpu().numpy(), nsiter.inv_sqrtm(A.numpy(), n_iter=10), rtol=0, atol=1e-10)


@pytest.mark.gpu
def test_gpu_cuda_graph_path_equals_eager_and_reports_errors():
    rng = np.random.default_rng(18)
    A = _t(spd_with_condition(27, 1e3, rng, batch=4)).float().to(CUDA)
    old = tb.set_cuda_graphs(False)
    try:
        eager = nsiter.inv_sqrtm(A, n_iter=15)
    finally:
        tb.set_cuda_graphs(old)
    tlinalg._GRAPHS.clear()
    graph1 = nsiter.inv_sqrtm(A, n_iter=15)
    graph2 = nsiter.inv_sqrtm(A * 2.0, n_iter=15)  # replay with new data
    assert len(tlinalg._GRAPHS) == 1 and next(iter(tlinalg._GRAPHS.values()))
    torch.testing.assert_close(graph1, eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(graph2, eager / 2 ** 0.5, rtol=1e-5, atol=1e-6)
    bad = A.clone()
    bad[0, 0, 1] += 1.0
    with pytest.raises(ValueError, match="symmetric"):
        nsiter.inv_sqrtm(bad, n_iter=15)


@pytest.mark.gpu
def test_gpu_tf32_flags_are_restored_around_a_real_matmul():
    m = torch.backends.cuda.matmul
    before = m.fp32_precision
    A = _t(spd_with_condition(64, 1e2, np.random.default_rng(19), batch=2)).float().to(CUDA)
    nsiter.inv_sqrtm(A, n_iter=8)
    assert m.fp32_precision == before


@pytest.mark.gpu
def test_gpu_deconv2d_matches_cpu():
    torch.manual_seed(5)
    layer = nt.Deconv2d(8, 4, 3, padding=1, block_size=4, dtype=torch.float64)
    gpu = copy.deepcopy(layer).to(CUDA)
    x = torch.randn(4, 8, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(gpu(x.to(CUDA)).cpu(), layer(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(gpu.eval()(x.to(CUDA)).cpu(), layer.eval()(x), rtol=0, atol=1e-10)
