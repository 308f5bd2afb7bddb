"""The one stopping and divergence policy of the Newton–Schulz iterations.

Every runner (the fused Numba kernel, the array-code runner for numpy and torch, the
uncoupled iteration) and :mod:`nsiter.verification` read these names; Numba freezes module
globals at compile time, so a change here needs a fresh kernel cache (the jit cache keys on
the source files that define the constants, see :mod:`nsiter._config`).

A matrix with residual history ``r_1, r_2, ...`` (``r_k = ||D_k D_k A - I||_F``):

* **diverged** at step ``k`` when ``r_k`` is not finite, ``r_k > BLOWUP_GROWTH * min_j r_j``,
  or ``r_k > BLOWUP_SQRT_N * sqrt(n)`` (ten times ``||0 A - I||_F = sqrt(n)``: worse than ``D = 0``);
* **stagnated** (stopped at its rounding floor) when ``r_k < STAGNATION_BELOW`` and
  ``r_k > STAGNATION_RATIO * r_{k-1}``: in exact arithmetic the quadratic phase more than
  halves the residual at every step, so a smaller decrease is rounding.
"""
from __future__ import annotations

__all__ = ["BLOWUP_GROWTH", "BLOWUP_SQRT_N", "STAGNATION_BELOW", "STAGNATION_RATIO", "MAX_ITER"]

#: growth over the best residual so far that counts as a blow-up
BLOWUP_GROWTH = 1e3
#: a residual above ``BLOWUP_SQRT_N * sqrt(n)`` counts as a blow-up
BLOWUP_SQRT_N = 10.0
#: stagnation is only tested below this residual (the quadratic phase)
STAGNATION_BELOW = 0.5
#: a step that keeps more than this fraction of the residual has stagnated
STAGNATION_RATIO = 0.75
#: iteration cap when the count is driven by a tolerance
MAX_ITER = 100
