import os

import pytest
import torch

# Every test runs the verifier after every pass (off by default in the library: it costs 3-6% of a compile).
# Set here, at import, so spawned ranks inherit it too.
os.environ.setdefault("FXPASSES_VERIFY", "1")
# The on-disk compile cache is off in tests (a hit skips the passes a test checks, and entries would outlive the
# run); tests/test_compile_cache.py turns it on with a directory of its own.
os.environ.setdefault("FXPASSES_CACHE", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
