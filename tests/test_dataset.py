"""Shard files (PatchStatistics.save / load), nsiter.dataset_statistics on Dask, and ``nsiter stats``."""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import nsiter
from nsiter import dataset as ds
from nsiter.cli import main
from nsiter.covariance import SHARD_KEYS, write_npz_atomic

from helpers import random_images

Image = pytest.importorskip("PIL.Image")
dask = pytest.importorskip("dask")
pytest.importorskip("dask.array")

SETTINGS = [dict(kernel_size=3), dict(kernel_size=(3, 2), stride=2, padding=1, dilation=(1, 2), sampling_stride=2),
            dict(kernel_size=3, block_size=1), dict(kernel_size=3, block_size=1, grouping="reference")]


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def _write_pngs(folder, n, rng, size=(16, 16), mode="RGB"):
    """``n`` smooth random 8-bit images as PNG files ``img_0000.png`` ...; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        x = random_images((3,) + size, rng)
        x = np.clip(128 + 40 * (x - x.mean()) / (x.std() + 1e-12), 0, 255).astype(np.uint8)
        paths.append(folder / f"img_{i:04d}.png")
        Image.fromarray(np.moveaxis(x, 0, -1)).convert(mode).save(paths[-1])
    return paths


def _one_pass(paths, k, **kw):
    """The reference: one in-process PatchStatistics update over every image, read as the workers read it."""
    return nsiter.PatchStatistics(k, **kw).update(np.stack([nsiter.data.load_image(p) for p in paths]))


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    return _write_pngs(tmp_path_factory.mktemp("pngs"), 200, np.random.default_rng(150))


# --------------------------------------------------------------------------- shards


@pytest.mark.parametrize("settings", SETTINGS)
def test_save_load_merge_is_bit_identical_to_the_in_memory_merge(settings, tmp_path):
    rng = np.random.default_rng(151)
    a, b = random_images((2, 4, 2, 12, 12), rng)
    sa = nsiter.PatchStatistics(**settings).update(a)
    sb = nsiter.PatchStatistics(**settings).update(b)
    sb.save(tmp_path / "b.npz")
    loaded = nsiter.PatchStatistics.load(tmp_path / "b.npz")
    assert loaded._settings() == sb._settings() and loaded.channels == 2 and loaded.dtype == sb.dtype
    assert loaded.count == sb.count and type(loaded._stats[0]) is type(sb._stats[0])
    mem, disk = copy.deepcopy(sa).merge(sb), copy.deepcopy(sa).merge(loaded)
    for x, y in zip(mem._stats[1:], disk._stats[1:]):
        assert x.tobytes() == y.tobytes()
    for x, y in zip(mem.covariance(), disk.covariance()):
        assert x.tobytes() == y.tobytes()
    with np.load(tmp_path / "b.npz", allow_pickle=False) as npz:
        assert set(npz.files) == set(SHARD_KEYS)


def test_float32_and_empty_shards_round_trip(tmp_path):
    x = random_images((2, 3, 10, 10), np.random.default_rng(152)).astype(np.float32)
    s = nsiter.PatchStatistics(3).update(x)
    s.save(tmp_path / "f32")  # the path is used as given
    back = nsiter.PatchStatistics.load(tmp_path / "f32")
    assert back.dtype == np.float32 and back.covariance()[0].dtype == np.float32
    nsiter.PatchStatistics(5, block_size=2).save(tmp_path / "empty.npz")
    empty = nsiter.PatchStatistics.load(tmp_path / "empty.npz")
    assert empty.count == 0 and empty.channels is None and empty.block_size == 2
    assert empty.merge(nsiter.PatchStatistics(5, block_size=2)).count == 0


def test_merge_with_a_loaded_shard_names_the_setting_that_differs(tmp_path):
    x = random_images((1, 3, 10, 10), np.random.default_rng(153))
    nsiter.PatchStatistics(3, sampling_stride=2).update(x).save(tmp_path / "s.npz")
    with pytest.raises(ValueError, match=r"sampling_stride: 1 vs 2"):
        nsiter.PatchStatistics(3).merge(nsiter.PatchStatistics.load(tmp_path / "s.npz"))
    with pytest.raises(ValueError, match="3-channel images into an accumulator of 1-channel"):
        nsiter.PatchStatistics(3, sampling_stride=2).update(x[:, :1]).merge(
            nsiter.PatchStatistics.load(tmp_path / "s.npz"))


def test_load_refuses_what_is_not_a_shard(tmp_path):
    s = nsiter.PatchStatistics(3).update(random_images((1, 1, 8, 8), np.random.default_rng(154)))
    good = s._to_arrays()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        nsiter.PatchStatistics.load(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="cannot read .* as an .npz file"):
        nsiter.PatchStatistics.load(tmp_path / "text.npz")
    np.save(tmp_path / "one.npy", np.eye(2))
    with pytest.raises(ValueError, match=r"holds one array \(.npy\)"):
        nsiter.PatchStatistics.load(tmp_path / "one.npy")
    np.savez(tmp_path / "other.npz", cov=np.eye(2))
    with pytest.raises(ValueError, match="is not a PatchStatistics shard"):
        nsiter.PatchStatistics.load(tmp_path / "other.npz")
    cases = [({"moments_m2": None}, "lacks the key 'moments_m2'"),
             ({"version": np.array(99)}, "version-99 shard, newer"),
             ({"kernel_size": np.array([3, 3, 3])}, "'kernel_size' holds .* shape \\(3,\\)"),
             ({"grouping": np.array("diagonal")}, "invalid settings: .*grouping"),
             ({"groups": np.array(4)}, "block layout disagrees .*groups: 4 stored, 1 implied"),
             ({"moments_mean": np.zeros((1, 5))}, "'moments_mean' holds .* expected float64 of shape \\(1, 9\\)"),
             ({"count": np.array(0)}, "count 0, channels 1 and dtype 'float64' disagree"),
             ({"moments_m2": np.full((1, 9, 9), np.nan)}, "NaN/inf"),
             ({"moments_mean": np.array([None] * 9, dtype=object).reshape(1, 9)}, "pickle")]
    for change, match in cases:
        arrays = {k: v for k, v in {**good, **change}.items() if v is not None}
        np.savez(tmp_path / "bad.npz", **arrays)
        with pytest.raises(ValueError, match=match):
            nsiter.PatchStatistics.load(tmp_path / "bad.npz")


def test_save_never_leaves_a_half_written_file(tmp_path, monkeypatch):
    path = tmp_path / "s.npz"
    path.write_bytes(b"old")

    def broken(f, **arrays):
        f.write(b"PK partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        write_npz_atomic(path, {"a": np.zeros(2)})
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["s.npz"]


# --------------------------------------------------------------------------- dataset_statistics


def test_two_worker_local_cluster_equals_one_pass_whatever_the_partitioning(pngs):
    distributed = pytest.importorskip("distributed")
    ref = _one_pass(pngs, 3)
    cov_ref, mean_ref = ref.covariance()
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = distributed.Client(cluster)
    try:
        for partition_size, split_every in [(25, 8), (7, 2), (13, 3), (200, 8)]:
            stats, info = nsiter.dataset_statistics(pngs, 3, scheduler=client, partition_size=partition_size,
                                                    split_every=split_every, progress=False, return_info=True)
            assert info.n_images == 200 and info.n_partitions == math.ceil(200 / partition_size)
            assert info.tree_depth == math.ceil(math.log(info.n_partitions, split_every) - 1e-9)
            assert stats.count == ref.count and stats.channels == 3
            cov, mean = stats.covariance()
            assert _rel(cov, cov_ref) <= 1e-13 and _rel(mean, mean_ref) <= 1e-13, (partition_size, split_every)
        # a folder, the address form of `scheduler`, and a block layout
        stats = nsiter.dataset_statistics(str(pngs[0].parent), 3, block_size=1, grouping="reference",
                                          scheduler=cluster.scheduler_address, partition_size=20)
        assert _rel(stats.covariance()[0], _one_pass(pngs, 3, block_size=1, grouping="reference").covariance()[0]) \
            <= 1e-13
        # in-memory arrays are scattered to the workers, not put in the graph
        x = random_images((30, 2, 10, 10), np.random.default_rng(155))
        stats = nsiter.dataset_statistics(x, 3, scheduler=client, partition_size=4)
        assert _rel(stats.covariance()[0], nsiter.PatchStatistics(3).update(x).covariance()[0]) <= 1e-13
    finally:
        client.close()
        cluster.close()


@pytest.mark.parametrize("scheduler", ["threads", "synchronous", None])
def test_local_schedulers_and_array_sources_equal_one_pass(scheduler, pngs):
    import dask.array as da

    ref = _one_pass(pngs[:40], 5, padding=2).covariance()[0]
    got = nsiter.dataset_statistics(pngs[:40], 5, padding=2, scheduler=scheduler, partition_size=6).covariance()[0]
    assert _rel(got, ref) <= 1e-13
    x = random_images((20, 3, 12, 12), np.random.default_rng(156))
    ref = nsiter.PatchStatistics(3, stride=2).update(x).covariance()[0]
    for source in (x, da.from_array(x, chunks=(3, 1, 12, 6))):
        stats, info = nsiter.dataset_statistics(source, 3, stride=2, scheduler=scheduler, return_info=True)
        assert _rel(stats.covariance()[0], ref) <= 1e-13 and info.n_images == 20
    assert nsiter.dataset_statistics(da.from_array(x, chunks=(3, 1, 12, 6)), 3, partition_size=7,
                                     return_info=True)[1].n_partitions == 3


def test_channel_rules_alpha_grey_and_cmyk(tmp_path):
    rng = np.random.default_rng(157)
    rgb = _write_pngs(tmp_path / "rgb", 4, rng)
    ref = _one_pass(rgb, 3).covariance()[0]
    rgba = tmp_path / "rgba"
    rgba.mkdir()
    for p in rgb:  # alpha is dropped: the statistics of the RGB images
        im = Image.open(p).convert("RGBA")
        im.putalpha(Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)))
        im.save(rgba / p.name)
    assert _rel(nsiter.dataset_statistics(rgba, 3).covariance()[0], ref) <= 1e-13
    # grey and colour mixed: refused with the file named, converted with gray=True
    Image.open(rgb[0]).convert("LA").save(tmp_path / "rgb" / "zz_grey.png")
    with pytest.raises(ValueError, match=r"zz_grey.png' is grey \(1 channel\), the first image has 3.*gray=True"):
        nsiter.dataset_statistics(tmp_path / "rgb", 3)
    grey = nsiter.dataset_statistics(tmp_path / "rgb", 3, gray=True)
    assert grey.channels == 1 and grey.count == 5 * 14 * 14
    la = nsiter.dataset_statistics(tmp_path / "rgb" / "zz_grey.png", 3)  # LA alone: one channel
    assert la.channels == 1
    # CMYK JPEGs are converted to RGB by Pillow (matplotlib would pass 4 raw bands)
    Image.open(rgb[0]).convert("CMYK").save(tmp_path / "c.jpg")
    assert nsiter.dataset_statistics(tmp_path / "c.jpg", 3).channels == 3


def test_size_rules_refuse_crop_or_take_each_whole(tmp_path):
    rng = np.random.default_rng(158)
    paths = _write_pngs(tmp_path, 3, rng, size=(16, 16)) + _write_pngs(tmp_path / "big", 2, rng, size=(20, 24))
    with pytest.raises(ValueError, match=r"img_0000.png' is 20x24 RGB, the first image 16x16 RGB.*image_size=\(h, w\)"):
        nsiter.dataset_statistics(paths, 3, partition_size=5)
    imgs = [nsiter.data.load_image(p) for p in paths]
    tops, lefts = [(x.shape[1] - 12) // 2 for x in imgs], [(x.shape[2] - 10) // 2 for x in imgs]
    crop = np.stack([x[:, t:t + 12, left:left + 10] for x, t, left in zip(imgs, tops, lefts)])
    got = nsiter.dataset_statistics(paths, 3, image_size=(12, 10), partition_size=2).covariance()[0]
    assert _rel(got, nsiter.PatchStatistics(3).update(crop).covariance()[0]) <= 1e-13
    ref = nsiter.PatchStatistics(3)
    for x in imgs:
        ref.update(x)
    got = nsiter.dataset_statistics(paths, 3, image_size="any", partition_size=4)
    assert got.count == ref.count and _rel(got.covariance()[0], ref.covariance()[0]) <= 1e-13
    with pytest.raises(ValueError, match=r"3 of the 5 images .* is 16x16, smaller than image_size 18x18"):
        nsiter.dataset_statistics(paths, 3, image_size=18, partition_size=5)
    with pytest.raises(ValueError, match=r"images '.*' \(4x4 RGB\): kernel_size \(5, 5\) .* larger than the padded"):
        nsiter.dataset_statistics(paths, 5, image_size=4)


def test_unreadable_images_are_named(tmp_path, pngs):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG junk")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"2 of the 3 images .*cannot read '.*broken.png'.*'.*empty.jpg'.*re-save"):
        nsiter.dataset_statistics([pngs[0], tmp_path / "broken.png", tmp_path / "empty.jpg"], 3, partition_size=3)
    with pytest.raises(ValueError, match=r"cannot read '.*broken.png'"):  # the first image is read on the client
        nsiter.dataset_statistics([tmp_path / "broken.png", pngs[0]], 3)


def test_sources_and_options_are_checked(tmp_path, pngs):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files in folder"):
        nsiter.dataset_statistics(tmp_path / "empty", 3)
    with pytest.raises(FileNotFoundError, match="matches no files"):
        nsiter.dataset_statistics(str(tmp_path / "*.png"), 3)
    with pytest.raises(FileNotFoundError, match="neither a folder, a file nor a glob"):
        nsiter.dataset_statistics(tmp_path / "nope", 3)
    with pytest.raises(TypeError, match="expected scheduler"):
        nsiter.dataset_statistics(pngs[:2], 3, scheduler=3)
    with pytest.raises(ValueError, match="expected split_every >= 2"):
        nsiter.dataset_statistics(pngs[:2], 3, split_every=1)
    with pytest.raises(ValueError, match="image_size and gray apply to image files"):
        nsiter.dataset_statistics(np.zeros((2, 1, 8, 8)), 3, gray=True)
    with pytest.raises(ValueError, match="image_size and gray apply to image files"):
        nsiter.dataset_statistics(dask.array.zeros((2, 1, 8, 8)), 3, image_size=4)
    with pytest.raises(ValueError, match=r"non-empty image array .* got shape \(0, 1, 8, 8\)"):
        nsiter.dataset_statistics(np.zeros((0, 1, 8, 8)), 3)
    with pytest.raises(ValueError, match="expected image_size as None, 'any'"):
        nsiter.dataset_statistics(pngs[:2], 3, image_size="centre")
    with pytest.raises(ValueError, match="grouping"):
        nsiter.dataset_statistics(pngs[:2], 3, grouping="diagonal")
    with pytest.raises(TypeError, match="complex"):
        nsiter.dataset_statistics(np.zeros((2, 1, 8, 8), complex), 3)
    assert ds.image_files([pngs[1], pngs[0], pngs[1]]) == [str(pngs[1]), str(pngs[0])]  # order kept, repeats once
    assert ds.image_files(str(pngs[0].parent / "img_000[0-2].png")) == [str(p) for p in pngs[:3]]


def test_without_dask_the_error_names_the_extra(monkeypatch, pngs):
    monkeypatch.setitem(sys.modules, "dask", None)
    with pytest.raises(ImportError, match=r"pip install 'nsiter\[dask\]'"):
        nsiter.dataset_statistics(pngs[:2], 3)


def test_import_nsiter_and_its_cli_do_not_import_dask():
    code = "import sys, nsiter, nsiter.cli; print('dask' in sys.modules, 'distributed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# --------------------------------------------------------------------------- nsiter stats


def _stats_cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "nsiter.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_on_a_folder_of_100_pngs_shows_progress_and_verify_accepts_it(pngs, tmp_path):
    out, png = tmp_path / "stats.npz", tmp_path / "kernels.png"
    r = _stats_cli("stats", pngs[0].parent / "img_00[0-9][0-9].png", "-k", "5", "--out", out, "--progress",
                   "--partition-size", "10", "--deconv-kernels", png)
    assert r.returncode == 0, r.stderr
    assert "100% Completed" in r.stderr
    assert "100 images in 10 partitions of 10" in r.stdout and f"nsiter verify {out} --key cov" in r.stdout
    ref = _one_pass(pngs[:100], 5)
    with np.load(out, allow_pickle=False) as npz:
        assert npz["count"] == ref.count and npz["n_images"] == 100
        assert _rel(npz["cov"], ref.covariance()[0]) <= 1e-13 and npz["deconv"].shape == (75, 75)
        D = nsiter.inv_sqrtm(npz["cov"], method="eigh", eps=1e-5)
        np.testing.assert_allclose(npz["deconv"], D, rtol=1e-12, atol=0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["kernels.png", "stats.npz"]  # no temporary files left
    v = subprocess.run([sys.executable, "-m", "nsiter.cli", "verify", out, "--key", "cov", "--eps", "1e-5",
                        "-m", "eigh", "--tol", "1e-6"], capture_output=True, text=True, timeout=120)
    assert v.returncode == 0, v.stderr


def test_cli_merges_shards_to_the_whole(pngs, tmp_path, capsys):
    a, b, whole = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "whole.npz"
    assert main(["stats", *map(str, pngs[:30]), "-k", "3", "--stride", "2", "--out", str(a),
                 "--scheduler", "synchronous"]) == 0
    assert main(["stats", *map(str, pngs[30:50]), "-k", "3", "--stride", "2", "--out", str(b), "--json"]) == 0
    assert main(["stats", "--merge", str(a), str(b), "--out", str(whole), "--eps", "1e-4"]) == 0
    capsys.readouterr()
    ref = _one_pass(pngs[:50], 3, stride=2)
    merged = nsiter.PatchStatistics.load(whole)
    assert merged.count == ref.count and _rel(merged.covariance()[0], ref.covariance()[0]) <= 1e-13
    with np.load(whole) as npz:
        assert float(npz["eps"]) == 1e-4 and "deconv" in npz.files


def _usage_error(capsys, match, *args):
    code = main(["stats", *map(str, args)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("nsiter stats"), err
    assert __import__("re").search(match, lines[0]), lines[0]


def test_cli_errors_are_one_line_and_write_nothing(pngs, tmp_path, capsys):
    out = tmp_path / "s.npz"
    (tmp_path / "bad.png").write_bytes(b"junk")
    nsiter.PatchStatistics(5).update(np.zeros((1, 3, 8, 8))).save(tmp_path / "k5.npz")
    _usage_error(capsys, "nothing to do", "--out", out)
    _usage_error(capsys, "pass the kernel size with -k", pngs[0], "--out", out)
    _usage_error(capsys, "directory .* does not exist", pngs[0], "-k", "3", "--out", tmp_path / "no" / "s.npz")
    _usage_error(capsys, r"cannot read '.*bad.png'", pngs[0], tmp_path / "bad.png", "-k", "3", "--out", out,
                 "--partition-size", "2", "--scheduler", "synchronous")
    _usage_error(capsys, r"cannot merge '.*k5.npz': .*kernel_size: \(3, 3\) vs \(5, 5\)", pngs[0], "-k", "3",
                 "--merge", tmp_path / "k5.npz", "--out", out)
    _usage_error(capsys, "unknown image format 'xyz'", pngs[0], "-k", "3", "--out", out, "--deconv-kernels",
                 tmp_path / "k.xyz")
    _usage_error(capsys, "expected kernel size as an integer >= 1", pngs[0], "-k", "0", "--out", out)
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        _usage_error(capsys, "cannot connect to the Dask scheduler", pngs[0], "-k", "3", "--out", out,
                     "--scheduler", "tcp://127.0.0.1:9")
    assert sorted(os.listdir(tmp_path)) == ["bad.png", "k5.npz"]
