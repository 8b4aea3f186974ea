import sys
from pathlib import Path

import pytest
import torch

# the Gaussian helpers beside these tests import by plain name (as tests/conftest.py does for core)
sys.path.insert(0, str(Path(__file__).parent))

MEASURED_ORDERS: dict[str, float] = {}


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run thousands of small tensor ops; on a shared CPU, intra-op threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def record_order():
    return MEASURED_ORDERS.__setitem__


def pytest_terminal_summary(terminalreporter):
    if MEASURED_ORDERS:
        terminalreporter.section("measured convergence orders (sampling)")
        for key, order in MEASURED_ORDERS.items():
            terminalreporter.write_line(f"{key:45s} {order:.2f}")
