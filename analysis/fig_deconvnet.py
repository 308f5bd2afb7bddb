"""Deconvolutional Networks (Zeiler et al. 2010): learned layer-1 filters and the Fig. 6 analogue.

Data: the bundled photograph (or ``--image``) in gray, high-pass filtered (minus a Gaussian blur,
sigma 2) and scaled to unit standard deviation (the paper learns on high-pass, contrast-normalised
images).  Training: the whole photograph at 1/4 size (4x4 block means, 150 x 128); test: a 96x96
crop of it at 1/2 size (2x2 block means, the face), pixels the training never saw.

1. Filters: 9 filters 7x7 (the paper's layer 1 has 9 maps) learned by Algorithm 1
   (``nsiter.deconvnet.learn_filters``: lambda = 1, p = 1, beta0 = 1, beta_inc = 6, beta_max = 1e5,
   ``--epochs`` epochs, the projected filter step), once with the paper's CG inference and once
   with ADMM inference, with the cost (Eq. 3) after every inference and filter step.
2. Fig. 6 analogue: on the test crop, for 7 lambdas from 10^-0.5 to 10^1.5, the maps inferred with the CG-learned
   filters: average sparsity of a feature map (fraction of non-zero coefficients in the exactly
   sparse variable) against the RMS reconstruction error ``sqrt(mean((sum_k z_k (+) f_k - y)^2))``,
   for ADMM (the exact p = 1 minimiser of Eq. 3), the paper's CG continuation at p = 1, and the CG
   continuation at p = 0.8 (the lookup-table x-step; the paper's Caltech-101 setting).
   The paper's layer-2 and patch-based (Mairal et al.) curves are not reproduced.
Outputs: figures/deconvnet_filters.png, deconvnet_fig6.png, deconvnet_fig6.csv, deconvnet.json.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from _figures import load_image, parser, plt, save_figure, write_csv, write_json

from nsiter import deconvnet as dn

TEST = (100, 80)  # top-left corner of the 96x96 test crop on the 1/2-size image (the face)
TEST_SIZE = 96
LAMBDAS = np.logspace(-0.5, 1.5, 7)


def preprocess(gray: np.ndarray, factor: int) -> np.ndarray:
    """``factor x factor`` block means, minus a Gaussian blur (sigma 2), unit standard deviation."""
    h, w = gray.shape[0] // factor, gray.shape[1] // factor
    small = gray[:factor * h, :factor * w].reshape(h, factor, w, factor).mean(axis=(1, 3))
    hp = small - gaussian_filter(small, 2.0, mode="reflect")
    return hp / hp.std()


def crops(img: np.ndarray, corners, size: int) -> np.ndarray:
    h, w = img.shape
    out = []
    for r, c in corners:
        r, c = min(r, h - size), min(c, w - size)
        out.append(img[r:r + size, c:c + size])
    return np.stack(out)


def tile(filters: np.ndarray, ncol: int = 3) -> np.ndarray:
    k, kh, kw = filters.shape
    nrow = -(-k // ncol)
    canvas = np.full((nrow * (kh + 1) + 1, ncol * (kw + 1) + 1), np.nan)
    for i, f in enumerate(filters):
        r, c = divmod(i, ncol)
        m = np.abs(f).max() or 1.0
        canvas[1 + r * (kh + 1):1 + r * (kh + 1) + kh, 1 + c * (kw + 1):1 + c * (kw + 1) + kw] = f / m
    return canvas


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--epochs", type=int, default=12, help="epochs of Algorithm 1 (default 12)")
    args = p.parse_args(argv)
    out = Path(args.out)
    t_start = time.perf_counter()
    gray = load_image(args.image, gray=True)
    train = preprocess(gray, 4)
    test = crops(preprocess(gray, 2), [TEST], TEST_SIZE)[0]

    learned = {}
    for method in ("cg", "admm"):
        t0 = time.perf_counter()
        learned[method] = dn.learn_filters(train, 9, 7, n_epochs=args.epochs, method=method, seed=0)
        print(f"learned 9 filters 7x7 with {method} inference in {time.perf_counter() - t0:.1f} s; "
              f"cost {learned[method].history.round(1).tolist()}", flush=True)
    filters = learned["cg"].filters

    rows, curves = [], {}
    variants = [("ADMM, p = 1 (exact)", "admm", 1.0), ("CG continuation, p = 1 (paper)", "cg", 1.0),
                ("CG continuation, p = 0.8 (lookup table)", "cg", 0.8)]
    for label, method, pp in variants:
        pts = []
        for lam in LAMBDAS:
            res = dn.infer_feature_maps(test, filters, lam=float(lam), p=pp, method=method)
            sparse = res.z if method == "admm" else res.auxiliary
            rms = float(np.sqrt(np.mean((dn.reconstruct(sparse, filters)[0] - test) ** 2)))
            nnz = float(np.mean(sparse != 0))
            pts.append((nnz, rms))
            rows.append([label, method, pp, float(lam), nnz, rms, res.objective, res.n_iter])
        curves[label] = np.array(pts)
        print(f"Fig. 6 curve: {label}: {len(LAMBDAS)} lambdas", flush=True)
    write_csv(out, "deconvnet_fig6", ["curve", "method", "p", "lambda", "nonzero_fraction", "rms_error",
                                      "objective_eq3", "iterations"], rows)

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), gridspec_kw={"width_ratios": [1, 1, 1.4]}, layout="constrained")
    for ax, method, title in ((axes[0], "cg", "Algorithm 1, CG inference (paper)"),
                              (axes[1], "admm", "Algorithm 1, ADMM inference")):
        ax.imshow(tile(learned[method].filters[:, 0]), cmap="gray", vmin=-1, vmax=1)
        ax.set_title(f"{title}\n9 filters 7x7, {args.epochs} epochs", fontsize=9)
        ax.axis("off")
    ax = axes[2]
    for method, style in (("cg", "o-"), ("admm", "s--")):
        lf = learned[method]
        ax.plot(range(len(lf.history)), lf.history, style, label=f"{method} inference", ms=4)
    ax.set_xticks(range(len(learned["cg"].steps)))
    ax.set_xticklabels(learned["cg"].steps, rotation=60, fontsize=7)
    ax.set_ylabel(f"Eq. 3 on the {train.shape[0]}x{train.shape[1]} training image")
    ax.set_yscale("log")
    ax.set_title("Algorithm 1: cost after every inference and filter step", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, out, "deconvnet_filters")

    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    for (label, pts), style in zip(curves.items(), ("s-", "o-", "^-")):
        ax.plot(pts[:, 0], pts[:, 1], style, label=label, ms=4)
        for (x, y), lam in zip(pts, LAMBDAS):
            if label.startswith("ADMM"):
                ax.annotate(f"λ={lam:.2g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("average feature-map sparsity (fraction of non-zero coefficients)")
    ax.set_ylabel("RMS reconstruction error")
    ax.set_title(f"Fig. 6 analogue: layer 1, 9 filters 7x7, {TEST_SIZE}x{TEST_SIZE} test crop", fontsize=9)
    ax.legend(fontsize=7, loc="center right")
    save_figure(fig, out, "deconvnet_fig6")

    write_json(out, "deconvnet", {
        "description": "Zeiler et al. 2010: layer-1 filters by Algorithm 1 and the Fig. 6 analogue",
        "preprocessing": "gray, block means (train 4x4, test 2x2), minus Gaussian blur sigma 2, unit std",
        "train_shape": train.shape, "test_crop_half_size": TEST, "lambdas": LAMBDAS, "epochs": args.epochs,
        "learning": {m: {"filters": lf.filters[:, 0], "history": lf.history, "steps": list(lf.steps)}
                     for m, lf in learned.items()},
        "fig6": {label: {"nonzero_fraction": pts[:, 0], "rms_error": pts[:, 1]} for label, pts in curves.items()},
    })
    print(f"fig_deconvnet: {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
