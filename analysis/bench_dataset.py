"""Dataset-scale patch statistics on Dask (``nsiter.dataset_statistics``): scaling, memory, exactness, costs.

Measured on this machine, in one run:

* **scaling** -- a Fig. 2-sized job (128 PNG crops of 80x80 RGB, 15x15 kernel, 16 partitions) on a
  LocalCluster of 1 and of 2 one-thread worker processes, both kept alive, timed alternately
  (ABAB...) so that load from other processes hits both alike; median of repeats;
* **memory** -- peak RSS of every worker (``ru_maxrss``, fresh 2-worker clusters) at two dataset sizes;
* **exact** -- >= 200 files in >= 8 partitions on the 2-worker cluster against one in-process
  ``PatchStatistics`` pass, for several partitionings and tree fan-ins; shard save -> load -> merge
  against the in-memory merge (bit for bit);
* **costs** -- per-image throughput of one worker thread at ImageNet sizes (JPEG decode + moments),
  one merge and one shard save/load of the 675 x 675 statistics, the shard's bytes;

and from them the cost of Fig. 2 over ImageNet's 1.28 M images on N workers and the all-reduce
bytes per training step of synchronised deconvolution, ``(F^2 + F + 1)`` floats per block.
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _bench import gemm_gflops, machine_info, memcpy_gbps, median_time, progress, write_results

import nsiter
from nsiter.dataset import default_partition_size

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fig_fig2_kernels import write_crops  # noqa: E402  (the figure's own folder of crops)

K = 15
IMAGENET_IMAGES = 1_281_167  # ILSVRC-2012 training set
NETWORK_GBPS = 1.25  # 10 Gbit/s Ethernet, GB/s, for the transfer column of the estimate


def _cluster(n):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR)
    return Client(cluster), cluster


def _close(client, cluster):
    client.close()
    cluster.close()


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _start_sampler(dask_worker):
    """In a worker: sample its RSS every 5 ms until stopped (the peak of the run, not of start-up)."""
    import threading

    state = {"peak": _rss_mib(), "before": _rss_mib(), "stop": False}

    def sample():
        while not state["stop"]:
            state["peak"] = max(state["peak"], _rss_mib())
            time.sleep(0.005)

    state["thread"] = threading.Thread(target=sample, daemon=True)
    state["thread"].start()
    dask_worker._nsiter_rss = state
    return state["before"]


def _stop_sampler(dask_worker):
    state = dask_worker._nsiter_rss
    state["stop"] = True
    state["thread"].join()
    return {"before": state["before"], "peak": state["peak"],
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _burn(n):
    """A fixed amount of pure-Python CPU work (no memory traffic, no GIL release): the machine's ceiling."""
    acc = 0
    for i in range(n):
        acc += i * i
    return acc


def _ceiling(client, tasks=16, n=2_000_000):
    t0 = time.perf_counter()
    client.gather(client.map(_burn, [n] * tasks, pure=False))
    return time.perf_counter() - t0


def scaling(folder, repeats):
    """1 vs 2 one-thread workers, ABAB; each round also times the same fixed CPU work on both clusters
    (``_burn``): the speedup the machine offers right now, with other processes' load, is the ceiling."""
    progress(f"scaling: 1 vs 2 workers, {repeats} ABAB rounds")
    one, two = _cluster(1), _cluster(2)
    try:
        runs = {1: one[0], 2: two[0]}
        kw = dict(partition_size=8, progress=False)
        for n, client in runs.items():  # warm-up: imports and Numba's cached kernels in every worker
            nsiter.dataset_statistics(folder, K, scheduler=client, **kw)
            _ceiling(client, tasks=2)
        times, burn = {1: [], 2: []}, {1: [], 2: []}
        for r in range(repeats):
            for n, client in runs.items():
                t0 = time.perf_counter()
                stats, info = nsiter.dataset_statistics(folder, K, scheduler=client, return_info=True, **kw)
                times[n].append(time.perf_counter() - t0)
                burn[n].append(_ceiling(client))
                progress(f"  round {r + 1}: {n} worker(s) {times[n][-1]:.2f} s (ceiling probe {burn[n][-1]:.2f} s)")
    finally:
        _close(*one)
        _close(*two)
    med = {n: float(np.median(t)) for n, t in times.items()}
    ceil = {n: float(np.median(t)) for n, t in burn.items()}
    per_round = [a / b for a, b in zip(times[1], times[2])]
    rows = [{"workers": n, "images": info.n_images, "partitions": info.n_partitions, "median_s": med[n],
             "min_s": min(times[n]), "max_s": max(times[n]), "images_per_s": info.n_images / med[n],
             "speedup": med[1] / med[n], "best_round_speedup": max(per_round) if n == 2 else 1.0,
             "ceiling_speedup": ceil[1] / ceil[n], "efficiency_vs_ceiling": (med[1] / med[n]) / (ceil[1] / ceil[n]),
             "runs_s": " ".join(f"{t:.2f}" for t in times[n])} for n in (1, 2)]
    return rows, stats


def memory(root, sizes, rng):
    """RSS of each of 2 workers during a run (sampled every 5 ms), at two dataset sizes with the default
    partitioning: 8 partitions whatever the size, each streamed in batches of <= BATCH_BYTES."""
    rows = []
    for n in sizes:
        folder = Path(root) / f"mem{n}"
        folder.mkdir()
        paths = write_crops(None, folder, n, 80, seed=int(rng.integers(1 << 30)))
        client, cluster = _cluster(2)
        try:
            nsiter.dataset_statistics(paths[:16], K, scheduler=client, progress=False)  # warm-up: imports, kernels
            client.run(_start_sampler)
            t0 = time.perf_counter()
            stats, info = nsiter.dataset_statistics(folder, K, scheduler=client, return_info=True, progress=False)
            dt = time.perf_counter() - t0
            rss = client.run(_stop_sampler)
        finally:
            _close(client, cluster)
        for i, (w, r) in enumerate(sorted(rss.items())):
            rows.append({"images": n, "partitions": info.n_partitions, "partition_size": info.partition_size,
                         "tree_depth": info.tree_depth, "worker": i, "rss_before_mib": r["before"],
                         "peak_rss_mib": r["peak"], "growth_mib": r["peak"] - r["before"], "seconds": dt})
        growth = ", ".join(f"{r['peak'] - r['before']:.0f}" for r in rss.values())
        progress(f"memory: {n} images in {info.n_partitions} partitions, RSS growth per worker {growth} MiB")
    return rows


def exact(root, n_files, rng):
    folder = Path(root) / "exact"
    folder.mkdir()
    write_crops(None, folder, n_files, 40, seed=int(rng.integers(1 << 30)))
    files = sorted(folder.iterdir())
    ref = nsiter.PatchStatistics(K).update(np.stack([nsiter.data.load_image(f) for f in files]))
    cov_ref, mean_ref = ref.covariance()
    rows = []
    client, cluster = _cluster(2)
    try:
        for partition_size, split_every in [(30, 8), (25, 2), (17, 3), (9, 8), (240, 8)]:
            stats, info = nsiter.dataset_statistics(folder, K, scheduler=client, partition_size=partition_size,
                                                    split_every=split_every, return_info=True, progress=False)
            cov, mean = stats.covariance()
            rows.append({"check": "dataset_statistics vs one pass", "images": info.n_images,
                         "partitions": info.n_partitions, "split_every": split_every, "tree_depth": info.tree_depth,
                         "rel_err_cov": _rel(cov, cov_ref), "rel_err_mean": _rel(mean, mean_ref),
                         "count_equal": stats.count == ref.count, "bit_identical": ""})
            progress(f"exact: {info.n_partitions} partitions, split_every {split_every}: "
                     f"rel. error {rows[-1]['rel_err_cov']:.2e}")
    finally:
        _close(client, cluster)
    a = nsiter.PatchStatistics(K).update(np.stack([nsiter.data.load_image(f) for f in files[:100]]))
    b = nsiter.PatchStatistics(K).update(np.stack([nsiter.data.load_image(f) for f in files[100:]]))
    b.save(Path(root) / "b.npz")
    mem, disk = copy.deepcopy(a).merge(b), copy.deepcopy(a).merge(nsiter.PatchStatistics.load(Path(root) / "b.npz"))
    same = all(x.tobytes() == y.tobytes() for x, y in zip(mem._stats[1:], disk._stats[1:])) and mem.count == disk.count
    rows.append({"check": "save -> load -> merge vs in-memory merge", "images": n_files, "partitions": 2,
                 "split_every": 2, "tree_depth": 1, "rel_err_cov": _rel(disk.covariance()[0], mem.covariance()[0]),
                 "rel_err_mean": _rel(disk.covariance()[1], mem.covariance()[1]), "count_equal": mem.count == disk.count,
                 "bit_identical": same})
    return rows


def costs(root, shard):
    """Per-image seconds of one worker thread (Numba 1 thread) at ImageNet sizes, merge and shard I/O."""
    import matplotlib.cbook as cbook
    import numba
    from PIL import Image

    rows = []
    with Image.open(cbook.get_sample_data(nsiter.data.SAMPLE_IMAGE, asfileobj=False)) as im:
        pixels = np.asarray(im.convert("RGB"))
    from threadpoolctl import threadpool_limits

    before = numba.get_num_threads()
    numba.set_num_threads(1)  # one worker thread, as a Dask task runs it (nsiter.dataset._task_threads)
    limits = threadpool_limits(limits=1, user_api="blas")
    try:
        for h, w, label in [(224, 224, "224x224 (training crop)"), (375, 500, "375x500 (most common full image)")]:
            paths = []
            for i in range(8):
                paths.append(Path(root) / f"cost_{h}_{i}.jpg")
                top, left = (i * 29) % (pixels.shape[0] - h + 1), (i * 7) % (pixels.shape[1] - w + 1)
                Image.fromarray(pixels[top:top + h, left:left + w]).save(paths[-1], quality=90)
            imgs = [nsiter.data.load_image(p) for p in paths]
            t_read = median_time(lambda: [nsiter.data.load_image(p) for p in paths], repeat=5) / len(paths)
            t_stats = median_time(lambda: nsiter.PatchStatistics(K).update(np.stack(imgs)), repeat=3) / len(paths)
            rows.append({"what": f"read + decode one JPEG {label}", "seconds": t_read})
            rows.append({"what": f"15x15 RGB moments of one image {label}", "seconds": t_stats})
    finally:
        numba.set_num_threads(before)
        limits.restore_original_limits()
    from nsiter.dataset import _merge  # exactly what one merge task runs

    settings, other = tuple(shard._settings().items()), copy.deepcopy(shard)
    rows.append({"what": "merge task of two 675x675 shards", "seconds": median_time(lambda: _merge(settings, shard, other),
                                                                                     repeat=21)})
    path = Path(root) / "shard.npz"
    rows.append({"what": "save one shard (.npz)", "seconds": median_time(lambda: shard.save(path), repeat=7)})
    rows.append({"what": "load one shard (.npz)", "seconds": median_time(lambda: nsiter.PatchStatistics.load(path),
                                                                          repeat=7)})
    rows.append({"what": "bytes of one shard (.npz)", "seconds": float(os.path.getsize(path))})
    return rows


def imagenet(cost_rows):
    c = {r["what"]: r["seconds"] for r in cost_rows}
    shard_bytes = c["bytes of one shard (.npz)"]
    t_merge = c["merge task of two 675x675 shards"]
    out = []
    for label in ("224x224 (training crop)", "375x500 (most common full image)"):
        t_img = c[f"read + decode one JPEG {label}"] + c[f"15x15 RGB moments of one image {label}"]
        for n in (2, 16, 64, 256):
            size = default_partition_size(IMAGENET_IMAGES, n)
            parts = math.ceil(IMAGENET_IMAGES / size)
            depth = math.ceil(math.log(parts, 8))
            merges = sum(math.ceil(parts / 8 ** d) for d in range(1, depth + 1))
            compute = IMAGENET_IMAGES * t_img / n
            # each merge task receives up to 8 shards; the critical path is one merge per level
            path = depth * (8 * t_merge + 8 * shard_bytes / (NETWORK_GBPS * 1e9))
            out.append({"images": label, "workers": n, "partition_size": size, "partitions": parts, "tree_depth": depth,
                        "merge_tasks": merges, "bytes_in_per_merge_MB": 8 * shard_bytes / 1e6,
                        "bytes_moved_total_GB": (parts + merges - 1) * shard_bytes / 1e9,
                        "compute_h": compute / 3600, "merge_path_s": path,
                        "wall_h": (compute + path) / 3600})
    return out


def allreduce():
    """Floats all-reduced per training step per layer: (F^2 + F + 1) per block (sums, cross-products, count),
    next to the layer's weight gradient, which data-parallel training all-reduces anyway."""
    rows = []
    for c_in, c_out, k, b, grouping in [(3, 64, 3, None, "full"), (64, 64, 3, 64, "one block"),
                                        (256, 256, 3, 64, "contiguous"), (256, 256, 3, 64, "reference"),
                                        (512, 512, 3, 64, "reference"), (512, 512, 1, 64, "reference"),
                                        (4096, 4096, 1, 64, "reference")]:
        fb = (b or c_in) * k * k
        blocks = c_in // b if grouping == "contiguous" else 1
        floats = blocks * (fb * fb + fb + 1)
        weight = c_out * c_in * k * k
        rows.append({"layer": f"{c_in}->{c_out}, {k}x{k}", "block_size": b or c_in, "grouping": grouping,
                     "F_block": fb, "blocks": blocks, "floats": floats, "MB_float32": 4 * floats / 1e6,
                     "ring_MB_sent_per_rank_float32": 2 * 4 * floats / 1e6, "weight_grad_floats": weight,
                     "vs_weight_grad": floats / weight})
    return rows


PARTS = ("scaling", "memory", "exact", "costs")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=7, help="ABAB rounds of the scaling benchmark")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke test, not for the record)")
    args = p.parse_args(argv)
    parts = [q for q in args.parts.split(",") if q]
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    rng = np.random.default_rng(2026)
    machine = machine_info()
    out = Path(__file__).resolve().parent / "results"
    with tempfile.TemporaryDirectory(prefix="nsiter-bench-dataset-") as root:
        fig2 = Path(root) / "fig2"
        fig2.mkdir()
        n_fig2 = 32 if args.quick else 128
        write_crops(None, fig2, n_fig2, 80)
        if "scaling" in parts:
            meta = {"machine": machine, "memcpy_GBps": memcpy_gbps(),
                    "gemm_float64_GFLOPs": gemm_gflops(512, 512, 512, np.float64),
                    "dask": __import__("dask").__version__, "distributed": __import__("distributed").__version__,
                    "load_average_before": " ".join(f"{v:.2f}" for v in os.getloadavg()), "partition_size": 8}
            rows, _ = scaling(fig2, 1 if args.quick else args.repeats)
            meta["load_average_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
            write_results("dataset_scaling", rows, meta=meta, title="dataset_statistics: 1 vs 2 Dask workers "
                          f"(Fig. 2-sized: {n_fig2} PNG crops 80x80 RGB, 15x15 kernel; ABAB medians)", directory=out)
            s2 = {r["workers"]: r for r in rows}
            print(f"speedup 2 vs 1 workers: {s2[2]['speedup']:.2f}x ({s2[1]['median_s']:.2f} s -> "
                  f"{s2[2]['median_s']:.2f} s); the machine's ceiling now {s2[2]['ceiling_speedup']:.2f}x")
        if "memory" in parts:
            rows = memory(root, (32, 128) if args.quick else (480, 1920), rng)
            write_results("dataset_memory", rows, meta={"machine": machine, "split_every": 8,
                          "images": "80x80 RGB PNG, 15x15 kernel", "rss": "sampled every 5 ms during the run",
                          "batch_bytes": nsiter.dataset.BATCH_BYTES},
                          title="dataset_statistics: RSS per worker during a run (2 workers)", directory=out)
        if "exact" in parts:
            rows = exact(root, 240, rng)
            write_results("dataset_exact", rows, meta={"machine": machine, "images": "40x40 RGB PNG, 15x15",
                          "workers": 2}, title="dataset_statistics vs one in-process pass (float64)", directory=out)
            print(f"worst relative error: {max(r['rel_err_cov'] for r in rows[:-1]):.2e}; "
                  f"save/load/merge bit-identical: {rows[-1]['bit_identical']}")
        if "costs" in parts:
            shard = nsiter.dataset_statistics(fig2, K, progress=False)
            rows = costs(root, shard)
            write_results("dataset_costs", rows, meta={"machine": machine, "numba_threads": 1, "blas_threads": 1},
                          title="Per-image and per-merge costs of one worker thread (15x15 RGB; bytes in the seconds "
                                "column for the shard size)", directory=out)
            write_results("dataset_imagenet", imagenet(rows), meta={
                "machine": machine, "images": IMAGENET_IMAGES, "partition_size": "nsiter.dataset.default_partition_size",
                "split_every": 8, "network_GBps": NETWORK_GBPS},
                title="Estimate: Fig. 2 statistics over ImageNet (1.28 M images) on N one-thread Dask workers",
                directory=out)
            write_results("dataset_allreduce", allreduce(), meta={"machine": machine},
                          title="All-reduce per training step per layer, (F^2 + F + 1) floats per block",
                          directory=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
