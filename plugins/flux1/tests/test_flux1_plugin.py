"""The ``flux1`` family end to end: registry -> bundle from a saved tiny diffusers folder ->
diffcore's engine, compared with diffusers' own FluxPipeline on the same files."""

import subprocess
import sys

import pytest
import torch
from einops import rearrange

from diffcore.errors import CheckpointError, ConfigError
from diffcore.io.checkpoint import save_file_atomic
from diffcore.models import GenerationRequest
from diffcore.nn.attention import resolve_layers
from diffcore.plugins import Plugins, registry
from diffcore.sampling.engine import sample
from diffcore.sampling.samplers import euler
from diffcore.testing import plugins_for_test
from diffcore.testing.conformance import check_model_family
from diffcore_flux1.bundle import FluxBundle
from diffcore_flux1.plugin import Flux1Config, build_flux1

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
    sigmas = registry("schedules").get("flux").build().sigmas(3, seq_len=shape[1] * shape[2])
    latents = sample(bundle, noise, {"cond": conditions["cond"]}, sigmas, euler, disable=True)
    kwargs = dict(height=32, width=32, num_inference_steps=3, guidance_scale=3.5, max_sequence_length=16,
                  latents=rearrange(noise, "b c h w -> b (h w) c"))
    expected = pipe(PROMPT, output_type="latent", **kwargs).images
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

    from diffcore.jobs.runner import run

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
num_steps = 2
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


def test_single_files(tiny_pipeline, tmp_path):
    """A BFL transformer file + ae.safetensors + a folder holding only the text encoders."""
    from diffcore_flux1.convert import diffusers_to_bfl
    from diffcore_flux1.vae import vae_diffusers_to_bfl

    folder, pipe = tiny_pipeline
    save_file_atomic(diffusers_to_bfl(dict(pipe.transformer.state_dict())), tmp_path / "flux1-tiny.safetensors")
    save_file_atomic(vae_diffusers_to_bfl(dict(pipe.vae.state_dict())), tmp_path / "ae.safetensors")
    with pytest.raises(ConfigError, match="has no vae/ folder: set vae"):
        build(tmp_path / "flux1-tiny.safetensors")
    with pytest.raises(ConfigError, match="has no text encoders"):
        build(tmp_path / "flux1-tiny.safetensors", vae=str(tmp_path / "ae.safetensors"))
    bundle = build(tmp_path / "flux1-tiny.safetensors", vae=str(tmp_path / "ae.safetensors"), text_encoders=str(folder))
    reference = build(folder)
    x, sigma = torch.randn(1, 64, 4, 4), torch.tensor([0.7])
    cond = reference.conditions(GenerationRequest(batch=1, prompts=[PROMPT]))["cond"]
    with torch.no_grad():  # same weights; BLAS may round differently for differently aligned buffers
        torch.testing.assert_close(bundle.forward(x, sigma, **cond), reference.forward(x, sigma, **cond),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(bundle.decode(x), reference.decode(x), rtol=0, atol=1e-5)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"hub id; diffcore never downloads.*huggingface-cli download "
                                          r"black-forest-labs/FLUX.1-dev --local-dir ./FLUX.1-dev"):
        Flux1Config(path="black-forest-labs/FLUX.1-dev")
    with pytest.raises(ConfigError, match="no such file or folder"):
        Flux1Config(path=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match='did you mean "schnell"'):
        Flux1Config(variant="shnell")
    with pytest.raises(ConfigError, match="needs image conditioning"):
        Flux1Config(variant="fill-dev")
    with pytest.raises(ConfigError, match="dtype must be one of"):
        Flux1Config(dtype="float64")
    with pytest.raises(ConfigError, match="set path to a local FLUX.1"):
        build_flux1(Flux1Config())
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        build_flux1(Flux1Config(path=str(tmp_path / "empty")))


def test_bundle_errors(tiny_pipeline):
    bundle = build(tiny_pipeline[0])
    with pytest.raises(ConfigError, match="give a prompt"):
        bundle.conditions(GenerationRequest(batch=1))
    with pytest.raises(ConfigError, match="multiples of 4 pixels .* 30x32"):
        bundle.latent_shape(GenerationRequest(batch=1, height=32, width=30))
    txt, vec = torch.randn(1, 5, 48), torch.randn(1, 32)
    conditions = bundle.conditions(GenerationRequest(batch=1, extra={"txt": txt, "vec": vec}))
    assert list(conditions) == ["cond"] and conditions["cond"]["guidance"].tolist() == [3.5]
