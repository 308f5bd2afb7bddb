"""Package-level behaviour: import hygiene, JIT cache reuse, CLI info/version, sample data."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import nsiter


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_nsiter_does_not_import_torch():
    r = _run("import sys, nsiter; nsiter.im2col([[1.0, 2.0], [3.0, 4.0]], 1); "
             "print('torch' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_second_process_loads_im2col_from_the_numba_cache():
    code = ("import numpy as np, nsiter\n"
            "from nsiter._numba._im2col import _im2col\n"
            "nsiter.im2col(np.zeros((2, 5, 5), np.float32), 3)\n"
            "print(sum(_im2col.stats.cache_hits.values()), sum(_im2col.stats.cache_misses.values()))\n")
    first = _run(code)  # compiles and writes the cache if it was not there yet
    assert first.returncode == 0, first.stderr
    second = _run(code)
    assert second.returncode == 0, second.stderr
    hits, misses = (int(v) for v in second.stdout.split())
    assert hits >= 1 and misses == 0


def test_cli_version_and_info():
    r = subprocess.run([sys.executable, "-m", "nsiter.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"nsiter {nsiter.__version__}"
    r = subprocess.run([sys.executable, "-m", "nsiter.cli", "info", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    for key in ("nsiter", "numpy", "scipy", "numba", "numba_threads", "torch"):
        assert key in info
    assert info["numba_threads"] >= 1


def test_cli_usage_errors_exit_2_with_one_line():
    r = subprocess.run([sys.executable, "-m", "nsiter.cli", "no-such-command"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_sample_image_is_grace_hopper_in_unit_range():
    img = nsiter.data.sample_image()
    assert img.shape == (3, 600, 512) and img.dtype == np.float64
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.1
    hwc = nsiter.data.sample_image(channels_first=False, dtype=np.float32)
    assert hwc.shape == (600, 512, 3) and hwc.dtype == np.float32
    np.testing.assert_allclose(np.moveaxis(hwc, -1, 0), img, atol=1e-6)
    gray = nsiter.data.sample_image(gray=True)
    np.testing.assert_allclose(gray, np.tensordot([0.299, 0.587, 0.114], img, axes=1), atol=1e-12)


def test_load_image_roundtrip_and_errors(tmp_path):
    import matplotlib.image as mpimg

    rng = np.random.default_rng(0)
    rgb = rng.random((7, 5, 3))
    path = tmp_path / "img.png"
    mpimg.imsave(path, rgb)
    img = nsiter.data.load_image(path)
    assert img.shape == (3, 7, 5)
    np.testing.assert_allclose(img, np.moveaxis(rgb, -1, 0), atol=1 / 255)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        nsiter.data.load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="could not read"):
        nsiter.data.load_image(bad)
    with pytest.raises(TypeError, match="float32 or float64"):
        nsiter.data.load_image(path, dtype=np.int32)
