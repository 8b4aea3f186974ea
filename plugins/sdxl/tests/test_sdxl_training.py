"""The training contract: lazy encoders with identities (what the latent / text caches key by),
cached text read back as encoded, per-sample micro-conditioning, LoRA presets and diffusers names."""

import torch

from diffcore_sdxl.model import label_vector
from diffcore_sdxl.plugin import SDXLConfig, build_sdxl
from diffcore_sdxl.text import micro_conditioning


def test_training_contract(tiny_pipelines, diffusers_unet):
    bundle = build_sdxl(SDXLConfig(path=str(tiny_pipelines["base"][0]), dtype="float32"))
    assert not bundle.loaded("vae") and not bundle.loaded("text")   # nothing loaded yet
    identity = bundle.encoder_identity()
    assert set(identity) == {"vae", "text"} and not bundle.loaded("text")

    captions = ["a red cat", ""]
    text = bundle.encode_captions(captions)
    assert text["context"].shape == (2, 77, 48) and text["pooled"].shape == (2, 32)
    assert not text["context"][1].any() and not text["pooled"][1].any()   # empty caption: base's zeros
    batch = {"latents": torch.zeros(2, 4, 8, 6), "original_size": torch.tensor([[40, 30], [16, 12]]),
             "crop_top_left": torch.tensor([[2, 0], [0, 0]])}
    cached = bundle.training_inputs({**batch, "text": text})
    encoded = bundle.training_inputs({**batch, "caption": captions})
    assert torch.equal(cached["context"], encoded["context"]) and torch.equal(cached["y"], encoded["y"])
    ids = torch.tensor([micro_conditioning(16, 12, aesthetic=False, original_size=(40, 30), crop=(2, 0)),
                        micro_conditioning(16, 12, aesthetic=False, original_size=(16, 12))])
    assert ids.tolist() == [[40, 30, 2, 0, 16, 12], [16, 12, 0, 0, 16, 12]]
    assert torch.equal(cached["y"], label_vector(text["pooled"], ids, 8))
    dropped = bundle.training_inputs({**batch, "text": text}, dropout=1.0)
    assert not dropped["context"].any()

    targets = bundle.lora_targets("attention")
    assert targets and all(t.rsplit(".", 2)[-2] in ("attn1", "attn2") or t.endswith("to_out.0") for t in targets)
    theirs = dict(diffusers_unet().named_modules())
    linears = [n for n, m in bundle.network.named_modules() if isinstance(m, torch.nn.Linear)]
    pairs = bundle.diffusers_modules(linears)
    assert len(pairs) == len(linears) and all(isinstance(theirs[d], torch.nn.Linear) for d, _ in pairs)
    assert bundle.lora_targets(["down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k"]) == \
        ["input_blocks.8.1.transformer_blocks.0.attn2.to_k"]


def test_lora_step_loss_is_diffusers_epsilon_loss(tiny_pipelines):
    """One step of the core's ``lora`` trainer (adapters start at zero, so the network is the base
    UNet): its loss equals the epsilon loss through diffusers' UNet2DConditionModel on the same
    weights, noise and timesteps; the step moves only the adapters."""
    import torch.nn.functional as F

    from diffcore.api import registry, structure
    from diffcore.testing import plugins_for_test

    folder, pipe = tiny_pipelines["base"]
    bundle = build_sdxl(SDXLConfig(path=str(folder), dtype="float32"))
    with plugins_for_test():
        lora = registry("trainers").get("lora")
        trainer = lora.factory(structure({"rank": 4, "target_modules": "attention", "cond_dropout": 0.0},
                                         lora.config), bundle)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    captions = ["a red cat", "a blue dog"]
    batch = {"latents": latents, "caption": captions, "original_size": torch.tensor([[32, 32], [20, 16]]),
             "crop_top_left": torch.tensor([[0, 0], [4, 2]])}
    loss = trainer.loss(bundle, batch, torch.Generator().manual_seed(7))
    loss.backward()
    optimizer = torch.optim.SGD(trainer.trainable_parameters(), lr=1e-2)
    optimizer.step()

    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
        g = torch.Generator().manual_seed(7)
        noise = torch.randn(latents.shape, generator=g)
        t = (torch.rand(2, generator=g).double() * 1000).long()
        abar = pipe.scheduler.alphas_cumprod.double()[t]
        a, b = (abar.sqrt().float().view(-1, 1, 1, 1), (1 - abar).sqrt().float().view(-1, 1, 1, 1))
        time_ids = torch.tensor([[32.0, 32, 0, 0, 16, 16], [20, 16, 4, 2, 16, 16]])
        pred = pipe.unet(a * latents + b * noise, t, encoder_hidden_states=context,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        expected = F.mse_loss(pred, noise)
    print(f"SDXL LoRA step loss {loss.item():.7f} vs diffusers epsilon loss {expected.item():.7f}")
    assert abs(loss.item() - expected.item()) <= 1e-5


def test_lora_train_job_with_caches_runs(tiny_pipelines, tmp_path):
    """A LoRA train job file on captioned images of 4 aspect ratios (buckets give each image's
    original size and crop), latents and text cached: adapters move and lora.safetensors is written."""
    import tomli_w
    import torch.nn.functional as F
    from PIL import Image

    from diffcore.testing import plugins_for_test, run_job_file

    data = tmp_path / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(42)
    for i, size in enumerate([(16, 16), (16, 24), (24, 16), (24, 24)]):
        field = F.interpolate(torch.rand(1, 3, 2, 2, generator=g), size=size, mode="bilinear")[0]
        Image.fromarray((field * 255).round().byte().permute(1, 2, 0).numpy()).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"image {i} of the set")
    out = tmp_path / "run"
    out.mkdir()
    table = {"job": {"kind": "train", "output_dir": str(out), "device": "cpu", "seed": 3, "steps": 4, "batch_size": 1,
                     "lr": 3e-3, "log_every": 1, "checkpoint_every": 0, "cache_latents": True,
                     "cache_text_embeddings": True, "cache_dir": str(tmp_path / "cache")},
             "model": {"family": "sdxl", "path": str(tiny_pipelines["base"][0]), "dtype": "float32"},
             "dataset": {"name": "captioned", "path": str(data), "resolution": 24, "bucket_resolution_steps": 8,
                         "min_bucket_resolution": 16, "max_bucket_resolution": 40},
             "trainer": {"name": "lora", "rank": 4, "target_modules": "attention", "cond_dropout": 0.25}}
    (out / "job.toml").write_text(tomli_w.dumps(table))
    with plugins_for_test():
        result = run_job_file(out / "job.toml")
    assert result.step == 4
    adapters = {k: v for k, v in result.bundle.network.state_dict().items() if "lora_B" in k}
    assert adapters and any(v.abs().sum() > 0 for v in adapters.values())
    assert (out / "lora.safetensors").is_file()


def test_text_encoder_lora_trains_both_clips_and_its_file_gives_diffusers_embeddings(tiny_pipelines, tmp_path):
    """A LoRA job with ``train_text_encoder``: adapters on CLIP-L and bigG train (their base stays),
    lora.safetensors holds them as ``text_encoder.`` / ``text_encoder_2.``, and diffusers'
    StableDiffusionXLPipeline with the file loaded gives the prompt embeddings of the trained
    encoders, as diffcore does with it merged; the kohya form (lora_te1_ / lora_te2_) round-trips."""
    import tomli_w
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image
    from safetensors.torch import load_file

    from diffcore.api import apply_lora_to_bundle
    from diffcore.testing import plugins_for_test, run_job_file

    folder = tiny_pipelines["base"][0]
    data = tmp_path / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(1)
    for i in range(2):
        Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"image {i} of the set")
    out = tmp_path / "run"
    out.mkdir()
    table = {"job": {"kind": "train", "output_dir": str(out), "device": "cpu", "seed": 3, "steps": 3, "batch_size": 1,
                     "lr": 1e-2, "log_every": 1, "checkpoint_every": 0},
             "model": {"family": "sdxl", "path": str(folder), "dtype": "float32"},
             "dataset": {"name": "captioned", "path": str(data), "resolution": 16, "bucket_resolution_steps": 8,
                         "min_bucket_resolution": 16, "max_bucket_resolution": 16},
             "trainer": {"name": "lora", "rank": 4, "target_modules": "attention", "cond_dropout": 0.25,
                         "train_text_encoder": True, "save_format": "diffusers"}}
    (out / "job.toml").write_text(tomli_w.dumps(table))
    with plugins_for_test():
        result = run_job_file(out / "job.toml")
    bundle = result.bundle
    fresh = build_sdxl(SDXLConfig(path=str(folder), dtype="float32"))
    for prefix, encoder in bundle.text_encoders().items():
        state = encoder.state_dict()
        ups = {k: v for k, v in state.items() if "lora_B" in k}
        assert len(ups) == 4 * encoder.config.num_hidden_layers, prefix
        # CLIP-L's last layer is unused (SDXL reads its penultimate states): its B stays at zero
        last = f"layers.{encoder.config.num_hidden_layers - 1}."
        assert all((v.abs().max() > 0) != (prefix == "text_encoder" and last in k) for k, v in ups.items()), prefix
        base = {k.replace(".base_layer", ""): v for k, v in state.items() if ".lora_" not in k}
        assert all(torch.equal(v, base[k]) for k, v in fresh.text_encoders()[prefix].state_dict().items())
    keys = set(load_file(out / "lora.safetensors"))
    assert {"text_encoder.text_model.encoder.layers.1.self_attn.out_proj.lora_A.weight",
            "text_encoder_2.text_model.encoder.layers.2.self_attn.q_proj.lora_B.weight"} <= keys
    captions = ["a red cat", "image 1 of the set"]
    with torch.no_grad():
        trained = bundle.encode_captions(captions)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.load_lora_weights(str(out / "lora.safetensors"))
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    torch.testing.assert_close(context, trained["context"], rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, trained["pooled"], rtol=0, atol=1e-6)

    from diffcore.api import load_lora, save_lora

    kohya = save_lora(tmp_path / "kohya.safetensors", load_lora(out / "lora.safetensors", fresh), fresh, format="kohya")
    assert {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha",
            "lora_te2_text_model_encoder_layers_2_self_attn_v_proj.lora_up.weight"} <= set(load_file(kohya))
    for path in (out / "lora.safetensors", kohya):
        mine = build_sdxl(SDXLConfig(path=str(folder), dtype="float32"))
        apply_lora_to_bundle(mine, load_lora(path, mine))
        with torch.no_grad():
            again = mine.encode_captions(captions)
        for key in ("context", "pooled"):
            torch.testing.assert_close(again[key], trained[key], rtol=0, atol=1e-5)
