"""`make bench` entry for the torch backend on CPU torch: the sections of ``bench_gpu.py``
(batched and small Newton–Schulz, im2col vs unfold, Table 3 layer statistics vs conv2d) at
reduced sizes, written to ``analysis/results/torch_cpu_*``.  It validates the GPU benchmark
and shows the CPU-torch costs; the GPU goals are measured by ``bench_gpu.py`` on a CUDA machine.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_gpu import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--device", "cpu", "--quick"] + sys.argv[1:]))
