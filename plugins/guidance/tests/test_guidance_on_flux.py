"""Every guidance method of this plugin on the FLUX families: tiny random FLUX.1 and FLUX.2
bundles, built from the transformer alone with precomputed text embeddings (no encoders, no
autoencoder), so the whole file runs in seconds. Layers are named the diffusers way
(``transformer_blocks.0.attn``, ``single_transformer_blocks.1``), which each family maps to its own
``double_blocks.N`` / ``single_blocks.N``."""

import pytest
import torch
from guidance_helpers import ForwardCounter

from diffcore.api import ConfigError, GenerationRequest, registry, sample
from diffcore.testing.conformance import check_guidance_processor
from diffcore_guidance.attention import NAG, NAGPAG, PAG
from diffcore_guidance.learned import LearnedGuidance
from diffcore_guidance.models import (create_attention_guidance_model, create_conv_guidance_model,
                                      create_mlp_guidance_model)
from diffcore_guidance.prediction import APG, CFGZeroStar
from diffcore_guidance.rewards import mean_target
from diffcore_guidance.training import GuidanceModelTrainer
from diffcore_guidance.trajectories import collect_trajectories

TXT_LEN, TXT_DIM, VEC_DIM = 5, 48, 32     # the tiny variants' text widths (T5-like tokens, pooled CLIP)
SIZE = 64                                  # pixels: a 4 x 4 token grid at 16 pixels a token
BOTH = ("transformer_blocks.0.attn", "single_transformer_blocks.1")


def randomize(network: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights, the RMSNorm scales around 1 (at 0 attention would be uniform and PAG's
    identity map would change little)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith("norm.scale") else 0.0))
    return network.eval()


def flux1_bundle():
    from diffcore_flux1.bundle import FluxBundle
    from diffcore_flux1.model import VARIANTS, Flux

    return FluxBundle(network=randomize(Flux(VARIANTS["tiny"]), seed=0), default_schedule={"name": "flux"})


def flux2_bundle():
    from diffcore_flux2.bundle import Flux2Bundle
    from diffcore_flux2.model import VARIANTS, Flux2

    return Flux2Bundle(network=randomize(Flux2(VARIANTS["tiny"]), seed=1))


def embeddings(family: str, batch: int = 2) -> dict[str, dict[str, torch.Tensor]]:
    """``request.embeddings``: a prompt's and a negative prompt's, as the bundles accept them."""
    g = torch.Generator().manual_seed(2)
    out = {key: {"txt": torch.randn(batch, TXT_LEN, TXT_DIM, generator=g)} for key in ("cond", "uncond")}
    if family == "flux1":
        for key in ("cond", "uncond"):
            out[key]["vec"] = torch.randn(batch, VEC_DIM, generator=g)
    return out


@pytest.fixture(scope="module", params=["flux1", "flux2"])
def family(request):
    bundle = flux1_bundle() if request.param == "flux1" else flux2_bundle()
    req = GenerationRequest(batch=2, height=SIZE, width=SIZE, embeddings=embeddings(request.param))
    return request.param, bundle, req


def run(bundle, guidance, request, steps: int = 4):
    noise = torch.randn((request.batch, *bundle.latent_shape(request)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return sample(bundle, noise, bundle.conditions(request), torch.linspace(1.0, 0.0, steps + 1),
                      registry("samplers").get("euler").build(), guidance=list(guidance), disable=True)


def cfg(scale):
    comp = registry("guidance").get("cfg")
    return comp.factory(comp.config(scale=scale))


def guidance_models(family: str) -> dict[str, torch.nn.Module]:
    """The three learned guidance models, sized for the family's latents and text: FLUX latents
    are (B, C, h, w) with one transformer token per position (C = 64 for FLUX.1, 16 for the tiny
    FLUX.2); FLUX.1 has a pooled vector, FLUX.2 text tokens only."""
    channels = 64 if family == "flux1" else 16
    cond = {"txt_dim": TXT_DIM, "vec_dim": VEC_DIM if family == "flux1" else 0}
    return {"mlp": create_mlp_guidance_model(channels, hidden_dim=32, num_layers=2, **cond),
            "attention": create_attention_guidance_model(channels, hidden_dim=32, num_heads=2, num_layers=1, **cond),
            "conv": create_conv_guidance_model(channels, hidden_channels=16, num_blocks=1, **cond)}


def test_prompt_and_negative_prompt_share_one_forward(family):
    """What CFG, APG, PAG and NAG count on: both branches batch into one forward, row for row
    equal to two forwards (the bundles have no autoencoder, so check_model_family does not apply)."""
    _, bundle, req = family
    conditions = bundle.conditions(req)
    assert set(conditions) == {"cond", "uncond"}
    x = torch.randn(2, *bundle.latent_shape(req), generator=torch.Generator().manual_seed(1))
    sigma = torch.full((2,), 0.6)
    both = {k: torch.cat([v, conditions["uncond"][k]]) for k, v in conditions["cond"].items()}
    with torch.no_grad():
        apart = [bundle.forward(x, sigma, **conditions[key]) for key in ("cond", "uncond")]
        batched = bundle.forward(torch.cat([x, x]), torch.cat([sigma, sigma]), **both)
    torch.testing.assert_close(batched, torch.cat(apart), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(*apart)


@pytest.mark.parametrize("name", ["cfg", "apg", "cfg-zero-star", "pag", "nag", "nag-pag"])
def test_conformance(family, name):
    _, bundle, req = family
    processor = {"cfg": cfg(3.0), "apg": APG(scale=4.0), "cfg-zero-star": CFGZeroStar(scale=4.0),
                 "pag": PAG(scale=2.0, layers=["transformer_blocks.1.attn"]),
                 "nag": NAG(layers=["transformer_blocks.0.attn"]), "nag-pag": NAGPAG(layers=BOTH)}[name]
    check_guidance_processor(processor, bundle, req, num_steps=4)
    assert not torch.allclose(run(bundle, [processor], req), run(bundle, [], req))


def test_apg_reduces_to_cfg(family):
    """eta = 1, no rescaling and no momentum, on the raw output: the paper's CFG special case."""
    _, bundle, req = family
    as_cfg = APG(scale=3.0, eta=1.0, norm_threshold=0.0, momentum=0.0, space="raw")
    torch.testing.assert_close(run(bundle, [as_cfg], req), run(bundle, [cfg(3.0)], req), rtol=1e-5, atol=1e-5)


def test_pag_runs_one_batched_extra_pass(family):
    _, bundle, req = family
    with ForwardCounter(bundle.network) as counter:
        run(bundle, [PAG(layers=["transformer_blocks.1.attn"])], req)
    assert counter.batches == [4] * 4                       # cond + perturbed cond, one forward a step
    with ForwardCounter(bundle.network) as counter:
        run(bundle, [cfg(3.0), PAG(layers=["single_transformer_blocks.0"])], req)
    assert counter.batches == [6] * 4                       # cond, uncond, perturbed


def test_nag_pag_costs_no_forward_and_aliases_name_the_same_layers(family):
    _, bundle, req = family
    with ForwardCounter(bundle.network) as counter:
        by_alias = run(bundle, [NAGPAG(scale=4.0, layers=BOTH)], req)
    assert counter.batches == [2] * 4                       # as many calls, of the same batch, as no guidance
    assert torch.equal(run(bundle, [NAGPAG(scale=4.0, layers=["double_blocks.0", "single_blocks.1"])], req), by_alias)
    assert torch.equal(run(bundle, [NAGPAG(scale=0.0, layers=BOTH)], req), run(bundle, [], req))
    with pytest.raises(ConfigError, match=r"this model has: double_blocks.0 .. double_blocks.1, "
                                          r"single_blocks.0 .. single_blocks.1"):
        run(bundle, [NAGPAG()], req, steps=1)               # FLUX.1 [dev]'s default layers: block 8 is not here


def test_nag_gives_the_negative_prompt_a_say_without_cfg(family):
    """cfg_scale = 1 (a guidance-distilled model): NAG alone steers away from the negative prompt."""
    _, bundle, req = family
    uncond = {**req.embeddings["uncond"], "txt": req.embeddings["uncond"]["txt"] + 1.0}
    other = GenerationRequest(batch=2, height=SIZE, width=SIZE, embeddings={**req.embeddings, "uncond": uncond})
    nag = NAG(layers=["*"])
    assert not torch.allclose(run(bundle, [nag], req), run(bundle, [nag], other))
    with ForwardCounter(bundle.network) as counter:
        run(bundle, [cfg(3.0), nag], req)
    assert counter.batches == [4] * 4                       # shares CFG's uncond branch


@pytest.mark.parametrize("kind", ["mlp", "attention", "conv"])
def test_untrained_learned_guidance_is_bit_identical(family, kind):
    name, bundle, req = family
    model = guidance_models(name)[kind]
    with ForwardCounter(bundle.network) as counter:
        guided = run(bundle, [LearnedGuidance(model=model, guidance_scale=2.0)], req)
    assert counter.batches == [2] * 4
    assert torch.equal(guided, run(bundle, [], req))


@pytest.mark.parametrize("kind", ["mlp", "attention", "conv"])
def test_learned_guidance_reads_the_text(family, kind):
    """With weights that are not zero the processor passes conformance, and the model gets the
    bundle's text tokens (and FLUX.1's pooled vector): hiding either changes the samples."""
    name, bundle, req = family
    model = randomize(guidance_models(name)[kind], seed=3)
    processor = LearnedGuidance(model=model, guidance_scale=0.5)
    check_guidance_processor(processor, bundle, req, num_steps=4)
    guided = run(bundle, [processor], req)
    for hidden in ({"txt_key": None}, {"vec_key": None}) if name == "flux1" else ({"txt_key": None},):
        blind = LearnedGuidance(model=model, guidance_scale=0.5, **hidden)
        assert not torch.allclose(run(bundle, [blind], req), guided), f"{hidden} changes nothing"


def test_a_guidance_model_trains_on_flux_trajectories(family):
    """The learned path end to end: record the base model's own sampling (text conditioning
    included), train from a reward on the predicted clean sample, sample with the result."""
    name, bundle, req = family
    sigmas = torch.linspace(1.0, 0.0, 4)
    data = collect_trajectories(bundle, [req], registry("samplers").get("euler").build(), sigmas, seed=0)
    assert len(data) == 2 * 3 and data.txt.shape == (6, TXT_LEN, TXT_DIM)
    assert (data.vec is not None) == (name == "flux1")
    torch.manual_seed(0)
    model = guidance_models(name)["conv"]
    trainer = GuidanceModelTrainer(model, lr=1e-2)
    reward = mean_target(0.5)
    rewards = []
    for _ in range(15):
        b = data.batch(torch.arange(len(data)))
        rewards.append(trainer.train_from_reward(b["img"], b["pred"], b["txt"], b["vec"], b["timestep"], b["step_idx"],
                                                 reward, to_denoised=data.to_denoised(b), cond=b["cond"])["avg_reward"])
    assert rewards[-1] > rewards[0] + 0.01
    model.eval()
    guided, plain = run(bundle, [LearnedGuidance(model=model)], req, 3), run(bundle, [], req, 3)
    assert reward(guided, {}).mean() > reward(plain, {}).mean()


def test_klein_kv_reference_cache_with_guidance():
    """FLUX.2 klein-9b-kv keeps one reference cache per conditioning: CFG works (cond and uncond
    hold different caches, so each runs its own forward); attention-level guidance stops with
    an error naming the cause: PAG's identity map cannot take the spliced reference keys, NAG
    needs both branches in one forward."""
    from diffcore.api import PluginError
    from diffcore_flux2.bundle import Flux2Bundle
    from diffcore_flux2.model import VARIANTS, Flux2
    from diffcore_flux2.vae import AE_VARIANTS, AutoEncoder

    bundle = Flux2Bundle(network=randomize(Flux2(VARIANTS["tiny-klein-kv"]), seed=3),
                         vae=AutoEncoder(AE_VARIANTS["tiny"]).eval(), reference_cache=True)
    reference = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(4)) * 2 - 1
    req = GenerationRequest(batch=1, height=SIZE, width=SIZE,
                            embeddings=embeddings("flux2", batch=1), reference_images=[reference])
    with ForwardCounter(bundle.network) as counter:
        guided = run(bundle, [cfg(3.0)], req, steps=3)
    assert counter.batches == [1, 1] * 3 and torch.isfinite(guided).all()
    assert not torch.allclose(guided, run(bundle, [], req, steps=3))
    with pytest.raises(PluginError, match="as many queries as values"):
        run(bundle, [PAG(layers=["transformer_blocks.1.attn"])], req, steps=3)
    with pytest.raises(PluginError, match="cannot be batched together"):
        run(bundle, [NAG(layers=["transformer_blocks.0.attn"])], req, steps=3)
