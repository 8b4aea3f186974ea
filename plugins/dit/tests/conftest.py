import pytest
import torch

from diffcore_dit.params import DiTParams


@pytest.fixture
def tiny() -> DiTParams:
    return DiTParams(hidden=32, depth=2, heads=4, patch=2, in_channels=3, image_size=8, num_classes=5)


@pytest.fixture(scope="session")
def randomize():
    """Replace the zero init by random weights, so outputs (and their differences) are nonzero."""

    def apply(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        return model

    return apply
