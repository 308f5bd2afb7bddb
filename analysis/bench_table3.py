"""Table 3 at the paper's batch size (128) beside batch 8, each component against its own ceiling.

Ye et al. 2020, appendix A.6, time a deconvolution layer's statistics against its convolution at
batch 128.  The two costs scale differently: the covariance and the convolution grow with the
batch, the inverse square root of the ``F x F`` block (``F = B k^2``) does not.  So a table at
batch 8 compares other things than the paper's, and this benchmark measures both batches:

- ``cov``: ``nsiter.patch_covariance`` (fused im2col + covariance, the reference grouping with
  blocks of ``Cin / groups`` channels, sampling stride S, padding k // 2) of the whole batch;
  the kernels stream the patches, so memory stays bounded by their chunk, not by the batch;
- ``inv``: 5 coupled Newton–Schulz iterations (``inv_sqrtm(cov, n_iter=5, eps=1e-5)``);
- ``conv``: torch ``conv2d`` of the layer (dense, stride 1, padding k // 2), run over chunks of
  ``--chunk`` images and summed, so the batch-128 outputs (up to 2 GB) never exist at once.

Every round times cov, inv and conv once each, for every row and both batches, in turn; the
reported ratio ``(cov + inv) / conv`` is the median of the per-round ratios.  The ceilings are
measured in the same run, once per round (medians reported): SGEMM at 1024^3 and at the inverse
square root's size, DGEMM, and the copy rate.  Each component's rate is given as a fraction of them: the covariance as the GEMM
flops of ``X^T X`` (``2 n F^2`` per covariance, ``n`` sampled rows, although a symmetric update
needs half) per second over SGEMM; the iterations as ``5 * 6 F^3`` flops over SGEMM at ``F``; the
convolution as ``2 N Cout H W Cin k^2`` over SGEMM.

``python analysis/bench_table3.py [--rounds 3] [--batches 8 128] [--rows 0 2 4]`` writes
``analysis/results/table3_batch.{json,csv,md}``.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from _bench import gemm_gflops, memcpy_gbps, progress, write_results
from _paper import TABLE3 as PAPER

import nsiter


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _row_inputs(row, batch_max, seed):
    h, w, cin, cout, groups, k, s = row[:7]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_max, cin, h, w), dtype=np.float32)
    wt = rng.standard_normal((cout, cin, k, k), dtype=np.float32)
    return x, wt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 128])
    ap.add_argument("--chunk", type=int, default=8, help="images per conv2d call")
    ap.add_argument("--rows", type=int, nargs="*", default=None, help="indices into the paper's 22 rows")
    ap.add_argument("--quick", action="store_true", help="3 rows, batches 8 and 32, 2 rounds")
    args = ap.parse_args(argv)
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("bench_table3 needs torch for the conv2d reference (pip install 'nsiter[torch]'); skipped")
        return 0
    rows_idx = args.rows if args.rows is not None else list(range(len(PAPER)))
    batches = sorted(set(args.batches))
    rounds = args.rounds
    if args.quick:
        rows_idx, batches, rounds = [0, 2, 15], [8, 32], 2
    t_start = time.perf_counter()
    samples = {"memcpy_GBps": [], "sgemm_GFLOPs_1024": [], "dgemm_GFLOPs_1024": []}

    def measure_ceilings():  # once per round, between the rows: the medians are reported
        samples["memcpy_GBps"].append(memcpy_gbps())
        samples["sgemm_GFLOPs_1024"].append(gemm_gflops(1024, 1024, 1024, np.float32))
        samples["dgemm_GFLOPs_1024"].append(gemm_gflops(1024, 1024, 1024, np.float64))

    sgemm_at = {}

    # warm up the kernels (compile or cache load reported apart)
    t0 = time.perf_counter()
    warm = np.random.default_rng(0).standard_normal((2, 4, 12, 12), dtype=np.float32)
    cw, _ = nsiter.patch_covariance(warm, 3, padding=1, sampling_stride=3, block_size=4, grouping="reference")
    nsiter.inv_sqrtm(cw, n_iter=5, eps=1e-5)
    first_call_s = time.perf_counter() - t0

    cases = []
    for i in rows_idx:
        row = PAPER[i]
        h, w, cin, cout, groups, k, s = row[:7]
        fb = (cin // groups) * k * k
        sgemm_at.setdefault(fb, [])
        cases.append((i, row, fb))

    times = {(i, n, part): [] for i, _, _ in cases for n in batches for part in ("cov", "inv", "conv")}
    ratios = {(i, n): [] for i, _, _ in cases for n in batches}
    extra = {}
    for r in range(rounds):
        measure_ceilings()
        for fb in sgemm_at:
            sgemm_at[fb].append(gemm_gflops(fb, fb, fb, np.float32))
        for i, row, fb in cases:
            h, w, cin, cout, groups, k, s = row[:7]
            x, wt = _row_inputs(row, max(batches), i)
            kw = dict(padding=k // 2, sampling_stride=s, block_size=cin // groups, grouping="reference")
            wt_t = torch.from_numpy(wt)
            for n in batches:
                xb = x[:n]
                cov = None

                def run_cov():
                    nonlocal cov
                    cov, _ = nsiter.patch_covariance(xb, k, **kw)

                def run_conv():
                    with torch.no_grad():
                        for c0 in range(0, n, args.chunk):
                            F.conv2d(torch.from_numpy(xb[c0:c0 + args.chunk]), wt_t, padding=k // 2)

                if r == 0:  # untimed first pass: page faults of the first touch, caches
                    run_cov()
                    nsiter.inv_sqrtm(cov, n_iter=5, eps=1e-5)
                    run_conv()
                t_cov = _timed(run_cov)
                t_inv = _timed(lambda: nsiter.inv_sqrtm(cov, n_iter=5, eps=1e-5))
                t_conv = _timed(run_conv)
                for part, t in (("cov", t_cov), ("inv", t_inv), ("conv", t_conv)):
                    times[(i, n, part)].append(t)
                ratios[(i, n)].append((t_cov + t_inv) / t_conv)
                oh = (h + 2 * (k // 2) - k) // s + 1
                ow = (w + 2 * (k // 2) - k) // s + 1
                extra[(i, n)] = n * oh * ow * groups  # sampled rows (the reference grouping stacks groups)
            del x
            progress(f"round {r + 1}/{rounds} row {i}: " + ", ".join(
                f"b{n} {np.median(ratios[(i, n)]):.3f}" for n in batches))

    measure_ceilings()
    ceilings = {key: float(np.median(v)) for key, v in samples.items()}
    sgemm_at = {fb: float(np.median(v)) for fb, v in sgemm_at.items()}
    out = []
    for i, row, fb in cases:
        h, w, cin, cout, groups, k, s = row[:7]
        paper = (row[7] + row[8] + row[9]) / row[10]
        for n in batches:
            med = {part: float(np.median(times[(i, n, part)])) for part in ("cov", "inv", "conv")}
            n_rows = extra[(i, n)]
            cov_gflops = 2.0 * n_rows * fb * fb / med["cov"] / 1e9
            inv_gflops = 5 * 6.0 * fb ** 3 / med["inv"] / 1e9
            conv_gflops = 2.0 * n * cout * h * w * cin * k * k / med["conv"] / 1e9
            out.append({
                "row": i, "layer": f"{h}x{w}x{cin}->{cout} g{groups} k{k} S{s}", "batch": n, "F": fb,
                "cov_ms": 1e3 * med["cov"], "inv_ms": 1e3 * med["inv"], "conv_ms": 1e3 * med["conv"],
                "ratio": float(np.median(ratios[(i, n)])), "paper_ratio": paper,
                "at_or_under_paper": bool(np.median(ratios[(i, n)]) <= paper),
                "cov_frac_sgemm": cov_gflops / ceilings["sgemm_GFLOPs_1024"],
                "inv_frac_sgemm_F": inv_gflops / sgemm_at[fb],
                "inv_frac_sgemm_1024": inv_gflops / ceilings["sgemm_GFLOPs_1024"],
                "conv_frac_sgemm": conv_gflops / ceilings["sgemm_GFLOPs_1024"],
            })
    goals = {}
    for n in batches:
        sel = [o for o in out if o["batch"] == n]
        goals[f"batch {n}: median (cov+inv)/conv"] = float(np.median([o["ratio"] for o in sel]))
        goals[f"batch {n}: rows above the paper's ratio"] = [o["layer"] for o in sel if not o["at_or_under_paper"]]
    big = [o for o in out if o["F"] == 576]
    if big:
        goals["n=576 5 iterations: fraction of SGEMM 1024 (goal >= 0.5)"] = float(
            np.median([o["inv_frac_sgemm_1024"] for o in big]))
    meta = {"ceilings": ceilings, "sgemm_GFLOPs_at_F": {str(k): v for k, v in sgemm_at.items()},
            "rounds": rounds, "chunk": args.chunk, "first_call_s": first_call_s, "goals": goals,
            "torch_threads": torch.get_num_threads(), "seconds": time.perf_counter() - t_start,
            "note": "cov = fused im2col + covariance of the whole batch; conv summed over chunks of images; "
                    "ratios are medians of per-round ratios"}
    write_results("table3_batch", out, meta=meta, title="Table 3 at batch 8 and at the paper's batch 128")
    for key, v in goals.items():
        print(f"{key}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
