"""Offload's bookkeeping (its device moves are exercised on FLUX.1 in the plugin's tests)."""

import pytest
import torch
from torch import nn

from diffcore.api import Offload


def test_model_mode_keeps_one_component_active_and_ignores_unknown_names():
    offload = Offload("model", "cpu")
    assert offload.storage == torch.device("cpu")
    a, b = offload.add("a", nn.Linear(2, 2)), offload.add("b", nn.Linear(2, 2))
    assert offload.components == {"a": a, "b": b} and offload.active is None
    offload.use("b")
    assert offload.active == "b"
    offload.use("text")  # never registered: nothing moves
    assert offload.active == "b"
    none = Offload("none", "meta")
    assert none.storage == torch.device("meta")
    none.use("b")
    assert none.active is None  # "none" never moves anything
    with pytest.raises(ValueError, match="offload must be one of none, model, sequential, got 'all'"):
        Offload("all")
