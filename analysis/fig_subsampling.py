"""§4.5.2 of Ye et al. 2020: subsampling the patch grid (S = 1..5) for the covariance.

The paper: S = 3–5 subsampling speeds the covariance up by 10–20x while keeping
training quality.  For each S the script times im2col + covariance (nsiter.im2col then
nsiter.covariance, the paper's pipeline) and the fused ``patch_covariance``, and
measures accuracy against the full (S = 1) covariance: the relative Frobenius error
of Cov_S, and how well D_S = (Cov_S + eps I)^(-1/2) whitens the full covariance,
``||D_S Cov_1 D_S - I||_F / sqrt(n)``.  Inputs: the RGB image (k = 3, F = 27) and a
batch of 64-channel feature maps (k = 3, F = 576, smooth random fields, seeded).
"""
from __future__ import annotations

import sys

import numpy as np

from _bench import median_time
from _figures import load_image, parser, plt, save_figure, write_csv, write_json

import nsiter


def feature_maps(rng):
    """Smooth, channel-correlated random fields standing in for hidden-layer inputs."""
    z = rng.standard_normal((8, 16, 66, 66))
    z = (z[..., :-2, :-2] + z[..., 1:-1, :-2] + z[..., :-2, 1:-1] + z[..., 1:-1, 1:-1] + z[..., 2:, 2:]) / 5
    mix = rng.standard_normal((64, 16)) / 4
    return np.maximum(np.einsum("oc,nchw->nohw", mix, z), 0).astype(np.float32)


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--eps", type=float, default=0.0,
                   help="ridge added to Cov_S before the inverse square root (default 0: pure sampling error)")
    args = p.parse_args(argv)
    rng = np.random.default_rng(4)
    inputs = {"RGB image (3x600x512, k=3)": load_image(args.image).astype(np.float32),
              "feature maps (8x64x64x64, k=3)": feature_maps(rng)}
    rows = []
    for name, x in inputs.items():
        cov1, _ = nsiter.patch_covariance(x, 3, padding=1)
        n = cov1.shape[0]
        t1 = None
        for s in range(1, 6):
            def pipeline():
                return nsiter.covariance(nsiter.im2col(x, 3, stride=s, padding=1))
            t_pipe = median_time(pipeline, repeat=5)
            t_fused = median_time(lambda: nsiter.patch_covariance(x, 3, padding=1, sampling_stride=s), repeat=5)
            cov_s, _ = nsiter.patch_covariance(x, 3, padding=1, sampling_stride=s)
            d_s = nsiter.inv_sqrtm(cov_s.astype(np.float64), method="eigh", eps=args.eps)
            cov1_64 = cov1.astype(np.float64)
            err = float(np.linalg.norm(cov_s - cov1_64) / np.linalg.norm(cov1_64))
            white = float(np.linalg.norm(d_s @ cov1_64 @ d_s - np.eye(n)) / np.sqrt(n))
            t1 = t_pipe if s == 1 else t1
            rows.append({"input": name, "S": s, "im2col_cov_ms": 1e3 * t_pipe, "patch_covariance_ms": 1e3 * t_fused,
                         "speedup_vs_S1": t1 / t_pipe, "cov_rel_error": err, "whitening_residual": white})
            print(f"{name} S={s}: im2col+cov {1e3 * t_pipe:.2f} ms (x{t1 / t_pipe:.1f}), fused "
                  f"{1e3 * t_fused:.2f} ms, cov error {err:.2e}, whitening residual {white:.3f}", flush=True)
    cols = list(rows[0])
    write_csv(args.out, "subsampling", cols, [[r[c] for c in cols] for r in rows])
    write_json(args.out, "subsampling", {"eps": args.eps, "rows": rows})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in inputs:
        rs = [r for r in rows if r["input"] == name]
        S = [r["S"] for r in rs]
        axes[0].plot(S, [r["speedup_vs_S1"] for r in rs], "o-", label=name)
        axes[0].plot(S, [s * s for s in S], "k:", lw=0.8)
        axes[1].semilogy(S[1:], [r["cov_rel_error"] for r in rs[1:]], "o-", label=name)  # S = 1 is exact
        axes[2].plot(S, [r["whitening_residual"] for r in rs], "o-", label=name)
    axes[0].set_title("speed-up of im2col + covariance vs S = 1\n(dotted: S², fewer patches)")
    axes[1].set_title(r"$\|Cov_S - Cov_1\|_F / \|Cov_1\|_F$ (S = 1 is exact)")
    axes[2].set_title(r"$\|D_S\,Cov_1\,D_S - I\|_F/\sqrt{n}$, $D_S = (Cov_S + \epsilon I)^{-1/2}$")
    for ax in axes:
        ax.set_xlabel("sampling stride S")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, args.out, "subsampling")
    return 0


if __name__ == "__main__":
    sys.exit(main())
