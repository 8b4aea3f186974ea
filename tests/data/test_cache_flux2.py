"""The caches with a real family: a tiny random FLUX.2 klein-base folder (diffusers layout) whose
autoencoder and Qwen3 text encoder load lazily. A cached run never loads them; cached and
uncached batches give the same loss."""

import pytest
import torch
from PIL import Image

pytest.importorskip("diffcore_flux2")
pytest.importorskip("diffusers")

from diffcore.data.cache import cache_dataset  # noqa: E402
from diffcore.data.captions import CaptionedDataset  # noqa: E402
from diffcore.testing import plugins_for_test  # noqa: E402

SEQ = 8
WORDS = "a the red blue cat dog on mat sign photo of".split()
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {% if m['content'] is string %}{{ m['content'] }}"
            "{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %} <|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant {% if enable_thinking is defined and not "
            "enable_thinking %}<think> </think> {% endif %}{% endif %}")


def _jitter(module, std, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def klein_folder(tmp_path_factory):
    """transformer/, vae/, text_encoder/, tokenizer/ of tiny random models, shaped like our tiny-klein."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    from diffcore_flux2.model import VARIANTS
    from diffcore_flux2.vae import AE_VARIANTS

    root = tmp_path_factory.mktemp("klein-base")
    p = VARIANTS["tiny-klein"]
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(
        in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
        attention_head_dim=p.head_dim, num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
        axes_dims_rope=p.axes_dim, rope_theta=p.theta, mlp_ratio=p.mlp_ratio, guidance_embeds=False)
    _jitter(transformer, 0.05, 1)
    a = AE_VARIANTS["tiny"]
    vae = AutoencoderKLFlux2(block_out_channels=tuple(a.ch * m for m in a.ch_mult),
                             down_block_types=("DownEncoderBlock2D",) * len(a.ch_mult),
                             up_block_types=("UpDecoderBlock2D",) * len(a.ch_mult),
                             layers_per_block=a.num_res_blocks, latent_channels=a.z_channels)
    _jitter(vae, 0.05, 2)
    special = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(special + WORDS + ["user", "assistant", "system"]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(special[2:])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        chat_template=TEMPLATE)
    llm = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                       head_dim=8, max_position_embeddings=64, tie_word_embeddings=False))
    for name, part in dict(transformer=transformer, vae=vae, text_encoder=llm, tokenizer=tokenizer).items():
        part.save_pretrained(root / name)
    return root


def bundle_of(folder):
    from diffcore_flux2.plugin import Flux2Config, build_flux2

    return build_flux2(Flux2Config(path=str(folder), dtype="float32", max_sequence_length=SEQ))


def full_trainer(bundle):
    from diffcore.api import registry, structure

    with plugins_for_test():
        full = registry("trainers").get("full")
        return full.factory(structure({"timestep_sampling": "uniform", "cond_dropout": 0.5}, full.config), bundle)


def test_a_cached_flux2_run_loads_neither_encoder(klein_folder, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i, (w, h) in enumerate([(32, 32), (64, 32), (32, 64), (48, 48)]):
        pixels = torch.rand(h, w, 3, generator=torch.Generator().manual_seed(i)) * 255
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(["a red cat", "the blue dog on the mat", "a sign", "photo of a cat"][i])

    def dataset():
        return CaptionedDataset(data, resolution=32, bucket_resolution_steps=16, min_bucket_resolution=16,
                                max_bucket_resolution=64, flip=True)

    first = bundle_of(klein_folder)
    assert not first.loaded("vae") and not first.loaded("text")
    cache_dataset(dataset(), first, tmp_path / "cache", say=lambda t: None)
    assert first.loaded("vae") and first.loaded("text")

    second = bundle_of(klein_folder)
    said = []
    cached = cache_dataset(dataset(), second, tmp_path / "cache", say=said.append)
    assert not second.loaded("vae") and not second.loaded("text")
    assert "(0 encoded now)" in said[0] and "autoencoder stayed unloaded" in said[1]
    print("\n".join(said))

    plain = dataset()
    keys = [(1, 3), (1, 4)]          # one bucket: the 64 x 32 image twice, with different flips
    batch = torch.utils.data.default_collate([cached[k] for k in keys])
    raw = torch.utils.data.default_collate([plain[k] for k in keys])
    assert batch["latents"].shape[0] == 2 and "image" not in batch and batch["text"]["txt"].shape == (2, SEQ, 48)
    loss = full_trainer(second).loss(second, batch, torch.Generator().manual_seed(3))
    assert not second.loaded("vae") and not second.loaded("text")    # caption dropout read the cached ""
    expected = full_trainer(first).loss(first, raw, torch.Generator().manual_seed(3))
    print(f"FLUX.2 klein loss cached {loss.item():.7f} uncached {expected.item():.7f}")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_train_job_trains_a_flux2_lora_from_its_caches(klein_folder, tmp_path, monkeypatch):
    """``[job] cache_latents`` / ``cache_text_embeddings`` through the train job (LoRA, buckets,
    caption dropout): the second run, with everything cached, never loads either encoder."""
    import diffcore.data.cache as cache
    from diffcore.config.structure import structure
    from diffcore.jobs import JobContext
    from diffcore.jobs.train import TrainJob, run_train

    data = tmp_path / "data"
    data.mkdir()
    for i, (w, h) in enumerate([(32, 32), (40, 36), (64, 32), (60, 30)]):
        pixels = torch.rand(h, w, 3, generator=torch.Generator().manual_seed(i)) * 255
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(["a red cat", "a blue dog", "the sign", "a cat on the mat"][i])
    bundles, real = [], cache.cache_for_job

    def remember(dataset, bundle, *args, **kwargs):   # the job's bundle, to ask what it loaded
        bundles.append(bundle)
        return real(dataset, bundle, *args, **kwargs)

    monkeypatch.setattr(cache, "cache_for_job", remember)

    def run(out):
        with plugins_for_test():
            job = structure({
                "job": {"output_dir": str(out), "device": "cpu", "seed": 1, "steps": 2, "batch_size": 2, "lr": 1e-3,
                        "log_every": 1, "checkpoint_every": 0, "cache_latents": True, "cache_text_embeddings": True,
                        "cache_dir": str(tmp_path / "cache")},
                "model": {"family": "flux2", "path": str(klein_folder), "dtype": "float32",
                          "max_sequence_length": SEQ},
                "dataset": {"name": "captioned", "path": str(data), "resolution": 32, "bucket_resolution_steps": 16,
                            "min_bucket_resolution": 16, "max_bucket_resolution": 64},
                "trainer": {"name": "lora", "rank": 4, "cond_dropout": 0.5}}, TrainJob)
            return run_train(job, JobContext(file=None, output_dir=out, resolved={}))

    first = run(tmp_path / "a")
    assert bundles[0].loaded("vae") and bundles[0].loaded("text")
    second = run(tmp_path / "b")
    assert not bundles[1].loaded("vae") and not bundles[1].loaded("text")
    assert first.losses == second.losses and len(first.losses) == 2
