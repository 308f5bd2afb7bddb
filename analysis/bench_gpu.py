"""Benchmark of the torch backend against its GPU goals (issue 8), with peers and ceilings.

Sections (each a results table; medians of repeats, synchronised timings):

1. ``ns_batched``: batched coupled Newton–Schulz, float32, n in {144, 576}, batch 16 and 64,
   5 iterations (the paper's setting).  Peers: ``torch.linalg.eigh``-based inverse square root
   (``V diag(lam^-1/2) V^T``, same dtype, same device); ceiling: ``torch.bmm`` of the same
   shape.  Reported: the public ``nsiter.inv_sqrtm`` (validation + PSD probe + iteration, one
   host sync), the bare iteration, speed-up over eigh, and the iteration's FLOP/s as a
   fraction of bmm's (products actually issued: 3 per step, 1 for the first, 2 for the last).
   Goals: >= 30x eigh; >= 70 % of bmm FLOP/s for n >= 256.
2. ``ns_small``: one 27 x 27 float32 matrix, 15 iterations: latency of ``nsiter.inv_sqrtm``
   with the CUDA-graph path (automatic on CUDA) and without it, and of the bare eager
   iteration.  Goal: <= 0.3 ms.
3. ``im2col``: ``nsiter.im2col`` against ``F.unfold(x).transpose(1, 2).contiguous()`` (the same
   matrix), with the device's copy bandwidth as ceiling.  Goal: >= 2x.
4. ``table3``: statistics of one layer (im2col of the subsampled grid + covariance + 5 NS
   steps, ``Deconv2d.batch_statistics``) against the layer's ``conv2d`` for the paper's
   Table 3 shapes (batch 128 on a GPU).  Goal: ratio <= 1.0.

On CUDA the results go to ``analysis/results/gpu_*.{json,csv,md}`` and ``gpu_summary.md``,
naming the GPU.  Without CUDA the script says so and runs the same code on CPU torch at
reduced sizes (``--quick`` sizes, fewer Table 3 rows) as a sanity check, writing
``analysis/results/torch_cpu_*``; those numbers validate the script, not the GPU goals.
``--device cpu`` forces the CPU run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import RESULTS, machine_info, markdown_table, progress, write_results  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - the script needs torch
    print("bench_gpu.py needs torch (pip install nsiter[torch]); nothing measured")
    sys.exit(0)

import nsiter  # noqa: E402
import nsiter.torch as nt  # noqa: E402
from nsiter import _torch as tb  # noqa: E402
from nsiter import newton_schulz as ns  # noqa: E402
from nsiter._backend import backend  # noqa: E402
from nsiter._torch import linalg as tlinalg  # noqa: E402

# H, W, Cin, Cout, groups (channel blocks), k, sampling stride — the paper's Table 3
TABLE3 = [
    (256, 256, 3, 64, 1, 3, 3), (128, 128, 64, 128, 1, 3, 3), (64, 64, 128, 256, 2, 3, 3),
    (32, 32, 256, 512, 4, 3, 3), (16, 16, 512, 512, 8, 3, 3), (128, 128, 64, 128, 64, 3, 3),
    (64, 64, 128, 256, 128, 3, 3), (32, 32, 256, 512, 256, 3, 3), (16, 16, 512, 512, 512, 3, 3),
    (128, 128, 64, 128, 32, 3, 3), (64, 64, 128, 256, 32, 3, 3), (32, 32, 256, 512, 32, 3, 3),
    (16, 16, 512, 512, 32, 3, 3), (256, 256, 3, 64, 1, 3, 5), (128, 128, 64, 128, 1, 3, 5),
    (256, 256, 3, 64, 1, 7, 3), (256, 256, 3, 64, 1, 7, 5), (256, 256, 3, 64, 1, 7, 7),
    (256, 256, 3, 64, 1, 11, 3), (256, 256, 3, 64, 1, 11, 5), (256, 256, 3, 64, 1, 11, 7),
    (256, 256, 3, 64, 1, 11, 11),
]


class Timer:
    """Median seconds per call on ``device`` (CUDA: synchronised before and after each sample)."""

    def __init__(self, device, repeat, min_time):
        self.device, self.repeat, self.min_time = device, repeat, min_time

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn, warmup=2):
        for _ in range(warmup):
            fn()
        self.sync()
        samples = []
        for _ in range(self.repeat):
            n = 0
            self.sync()
            t0 = time.perf_counter()
            while True:
                fn()
                n += 1
                if n >= 1 and time.perf_counter() - t0 >= self.min_time:
                    break
            self.sync()
            samples.append((time.perf_counter() - t0) / n)
        return float(np.median(samples))


def spd_batch(batch, n, dtype, device, cond=1e3, seed=0):
    """SPD matrices ``Q diag(lam) Q^T`` with log-spaced eigenvalues (condition ``cond``)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(-np.log10(cond), 0.0, n, dtype=torch.float64)
    a = (q * lam) @ q.transpose(-1, -2)
    return ((a + a.transpose(-1, -2)) / 2).to(dtype=dtype, device=device)


def eigh_isqrt(A):
    lam, V = torch.linalg.eigh(A)
    return (V * lam.clamp_min(torch.finfo(A.dtype).tiny).rsqrt()[..., None, :]) @ V.transpose(-1, -2)


def n_products(n_iter):
    return 1 if n_iter == 1 else 1 + 3 * (n_iter - 2) + 2


def residual(D, A):
    D64, A64 = D.double(), A.double()
    R = D64 @ A64 @ D64 - torch.eye(A.shape[-1], dtype=torch.float64, device=A.device)
    return float((torch.linalg.matrix_norm(R) / A.shape[-1] ** 0.5).max())


def bench_ns_batched(timer, device, sizes, batches):
    rows = []
    for n in sizes:
        for b in batches:
            progress(f"ns_batched n={n} batch={b}")
            A = spd_batch(b, n, torch.float32, device)
            with tb.matmul_precision(device):
                c = torch.linalg.matrix_norm(A)[:, None, None]
                Y0 = A / c
                t_core = timer(lambda: ns._run_fixed(backend(Y0), Y0, 5, None, want_y=False))
                X1, X2 = torch.randn(b, n, n, device=device), torch.randn(b, n, n, device=device)
                t_bmm = timer(lambda: torch.bmm(X1, X2))
            t_pub = timer(lambda: nsiter.inv_sqrtm(A, n_iter=5))
            t_eigh = timer(lambda: eigh_isqrt(A), warmup=1)
            flop = 2.0 * n ** 3 * b
            D = nsiter.inv_sqrtm(A, n_iter=5)
            rows.append({
                "n": n, "batch": b, "nsiter_ms": 1e3 * t_pub, "iteration_ms": 1e3 * t_core,
                "eigh_ms": 1e3 * t_eigh, "speedup_vs_eigh": t_eigh / t_pub,
                "iteration_tflops": n_products(5) * flop / t_core / 1e12, "bmm_tflops": flop / t_bmm / 1e12,
                "fraction_of_bmm": (n_products(5) * flop / t_core) / (flop / t_bmm),
                "dcd_residual_5it": residual(D, A), "dcd_residual_eigh": residual(eigh_isqrt(A), A),
            })
    return rows


def bench_ns_small(timer, device, n=27, n_iter=15):
    progress(f"ns_small n={n} iterations={n_iter}")
    A = spd_batch(1, n, torch.float32, device)[0]
    rows = []
    old = tb.set_cuda_graphs(True)
    try:
        t_graph = timer(lambda: nsiter.inv_sqrtm(A, n_iter=n_iter), warmup=3)
        tb.set_cuda_graphs(False)
        t_eager = timer(lambda: nsiter.inv_sqrtm(A, n_iter=n_iter), warmup=3)
    finally:
        tb.set_cuda_graphs(old)
    with tb.matmul_precision(device):
        Y0 = (A / torch.linalg.matrix_norm(A))[None]
        t_core = timer(lambda: ns._run_fixed(backend(Y0), Y0, n_iter, None, want_y=False), warmup=3)
    graphs_used = device.type == "cuda" and any(bool(v) for v in tlinalg._GRAPHS.values())
    rows.append({"n": n, "iterations": n_iter, "inv_sqrtm_ms": 1e3 * t_graph,
                 "cuda_graph_used": graphs_used, "inv_sqrtm_eager_ms": 1e3 * t_eager,
                 "bare_iteration_eager_ms": 1e3 * t_core})
    if tlinalg._GRAPH_FAILURES:
        print("CUDA-graph capture failed (the eager path ran):", tlinalg._GRAPH_FAILURES)
    return rows


def bench_im2col(timer, device, cases):
    rows = []
    for (nb, c, h, w, k, s, p) in cases:
        progress(f"im2col ({nb},{c},{h},{w}) k={k} s={s} p={p}")
        x = torch.randn(nb, c, h, w, device=device)
        t_ours = timer(lambda: nsiter.im2col(x, k, stride=s, padding=p))
        t_unfold = timer(lambda: F.unfold(x, k, padding=p, stride=s).transpose(1, 2).contiguous())
        out = nsiter.im2col(x, k, stride=s, padding=p)
        dst = torch.empty_like(out)
        t_copy = timer(lambda: dst.copy_(out))
        gbytes = (x.numel() + out.numel()) * 4 / 1e9
        rows.append({"shape": f"({nb},{c},{h},{w})", "k": k, "stride": s, "padding": p,
                     "nsiter_ms": 1e3 * t_ours, "unfold_T_contig_ms": 1e3 * t_unfold,
                     "speedup": t_unfold / t_ours, "nsiter_GBps": gbytes / t_ours,
                     "copy_GBps": 2 * out.numel() * 4 / 1e9 / t_copy})
    return rows


def bench_table3(timer, device, shapes, batch):
    rows = []
    for (h, w, cin, cout, groups, k, s) in shapes:
        progress(f"table3 {h}x{w}x{cin}->{cout} blocks={groups} k={k} S={s} batch={batch}")
        x = torch.randn(batch, cin, h, w, device=device)
        layer = nt.Deconv2d(cin, cout, k, padding=k // 2, block_size=cin // groups, sampling_stride=s,
                            device=device)
        with torch.no_grad():
            # x and layer bound as defaults: the lambdas must not read names deleted below
            t_stats = timer(lambda layer=layer, x=x: layer.batch_statistics(x), warmup=1)
            t_conv = timer(lambda layer=layer, x=x: F.conv2d(x, layer.weight, layer.bias, padding=k // 2), warmup=1)
            t_layer = timer(lambda layer=layer, x=x: layer(x), warmup=1)
        rows.append({"H": h, "W": w, "Cin": cin, "Cout": cout, "blocks": groups, "k": k, "S": s,
                     "stats_ms": 1e3 * t_stats, "conv2d_ms": 1e3 * t_conv, "stats_over_conv": t_stats / t_conv,
                     "deconv_layer_ms": 1e3 * t_layer})
        del x, layer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--quick", action="store_true", help="reduced sizes (the default without CUDA)")
    ap.add_argument("--repeat", type=int, default=None)
    args = ap.parse_args(argv)

    has_cuda = torch.cuda.is_available()
    if args.device == "cuda" and not has_cuda:
        print("bench_gpu.py: --device cuda requested but torch sees no CUDA device; nothing measured")
        return 0
    device = torch.device("cuda" if (args.device != "cpu" and has_cuda) else "cpu")
    on_gpu = device.type == "cuda"
    quick = args.quick or not on_gpu
    if not on_gpu:
        print("bench_gpu.py: no CUDA device — the GPU goals of issue 8 remain unmeasured. Running the same code "
              "on CPU torch at reduced sizes as a sanity check (results: analysis/results/torch_cpu_*).")
    repeat = args.repeat or (5 if quick else 9)
    timer = Timer(device, repeat, 0.0 if quick else 0.02)
    prefix = "gpu" if on_gpu else "torch_cpu"
    meta = {"machine": machine_info(), "device": torch.cuda.get_device_name(device) if on_gpu else "cpu (torch)",
            "quick": quick, "tf32_in_nsiter": False}
    if on_gpu:
        meta["cuda"] = torch.version.cuda
        meta["cudnn_allow_tf32 (conv2d peer)"] = torch.backends.cudnn.allow_tf32
    torch.manual_seed(0)

    sections = []
    if quick:
        rows = bench_ns_batched(timer, device, sizes=(144,), batches=(16,))
    else:
        rows = bench_ns_batched(timer, device, sizes=(144, 576), batches=(16, 64))
    sections.append(("ns_batched", "Batched coupled Newton–Schulz, float32, 5 iterations", rows))
    sections.append(("ns_small", "One 27x27 float32 matrix, 15 iterations (latency)", bench_ns_small(timer, device)))
    im2col_cases = [(8, 64, 32, 32, 3, 1, 1)] if quick else [
        (128, 64, 32, 32, 3, 1, 1), (32, 128, 64, 64, 3, 1, 1), (128, 3, 256, 256, 3, 3, 0),
        (128, 64, 128, 128, 3, 3, 0), (128, 3, 256, 256, 7, 3, 0)]
    sections.append(("im2col", "im2col vs F.unfold + transpose + contiguous, float32",
                     bench_im2col(timer, device, im2col_cases)))
    shapes = [TABLE3[1], TABLE3[3], TABLE3[4]] if quick else TABLE3
    batch = 4 if quick else 128
    sections.append(("table3", f"Layer statistics (im2col + cov + 5 NS) vs conv2d, batch {batch}",
                     bench_table3(timer, device, shapes, batch)))

    summary = [f"# torch backend benchmark on {meta['device']}\n"]
    if not on_gpu:
        summary.append("No CUDA device: CPU-torch sanity run at reduced sizes; the GPU goals are unmeasured.\n")
    for name, title, rows in sections:
        write_results(f"{prefix}_{name}", rows, meta=meta, title=f"{title} — {meta['device']}")
        summary.append(f"## {title}\n\n{markdown_table(rows)}\n")
    (RESULTS / f"{prefix}_summary.md").write_text("\n".join(summary))
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
