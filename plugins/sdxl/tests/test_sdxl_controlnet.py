"""SDXL ControlNets against diffusers' ControlNetModel + UNet2DConditionModel on tiny random weights."""

import pytest
import torch

from diffcore.api import CheckpointError, save_file_atomic
from diffcore_sdxl.controlnet import ControlNetParams, SDXLControlNet, load_controlnet, to_ours
from diffcore_sdxl.convert import diffusers_to_stability
from diffcore_sdxl.model import VARIANTS, UNet, label_vector

TOL = 1e-5
HINT = (16, 32)   # a 2x hint encoder: the tiny test latents are 8 x 8, the control image 16 x 16


def randomize(model, seed, std=0.1):
    """Random weights everywhere (norm scales near 1), the zero convs included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            unit = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if unit else 0.0))
    return model.eval()


def pair(diffusers_unet, seed=0):
    from diffusers import ControlNetModel

    unet = diffusers_unet("tiny", seed=seed)
    control = randomize(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT), seed + 1)
    ours_unet = UNet(VARIANTS["tiny"]).eval()
    ours_unet.load_state_dict(diffusers_to_stability(dict(unet.state_dict())), strict=True)
    ours = SDXLControlNet(ControlNetParams(VARIANTS["tiny"], hint_widths=HINT)).eval()
    ours.load_state_dict(to_ours(dict(control.state_dict())), strict=True)
    return unet, control, ours_unet, ours


@pytest.mark.usefixtures("reference_matmuls")
@torch.no_grad()
def test_parity_with_diffusers(diffusers_unet, unet_inputs):
    """Each down residual, the mid residual and the UNet's output with them, at conditioning scale 0.8."""
    unet, control, ours_unet, ours = pair(diffusers_unet)
    params = VARIANTS["tiny"]
    x, t, context, pooled, time_ids = unet_inputs(params)
    cond = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    added = {"text_embeds": pooled, "time_ids": time_ids}
    down, mid = control(x, t, encoder_hidden_states=context, controlnet_cond=cond, conditioning_scale=0.8,
                        added_cond_kwargs=added, return_dict=False)
    expected = unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added,
                    down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    y = label_vector(pooled, time_ids, params.time_embed_scalar_dim)
    got_down, got_mid = ours(x, t, context, y, cond, scale=0.8)
    assert len(got_down) == len(down) == 9
    for a, b in zip(got_down, down):
        assert (a - b).abs().max().item() <= TOL
    assert (got_mid - mid).abs().max().item() <= TOL
    got = ours_unet(x, t, context, y, down_residuals=got_down, mid_residual=got_mid)
    err = (got - expected).abs().max().item()
    assert err <= TOL, f"max abs err {err:.3g}"
    assert (got - ours_unet(x, t, context, y)).abs().max() > 1e-2   # the control matters


def test_fresh_controlnet_is_a_no_op(unet_inputs):
    """Zero convs: a new ControlNet adds nothing (where ControlNet training starts)."""
    params = VARIANTS["tiny"]
    net = SDXLControlNet(ControlNetParams(params, hint_widths=HINT))
    x, t, context, pooled, time_ids = unet_inputs(params)
    with torch.no_grad():
        down, mid = net(x, t, context, label_vector(pooled, time_ids, params.time_embed_scalar_dim),
                        torch.rand(2, 3, 16, 16))
    assert all(torch.equal(r, torch.zeros_like(r)) for r in [*down, mid])


def test_loading_files_and_errors(diffusers_unet, tmp_path):
    """A diffusers folder and an SGM-keyed file load with the sizes read back; a FLUX.1
    ControlNet, a UNet and a ControlNet of another width are one-line errors naming the file."""
    import attrs

    unet, control, _, ours = pair(diffusers_unet)
    control.save_pretrained(tmp_path / "diffusers")
    net = load_controlnet(tmp_path / "diffusers", VARIANTS["tiny"])
    assert net.params == ControlNetParams(VARIANTS["tiny"], hint_widths=HINT)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in ours.state_dict().items())
    save_file_atomic({k: v.contiguous() for k, v in control.state_dict().items()}, tmp_path / "diffusers.safetensors")
    assert load_controlnet(tmp_path / "diffusers.safetensors", VARIANTS["tiny"]).params == net.params
    save_file_atomic(dict(ours.state_dict()), tmp_path / "sgm.safetensors")
    assert load_controlnet(tmp_path / "sgm.safetensors", VARIANTS["tiny"]).params == net.params

    save_file_atomic({"controlnet_blocks.0.weight": torch.zeros(2, 2)}, tmp_path / "flux.safetensors")
    with pytest.raises(CheckpointError, match=r"flux\.safetensors: not an SDXL ControlNet.*FLUX.1"):
        load_controlnet(tmp_path / "flux.safetensors", VARIANTS["tiny"])
    save_file_atomic({k: v.contiguous() for k, v in unet.state_dict().items()}, tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError, match="not an SDXL ControlNet"):
        load_controlnet(tmp_path / "unet.safetensors", VARIANTS["tiny"])
    wide = attrs.evolve(VARIANTS["tiny"], model_channels=64)
    with pytest.raises(CheckpointError, match="does not fit the SDXL UNet: model_channels 32"):
        load_controlnet(tmp_path / "diffusers", wide)


@pytest.mark.usefixtures("reference_matmuls")
@pytest.mark.parametrize("scale, start, end", [(0.8, 0.0, 1.0), (1.5, 0.25, 0.75)], ids=["whole", "window"])
@torch.no_grad()
def test_controlled_run_matches_pipeline(tiny_pipelines, tmp_path, scale, start, end):
    """4 steps with CFG 5 against StableDiffusionXLControlNetPipeline: the same prompts, starting
    latents (x0 with zero noise: exactly diffusers' x, as in test_sdxl_sampling), control image,
    conditioning scale and start / end (the steps told by the schedule's timesteps)."""
    import numpy as np
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    from PIL import Image

    from diffcore.api import CFG, Control, GenerationRequest, euler, load_image, sample
    from diffcore_sdxl.bundle import SDXLBundle
    from diffcore_sdxl.load import load_unet
    from diffcore_sdxl.text import SDXLText

    folder, base = tiny_pipelines["base"]
    net = randomize(ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=HINT), 9, std=0.05)
    net.save_pretrained(tmp_path / "controlnet")
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    pipe = StableDiffusionXLControlNetPipeline(**{k: v for k, v in base.components.items()
                                                  if k not in ("image_encoder", "feature_extractor")}, controlnet=net)
    pipe.scheduler.set_timesteps(4)
    sigmas = pipe.scheduler.sigmas.clone()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a red cat", "two dogs on a beach"]
    expected = pipe(prompt=prompts, image=Image.open(tmp_path / "c.png"), num_inference_steps=4, guidance_scale=5.0,
                    height=16, width=16, controlnet_conditioning_scale=scale, control_guidance_start=start,
                    control_guidance_end=end, output_type="latent",
                    latents=latents).images

    bundle = SDXLBundle(network=load_unet(folder), text=SDXLText.from_folder(folder), latent_scale=2)
    control = Control(path=str(tmp_path / "controlnet"), image=load_image(tmp_path / "c.png"), scale=scale,
                      start=start, end=end)
    x = latents * pipe.scheduler.init_noise_sigma

    def run(controls):
        request = GenerationRequest(batch=2, prompts=prompts, height=16, width=16, controls=controls)
        conditions = bundle.schedule_conditions(bundle.conditions(request), pipe.scheduler.timesteps.float())
        return sample(bundle, torch.zeros_like(x), conditions, sigmas, euler, guidance=[CFG(scale=5.0)], disable=True,
                      x0=x)

    got = run([control])
    err = (got - expected).abs().max().item()
    assert expected.abs().max() > 0.1 and err <= TOL, f"max abs err {err:.3g}"
    assert (run([]) - got).abs().max() > 1e-3   # the ControlNet changed the result


def test_from_unet_copies_the_down_path(diffusers_unet):
    """The training start, as diffusers' ControlNetModel.from_unet: the UNet's embeddings, down path
    and middle block, zero convs; only the hint encoder's first convs are freshly drawn."""
    from diffusers import ControlNetModel

    unet, _, ours_unet, _ = pair(diffusers_unet)
    theirs = to_ours(dict(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT).state_dict()))
    ours = SDXLControlNet.from_unet(ours_unet, hint_widths=HINT).state_dict()
    assert ours.keys() == theirs.keys()
    fresh = [k for k in ours if k.startswith("input_hint_block.") and not k.startswith(f"input_hint_block.{4 * len(HINT) - 2}.")]
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k not in fresh)


@pytest.mark.usefixtures("reference_matmuls")
@torch.no_grad()
def test_two_controlnets_sum_as_diffusers_multi(diffusers_unet, unet_inputs):
    """Two ControlNets at different scales: their residuals summed, as MultiControlNetModel does."""
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    from diffcore.api import Control
    from diffcore_sdxl.controlnet import SDXLControl, residuals

    unet, a, ours_unet, ours_a = pair(diffusers_unet, seed=0)
    _, b, _, ours_b = pair(diffusers_unet, seed=4)
    params = VARIANTS["tiny"]
    x, t, context, pooled, time_ids = unet_inputs(params)
    g = torch.Generator().manual_seed(8)
    ca, cb = torch.rand(1, 3, 16, 16, generator=g), torch.rand(1, 3, 16, 16, generator=g)
    added = {"text_embeds": pooled, "time_ids": time_ids}
    down, mid = MultiControlNetModel([a, b])(x, t, encoder_hidden_states=context, controlnet_cond=[
        ca.expand(2, -1, -1, -1), cb.expand(2, -1, -1, -1)], conditioning_scale=[0.6, 1.1], added_cond_kwargs=added,
        return_dict=False)
    expected = unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added,
                    down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    controls = [SDXLControl(ours_a, ca, Control(path="a", image=ca[0], scale=0.6)),
                SDXLControl(ours_b, cb, Control(path="b", image=cb[0], scale=1.1))]
    y = label_vector(pooled, time_ids, params.time_embed_scalar_dim)
    got = ours_unet(x, t, context, y, **residuals(controls, x, t, context, y))
    assert (got - expected).abs().max().item() <= TOL


def test_control_errors(tiny_pipelines, tmp_path):
    """Through the bundle's conditions: a FLUX.1 ControlNet file, a control image of another aspect
    ratio, and a mode for a ControlNet that has none are each a ConfigError naming the table."""
    from diffcore.api import ConfigError, Control, GenerationRequest
    from diffcore_sdxl.bundle import SDXLBundle
    from diffcore_sdxl.load import load_unet
    from diffcore_sdxl.text import SDXLText

    folder, _ = tiny_pipelines["base"]
    bundle = SDXLBundle(network=load_unet(folder), text=SDXLText.from_folder(folder), latent_scale=2)
    net = SDXLControlNet(ControlNetParams(VARIANTS["tiny"], hint_widths=HINT))
    save_file_atomic(dict(net.state_dict()), tmp_path / "cn.safetensors")
    save_file_atomic({"controlnet_blocks.0.weight": torch.zeros(2, 2)}, tmp_path / "flux.safetensors")

    def request(**control):
        control = {"path": str(tmp_path / "cn.safetensors"), "image": torch.zeros(3, 16, 16), **control}
        return GenerationRequest(batch=1, prompts=["a cat"], height=16, width=16, controls=[Control(**control)])

    assert bundle.conditions(request())["cond"]["control"][0].net.params.hint_widths == HINT
    with pytest.raises(ConfigError, match=r"control\[0\]\.path.*flux\.safetensors: not an SDXL ControlNet"):
        bundle.conditions(request(path=str(tmp_path / "flux.safetensors")))
    with pytest.raises(ConfigError, match=r"control\[0\]\.image.*16x8 pixels and the output 16x16"):
        bundle.conditions(request(image=torch.zeros(3, 8, 16)))
    with pytest.raises(ConfigError, match=r"control\[0\]\.image.*expected an RGB image"):
        bundle.conditions(request(image=torch.zeros(1, 16, 16)))
    with pytest.raises(ConfigError, match=r"control\[0\]\.mode"):
        bundle.conditions(request(mode=1))
