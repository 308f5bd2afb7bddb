"""`make bench`: one training step of ``nsiter.torch.Deconv2d`` against the paper's algorithm and batch norm.

Case (the issue's): CPU torch, float32, batch 128, 64 -> 64 channels, 32 x 32, k = 3, padding 1, B = 64,
S = 3, 5 coupled Newton–Schulz iterations.  Timed, forward + backward of one training step
(``y.backward(gy)`` with a fixed ``gy``, gradients reset to ``None`` first):

- ``Deconv2d`` (nsiter);
- ``Algorithm1``: the reference FastDeconv algorithm re-implemented here from the paper's Algorithm 1
  and §4.5 (``F.unfold`` with stride S, columns grouped into blocks, mean, ``addmm`` covariance,
  5 coupled iterations of three products each, weights folded, one ``conv2d``) — the reference code
  is not vendored;
- ``Conv2d + BatchNorm2d`` (NCHW, as a model would call them), and the bare ``Conv2d`` step (the floor
  both deconvolution steps share).

Eval: ``Deconv2d.eval()`` (running statistics folded into the weights, one ``conv2d``) against a plain
``nn.Conv2d`` forward, ``torch.no_grad``.

Rounds interleave the candidates (ABAB..., the order reversed every round) and every goal is the median
of per-round ratios, so load from other processes hits both sides of a ratio alike.  The machine's
memcpy bandwidth and SGEMM rate are measured in the same run.  Writes ``analysis/results/layers.{md,json,csv}``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench import gemm_gflops, machine_info, memcpy_gbps, progress, write_results  # noqa: E402

try:
    import torch
except ImportError:  # torch is an optional extra: without it this benchmark is skipped, not failed
    print("bench_layers.py skipped: it needs torch (pip install 'nsiter[torch]')")
    raise SystemExit(0)
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import nsiter.torch as nt  # noqa: E402


class Algorithm1(nn.Module):
    """The reference FastDeconv training step, from the paper's Algorithm 1 (groups = 1).

    im2col on the S-subsampled grid (``F.unfold``), the columns divided into ``C / B`` interleaved
    blocks stacked as rows, ``Cov = (X - mu)^T (X - mu) / n + eps I`` (``addmm``), ``D`` from
    ``n_iter`` coupled Newton–Schulz steps with Frobenius scaling (``T = (3I - ZY)/2, Y = YT, Z = TZ``),
    ``W' = D w``, ``b' = b - mu^T D w`` and ``conv2d(x, W', b')``.  Running averages as the paper keeps them.
    """

    def __init__(self, cin, cout, k, padding, block, S, n_iter=5, eps=1e-5, momentum=0.1):
        super().__init__()
        self.k, self.padding, self.S, self.n_iter, self.eps, self.momentum = k, padding, S, n_iter, eps, momentum
        self.block, self.nf = block, k * k * block
        self.weight = nn.Parameter(torch.empty(cout, cin, k, k))
        self.bias = nn.Parameter(torch.empty(cout))
        self.register_buffer("running_mean", torch.zeros(self.nf))
        self.register_buffer("running_deconv", torch.eye(self.nf))

    def isqrt(self, A):
        norm = A.norm()
        Y = A / norm
        eye = torch.eye(A.shape[0], dtype=A.dtype)
        Z = eye
        for _ in range(self.n_iter):
            T = 0.5 * (3.0 * eye - Z @ Y)
            Y = Y @ T
            Z = T @ Z
        return Z / torch.sqrt(norm)

    def forward(self, x):
        C, nf = x.shape[1], self.nf
        X = F.unfold(x, self.k, 1, self.padding, self.S).transpose(1, 2).contiguous()
        X = X.view(-1, nf, C // self.block).transpose(1, 2).contiguous().view(-1, nf)
        mean = X.mean(0)
        X = X - mean
        cov = torch.addmm(torch.eye(nf), X.t(), X, beta=self.eps, alpha=1.0 / X.shape[0])
        D = self.isqrt(cov)
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_deconv.lerp_(D, self.momentum)
        w = self.weight.view(-1, nf, C // self.block).transpose(1, 2).contiguous().view(-1, nf) @ D
        b = self.bias - (w @ mean[:, None]).view(self.weight.shape[0], -1).sum(1)
        w = w.view(-1, C // self.block, nf).transpose(1, 2).contiguous().view(self.weight.shape)
        return F.conv2d(x, w, b, 1, self.padding)


def train_step(module, x, gy):
    def step():
        for p in module.parameters():
            p.grad = None
        x.grad = None
        module(x).backward(gy)
    return step


def eval_step(module, x):
    def step():
        with torch.no_grad():
            module(x)
    return step


def interleaved(fns: dict, rounds: int, warmup: int = 2) -> dict:
    """``{name: [seconds per round]}``, one call of every candidate per round, order reversed every round."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def ratio(times, a, b) -> float:
    """Median over rounds of ``time(a) / time(b)``."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def measure(threads: int, rounds: int, N: int):
    """Rows and goal ratios of the training step and eval at ``threads`` torch threads."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    C, O, H, k, B, S = 64, 64, 32, 3, 64, 3
    x = torch.randn(N, C, H, H, requires_grad=True)
    gy = torch.randn(N, O, H, H)
    deconv = nt.Deconv2d(C, O, k, padding=1, block_size=B, sampling_stride=S)
    alg1 = Algorithm1(C, O, k, 1, B, S)
    conv = nn.Conv2d(C, O, k, padding=1)
    bn = nn.Sequential(nn.Conv2d(C, O, k, padding=1), nn.BatchNorm2d(O))
    with torch.no_grad():
        for m in (alg1, conv, bn[0]):
            m.weight.copy_(deconv.weight)
            m.bias.copy_(deconv.bias)
        agree = float((deconv(x) - alg1(x)).abs().max() / alg1(x).abs().max())  # float32 rounding
    progress(f"{threads} thread(s): training step, {rounds} interleaved rounds")
    train = interleaved({"Deconv2d": train_step(deconv, x, gy), "Algorithm1": train_step(alg1, x, gy),
                         "Conv2d+BatchNorm2d": train_step(bn, x, gy), "Conv2d": train_step(conv, x, gy)}, rounds)
    progress(f"{threads} thread(s): eval forward")
    deconv.eval()
    conv.eval()
    xe = x.detach()
    ev = interleaved({"Deconv2d.eval": eval_step(deconv, xe), "Conv2d.eval": eval_step(conv, xe)}, 8 * rounds)  # cheap: more rounds
    med = {n: statistics.median(t) * 1e3 for n, t in {**train, **ev}.items()}
    t = threads
    rows = [
        {"threads": t, "step": "train", "layer": "Deconv2d (nsiter)", "ms": med["Deconv2d"],
         "vs": "Algorithm1 / Deconv2d", "ratio": ratio(train, "Algorithm1", "Deconv2d")},
        {"threads": t, "step": "train", "layer": "Algorithm1 (paper: unfold + 5 NS)", "ms": med["Algorithm1"],
         "vs": "", "ratio": ""},
        {"threads": t, "step": "train", "layer": "Conv2d+BatchNorm2d", "ms": med["Conv2d+BatchNorm2d"],
         "vs": "Deconv2d / (Conv2d+BN)", "ratio": ratio(train, "Deconv2d", "Conv2d+BatchNorm2d")},
        {"threads": t, "step": "train", "layer": "Conv2d alone", "ms": med["Conv2d"],
         "vs": "Algorithm1 / Conv2d; Deconv2d / Conv2d",
         "ratio": f"{ratio(train, 'Algorithm1', 'Conv2d'):.3f}; {ratio(train, 'Deconv2d', 'Conv2d'):.3f}"},
        {"threads": t, "step": "eval", "layer": "Deconv2d.eval (folded)", "ms": med["Deconv2d.eval"],
         "vs": "Deconv2d.eval / Conv2d", "ratio": ratio(ev, "Deconv2d.eval", "Conv2d.eval")},
        {"threads": t, "step": "eval", "layer": "Conv2d", "ms": med["Conv2d.eval"], "vs": "", "ratio": ""},
    ]
    goals = {f"{t} thread(s): train speed-up vs Algorithm1 (goal >= 1.5)": rows[0]["ratio"],
             f"{t} thread(s): train Deconv2d / (Conv2d+BN) (paper: 1.1-1.3 on GPU)": rows[2]["ratio"],
             f"{t} thread(s): eval Deconv2d / Conv2d (goal <= 1.05)": rows[4]["ratio"]}
    return rows, goals, agree


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, nargs="*", default=None,
                   help="torch thread counts to measure (default: torch's, then 1)")
    args = p.parse_args(argv)
    threads = args.threads or sorted({torch.get_num_threads(), 1}, reverse=True)
    t_start = time.perf_counter()
    progress(f"ceilings (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    ceilings = {"memcpy_GBps": memcpy_gbps(), "sgemm_GFLOPs_1024": gemm_gflops(1024, 1024, 1024)}
    rows, goals, agree = [], {}, None
    for t in threads:
        r, g, agree = measure(t, args.rounds, args.batch)
        rows += r
        goals.update(g)
    meta = {"case": f"float32, N={args.batch}, 64->64 channels, 32x32, k=3, padding 1, B=64, S=3, 5 iterations",
            "rounds": args.rounds, "ceilings (numpy, default threads)": {k: round(v, 1) for k, v in ceilings.items()},
            "goals (medians of per-round ratios)": {k: round(v, 3) for k, v in goals.items()},
            "check": f"Deconv2d vs Algorithm1 training output: relative difference {agree:.1e} (float32)",
            "loadavg (other processes share the 2 cores)": [round(v, 2) for v in os.getloadavg()],
            "seconds": round(time.perf_counter() - t_start, 1), "machine": machine_info()}
    path = write_results("layers", rows, meta=meta, columns=["threads", "step", "layer", "ms", "vs", "ratio"],
                         title="Deconv2d training step and eval vs the paper's algorithm, batch norm and Conv2d")
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
