"""Proposition 1 of Ye et al. 2020 (§3.1, §4.4.1, appendix A.8): kernel estimation per iteration.

The classic kernel-estimation problem on the bundled photograph: ``x`` is the RGB image
(channels first), ``k`` a fixed random 3x5x5 kernel, ``y = x ⋆ k`` (valid correlation,
noise-free unless ``--noise``).  Every solver of :func:`nsiter.estimate_kernel` minimises the
same objective, ``||X w + b - y||^2 / (2M)`` with an intercept (the paper's augmented
``(X | 1)``; network deconvolution centres its features), in float64:

- ``gd`` (Eq. 2, lr = 1/lambda_max), ``gd_standardized`` (batch-norm analogue), 1000 steps;
- ``gd_whitened`` (network deconvolution, lr = 1): Proposition 1 says ONE step is exact;
- ``preconditioned`` (Cov^-1-preconditioned GD, appendix A.8): the same iterates;
- ``cg`` (matrix-free CGLS) until ``||grad|| <= 1e-12 ||grad_0||``; ``lstsq`` gives the optimum.

Plotted: the relative excess loss ``(L_k - L*) / (L_0 - L*)`` per iteration (log-log), computed
the same way for every method from its iterates (``callback``) as
``(theta_k - theta*)^T A (theta_k - theta*) / 2`` with ``A`` the augmented normal matrix (from
``nsiter.patch_covariance``) and ``theta*`` the ``lstsq`` optimum (accurate to ~1e-15, so values
below ~1e-28 are not resolved; zeros are drawn at 1e-30).  Right panel: mini-batch SGD (patches
drawn uniformly, full-data objective plotted), whitened SGD with the (batch size, lr) pairs of
the paper's Table 4, against plain and standardized SGD.
Outputs: figures/prop1_convergence.png, prop1_convergence.csv, prop1_summary.json/.md.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from _figures import load_image, parser, plt, save_figure, write_csv, write_json

import nsiter

FLOOR = 1e-30
FULL = [  # (label, method, n_iter, extra kwargs)
    ("GD (Eq. 2), lr = 1/λmax", "gd", 1000, {}),
    ("standardized GD (batch norm), lr = 1/λmax", "gd_standardized", 1000, {}),
    ("Cov⁻¹-preconditioned GD (A.8), lr = 1", "preconditioned", 5, {}),
    ("whitened GD (deconvolution), lr = 1", "gd_whitened", 5, {}),
    ("conjugate gradients (CGLS)", "cg", 2000, {"tol": 1e-12}),
]
MINI = [  # (label, method, batch, lr)
    ("whitened SGD, B = 128, lr = 0.1", "gd_whitened", 128, 0.1),
    ("whitened SGD, B = 512, lr = 0.5", "gd_whitened", 512, 0.5),
    ("whitened SGD, B = 2048, lr = 1", "gd_whitened", 2048, 1.0),
    ("GD SGD, B = 2048, lr = 1/λmax", "gd", 2048, None),
    ("standardized SGD, B = 2048, lr = 1/λmax", "gd_standardized", 2048, None),
]
MINI_ITERS = 60


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--kernel", type=int, default=5, help="kernel side (default 5)")
    p.add_argument("--noise", type=float, default=0.0,
                   help="Gaussian noise added to y, relative to std(y) (default 0: noise-free)")
    p.add_argument("--gray", action="store_true", help="use the luma image (one channel) instead of RGB")
    args = p.parse_args(argv)
    out = Path(args.out)
    x = load_image(args.image, gray=args.gray)
    rng = np.random.default_rng(0)
    kshape = (args.kernel, args.kernel) if x.ndim == 2 else (x.shape[0], args.kernel, args.kernel)
    k = rng.standard_normal(kshape)
    oh, ow = nsiter.output_shape(x.shape, args.kernel)
    y = (nsiter.im2col(x, args.kernel) @ k.ravel()).reshape(oh, ow)
    if args.noise > 0:
        y = y + args.noise * y.std() * rng.standard_normal(y.shape)
    print(f"image {x.shape}, kernel {kshape}, {oh * ow} patches", flush=True)

    opt = nsiter.estimate_kernel(x, y, args.kernel, fit_intercept=True)
    l_star, l0 = opt.loss, opt.history[0]
    cov, mu = nsiter.patch_covariance(x, args.kernel)
    f = mu.size
    A = np.empty((f + 1, f + 1))  # Hessian of L(w, b): [[X^T X / M, mu], [mu^T, 1]]
    A[:f, :f] = cov + np.outer(mu, mu)
    A[:f, f] = A[f, :f] = mu
    A[f, f] = 1.0
    theta_star = np.append(opt.kernel.ravel(), opt.intercept)

    def excess(path):
        """Relative excess loss of the iterates ``path`` (rows theta_k); ``theta_0 = 0`` first."""
        e = np.vstack([np.zeros(f + 1), np.asarray(path)]) - theta_star
        return 0.5 * np.einsum("ki,ij,kj->k", e, A, e) / (l0 - l_star)

    summary = {
        "image": args.image or "grace_hopper.jpg", "x_shape": list(x.shape), "kernel_shape": list(kshape),
        "noise_rel": args.noise, "problem": "min ||X w + b - y||^2 / (2M), float64, fit_intercept=True",
        "condition_XtX_augmented": opt.condition,
        "lstsq": {"kernel_rel_err_vs_true": float(np.linalg.norm(opt.kernel - k) / np.linalg.norm(k)),
                  "optimum_loss": l_star, "initial_loss": l0},
        "methods": {}, "minibatch": {},
    }
    rows, curves = [], {}
    for label, method, n_iter, kw in FULL:
        path = []
        t0 = time.perf_counter()
        est = nsiter.estimate_kernel(x, y, args.kernel, method=method, n_iter=n_iter, fit_intercept=True,
                                     callback=lambda w, b: path.append(np.append(w.ravel(), b)), **kw)
        dt = time.perf_counter() - t0
        r = excess(path)
        kerr = [1.0] + [float(np.linalg.norm(q[:f] - theta_star[:f]) / np.linalg.norm(theta_star[:f]))
                        for q in path]
        curves[label] = r
        rows += [[method, "full", "", i, est.history[i], r[i], kerr[i]] for i in range(len(r))]
        pick = {str(i): float(r[i]) for i in (1, 2, 10, 100, 1000) if i < len(r)}
        summary["methods"][method] = {
            "label": label, "lr": est.lr, "n_iter": est.n_iter, "seconds": dt, "rel_excess_loss_at": pick,
            "final_rel_excess_loss": float(r[-1]), "final_kernel_rel_err_vs_optimum": kerr[-1],
            "final_kernel_rel_err_vs_true": float(np.linalg.norm(est.kernel - k) / np.linalg.norm(k)),
            "converged": est.converged, "grad_norm": est.grad_norm,
        }
        print(f"{label}: {est.n_iter} iterations in {dt:.1f} s, final relative excess loss {r[-1]:.2e}",
              flush=True)

    mini = {}
    for label, method, batch, lr in MINI:
        path = []
        est = nsiter.estimate_kernel(x, y, args.kernel, method=method, n_iter=MINI_ITERS, lr=lr, batch_size=batch,
                                     rng=1, fit_intercept=True, callback=lambda w, b: path.append(np.append(w.ravel(), b)))
        r = excess(path)
        mini[label] = r
        rows += [[method, "minibatch", batch, i, est.history[i], r[i], ""] for i in range(len(r))]
        summary["minibatch"][label] = {
            "method": method, "batch_size": batch, "lr": est.lr,
            "rel_excess_loss_at": {str(i): float(r[i]) for i in (1, 5, 10, 20, MINI_ITERS)},
            "iterations_to_1e-3": int(np.argmax(r <= 1e-3)) if np.any(r <= 1e-3) else None,
        }
        print(f"{label}: relative excess loss after 5 steps {r[5]:.2e}", flush=True)

    write_csv(out, "prop1_convergence",
              ["method", "batch", "batch_size", "iteration", "loss", "rel_excess_loss", "kernel_rel_err_vs_optimum"],
              rows)
    write_json(out, "prop1_summary", summary)
    md = ["| method | lr | after 1 | after 10 | after 100 | after 1000 | iterations run |", "|---|---|---|---|---|---|---|"]
    for method, s in summary["methods"].items():
        a = s["rel_excess_loss_at"]
        md.append(f"| {method} | {s['lr'] if s['lr'] is None else format(s['lr'], '.3g')} | "
                  + " | ".join(format(a[i], ".2e") if i in a else "–" for i in ("1", "10", "100", "1000"))
                  + f" | {s['n_iter']} |")
    (out / "prop1_summary.md").write_text(
        "Relative excess loss (L_k - L*) / (L_0 - L*) of kernel estimation on "
        f"{summary['image']} {tuple(x.shape)}, kernel {tuple(kshape)}, cond = {opt.condition:.3g}, float64.\n\n"
        + "\n".join(md) + "\n")
    print(f"wrote {out / 'prop1_summary.md'}")

    # ---- plot
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 6.2))
    styles = {"gd": "-", "gd_standardized": "-", "preconditioned": "--", "gd_whitened": "o", "cg": "-"}
    for (label, method, _, _), color in zip(FULL, ["C0", "C1", "C3", "C2", "C4"]):
        r = np.maximum(curves[label], FLOOR)
        it = np.arange(len(r))
        if method == "gd_whitened":
            ax1.plot(it[1:], r[1:], "o", ms=9, mfc="none", mew=2, color=color, label=label)
        elif method == "preconditioned":
            ax1.plot(it[1:], r[1:], "x", ms=8, mew=2, color=color, label=label)
        else:
            ax1.plot(it[1:], r[1:], styles[method], lw=1.8, color=color, label=label)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_ylim(FLOOR / 10, 10)
    ax1.set_xlabel("iteration k (full batch)")
    ax1.set_ylabel("relative excess loss (L_k − L*) / (L_0 − L*)")
    ax1.set_title(f"Full batch: one whitened step is exact (cond = {opt.condition:.2g})")
    one = max(curves[FULL[3][0]][1], FLOOR)
    ax1.annotate(f"one whitened step: {curves[FULL[3][0]][1]:.1e}", xy=(1, one), xytext=(2.2, 1e-18),
                 fontsize=9, color="C2", arrowprops=dict(arrowstyle="->", color="C2"))
    for ax in (ax1, ax2):
        ax.axhspan(FLOOR / 10, 1e-28, color="0.9", zorder=0)
        ax.text(0.99, 3e-30, "not resolved (θ* accurate to ~1e-15)", transform=ax.get_yaxis_transform(),
                ha="right", fontsize=8, color="0.4")
    ax1.grid(True, which="major", alpha=0.3)
    ax1.legend(fontsize=8.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)

    for (label, method, _, _), color in zip(MINI, ["C8", "C9", "C2", "C0", "C1"]):
        r = np.maximum(mini[label], FLOOR)
        ls = "-" if method == "gd_whitened" else "--"
        ax2.plot(np.arange(len(r)), r, ls, marker=".", ms=4, lw=1.5, color=color, label=label)
    ax2.set_yscale("log")
    ax2.set_ylim(FLOOR / 10, 10)
    ax2.set_xlabel("iteration (one mini-batch of patches each)")
    ax2.set_ylabel("relative excess loss (L_k − L*) / (L_0 − L*), full data")
    ax2.set_title("Mini-batch SGD (Table 4 batch sizes / learning rates)")
    ax2.grid(True, which="major", alpha=0.3)
    ax2.legend(fontsize=8.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    name = "RGB" if x.ndim == 3 else "gray"
    fig.suptitle(f"L2 kernel estimation on {summary['image']} ({name} {'x'.join(map(str, x.shape))}), "
                 f"kernel {'x'.join(map(str, kshape))}, float64", fontsize=11)
    fig.tight_layout()
    save_figure(fig, out, "prop1_convergence")
    return 0


if __name__ == "__main__":
    sys.exit(main())
