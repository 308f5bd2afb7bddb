"""Private Numba kernels: contiguous float inputs, preallocated outputs, no validation."""
