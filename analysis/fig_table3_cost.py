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

import numpy as np

from _figures import parser, plt, save_figure, write_csv, write_json

import nsiter

PAPER = [  # H, W, Cin, Cout, groups, k, stride, im2col, cov, inv, conv (seconds, batch 128)
    (256, 256, 3, 64, 1, 3, 3, 0.069, 0.0079, 0.00025, 0.50),
    (128, 128, 64, 128, 1, 3, 3, 0.315, 0.3214, 0.02069, 0.67),
    (64, 64, 128, 256, 2, 3, 3, 0.045, 0.0445, 0.00076, 0.55),
    (32, 32, 256, 512, 4, 3, 3, 0.022, 0.0391, 0.00222, 0.48),
    (16, 16, 512, 512, 8, 3, 3, 0.011, 0.0444, 0.01155, 0.23),
    (128, 128, 64, 128, 64, 3, 3, 0.376, 0.0871, 0.00024, 0.66),
    (64, 64, 128, 256, 128, 3, 3, 0.042, 0.0412, 0.00082, 0.53),
    (32, 32, 256, 512, 256, 3, 3, 0.023, 0.0377, 0.00208, 0.47),
    (16, 16, 512, 512, 512, 3, 3, 0.011, 0.0437, 0.01194, 0.22),
    (128, 128, 64, 128, 32, 3, 3, 0.360, 0.0939, 0.00021, 0.67),
    (64, 64, 128, 256, 32, 3, 3, 0.044, 0.0425, 0.00076, 0.55),
    (32, 32, 256, 512, 32, 3, 3, 0.023, 0.0374, 0.00204, 0.46),
    (16, 16, 512, 512, 32, 3, 3, 0.011, 0.0421, 0.01180, 0.22),
    (256, 256, 3, 64, 1, 3, 5, 0.030, 0.0046, 0.00029, 0.49),
    (128, 128, 64, 128, 1, 3, 5, 0.153, 0.1284, 0.01901, 0.66),
    (256, 256, 3, 64, 1, 7, 3, 0.338, 0.1111, 0.00107, 0.69),
    (256, 256, 3, 64, 1, 7, 5, 0.180, 0.0408, 0.00107, 0.69),
    (256, 256, 3, 64, 1, 7, 7, 0.063, 0.0210, 0.00104, 0.70),
    (256, 256, 3, 64, 1, 11, 3, 0.681, 0.4810, 0.00479, 0.99),
    (256, 256, 3, 64, 1, 11, 5, 0.315, 0.1909, 0.00488, 1.00),
    (256, 256, 3, 64, 1, 11, 7, 0.199, 0.1022, 0.00494, 0.99),
    (256, 256, 3, 64, 1, 11, 11, 0.069, 0.0420, 0.00496, 1.00),
]


def median(fn, repeat):
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


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
        t_im2col = median(lambda: nsiter.im2col(x, k, stride=s, padding=pad), args.repeat)
        kw = dict(padding=pad, sampling_stride=s, block_size=b, grouping="reference")
        cov, _ = nsiter.patch_covariance(x, k, **kw)
        t_cov = median(lambda: nsiter.patch_covariance(x, k, **kw), args.repeat)
        t_inv = median(lambda: nsiter.inv_sqrtm(cov, n_iter=5, eps=1e-5), max(args.repeat, 5))
        if torch is not None:
            xt = torch.from_numpy(x)
            wt = torch.from_numpy(rng.standard_normal((cout, cin, k, k), dtype=np.float32))
            with torch.no_grad():
                t_conv = median(lambda: F.conv2d(xt, wt, padding=pad), args.repeat)
        else:
            from scipy.signal import correlate

            wt = rng.standard_normal((cin, k, k)).astype(np.float32)
            t_conv = median(lambda: correlate(x[0], wt, mode="same"), 1) * cout * n
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
              f"{__import__('numba').get_num_threads()}; cov = fused im2col + covariance "
              f"(patch_covariance, reference grouping); inv = 5 coupled NS iterations; conv = "
              f"{'torch conv2d' if torch is not None else 'scipy correlate (extrapolated)'}.\n\n")
    (args.out and __import__('pathlib').Path(args.out)).joinpath("table3_cost.md").write_text(header + "\n".join(md) + "\n")

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
