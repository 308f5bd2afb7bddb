"""Benchmark: patch covariance (Algorithm 1 of Ye et al. 2020) against im2col + X^T X.

Side by side in one run (float32 images, CPU, medians of repeats after a warm-up call):

1. F = 576 goal: ``(8, 64, 32, 32)``, k = 3, padding 1.  ``nsiter.patch_covariance`` against
   the peer "numpy im2col (sliding_window_view + copy) + ``X.T @ X``" and against the
   machine's own ``X.T @ X`` on the materialised matrix (its GFLOP/s, ``2 N F^2`` flops,
   is the ceiling for that shape; ours is reported at the same flop count).
2. Dense single channel ``512 x 512``, k = 15 (padding 7): the im2col-free kernel vs the peer.
3. Kernels: every covariance kernel forced on both shapes, next to the cost model's choice.
4. Subsampling ``S = 1..4``: the paper's pipeline ``nsiter.im2col`` (stride S) +
   ``nsiter.covariance`` (back to back, and as the sum of the two stages timed apart: a
   parallel Numba kernel followed by multi-threaded BLAS makes the two thread pools contend),
   the numpy peer pipeline, and the fused ``patch_covariance``; speed-up of each against its
   own ``S = 1`` (the ideal is ``S^2``).  The fused ``S = 1`` uses the row-shift kernel, which
   has no counterpart on a strided grid, so its ratio is smaller by design.
5. Table 3 (appendix A.6) layer shapes, batch 8 instead of the paper's 128: im2col + cov
   (pipeline and fused, reference grouping with ``B = Cin/groups``) next to torch
   ``conv2d`` of the same layer on the CPU, as the ratio the paper reports.
6. Peak extra memory of ``patch_covariance`` on inputs whose im2col matrix would exceed 2 GB,
   measured in fresh processes (peak RSS after resetting the high-water mark, and
   tracemalloc's peak of numpy allocations).

Writes ``analysis/results/covariance.{json,csv,md}`` (goals) and
``covariance_{kernels,subsampling,table3,memory}.*``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _threads_from_argv(argv) -> int | None:
    """``--threads N`` must act before numpy/numba/torch start their thread pools."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return None


_THREADS = _threads_from_argv(sys.argv[1:])
if _THREADS:
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[_var] = str(_THREADS)

import numpy as np  # noqa: E402
from numpy.lib.stride_tricks import sliding_window_view

sys.path.insert(0, os.path.dirname(__file__))
from _bench import (  # noqa: E402
    RESULTS,
    machine_info,
    markdown_table,
    median_time,
    memcpy_gbps,
    progress,
    write_results,
)

import nsiter  # noqa: E402
from nsiter._moments import plan as _plan  # noqa: E402
from nsiter._numba.patches import KERNELS, choose_kernel as _choose_kernel, patch_moments as _patch_moments  # noqa: E402
from nsiter.covariance import _sampled_geometry  # noqa: E402

from _paper import TABLE3 as PAPER  # noqa: E402


def numpy_im2col(x, k, s, p):
    """The peer's im2col: sliding_window_view of the padded input and one copy into the layout."""
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x
    v = sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::s, ::s]  # N, C, oh, ow, k, k
    n, c, oh, ow = v.shape[:4]
    return np.ascontiguousarray(v.transpose(0, 2, 3, 1, 4, 5)).reshape(n * oh * ow, c * k * k)


def peer_cov(x, k, s, p):
    """numpy im2col + X^T X (the issue's peer; uncentred, float32 like the input)."""
    X = numpy_im2col(x, k, s, p)
    return X.T @ X


def forced(x, k, kernel, *, padding=0, sampling_stride=1):
    g = _sampled_geometry(x.shape, k, 1, padding, 1, sampling_stride)
    return _patch_moments(x, g, _plan(g.c, g.kh * g.kw, None, "contiguous"), kernel)


def chosen(x, k, *, padding=0, sampling_stride=1, block_size=None, grouping="contiguous"):
    g = _sampled_geometry(x.shape, k, 1, padding, 1, sampling_stride)
    return _choose_kernel(g, _plan(g.c, g.kh * g.kw, block_size, grouping), x.dtype)


def head_to_head(label, x, k, p, repeat):
    """patch_covariance vs the peer and vs X^T X on the materialised matrix."""
    X = numpy_im2col(x, k, 1, p)
    n, f = X.shape
    flops = 2.0 * n * f * f
    t_ours = median_time(lambda: nsiter.patch_covariance(x, k, padding=p), repeat=repeat)
    t_peer = median_time(lambda: peer_cov(x, k, 1, p), repeat=repeat)
    t_xtx = median_time(lambda X=X: X.T @ X, repeat=repeat)  # X bound now: it is deleted below
    del X
    return {"case": label, "F": f, "rows": n, "kernel": chosen(x, k, padding=p), "nsiter_ms": 1e3 * t_ours,
            "peer_ms": 1e3 * t_peer, "speedup_vs_peer": t_peer / t_ours, "XtX_ms": 1e3 * t_xtx,
            "XtX_GFLOPs": flops / t_xtx / 1e9, "nsiter_GFLOPs": flops / t_ours / 1e9,
            "fraction_of_XtX": t_xtx / t_ours}


def kernel_rows(cases, repeat):
    rows = []
    for label, x, k, p in cases:
        row = {"case": label, "chosen": chosen(x, k, padding=p)}
        for kernel in KERNELS:
            row[f"{kernel}_ms"] = 1e3 * median_time(lambda: forced(x, k, kernel, padding=p), repeat=repeat)
        rows.append(row)
        progress(f"kernels {label}: " + ", ".join(f"{kn} {row[kn + '_ms']:.1f} ms" for kn in KERNELS)
                 + f" (cost model: {row['chosen']})")
    return rows


def subsampling_rows(cases, repeat):
    rows = []
    for label, x, k, p in cases:
        base = {}
        for S in (1, 2, 3, 4):
            t_pipe = median_time(lambda: nsiter.covariance(nsiter.im2col(x, k, stride=S, padding=p)), repeat=repeat)
            X = nsiter.im2col(x, k, stride=S, padding=p)
            t_stages = (median_time(lambda: nsiter.im2col(x, k, stride=S, padding=p), repeat=repeat)
                        + median_time(lambda X=X: nsiter.covariance(X), repeat=repeat))
            del X
            t_peer = median_time(lambda: peer_cov(x, k, S, p), repeat=repeat)
            t_fused = median_time(lambda: nsiter.patch_covariance(x, k, padding=p, sampling_stride=S), repeat=repeat)
            if S == 1:
                base = {"pipe": t_pipe, "stages": t_stages, "peer": t_peer, "fused": t_fused}
            rows.append({"case": label, "S": S, "rows_fraction": 1.0 / S ** 2,
                         "im2col_cov_ms": 1e3 * t_pipe, "speedup_im2col_cov": base["pipe"] / t_pipe,
                         "stages_ms": 1e3 * t_stages, "speedup_stages": base["stages"] / t_stages,
                         "numpy_peer_ms": 1e3 * t_peer, "speedup_numpy_peer": base["peer"] / t_peer,
                         "patch_covariance_ms": 1e3 * t_fused, "speedup_patch_covariance": base["fused"] / t_fused,
                         "kernel": chosen(x, k, padding=p, sampling_stride=S)})
            progress(f"subsampling {label} S={S}: im2col+cov {1e3 * t_pipe:.1f} ms (x{base['pipe'] / t_pipe:.1f}), "
                     f"peer x{base['peer'] / t_peer:.1f}, "
                     f"fused {1e3 * t_fused:.1f} ms (x{base['fused'] / t_fused:.1f})")
    return rows


def stacked_reference(X, groups):
    """The reference grouping's data matrix: column j -> group j % G, feature j // G, groups as rows."""
    n, f = X.shape
    return X.reshape(n, f // groups, groups).transpose(0, 2, 1).reshape(n * groups, f // groups)


def table3_rows(batch, repeat, budget_s):
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        torch = None
    rng = np.random.default_rng(3)
    rows = []
    t_start = time.perf_counter()
    for h, w, cin, cout, groups, k, S, *paper in PAPER:
        if time.perf_counter() - t_start > budget_s:
            progress(f"Table 3: time budget of {budget_s:.0f} s spent, remaining rows skipped")
            break
        x = rng.standard_normal((batch, cin, h, w), dtype=np.float32)
        B, p = cin // groups, k // 2
        kw = dict(padding=p, sampling_stride=S, block_size=B, grouping="reference")
        t_im2col = median_time(lambda: nsiter.im2col(x, k, stride=S, padding=p), repeat=repeat)
        X = nsiter.im2col(x, k, stride=S, padding=p)
        t_cov = median_time(lambda X=X: nsiter.covariance(stacked_reference(X, groups)), repeat=repeat)
        del X
        t_fused = median_time(lambda: nsiter.patch_covariance(x, k, **kw), repeat=repeat)
        row = {"H": h, "W": w, "Cin": cin, "Cout": cout, "groups": groups, "k": k, "S": S, "batch": batch,
               "im2col_ms": 1e3 * t_im2col, "cov_ms": 1e3 * t_cov, "patch_covariance_ms": 1e3 * t_fused,
               "kernel": chosen(x, k, **kw)}
        if torch is not None:
            xt = torch.from_numpy(x)
            wt = torch.from_numpy(rng.standard_normal((cout, cin, k, k), dtype=np.float32))
            with torch.no_grad():
                t_conv = median_time(lambda: F.conv2d(xt, wt, padding=p), repeat=repeat)
            row.update(conv_ms=1e3 * t_conv, ratio_pipeline=(t_im2col + t_cov) / t_conv,
                       ratio_fused=t_fused / t_conv)
        row["ratio_paper"] = (paper[0] + paper[1]) / paper[3]
        rows.append(row)
        progress(f"Table 3 {h}x{w}x{cin} g{groups} k{k} S{S}: im2col+cov {row['im2col_ms'] + row['cov_ms']:.1f} ms, "
                 f"fused {row['patch_covariance_ms']:.1f} ms, conv {row.get('conv_ms', float('nan')):.1f} ms")
    return rows


_MEMORY_PROBE = r"""
import json, resource, sys, time, tracemalloc
import numpy as np
import nsiter
from nsiter._moments import plan as _plan
from nsiter._numba.patches import KERNELS, patch_moments as _patch_moments
from nsiter.covariance import _sampled_geometry
shape, k, p = json.loads(sys.argv[1])
tiny = np.ones((1, shape[1], 2 * k, 2 * k), np.float32)
g = _sampled_geometry(tiny.shape, k, 1, p, 1, 1)
for kern in KERNELS:  # load every compiled kernel before measuring
    _patch_moments(tiny, g, _plan(g.c, k * k, None, "contiguous"), kern)
x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)

def hwm_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1

try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS high-water mark
    reset = True
except OSError:
    reset = False
base = hwm_kb()
tracemalloc.start()
t0 = time.perf_counter()
cov, mean = nsiter.patch_covariance(x, k, padding=p)
dt = time.perf_counter() - t0
_, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
print(json.dumps({"rss_extra_MB": (hwm_kb() - base) / 1024 if reset else None,
                  "tracemalloc_peak_MB": peak / 2**20, "seconds": dt, "input_MB": x.nbytes / 2**20,
                  "output_MB": (cov.nbytes + mean.nbytes) / 2**20}))
"""


def memory_rows(cases):
    rows = []
    for label, shape, k, p in cases:
        g = _sampled_geometry(shape, k, 1, p, 1, 1)
        im2col_gb = g.n * g.oh * g.ow * g.n_features * 4 / 1e9
        out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, json.dumps([list(shape), k, p])],
                             capture_output=True, text=True, check=True)
        m = json.loads(out.stdout.strip().splitlines()[-1])
        kernel = _choose_kernel(g, _plan(g.c, k * k, None, "contiguous"), np.float32)
        rows.append({"case": label, "kernel": kernel, "im2col_GB": im2col_gb, **m})
        progress(f"memory {label}: im2col would be {im2col_gb:.2f} GB; peak extra RSS "
                 f"{m['rss_extra_MB']} MB, tracemalloc peak {m['tracemalloc_peak_MB']:.1f} MB, {m['seconds']:.1f} s")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8, help="Table 3 batch (the paper used 128)")
    ap.add_argument("--table3-budget", type=float, default=60.0, help="seconds for the Table 3 rows")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and cases (a smoke run)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for BLAS, Numba and torch alike (default: all cores)")
    args = ap.parse_args(argv)
    if args.threads:
        try:
            import torch
            torch.set_num_threads(args.threads)
        except ImportError:
            pass
    repeat = 2 if args.quick else args.repeat
    rng = np.random.default_rng(0)
    t_all = time.perf_counter()
    bw = memcpy_gbps()
    progress(f"memcpy {bw:.1f} GB/s")
    x576 = rng.standard_normal((8, 64, 32, 32), dtype=np.float32)
    x512 = np.ascontiguousarray(nsiter.data.sample_image(gray=True)[:512, :512], dtype=np.float32)[None, None]
    for x, k, p in [(x576, 3, 1), (x512, 15, 7)]:  # JIT / cache load before timing
        for kern in KERNELS:
            forced(x[:1, :, :40, :40], k, kern, padding=p)
    h576 = head_to_head("(8, 64, 32, 32) k3 p1", x576, 3, 1, repeat)
    progress(f"F=576: nsiter {h576['nsiter_ms']:.1f} ms, peer {h576['peer_ms']:.1f} ms, X^T X {h576['XtX_ms']:.1f} ms")
    h512 = head_to_head("(1, 1, 512, 512) k15 p7", x512, 15, 7, max(2, repeat // 2))
    progress(f"512x512 k15: nsiter {h512['nsiter_ms']:.1f} ms, peer {h512['peer_ms']:.1f} ms")
    kern = kernel_rows([("(8, 64, 32, 32) k3 p1", x576, 3, 1), ("(1, 1, 512, 512) k15 p7", x512, 15, 7),
                        ("(8, 3, 128, 128) k7 p3", rng.standard_normal((8, 3, 128, 128), dtype=np.float32), 7, 3)],
                       max(2, repeat // 2))
    sub_cases = [("(8, 64, 32, 32) k3 p1", x576, 3, 1)]
    if not args.quick:
        sub_cases.append(("(8, 3, 256, 256) k3 p1", rng.standard_normal((8, 3, 256, 256), dtype=np.float32), 3, 1))
    sub = subsampling_rows(sub_cases, repeat)
    t3 = table3_rows(args.batch, max(2, repeat // 2), 10.0 if args.quick else args.table3_budget)
    mem = memory_rows([("(1, 1, 2048, 2048) k15 p7", (1, 1, 2048, 2048), 15, 7),
                       ("(64, 16, 256, 256) k3 p1", (64, 16, 256, 256), 3, 1)] if not args.quick else
                      [("(1, 1, 1024, 1024) k15 p7", (1, 1, 1024, 1024), 15, 7)])

    s3 = [r for r in sub if r["S"] == 3]
    goals = [
        {"goal": "F=576 (8,64,32,32) k3 p1: speed vs numpy im2col + X.T@X", "target": ">= 1.0x",
         "measured": f"{h576['speedup_vs_peer']:.2f}x", "met": h576["speedup_vs_peer"] >= 1.0},
        {"goal": "F=576: fraction of the machine's X.T@X GFLOP/s (2NF^2 flops)", "target": ">= 80%",
         "measured": f"{100 * h576['fraction_of_XtX']:.0f}% ({h576['nsiter_GFLOPs']:.1f} vs "
                     f"{h576['XtX_GFLOPs']:.1f} GFLOP/s)", "met": h576["fraction_of_XtX"] >= 0.8},
        {"goal": "dense 512x512 k15: speed vs im2col + X.T@X", "target": ">= 2x",
         "measured": f"{h512['speedup_vs_peer']:.1f}x ({h512['kernel']} kernel)", "met": h512["speedup_vs_peer"] >= 2},
    ]
    for r in s3:
        goals.append({"goal": f"subsampling S=3 vs S=1, im2col + covariance, {r['case']}", "target": ">= 7x",
                      "measured": f"{r['speedup_im2col_cov']:.1f}x back to back, {r['speedup_stages']:.1f}x "
                                  f"stages timed apart (numpy peer {r['speedup_numpy_peer']:.1f}x, fused "
                                  f"patch_covariance {r['speedup_patch_covariance']:.1f}x; rows / 9)",
                      "met": r["speedup_im2col_cov"] >= 7})
    if t3 and "ratio_fused" in t3[0]:
        med = float(np.median([r["ratio_fused"] for r in t3]))
        med_p = float(np.median([r["ratio_paper"] for r in t3]))
        goals.append({"goal": f"Table 3 ({len(t3)} rows, batch {args.batch}): (im2col + cov) / conv2d, median",
                      "target": "report", "measured": f"{med:.3f} fused, "
                      f"{np.median([r['ratio_pipeline'] for r in t3]):.3f} pipeline (paper {med_p:.3f})",
                      "met": ""})
    for r in mem:
        goals.append({"goal": f"peak extra memory, im2col would be {r['im2col_GB']:.1f} GB: {r['case']}",
                      "target": "report (<= 256 MB)",
                      "measured": f"{r['rss_extra_MB']:.0f} MB RSS, {r['tracemalloc_peak_MB']:.0f} MB numpy"
                      if r["rss_extra_MB"] is not None else f"{r['tracemalloc_peak_MB']:.0f} MB numpy",
                      "met": (r["rss_extra_MB"] or r["tracemalloc_peak_MB"]) <= 256})

    meta = {"memcpy_GBps (read+write)": round(bw, 2), "dtype": "float32", "repeat": repeat,
            "threads": args.threads or "all cores",
            "total_seconds": round(time.perf_counter() - t_all, 1), "machine": machine_info()}
    write_results("covariance_kernels", kern, meta=meta, title="Covariance kernels forced, and the cost model's pick")
    write_results("covariance_subsampling", sub, meta=meta, title="Subsampling S: speed-up against S = 1")
    if t3:
        write_results("covariance_table3", t3, meta=meta,
                      title=f"Table 3 layer shapes (batch {args.batch}; paper: 128): im2col + cov vs conv2d")
    write_results("covariance_memory", mem, meta=meta, title="Peak extra memory of patch_covariance")
    meta["head_to_head"] = [h576, h512]
    path = write_results("covariance", goals, meta=meta, columns=["goal", "target", "measured", "met"],
                         title="patch_covariance: issue goals")
    extra = ["", "### Head to head", "", markdown_table([h576, h512]), "", "### Kernels", "", markdown_table(kern),
             "", "### Subsampling", "", markdown_table(sub)]
    if t3:
        extra += ["", "### Table 3 shapes", "", markdown_table(t3)]
    extra += ["", "### Memory", "", markdown_table(mem), ""]
    with open(path, "a") as f:
        f.write("\n".join(extra))
    print(path.read_text())
    progress(f"done in {time.perf_counter() - t_all:.0f} s; results in {RESULTS}")


if __name__ == "__main__":
    main()
