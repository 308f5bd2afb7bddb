"""Fig. 3 (top right) of Ye et al. 2020: the 27x27 covariance of 3x3 RGB patches.

Columns are ordered (channel, row, column) as in im2col, so the 9x9 diagonal blocks
hold the pixel-wise correlation inside one channel and the off-diagonal blocks the
channel-wise correlation.  The paper observes that natural images correlate more
pixel-wise than across channels ("the diagonal blocks are brighter"); the script
prints the mean |correlation| in both kinds of block to check that claim.
"""
from __future__ import annotations

import sys

import numpy as np

from _figures import load_image, parser, plt, save_figure, write_csv, write_json

import nsiter


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    x = load_image(args.image)
    cov, mean = nsiter.patch_covariance(x, 3)
    sd = np.sqrt(np.diag(cov))
    corr = cov / np.outer(sd, sd)
    c = x.shape[0]
    blocks = np.kron(np.eye(c, dtype=bool), np.ones((9, 9), dtype=bool))
    off_pix = blocks & ~np.eye(cov.shape[0], dtype=bool)
    within = float(np.abs(corr[off_pix]).mean())
    across = float(np.abs(corr[~blocks]).mean()) if c > 1 else float("nan")
    lam = np.linalg.eigvalsh(cov)

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    names = "RGB" if c == 3 else [str(i) for i in range(c)]
    for ax, m, title in [(axes[0], cov, "covariance (1/N)"), (axes[1], corr, "correlation")]:
        im = ax.imshow(m, cmap="viridis")
        for b in range(1, c):
            ax.axhline(9 * b - 0.5, color="w", lw=0.8)
            ax.axvline(9 * b - 0.5, color="w", lw=0.8)
        ax.set_title(title)
        ticks = [9 * b + 4 for b in range(c)]
        ax.set_xticks(ticks, [f"{names[b]} (3x3)" for b in range(c)])
        ax.set_yticks(ticks, [f"{names[b]}" for b in range(c)])
        ax.set_xlabel("feature: channel block, then row i, column j")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    fig.suptitle(f"3x3x{c} patch covariance ({cov.shape[0]}x{cov.shape[0]}), cond = {lam[-1] / lam[0]:.3g}\n"
                 f"mean |correlation|: within a channel (diagonal blocks) {within:.3f}, "
                 f"across channels (off-diagonal blocks) {across:.3f}")
    fig.tight_layout()
    save_figure(fig, args.out, "fig3_covariance")
    write_csv(args.out, "fig3_covariance", [f"f{j}" for j in range(cov.shape[0])], cov.tolist())
    write_json(args.out, "fig3_covariance", {
        "image": args.image or "grace_hopper.jpg", "shape": list(x.shape), "condition_number": lam[-1] / lam[0],
        "eigenvalues": lam, "mean_abs_corr_within_channel_blocks": within,
        "mean_abs_corr_across_channel_blocks": across, "mean": mean,
    })
    print(f"cond = {lam[-1] / lam[0]:.4g}; mean |corr| within-channel {within:.3f}, across-channel {across:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
