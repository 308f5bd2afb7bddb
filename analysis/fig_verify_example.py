"""Example accuracy certificate: ``verify_whitening`` on the 27 x 27 image covariance.

The same report ``nsiter verify cov.npy --plot ...`` prints, for the covariance of 3x3 RGB
patches of the sample image (the matrix of the paper's Fig. 7): coupled, uncoupled and
eigh, 50 iterations, in float64 and float32.  Writes ``figures/verify_example_<dtype>.png``
(residual per iteration, floor kappa*u marked), ``.txt`` (the table) and ``.json`` (the
numbers).  The ``time`` column of the tables is a wall time and varies between runs.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _figures import load_image, parser, plt  # noqa: E402

import nsiter  # noqa: E402


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x = load_image(args.image)
    cov, _ = nsiter.covariance(nsiter.im2col(x, 3))
    source = "sample image, 3x3 patches" if args.image is None else f"{os.path.basename(args.image)}, 3x3 patches"
    for dtype in ("float64", "float32"):
        rep = nsiter.verify_whitening(cov, dtype=dtype)
        import dataclasses

        rep = dataclasses.replace(rep, source=source)
        name = f"verify_example_{dtype}"
        fig = rep.plot()
        fig.savefig(out / f"{name}.png", dpi=120)
        plt.close("all")
        (out / f"{name}.txt").write_text(str(rep) + "\n")
        (out / f"{name}.json").write_text(rep.to_json() + "\n")
        for ext in ("png", "txt", "json"):
            print(f"wrote {os.path.relpath(out / f'{name}.{ext}')}")


if __name__ == "__main__":
    main()
