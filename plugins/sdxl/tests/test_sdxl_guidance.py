"""CFG, PAG, NAG and NAG-PAG from the guidance plugin on a tiny SDXL (diffusers-style layer names)."""

import pytest
import torch

from diffcore.api import CFG, GenerationRequest, build_schedule, euler, sample
from diffcore.testing.conformance import check_guidance_processor
from diffcore_guidance.attention import NAG, NAGPAG, PAG
from diffcore_sdxl.bundle import SDXLBundle
from diffcore_sdxl.load import load_unet
from diffcore_sdxl.text import SDXLText

REQUEST = GenerationRequest(batch=2, prompts=["a red cat", "a dog"], negative_prompts=["blurry", ""],
                            height=16, width=16)


@pytest.fixture(scope="module")
def bundle(tiny_pipelines):
    folder = tiny_pipelines["base"][0]
    return SDXLBundle(network=load_unet(folder), text=SDXLText.from_folder(folder), latent_scale=2)


@pytest.fixture(scope="module")
def plain(bundle):
    return run(bundle, [])


def run(bundle, guidance):
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return sample(bundle, noise, bundle.conditions(REQUEST), build_schedule(bundle).sigmas(3), euler,
                      guidance=guidance, disable=True)


@pytest.mark.parametrize("processor", [
    CFG(scale=5.0),
    PAG(scale=3.0, layers=("mid_block.attentions.0",)),
    NAG(scale=5.0, tau=2.5, alpha=0.5, layers=("down_blocks.2.attentions.1.transformer_blocks.0.attn2",)),
    NAGPAG(scale=3.0, layers=("up_blocks.0.attentions.1",)),
], ids=["cfg", "pag", "nag", "nag-pag"])
def test_processor_conformance_and_effect(bundle, plain, processor):
    check_guidance_processor(processor, bundle, REQUEST, num_steps=3)
    guided = run(bundle, [processor])
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-3   # it does something


def test_pag_scale_zero_and_unknown_layer(bundle, plain):
    """PAG at scale 0 changes nothing; a transformer the UNet does not have is an error naming it."""
    assert torch.equal(run(bundle, [PAG(scale=0.0, layers=("mid_block.attentions.0",))]), plain)
    with pytest.raises(Exception, match="unknown attention layer"):
        run(bundle, [PAG(scale=3.0, layers=("down_blocks.0.attentions.0",))])   # level 0 has no attention
