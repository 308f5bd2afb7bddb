"""Fig. 7 of Ye et al. 2020 (appendix A.3): coupled vs uncoupled Newton–Schulz stability.

The 27x27 covariance of 3x3 RGB patches of the image; ``||D_k D_k Cov - I||_F`` per
iteration for the coupled iteration (Higham 2008, Eq. 6.35) and the uncoupled
("vanilla") one (Eq. 7.12), in float64 and float32, Frobenius scaling as in the
reference code.  The paper: the uncoupled iteration blows up after ~20 iterations
while the coupled one is "stable even if iterated for thousands of times".

Blow-up iteration: the first iteration after the best one whose residual exceeds
100x the best residual (or is not finite).
"""
from __future__ import annotations

import sys
import warnings

import numpy as np

from _figures import load_image, parser, plt, save_figure, write_csv, write_json

import nsiter


def blow_up_iteration(res: np.ndarray):
    """1-based index of the blow-up, or None when the history never blows up."""
    finite = np.where(np.isfinite(res), res, np.inf)
    best = int(np.argmin(finite))
    bad = np.nonzero(~(finite[best:] <= 100 * finite[best]))[0]
    return None if bad.size == 0 else best + int(bad[0]) + 1


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--n-coupled", type=int, default=2000, help="coupled iterations (default 2000)")
    p.add_argument("--n-uncoupled", type=int, default=200, help="uncoupled iterations (default 200)")
    args = p.parse_args(argv)
    x = load_image(args.image)
    cov, _ = nsiter.patch_covariance(x, 3)
    lam = np.linalg.eigvalsh(cov)
    kappa = lam[-1] / lam[0]
    D_exact = nsiter.inv_sqrtm(cov, method="eigh")
    floor64 = float(np.linalg.norm(D_exact @ D_exact @ cov - np.eye(27)))

    curves, summary = {}, {"image": args.image or "grace_hopper.jpg", "condition_number": kappa,
                           "eigh_residual_float64": floor64}
    for dtype in (np.float64, np.float32):
        C = cov.astype(dtype)
        name = np.dtype(dtype).name
        with warnings.catch_warnings():
            # in float32 the covariance is numerically singular (lambda_min < n*u*lambda_max); the figure
            # shows the unregularised iteration on purpose, as the paper does
            warnings.simplefilter("ignore", nsiter.IllConditionedWarning)
            _, ic = nsiter.inv_sqrtm(C, method="coupled", n_iter=args.n_coupled, return_info=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", nsiter.IllConditionedWarning)
            warnings.simplefilter("ignore", nsiter.NewtonSchulzDivergenceWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            _, iu = nsiter.inv_sqrtm(C, method="uncoupled", n_iter=args.n_uncoupled, return_info=True)
        rc = np.asarray(ic.residuals, dtype=np.float64)
        ru = np.asarray(iu.residuals, dtype=np.float64)
        curves[name] = (rc, ru)
        fin_u = np.where(np.isfinite(ru), ru, np.inf)
        summary[name] = {
            "coupled_min_residual": float(np.min(rc)), "coupled_iter_of_min": int(np.argmin(rc)) + 1,
            "coupled_final_residual": float(rc[-1]), "coupled_max_after_100": float(np.max(rc[100:])),
            "uncoupled_min_residual": float(np.min(fin_u)), "uncoupled_iter_of_min": int(np.argmin(fin_u)) + 1,
            "uncoupled_blow_up_iteration": blow_up_iteration(ru),
            "uncoupled_final_residual": float(ru[-1]) if np.isfinite(ru[-1]) else str(ru[-1]),
        }
        s = summary[name]
        print(f"{name}: coupled min {s['coupled_min_residual']:.3g} at {s['coupled_iter_of_min']}, "
              f"final {s['coupled_final_residual']:.3g} after {len(rc)}; uncoupled min "
              f"{s['uncoupled_min_residual']:.3g} at {s['uncoupled_iter_of_min']}, blows up at "
              f"{s['uncoupled_blow_up_iteration']}")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, name in zip(axes, ("float64", "float32")):
        rc, ru = curves[name]
        ax.semilogy(np.arange(1, len(rc) + 1), rc, label="coupled (Eq. 6.35)", color="C0")
        ru_plot = np.where(np.isfinite(ru), ru, np.nan)
        ax.semilogy(np.arange(1, len(ru) + 1), np.clip(ru_plot, None, 1e30), label="uncoupled (Eq. 7.12)",
                    color="C3")
        b = summary[name]["uncoupled_blow_up_iteration"]
        if b is not None:
            ax.axvline(b, color="C3", ls=":", lw=1)
            ax.annotate(f"uncoupled blows up\nat iteration {b}", (b, summary[name]["uncoupled_min_residual"]),
                        xytext=(8, 30), textcoords="offset points", color="C3", fontsize=9)
        u = np.finfo(name).eps / 2
        ax.axhline(kappa * u, color="gray", ls="--", lw=1, label=f"κ·u = {kappa * u:.2g}")
        ax.set_xscale("log")
        ax.set_xlabel("iteration k")
        ax.set_title(f"{name}: 27x27 covariance, κ = {kappa:.3g}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper right", fontsize=9)
    axes[0].set_ylabel(r"$\|D_k D_k\,\mathrm{Cov} - I\|_F$")
    save_figure(fig, args.out, "fig7_stability")

    n = max(len(curves["float64"][0]), len(curves["float64"][1]))
    rows = []
    for k in range(n):
        row = [k + 1]
        for name in ("float64", "float32"):
            for r in curves[name]:
                row.append(float(r[k]) if k < len(r) else "")
        rows.append(row)
    write_csv(args.out, "fig7_stability", ["iteration", "coupled_float64", "uncoupled_float64",
                                           "coupled_float32", "uncoupled_float32"], rows)
    write_json(args.out, "fig7_stability", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
