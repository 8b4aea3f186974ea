"""The ``flux1`` family end to end: registry -> bundle from a saved tiny diffusers folder ->
diffcore's engine, compared with diffusers' own FluxPipeline on the same files."""

import subprocess
import sys

import pytest
import torch
from einops import rearrange

from diffcore.api import (
    CFG,
    CheckpointError,
    ConfigError,
    euler,
    GenerationRequest,
    registry,
    resolve_layers,
    sample,
    save_file_atomic,
)
from diffcore.testing import Plugins, plugins_for_test
from diffcore.testing.conformance import check_guidance_processor, check_model_family
from diffcore_flux1.bundle import FluxBundle
from diffcore_flux1.plugin import Flux1Config, build_flux1, resolve_dtype

PROMPT = "a red cat"


def build(folder, **kw):
    return build_flux1(Flux1Config(**{"variant": "tiny", "path": str(folder), "dtype": "float32",
                                      "max_sequence_length": 16, **kw}))


def test_plugin_module_imports_no_torch():
    code = "import sys, diffcore_flux1.plugin; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registered_through_the_entry_point(tiny_pipeline):
    component = Plugins().load().registry("models").get("flux1")
    assert component.plugin == "flux1" and component.config is Flux1Config
    bundle = component.build(Flux1Config(variant="tiny", path=str(tiny_pipeline[0]), dtype="float32"))
    assert isinstance(bundle, FluxBundle) and bundle.default_schedule == {"name": "flux"}
    assert bundle.latent_shape(GenerationRequest(batch=1, height=32, width=48)) == (64, 8, 12)


@torch.no_grad()
def test_engine_matches_diffusers_pipeline(tiny_pipeline):
    folder, pipe = tiny_pipeline
    bundle = build(folder)
    request = GenerationRequest(batch=1, prompts=[PROMPT], negative_prompts=[""], height=32, width=32)
    conditions = bundle.conditions(request)
    txt, vec, _ = pipe.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=16)
    assert (conditions["cond"]["txt"] - txt).abs().max() <= 1e-5
    assert (conditions["cond"]["vec"] - vec).abs().max() <= 1e-5

    shape = bundle.latent_shape(request)
    noise = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    sigmas = registry("schedules").get("flux").build().sigmas(4, seq_len=shape[1] * shape[2])
    given = bundle.conditions(GenerationRequest(batch=1, height=32, width=32,
                                                embeddings={"cond": {"txt": txt, "vec": vec}}))
    latents = sample(bundle, noise, given, sigmas, euler, disable=True)  # diffusers' own embeddings
    kwargs = dict(height=32, width=32, num_inference_steps=4, guidance_scale=3.5, max_sequence_length=16,
                  latents=rearrange(noise, "b c h w -> b (h w) c"))
    expected = pipe(prompt_embeds=txt, pooled_prompt_embeds=vec, output_type="latent", **kwargs).images
    err = (rearrange(latents, "b c h w -> b (h w) c") - expected).abs().max().item()
    assert expected.abs().max() > 1.0 and err <= 1e-5, f"latents max abs err {err:.3g}"
    image = pipe(PROMPT, output_type="pt", **kwargs).images  # [0, 1]
    err = ((bundle.decode(latents) + 1) / 2).clamp(0, 1).sub(image).abs().max().item()  # pipeline clamps too
    assert err <= 1e-5, f"image max abs err {err:.3g}"


def test_conformance_and_layer_aliases(tiny_pipeline):
    bundle = build(tiny_pipeline[0])
    check_model_family(bundle, GenerationRequest(batch=2, prompts=["a cat", "a dog"], negative_prompts=["", ""],
                                                 height=32, width=32))
    found = resolve_layers(bundle.network, ["transformer_blocks.1.attn", "single_transformer_blocks.0"],
                           bundle.attention_alias)
    assert found["transformer_blocks.1.attn"] is bundle.network.double_blocks[1].attend


def test_generate_job_writes_images(tiny_pipeline, tmp_path):
    from PIL import Image

    from diffcore.testing import run_job_file as run

    job = tmp_path / "job.toml"
    job.write_text(f"""
[job]
kind = "generate"
output_dir = "{(tmp_path / 'out').as_posix()}"
prompt = "{PROMPT}"
num_samples = 2
batch_size = 2
height = 32
width = 48
sampling_steps = 2
progress = false
device = "cpu"

[model]
family = "flux1"
variant = "tiny"
path = "{tiny_pipeline[0].as_posix()}"
dtype = "float32"
max_sequence_length = 16
""")
    with plugins_for_test():
        images = run(job)
    assert images.shape == (2, 3, 32, 48) and torch.isfinite(images).all()
    assert Image.open(tmp_path / "out" / "sample-0001.png").size == (48, 32)


def realigned(module):
    """Every parameter copied into a fresh allocation: loaded weights are views of the mapped file,
    aligned only to 8 bytes, and BLAS may round such a buffer's products differently (~1e-6)."""
    for p in module.parameters():
        p.data = p.data.clone()
    return module


def test_single_files_equal_the_diffusers_folder(tiny_pipeline, tmp_path):
    """A BFL transformer file with ae.safetensors beside it (found without being named) and a folder
    holding only the text encoders give the same outputs as the diffusers folder, bit for bit."""
    from diffcore_flux1.convert import diffusers_to_bfl
    from diffcore_flux1.vae import vae_diffusers_to_bfl

    folder, pipe = tiny_pipeline
    save_file_atomic(diffusers_to_bfl(dict(pipe.transformer.state_dict())), tmp_path / "flux1-tiny.safetensors")
    save_file_atomic(vae_diffusers_to_bfl(dict(pipe.vae.state_dict())), tmp_path / "ae.safetensors")
    with pytest.raises(ConfigError, match="has no text encoders"):
        build(tmp_path / "flux1-tiny.safetensors")
    bundle = build(tmp_path / "flux1-tiny.safetensors", text_encoders=str(folder))
    reference = build(folder)
    for b in (bundle, reference):
        realigned(b.network), realigned(b.vae)
    x, sigma = torch.randn(1, 64, 4, 4), torch.tensor([0.7])
    cond = reference.conditions(GenerationRequest(batch=1, prompts=[PROMPT]))["cond"]
    with torch.no_grad():
        out = bundle.forward(x, sigma, **cond)
        assert out.abs().max() > 0.1 and torch.equal(out, reference.forward(x, sigma, **cond))
        assert torch.equal(bundle.decode(x), reference.decode(x))


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"hub id; diffcore never downloads.*huggingface-cli download "
                                          r"black-forest-labs/FLUX.1-dev --local-dir ./FLUX.1-dev"):
        Flux1Config(path="black-forest-labs/FLUX.1-dev")
    with pytest.raises(ConfigError, match="no such file or folder"):
        Flux1Config(path=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match='did you mean "schnell"'):
        Flux1Config(variant="shnell")
    with pytest.raises(ConfigError, match="dtype must be one of auto, bfloat16, float16, float32, got 'float64'"):
        Flux1Config(dtype="float64")
    with pytest.raises(ConfigError, match='offload must be one of none, model, sequential.*did you mean "model"'):
        Flux1Config(offload="models")
    with pytest.raises(ConfigError, match="set path to a local FLUX.1"):
        build_flux1(Flux1Config())
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        build_flux1(Flux1Config(path=str(tmp_path / "empty")))


def test_dtype_follows_the_device():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16 and resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16


def test_bundle_errors(tiny_pipeline):
    bundle = build(tiny_pipeline[0])
    with pytest.raises(ConfigError, match="give a prompt"):
        bundle.conditions(GenerationRequest(batch=1))
    with pytest.raises(ConfigError, match="multiples of 4 pixels .* 30x32"):
        bundle.latent_shape(GenerationRequest(batch=1, height=32, width=30))
    txt, vec = torch.randn(1, 5, 48), torch.randn(1, 32)
    conditions = bundle.conditions(GenerationRequest(batch=1, embeddings={"cond": {"txt": txt, "vec": vec}}))
    assert list(conditions) == ["cond"] and conditions["cond"]["guidance"].tolist() == [3.5]


@pytest.mark.usefixtures("reference_matmuls")
@torch.no_grad()
def test_offload_modes_give_the_same_images(tiny_pipeline, tmp_path, run_job):
    """"model" moves each component to the device only while it runs, "sequential" streams each
    layer's weights through accelerate's hooks; on CPU both must reproduce "none"."""
    folder = str(tiny_pipeline[0])
    plain, _ = run_job(tmp_path / "none", {"path": folder}, height=32, width=32, sampling_steps=2)
    for mode in ("model", "sequential"):
        images, _ = run_job(tmp_path / mode, {"path": folder, "offload": mode}, height=32, width=32, sampling_steps=2)
        torch.testing.assert_close(images, plain, rtol=0, atol=1e-5, msg=f"offload = {mode!r}")

    model = build(folder, offload="model")
    request = GenerationRequest(batch=1, prompts=[PROMPT], height=32, width=32)
    cond = model.conditions(request)["cond"]
    assert model.offload.active == "text"  # encoders first: the transformer has not run yet
    model.forward(torch.randn(1, 64, 8, 8), torch.tensor([0.5]), **cond)
    assert model.offload.active == "network"
    model.decode(torch.randn(1, 64, 8, 8))
    assert model.offload.active == "vae"
    hooked = build(folder, offload="sequential")
    assert all(p.is_meta for p in hooked.network.parameters())  # weights live in the hooks' CPU map
    out = hooked.forward(torch.randn(1, 64, 8, 8), torch.tensor([0.5]), **hooked.conditions(request)["cond"])
    assert torch.isfinite(out).all() and all(p.is_meta for p in hooked.network.parameters())


def test_variant_defaults(tiny_pipeline, diffusers_flux, tmp_path, run_job):
    """schnell: 4 steps on the unshifted schedule, T5 length 256; dev: 28 steps, guidance 3.5,
    FLUX's shifted schedule (Kontext and Fill: test_flux1_images)."""
    from diffcore_flux1.convert import diffusers_to_bfl
    from diffcore_flux1.vae import vae_diffusers_to_bfl

    folder, pipe = tiny_pipeline
    dev = build(folder, max_sequence_length=None)
    assert (dev.default_sampling_steps, dev.guidance, dev.default_schedule) == (28, 3.5, {"name": "flux"})
    assert dev.text.max_length == 512
    transformer = diffusers_flux(guidance=False)
    save_file_atomic(diffusers_to_bfl(dict(transformer.state_dict())), tmp_path / "flux1-schnell-tiny.safetensors")
    save_file_atomic(vae_diffusers_to_bfl(dict(pipe.vae.state_dict())), tmp_path / "ae.safetensors")
    model = {"path": str(tmp_path / "flux1-schnell-tiny.safetensors"), "variant": "schnell",
             "text_encoders": str(folder)}
    schnell = build_flux1(Flux1Config(**model, dtype="float32"))
    assert (schnell.default_sampling_steps, schnell.default_schedule, schnell.text.max_length) == \
        (4, {"name": "flow"}, 256)
    images, params = run_job(tmp_path / "job", model, height=32, width=32)
    assert params["sampling_steps"] == 4 and torch.isfinite(images).all()
    with pytest.raises(CheckpointError, match="not FLUX.1 dev: they take 64 input channels .* without a guidance "
                                              "embedding, which is schnell's kind"):
        build_flux1(Flux1Config(**{**model, "variant": "dev"}))


def test_guidance_conformance_with_cfg(tiny_pipeline):
    """The core's guidance checks with CFG on this family, with and without Kontext reference tokens."""
    bundle = build(tiny_pipeline[0], resize_references=False)  # a 1024-px reference is slow for the 2x tiny VAE
    for references in ([], [torch.rand(3, 16, 24) * 2 - 1]):
        request = GenerationRequest(batch=2, prompts=["a cat", "a dog"], negative_prompts=["", "blurry"], height=32,
                                    width=32, reference_images=references)
        check_model_family(bundle, request)
        check_guidance_processor(CFG(scale=3.0), bundle, request, num_steps=4)
        check_guidance_processor(CFG(scale=2.0, start=0.25, stop=0.75), bundle, request, num_steps=4)


@pytest.mark.parametrize("name, table", [
    ("pag", {"layers": ["transformer_blocks.1.attn"]}),
    ("nag-pag", {"layers": ["transformer_blocks.0.attn", "single_transformer_blocks.1"]}),
    ("apg", {}),
])
def test_guidance_plugin_processors(tiny_pipeline, name, table):
    """Attention-level and prediction-level guidance from diffcore-guidance, addressed with
    diffusers' layer names, once that plugin registers them."""
    from diffcore.api import structure

    guidance = Plugins().load().registry("guidance")
    if name not in guidance:
        pytest.skip(f"diffcore-guidance does not register {name!r} (yet)")
    component = guidance.get(name)
    processor = component.factory(structure(table, component.config))
    request = GenerationRequest(batch=2, prompts=["a cat", "a dog"], negative_prompts=["", ""], height=32, width=32)
    check_guidance_processor(processor, build(tiny_pipeline[0]), request, num_steps=4)
