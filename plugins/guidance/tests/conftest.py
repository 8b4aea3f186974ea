import sys
from pathlib import Path

import pytest
import torch

# guidance_helpers.py beside these tests imports by plain name (importlib import mode)
sys.path.insert(0, str(Path(__file__).parent))

from guidance_helpers import labels_request, tiny_dit  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors on a shared CPU: intra-op threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dit():
    return tiny_dit()


@pytest.fixture
def req():
    return labels_request()
