import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests import their helpers by name


@pytest.fixture(autouse=True)
def _one_thread():
    """The tests use tiny tensors: intra-op threads only cost (OpenMP barriers stall badly on a
    busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
