"""FLUX.1 training: the contract (lazy encoders, diffusers' prompt embeddings, caption dropout,
train guidance, LoRA targets in both namings), one LoRA step against diffusers +
peft (loss and adapter gradients), gradient checkpointing, and LoRA runs through the training
loop: adapters-only checkpoints, exact resume, and a measured improvement on the training images."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file

from diffcore.api import ConfigError, registry, structure
from diffcore.testing import plugins_for_test
from diffcore_flux1.plugin import Flux1Config, build_flux1

pytest.importorskip("peft")

SEQ = 16
CAPTIONS = ["a red cat on the mat", "a blue dog", "the sign", "a cat"]


def bundle_of(folder, **overrides):
    return build_flux1(Flux1Config(path=str(folder), **{"dtype": "float32", "max_sequence_length": SEQ, **overrides}))


def trainer(name, bundle, **config):
    with plugins_for_test():
        component = registry("trainers").get(name)
        return component.factory(structure({"timestep_sampling": "uniform", **config}, component.config), bundle)


def images(n: int, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encoders_load_on_first_use_and_match_diffusers(tiny_pipeline):
    folder, pipe = tiny_pipeline
    bundle = bundle_of(folder)
    identity = bundle.encoder_identity()
    assert set(identity) == {"vae", "text"} and not bundle.loaded("vae") and not bundle.loaded("text")
    cached = {"latents": torch.randn(2, 64, 4, 4), "text": {"txt": torch.randn(2, SEQ, 48), "vec": torch.randn(2, 32)}}
    bundle.empty_text = {"txt": torch.zeros(1, SEQ, 48), "vec": torch.zeros(1, 32)}
    loss = trainer("full", bundle, cond_dropout=0.5).loss(bundle, cached, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and not bundle.loaded("vae") and not bundle.loaded("text")

    text = bundle.encode_captions(CAPTIONS[:2])
    assert bundle.loaded("text") and not bundle.loaded("vae")
    with torch.no_grad():
        txt, vec, _ = pipe.encode_prompt(CAPTIONS[:2], prompt_2=None, max_sequence_length=SEQ)
    torch.testing.assert_close(text["txt"], txt, rtol=0, atol=1e-6)
    torch.testing.assert_close(text["vec"], vec, rtol=0, atol=1e-6)
    bundle.encode(images(1))
    assert bundle.loaded("vae")
    assert bundle_of(folder).encoder_identity() == identity
    assert bundle_of(folder, max_sequence_length=SEQ + 1).encoder_identity()["text"] != identity["text"]


def test_caption_dropout_swaps_in_the_empty_prompt_and_guidance_is_the_train_value(tiny_pipeline):
    bundle = bundle_of(tiny_pipeline[0], train_guidance=2.0)
    batch = {"caption": CAPTIONS}
    kept = bundle.training_inputs(batch)
    dropped = bundle.training_inputs(batch, dropout=1.0, generator=torch.Generator().manual_seed(0))
    empty = bundle.encode_captions([""])
    assert torch.equal(dropped["txt"], empty["txt"].expand(4, -1, -1))
    assert torch.equal(dropped["vec"], empty["vec"].expand(4, -1))
    assert not torch.equal(kept["txt"], dropped["txt"])
    assert torch.equal(kept["guidance"], torch.full((4,), 2.0))
    some = bundle.training_inputs(batch, dropout=0.5, generator=torch.Generator().manual_seed(1))  # draws .76 .28 .40 .73
    rows = [torch.equal(some["vec"][i], empty["vec"][0]) for i in range(4)]
    assert rows == [False, True, True, False]
    with pytest.raises(ConfigError, match="neither caption nor cached text"):
        bundle.training_inputs({"image": images(1)})


def test_lora_targets_in_both_namings(tiny_pipeline):
    bundle = bundle_of(tiny_pipeline[0])
    assert bundle.lora_targets(["to_q"]) == ["double_blocks.0.img_attn.qkv", "double_blocks.1.img_attn.qkv",
                                            "single_blocks.0.linear1", "single_blocks.1.linear1"]
    assert bundle.lora_targets(["transformer.transformer_blocks.1.attn.add_k_proj"]) == ["double_blocks.1.txt_attn.qkv"]
    assert bundle.lora_targets(["double_blocks.*.img_attn.qkv"]) == bundle.lora_targets(["transformer_blocks.*.attn.to_v"])
    attention = bundle.lora_targets("attention")
    assert len(attention) == 2 * 4 + 2 and set(attention) < set(bundle.lora_targets("attention-mlp"))
    with pytest.raises(ConfigError, match="'to_qq' matches no linear layer"):
        bundle.lora_targets(["to_qq"])
    with pytest.raises(ConfigError, match="unknown LoRA target preset 'atention'"):
        bundle.lora_targets("atention")


# one-to-one pairs (ours, diffusers) and the fused qkv whose diffusers parts share one A
PAIRS = [("double_blocks.0.img_attn.proj", "transformer_blocks.0.attn.to_out.0"),
         ("double_blocks.1.txt_mlp.2", "transformer_blocks.1.ff_context.net.2"),
         ("single_blocks.0.linear2", "single_transformer_blocks.0.proj_out")]
QKV = ("double_blocks.1.img_attn.qkv", [f"transformer_blocks.1.attn.to_{p}" for p in "qkv"])


def test_one_lora_step_matches_diffusers_and_peft(tiny_pipeline):
    """The same adapters on diffusers' FluxTransformer2DModel (peft) and on diffcore's FLUX.1 (the
    lora trainer): equal loss, and equal adapter gradients once converted between the layouts
    (a fused qkv adapter = three diffusers adapters sharing A; its dA is the sum of theirs)."""
    from diffusers import FluxPipeline
    from peft import LoraConfig, inject_adapter_in_model

    folder, pipe = tiny_pipeline
    bundle = bundle_of(folder)
    lora = trainer("lora", bundle, rank=4, alpha=8, target_modules=[QKV[0], *(ours for ours, _ in PAIRS)])
    theirs = copy.deepcopy(pipe.transformer).float()
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=[*QKV[1], *(t for _, t in PAIRS)]), theirs)
    ours = dict(bundle.network.named_modules())
    modules = dict(theirs.named_modules())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():   # random B too, so every path carries signal; copy ours into theirs
        for name in [QKV[0], *(o for o, _ in PAIRS)]:
            ours[name].lora_B.default.weight.copy_(torch.randn(ours[name].lora_B.default.weight.shape, generator=g))
        for o, t in PAIRS:
            modules[t].lora_A.default.weight.copy_(ours[o].lora_A.default.weight)
            modules[t].lora_B.default.weight.copy_(ours[o].lora_B.default.weight)
        for t, b in zip(QKV[1], ours[QKV[0]].lora_B.default.weight.chunk(3)):
            modules[t].lora_A.default.weight.copy_(ours[QKV[0]].lora_A.default.weight)
            modules[t].lora_B.default.weight.copy_(b)

    x0 = torch.randn(2, 64, 4, 4, generator=g)
    text = {"txt": torch.randn(2, SEQ, 48, generator=g), "vec": torch.randn(2, 32, generator=g)}
    loss = lora.loss(bundle, {"latents": x0, "text": text}, torch.Generator().manual_seed(11))
    loss.backward()

    gen = torch.Generator().manual_seed(11)      # the objective's draws, in its order
    noise, u = torch.randn(x0.shape, generator=gen), torch.rand(2, generator=gen)
    x = (1 - u.view(-1, 1, 1, 1)) * x0 + u.view(-1, 1, 1, 1) * noise
    pred = theirs(hidden_states=rearrange(x, "b c h w -> b (h w) c"), encoder_hidden_states=text["txt"],
                  pooled_projections=text["vec"], timestep=u, guidance=torch.full((2,), 3.5),
                  img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
                  txt_ids=torch.zeros(SEQ, 3)).sample
    expected = F.mse_loss(rearrange(pred, "b (h w) c -> b c h w", h=4), noise - x0)
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 1e-5

    def grads(module):
        return module.lora_A.default.weight.grad, module.lora_B.default.weight.grad

    for o, t in PAIRS:
        for mine, ref in zip(grads(ours[o]), grads(modules[t])):
            torch.testing.assert_close(mine, ref, rtol=0, atol=1e-5)
    d_a, d_b = grads(ours[QKV[0]])
    torch.testing.assert_close(d_a, sum(grads(modules[t])[0] for t in QKV[1]), rtol=0, atol=1e-5)
    torch.testing.assert_close(d_b, torch.cat([grads(modules[t])[1] for t in QKV[1]]), rtol=0, atol=1e-5)
    assert {n for n, p in bundle.network.named_parameters() if p.requires_grad} == \
        {n for n, _ in bundle.network.named_parameters() if ".lora_" in n}


def test_gradient_checkpointing_gives_the_same_gradients(tiny_pipeline):
    bundle = bundle_of(tiny_pipeline[0])
    lora = trainer("lora", bundle, rank=2, target_modules="attention-mlp")
    batch = {"latents": torch.randn(2, 64, 4, 4), "text": {"txt": torch.randn(2, SEQ, 48), "vec": torch.randn(2, 32)}}
    results = []
    for on in (False, True):
        bundle.network.gradient_checkpointing = on
        bundle.network.zero_grad()
        lora.loss(bundle, batch, torch.Generator().manual_seed(0)).backward()
        results.append([p.grad.clone() for p in lora.trainable_parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


SIZES = [(16, 16), (16, 24), (24, 16), (16, 32), (32, 16), (24, 24), (20, 28), (24, 32)]   # (h, w), 8 shapes


def captioned_folder(root):
    """8 captioned images of 8 aspect ratios (smooth colour fields, so a tiny model can learn them)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(42)
    for i, size in enumerate(SIZES):
        field = F.interpolate(torch.rand(1, 3, 2, 2, generator=g), size=size, mode="bilinear")[0]
        Image.fromarray((field * 255).round().byte().permute(1, 2, 0).numpy()).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"image {i} of the set")
    return root


def lora_job(folder, data, out, trainer=None, **job):
    """Run a LoRA train job file on the captioned folder (aspect-ratio buckets of about 24^2 pixels)."""
    import tomli_w

    from diffcore.testing import run_job_file

    table = {"job": {"kind": "train", "output_dir": str(out), "device": "cpu", "seed": 3, "steps": 6,
                     "batch_size": 1, "lr": 3e-3, "ema_decay": 0.9, "log_every": 1, "checkpoint_every": 3,
                     "keep_last": 5, **job},
             "model": {"family": "flux1", "path": str(folder), "dtype": "float32", "max_sequence_length": SEQ},
             "dataset": {"name": "captioned", "path": str(data), "resolution": 24, "bucket_resolution_steps": 8,
                         "min_bucket_resolution": 16, "max_bucket_resolution": 40},
             "trainer": {"name": "lora", "rank": 8, "target_modules": "all-linear", "timestep_sampling": "flux-shift",
                         "cond_dropout": 0.1, **(trainer or {})}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.toml").write_text(tomli_w.dumps(table))
    with plugins_for_test():
        return run_job_file(out / "job.toml")


def adapters(bundle):
    return {k: v for k, v in bundle.network.state_dict().items() if ".lora_" in k}


def test_lora_checkpoints_hold_the_adapters_and_resume_exactly(tiny_pipeline, tmp_path):
    folder, data = tiny_pipeline[0], captioned_folder(tmp_path / "data")
    straight = lora_job(folder, data, tmp_path / "straight")
    first = lora_job(folder, data, tmp_path / "resumed", steps=3)   # stops after 3 of the 6 (constant lr)
    assert first.step == 3
    second = lora_job(folder, data, tmp_path / "resumed", resume="latest")
    assert second.step == 6
    a, b = adapters(straight.bundle), adapters(second.bundle)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-000006"
    model, ema = load_file(checkpoint / "model.safetensors"), load_file(checkpoint / "ema.safetensors")
    assert set(model) == set(ema) == set(a)
    assert sum(t.numel() for t in model.values()) < 0.5 * sum(p.numel() for p in straight.bundle.network.parameters())
    resumed_ema = load_file(tmp_path / "resumed" / "checkpoints" / "step-000006" / "ema.safetensors")
    assert all(torch.equal(resumed_ema[k], ema[k]) for k in ema)
    exported = load_file(tmp_path / "straight" / "lora.safetensors")
    assert torch.equal(exported["double_blocks.0.img_attn.qkv.lora_B.weight"],
                       a["double_blocks.0.img_attn.qkv.lora_B.default.weight"])
    assert (tmp_path / "straight" / "lora-ema.safetensors").is_file()


def x0_error(bundle, data, seeds=(100, 101), sigmas=(0.35, 0.6, 0.85)) -> float:
    """Mean squared error of one-step x0 predictions ``x - sigma v`` over the training images (at
    their bucket sizes), at noise drawn from seeds the training never used."""
    from diffcore.api import registry

    with plugins_for_test():
        captioned = registry("datasets").get("captioned")
        dataset = captioned.factory(structure({"path": str(data), "resolution": 24, "bucket_resolution_steps": 8,
                                               "min_bucket_resolution": 16, "max_bucket_resolution": 40},
                                              captioned.config))
    errors = []
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            x0 = bundle.encode(item["image"][None])
            cond = bundle.training_inputs({"caption": [item["caption"]]})
            for seed in seeds:
                noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed * 31 + i))
                for s in sigmas:
                    x = (1 - s) * x0 + s * noise
                    v = bundle.forward(x, torch.tensor([s]), **cond)
                    errors.append(F.mse_loss(x - s * v, x0).item())
    return sum(errors) / len(errors)


def test_a_lora_run_learns_its_training_images(tiny_pipeline, tmp_path):
    data = captioned_folder(tmp_path / "data")
    result = lora_job(tiny_pipeline[0], data, tmp_path / "run", steps=150, lr=1e-2, checkpoint_every=0,
                      ema_decay=0.0, log_every=50, validate_every=75, validation_prompts=["image 0 of the set"],
                      validation_seeds=[1, 2], validation_size=[16, 16], sampling_steps=2)
    bundle = result.bundle
    bundle.network.eval()
    trained = x0_error(bundle, data)
    for module in bundle.network.modules():   # the base model: every adapter off
        if hasattr(module, "enable_adapters"):
            module.enable_adapters(False)
    base = x0_error(bundle, data)
    assert trained < base / 1.5, (base, trained)   # measured: 0.581 -> 0.323 (1.8x)
    run = tmp_path / "run"
    assert (run / "samples" / "step-000075.png").is_file() and (run / "grid.png").is_file()
    assert sorted(p.name for p in (run / "samples" / "step-000150").iterdir()) == \
        ["prompt-0-seed-1.png", "prompt-0-seed-2.png"]



@pytest.mark.parametrize("fmt", ["diffcore", "diffusers", "kohya"])
def test_the_trained_lora_file_loads_back(tiny_pipeline, tmp_path, fmt):
    """``save_format``: the run's lora.safetensors in that format gives back the trained adapters."""
    from diffcore.api import load_lora

    folder, data = tiny_pipeline[0], captioned_folder(tmp_path / "data")
    result = lora_job(folder, data, tmp_path / "run", trainer={"save_format": fmt}, steps=2, checkpoint_every=0)
    loaded = load_lora(tmp_path / "run" / "lora.safetensors", bundle_of(folder))
    trained = adapters(result.bundle)
    assert len(loaded) == len(trained) // 2
    for name, layer in loaded.items():
        up, down = trained[f"{name}.lora_B.default.weight"], trained[f"{name}.lora_A.default.weight"]
        torch.testing.assert_close(layer.delta(), up @ down * (8 / 8), rtol=1e-6, atol=1e-6)


TE = {"train_text_encoder": True, "text_encoder_rank": 4, "text_encoder_lr": 5e-3, "target_modules": "attention"}


def split_adapters(result):
    """(network adapters, CLIP adapters) of a run's bundle, by state-dict name."""
    clip = {k: v for k, v in result.bundle.text.clip.state_dict().items() if ".lora_" in k}
    return adapters(result.bundle), clip


def test_text_encoder_lora_trains_clip_adapters_only_and_resumes_exactly(tiny_pipeline, tmp_path):
    folder, data = tiny_pipeline[0], captioned_folder(tmp_path / "data")
    straight = lora_job(folder, data, tmp_path / "straight", trainer=TE, steps=4, checkpoint_every=2)
    lora_job(folder, data, tmp_path / "resumed", trainer=TE, steps=2, checkpoint_every=2)
    resumed = lora_job(folder, data, tmp_path / "resumed", trainer=TE, steps=4, checkpoint_every=2, resume="latest")
    (net_a, clip_a), (net_b, clip_b) = split_adapters(straight), split_adapters(resumed)
    assert len(clip_a) == 2 * 4 and all(".self_attn." in k for k in clip_a)   # q, k, v, out of the one layer
    for a, b in ((net_a, net_b), (clip_a, clip_b)):
        assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(clip_a[k].abs().max() > 0 for k in clip_a if "lora_B" in k)   # B starts at zero: it trained
    base = bundle_of(folder).text.clip.state_dict()
    trained = {k.replace(".base_layer", ""): v for k, v in straight.bundle.text.clip.state_dict().items()
               if ".lora_" not in k}
    assert trained.keys() == base.keys() and all(torch.equal(trained[k], base[k]) for k in base)
    assert all(not p.requires_grad for p in straight.bundle.text.t5.parameters())
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-000004"
    model, ema = load_file(checkpoint / "model.safetensors"), load_file(checkpoint / "ema.safetensors")
    text_keys = {f"text_encoder.{k}" for k in clip_a}
    assert set(model) == set(ema) == set(net_a) | text_keys
    resumed_ema = load_file(tmp_path / "resumed" / "checkpoints" / "step-000004" / "ema.safetensors")
    assert all(torch.equal(resumed_ema[k], ema[k]) for k in ema)
    exported = load_file(tmp_path / "straight" / "lora.safetensors")
    assert torch.equal(exported["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"],
                       clip_a["encoder.layers.0.self_attn.q_proj.lora_B.default.weight"])
    assert exported["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.alpha"].item() == 4


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_text_encoder_lora_file_gives_diffusers_prompt_embeddings(tiny_pipeline, tmp_path, fmt):
    """The exported file in diffcore (merged or hooked) and, diffusers' format, in diffusers'
    FluxPipeline (load_lora_weights) gives the trained encoder's embeddings; the keys are diffusers' /
    kohya's (alpha kept: rank 3, alpha 1.5)."""
    from diffusers import FluxPipeline

    from diffcore.api import apply_lora_to_bundle, describe_lora, load_lora

    folder = tiny_pipeline[0]
    bundle = bundle_of(folder)
    lora = trainer("lora", bundle, rank=2, alpha=4, target_modules="attention", train_text_encoder=True,
                   text_encoder_rank=3, text_encoder_alpha=1.5, save_format=fmt)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = lora.export(tmp_path, bundle=bundle)[0]
    keys = set(load_file(path))
    te_key = {"diffusers": "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
              "kohya": "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"}[fmt]
    per_layer = 3 if fmt == "kohya" else 2   # down, up (and alpha)
    assert te_key in keys and sum(k.startswith(("text_encoder.", "lora_te1_")) for k in keys) == 4 * per_layer
    with torch.no_grad():
        trained = bundle.encode_captions(CAPTIONS)["vec"]
        base = bundle_of(folder).encode_captions(CAPTIONS)["vec"]
    assert (trained - base).abs().max() > 1e-2
    for merge in (True, False):
        mine = bundle_of(folder)
        apply_lora_to_bundle(mine, load_lora(path, mine), merge=merge)
        with torch.no_grad():
            torch.testing.assert_close(mine.encode_captions(CAPTIONS)["vec"], trained, rtol=0, atol=1e-5)
    if fmt == "diffusers":   # (diffusers' kohya FLUX reader splits linear1 at the full model's sizes)
        pipe = FluxPipeline.from_pretrained(folder, dtype=torch.float32)
        pipe.load_lora_weights(str(path))
        with torch.no_grad():
            _, pooled, _ = pipe.encode_prompt(CAPTIONS, prompt_2=None, max_sequence_length=SEQ)
        torch.testing.assert_close(pooled, trained, rtol=0, atol=1e-6)
    output = "\n".join(describe_lora(path, bundle_of(folder)))
    assert "text-encoder targets: text_encoder: 4" in output and "on text_encoder: 4 layers" in output


def test_text_encoder_lora_refuses_the_text_cache(tiny_pipeline, tmp_path):
    with pytest.raises(ConfigError, match=r"job\.cache_text_embeddings = true .* trainer\.train_text_encoder = true"):
        lora_job(tiny_pipeline[0], captioned_folder(tmp_path / "data"), tmp_path / "run", trainer=TE, steps=1,
                 cache_text_embeddings=True)
