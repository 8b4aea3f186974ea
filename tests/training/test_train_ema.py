"""EMA of the weights (diffcore.training.ema) against a hand computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffcore.errors import CheckpointError
from diffcore.training.ema import EMA


def _scalar_module(value: float) -> nn.Module:
    m = nn.Module()
    m.w = nn.Parameter(torch.tensor([value]))
    m.frozen = nn.Parameter(torch.tensor([5.0]), requires_grad=False)
    return m


def test_warmup_decay_by_hand():
    m = _scalar_module(1.0)
    ema = EMA(m, decay=0.9, warmup=True)
    assert "frozen" not in ema.shadow
    # d_n = min(0.9, (1 + n) / (10 + n)): 0.1, 2/11, 0.25, 4/13, ...; shadow = d * shadow + (1 - d) * w
    expected = 1.0
    for n, w in enumerate([2.0, 3.0, -1.0, 0.5]):
        with torch.no_grad():
            m.w.fill_(w)
        ema.update(m)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * w
        assert ema.decay_at(n) == d
        assert ema.shadow["w"].item() == pytest.approx(expected, rel=1e-6)
    assert ema.decay_at(1000) == 0.9  # the warm-up has reached the configured decay
    assert ema.num_updates == 4


def test_constant_decay_by_hand():
    m = _scalar_module(1.0)
    ema = EMA(m, decay=0.5, warmup=False)
    for w in (3.0, 3.0):
        with torch.no_grad():
            m.w.fill_(w)
        ema.update(m)
    assert ema.shadow["w"].item() == pytest.approx(0.5 * (0.5 * 1 + 0.5 * 3) + 0.5 * 3)  # 2.5


def test_applied_swaps_in_and_restores_exactly():
    torch.manual_seed(0)
    net = nn.Linear(3, 3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ema = EMA(net, decay=0.9)
    with torch.no_grad():
        net.weight.add_(torch.randn(3, 3))
    trained = {k: v.clone() for k, v in net.state_dict().items()}
    with ema.applied(net) as inside:
        assert inside is net
        assert torch.equal(net.weight, before["weight"])
    for k, v in net.state_dict().items():
        assert torch.equal(v, trained[k])


def test_state_round_trip_and_mismatch():
    net = nn.Linear(2, 2)
    ema = EMA(net, decay=0.99)
    ema.update(net)
    other = EMA(nn.Linear(2, 2), decay=0.99)
    other.load_state_dict(ema.state_dict(), ema.counters())
    assert other.num_updates == 1
    assert all(torch.equal(other.shadow[k], ema.shadow[k]) for k in ema.shadow)
    with pytest.raises(CheckpointError, match="missing"):
        other.load_state_dict({"weight": ema.shadow["weight"]})
    with pytest.raises(ValueError, match="decay"):
        EMA(net, decay=1.0)
