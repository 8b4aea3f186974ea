"""Tiny random FLUX.1 models in both implementations, for parity and loading tests."""

import pytest
import torch

TINY_DIFFUSERS = dict(in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
                      joint_attention_dim=48, pooled_projection_dim=32, axes_dims_rope=(8, 12, 12))
TINY_VAE_DIFFUSERS = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                          latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                          scaling_factor=0.3611, shift_factor=0.1159)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Random weights everywhere (norm scales around 1), so no block is a no-op and errors show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            unit = p.ndim == 1 and ("norm" in name and "linear" not in name)
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if unit else 0.0))
    return model.eval()


@pytest.fixture
def diffusers_flux():
    """``make(guidance=True, **overrides)`` -> a tiny random diffusers ``FluxTransformer2DModel``."""
    from diffusers import FluxTransformer2DModel

    def make(guidance: bool = True, seed: int = 0, **overrides):
        return randomize(FluxTransformer2DModel(**{**TINY_DIFFUSERS, "guidance_embeds": guidance, **overrides}), seed)

    return make


@pytest.fixture
def diffusers_vae():
    from diffusers import AutoencoderKL

    return randomize(AutoencoderKL(**TINY_VAE_DIFFUSERS), seed=1, std=0.05)


@pytest.fixture
def flux_inputs():
    """``make(batch, h, w, txt_len, in_channels)`` -> dict of random inputs with a (h, w) token grid."""
    from diffcore_flux1.sampling import prepare_img_ids, prepare_txt_ids

    def make(batch=2, h=4, w=5, txt_len=7, in_channels=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        return dict(img=torch.randn(batch, h * w, in_channels, generator=g), img_ids=prepare_img_ids(h, w)[0],
                    txt=torch.randn(batch, txt_len, 48, generator=g), txt_ids=prepare_txt_ids(txt_len)[0],
                    y=torch.randn(batch, 32, generator=g), timesteps=torch.rand(batch, generator=g),
                    guidance=torch.tensor([3.5, 1.0][:batch] + [2.0] * max(batch - 2, 0)))

    return make


def tiny_tokenizers():
    """A character-level CLIP BPE tokenizer and T5 unigram tokenizer, built offline."""
    import string

    from transformers import CLIPTokenizer, T5Tokenizer

    letters = string.ascii_lowercase + string.digits + ".,!?'-"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -1.0) for c in letters] + [(c, -2.0) for c in letters]
    return clip, T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A saved tiny diffusers ``FluxPipeline`` (random transformer, VAE, CLIP and T5) and the pipeline."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip_tok, t5_tok = tiny_tokenizers()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=48, d_kv=8, d_ff=64, num_layers=1, num_heads=6,
                                 relative_attention_num_buckets=8)).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                  base_image_seq_len=256, max_image_seq_len=4096),
        vae=randomize(AutoencoderKL(**TINY_VAE_DIFFUSERS), seed=1, std=0.05),
        text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
        transformer=randomize(FluxTransformer2DModel(**TINY_DIFFUSERS, guidance_embeds=True), seed=2, std=0.05))
    folder = tmp_path_factory.mktemp("flux1-tiny")
    pipe.save_pretrained(folder)
    return folder, pipe


# an 8x autoencoder (four levels), so Fill's mask is unshuffled 8 x 8 into 256 channels as in FLUX.1
TINY_VAE8_DIFFUSERS = {**TINY_VAE_DIFFUSERS, "down_block_types": ("DownEncoderBlock2D",) * 4,
                       "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (32,) * 4}


def narrow_posterior(vae):
    """Log-variance at diffusers' clamp (-30), so a sampled latent is the mean to ~1e-7: the
    pipelines that sample the masked or control image's latents (Fill, Control) then agree with
    ours, which take the mean."""
    with torch.no_grad():
        z = vae.config.latent_channels
        vae.encoder.conv_out.weight[z:] = 0
        vae.encoder.conv_out.bias[z:] = -100
    return vae


@pytest.fixture(scope="session")
def image_variants(tiny_pipeline, tmp_path_factory):
    """Tiny Fill (384 input channels) and Canny (128) transformers as BFL single files with an 8x
    ``ae.safetensors`` beside them, and diffusers' FluxFillPipeline / FluxControlPipeline on the
    same weights and tiny_pipeline's text encoders. Returns (folder, fill_pipe, control_pipe)."""
    from diffusers import AutoencoderKL, FluxControlPipeline, FluxFillPipeline, FluxTransformer2DModel

    from diffcore.api import save_file_atomic
    from diffcore_flux1.convert import diffusers_to_bfl
    from diffcore_flux1.vae import vae_diffusers_to_bfl

    folder = tmp_path_factory.mktemp("flux1-image-variants")
    pipe = tiny_pipeline[1]
    vae = narrow_posterior(randomize(AutoencoderKL(**TINY_VAE8_DIFFUSERS), seed=3, std=0.05))
    save_file_atomic(vae_diffusers_to_bfl(dict(vae.state_dict())), folder / "ae.safetensors")
    text = dict(text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, text_encoder_2=pipe.text_encoder_2,
                tokenizer_2=pipe.tokenizer_2)
    made = []
    for name, in_channels, cls, seed in (("fill", 384, FluxFillPipeline, 4), ("canny", 128, FluxControlPipeline, 5)):
        transformer = randomize(FluxTransformer2DModel(**{**TINY_DIFFUSERS, "in_channels": in_channels},
                                                       out_channels=64, guidance_embeds=True), seed=seed, std=0.05)
        save_file_atomic(diffusers_to_bfl(dict(transformer.state_dict())), folder / f"flux1-{name}-tiny.safetensors")
        made.append(cls(scheduler=pipe.scheduler, vae=vae, transformer=transformer, **text))
    return folder, made[0], made[1]


@pytest.fixture
def run_job():
    """``run_job(folder, model_table, tables=None, **job_fields)`` (``tables``: more top-level tables,
    e.g. ``{"lora": [...]}``): write a generate job file in ``folder``, run it
    through ``diffcore.jobs.runner.run``; returns (images in [-1, 1], the first PNG's parameters)."""
    import json

    import tomli_w
    from PIL import Image

    from diffcore.testing import run_job_file as run
    from diffcore.testing import plugins_for_test

    def run_job(folder, model, tables=None, **job):
        table = {**(tables or {}), "job": {"kind": "generate", "output_dir": str(folder / "out"), "prompt": "a red cat",
                         "num_samples": 1, "batch_size": 1, "progress": False, "device": "cpu", "grid": False,
                         "seed": 7, **job},
                 "model": {"family": "flux1", "dtype": "float32", "max_sequence_length": 16, **model}}
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "job.toml").write_text(tomli_w.dumps(table))
        with plugins_for_test():
            images = run(folder / "job.toml")
        return images, json.loads(Image.open(folder / "out" / "sample-0000.png").text["parameters"])

    return run_job
