"""Benchmark harness shared by ``analysis/bench_*.py``.

Every benchmark measures the machine's ceilings (memcpy bandwidth, GEMM GFLOP/s)
and its peers in the same run, warms up JIT first, reports the median of repeats,
and writes JSON + CSV + Markdown under ``analysis/results/``.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
FIGURES = Path(__file__).resolve().parent.parent / "figures"

__all__ = [
    "RESULTS", "FIGURES", "median_time", "first_call_time", "memcpy_gbps", "gemm_gflops",
    "machine_info", "write_results", "markdown_table", "progress", "spd", "numpy_eigh_isqrt",
]


def progress(msg: str) -> None:
    """One progress line on stderr (flushed), for anything slower than a few seconds."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median_time(fn, *, repeat: int = 7, warmup: int = 1, min_time: float = 0.0) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` calls.

    With ``min_time > 0`` each sample loops ``fn`` until at least ``min_time`` seconds
    pass and reports the per-call average (for sub-millisecond calls).
    """
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        n = 0
        t0 = time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        samples.append(dt / n)
    return float(np.median(samples))


def spd(n, cond, batch, dtype, seed):
    """``batch`` SPD matrices ``Q diag(lambda) Q^T``, eigenvalues log-spaced in ``[1/cond, 1]``."""
    rng = np.random.default_rng(seed)
    lam = np.logspace(-np.log10(cond), 0.0, n)
    out = np.empty((batch, n, n))
    for b in range(batch):
        q, r = np.linalg.qr(rng.standard_normal((n, n)))
        q = q * np.sign(np.diag(r))
        a = (q * lam) @ q.T
        out[b] = (a + a.T) / 2
    return out.astype(dtype)


def numpy_eigh_isqrt(A):
    """The peer: ``A^{-1/2}`` by numpy's batched ``eigh``."""
    lam, V = np.linalg.eigh(A)
    return (V * lam[..., None, :] ** -0.5) @ np.swapaxes(V, -1, -2)


def first_call_time(fn) -> float:
    """Seconds taken by the first call (JIT compile or cache load + one run)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def memcpy_gbps(nbytes: int = 128 * 2**20, repeat: int = 7) -> float:
    """Copy bandwidth in GB/s, counting bytes read + bytes written, into a preallocated buffer."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    t = median_time(lambda: np.copyto(dst, src), repeat=repeat)
    return 2 * nbytes / t / 1e9


def gemm_gflops(m: int, n: int, k: int, dtype=np.float32, repeat: int = 7) -> float:
    """GFLOP/s of numpy ``(m x k) @ (k x n)`` (2mnk flops) in ``dtype``."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    out = np.empty((m, n), dtype=dtype)
    t = median_time(lambda: np.matmul(a, b, out=out), repeat=repeat, min_time=0.05)
    return 2.0 * m * n * k / t / 1e9


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """Versions and thread counts to store next to every measurement."""
    import numba
    import scipy

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(),
    }
    try:
        import torch
    except ImportError:
        info["torch"] = None
    else:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info


def markdown_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = ".4g") -> str:
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_results(name: str, rows: list[dict], *, meta: dict | None = None, columns=None,
                  title: str | None = None, directory: Path = RESULTS) -> Path:
    """Write ``name.json`` (rows + meta), ``name.csv`` and ``name.md`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    meta.setdefault("machine", machine_info())
    columns = columns or list(rows[0])
    with open(directory / f"{name}.json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2, default=float)
    with open(directory / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    m = meta["machine"]
    header = f"## {title or name}\n\n"
    header += (f"Machine: {m.get('cpu')}, {m.get('cores')} cores; numba {m.get('numba')} "
               f"({m.get('numba_threads')} threads), numpy {m.get('numpy')}, torch {m.get('torch')}; "
               f"{m.get('date')}. Medians of repeats.\n\n")
    extra = {k: v for k, v in meta.items() if k != "machine"}
    if extra:
        header += "".join(f"- {k}: {v}\n" for k, v in extra.items()) + "\n"
    (directory / f"{name}.md").write_text(header + markdown_table(rows, columns) + "\n")
    return directory / f"{name}.md"
