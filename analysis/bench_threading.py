"""Benchmark: nsiter's kernels under Numba's GNU OpenMP layer against the layer nsiter chooses.

``python analysis/bench_threading.py [--rounds 6] [--no-workqueue]``

nsiter._config picks a fork- and thread-safe threading layer (TBB where it loads, else
workqueue with serialised kernel calls) instead of Numba's default GNU OpenMP, which a fork
pool or ``DataLoader(num_workers > 0)`` cannot survive.  This checks that the choice costs no
speed.  The layer is fixed once per process, so each measurement is a fresh interpreter:
``NUMBA_THREADING_LAYER=omp`` (what nsiter ran on before), nsiter's own choice (no variable
set; asserted active via ``numba.threading_layer()``) and, for reference, ``workqueue`` (the
fallback on platforms without TBB wheels).  Rounds interleave the layers, the order reversed
every other round (ABBA: linear drift cancels); each round's ratio is ``t(layer) / t(omp)``
per case, reported as the median over rounds with its min-max.  Every child also measures
memcpy GB/s and 1024^3 SGEMM GFLOP/s (the ceilings, in the same run) and each case's time is
the median of 5 samples of at least 0.1 s after a warm-up call (kernels from the cache).

Writes ``analysis/results/threading.md`` and ``threading.json`` (every per-round number).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time

sys.path.insert(0, os.path.dirname(__file__))
from _bench import RESULTS, machine_info, markdown_table, progress  # noqa: E402

GOAL = 1.10  # "ratios within 10%"

CHILD = textwrap.dedent(r"""
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    import numba
    import nsiter
    from nsiter._config import THREADING
    from _bench import gemm_gflops, median_time, memcpy_gbps

    rng = np.random.default_rng(0)
    def spd(nb, n, dtype):
        g = rng.standard_normal((nb, n, 3 * n))
        return (g @ g.transpose(0, 2, 1) / (3 * n) + 0.1 * np.eye(n)).astype(dtype)

    x_im2col = rng.standard_normal((8, 64, 64, 64)).astype(np.float32)
    x_cov = rng.standard_normal((8, 64, 32, 32)).astype(np.float32)
    A32, A64 = spd(64, 27, np.float32), spd(64, 27, np.float64)
    CASES = {
        "im2col (8,64,64,64) f32 k3 p1": lambda: nsiter.im2col(x_im2col, 3, padding=1),
        "patch_covariance (8,64,32,32) f32 k3 p1": lambda: nsiter.patch_covariance(x_cov, 3, padding=1),
        "inv_sqrtm 64x27x27 f32 n_iter=5": lambda: nsiter.inv_sqrtm(A32, n_iter=5),
        "inv_sqrtm 64x27x27 f64 default tol": lambda: nsiter.inv_sqrtm(A64),
    }
    times = {name: median_time(fn, repeat=5, warmup=1, min_time=0.1) for name, fn in CASES.items()}
    print(json.dumps(dict(layer=numba.threading_layer(), choice=THREADING._asdict(), times=times,
                          threads=numba.get_num_threads(), memcpy_gbps=memcpy_gbps(repeat=5),
                          sgemm_gflops=gemm_gflops(1024, 1024, 1024, repeat=5))))
""")


def run_child(layer: str | None) -> dict:
    """One fresh interpreter under ``NUMBA_THREADING_LAYER=layer`` (None: nsiter's choice)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    if layer is not None:
        env["NUMBA_THREADING_LAYER"] = layer
    proc = subprocess.run([sys.executable, "-c", CHILD, os.path.dirname(os.path.abspath(__file__))],
                          capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode:
        raise RuntimeError(f"layer {layer}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if layer is not None and out["layer"] != layer:
        raise RuntimeError(f"asked for {layer}, Numba ran {out['layer']}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--no-workqueue", action="store_true", help="skip the workqueue reference column")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    progress("warm-up child (fills the kernel cache if empty)")
    chosen = run_child(None)["layer"]
    sides = {"omp": "omp", chosen: None}  # label -> NUMBA_THREADING_LAYER (None: nsiter's choice)
    if not args.no_workqueue and chosen != "workqueue":
        sides["workqueue"] = "workqueue"
    progress(f"nsiter chose {chosen!r}; {args.rounds} rounds of {list(sides)}")

    rounds = []
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        got = {}
        for label in order:
            got[label] = run_child(sides[label])
            if sides[label] is None and got[label]["layer"] != chosen:
                raise RuntimeError(f"nsiter's choice changed: {got[label]['layer']} != {chosen}")
        rounds.append(dict(order=order, **got))
        progress(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{lab} {sum(got[lab]['times'].values()) * 1e3:.1f} ms" for lab in sides))

    cases = list(rounds[0]["omp"]["times"])
    rows = []
    for case in cases:
        row = {"case": case, "omp ms": statistics.median(rd["omp"]["times"][case] for rd in rounds) * 1e3}
        for lab in sides:
            if lab == "omp":
                continue
            ratios = [rd[lab]["times"][case] / rd["omp"]["times"][case] for rd in rounds]
            row[f"{lab} ms"] = statistics.median(rd[lab]["times"][case] for rd in rounds) * 1e3
            row[f"{lab}/omp"] = statistics.median(ratios)
            row[f"{lab}/omp min-max"] = f"{min(ratios):.3f}-{max(ratios):.3f}"
        rows.append(row)
    ceilings = {lab: dict(memcpy_gbps=statistics.median(rd[lab]["memcpy_gbps"] for rd in rounds),
                          sgemm_gflops=statistics.median(rd[lab]["sgemm_gflops"] for rd in rounds))
                for lab in sides}
    worst = max(row[f"{chosen}/omp"] for row in rows)
    elapsed = time.perf_counter() - t_start

    machine = machine_info()
    machine["numba_threads"] = rounds[0]["omp"]["threads"]
    meta = dict(machine=machine, chosen_layer=chosen, choice=rounds[0][chosen]["choice"], rounds=args.rounds,
                goal=f"{chosen}/omp <= {GOAL}", worst_ratio=worst, met=worst <= GOAL,
                ceilings=ceilings, seconds=elapsed, loadavg=os.getloadavg())
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "threading.json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "per_round": rounds}, f, indent=2)
    m = machine
    ceil = "; ".join(f"{lab}: memcpy {c['memcpy_gbps']:.1f} GB/s, SGEMM 1024^3 {c['sgemm_gflops']:.0f} GFLOP/s"
                     for lab, c in ceilings.items())
    text = (f"## Threading layers: GNU OpenMP (Numba's default) vs nsiter's choice ({chosen!r})\n\n"
            f"Machine: {m['cpu']}, {m['cores']} cores; numba {m['numba']} ({m['numba_threads']} threads), "
            f"numpy {m['numpy']}; {m['date']}.  `python analysis/bench_threading.py --rounds {args.rounds}` "
            f"({elapsed:.0f} s).\n\n"
            "Each number comes from a fresh interpreter per layer, rounds interleaved (order reversed every "
            "other round); a case's time is the median of 5 samples (>= 0.1 s each) after a warm-up; "
            "ratios are medians of per-round ratios `t(layer) / t(omp)`.  workqueue is the fallback where "
            "TBB does not load (kernel calls serialised by a lock; one caller here).\n\n"
            f"Ceilings in the same children (medians): {ceil}.  Load average at the end: "
            f"{', '.join(f'{v:.2f}' for v in meta['loadavg'])}.\n\n"
            f"Goal `{chosen}/omp <= {GOAL}` for every case: worst {worst:.3f}, "
            f"{'met' if worst <= GOAL else 'NOT met'}.\n\n")
    (RESULTS / "threading.md").write_text(text + markdown_table(rows, list(rows[0])) + "\n")
    print(text + markdown_table(rows, list(rows[0])))
    return 0 if worst <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
