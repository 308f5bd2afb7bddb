import os
import sys

import pytest

# keep hypothesis quick and deterministic in CI
from hypothesis import HealthCheck, settings

settings.register_profile(
    "nsiter", max_examples=40, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("NSITER_HYPOTHESIS_PROFILE", "nsiter"))

sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
