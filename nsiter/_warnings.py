"""Warning classes raised by nsiter for numerical trouble."""
from __future__ import annotations

import os
import sys
import warnings

__all__ = ["NsiterWarning", "NewtonSchulzDivergenceWarning", "IllConditionedWarning", "warn"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class NsiterWarning(UserWarning):
    """Base class of every warning nsiter emits."""


class NewtonSchulzDivergenceWarning(NsiterWarning):
    """A Newton–Schulz iteration blew up; the best iterate was returned instead."""


class IllConditionedWarning(NsiterWarning):
    """A matrix is (numerically) singular; results are accurate to roughly ``cond * eps`` only."""


def warn(message: str, category: type[NsiterWarning]) -> None:
    """``warnings.warn`` attributed to the first caller outside the nsiter package, however
    deep inside nsiter the warning arises (what ``skip_file_prefixes`` does on Python 3.12)."""
    frame = sys._getframe(1)
    level = 2  # stacklevel 2: the caller of this function
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
