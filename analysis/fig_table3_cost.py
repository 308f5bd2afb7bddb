"""Table 3 of Ye et al. 2020 (appendix A.6): cost breakdown of a deconvolution layer on CPU.

For each of the paper's layer shapes (H, W, Cin, Cout, groups, k, sampling stride S):
- im2col: ``nsiter.im2col`` of the subsampled patch grid (stride S, padding k//2);
- cov: ``nsiter.patch_covariance`` with the reference code's grouping (block size
  B = Cin/groups, one shared (B*k*k)^2 covariance) — it fuses im2col and XᵀX in
  float64 chunks, so this column is im2col + covariance together;
- inv: 5 coupled Newton–Schulz iterations on that covariance (``inv_sqrtm``);
- conv: the layer's dense convolution (torch ``conv2d`` on CPU, stride 1, padding k//2).
The paper used batch 128; here the batch is smaller (``--batch``, default 8) and every
time is also given per image.  The comparison that carries over between machines is
the ratio (im2col + cov + inv) / conv, printed next to the paper's.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numba
import numpy as np

from _bench import median_time
from _figures import parser, plt, save_figure, write_csv, write_json
from _paper import TABLE3 as PAPER

import nsiter



def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        torch = None
        print("torch is not installed: the conv column uses scipy.signal.correlate on one image "
              "(install nsiter[torch] for the torch conv2d reference)")
    rng = np.random.default_rng(3)
    rows = []
    t_start = time.perf_counter()
    for idx, (h, w, cin, cout, groups, k, s, *paper) in enumerate(PAPER):
        n = args.batch
        x = rng.standard_normal((n, cin, h, w), dtype=np.float32)
        b = cin // groups
        pad = k // 2
        t_im2col = median_time(lambda: nsiter.im2col(x, k, stride=s, padding=pad), repeat=args.repeat)
        kw = dict(padding=pad, sampling_stride=s, block_size=b, grouping="reference")
        cov, _ = nsiter.patch_covariance(x, k, **kw)
        t_cov = median_time(lambda: nsiter.patch_covariance(x, k, **kw), repeat=args.repeat)
        t_inv = median_time(lambda: nsiter.inv_sqrtm(cov, n_iter=5, eps=1e-5), repeat=max(args.repeat, 5))
        if torch is not None:
            xt = torch.from_numpy(x)
            wt = torch.from_numpy(rng.standard_normal((cout, cin, k, k), dtype=np.float32))
            with torch.no_grad():
                t_conv = median_time(lambda: F.conv2d(xt, wt, padding=pad), repeat=args.repeat)
        else:
            from scipy.signal import correlate

            wt = rng.standard_normal((cin, k, k)).astype(np.float32)
            t_conv = median_time(lambda: correlate(x[0], wt, mode="same"), repeat=1) * cout * n
        ours = (t_cov + t_inv) / t_conv
        theirs = (paper[0] + paper[1] + paper[2]) / paper[3]
        rows.append({"H": h, "W": w, "Cin": cin, "Cout": cout, "groups": groups, "k": k, "S": s,
                     "im2col_ms": 1e3 * t_im2col, "cov_ms": 1e3 * t_cov, "inv_ms": 1e3 * t_inv,
                     "conv_ms": 1e3 * t_conv, "ratio_ours": ours,
                     "paper_im2col_s": paper[0], "paper_cov_s": paper[1], "paper_inv_s": paper[2],
                     "paper_conv_s": paper[3], "ratio_paper": theirs, "F_block": b * k * k})
        print(f"[{idx + 1}/{len(PAPER)}] {h}x{w}x{cin}->{cout} g{groups} k{k} S{s}: im2col {1e3 * t_im2col:.2f} ms, "
              f"cov {1e3 * t_cov:.2f} ms, inv {1e3 * t_inv:.3f} ms, conv {1e3 * t_conv:.1f} ms; "
              f"(cov+inv)/conv = {ours:.3f} (paper (im2col+cov+inv)/conv = {theirs:.3f})", flush=True)
    cols = list(rows[0])
    write_csv(args.out, "table3_cost", cols, [[r[c] for c in cols] for r in rows])
    write_json(args.out, "table3_cost", {"batch": args.batch, "paper_batch": 128, "dtype": "float32",
                                         "torch_conv": torch is not None, "rows": rows,
                                         "total_seconds": time.perf_counter() - t_start})
    md = ["| H×W | Cin→Cout | groups | k | S | im2col ms | cov ms | inv ms | conv ms | (cov+inv)/conv | paper ratio |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['H']}×{r['W']} | {r['Cin']}→{r['Cout']} | {r['groups']} | {r['k']} | {r['S']} | "
                  f"{r['im2col_ms']:.2f} | {r['cov_ms']:.2f} | {r['inv_ms']:.3f} | {r['conv_ms']:.1f} | "
                  f"{r['ratio_ours']:.3f} | {r['ratio_paper']:.3f} |")
    header = (f"Table 3 on this machine: batch {args.batch} (paper: 128), float32, nsiter numba threads = "
              f"{numba.get_num_threads()}; cov = fused im2col + covariance "
              f"(patch_covariance, reference grouping); inv = 5 coupled NS iterations; conv = "
              f"{'torch conv2d' if torch is not None else 'scipy correlate (extrapolated)'}.\n\n")
    Path(args.out).joinpath("table3_cost.md").write_text(header + "\n".join(md) + "\n")

    fig, ax = plt.subplots(figsize=(14, 5.5))
    idx = np.arange(len(rows))
    ax.bar(idx - 0.2, [r["ratio_ours"] for r in rows], 0.4, label="nsiter, this machine: (cov + inv) / conv")
    ax.bar(idx + 0.2, [r["ratio_paper"] for r in rows], 0.4, label="paper: (im2col + cov + inv) / conv")
    ax.set_yscale("log")
    ax.set_xticks(idx)
    ax.set_xticklabels([f"{r['H']}²×{r['Cin']}→{r['Cout']}, g{r['groups']}, k{r['k']}, S{r['S']}" for r in rows],
                       fontsize=8, rotation=60, ha="right")
    ax.set_ylabel("deconvolution cost / convolution cost")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_title(f"Table 3: deconvolution statistics as a fraction of the convolution (batch {args.batch})")
    ax.legend()
    ax.grid(True, axis="y", which="both", alpha=0.3)
    save_figure(fig, args.out, "table3_cost")
    return 0


if __name__ == "__main__":
    sys.exit(main())
