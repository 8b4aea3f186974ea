import sys
from pathlib import Path

# the stand-ins beside these tests import by plain name (as tests/conftest.py does for core)
sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """The toy models here are faster on one thread, and a shared CPU makes more threads slower still;
    torchrun's processes run with OMP_NUM_THREADS=1 as well."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
