"""Fork and thread safety of the parallel Numba kernels: the threading layer of nsiter._config.

Each configuration runs in a fresh interpreter (the layer is fixed once per process) under a
timeout, so a regression -- a fork pool or DataLoader worker hanging on GNU OpenMP, workqueue
aborting under threads -- fails instead of hanging CI.
"""
from __future__ import annotations

import functools
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

import nsiter
from nsiter._config import THREADING

HAS_FORK = "fork" in multiprocessing.get_all_start_methods()
# platforms where pyproject.toml's tbb dependency installs a wheel
TBB_PLATFORM = (platform.system(), platform.machine()) in {("Linux", "x86_64"), ("Windows", "AMD64")}

# Run in a child: configure the mode, compute every workload serially (the first parallel kernel
# launches the layer), then the same workloads from 4 threads at once and from a fork pool.
_WORKLOADS = textwrap.dedent(r"""
    import json, multiprocessing, sys, threading
    mode = sys.argv[1]
    if mode == "no-tbb":
        sys.modules["numba.np.ufunc.tbbpool"] = None  # as on a platform without TBB
    if mode == "launched-before":
        import numba
        @numba.njit(parallel=True)
        def _touch(a):
            for i in numba.prange(a.size):
                a[i] += 1.0
        import numpy
        _touch(numpy.zeros(4))  # a parallel kernel before nsiter: the layer is Numba's default
    import numba
    import numpy as np
    import nsiter
    from nsiter._config import THREADING

    rng = np.random.default_rng(13)
    G = rng.standard_normal((16, 27, 60))
    A64 = G @ G.transpose(0, 2, 1) / 60 + 0.1 * np.eye(27)
    A32 = A64.astype(np.float32)
    img = rng.standard_normal((2, 8, 16, 16))
    img32 = img.astype(np.float32)
    cols = nsiter.im2col(img, 3, padding=1)
    WORK = [
        ("inv_sqrtm float32 n_iter=5", lambda: nsiter.inv_sqrtm(A32, n_iter=5)),
        ("inv_sqrtm float64 tol", lambda: nsiter.inv_sqrtm(A64)),
        ("inv_sqrtm eigh", lambda: nsiter.inv_sqrtm(A64, method="eigh")),
        ("patch_covariance stride 1", lambda: nsiter.patch_covariance(img, 3, padding=1)[0]),
        ("patch_covariance stride 2", lambda: nsiter.patch_covariance(img, 3, stride=2, padding=1)[0]),
        ("im2col float32", lambda: nsiter.im2col(img32, 3, padding=1)),
        ("col2im", lambda: nsiter.col2im(cols, img.shape, 3, padding=1)),
    ]

    def run(i):
        return WORK[i][1]()

    serial = [run(i) for i in range(len(WORK))]
    report = dict(layer=numba.threading_layer(), choice=THREADING._asdict(), thread_mismatch=[],
                  fork_mismatch=None)

    barrier = threading.Barrier(4)
    def worker(k):
        barrier.wait()
        for rep in range(3):
            for j in range(len(WORK)):
                i = (j + k + rep) % len(WORK)
                if not np.array_equal(run(i), serial[i]):
                    report["thread_mismatch"].append(WORK[i][0])
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    if sys.argv[2] == "fork":
        with multiprocessing.get_context("fork").Pool(2) as pool:
            forked = pool.map_async(run, range(len(WORK))).get(timeout=60)
        report["fork_mismatch"] = [w[0] for w, a, b in zip(WORK, forked, serial) if not np.array_equal(a, b)]
    print(json.dumps(report))
""")

_DATALOADER = textwrap.dedent(r"""
    import json, sys
    if sys.argv[1] == "no-tbb":
        sys.modules["numba.np.ufunc.tbbpool"] = None
    import numba
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, Dataset
    import nsiter

    class Whitened(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            x = np.random.default_rng(i).standard_normal((2, 4, 8, 8))
            cov, _ = nsiter.patch_covariance(x, 3, padding=1, eps=1e-3)
            return torch.from_numpy(nsiter.inv_sqrtm(cov, n_iter=5))

    serial = torch.stack([Whitened()[i] for i in range(8)])  # parallel kernels ran in the parent
    loader = DataLoader(Whitened(), batch_size=2, num_workers=2, multiprocessing_context="fork", timeout=60)
    got = torch.cat(list(loader))
    print(json.dumps(dict(layer=numba.threading_layer(), equal=bool(torch.equal(got, serial)))))
""")

_ENV = {"default": {}, "no-tbb": {}, "launched-before": {}, "user-workqueue": {"NUMBA_THREADING_LAYER": "workqueue"},
        "user-omp": {"NUMBA_THREADING_LAYER": "omp"},
        "user-priority": {"NUMBA_THREADING_LAYER_PRIORITY": "workqueue tbb omp"}}


def _child(script: str, mode: str, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING_LAYER")}
    env.update(_ENV[mode])
    try:
        proc = subprocess.run([sys.executable, "-c", script, mode, *args], capture_output=True, text=True,
                              timeout=240, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{mode}: the child hung (a fork or thread deadlock?); stderr: {exc.stderr!r}")
    assert proc.returncode == 0, f"{mode}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@functools.lru_cache(maxsize=None)
def _report(mode: str) -> dict:
    # GNU OpenMP (the user's choice, or Numba's before nsiter came) cannot survive a fork: threads only
    fork = HAS_FORK and mode not in ("user-omp", "launched-before")
    return _child(_WORKLOADS, mode, "fork" if fork else "no-fork")


def _expected_default_layer() -> str:
    return "tbb" if TBB_PLATFORM or THREADING.tbb else "workqueue"


def test_threading_layer_of_this_process_is_the_one_chosen():
    nsiter.inv_sqrtm(np.stack([np.eye(5) * 2.0] * 8), n_iter=5)  # a prange kernel: the layer is launched
    if THREADING.source == "nsiter":  # (a user's NUMBA_THREADING_LAYER is tested in children below)
        assert THREADING.layer == numba.threading_layer() == _expected_default_layer()


def test_tbb_is_chosen_and_active_where_the_dependency_installs_it():
    if not TBB_PLATFORM:
        pytest.skip("no tbb wheels for this platform: nsiter uses workqueue (tested below)")
    r = _report("default")
    assert r["choice"]["source"] == "nsiter" and r["choice"]["layer"] == "tbb", (
        "TBB did not load: is the tbb dependency installed (pip install -e .)?")
    assert r["layer"] == "tbb" and not r["choice"]["serialised"]
    from importlib.metadata import distribution
    assert os.path.dirname(r["choice"]["tbb"]) in {os.path.dirname(os.path.abspath(f.locate()))
                                                    for f in distribution("tbb").files}


@pytest.mark.parametrize("mode, configured, running, source, serialised", [
    ("no-tbb", "workqueue", "workqueue", "nsiter", True),  # the fallback where TBB does not load
    ("user-workqueue", "workqueue", "workqueue", "user", True),
    ("user-omp", "omp", "omp", "user", False),
    ("user-priority", "default", "workqueue", "user", True),  # Numba's default with the user's priority
])
def test_threading_layer_in_use_is_the_one_chosen(mode, configured, running, source, serialised):
    r = _report(mode)
    assert r["choice"] == dict(r["choice"], layer=configured, source=source, serialised=serialised)
    assert r["layer"] == running


def test_a_layer_launched_before_nsiter_is_reported_and_serialised_if_workqueue():
    r = _report("launched-before")
    assert r["choice"]["source"] == "running" and r["choice"]["layer"] == r["layer"]
    assert r["choice"]["serialised"] is (r["layer"] == "workqueue")


@pytest.mark.skipif(not HAS_FORK, reason="no fork start method on this platform")
@pytest.mark.parametrize("mode", ["default", "no-tbb", "user-workqueue"])
def test_fork_pool_after_parallel_kernels_completes_with_identical_results(mode):
    assert _report(mode)["fork_mismatch"] == []


@pytest.mark.parametrize("mode", ["default", "no-tbb", "user-workqueue", "user-omp", "user-priority"])
def test_threads_calling_nsiter_concurrently_are_bit_identical_to_serial(mode):
    # workqueue alone aborts the process here ("Concurrent access has been detected")
    assert _report(mode)["thread_mismatch"] == []


@pytest.mark.skipif(not HAS_FORK, reason="no fork start method on this platform")
@pytest.mark.parametrize("mode", ["default", "no-tbb"])
def test_dataloader_workers_calling_nsiter_work(mode):
    pytest.importorskip("torch")
    r = _child(_DATALOADER, mode)
    assert r["equal"] and r["layer"] == (_expected_default_layer() if mode == "default" else "workqueue")


def test_parallel_kernels_are_called_from_python_only():
    """Under workqueue nsiter._config wraps each parallel kernel in a lock-holding Python function,
    which compiled code cannot call: no jitted function may call a parallel kernel."""
    import importlib
    import pkgutil

    from numba.core.dispatcher import Dispatcher

    import nsiter._numba

    def dispatcher(obj):
        return obj if isinstance(obj, Dispatcher) else getattr(obj, "__wrapped__", None)

    n_parallel = 0
    for info in pkgutil.iter_modules(nsiter._numba.__path__):
        module = importlib.import_module(f"nsiter._numba.{info.name}")
        kernels = {name: d for name, obj in vars(module).items() if isinstance(d := dispatcher(obj), Dispatcher)}
        parallel = {name for name, d in kernels.items() if d.targetoptions.get("parallel")}
        n_parallel += len(parallel)
        for name, d in kernels.items():
            assert not set(d.py_func.__code__.co_names) & parallel, (
                f"nsiter._numba.{info.name}.{name} calls parallel kernels {set(d.py_func.__code__.co_names) & parallel}")
    assert n_parallel >= 5
