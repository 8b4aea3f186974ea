"""The ``controlnet`` trainer (diffcore.training.controlnet) on a tiny random SDXL saved as a diffusers
folder: only the ControlNet trains, the trained one makes use of its control image (a stated loss
metric), and an interrupted run resumes bit for bit."""

from __future__ import annotations

import string

import pytest
import torch
from torch.utils.data import Dataset

from diffcore.config.structure import structure
from diffcore.plugins import registry
from diffcore.testing import plugins_for_test
from diffcore.training.loop import train
from training_standins import settings

pytest.importorskip("diffcore_sdxl")
diffusers = pytest.importorskip("diffusers")

UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
            cross_attention_dim=48, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=32)   # the sdxl plugin's "tiny"
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
           latent_channels=4, norm_num_groups=32, scaling_factor=4.0)   # latents of std ~1: x0 matters to the loss


def tokenizer(pad: str):
    from transformers import CLIPTokenizer

    vocab = {}
    for c in "!" + string.ascii_lowercase + " ":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token=pad)


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    """A tiny random StableDiffusionXLPipeline saved as a diffusers folder (2x VAE: 16 px -> 8 latents)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok, tok2 = tokenizer("<|endoftext|>"), tokenizer("!")
    ids = dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=len(tok) - 2, eos_token_id=len(tok) - 1)
    clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                          num_attention_heads=2, pad_token_id=ids["eos_token_id"], **ids))
    big_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                                       num_attention_heads=4, projection_dim=32, pad_token_id=0, **ids))
    pipe = StableDiffusionXLPipeline(vae=AutoencoderKL(**VAE), text_encoder=clip_l, text_encoder_2=big_g, tokenizer=tok,
                                     tokenizer_2=tok2, unet=UNet2DConditionModel(**UNET),
                                     scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear",
                                                                      beta_start=0.00085, beta_end=0.012))
    folder = tmp_path_factory.mktemp("sdxl-tiny")
    pipe.save_pretrained(folder)
    return folder


class Boxes(Dataset):
    """White rectangles on black, 16 x 16, each a different size and place, one caption."""

    def __init__(self, n: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.full((n, 3, 16, 16), -1.0)
        for image in self.images:
            top, left = torch.randint(0, 8, (2,), generator=g).tolist()
            h, w = torch.randint(4, 9, (2,), generator=g).tolist()
            image[:, top:top + h, left:left + w] = 1.0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "caption": "a box"}


def build(folder):
    torch.manual_seed(0)   # as the train job does: the hint encoder's fresh convs are drawn
    with plugins_for_test():
        model = registry("models").get("sdxl")
        bundle = model.factory(structure({"path": str(folder), "dtype": "float32"}, model.config), device="cpu")
        trainer = registry("trainers").get("controlnet")
        config = structure({"conditioning": "canny", "conditioning_options": {"low": 100, "high": 200}}, trainer.config)
        return bundle, trainer.factory(config, bundle)


def fit(bundle, trainer, steps: int = 80, lr: float = 1e-2) -> list[float]:
    """``steps`` AdamW steps on the trainer's loss over the boxes, batches of 4 in order, the loop's
    per-step generator seeding (the loop itself needs caption-aware batching; see the resume test)."""
    boxes = Boxes()
    optimizer = torch.optim.AdamW(trainer.trainable_parameters(), lr=lr)
    losses = []
    for step in range(steps):
        rows = [(4 * step + j) % len(boxes) for j in range(4)]
        batch = {"image": boxes.images[rows], "caption": ["a box"] * 4}
        loss = trainer.loss(bundle, batch, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def held_out_loss(bundle, trainer, images, controls) -> float:
    """The denoising loss on ``images`` given ``controls``, averaged over 24 fixed (noise, timestep) draws."""
    from diffcore.training.objectives import diffusion_loss

    batch = {"image": images, "caption": ["a box"] * len(images)}
    total = 0.0
    with torch.no_grad():
        for seed in range(24):
            generator = torch.Generator().manual_seed(1000 + seed)
            cond = bundle.training_inputs(batch, generator=generator)
            cond.update(bundle.control_inputs(trainer.controlnet, controls, scale=1.0))
            total += float(diffusion_loss(bundle, bundle.training_latents(batch), cond, generator, trainer.timesteps))
    return total / 24


def test_the_trained_controlnet_uses_its_control_image(sdxl_folder, tmp_path):
    """Before training the ControlNet is a no-op (zero convs: its own and another box's edge map give
    the same loss); after 80 steps the denoising loss on the boxes with their own edge maps is
    clearly below the loss with the next box's (the stated metric: at least 5% lower; 0.367 against
    0.404 here). The base stays frozen, and the trained ControlNet loads back as a file."""
    bundle, trainer = build(sdxl_folder)
    images = Boxes().images
    edges = trainer.conditioning_image({"image": images})
    shuffled = edges.roll(1, dims=0)
    assert held_out_loss(bundle, trainer, images, edges) == held_out_loss(bundle, trainer, images, shuffled)
    unet = {k: v.clone() for k, v in bundle.network.state_dict().items() if not k.startswith("controlnet.")}
    fit(bundle, trainer)
    matched, mismatched = (held_out_loss(bundle, trainer, images, c) for c in (edges, shuffled))
    print(f"matched {matched:.4f} mismatched {mismatched:.4f}")
    assert matched < 0.95 * mismatched
    after = bundle.network.state_dict()
    assert all(torch.equal(after[k], v) for k, v in unet.items())

    from safetensors.torch import save_file

    from diffcore_sdxl.controlnet import load_controlnet

    save_file({k: v.contiguous() for k, v in trainer.state_dict(bundle.network).items()}, tmp_path / "cn.safetensors")
    loaded = load_controlnet(tmp_path / "cn.safetensors", bundle.network.params)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trainer.controlnet.state_dict().items())


def test_resume_is_bit_exact(sdxl_folder, tmp_path):
    """4 steps straight == 2, stop, resume = "latest", 2 more: the ControlNet's weights bit for bit."""
    import diffcore.training.loop as loop

    if not hasattr(loop, "to_device"):
        pytest.skip("the loop does not carry captions in batches yet (the training issue's data work)")

    def run(out, **changes):
        bundle, trainer = build(sdxl_folder)
        s = settings(out, steps=4, batch_size=4, lr=1e-2, checkpoint_every=2, **changes)
        train(s, bundle=bundle, trainer=trainer, dataset=Boxes(), output_dir=out, config={})
        return trainer.controlnet.state_dict()

    straight = run(tmp_path / "a")
    bundle, trainer = build(sdxl_folder)
    s = settings(tmp_path / "b", steps=4, batch_size=4, lr=1e-2, checkpoint_every=2)
    train(s, bundle=bundle, trainer=trainer, dataset=Boxes(), output_dir=tmp_path / "b", config={}, stop_after=2)
    resumed = run(tmp_path / "b", resume="latest")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
