"""Benchmark: nsiter.im2col against numpy sliding_window_view and torch unfold (CPU).

Peers produce exactly the same (N*L, C*kh*kw) matrix:
- numpy: ``sliding_window_view`` of the padded input + one contiguous copy into the layout;
- torch: ``F.unfold(x).transpose(1, 2).contiguous()``.
Ceiling: memcpy bandwidth measured in the same run; "GB/s" counts input bytes read once
plus output bytes written.  JIT compile and cache-load latency are measured in fresh
subprocesses with an empty / warm NUMBA_CACHE_DIR.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

sys.path.insert(0, os.path.dirname(__file__))
from _bench import machine_info, median_time, memcpy_gbps, progress, write_results  # noqa: E402

import nsiter  # noqa: E402

# (label, N, C, H, W, k, stride, padding); the paper's Table 3 uses batch 128 — scaled down here
CASES = [
    ("issue goal (8,64,64,64) k3 p1", 8, 64, 64, 64, 3, 1, 1),
    ("Table 3: 256x256x3, k3, S=3", 16, 3, 256, 256, 3, 3, 0),
    ("Table 3: 128x128x64, k3, S=3", 16, 64, 128, 128, 3, 3, 0),
    ("Table 3: 64x64x128, k3, S=3", 16, 128, 64, 64, 3, 3, 0),
    ("Table 3: 256x256x3, k7, S=3", 16, 3, 256, 256, 7, 3, 0),
]


def numpy_im2col(x, k, s, p):
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x
    v = sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::s, ::s]  # N, C, oh, ow, k, k
    n, c, oh, ow = v.shape[:4]
    return np.ascontiguousarray(v.transpose(0, 2, 3, 1, 4, 5)).reshape(n * oh * ow, c * k * k)


def jit_latency() -> dict:
    code = ("import time, numpy as np; t=time.perf_counter(); import nsiter; t1=time.perf_counter(); "
            "nsiter.im2col(np.zeros((1,2,8,8),np.float32),3); t2=time.perf_counter(); "
            "print(t1-t, t2-t1)")
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, NUMBA_CACHE_DIR=d)
        out = []
        for _ in range(2):
            r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            out.append([float(v) for v in r.stdout.split()])
    return {"import_s": out[1][0], "first_call_compile_s": out[0][1], "first_call_cached_s": out[1][1]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds of the out=/copyto comparison")
    args = ap.parse_args(argv)
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    progress("JIT latency (fresh processes)")
    lat = jit_latency()
    bw = memcpy_gbps()
    progress(f"memcpy {bw:.1f} GB/s")
    rows = []
    side = side_by_side(rng, args.rounds)
    for label, n, c, h, w, k, s, p in CASES:
        x = rng.standard_normal((n, c, h, w), dtype=np.float32)
        X = nsiter.im2col(x, k, stride=s, padding=p)
        assert np.array_equal(X, numpy_im2col(x, k, s, p))
        t_ns = median_time(lambda: nsiter.im2col(x, k, stride=s, padding=p), repeat=args.repeat)
        t_np = median_time(lambda: numpy_im2col(x, k, s, p), repeat=args.repeat)
        row = {"case": label, "out_MB": X.nbytes / 1e6, "nsiter_ms": 1e3 * t_ns, "numpy_swv_ms": 1e3 * t_np,
               "speedup_vs_numpy": t_np / t_ns}
        if torch is not None:
            xt = torch.from_numpy(x)

            def tu():
                return F.unfold(xt, k, padding=p, stride=s).transpose(1, 2).contiguous()

            assert np.array_equal(tu().reshape(X.shape).numpy(), X)
            t_t = median_time(tu, repeat=args.repeat)
            row.update(torch_unfold_ms=1e3 * t_t, speedup_vs_torch=t_t / t_ns)
        gbs = (x.nbytes + X.nbytes) / t_ns / 1e9
        row.update(nsiter_GBps=gbs, fraction_of_memcpy=gbs / bw)
        rows.append(row)
        progress(f"{label}: nsiter {1e3 * t_ns:.2f} ms, x{row['speedup_vs_numpy']:.2f} vs numpy, "
                 f"x{row.get('speedup_vs_torch', float('nan')):.2f} vs torch")
    cols = ["case", "out_MB", "nsiter_ms", "numpy_swv_ms", "torch_unfold_ms", "speedup_vs_numpy",
            "speedup_vs_torch", "nsiter_GBps", "fraction_of_memcpy"]
    meta = {"memcpy_GBps (read+write)": round(bw, 2), **{k: round(v, 3) for k, v in lat.items()},
            "dtype": "float32", "machine": machine_info()}
    path = write_results("im2col", rows, meta=meta, columns=cols,
                         title="im2col (float32, CPU): nsiter vs numpy sliding_window_view vs torch unfold")
    scols = ["case", "out_MB", "copyto_ms", "out_ms", "alloc_ms", "numpy_ms", "out_fraction_of_copy",
             "alloc_fraction_of_copy", "out_fraction_of_copy_rw", "alloc_fraction_of_copy_rw", "alloc_speedup_vs_numpy",
             "out_speedup_vs_numpy", "foreign_cores_max"]
    smeta = {"rounds": args.rounds, "definition": SIDE_DEFINITION, "machine": machine_info()}
    spath = write_results("im2col_bandwidth", side, meta=smeta, columns=scols,
                          title="im2col output bandwidth against np.copyto (ABAB rounds, medians of per-round ratios)")
    print(path.read_text())
    print(spath.read_text())


SIDE_DEFINITION = ("*_fraction_of_copy = t(np.copyto of a preallocated buffer of the output's size) / t(im2col): "
                   "output bytes written per second over bytes copied per second; *_rw: the same against copyto's "
                   "read+write byte rate (bytes read plus bytes written), as the memcpy_GBps column of im2col.md "
                   "counts it, i.e. half of it; out = im2col(..., out=buf), alloc = a fresh result each call; "
                   "numpy = sliding_window_view + copy; per round each call is timed A B B A (min of 3 calls), "
                   "ratios are medians over rounds of the per-round ratios")


def _cpu_busy():
    """(busy jiffies of the machine, all jiffies, jiffies of this process) from /proc (Linux), or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
    except OSError:
        return None
    t = os.times()
    return sum(v) - v[3] - v[4], sum(v), (t.user + t.system) * os.sysconf("SC_CLK_TCK")


def side_by_side(rng, rounds):
    """The goal cases timed in interleaved rounds against np.copyto into a preallocated buffer and numpy."""
    import time

    def best(fn, k=3):
        ts = []
        for _ in range(k):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    rows = []
    for label, n, c, h, w, k, s, p in [CASES[0], CASES[4]]:
        x = rng.standard_normal((n, c, h, w), dtype=np.float32)
        X = nsiter.im2col(x, k, stride=s, padding=p)
        src, buf = X.copy(), np.empty_like(X)
        assert nsiter.im2col(x, k, stride=s, padding=p, out=buf) is buf and np.array_equal(buf, X)
        fns = {"copyto": lambda: np.copyto(buf, src), "out": lambda: nsiter.im2col(x, k, stride=s, padding=p, out=buf),
               "alloc": lambda: nsiter.im2col(x, k, stride=s, padding=p), "numpy": lambda: numpy_im2col(x, k, s, p)}
        rec = {key: [] for key in fns}
        foreign = []
        for _ in range(rounds):
            c0 = _cpu_busy()
            got = {key: [] for key in fns}
            for order in (list(fns), list(fns)[::-1]):
                for key in order:
                    got[key].append(best(fns[key]))
            for key in fns:
                rec[key].append(float(np.mean(got[key])))
            c1 = _cpu_busy()
            if c0 and c1:
                busy, total, own = (b - a for a, b in zip(c0, c1))
                foreign.append((busy - own) / max(total, 1) * (os.cpu_count() or 1))
        t = {key: np.array(v) for key, v in rec.items()}

        def med(a):
            return float(np.median(a))

        row = {"case": label, "out_MB": X.nbytes / 1e6, **{f"{key}_ms": 1e3 * med(v) for key, v in t.items()},
               "out_fraction_of_copy": med(t["copyto"] / t["out"]), "alloc_fraction_of_copy": med(t["copyto"] / t["alloc"]),
               "out_fraction_of_copy_rw": med(t["copyto"] / t["out"]) / 2,
               "alloc_fraction_of_copy_rw": med(t["copyto"] / t["alloc"]) / 2,
               "alloc_speedup_vs_numpy": med(t["numpy"] / t["alloc"]), "out_speedup_vs_numpy": med(t["numpy"] / t["out"]),
               "foreign_cores_max": max(foreign) if foreign else float("nan")}
        rows.append(row)
        progress(f"{label}: out= {row['out_ms']:.2f} ms, alloc {row['alloc_ms']:.2f} ms, copyto {row['copyto_ms']:.2f} ms, "
                 f"numpy {row['numpy_ms']:.2f} ms (other processes: up to {row['foreign_cores_max']:.2f} cores)")
    return rows


if __name__ == "__main__":
    main()
