"""Tiny random SDXL models in both implementations, for parity and loading tests."""

import json

import pytest
import torch

# diffusers configs with the structure of base-1.0 and refiner-1.0 and the numbers of the
# "tiny" / "tiny-refiner" rows of diffcore_sdxl.params.VARIANTS
TINY_BASE = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
    cross_attention_dim=48, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=32)
TINY_REFINER = dict(
    TINY_BASE, block_out_channels=(32, 64, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=1, attention_head_dim=(2, 4, 4, 4), cross_attention_dim=32,
    projection_class_embeddings_input_dim=32 + 5 * 8)
TINY = {"tiny": TINY_BASE, "tiny-refiner": TINY_REFINER}


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Random weights everywhere (norm scales around 1), so no block is a no-op and errors show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            unit = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if unit else 0.0))
    return model.eval()


@pytest.fixture
def diffusers_unet():
    """``make(variant="tiny", seed=0, **overrides)`` -> a tiny random diffusers ``UNet2DConditionModel``."""
    from diffusers import UNet2DConditionModel

    def make(variant: str = "tiny", seed: int = 0, **overrides):
        return randomize(UNet2DConditionModel(**{**TINY[variant], **overrides}), seed)

    return make


@pytest.fixture
def unet_inputs():
    """``make(params, batch=2, h=8, w=8)`` -> (x, timesteps, context, pooled, time_ids) for a UNet."""

    def make(params, batch: int = 2, h: int = 8, w: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        scalars = (params.adm_in_channels - 32) // params.time_embed_scalar_dim
        time_ids = torch.tensor([[64.0, 48.0, 0.0, 8.0, 64.0, 64.0][:scalars]] * batch)
        return (torch.randn(batch, params.in_channels, h, w, generator=g), torch.tensor([981.0, 7.5][:batch]),
                torch.randn(batch, 5, params.context_dim, generator=g), torch.randn(batch, 32, generator=g), time_ids)

    return make


@pytest.fixture(scope="session")
def unet_files(tmp_path_factory):
    """One tiny random UNet written as a diffusers folder, a Stability all-in-one file, a bare
    Stability UNet file, a diffusers-keys file, and fp16 / fp8 single files."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from diffcore_sdxl.convert import diffusers_to_stability

    root = tmp_path_factory.mktemp("sdxl-unet")
    ref = randomize(UNet2DConditionModel(**TINY_BASE), seed=3)
    ref.save_pretrained(root / "pipe" / "unet")
    (root / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    ours = diffusers_to_stability(dict(sd))
    single = {f"model.diffusion_model.{k}": v for k, v in ours.items()}
    single["first_stage_model.encoder.conv_in.weight"] = torch.zeros(8, 3, 3, 3)
    single["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
    save_file(single, root / "all-in-one.safetensors")
    save_file(ours, root / "unet-stability.safetensors")
    save_file(sd, root / "unet-diffusers.safetensors")
    save_file({k: v.half() for k, v in single.items()}, root / "fp16.safetensors")
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in ours.items()}, root / "fp8.safetensors")
    return root, ref


TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                latent_channels=4, norm_num_groups=32, scaling_factor=0.13025, force_upcast=True)


def tiny_tokenizer(pad: str):
    """A character-level CLIP BPE tokenizer built offline; ``!`` is id 0 (bigG pads with it) and
    end-of-text the largest id, as in the real vocabularies."""
    import string

    from transformers import CLIPTokenizer

    vocab = {}
    for c in "!" + string.ascii_lowercase + string.digits + ".,?'-":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token=pad)


def tiny_text_encoders(seed: int = 0):
    """(tokenizer, CLIP-L-shaped encoder 16 wide, tokenizer_2, bigG-shaped encoder 32 wide with a 32-d projection)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok, tok2 = tiny_tokenizer("<|endoftext|>"), tiny_tokenizer("!")
    ids = dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=len(tok) - 2, eos_token_id=len(tok) - 1)
    clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                          num_attention_heads=2, hidden_act="quick_gelu",
                                          pad_token_id=ids["eos_token_id"],
                                          **ids)).eval()
    big_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                                                       num_attention_heads=4, hidden_act="gelu", projection_dim=32,
                                                       pad_token_id=0, **ids)).eval()
    return tok, clip_l, tok2, big_g


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory):
    """Saved tiny diffusers SDXL folders, base and refiner (random UNet, VAE, CLIPs), and their pipelines:
    ``{"base": (folder, StableDiffusionXLPipeline), "refiner": (folder, StableDiffusionXLImg2ImgPipeline)}``."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)

    tok, clip_l, tok2, big_g = tiny_text_encoders()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1, num_train_timesteps=1000)
    vae = randomize(AutoencoderKL(**TINY_VAE), seed=1, std=0.05)
    base = StableDiffusionXLPipeline(
        vae=vae, text_encoder=clip_l, text_encoder_2=big_g, tokenizer=tok, tokenizer_2=tok2,
        unet=randomize(UNet2DConditionModel(**TINY_BASE), seed=2, std=0.05), scheduler=scheduler)
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=big_g, tokenizer=None, tokenizer_2=tok2,
        unet=randomize(UNet2DConditionModel(**TINY_REFINER), seed=3, std=0.05), scheduler=scheduler,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    out = {}
    for name, pipe in (("base", base), ("refiner", refiner)):
        folder = tmp_path_factory.mktemp(f"sdxl-{name}")
        pipe.save_pretrained(folder)
        out[name] = (folder, pipe)
    return out


@pytest.fixture
def run_job(tmp_path):
    """``run_job(name, model_table, **job_fields)``: a tiny generate job of the sdxl family in its own
    folder; (images, the first PNG's parameters)."""
    import tomli_w
    from PIL import Image

    import diffcore_sdxl.plugin as plugin
    from diffcore.testing import plugins_for_test, run_job_file

    def run_job(name, model, **job):
        folder = tmp_path / name
        folder.mkdir()
        table = {"job": {"kind": "generate", "output_dir": str(folder / "out"), "prompt": "a red cat",
                         "num_samples": 1, "batch_size": 1, "progress": False, "device": "cpu", "grid": False,
                         "seed": 7, "height": 16, "width": 16, "sampling_steps": 4, **job},
                 "model": {"family": "sdxl", "dtype": "float32", **model}}
        (folder / "job.toml").write_text(tomli_w.dumps(table))
        with plugins_for_test(plugin):
            images = run_job_file(folder / "job.toml")
        return images, json.loads(Image.open(folder / "out" / "sample-0000.png").text["parameters"])

    return run_job
