"""Fig. 2 of Ye et al. 2020: 15x15 deconvolution kernels per RGB channel.

The paper whitens 15x15x3 patches from 1024 random ImageNet images and shows the
centre row of Cov^(-1/2) (§4.3.2) reshaped to a kernel per channel: centre-surround
structure.  Here the covariance is streamed with ``PatchStatistics`` over many random
crops (fixed seed) of the image, D = (Cov + eps I)^(-1/2) by the coupled Newton–Schulz
iteration, and ``deconvolution_kernel`` slices the centre rows.  Panel (r, c) is the
part of output channel r's kernel that reads input channel c; the diagonal panels
are the per-channel kernels of the paper's figure.
"""
from __future__ import annotations

import sys

import numpy as np

from _figures import load_image, parser, plt, save_figure, write_csv, write_json

import nsiter


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--n-crops", type=int, default=128)
    p.add_argument("--crop", type=int, default=80)
    p.add_argument("--kernel", type=int, default=15)
    p.add_argument("--eps", type=float, default=1e-5)
    args = p.parse_args(argv)
    x = load_image(args.image)
    c, h, w = x.shape
    k = args.kernel
    rng = np.random.default_rng(2020)
    stats = nsiter.PatchStatistics(k)
    crops = []
    for _ in range(args.n_crops):
        i = int(rng.integers(0, h - args.crop + 1))
        j = int(rng.integers(0, w - args.crop + 1))
        crops.append(x[:, i:i + args.crop, j:j + args.crop])
        if len(crops) == 32:
            stats.update(np.stack(crops))
            crops = []
    if crops:
        stats.update(np.stack(crops))
    cov, mean = stats.covariance()
    D, info = nsiter.inv_sqrtm(cov, eps=args.eps, method="coupled", n_iter=100, return_info=True)
    K = nsiter.deconvolution_kernel(D, k, c)  # (C, C, k, k)
    centre = k // 2
    # centre-surround: sign of the centre tap vs the mean of its 8 neighbours (diagonal panels)
    cs = []
    for ch in range(c):
        kk = K[ch, ch]
        ring = np.concatenate([kk[centre - 1, centre - 1:centre + 2], kk[centre + 1, centre - 1:centre + 2],
                               kk[centre, [centre - 1, centre + 1]]])
        cs.append({"channel": "RGB"[ch] if c == 3 else ch, "centre": float(kk[centre, centre]),
                   "mean_neighbour": float(ring.mean()), "centre_surround": bool(np.sign(ring.mean()) !=
                                                                                 np.sign(kk[centre, centre]))})
    fig, axes = plt.subplots(c, c, figsize=(2.6 * c, 2.6 * c), squeeze=False)
    for r in range(c):
        for q in range(c):
            kk = K[r, q]
            lim = np.max(np.abs(kk)) if r != q else np.sort(np.abs(kk).ravel())[-2]  # centre tap saturates
            axes[r, q].imshow(kk, cmap="RdBu_r", vmin=-lim, vmax=lim)
            axes[r, q].set_xticks([])
            axes[r, q].set_yticks([])
            if r == 0:
                axes[r, q].set_title(f"input {'RGB'[q] if c == 3 else q}")
            if q == 0:
                axes[r, q].set_ylabel(f"output {'RGB'[r] if c == 3 else r}")
        for s in axes[r, r].spines.values():
            s.set_edgecolor("k")
            s.set_linewidth(2)
    fig.suptitle(f"{k}x{k} deconvolution kernels (centre rows of (Cov+{args.eps:g}I)^-1/2), "
                 f"{stats.count} patches from {args.n_crops} crops", fontsize=10)
    save_figure(fig, args.out, "fig2_deconvolution_kernels")
    write_csv(args.out, "fig2_deconvolution_kernels", ["out_channel", "in_channel", "i", "j", "value"],
              [(r, q, i, j, float(K[r, q, i, j])) for r in range(c) for q in range(c)
               for i in range(k) for j in range(k)])
    write_json(args.out, "fig2_deconvolution_kernels", {
        "n_patches": stats.count, "n_crops": args.n_crops, "crop": args.crop, "kernel": k, "eps": args.eps,
        "ns_final_residual": float(np.asarray(info.residuals)[-1]), "centre_surround": cs})
    for e in cs:
        print(f"channel {e['channel']}: centre {e['centre']:+.3g}, mean neighbour {e['mean_neighbour']:+.3g}, "
              f"centre-surround: {e['centre_surround']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
