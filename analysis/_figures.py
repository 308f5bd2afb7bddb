"""Shared plumbing for the figure scripts (``analysis/fig_*.py``, run by ``make figures``)."""
from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import nsiter  # noqa: E402

FIGURES = Path(__file__).resolve().parent.parent / "figures"

__all__ = ["FIGURES", "parser", "load_image", "save_figure", "write_csv", "write_json", "plt"]


def parser(description: str) -> argparse.ArgumentParser:
    """Argument parser with the options every figure script takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--image", default=None,
                   help="image file to use instead of the bundled grace_hopper.jpg (the paper used Lenna)")
    p.add_argument("--out", default=str(FIGURES), help="output folder (default: figures/)")
    return p


def load_image(path=None, *, gray: bool = False, dtype=np.float64) -> np.ndarray:
    """``(C, H, W)`` floats in [0, 1]: ``path`` if given, else nsiter's bundled sample image."""
    if path is None:
        return nsiter.data.sample_image(gray=gray, dtype=dtype)
    return nsiter.data.load_image(path, gray=gray, dtype=dtype)


def save_figure(fig, out, name: str) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {os.path.relpath(path)}")
    return path


def write_csv(out, name: str, header: list[str], rows) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([f"{v:.10g}" if isinstance(v, (float, np.floating)) else v for v in r])
    print(f"wrote {os.path.relpath(path)}")
    return path


def write_json(out, name: str, data: dict) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"

    def default(o):
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, (np.floating, np.integer, np.bool_)):
            return o.item()
        raise TypeError(type(o))

    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=default)
    print(f"wrote {os.path.relpath(path)}")
    return path
