"""Speed of two versions of nsiter side by side in one run (e.g. before/after a refactor).

``python analysis/bench_compare.py OLD_REF NEW_REF [--rounds 7] [--quick] [--out FILE.md]``

A side is a git ref, checked out by ``git worktree add --detach`` under /tmp (removed at
exit), or ``WORKTREE``: this checkout, uncommitted changes included.  Each side runs in
its own long-lived worker (``.venv/bin/python -c WORKER``, cwd and first ``PYTHONPATH``
entry = the tree; it asserts ``nsiter.__file__`` is in the tree) with 2 Numba/OpenMP/BLAS
threads, and answers JSON-line requests on stdin.  Cases call only public API present in
both versions (``im2col``, ``patch_covariance``, ``covariance``, ``inv_sqrtm``) on inputs
generated from the case name's seed, identical on both sides.

1. Compile pass: every case once per side (each tree compiles its own ``cache=True``
   kernels), then both workers are restarted; the timed processes load every kernel from
   the cache and so share the same history.  Both first-call times are reported.
2. Rounds: per case, old, new, new, old (ABBA, cancelling linear drift); each answer is
   the median of ``repeats`` timed calls after one untimed call (about 0.3 s of calls),
   sent after a 0.15 s pause (OpenBLAS threads spin ~0.1 s after a call and would slow the
   next request).  Round ratio = mean(new)/mean(old); reported: the median ratio over
   rounds, its min-max and the median absolute times.  Each round also measures memcpy
   GB/s and 1024^3 SGEMM GFLOP/s in both workers, and the cores used by other processes
   (``foreign_cores``, /proc/stat): load on a shared machine shows up there.

``--quick`` divides the batch sizes by 4 (the single 576 x 576 matrix becomes 288 x 288).
Writes the Markdown table to ``--out`` and stdout and every per-round number, versions,
commits and machine to the JSON next to it.  A case raising in either tree is reported as
``error: ...`` and dropped; the exit code is then 1, 0 when every case ran.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = REPO / ".venv" / "bin" / "python"
THREADS = {k: "2" for k in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                            "MKL_NUM_THREADS")}
TOLERANCE = 1.10  # "within 10%": median ratio new/old at most this
SETTLE = 0.15  # s of sleep before each request: OpenBLAS threads spin ~0.1 s after a call

WORKER = r'''
import functools, json, os, sys, time, traceback, zlib
out = os.fdopen(os.dup(1), "w")  # private reply channel; stray prints go to stderr
os.dup2(2, 1)
import numpy as np, numba, nsiter
tree, quick = os.path.realpath(sys.argv[1]), sys.argv[2] == "quick"
assert os.path.realpath(nsiter.__file__).startswith(tree + os.sep), (nsiter.__file__, tree)
q = 4 if quick else 1

def rng(name):
    return np.random.default_rng(zlib.crc32(name.encode()))

def gauss(shape, dtype):
    return lambda g: g.standard_normal(shape).astype(dtype)

def spd(b, n, cond, dtype):
    """b matrices Q diag(logspace(0, -log10 cond, n)) Q^T (b=None: one 2-D matrix)."""
    def build(g):
        Q, _ = np.linalg.qr(g.standard_normal((b or 1, n, n)))
        A = (Q * np.logspace(0, -np.log10(cond), n)) @ np.swapaxes(Q, -1, -2)
        A = ((A + np.swapaxes(A, -1, -2)) / 2).astype(dtype)
        return A if b else A[0]
    return build

CASES = {}  # name -> (function, input builder, positional args after the input, keywords)
def case(name, func, build, *args, **kw):
    CASES[name] = (func, build, args, kw)

F32, F64 = np.float32, np.float64
def tag(dt):
    return "f32" if dt is F32 else "f64"

N = 8 // q
case(f"im2col {N}x64x64x64 f32 k3 p1", nsiter.im2col, gauss((N, 64, 64, 64), F32), 3, padding=1)
case(f"im2col {N}x3x256x256 f32 k7 s3", nsiter.im2col, gauss((N, 3, 256, 256), F32), 7, stride=3)
for shape, dt, kw in [((N, 3, 256, 256), F32, {}), ((N, 64, 32, 32), F32, {}),
                      ((N, 64, 32, 32), F64, dict(block_size=16))]:
    name = "patch_covariance " + "x".join(map(str, shape)) + f" {tag(dt)} k3 p1"
    case(name + (" bs16" if kw else ""), nsiter.patch_covariance, gauss(shape, dt), 3, padding=1, **kw)
for rows, f in [(262144 // q, 27), (65536 // q, 147)]:
    case(f"covariance {rows}x{f} f32", nsiter.covariance, gauss((rows, f), F32))
AUTO = dict(method="auto")
for b, n, dt, cond, kw in [
        (64, 27, F32, 1e3, dict(n_iter=5)), (64, 27, F64, 1e3, dict(n_iter=5)), (8, 64, F64, 1e3, {}),
        (None, 288 if quick else 576, F32, 1e3, dict(n_iter=5)), (16, 128, F64, 1e3, {}),
        (64, 27, F64, 1e3, dict(n_iter=20, return_info=True)),
        (64, 27, F64, 1e2, AUTO), (64, 27, F64, 1e6, AUTO), (32, 64, F32, 1e3, AUTO),
        (8, 128, F64, 1e4, AUTO), (4, 256, F64, 1e2, AUTO)]:
    b = b and max(b // q, 1)
    kw = dict(method="coupled", **kw) if "method" not in kw else kw
    opts = " ".join(f"{k}={v}" for k, v in kw.items() if k != "method") or "default tol"
    case(f"inv_sqrtm[{kw['method']}] {b or 1}x{n}x{n} {tag(dt)} cond {cond:.0e} {opts}",
         nsiter.inv_sqrtm, spd(b, n, cond, dt), **kw)

def timed(fn):
    t0 = time.perf_counter(); fn(); return time.perf_counter() - t0

def median_time(fn, repeats):
    fn()  # untimed
    return float(np.median([timed(fn) for _ in range(repeats)]))

def ceilings():
    src = np.ones(64 * 2**20 // 8); dst = np.empty_like(src)
    a, b = (rng(s).standard_normal((1024, 1024)).astype(F32) for s in "ab")
    c = np.empty_like(a)
    return {"memcpy_gbps": 2 * src.nbytes / median_time(lambda: np.copyto(dst, src), 5) / 1e9,
            "sgemm_gflops": 2 * 1024**3 / median_time(lambda: np.matmul(a, b, out=c), 5) / 1e9}

fns = {}
def handle(cmd):
    if "ceiling" in cmd:
        return ceilings()
    name = cmd["case"]
    if "warmup" in cmd:  # build input, first call (compile / cache load), then warm calls
        func, build, args, kw = CASES[name]
        fns[name] = functools.partial(func, build(rng(name)), *args, **kw)
        return {"first": timed(fns[name]), "warm": min(timed(fns[name]) for _ in range(3))}
    return {"median": median_time(fns[name], cmd["repeats"])}

out.write(json.dumps({"file": nsiter.__file__, "numpy": np.__version__, "numba": numba.__version__,
                      "numba_threads": numba.get_num_threads(), "cases": list(CASES)}) + "\n")
out.flush()
for line in sys.stdin:
    try:
        reply = handle(json.loads(line))
    except Exception as e:
        traceback.print_exc()
        reply = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
    out.write(json.dumps(reply) + "\n")
    out.flush()
'''


def git(*args: str) -> str:
    r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"git {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout.strip()


class Side:
    """One version of the package: its tree (a temporary worktree or this one) and a worker."""

    def __init__(self, label: str, ref: str, quick: bool, worktrees: dict):
        self.label = label
        if ref == "WORKTREE":
            self.tree, self.sha = REPO, git("rev-parse", "HEAD")
            self.short = "worktree on " + self.sha[:10]
            self.meta = {"ref": ref, "commit": "worktree on " + self.sha,
                         "diff_stat": git("diff", "--stat", "HEAD"),
                         "untracked": git("ls-files", "--others", "--exclude-standard").split()}
        else:
            self.sha = git("rev-parse", "--verify", ref + "^{commit}")
            self.tree = Path(f"/tmp/nsiter_cmp_{self.sha[:12]}")
            if self.sha not in worktrees:  # the same commit on both sides shares one tree
                if self.tree.exists():
                    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                                    str(self.tree)], capture_output=True)
                git("worktree", "add", "--detach", str(self.tree), self.sha)
                worktrees[self.sha] = self.tree
            self.short, self.meta = self.sha[:10], {"ref": ref, "commit": self.sha}
        self.quick, self.proc = quick, None
        self.start()

    def start(self) -> None:
        """(Re)start the worker: cwd and first ``PYTHONPATH`` entry are the tree."""
        self.close()
        env = {**os.environ, **THREADS,
               "PYTHONPATH": os.pathsep.join([str(self.tree), os.environ.get("PYTHONPATH", "")])}
        python = str(PYTHON if PYTHON.exists() else sys.executable)
        self.proc = subprocess.Popen([python, "-c", WORKER, str(self.tree), "quick" if self.quick else "full"],
                                     cwd=self.tree, env=env, text=True, bufsize=1,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.hello = self._read()
        self.meta.update({k: v for k, v in self.hello.items() if k != "cases"})
        progress(f"{self.label}: {self.short}, nsiter from {self.hello['file']}")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            raise RuntimeError(f"{self.label} worker exited (rc {self.proc.wait()}); see stderr")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        time.sleep(SETTLE)  # no BLAS thread of the previous request still spinning
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    models = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
    return models[0] if models else platform.processor() or platform.machine()


def cpu_ticks(pids) -> tuple[int, int, int]:
    """Busy and total clock ticks of the machine, and the ticks used by processes ``pids``."""
    f = [int(v) for v in open("/proc/stat").readline().split()[1:9]]  # guest time is in user
    own = sum(sum(int(v) for v in open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[11:13])
              for p in pids)
    return sum(f) - f[3] - f[4], sum(f), own


def warm_up(sides, cases: list, res: dict, key: str) -> None:
    """First call of every case on every side (stored under ``res[case][key]``)."""
    for c in cases:
        if res[c]["error"]:
            continue
        w = {s.label: s.ask(case=c, warmup=True) for s in sides}
        errs = [f"{k}: {v['error']}" for k, v in w.items() if "error" in v]
        if errs:
            res[c]["error"] = "error: " + "; ".join(errs)
            continue
        res[c][key] = {k: v["first"] for k, v in w.items()}
        res[c]["warm_s"] = max(v["warm"] for v in w.values())
        progress(f"{key} {c}: " + ", ".join(f"{k} {v['first']:.2f} s" for k, v in w.items()))


def compare(old: Side, new: Side, rounds: int, quick: bool) -> dict:
    """Compile pass, fresh workers, then ``rounds`` ABBA rounds; all numbers in a dict.

    The timed workers load their kernels from the cache rather than compiling them: in
    HEAD-vs-HEAD runs the side that had compiled in-process ran im2col ~4% slower.
    """
    cases = old.hello["cases"]  # the same WORKER code defines them on both sides
    res = {c: {"rounds": [], "error": None} for c in cases}
    warm_up((old, new), cases, res, "compile_s")
    for s in (old, new):
        s.start()
    warm_up((old, new), cases, res, "cache_load_s")
    target = 0.1 if quick else 0.3  # seconds of timed calls per answer
    for c in cases:
        if not res[c]["error"]:
            res[c]["repeats"] = max(5, min(200, round(target / max(res[c]["warm_s"], 1e-6))))
    ceilings, pids = [], [os.getpid(), old.proc.pid, new.proc.pid]
    for r in range(rounds):
        t0 = cpu_ticks(pids)
        ceilings.append({s.label: s.ask(ceiling=True) for s in (old, new)})
        for c in cases:
            if res[c]["error"]:
                continue
            t = {"old": [], "new": []}
            for s in (old, new, new, old):
                a = s.ask(case=c, repeats=res[c]["repeats"])
                if "error" in a:
                    res[c]["error"] = f"error: {s.label}: {a['error']}"
                    break
                t[s.label].append(a["median"])
            else:
                o, n = statistics.fmean(t["old"]), statistics.fmean(t["new"])
                res[c]["rounds"].append({"old_s": t["old"], "new_s": t["new"], "ratio": n / o})
        busy, total, own = (b - a for a, b in zip(t0, cpu_ticks(pids)))
        ceilings[-1]["foreign_cores"] = (busy - own) / max(total, 1) * (os.cpu_count() or 1)
        progress(f"round {r + 1}/{rounds} done, other processes used "
                 f"{ceilings[-1]['foreign_cores']:.2f} cores")
    return {"cases": res, "ceilings": ceilings}


def table(res: dict) -> tuple[str, bool]:
    lines = ["| case | old median ms | new median ms | ratio new/old (median) | min–max | within 10%? |",
             "|---|---|---|---|---|---|"]
    ok = True
    for c, d in res.items():
        if d["error"] or not d["rounds"]:
            ok = False
            lines.append(f"| {c} | | | {d['error'] or 'error: no rounds'} | | |")
            continue
        rs = [x["ratio"] for x in d["rounds"]]
        old = statistics.median(statistics.fmean(x["old_s"]) for x in d["rounds"])
        new = statistics.median(statistics.fmean(x["new_s"]) for x in d["rounds"])
        med = d["median_ratio"] = statistics.median(rs)
        lines.append(f"| {c} | {old * 1e3:.3f} | {new * 1e3:.3f} | {med:.3f} | {min(rs):.3f}–{max(rs):.3f} "
                     f"| {'yes' if med <= TOLERANCE else 'NO'} |")
    return "\n".join(lines), ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old_ref")
    p.add_argument("new_ref", help="a git ref, or WORKTREE for the current working tree")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="batch sizes / 4 (smoke run)")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    worktrees: dict = {}
    sides: list[Side] = []
    try:
        sides.append(Side("old", a.old_ref, a.quick, worktrees))
        sides.append(Side("new", a.new_ref, a.quick, worktrees))
        old, new = sides
        short = f"{old.sha[:7]}_{'worktree' if a.new_ref == 'WORKTREE' else new.sha[:7]}"
        out = a.out or REPO / "analysis" / "results" / f"compare_{short}.md"
        t0 = time.perf_counter()
        data = compare(old, new, a.rounds, a.quick)
        tab, ok = table(data["cases"])
        ceil = {f"{s} {k}": statistics.median(r[s][k] for r in data["ceilings"])
                for s in ("old", "new") for k in ("memcpy_gbps", "sgemm_gflops")}
        ceil["foreign_cores (max)"] = max(r["foreign_cores"] for r in data["ceilings"])
        warm = ["| case | old compile s | new compile s | old cache load s | new cache load s |",
                "|---|---|---|---|---|"]
        warm += [f"| {c} | " + " | ".join(f"{d[k][s]:.2f}" for k in ("compile_s", "cache_load_s")
                                           for s in ("old", "new")) + " |"
                 for c, d in data["cases"].items() if "cache_load_s" in d]
        meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": cpu_model(),
                "processor": platform.processor(), "cores": os.cpu_count(), "threads": THREADS,
                "rounds": a.rounds, "quick": a.quick, "old": old.meta, "new": new.meta,
                "wall_s": time.perf_counter() - t0}
        md = (f"## nsiter speed: {a.new_ref} ({new.short}) vs {a.old_ref} ({old.short})\n\n"
              f"{meta['date']}, {meta['cpu']}, threads 2, numpy {old.hello['numpy']}, numba "
              f"{old.hello['numba']}; {a.rounds} ABBA rounds{' (quick sizes)' if a.quick else ''}; "
              f"ratio = median over rounds of mean(new)/mean(old).\n\n{tab}\n\n"
              "Ceilings (median over rounds): " + ", ".join(f"{k} {v:.1f}" for k, v in ceil.items())
              + "\n\n### First call (+ one run): compile pass, then the timed workers' cache load\n\n"
              + "\n".join(warm) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(md)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, **data}, indent=1))
        print(md)
        progress(f"wrote {out} and {out.with_suffix('.json').name}")
        return 0 if ok else 1
    except RuntimeError as e:  # a worker died (e.g. the tree does not import) or git failed
        progress(f"error: {e}")
        return 2
    finally:
        for s in sides:
            s.close()
        for tree in worktrees.values():
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                           capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
