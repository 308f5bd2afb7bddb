"""Fig. 5 of Ye et al. 2020 (§6) on real data: scikit-learn's bundled UCI optical digits (``load_digits``).

The paper runs these on Fashion-MNIST / MNIST; the digits (1797 8x8 images, 16 grey levels) ship inside
scikit-learn, so ``make figures`` needs no download.  1300 images train, 497 are held out (fixed split).

(a) One-layer linear regression to one-hot targets, L2 loss ``0.5 mean ||x W + b - t||^2``: full batch and
    mini-batches of 512 and 128 (each epoch reshuffled, the last partial batch dropped).  Plain SGD and
    SGD with batch norm (``BatchNorm1d`` on the 64 inputs) at their best stable learning rate (the grid
    ``LRS``: lowest final loss among the runs that do not diverge), deconvolution (``nsiter.torch.Delinear``,
    ``B = 64``, the paper's 5 iterations) at lr = 1.0.  Plotted: the relative excess loss
    ``(L - L*) / (L0 - L*)`` on the whole training set against the exact least-squares optimum ``L*``
    (``L0``: the zero model every run starts from); batch statistics of the whole training set for the
    normalised models (their running buffers untouched).
(b) The same with the logistic (softmax cross-entropy) loss; the loss itself is plotted (no finite optimum
    is needed: the goal compares levels); dashed, deconvolution at SGD's learning rate.  Learning-rate grids
    ``LRS`` per loss, the best rate being the one with the lowest mean log loss over the run (the most
    favourable to the baselines); plain SGD runs ``SGD_ITERS`` iterations with its closed-form gradient.
(c, d) A 3-hidden-layer MLP (64-128-128-128-10, sigmoid, the paper's MNIST MLP), batch 128: plain SGD,
    batch norm after each hidden ``Linear``, and every ``Linear`` a ``Delinear`` (``B = in_features``);
    learning rates from ``MLP_LRS``.  Training loss and held-out accuracy (eval mode) per iteration.
(e) A small CNN (three 3x3 ``Conv2d`` + ``BatchNorm2d`` + ReLU, max-pool, global pool, ``Linear``) against
    the same network through ``nsiter.torch.convert_to_deconv`` (same initial weights; sampling stride 1
    on these 8x8 maps), SGD lr 0.1, momentum 0.9, weight decay 1e-3, batch 128 (the paper's CIFAR
    setting): held-out accuracy after 1 and 5 epochs, mean +- std over 3 seeds (the shape of Table 1), in eval
    mode (running statistics, as Table 1) and with the held-out set's own batch statistics (an epoch is 10
    iterations here: the running averages still carry 0.9^10 = 35% of their initial values after one).

Goal numbers (``fig5_summary.json``): iterations to an excess of 1e-2 with full batches (ratio: SGD's over
deconvolution's); for mini-batches the level deconvolution holds over iterations 5-10 (their maximum) and
the iterations plain SGD needs to reach it (ratio: over 10).
Deterministic: fixed seeds, one torch thread.  Writes ``figures/fig5_*.{png,csv,json}``.
"""
from __future__ import annotations

import time

import numpy as np

from _figures import parser, plt, save_figure, write_csv, write_json

try:
    import torch
    from sklearn.datasets import load_digits
except ImportError as exc:  # torch is an optional extra: without it this figure is skipped, not failed
    print(f"fig_fig5_digits.py skipped: it needs torch and scikit-learn ({exc}); pip install 'nsiter[torch,dev]'")
    raise SystemExit(0)

import nsiter.torch as nt  # noqa: E402

nn, F = torch.nn, torch.nn.functional
LRS = {"L2": (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0), "logistic": (0.3, 1.0, 2.0, 5.0, 10.0)}
SGD_ITERS = {"L2": 2000, "logistic": 500}
MLP_LRS = (1.0, 3.0, 10.0)
BATCHES = (None, 512, 128)  # None: full batch
N_TRAIN = 1300


def data():
    d = load_digits()
    X = torch.tensor(d.data / 16.0)
    y = torch.tensor(d.target)
    perm = torch.tensor(np.random.default_rng(0).permutation(len(X)))
    return X[perm[:N_TRAIN]], y[perm[:N_TRAIN]], X[perm[N_TRAIN:]], y[perm[N_TRAIN:]]


def batches(n, bs, gen):
    """Endless index batches: reshuffled epochs, the last partial batch dropped (None: all, in order)."""
    while True:
        if bs is None:
            yield torch.arange(n)
            continue
        order = torch.randperm(n, generator=gen)
        for s in range(0, n - bs + 1, bs):
            yield order[s:s + bs]


def full_batch_eval(model, fn):
    """``fn(model)`` in training mode (batch statistics of the whole set), buffers restored."""
    saved = [b.clone() for b in model.buffers()]
    model.train()
    with torch.no_grad():
        out = fn(model)
    for b, s in zip(model.buffers(), saved):
        b.copy_(s)
    return out


# ------------------------------------------------------------------------------ (a, b) one-layer models

def l2_loss(P, T):
    return 0.5 * ((P - T) ** 2).sum(1).mean()


def linear_model(kind):
    f64 = torch.float64
    if kind == "SGD":
        m = nn.Linear(64, 10, dtype=f64)
    elif kind == "batch norm":
        m = nn.Sequential(nn.BatchNorm1d(64, dtype=f64), nn.Linear(64, 10, dtype=f64))
    else:
        m = nt.Delinear(64, 10, block=64, dtype=f64)
    for name, p in m.named_parameters():  # the zero model: every run starts from L0
        if not name.startswith("0."):
            nn.init.zeros_(p)
    return m


def sgd_linear(lr, bs, iters, X, T, loss_name):
    """Plain SGD on ``x W + b`` with the closed-form gradient (no autograd: the long runs are cheap)."""
    A = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    Wb = torch.zeros(A.shape[1], T.shape[1], dtype=X.dtype)

    def residual(A, T):  # dL/dP
        P = A @ Wb
        return (P - T) if loss_name == "L2" else (torch.softmax(P, 1) - T)

    def loss():
        P = A @ Wb
        return float(l2_loss(P, T) if loss_name == "L2" else F.cross_entropy(P, T.argmax(1)))

    gen = torch.Generator().manual_seed(1)
    hist = [loss()]
    it = batches(len(X), bs, gen)
    for _ in range(iters):
        idx = next(it)
        Wb -= lr * (A[idx].T @ residual(A[idx], T[idx])) / len(idx)
        hist.append(loss())
        if not np.isfinite(hist[-1]) or hist[-1] > 1e6:
            hist += [np.inf] * (iters + 1 - len(hist))
            break
    return np.array(hist)


def train_linear(kind, lr, bs, iters, X, T, loss_fn):
    model = linear_model(kind)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    hist = [full_batch_eval(model, lambda m: float(loss_fn(m(X), T)))]
    it = batches(len(X), bs, gen)
    for _ in range(iters):
        idx = next(it)
        opt.zero_grad()
        loss_fn(model(X[idx]), T[idx]).backward()
        opt.step()
        L = full_batch_eval(model, lambda m: float(loss_fn(m(X), T)))
        hist.append(L)
        if not np.isfinite(L) or L > 1e6:
            hist += [np.inf] * (iters + 1 - len(hist))
            break
    return np.array(hist)


def log_area(curve) -> float:
    """Mean of log10 of a loss curve: the learning rate that is best over the whole run."""
    return float(np.mean(np.log10(np.maximum(curve, 1e-300))))


def first_below(curve, level, start=0):
    hit = np.nonzero(curve[start:] <= level)[0]
    return int(hit[0]) + start if hit.size else None


def regression(X, y, loss_name, iters):
    T = F.one_hot(y, 10).double()
    if loss_name == "L2":
        loss_fn = l2_loss
        A = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
        # numpy's SVD least squares: the columns of constant-zero pixels make A rank deficient
        L_star = float(l2_loss(A @ torch.from_numpy(np.linalg.lstsq(A.numpy(), T.numpy(), rcond=None)[0]), T))
    else:
        def loss_fn(P, T):
            return F.cross_entropy(P, T.argmax(1))
        L_star = None
    curves, chosen = {}, {}
    for bs in BATCHES:
        for kind in ("SGD", "batch norm", "deconvolution"):
            if kind == "deconvolution":
                best, lr = train_linear(kind, 1.0, bs, iters, X, T, loss_fn), 1.0
            else:
                if kind == "SGD":
                    runs = {lr: sgd_linear(lr, bs, SGD_ITERS[loss_name], X, T, loss_name) for lr in LRS[loss_name]}
                else:
                    runs = {lr: train_linear(kind, lr, bs, iters, X, T, loss_fn) for lr in LRS[loss_name]}
                stable = {lr: c for lr, c in runs.items() if np.all(np.isfinite(c)) and c[-1] <= c[0]}
                lr = min(stable, key=lambda r: log_area(stable[r] - (L_star or 0.0)))
                best = stable[lr]
            curves[(bs, kind)], chosen[(bs, kind)] = best, lr
        if L_star is None:  # the logistic loss: deconvolution at SGD's rate too, for reference
            lr = chosen[(bs, "SGD")]
            curves[(bs, "deconvolution, SGD's lr")] = train_linear("deconvolution", lr, bs, iters, X, T, loss_fn)
            chosen[(bs, "deconvolution, SGD's lr")] = lr
    L0 = curves[(None, "SGD")][0]
    if L_star is not None:  # relative excess; the lr choice above used the excess too
        curves = {k: (c - L_star) / (L0 - L_star) for k, c in curves.items()}
    return curves, chosen, L_star, L0


def regression_goals(curves, relative):
    out = {}
    for bs in BATCHES:
        name = "full" if bs is None else f"batch {bs}"
        dec, sgd = curves[(bs, "deconvolution")], curves[(bs, "SGD")]
        if bs is None and relative:
            level = 1e-2
        else:  # the level deconvolution holds over iterations 5-10
            level = float(np.max(dec[5:11]))
        n_dec, n_sgd = first_below(dec, level, 1), first_below(sgd, level, 1)
        ref = n_dec if bs is None else 10  # mini-batches: against the end of the 5-10 window
        out[name] = {"level": level, "deconvolution_iterations": n_dec, "sgd_iterations": n_sgd,
                     "ratio": (n_sgd / ref) if (n_sgd and ref) else None,
                     "batch_norm_iterations": first_below(curves[(bs, "batch norm")], level, 1)}
    return out


# ------------------------------------------------------------------------------ (c, d) MLP

def mlp(kind):
    layers, width = [], 64
    for _ in range(3):
        if kind == "deconvolution":
            layers += [nt.Delinear(width, 128, block=width)]
        else:
            layers += [nn.Linear(width, 128)] + ([nn.BatchNorm1d(128)] if kind == "batch norm" else [])
        layers += [nn.Sigmoid()]
        width = 128
    layers += [nt.Delinear(128, 10, block=128) if kind == "deconvolution" else nn.Linear(128, 10)]
    return nn.Sequential(*layers)


def train_mlp(kind, lr, X, y, Xte, yte, iters, every):
    torch.manual_seed(2)
    model = mlp(kind)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    it = batches(len(X), 128, torch.Generator().manual_seed(3))
    rec = []
    for i in range(iters + 1):
        if i % every == 0:
            loss = full_batch_eval(model, lambda m: float(F.cross_entropy(m(X), y)))
            model.eval()
            with torch.no_grad():
                acc = float((model(Xte).argmax(1) == yte).float().mean())
            rec.append((i, loss, acc))
        if i == iters:
            break
        model.train()
        idx = next(it)
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    return np.array(rec)


# ------------------------------------------------------------------------------ (e) CNN

def cnn():
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*block(1, 16), *block(16, 32), nn.MaxPool2d(2), *block(32, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def train_cnn(deconv, seed, X, y, Xte, yte, epochs=5):
    torch.manual_seed(seed)
    model = cnn()
    if deconv:
        model = nt.convert_to_deconv(model, sampling_stride=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(100 + seed)
    acc = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(X), generator=gen)
        for s in range(0, len(X) - 127, 128):
            idx = order[s:s + 128]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            ev = float((model(Xte).argmax(1) == yte).float().mean())
        acc.append((ev, full_batch_eval(model, lambda m: float((m(Xte).argmax(1) == yte).float().mean()))))
    return acc


# ------------------------------------------------------------------------------ main

COLORS = {"SGD": "tab:blue", "batch norm": "tab:orange", "deconvolution": "tab:green"}


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=200,
                   help="iterations of the batch-norm and deconvolution one-layer runs (default 200)")
    p.add_argument("--mlp-iters", type=int, default=200)
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    X, y, Xte, yte = data()
    summary = {"data": f"load_digits: {len(X)} train / {len(Xte)} held-out, pixels / 16", "torch": torch.__version__}

    # (a, b)
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    rows = []
    for r, loss_name in enumerate(("L2", "logistic")):
        curves, chosen, L_star, L0 = regression(X, y, loss_name, args.iters)
        relative = loss_name == "L2"
        summary[f"{loss_name}"] = {"L_star": L_star, "L0": L0, "goals": regression_goals(curves, relative),
                                   "learning_rates": {f"{'full' if b is None else b}/{k}": v
                                                      for (b, k), v in chosen.items()}}
        for c, bs in enumerate(BATCHES):
            ax = axes[r, c]
            for kind in [k for k in (*COLORS, "deconvolution, SGD's lr") if (bs, k) in curves]:
                curve = curves[(bs, kind)]
                ax.semilogy(np.arange(len(curve)), np.maximum(curve, 1e-16), color=COLORS[kind.split(",")[0]],
                            ls="--" if "SGD's" in kind else "-", label=f"{kind} (lr {chosen[(bs, kind)]:g})")
                rows += [(loss_name, "full" if bs is None else bs, kind, chosen[(bs, kind)], i, v)
                         for i, v in enumerate(curve)]
            ax.set_xscale("symlog", linthresh=10)
            ax.set_title(f"({'ab'[r]}) {loss_name} loss, {'full batch' if bs is None else f'batch {bs}'}")
            ax.set_xlabel("iteration")
            ax.set_ylabel("(L - L*) / (L0 - L*)" if relative else "training loss")
            if relative and bs is None:
                ax.axhline(1e-2, color="grey", lw=0.6, ls=":")
            ax.legend(fontsize=8)
        print(f"({'ab'[r]}) {loss_name}: {time.perf_counter() - t0:.1f} s", flush=True)
    fig.suptitle("Fig. 5(a, b) on load_digits: one-layer regression, SGD / batch norm at their best stable lr, "
                 "deconvolution at lr 1")
    fig.tight_layout()
    save_figure(fig, args.out, "fig5_regression")
    write_csv(args.out, "fig5_regression", ["loss", "batch", "method", "lr", "iteration", "value"], rows)

    # (c, d)
    mlp_rec, mlp_lr = {}, {}
    for kind in COLORS:
        runs = {lr: train_mlp(kind, lr, X.float(), y, Xte.float(), yte, args.mlp_iters, 5) for lr in MLP_LRS}
        ok = {lr: r for lr, r in runs.items() if np.all(np.isfinite(r[:, 1]))}
        mlp_lr[kind] = min(ok, key=lambda lr: log_area(ok[lr][:, 1]))
        mlp_rec[kind] = ok[mlp_lr[kind]]
    print(f"(c, d) MLP: {time.perf_counter() - t0:.1f} s", flush=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, rec in mlp_rec.items():
        ax1.semilogy(rec[:, 0], rec[:, 1], color=COLORS[kind], label=f"{kind} (lr {mlp_lr[kind]:g})")
        ax2.plot(rec[:, 0], rec[:, 2], color=COLORS[kind], label=kind)
    ax1.set(title="(c) 3-hidden-layer MLP: training loss", xlabel="iteration", ylabel="cross-entropy")
    ax2.set(title="(d) held-out accuracy", xlabel="iteration", ylabel="accuracy", ylim=(0, 1))
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, args.out, "fig5_mlp")
    write_csv(args.out, "fig5_mlp", ["method", "lr", "iteration", "train_loss", "heldout_accuracy"],
              [(k, mlp_lr[k], int(i), loss, acc) for k, rec in mlp_rec.items() for i, loss, acc in rec])
    summary["mlp"] = {k: {"lr": mlp_lr[k], "final_train_loss": float(r[-1, 1]), "final_heldout_accuracy":
                          float(r[-1, 2]), "accuracy_at_50": float(r[r[:, 0] == 50, 2][0])} for k, r in mlp_rec.items()}

    # (e)
    X4, Xte4 = X.float().reshape(-1, 1, 8, 8), Xte.float().reshape(-1, 1, 8, 8)
    both = {name: np.array([train_cnn(name == "deconvolution", s, X4, y, Xte4, yte) for s in range(args.seeds)])
            for name in ("batch norm", "deconvolution")}  # (seeds, epochs, [eval mode, batch statistics])
    acc = {name: a[:, :, 0] for name, a in both.items()}
    print(f"(e) CNN: {time.perf_counter() - t0:.1f} s", flush=True)
    table = [(name, ep + 1, float(a[:, ep, 0].mean()), float(a[:, ep, 0].std()), float(a[:, ep, 1].mean()),
              float(a[:, ep, 1].std())) for name, a in both.items() for ep in range(a.shape[1])]
    write_csv(args.out, "fig5_cnn", ["method", "epoch", "heldout_accuracy_mean", "heldout_accuracy_std",
                                     "batch_statistics_accuracy_mean", "batch_statistics_accuracy_std"], table)
    summary["cnn"] = {name: {f"epoch_{e}": {"mean": float(a[:, e - 1, 0].mean()), "std": float(a[:, e - 1, 0].std()),
                                            "seeds": a[:, e - 1, 0].tolist(),
                                            "batch_statistics_mean": float(a[:, e - 1, 1].mean())} for e in (1, 5)}
                      for name, a in both.items()}
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, a in acc.items():
        ep = np.arange(1, a.shape[1] + 1)
        ax.errorbar(ep, a.mean(0), yerr=a.std(0), capsize=3, marker="o",
                    color=COLORS["batch norm" if name == "batch norm" else "deconvolution"],
                    label=f"{'Conv2d + BatchNorm2d' if name == 'batch norm' else 'Deconv2d'}")
    ax.set(title=f"(e) small CNN, mean +- std over {args.seeds} seeds", xlabel="epoch", ylabel="held-out accuracy")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, args.out, "fig5_cnn")
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(args.out, "fig5_summary", summary)
    for k in ("L2", "logistic"):
        print(k, summary[k]["goals"])
    print("cnn", {n: {e: f"{v['mean']:.3f} +- {v['std']:.3f}" for e, v in d.items()} for n, d in summary["cnn"].items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
