"""Fig. 2 of Ye et al. 2020: 15x15 deconvolution kernels per RGB channel, from a folder of images.

The paper whitens 15x15x3 patches from 1024 random ImageNet images and shows the centre row of
Cov^(-1/2) (§4.3.2) reshaped to a kernel per channel: centre-surround structure.  Here the dataset
is a folder of image files that the script writes itself, deterministically (fixed seed), from an
image shipped inside an installed package: 128 random 80x80 crops of matplotlib's sample photograph
grace_hopper.jpg (mpl-data/sample_data; the other sample images there are logos and drawings, not
photographs), saved as lossless PNG.  ``nsiter.dataset_statistics`` reads the folder on Dask (local
threads: one PatchStatistics per partition, merged exactly along a tree), D = (Cov + eps I)^(-1/2)
by the coupled Newton–Schulz iteration, and ``deconvolution_kernel`` slices the centre rows.  Panel
(r, c) is the part of output channel r's kernel that reads input channel c; the diagonal panels are
the per-channel kernels of the paper's figure.  ``nsiter stats FOLDER -k 15 --deconv-kernels k.png``
does the same for any folder.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from _figures import parser, save_figure, write_csv, write_json

import nsiter
from nsiter._stats_cli import kernel_figure


def write_crops(image, folder, n_crops: int, crop: int, seed: int = 2020) -> list[Path]:
    """``n_crops`` random ``crop x crop`` crops of ``image`` (a path; None: grace_hopper.jpg) as 8-bit PNGs in ``folder``.

    The same crops, in the same order, as the script took in memory before it read a folder."""
    import matplotlib.cbook as cbook
    from PIL import Image

    path = image if image is not None else cbook.get_sample_data(nsiter.data.SAMPLE_IMAGE, asfileobj=False)
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))  # 8-bit, so the PNGs hold the file's values exactly
    h, w = pixels.shape[:2]
    rng = np.random.default_rng(seed)
    files = []
    for n in range(n_crops):
        i = int(rng.integers(0, h - crop + 1))
        j = int(rng.integers(0, w - crop + 1))
        files.append(Path(folder) / f"crop_{n:04d}.png")
        Image.fromarray(pixels[i:i + crop, j:j + crop]).save(files[-1])
    return files


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--n-crops", type=int, default=128)
    p.add_argument("--crop", type=int, default=80)
    p.add_argument("--kernel", type=int, default=15)
    p.add_argument("--eps", type=float, default=1e-5)
    p.add_argument("--folder", default=None, help="write the crops here and keep them (default: a temporary folder)")
    args = p.parse_args(argv)
    k = args.kernel
    with tempfile.TemporaryDirectory(prefix="nsiter-fig2-") as tmp:
        folder = Path(args.folder or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        write_crops(args.image, folder, args.n_crops, args.crop)
        print(f"wrote {args.n_crops} crops of {args.crop}x{args.crop} to {folder}; computing the statistics ...",
              flush=True)
        stats, run = nsiter.dataset_statistics(folder, k, return_info=True)
    c = stats.channels
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
    fig = kernel_figure(K, f"{k}x{k} deconvolution kernels (centre rows of (Cov+{args.eps:g}I)^-1/2), "
                           f"{stats.count} patches from {args.n_crops} crops")
    save_figure(fig, args.out, "fig2_deconvolution_kernels")
    write_csv(args.out, "fig2_deconvolution_kernels", ["out_channel", "in_channel", "i", "j", "value"],
              [(r, q, i, j, float(K[r, q, i, j])) for r in range(c) for q in range(c)
               for i in range(k) for j in range(k)])
    write_json(args.out, "fig2_deconvolution_kernels", {
        "n_patches": stats.count, "n_crops": args.n_crops, "crop": args.crop, "kernel": k, "eps": args.eps,
        "source": "folder of PNG crops of " + (args.image or nsiter.data.SAMPLE_IMAGE),
        "dask": {"n_images": run.n_images, "n_partitions": run.n_partitions, "tree_depth": run.tree_depth,
                 "scheduler": run.scheduler, "seconds": round(run.seconds, 2)},
        "ns_final_residual": float(np.asarray(info.residuals)[-1]), "centre_surround": cs})
    for e in cs:
        print(f"channel {e['channel']}: centre {e['centre']:+.3g}, mean neighbour {e['mean_neighbour']:+.3g}, "
              f"centre-surround: {e['centre_surround']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
