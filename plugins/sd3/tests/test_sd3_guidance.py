"""Guidance on the SD3 bundle through the core's chain: CFG, skip-layer guidance, PAG and NAG-PAG
by their registered names (diffusers' layer aliases), and the guidance conformance check."""

import pytest
import torch

import diffcore_sd3.plugin as sd3_plugin
from diffcore.api import CFG, ConfigError, FlowConfig, GenerationRequest, euler, flow_schedule, registry, sample, structure
from diffcore.testing import plugins_for_test
from diffcore.testing.conformance import check_guidance_processor
from diffcore_sd3.bundle import SD3Bundle
from diffcore_sd3.guidance import SkipLayerGuidance
from diffcore_sd3.model import MMDiT
from diffcore_sd3.params import VARIANTS


@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(0)
    network = MMDiT(VARIANTS["tiny"]).eval()
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return SD3Bundle(network=network, default_size=64)


def request(batch=1):
    g = torch.Generator().manual_seed(5)
    embeddings = {key: {"context": torch.randn(batch, 9, 48, generator=g), "y": torch.randn(batch, 40, generator=g)}
                  for key in ("cond", "uncond")}
    return GenerationRequest(batch=batch, embeddings=embeddings)


def processor(name: str, **fields):
    """A guidance processor built by its registered name, as a job file's [[guidance]] table does."""
    pytest.importorskip("diffcore_guidance")
    with plugins_for_test(sd3_plugin):
        comp = registry("guidance").get(name)
        return comp.factory(structure(fields, comp.config))


@torch.no_grad()
def run(bundle, chain):
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    return sample(bundle, noise, bundle.conditions(request()), flow_schedule(FlowConfig(shift=3.0, train_steps=1000)).sigmas(4), euler,
                  chain, disable=True)


def test_guidance_chains_run_and_differ(bundle):
    """CFG alone, + SLG, + PAG, + NAG-PAG (on transformer_blocks.1.attn): all finite, each changes
    the result; SLG and NAG-PAG come from their registered names as in a job file."""
    base = run(bundle, [CFG(scale=4.5)])
    chains = {
        "slg": [CFG(scale=4.5), processor("slg", layers=[1], start=0.0, stop=1.0)],
        "pag": [CFG(scale=4.5), processor("pag", layers=["transformer_blocks.1.attn"])],
        "nag-pag": [CFG(scale=4.5), processor("nag-pag", layers=["transformer_blocks.1.attn",
                                                                 "transformer_blocks.0.attn2"])],
    }
    for name, chain in chains.items():
        out = run(bundle, chain)
        assert torch.isfinite(out).all(), name
        assert (out - base).abs().max() > 1e-3, f"{name} changed nothing"


def test_slg_conformance(bundle):
    check_guidance_processor(SkipLayerGuidance(layers=(1,), start=0.0, stop=0.5), bundle, request(2))


def test_slg_config_errors():
    from diffcore_sd3.plugin import SLGConfig

    with pytest.raises(ValueError):
        SLGConfig(layers=[-1])
    with pytest.raises(ValueError):
        SLGConfig(stop=1.5)


def test_bundle_input_errors(bundle):
    with pytest.raises(ConfigError, match="multiples of 16 pixels"):
        bundle.latent_shape(GenerationRequest(batch=1, height=100, width=64))
    with pytest.raises(ConfigError, match="give a prompt"):
        bundle.conditions(GenerationRequest(batch=1))
    with pytest.raises(ConfigError, match="no text encoders"):
        bundle.conditions(GenerationRequest(batch=1, prompts=["a cat"]))
    assert bundle.latent_shape(GenerationRequest(batch=1)) == (16, 8, 8)
