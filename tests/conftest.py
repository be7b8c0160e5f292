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


@pytest.fixture(autouse=True, scope="session")
def _no_installed_fashion_mnist(tmp_path_factory):
    """The data a fresh machine has after ``scripts/setup.sh dev``: no Fashion-MNIST (the tests that
    need it write tiny idx files and pass ``root`` or ``$FLATMINIMA_FASHION_MNIST``). Hiding this
    machine's Debian package and environment variable makes a test that quietly read them fail here
    too, not only on a new machine."""
    from flatminima import data

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data.images, "FASHION_PACKAGE_DIR", tmp_path_factory.mktemp("no-fashion-package"))
        patch.delenv(data.FASHION_ENV, raising=False)
        yield
