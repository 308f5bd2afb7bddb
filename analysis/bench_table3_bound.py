"""The bound on Table 3's two grouped rows that stay above the paper's ratio (issue 17).

For 64x64x128 in 2 groups and 32x32x256 in 4 groups (k = 3, S = 3, the reference grouping, batch
128), the covariance may take at most ``paper_ratio * conv - inv`` for the row to meet the
paper's (cov + inv) / conv.  This script measures what no fill can remove: BLAS's ``X^T X`` of the
row's patch rows, already filled, in the chunks the "gemm" kernel uses (numpy's ``matmul`` of a
matrix with its own transpose calls SYRK), next to 1024^3 SGEMM and memcpy in the same run (ABAB
rounds, medians), and the time the rows take to write at memcpy speed.  ``conv`` and ``inv`` are
read from ``analysis/results/table3_batch.json`` (run ``bench_table3.py`` first).  Writes
``analysis/results/table3_bound.{json,csv,md}``.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import RESULTS, gemm_gflops, memcpy_gbps, progress, write_results  # noqa: E402

ROWS = {"64x64x128->256 g2 k3 S3": (64, 128, 2), "32x32x256->512 g4 k3 S3": (32, 256, 4)}
BATCH = 128
FB1 = 577  # 576 features and the ones column of the moments
CHUNK = 3632  # stacked rows per BLAS product (the "gemm" kernel's 8 MiB chunk of 4 x 577 float32)


def main(argv=None) -> int:
    table = json.loads((RESULTS / "table3_batch.json").read_text())["rows"]
    rng = np.random.default_rng(0)
    X = rng.standard_normal((CHUNK, FB1)).astype(np.float32)
    out = np.empty((FB1, FB1), np.float32)
    times, gemm, copy = [], [], []
    for r in range(5):
        progress(f"round {r + 1}/5")
        gemm.append(gemm_gflops(1024, 1024, 1024, np.float32))
        copy.append(memcpy_gbps())
        time.sleep(0.2)
        np.matmul(X.T, X, out=out)
        t0 = time.perf_counter()
        for _ in range(10):
            np.matmul(X.T, X, out=out)
        times.append((time.perf_counter() - t0) / 10)
    t_chunk, sgemm, gbps = float(np.median(times)), float(np.median(gemm)), float(np.median(copy))
    rows = []
    for layer, (h, cin, groups) in ROWS.items():
        rec = {x["batch"]: x for x in table if x["layer"] == layer}[BATCH]
        oh = -(-h // 3)
        stacked = BATCH * oh * oh * groups
        product_ms = 1e3 * t_chunk * stacked / CHUNK
        budget_ms = rec["paper_ratio"] * rec["conv_ms"] - rec["inv_ms"]
        write_ms = 1e3 * stacked * FB1 * 4 / (gbps * 1e9)
        rows.append(dict(layer=layer, stacked_rows=stacked, cov_budget_ms=budget_ms, cov_measured_ms=rec["cov_ms"],
                         product_only_ms=product_ms, rows_write_ms=write_ms,
                         product_plus_write_over_budget=(product_ms + write_ms) / budget_ms,
                         syrk_over_sgemm_full=2.0 * CHUNK * FB1 ** 2 / t_chunk / 1e9 / sgemm))
    meta = dict(sgemm_GFLOPs_1024=sgemm, memcpy_GBps=gbps, chunk_rows=CHUNK, batch=BATCH,
                note="syrk_over_sgemm_full: X^T X counted as 2 k n^2 flops (both triangles, as Table 3's cov)")
    path = write_results("table3_bound", rows, meta=meta, title="Table 3's grouped rows: what the covariance cannot go under")
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
