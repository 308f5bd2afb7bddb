"""Benchmark: nsiter.conv_transpose2d against CPU torch, and the sub-pixel (LR conv + shuffle) route.

The layer of the issue's goal: 64 -> 32 channels, 64x64 input, batch 8, upscaling r = 2, float32,
as a stride-2 transposed convolution with a 4x4 kernel and padding 1 (the DCGAN layer, output
128x128; the goal case) and with a 2x2 kernel, padding 0 (no overlaps).  Sides, one call each per
round, the order rotated every round (interleaved, so drifting load hits all sides alike):

- ``torch``: ``F.conv_transpose2d`` (torch's CPU kernel);
- ``nsiter``: ``nsiter.conv_transpose2d`` (numpy; fused GEMM + phase-major col2im in Numba threads);
- ``nsiter_subpixel``: ``method="subpixel"``: LR-space conv with ``subpixel_weight`` + fused shuffle;
- ``torch_subpixel``: the same route on tensors (``F.conv2d`` + ``F.pixel_shuffle``);
- ``nsiter_array``: the array code (one GEMM, then ``nsiter.col2im``): the straightforward route.

Ratios are medians of per-round ratios (``torch / nsiter`` > 1: nsiter faster).  torch, Numba and
BLAS run 2 threads.  The machine's ceilings (memcpy GB/s, 1024^3 SGEMM GFLOP/s) are measured at the
start and the end of the same run, and the CPU time other processes used meanwhile is recorded.
Numba compile and cache-load times come from fresh processes (empty / warm ``NUMBA_CACHE_DIR``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import gemm_gflops, machine_info, memcpy_gbps, progress, write_results  # noqa: E402

import nsiter  # noqa: E402
from nsiter._numba import _conv as numba_conv  # noqa: E402

THREADS = 2
# (label, N, C_in, C_out, H, k, stride r, padding)
CASES = [
    ("goal: 8x64x64x64 -> 32, k4 s2 p1", 8, 64, 32, 64, 4, 2, 1),
    ("8x64x64x64 -> 32, k2 s2 p0", 8, 64, 32, 64, 2, 2, 0),
]


def cpu_ticks() -> tuple[int, int, int]:
    """Busy and total clock ticks of the machine, and the ticks of this process."""
    f = [int(v) for v in open("/proc/stat").readline().split()[1:9]]
    own = sum(int(v) for v in open(f"/proc/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()[11:13])
    return sum(f) - f[3] - f[4], sum(f), own


def jit_latency() -> dict:
    """First-call seconds of conv_transpose2d (both methods) with an empty and a warm Numba cache."""
    code = ("import time, numpy as np, nsiter; x = np.ones((1, 4, 6, 6), np.float32); "
            "w = np.ones((4, 2, 4, 4), np.float32); t = time.perf_counter(); "
            "nsiter.conv_transpose2d(x, w, stride=2, padding=1); "
            "nsiter.conv_transpose2d(x, w, stride=2, padding=1, method='subpixel'); "
            "print(time.perf_counter() - t)")
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, NUMBA_CACHE_DIR=d)
        out = [float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True).stdout) for _ in range(2)]
    return {"numba_compile_s": round(out[0], 2), "numba_cache_load_s": round(out[1], 3)}


def ceilings() -> dict:
    return {"memcpy_GBps": memcpy_gbps(), "sgemm_1024_GFLOPs": gemm_gflops(1024, 1024, 1024, np.float32)}


def run_case(label, n, cin, cout, h, k, r, p, dtype, rounds, torch, F):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, cin, h, h), dtype=np.float64).astype(dtype)
    W = (rng.standard_normal((cin, cout, k, k)) / np.sqrt(cin * k * k)).astype(dtype)
    xt, Wt = torch.from_numpy(x), torch.from_numpy(W)
    ref = F.conv_transpose2d(xt, Wt, stride=r, padding=p).numpy()

    def array_code():
        saved = dict(numba_conv.KERNELS)
        numba_conv.KERNELS.clear()
        try:
            return nsiter.conv_transpose2d(x, W, stride=r, padding=p)
        finally:
            numba_conv.KERNELS.update(saved)

    sides = {
        "torch": lambda: F.conv_transpose2d(xt, Wt, stride=r, padding=p),
        "nsiter": lambda: nsiter.conv_transpose2d(x, W, stride=r, padding=p),
        "nsiter_subpixel": lambda: nsiter.conv_transpose2d(x, W, stride=r, padding=p, method="subpixel"),
        "torch_subpixel": lambda: nsiter.conv_transpose2d(xt, Wt, stride=r, padding=p, method="subpixel"),
        "nsiter_array": array_code,
    }
    scale = float(np.max(np.abs(ref)))
    errs = {}
    for name, f in sides.items():  # warm-up and correctness
        y = f()
        y = y.numpy() if isinstance(y, torch.Tensor) else y
        errs[name] = float(np.max(np.abs(y - ref))) / scale
        assert errs[name] < (1e-5 if dtype == np.float32 else 1e-12), (name, errs[name])
    names = list(sides)
    times = {s: [] for s in names}
    for i in range(rounds):
        order = names[i % len(names):] + names[: i % len(names)]
        for s in order:
            t0 = time.perf_counter()
            sides[s]()
            times[s].append(time.perf_counter() - t0)

    def ratio(a, b):  # median over rounds of t_a / t_b
        return statistics.median(ta / tb for ta, tb in zip(times[a], times[b]))

    lr = (h + 2 * (k // r - 1 - p // r) - k // r + 1) if k % r == 0 else float("nan")
    flops_t = 2.0 * n * h * h * cin * cout * k * k
    flops_lr = 2.0 * n * lr * lr * cin * cout * k * k
    med = {s: statistics.median(times[s]) for s in names}
    return {
        "case": label, "dtype": np.dtype(dtype).name,
        "torch_ms": 1e3 * med["torch"], "nsiter_ms": 1e3 * med["nsiter"],
        "speed_vs_torch": ratio("torch", "nsiter"),
        "nsiter_subpixel_ms": 1e3 * med["nsiter_subpixel"],
        "subpixel_speedup": ratio("nsiter", "nsiter_subpixel"),
        "subpixel_vs_torch": ratio("torch", "nsiter_subpixel"),
        "torch_subpixel_ms": 1e3 * med["torch_subpixel"],
        "torch_subpixel_speedup": ratio("torch", "torch_subpixel"),
        "array_code_ms": 1e3 * med["nsiter_array"], "fused_speedup_vs_array": ratio("nsiter_array", "nsiter"),
        "GFLOP": flops_t / 1e9, "GFLOP_subpixel": flops_lr / 1e9,
        "nsiter_GFLOPs": flops_t / med["nsiter"] / 1e9,
        "max_rel_err_vs_torch": max(errs[s] for s in names if s != "torch"),
    }


def block_sweep(rounds, torch):
    """nsiter's transposed conv and sub-pixel route against the task block size of the Numba kernels
    (``nsiter._numba._conv._BLOCK_ELEMENTS``), interleaved over sizes."""
    sizes = [2**e for e in range(16, 22)]
    default = numba_conv._BLOCK_ELEMENTS
    rows = []
    rng = np.random.default_rng(1)
    try:
        for label, n, cin, cout, h, k, r, p in CASES:
            x = rng.standard_normal((n, cin, h, h), dtype=np.float32)
            W = rng.standard_normal((cin, cout, k, k), dtype=np.float32)
            for method in nsiter.TRANSPOSED_METHODS:
                times = {b: [] for b in sizes}
                for i in range(rounds):
                    for b in sizes[i % len(sizes):] + sizes[: i % len(sizes)]:
                        numba_conv._BLOCK_ELEMENTS = b
                        if i == 0:
                            nsiter.conv_transpose2d(x, W, stride=r, padding=p, method=method)
                        t0 = time.perf_counter()
                        nsiter.conv_transpose2d(x, W, stride=r, padding=p, method=method)
                        times[b].append(time.perf_counter() - t0)
                best = min(sizes, key=lambda b: statistics.median(times[b]))
                rows.append({"case": label, "method": method,
                             **{f"{b // 1024}K_ms": 1e3 * statistics.median(times[b]) for b in sizes},
                             "best": f"{best // 1024}K", "default": f"{default // 1024}K"})
    finally:
        numba_conv._BLOCK_ELEMENTS = default
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=25)
    args = ap.parse_args(argv)
    import numba
    from threadpoolctl import threadpool_limits
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("bench_conv: torch is not installed (the peer of this benchmark); install nsiter[torch]")
        return 0

    torch.set_num_threads(THREADS)
    numba.set_num_threads(min(THREADS, numba.config.NUMBA_NUM_THREADS))
    progress("Numba compile / cache-load latency (fresh processes)")
    lat = jit_latency()
    rows = []
    with threadpool_limits(limits=THREADS, user_api="blas"):
        c0 = ceilings()
        progress(f"memcpy {c0['memcpy_GBps']:.1f} GB/s, SGEMM {c0['sgemm_1024_GFLOPs']:.0f} GFLOP/s")
        t0 = cpu_ticks()
        for case in CASES:
            for dtype in (np.float32, np.float64):
                if dtype == np.float64 and case is not CASES[0]:
                    continue
                row = run_case(*case, dtype, args.rounds, torch, F)
                rows.append(row)
                progress(f"{row['case']} {row['dtype']}: nsiter {row['nsiter_ms']:.2f} ms, torch "
                         f"{row['torch_ms']:.2f} ms, x{row['speed_vs_torch']:.2f}; subpixel "
                         f"{row['nsiter_subpixel_ms']:.2f} ms (x{row['subpixel_speedup']:.2f} over nsiter)")
        progress("block-size sweep of the Numba kernels")
        blocks = block_sweep(max(5, args.rounds // 3), torch)
        busy, total, own = (b - a for a, b in zip(t0, cpu_ticks()))
        c1 = ceilings()
    foreign = (busy - own) / max(total, 1) * (os.cpu_count() or 1)
    cols = ["case", "dtype", "torch_ms", "nsiter_ms", "speed_vs_torch", "nsiter_subpixel_ms", "subpixel_speedup",
            "subpixel_vs_torch", "torch_subpixel_ms", "torch_subpixel_speedup", "array_code_ms",
            "fused_speedup_vs_array", "GFLOP", "GFLOP_subpixel", "nsiter_GFLOPs", "max_rel_err_vs_torch"]
    meta = {
        "goal": "nsiter.conv_transpose2d >= 1.0x CPU torch conv_transpose2d on the k4 s2 p1 float32 case",
        "ratios": f"medians over {args.rounds} interleaved rounds of per-round time ratios "
                  "(speed_vs_torch = t_torch / t_nsiter; subpixel_speedup = t_nsiter / t_nsiter_subpixel; "
                  "torch_subpixel_speedup = t_torch / t_torch_subpixel)",
        "threads": f"torch {torch.get_num_threads()}, numba {numba.get_num_threads()}, BLAS {THREADS}",
        "memcpy_GBps (start, end)": (round(c0["memcpy_GBps"], 1), round(c1["memcpy_GBps"], 1)),
        "sgemm_1024_GFLOPs (start, end)": (round(c0["sgemm_1024_GFLOPs"]), round(c1["sgemm_1024_GFLOPs"])),
        "foreign_cores (other processes, mean)": round(foreign, 2),
        **lat,
        "machine": machine_info(),
    }
    path = write_results("conv", rows, meta=meta, columns=cols,
                         title="conv_transpose2d (CPU): nsiter vs torch, and the sub-pixel route (Shi et al. 2016)")
    print(path.read_text())
    path = write_results("conv_blocks", blocks, meta={
        "what": "median ms of nsiter.conv_transpose2d (float32) per task block size (elements of one "
                "column block, nsiter._numba._conv._BLOCK_ELEMENTS), interleaved rounds",
        "threads": meta["threads"], "foreign_cores (other processes, mean)": meta["foreign_cores (other processes, mean)"],
        "machine": meta["machine"]}, title="conv kernels: task block size")
    print(path.read_text())


if __name__ == "__main__":
    main()
