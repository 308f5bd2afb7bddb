"""`make figures`: run every ``analysis/fig_*.py`` script; each writes PNG + data to figures/."""
from __future__ import annotations

import sys

from _runner import HERE, run_scripts


def main(argv=None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)  # e.g. --image PATH, passed to each script
    return run_scripts(sorted(HERE.glob("fig_*.py")), extra, label="make figures", outputs="figures/")


if __name__ == "__main__":
    sys.exit(main())
