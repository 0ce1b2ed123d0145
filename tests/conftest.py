import os

import pytest
import torch

# Every test runs the verifier after every pass (off by default in the library: it costs 3-6% of a compile).
# Set here, at import, so spawned ranks inherit it too.
os.environ.setdefault("FXPASSES_VERIFY", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
