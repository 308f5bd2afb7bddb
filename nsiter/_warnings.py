"""Warning classes raised by nsiter for numerical trouble."""
from __future__ import annotations

__all__ = ["NsiterWarning", "NewtonSchulzDivergenceWarning", "IllConditionedWarning"]


class NsiterWarning(UserWarning):
    """Base class of every warning nsiter emits."""


class NewtonSchulzDivergenceWarning(NsiterWarning):
    """A Newton–Schulz iteration blew up; the best iterate was returned instead."""


class IllConditionedWarning(NsiterWarning):
    """A matrix is (numerically) singular; results are accurate to roughly ``cond * eps`` only."""
