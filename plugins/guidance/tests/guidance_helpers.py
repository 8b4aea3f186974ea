"""Shared by the guidance plugin's tests: a tiny DiT with random weights, a forward counter, a sampler run."""

import torch

from diffcore.api import GenerationRequest, registry, sample

TINY = {"hidden": 32, "depth": 2, "heads": 4, "image_size": 8, "in_channels": 1, "num_classes": 5}
LAYERS = ("blocks.0.attn", "blocks.1.attn")


def randomize(network: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """DiT starts with zero outputs (adaLN-Zero); random weights make every difference visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return network.eval()


def tiny_dit(seed: int = 0):
    comp = registry("models").get("dit")
    bundle = comp.build(comp.config(**TINY))
    randomize(bundle.network, seed)
    return bundle


def labels_request(batch: int = 2) -> GenerationRequest:
    return GenerationRequest(batch=batch, labels=torch.arange(1, 1 + 2 * batch, 2) % TINY["num_classes"])


class ForwardCounter:
    """Counts the network's forward calls and their batch sizes."""

    def __init__(self, network: torch.nn.Module):
        self.network = network
        self.batches: list[int] = []

    def __enter__(self):
        self.handle = self.network.register_forward_pre_hook(
            lambda module, args: self.batches.append(args[0].shape[0]))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def run(bundle, guidance, request, steps: int = 4, seed: int = 0, sampler: str = "euler", grad: bool = False):
    """Sample ``request`` from fixed noise over a linear flow schedule."""
    conditions = bundle.conditions(request)
    noise = torch.randn((request.batch, *bundle.latent_shape(request)), generator=torch.Generator().manual_seed(seed))
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.set_grad_enabled(grad):
        return sample(bundle, noise, conditions, sigmas, registry("samplers").get(sampler).build(),
                      guidance=list(guidance), disable=True)
