"""Objectives and timestep sampling (diffcore.training.objectives, the ``full`` trainer)."""

from __future__ import annotations

import math

import pytest
import torch

from diffcore.sampling.denoisers import make_denoiser
from diffcore.sampling.schedules import ddpm_sigma_table
from diffcore.training.objectives import TimestepSampler, diffusion_loss, noisy_inputs
from training_standins import TinyBundle, TinyNet, full_trainer, tiny_bundle


def _pair(shape=(6, 1, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_flow_path_and_target():
    x0, noise = _pair()
    sigma = torch.linspace(0, 1, 6)
    x, time, target = noisy_inputs("flow", x0, noise, sigma)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(x, (1 - s) * x0 + s * noise, rtol=0, atol=0)
    torch.testing.assert_close(target, noise - x0, rtol=0, atol=0)
    torch.testing.assert_close(time, sigma, rtol=0, atol=0)
    # the convention x_t = (1 - t) noise + t data is the same point with sigma = 1 - t
    t = 1 - s
    torch.testing.assert_close(x, (1 - t) * noise + t * x0)


@pytest.mark.parametrize("kind", ["flow", "epsilon", "v"])
def test_targets_agree_with_the_sampling_denoiser(kind):
    """Fed the exact training target, the engine's denoiser recovers x0: the objective and the
    sampler read the network's output the same way (input scaling, time, sign)."""
    x0, noise = _pair()
    table = None if kind == "flow" else ddpm_sigma_table()
    u = torch.tensor([0.02, 0.1, 0.35, 0.6, 0.9, 0.9999])
    x_in, time, target = noisy_inputs(kind, x0, noise, u, sigma_table=table)
    if kind == "flow":
        sigma, x_sigma = u, x_in
    else:
        t = (u.double() * 1000).long()
        assert torch.equal(time, t.float())
        sigma = table[t].float()
        abar = (1 / (table[t] ** 2 + 1)).view(-1, 1, 1, 1)
        torch.testing.assert_close(x_in, (abar.sqrt() * x0 + (1 - abar).sqrt() * noise).float())  # DDPM's x_t
        x_sigma = x0 + sigma.view(-1, 1, 1, 1) * noise                                          # x0 + sigma noise
    calls = []

    class Oracle(TinyBundle):
        def forward(self, x, time_, y=None):
            calls.append((x, time_))
            return target

    bundle = Oracle(network=TinyNet(), prediction_type=kind, sigma_table=table)
    torch.testing.assert_close(make_denoiser(bundle)(x_sigma, sigma), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(calls[0][0], x_in)                     # the same network input
    torch.testing.assert_close(calls[0][1].float(), time, atol=1e-3, rtol=0)   # the same time


def test_loss_is_the_mse_to_the_target_with_draws_from_the_generator():
    seen = {}

    class Zero(TinyBundle):
        def forward(self, x, sigma, y=None):
            seen["x"], seen["sigma"] = x, sigma
            return torch.zeros_like(x)

    bundle = Zero(network=TinyNet())
    x0, _ = _pair()
    loss = diffusion_loss(bundle, x0, {}, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.rand(6, generator=g)
    torch.testing.assert_close(seen["sigma"], sigma, rtol=0, atol=0)
    torch.testing.assert_close(seen["x"], (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(loss, ((noise - x0) ** 2).mean())


def test_timestep_samplers_distributions():
    n = 20000
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    uniform = TimestepSampler("uniform")(n, g())
    assert abs(uniform.mean().item() - 0.5) < 0.01 and abs(uniform.var().item() - 1 / 12) < 0.005
    logit = TimestepSampler("logit-normal", logit_mean=0.5, logit_std=1.0)(n, g())
    assert abs(logit.median().item() - 1 / (1 + math.exp(-0.5))) < 0.01
    assert ((logit > 0) & (logit < 1)).all()
    shifted = TimestepSampler("shifted", shift=3.0)(n, g())
    torch.testing.assert_close(shifted, 3 * uniform / (1 + 2 * uniform))  # the same uniform draws, shifted
    assert abs(shifted.median().item() - 0.75) < 0.01                     # 3 * 0.5 / (1 + 2 * 0.5)
    # reproducible from the generator alone, different for another seed
    assert torch.equal(TimestepSampler("logit-normal")(64, g()), TimestepSampler("logit-normal")(64, g()))
    assert not torch.equal(uniform[:64], TimestepSampler("uniform")(64, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        TimestepSampler("cubic")(4, g())


def test_full_trainer_drops_labels_and_trains_everything():
    bundle = tiny_bundle()
    bundle.network.requires_grad_(False)
    trainer = full_trainer(bundle, cond_dropout=0.5, timestep_sampling="logit-normal")
    assert len(trainer.trainable_parameters()) == len(list(bundle.network.parameters()))
    labels = torch.zeros(1000, dtype=torch.long)
    dropped = trainer.config.cond_dropout
    y = bundle.training_inputs({"label": labels}, dropout=dropped, generator=torch.Generator().manual_seed(0))["y"]
    assert 0.45 < (y == 3).float().mean().item() < 0.55
    batch = {"image": torch.rand(4, 1, 4, 4) * 2 - 1, "label": torch.arange(4) % 3}
    a = trainer.loss(bundle, batch, torch.Generator().manual_seed(5))
    b = trainer.loss(bundle, batch, torch.Generator().manual_seed(5))
    assert a.ndim == 0 and torch.equal(a, b)
    a.backward()
    assert all(p.grad is not None for p in trainer.trainable_parameters())
