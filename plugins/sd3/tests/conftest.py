"""Tiny random SD3 models in both implementations, for parity and loading tests."""

import pytest
import torch

# diffusers SD3Transformer2DModel kwargs of the tiny shapes: hidden 64 = 2 heads x 32, 3 blocks
TINY_DIFFUSERS = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=3,
                      attention_head_dim=32, num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=64,
                      pooled_projection_dim=40, pos_embed_max_size=16)
# the variant shapes in small: SD3-medium (no qk-norm), SD3.5-large (RMS qk-norm), SD3.5-medium (+ MMDiT-X)
SHAPES = {"sd3-medium": dict(), "sd3.5-large": dict(qk_norm="rms_norm"),
          "sd3.5-medium": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1))}


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Random weights everywhere (norm scales around 1), so no block is a no-op and errors show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            unit = p.ndim == 1 and "norm" in name and "linear" not in name
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if unit else 0.0))
    return model.eval()


@pytest.fixture
def diffusers_sd3():
    """``make(shape, seed=0, **overrides)`` -> a tiny random diffusers ``SD3Transformer2DModel``."""
    from diffusers import SD3Transformer2DModel

    def make(shape: str = "sd3.5-medium", seed: int = 0, **overrides):
        return randomize(SD3Transformer2DModel(**{**TINY_DIFFUSERS, **SHAPES[shape], **overrides}), seed)

    return make


@pytest.fixture
def sd3_inputs():
    """``make(batch, h, w, tokens)`` -> random latents (B, 16, h, w), context, pooled and sigmas."""

    def make(batch=2, h=8, w=6, tokens=7, seed=0):
        g = torch.Generator().manual_seed(seed)
        return dict(x=torch.randn(batch, 16, h, w, generator=g), context=torch.randn(batch, tokens, 48, generator=g),
                    y=torch.randn(batch, 40, generator=g), timesteps=torch.rand(batch, generator=g))

    return make


# an 8x autoencoder (four levels) as SD3's, narrow and one res block deep
TINY_VAE_DIFFUSERS = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32,) * 4, layers_per_block=1,
                          latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                          scaling_factor=1.5305, shift_factor=0.0609)


def tiny_tokenizers():
    """Character-level CLIP BPE tokenizers (CLIP-L pads with EOT, CLIP-G with "!" as released)
    and a T5 unigram tokenizer, built offline."""
    import string

    from transformers import CLIPTokenizer, T5Tokenizer

    letters = string.ascii_lowercase + string.digits + ".,!?'-"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    clip_l = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    clip_g = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token="!")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -1.0) for c in letters] + [(c, -2.0) for c in letters]
    return clip_l, clip_g, T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def tiny_text_encoders():
    """CLIP-L (16 wide, identity projection as SD3's release), CLIP-G (24, random projection) and
    T5 (48 = the tiny transformer's context width): pooled 16 + 24 = 40, as ``VARIANTS["tiny"]``."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_l_tok, clip_g_tok, t5_tok = tiny_tokenizers()
    torch.manual_seed(0)

    def clip(width, act):
        config = CLIPTextConfig(vocab_size=len(clip_l_tok), hidden_size=width, intermediate_size=2 * width,
                                projection_dim=width, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=77, hidden_act=act, bos_token_id=0, eos_token_id=1,
                                pad_token_id=1)
        return randomize(CLIPTextModelWithProjection(config), std=0.1)

    clip_l, clip_g = clip(16, "quick_gelu"), clip(24, "gelu")
    with torch.no_grad():
        clip_l.text_projection.weight.copy_(torch.eye(16))
    t5 = randomize(T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=48, d_kv=8, d_ff=64, num_layers=1,
                                           num_heads=6, relative_attention_num_buckets=8)), seed=1, std=0.1)
    return dict(text_encoder=clip_l, tokenizer=clip_l_tok, text_encoder_2=clip_g, tokenizer_2=clip_g_tok,
                text_encoder_3=t5, tokenizer_3=t5_tok)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A saved tiny diffusers ``StableDiffusion3Pipeline`` (random SD3.5-medium-shaped MMDiT, 16-channel
    VAE, CLIP-L, CLIP-G, T5) and the pipeline itself."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from diffcore_sd3.model import diffusers_config
    from diffcore_sd3.params import VARIANTS

    config = {k: v for k, v in diffusers_config(VARIANTS["tiny"]).items() if k != "_class_name"}
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=randomize(AutoencoderKL(**TINY_VAE_DIFFUSERS), seed=1, std=0.05),
        transformer=randomize(SD3Transformer2DModel(**config), seed=2, std=0.05), **tiny_text_encoders())
    folder = tmp_path_factory.mktemp("sd3-tiny")
    pipe.save_pretrained(folder)
    return folder, pipe
