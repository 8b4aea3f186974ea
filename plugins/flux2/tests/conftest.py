"""Tiny random diffusers models (the references) and their conversions to ours."""

from __future__ import annotations

import pytest
import torch

from diffcore_flux2.convert import diffusers_to_bfl
from diffcore_flux2.model import VARIANTS, Flux2
from diffcore_flux2.vae import AE_VARIANTS, AutoEncoder, ae_to_bfl


def _randomise(module: torch.nn.Module, std: float, seed: int) -> None:
    """Replace the init (zeros / ones in norms would hide layout errors) with N(0, std) weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.ndim == 1 else 0.0))


@pytest.fixture
def diffusers_transformer():
    """``make(guidance)`` -> a random ``Flux2Transformer2DModel`` shaped like our "tiny" / "tiny-klein"."""
    from diffusers import Flux2Transformer2DModel

    def make(guidance: bool, seed: int = 0):
        p = VARIANTS["tiny" if guidance else "tiny-klein"]
        model = Flux2Transformer2DModel(
            in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
            attention_head_dim=p.head_dim, num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
            axes_dims_rope=p.axes_dim, rope_theta=p.theta, mlp_ratio=p.mlp_ratio, guidance_embeds=guidance)
        _randomise(model, 0.1, seed)
        return model.eval()

    return make


def ours_from(diffusers_model) -> Flux2:
    name = "tiny" if diffusers_model.config.guidance_embeds else "tiny-klein"
    model = Flux2(VARIANTS[name])
    model.load_state_dict(diffusers_to_bfl(dict(diffusers_model.state_dict())))
    return model.eval()


@pytest.fixture
def to_ours():
    return ours_from


@pytest.fixture
def diffusers_vae():
    """A random 2-level ``AutoencoderKLFlux2`` (4 latent channels) with non-trivial BatchNorm statistics."""
    from diffusers import AutoencoderKLFlux2

    p = AE_VARIANTS["tiny"]
    torch.manual_seed(1)  # the default init draws from the global generator
    vae = AutoencoderKLFlux2(block_out_channels=tuple(p.ch * m for m in p.ch_mult),
                             down_block_types=("DownEncoderBlock2D",) * len(p.ch_mult),
                             up_block_types=("UpDecoderBlock2D",) * len(p.ch_mult),
                             layers_per_block=p.num_res_blocks, latent_channels=p.z_channels)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in vae.parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.05)
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g))
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=g) * 1.5 + 0.5)
    return vae.eval()


@pytest.fixture
def ae_from():
    def convert(vae) -> AutoEncoder:
        ae = AutoEncoder(AE_VARIANTS["tiny"])
        ae.load_state_dict(ae_to_bfl(dict(vae.state_dict())))
        return ae.eval()

    return convert


CHAT_TEMPLATE = (  # Qwen-like: string or [{"type": "text"}] contents; klein's no-thinking generation prompt
    "{% for m in messages %}<|im_start|>{{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}{{ c['text'] }}"
    "{% endfor %}{% endif %} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant "
    "{% if enable_thinking is defined and not enable_thinking %}<think> </think> {% endif %}{% endif %}")
WORDS = ("user assistant system a an the cat dog red blue on mat sign you are ai that reasons about image "
         "descriptions give structured responses focusing object relationships attribution and actions without "
         "speculation .").split()


@pytest.fixture
def tiny_llm():
    """(Qwen3ForCausalLM with 3 layers of width 16, a word-level tokenizer with a chat template)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    special = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(special + WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(special[2:])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        chat_template=CHAT_TEMPLATE)
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return Qwen3ForCausalLM(config).eval(), tokenizer


@pytest.fixture
def flux2_folder(tmp_path, diffusers_transformer, diffusers_vae, tiny_llm):
    """``make(guidance)`` -> (a diffusers-layout FLUX.2 folder of tiny models, the diffusers modules)."""

    def make(guidance: bool):
        root = tmp_path / ("dev" if guidance else "klein-base")
        parts = dict(transformer=diffusers_transformer(guidance), vae=diffusers_vae, text_encoder=tiny_llm[0],
                     tokenizer=tiny_llm[1])
        for name, part in parts.items():
            part.save_pretrained(root / name)
        return root, parts

    return make


@pytest.fixture
def make_pipeline():
    """``make(cls, parts, **kw)``: a diffusers FLUX.2 pipeline with the scheduler its configs name."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    def make(cls, parts, **kw):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        pipe = cls(scheduler=scheduler, **parts, **kw)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make
