"""The memory check before training: the estimate's parts, and a clear error when it cannot fit."""

import pytest
import torch
from torch import nn

from diffcore.errors import ConfigError
from diffcore.training.memory import GiB, check_fits, training_bytes
from diffcore.training.optim import build_optimizer


def test_estimate_counts_weights_gradients_optimizer_and_ema():
    net = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 10).to(torch.bfloat16))
    net[1].requires_grad_(False)
    trainable = [p for p in net.parameters() if p.requires_grad]
    n = 100 * 100 + 100
    need = training_bytes(net, trainable, "adamw")
    assert need == {"weights": n * 4 + (1000 + 10) * 2, "gradients": n * 4, "optimizer": n * 8, "ema": n * 4}
    assert training_bytes(net, trainable, "adamw8bit")["optimizer"] == n * 2


def test_a_run_that_cannot_fit_stops_with_the_figure():
    net = nn.Linear(1000, 1000)
    with pytest.raises(ConfigError, match=r"needs about 0\.0 GiB before activations .*gradients .* has 0\.0 GiB free"
                                          r".*lora"):
        check_fits(net, list(net.parameters()), "adamw", torch.device("cpu"), available=1000)
    assert check_fits(net, list(net.parameters()), "adamw", torch.device("cpu"), available=GiB)["ema"] == 1001000 * 4


def test_adamw8bit_without_bitsandbytes_or_cuda_is_a_clear_error():
    net = nn.Linear(4, 4)
    with pytest.raises(ConfigError, match="adamw8bit"):
        build_optimizer(net, net.parameters(), "adamw8bit", lr=1e-3, weight_decay=0.0)
