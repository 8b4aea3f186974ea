"""FLUX.1 ControlNets against diffusers' FluxControlNetModel + FluxTransformer2DModel on tiny random weights."""

import pytest
import torch

from diffcore.api import CheckpointError, GenerationRequest, save_file_atomic
from diffcore_flux1.controlnet import FluxControlNet, controlnet_params, load_controlnet, to_ours
from diffcore_flux1.convert import diffusers_to_bfl
from diffcore_flux1.model import VARIANTS, Flux

TOL = 1e-5
TINY_DIFFUSERS = dict(in_channels=64, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=48,
                      pooled_projection_dim=32, axes_dims_rope=(8, 12, 12))   # conftest's tiny FLUX.1
# a main transformer deeper than the ControlNet, so residuals are spread over several blocks:
# 3 double blocks / 2 samples -> interval 2; 5 single blocks / 2 samples -> interval 3
MAIN = {**TINY_DIFFUSERS, "num_layers": 3, "num_single_layers": 5, "guidance_embeds": True}
NET = {**TINY_DIFFUSERS, "num_layers": 2, "num_single_layers": 2, "guidance_embeds": True}


def randomize(model, seed, std=0.2):
    """Random weights everywhere (norm scales near 1), zero-initialised projections included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            unit = p.ndim == 1 and "norm" in name and "linear" not in name
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if unit else 0.0))
    return model.eval()


def diffusers_pair(seed=0, **net):
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    main = randomize(FluxTransformer2DModel(**MAIN), seed)
    control = randomize(FluxControlNetModel(**{**NET, **net}), seed + 1)
    return main, control


def ours_from(main, control):
    import attrs

    flux = Flux(attrs.evolve(VARIANTS["tiny"], depth=3, depth_single_blocks=5)).eval()
    flux.load_state_dict(diffusers_to_bfl(dict(main.state_dict())), strict=True)
    sd = {k: v for k, v in control.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    params = _params(shapes, flux.params)
    net = FluxControlNet(params).eval()
    net.load_state_dict(to_ours(sd), strict=True)
    return flux, net


def _params(shapes, base):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        file = Path(d) / "cn.safetensors"
        save_file_atomic({k: torch.zeros(s) for k, s in shapes.items()}, file)
        return controlnet_params(file, base)


def inputs(cond_pixels=False, batch=2, h=4, w=5):
    from diffcore_flux1.sampling import prepare_img_ids, prepare_txt_ids

    g = torch.Generator().manual_seed(3)
    cond = torch.randn(batch, 3, 16 * h, 16 * w, generator=g) if cond_pixels else torch.randn(batch, h * w, 64,
                                                                                                generator=g)
    return dict(img=torch.randn(batch, h * w, 64, generator=g), img_ids=prepare_img_ids(h, w)[0],
                txt=torch.randn(batch, 7, 48, generator=g), txt_ids=prepare_txt_ids(7)[0],
                y=torch.randn(batch, 32, generator=g), timesteps=torch.rand(batch, generator=g),
                guidance=torch.tensor([3.5, 1.0]), cond=cond)


def run_reference(main, control, x, mode=None, scale=0.7, repeat=False):
    common = dict(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                  timestep=x["timesteps"], img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"])
    double, single = control(controlnet_cond=x["cond"], conditioning_scale=scale, controlnet_mode=mode,
                             return_dict=False, **common)
    out = main(controlnet_block_samples=double, controlnet_single_block_samples=single,
               controlnet_blocks_repeat=repeat, **common).sample
    return double, single, out


def check(ours, theirs):
    assert len(ours) == len(theirs or ())
    for a, b in zip(ours, theirs or ()):
        assert (a - b).abs().max().item() <= TOL


@pytest.mark.usefixtures("reference_matmuls")
@pytest.mark.parametrize("kind", ["instantx", "union", "xlabs"])
@torch.no_grad()
def test_parity_with_diffusers(kind):
    """The ControlNet's residuals and the transformer's output with them, for diffusers' layout
    (InstantX), a Union ControlNet (control-mode token) and XLabs' (pixel hint encoder, residuals
    cycled over the blocks)."""
    net = {"union": {"num_mode": 3}, "xlabs": {"conditioning_embedding_channels": 16, "patch_size": 2,
                                               "num_single_layers": 0}}.get(kind, {})
    main, control = diffusers_pair(**net)
    flux, ours = ours_from(main, control)
    x = inputs(cond_pixels=kind == "xlabs")
    mode = torch.tensor([[2], [0]]) if kind == "union" else None
    double, single, expected = run_reference(main, control, x, mode=mode, repeat=kind == "xlabs")
    common = {k: x[k] for k in ("img", "img_ids", "txt", "txt_ids", "timesteps", "y")}
    residuals = ours(**common, cond=x["cond"], guidance=x["guidance"], scale=0.7,
                     mode=None if mode is None else mode[:, 0])
    check(residuals.double, double)
    check(residuals.single, single)
    got = flux(**common, guidance=x["guidance"], control=[residuals])
    err = (got - expected).abs().max().item()
    assert err <= TOL, f"max abs err {err:.3g}"
    assert (got - flux(**common, guidance=x["guidance"])).abs().max() > 1e-2   # the control matters
    assert residuals.repeat == (kind == "xlabs")


@pytest.mark.usefixtures("reference_matmuls")
@torch.no_grad()
def test_two_controlnets_add_up_as_diffusers_multi():
    """Two ControlNets' residuals: diffusers' FluxMultiControlNetModel sums them, ours adds each."""
    from diffusers import FluxMultiControlNetModel

    main, a = diffusers_pair(seed=0)
    _, b = diffusers_pair(seed=5)
    flux, ours_a = ours_from(main, a)
    _, ours_b = ours_from(main, b)
    x, y = inputs(), inputs()
    y["cond"] = torch.randn_like(x["cond"])
    common = dict(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                  timestep=x["timesteps"], img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"])
    double, single = FluxMultiControlNetModel([a, b])(controlnet_cond=[x["cond"], y["cond"]],
                                                      controlnet_mode=[torch.zeros(2, dtype=torch.long)] * 2,
                                                      conditioning_scale=[0.5, 1.2],
                                                      return_dict=False, **common)
    expected = main(controlnet_block_samples=double, controlnet_single_block_samples=single, **common).sample
    args = {k: x[k] for k in ("img", "img_ids", "txt", "txt_ids", "timesteps", "y")}
    residuals = [ours_a(**args, cond=x["cond"], guidance=x["guidance"], scale=0.5),
                 ours_b(**args, cond=y["cond"], guidance=x["guidance"], scale=1.2)]
    got = flux(**args, guidance=x["guidance"], control=residuals)
    assert (got - expected).abs().max().item() <= TOL


def test_fresh_controlnet_is_a_no_op():
    """Zero-initialised projections: a new ControlNet changes nothing (why training starts there)."""
    import attrs

    from diffcore_flux1.controlnet import ControlNetParams

    base = attrs.evolve(VARIANTS["tiny"], depth=1, depth_single_blocks=1)
    net = FluxControlNet(ControlNetParams(base))
    x = inputs()
    args = {k: x[k] for k in ("img", "img_ids", "txt", "txt_ids", "timesteps", "y")}
    with torch.no_grad():
        residuals = net(**args, cond=x["cond"], guidance=x["guidance"])
    assert all(torch.equal(r, torch.zeros_like(r)) for r in residuals.double + residuals.single)


def test_loading_files_and_errors(tmp_path):
    """A diffusers folder and an XLabs-keyed file load; another family's ControlNet, a transformer
    and a ControlNet of another width are one-line errors naming the file."""
    main, control = diffusers_pair()
    base = attrs_base()
    control.save_pretrained(tmp_path / "instantx")
    net = load_controlnet(tmp_path / "instantx", base)
    assert net.params.blocks.depth == 2 and net.params.num_mode is None
    theirs = dict(control.state_dict())
    ours = to_ours(dict(theirs))
    assert all(torch.equal(net.state_dict()[k], v) for k, v in ours.items())
    save_file_atomic({k: v.contiguous() for k, v in theirs.items()}, tmp_path / "instantx.safetensors")
    single = load_controlnet(tmp_path / "instantx.safetensors", base)   # diffusers keys, no config.json
    assert single.params == net.params

    # XLabs: BFL block names, pos_embed_input, input_hint_block.N
    from diffusers import FluxControlNetModel
    xl = randomize(FluxControlNetModel(**{**NET, "conditioning_embedding_channels": 16, "patch_size": 2,
                                          "num_single_layers": 0}), 2)
    sd = to_ours(dict(xl.state_dict()))
    sd = {k.replace("controlnet_x_embedder.", "pos_embed_input."): v for k, v in sd.items()}
    save_file_atomic(sd, tmp_path / "xlabs.safetensors")
    net = load_controlnet(tmp_path / "xlabs.safetensors", base)
    assert net.params.hint == 16 and net.params.repeat and net.params.blocks.depth_single_blocks == 0

    save_file_atomic({"controlnet_down_blocks.0.weight": torch.zeros(4, 4, 1, 1), "conv_in.weight": torch.zeros(1)},
                     tmp_path / "sdxl.safetensors")
    with pytest.raises(CheckpointError, match=r"sdxl\.safetensors: not a FLUX.1 ControlNet.*SDXL"):
        load_controlnet(tmp_path / "sdxl.safetensors", base)
    save_file_atomic(diffusers_to_bfl(dict(main.state_dict())), tmp_path / "main.safetensors")
    with pytest.raises(CheckpointError, match="a FLUX.1 transformer, not a ControlNet"):
        load_controlnet(tmp_path / "main.safetensors", base)
    import attrs
    wide = attrs.evolve(base, hidden_size=128, num_heads=4)
    with pytest.raises(CheckpointError, match="does not fit the FLUX.1 transformer: hidden_size 64"):
        load_controlnet(tmp_path / "instantx", wide)


def attrs_base():
    import attrs

    return attrs.evolve(VARIANTS["tiny"], depth=3, depth_single_blocks=5)


def run_generate(folder, model, controls, **job):
    """A generate job with ``[[control]]`` tables through the runner; (images, first PNG's parameters)."""
    import json

    import tomli_w
    from PIL import Image

    from diffcore.testing import plugins_for_test, run_job_file

    table = {"job": {"kind": "generate", "output_dir": str(folder / "out"), "prompt": "a red cat", "num_samples": 1,
                     "batch_size": 1, "progress": False, "device": "cpu", "grid": False, "seed": 7, **job},
             "model": {"family": "flux1", "dtype": "float32", "max_sequence_length": 16, **model},
             "control": controls}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.toml").write_text(tomli_w.dumps(table))
    with plugins_for_test():
        images = run_job_file(folder / "job.toml")
    return images, json.loads(Image.open(folder / "out" / "sample-0000.png").text["parameters"])


@pytest.fixture(scope="module")
def controlnet_setup(tiny_pipeline, tmp_path_factory):
    """A tiny InstantX-style ControlNet for tiny_pipeline's transformer, a narrow-posterior VAE (diffusers'
    pipeline samples the control image's latents, ours takes the mean), both saved, and
    diffusers' FluxControlNetPipeline on the same files."""
    import copy

    import numpy as np
    from diffusers import FluxControlNetModel, FluxControlNetPipeline
    from PIL import Image

    folder, pipe = tiny_pipeline
    root = tmp_path_factory.mktemp("flux1-controlnet")
    net = randomize(FluxControlNetModel(**{**NET, "num_layers": 1, "num_single_layers": 1}), 11, std=0.05)
    net.save_pretrained(root / "controlnet")
    vae = copy.deepcopy(pipe.vae)
    with torch.no_grad():
        z = vae.config.latent_channels
        vae.encoder.conv_out.weight[z:] = 0
        vae.encoder.conv_out.bias[z:] = -100
    vae.save_pretrained(root / "vae")
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(root / "edges.png")
    cn_pipe = FluxControlNetPipeline(**{**pipe.components, "vae": vae}, controlnet=net)
    return folder, root, cn_pipe


@torch.no_grad()
@pytest.mark.parametrize("scale, start, end", [(0.7, 0.0, 1.0), (1.3, 0.25, 0.75)], ids=["whole", "window"])
def test_generate_job_matches_flux_controlnet_pipeline(controlnet_setup, tmp_path, scale, start, end):
    """A 4-step controlled run through the generate job against FluxControlNetPipeline with the same
    files, prompt and noise: conditioning scale, and control_guidance_start / end as fractions."""
    from einops import rearrange
    from PIL import Image

    folder, root, cn_pipe = controlnet_setup
    model = {"path": str(folder), "vae": str(root / "vae")}
    control = {"path": str(root / "controlnet"), "image": str(root / "edges.png"), "scale": scale, "start": start,
               "end": end}
    images, params = run_generate(tmp_path, model, [control], height=32, width=48, sampling_steps=4)
    noise = torch.randn(1, 64, 8, 12, generator=torch.Generator().manual_seed(7))
    expected = cn_pipe(prompt="a red cat", control_image=Image.open(root / "edges.png"), height=32, width=48,
                       num_inference_steps=4, guidance_scale=3.5, max_sequence_length=16, output_type="pt",
                       controlnet_conditioning_scale=scale, control_guidance_start=start, control_guidance_end=end,
                       latents=rearrange(noise, "b c h w -> b (h w) c")).images
    err = ((images + 1) / 2).clamp(0, 1).sub(expected).abs().max().item()
    assert expected.std() > 0.01 and err <= TOL, f"image max abs err {err:.3g}"
    plain = cn_pipe(prompt="a red cat", control_image=Image.open(root / "edges.png"), height=32, width=48,
                    num_inference_steps=4, guidance_scale=3.5, max_sequence_length=16, output_type="pt",
                    controlnet_conditioning_scale=0.0, latents=rearrange(noise, "b c h w -> b (h w) c")).images
    assert (plain - expected).abs().max() > 1e-3   # the ControlNet changed the image
    assert params["control"][0]["scale"] == scale


def test_control_errors_are_one_line(controlnet_setup, tmp_path):
    """A control image of another aspect ratio, a ControlNet file of another family and a missing
    image file each name the [[control]] key."""
    import numpy as np
    from PIL import Image

    from diffcore.api import ConfigError, DiffcoreError

    folder, root, _ = controlnet_setup
    model = {"path": str(folder), "vae": str(root / "vae")}
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "square.png")
    good = {"path": str(root / "controlnet"), "image": str(root / "edges.png")}
    with pytest.raises(ConfigError, match=r"control\[0\]\.image.*32x32 pixels and the output 48x32"):
        run_generate(tmp_path / "a", model, [{**good, "image": str(tmp_path / "square.png")}], height=32, width=48,
                     sampling_steps=1)
    save_file_atomic({"controlnet_down_blocks.0.weight": torch.zeros(4, 4, 1, 1)}, tmp_path / "sdxl.safetensors")
    with pytest.raises(ConfigError, match=r"control\[0\]\.path.*not a FLUX.1 ControlNet.*SDXL"):
        run_generate(tmp_path / "b", model, [{**good, "path": str(tmp_path / "sdxl.safetensors")}], height=32,
                     width=48, sampling_steps=1)
    with pytest.raises(DiffcoreError, match=r"control\[0\]\.image.*no such file"):
        run_generate(tmp_path / "c", model, [{**good, "image": str(tmp_path / "missing.png")}], sampling_steps=1)


def test_from_transformer_matches_diffusers():
    """The training start: the transformer's embeddings and first blocks, zero projections."""
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    main = randomize(FluxTransformer2DModel(**MAIN), 0)
    theirs = FluxControlNetModel.from_transformer(main, num_layers=2, num_single_layers=3, attention_head_dim=32,
                                                  num_attention_heads=2)
    flux, _ = ours_from(main, randomize(FluxControlNetModel(**NET), 1))
    ours = FluxControlNet.from_transformer(flux, depth=2, depth_single_blocks=3)
    expected = to_ours(dict(theirs.state_dict()))
    assert ours.state_dict().keys() == expected.keys()
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in expected.items())


@torch.no_grad()
def test_bundle_makes_a_controlnet_to_train(controlnet_setup):
    """``new_controlnet`` (the core controlnet trainer's start) copies the transformer's first blocks;
    ``control_inputs`` runs it on conditioning images through ``forward``: a no-op until trained,
    a change once its projections are not zero."""
    from diffcore_flux1.plugin import Flux1Config, build_flux1

    folder, root, _ = controlnet_setup
    bundle = build_flux1(Flux1Config(path=str(folder), vae=str(root / "vae"), dtype="float32", max_sequence_length=16))
    net = bundle.new_controlnet(depth=1, depth_single_blocks=1)
    assert torch.equal(net.double_blocks[0].img_attn.qkv.weight, bundle.network.double_blocks[0].img_attn.qkv.weight)
    image = torch.rand(2, 3, 32, 48) * 2 - 1
    cond = bundle.conditions(GenerationRequest(batch=2, prompts=["a", "b"], height=32, width=48))["cond"]
    x, sigma = torch.randn(2, 64, 8, 12), torch.tensor([0.7, 0.3])
    plain = bundle.forward(x, sigma, **cond)
    assert torch.equal(bundle.forward(x, sigma, **cond, **bundle.control_inputs(net, image)), plain)
    randomize(net.controlnet_blocks, 3)
    assert (bundle.forward(x, sigma, **cond, **bundle.control_inputs(net, image, scale=0.5)) - plain).abs().max() > 1e-3
