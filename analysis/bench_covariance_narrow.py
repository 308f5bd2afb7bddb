"""The fused "narrow" patch-moment kernel against the BLAS one, and the cost model's picks.

Each case times the kernels of :mod:`nsiter._numba.patches` forced (``patch_moments(...,
kernel)``), the moments alone, in rounds: every round runs each kernel in turn (ABAB, three calls
each, the fastest kept, after a 0.3 s pause so that the BLAS threads of the previous kernel have
gone to sleep), and a case's ratio ``narrow / gemm`` is the median of its per-round ratios.  The
ceilings are measured in every round too: SGEMM and DGEMM at 1024^3 (GFLOP/s) and the copy rate;
each kernel's rate is reported as the multiply-adds of its products (``rows * lanes * (fb + 1)^2
/ 2``, the upper triangle with the ones column) over the SGEMM or DGEMM multiply-add rate of its
buffer dtype.  ``pick`` is the cost model's choice and ``pick_is_fastest`` whether it is the
fastest kernel measured (or within 10% of it; the row-shift kernel is timed too where it applies).

Cases: the 22 layers of Table 3 (Ye et al. 2020, the reference grouping of blocks of ``Cin /
groups`` channels, sampling stride S, padding k // 2) at batch ``--batch`` (default 32), and three
dense geometries where the row-shift kernel competes.

``python analysis/bench_covariance_narrow.py [--rounds 3] [--batch 32]`` writes
``analysis/results/covariance_narrow.{json,csv,md}``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

import numpy as np

from _bench import gemm_gflops, memcpy_gbps, progress, write_results
from _paper import TABLE3

from nsiter._moments import plan as _plan
from nsiter._numba import patches

_geometry = importlib.import_module("nsiter.covariance")._sampled_geometry


def _cases(batch: int):
    for i, row in enumerate(TABLE3):
        h, w, cin, _, groups, k, s = row[:7]
        yield (f"T3 row {i}: {h}x{w}x{cin} g{groups} k{k} S{s}", (batch, cin, h, w), k, k // 2, s,
               cin // groups, "reference")
    for shape, k in (((8, 64, 32, 32), 3), ((8, 3, 256, 256), 3), ((8, 16, 64, 64), 5)):
        yield f"dense {shape} k{k}", shape, k, k // 2, 1, None, "contiguous"


def _best_of(fn, n=3) -> float:
    best = np.inf
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    ceilings = {"sgemm_GFLOPs_1024": [], "dgemm_GFLOPs_1024": [], "memcpy_GBps": []}
    cases = list(_cases(args.batch))
    times = {}
    ratios = {c[0]: [] for c in cases}
    info = {}
    for r in range(args.rounds):
        ceilings["sgemm_GFLOPs_1024"].append(gemm_gflops(1024, 1024, 1024, np.float32))
        ceilings["dgemm_GFLOPs_1024"].append(gemm_gflops(1024, 1024, 1024, np.float64))
        ceilings["memcpy_GBps"].append(memcpy_gbps())
        for label, shape, k, p, s, block, grouping in cases:
            x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
            g = _geometry(x.shape, k, 1, p, 1, s)
            plan = _plan(g.c, k * k, block, grouping)
            got = {}
            for kn in ("gemm", "narrow") + (("rowshift",) if g.sh == 1 else ()):
                if r == 0:
                    patches.patch_moments(x, g, plan, kn)  # compile or load, first touch
                time.sleep(0.3)
                got[kn] = _best_of(lambda: patches.patch_moments(x, g, plan, kn))
                times.setdefault((label, kn), []).append(got[kn])
            ratios[label].append(got["narrow"] / got["gemm"])
            lanes = plan.stack if plan.mode == "reference" else plan.groups
            info[label] = dict(F=plan.fb, lanes=lanes, macs=g.n * g.oh * g.ow * lanes * (plan.fb + 1) ** 2 / 2,
                               bdt=patches._buffer_dtype(x.dtype, plan.fb).name,
                               pick=patches.choose_kernel(g, plan, x.dtype))
        progress(f"round {r + 1}/{args.rounds} done")

    ceil = {key: float(np.median(v)) for key, v in ceilings.items()}
    rows = []
    for label, *_ in cases:
        d = info[label]
        gemm_ms = 1e3 * float(np.median(times[(label, "gemm")]))
        narrow_ms = 1e3 * float(np.median(times[(label, "narrow")]))
        ratio = float(np.median(ratios[label]))
        peak = ceil["sgemm_GFLOPs_1024" if d["bdt"] == "float32" else "dgemm_GFLOPs_1024"] * 1e9 / 2  # MAC/s
        ms = {kn: 1e3 * float(np.median(v)) for (lb, kn), v in times.items() if lb == label}
        fastest = min(ms, key=ms.get)
        rows.append({"case": label, "Fb": d["F"], "lanes": d["lanes"], "buffer": d["bdt"], "gemm_ms": gemm_ms,
                     "narrow_ms": narrow_ms, "rowshift_ms": ms.get("rowshift", float("nan")),
                     "narrow_over_gemm": ratio,
                     "gemm_frac_peak": d["macs"] / (gemm_ms / 1e3) / peak,
                     "narrow_frac_peak": d["macs"] / (narrow_ms / 1e3) / peak,
                     "pick": d["pick"], "fastest": fastest,
                     "pick_is_fastest": d["pick"] == fastest or ms[d["pick"]] <= 1.1 * ms[fastest]})
    meta = {"ceilings": ceil, "batch": args.batch, "rounds": args.rounds,
            "median narrow/gemm (Table 3)": float(np.median([r_["narrow_over_gemm"] for r_ in rows[:22]])),
            "picks not the fastest": [r_["case"] for r_ in rows if not r_["pick_is_fastest"]],
            "seconds": time.perf_counter() - t_start,
            "note": "moments only (patch_moments forced); frac_peak: multiply-adds of the upper triangle over "
                    "the GEMM multiply-add rate of the buffer dtype"}
    write_results("covariance_narrow", rows, meta=meta, title="Patch moments: fused narrow kernel vs BLAS rows")
    print(f"median narrow/gemm over Table 3: {meta['median narrow/gemm (Table 3)']:.3f}; "
          f"picks not the fastest: {meta['picks not the fastest']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
