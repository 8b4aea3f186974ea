"""FLUX.2 training: the contract (lazy autoencoder and text encoder, caption dropout, train
guidance, LoRA targets in both namings), the core's full-trainer loss against a flow loss computed
by hand through diffusers' models, and gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from diffcore.api import ConfigError, registry, structure
from diffcore.testing import plugins_for_test
from diffcore_flux2.convert import diffusers_modules
from diffcore_flux2.plugin import Flux2Config, build_flux2

SEQ = 16
CAPTIONS = ["a red cat on the mat", "a blue dog", "the sign", "a cat"]


def bundle_of(folder, **overrides):
    return build_flux2(Flux2Config(path=str(folder), **{"dtype": "float32", "max_sequence_length": SEQ, **overrides}))


def full_trainer(bundle, **config):
    with plugins_for_test():
        full = registry("trainers").get("full")
        return full.factory(structure({"timestep_sampling": "uniform", "cond_dropout": 0.0, **config}, full.config),
                            bundle)


def images(n: int, h: int = 16, w: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encoders_load_on_first_use(flux2_folder, make_pipeline):
    from diffusers import Flux2KleinPipeline

    root, parts = flux2_folder(False)
    bundle = bundle_of(root)
    identity = bundle.encoder_identity()
    assert set(identity) == {"vae", "text"} and not bundle.loaded("vae") and not bundle.loaded("text")
    # cached latents and text, and the empty prompt's from the cache: neither component loads
    cached = {"latents": torch.randn(2, 16, 4, 6), "text": {"txt": torch.randn(2, SEQ, 48)}}
    bundle.empty_text = {"txt": torch.zeros(1, SEQ, 48)}
    loss = full_trainer(bundle, cond_dropout=0.5).loss(bundle, cached, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and not bundle.loaded("vae") and not bundle.loaded("text")
    # captions load the text encoder only, and give diffusers' Flux2KleinPipeline.encode_prompt embeddings
    text = bundle.encode_captions(CAPTIONS[:2])
    assert bundle.loaded("text") and not bundle.loaded("vae") and set(text) == {"txt"}
    with torch.no_grad():
        expected, _ = make_pipeline(Flux2KleinPipeline, parts, is_distilled=False).encode_prompt(
            CAPTIONS[:2], max_sequence_length=SEQ, text_encoder_out_layers=(1, 2, 3))
    torch.testing.assert_close(text["txt"], expected, rtol=0, atol=1e-6)
    bundle.encode(images(1))
    assert bundle.loaded("vae")
    assert bundle_of(root).encoder_identity() == identity              # from the files: stable across loads
    assert bundle_of(root, max_sequence_length=SEQ + 1).encoder_identity()["text"] != identity["text"]


def test_caption_dropout_gives_the_empty_prompts_conditioning(flux2_folder):
    bundle = bundle_of(flux2_folder(True)[0])
    kept = bundle.training_inputs({"caption": CAPTIONS})
    assert torch.equal(kept["txt"], bundle.encode_captions(CAPTIONS)["txt"])
    assert torch.equal(kept["guidance"], torch.full((4,), 1.0))   # train_guidance, not the sampling 4.0
    drop = torch.rand(4, generator=torch.Generator().manual_seed(1)) < 0.5
    assert 0 < drop.sum() < 4
    dropped = bundle.training_inputs({"caption": CAPTIONS}, dropout=0.5, generator=torch.Generator().manual_seed(1))
    empty = bundle.encode_captions([""])["txt"]
    for i in range(4):
        assert torch.equal(dropped["txt"][i:i + 1], empty if drop[i] else kept["txt"][i:i + 1])
    # a text cache's rows and its empty prompt give the same
    cached = bundle.training_inputs({"text": {"txt": kept["txt"]}}, dropout=0.5,
                                    generator=torch.Generator().manual_seed(1))
    assert torch.equal(cached["txt"], dropped["txt"])
    assert "guidance" not in bundle_of(flux2_folder(False)[0]).training_inputs({"caption": CAPTIONS[:1]})
    with pytest.raises(ConfigError, match="captioned"):
        bundle.training_inputs({"latents": torch.zeros(1, 16, 2, 2)})
    bundle.empty_text = {"txt": torch.zeros(1, SEQ + 3, 48)}
    with pytest.raises(ConfigError, match="max_sequence_length"):
        bundle.training_inputs({"caption": CAPTIONS}, dropout=1.0, generator=torch.Generator())


@pytest.mark.parametrize("dev", [True, False], ids=["dev", "klein"])
def test_full_trainer_loss_is_diffusers_flow_loss(flux2_folder, make_pipeline, dev):
    """images + captions -> FullTrainer.loss, against diffusers' training-script convention by hand:
    ``vae.encode().mode()``, patchify, batch-norm normalise; ``(1 - s) x0 + s noise``; the
    transformer at timestep ``s`` (dev: guidance 1.0) regresses ``noise - x0``. Same noise, timesteps."""
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    root, parts = flux2_folder(dev)
    bundle = bundle_of(root, train_guidance=1.0)
    pixels = images(2)
    loss = full_trainer(bundle).loss(bundle, {"image": pixels, "caption": CAPTIONS[:2]},
                                     torch.Generator().manual_seed(7))
    loss.backward()

    pipe = make_pipeline(Flux2Pipeline if dev else Flux2KleinPipeline, parts)
    vae, transformer = parts["vae"], parts["transformer"]
    with torch.no_grad():
        x0 = pipe._patchify_latents(vae.encode(pixels).latent_dist.mode())
        std = (vae.bn.running_var + vae.config.batch_norm_eps).sqrt()
        x0 = (x0 - vae.bn.running_mean[:, None, None]) / std[:, None, None]
        txt, txt_ids = pipe.encode_prompt(CAPTIONS[:2], max_sequence_length=SEQ, text_encoder_out_layers=(1, 2, 3))
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(x0.shape, generator=g)
    s = torch.rand(2, generator=g)
    x = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise
    transformer.zero_grad(set_to_none=True)
    pred = transformer(hidden_states=pipe._pack_latents(x), timestep=s, guidance=torch.full((2,), 1.0) if dev else None,
                       encoder_hidden_states=txt, txt_ids=txt_ids, img_ids=pipe._prepare_latent_ids(x),
                       return_dict=False)[0]
    expected = F.mse_loss(rearrange(pred, "b (h w) c -> b c h w", h=x.shape[2]), noise - x0)
    expected.backward()
    print(f"FLUX.2 {'dev' if dev else 'klein'} flow loss {loss.item():.6f} vs diffusers {expected.item():.6f}")
    assert abs(loss.item() - expected.item()) <= 1e-5
    for ours, theirs in (("img_in", "x_embedder"), ("txt_in", "context_embedder")):
        torch.testing.assert_close(getattr(bundle.network, ours).weight.grad, getattr(transformer, theirs).weight.grad,
                                   rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_grads(flux2_folder):
    bundle = bundle_of(flux2_folder(True)[0])
    trainer = full_trainer(bundle)
    batch = {"latents": torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(1)),
             "text": {"txt": torch.randn(2, SEQ, 48, generator=torch.Generator().manual_seed(2))}}
    calls = []
    bundle.network.double_blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))

    def grads(checkpointing: bool):
        bundle.network.gradient_checkpointing = checkpointing
        calls.clear()
        trainer.loss(bundle, batch, torch.Generator().manual_seed(3)).backward()
        out = {n: p.grad.clone() for n, p in bundle.network.named_parameters()}
        bundle.network.zero_grad(set_to_none=True)
        return out, len(calls)

    plain, forwards = grads(False)
    checkpointed, recomputed = grads(True)
    assert (forwards, recomputed) == (1, 2)    # the block ran again in the backward pass
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-7, msg=name)


def test_lora_targets_in_both_namings(flux2_folder):
    bundle = bundle_of(flux2_folder(True)[0])
    attention = bundle.lora_targets("attention")
    assert set(attention) == {*(f"double_blocks.{i}.{s}_attn.{p}" for i in range(2) for s in ("img", "txt")
                                for p in ("qkv", "proj")), "single_blocks.0.linear1", "single_blocks.1.linear1"}
    assert set(bundle.lora_targets("attention-mlp")) - set(attention) == {
        *(f"double_blocks.{i}.{s}_mlp.{j}" for i in range(2) for s in ("img", "txt") for j in (0, 2)),
        "single_blocks.0.linear2", "single_blocks.1.linear2"}
    linears = [n for n, m in bundle.network.named_modules() if isinstance(m, torch.nn.Linear)]
    assert bundle.lora_targets("all-linear") == linears
    # diffusers' names (peft's suffix rule) land on the fused layers
    assert set(bundle.lora_targets(["to_q", "to_k", "to_v", "to_out.0"])) == {
        f"double_blocks.{i}.img_attn.{p}" for i in range(2) for p in ("qkv", "proj")}
    # diffusers' train_dreambooth_lora_flux2_klein default: the above + the single blocks
    default = ["to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out",
               "single_transformer_blocks.1.attn.to_out"]
    assert set(bundle.lora_targets(default)) == {*(f"double_blocks.{i}.img_attn.{p}" for i in range(2)
                                                   for p in ("qkv", "proj")),
                                                 *(f"single_blocks.{i}.linear{j}" for i in range(2) for j in (1, 2))}
    diffusers_names = ["add_k_proj", "to_add_out", "ff_context.linear_in", "transformer.transformer_blocks.1.attn.to_v",
                       "x_embedder", "norm_out.linear"]
    assert set(bundle.lora_targets(diffusers_names)) == {
        "double_blocks.0.txt_attn.qkv", "double_blocks.1.txt_attn.qkv", "double_blocks.0.txt_attn.proj",
        "double_blocks.1.txt_attn.proj", "double_blocks.0.txt_mlp.0", "double_blocks.1.txt_mlp.0",
        "double_blocks.1.img_attn.qkv", "img_in", "final_layer.adaLN_modulation.1"}
    assert set(bundle.lora_targets(["single_blocks.*.linear2", "qkv"])) == {
        "single_blocks.0.linear2", "single_blocks.1.linear2",
        *(f"double_blocks.{i}.{s}_attn.qkv" for i in range(2) for s in ("img", "txt"))}
    with pytest.raises(ConfigError, match="'to_qq' matches no linear layer"):
        bundle.lora_targets(["to_qq"])
    with pytest.raises(ConfigError, match="unknown LoRA target preset 'attention-mpl'"):
        bundle.lora_targets("attention-mpl")


def test_diffusers_names_cover_every_diffusers_linear(diffusers_transformer, to_ours):
    """Each linear layer of diffusers' Flux2Transformer2DModel has one counterpart of ours, and
    every name the mapping gives is one of them."""
    theirs = diffusers_transformer(True)
    ours = to_ours(theirs)
    linears = [n for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear)]
    rows = diffusers_modules(linears)
    diffusers_linears = {n for n, m in theirs.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {d for d, _ in rows} == diffusers_linears
    assert {b for _, b in rows} == set(linears)


def test_bf16_loss_follows_fp32(flux2_folder):
    """Weights stored in bfloat16 (``dtype = "bfloat16"``) and fp32 weights under bf16 autocast
    (``mixed_precision = "bf16"``) give the fp32 loss to bf16 precision, with finite gradients."""
    root, _ = flux2_folder(True)
    batch = {"image": images(2), "caption": CAPTIONS[:2]}

    def loss(bundle, autocast=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = full_trainer(bundle).loss(bundle, batch, torch.Generator().manual_seed(5))
        out.backward()
        assert all(torch.isfinite(p.grad).all() for p in bundle.network.parameters() if p.grad is not None)
        return out.item()

    reference = loss(bundle_of(root))
    stored = bundle_of(root, dtype="bfloat16")
    assert stored.network.img_in.weight.dtype == torch.bfloat16
    for what, got in (("bf16 weights", loss(stored)), ("bf16 autocast", loss(bundle_of(root), autocast=True))):
        print(f"{what}: loss {got:.5f}, fp32 {reference:.5f} (relative {abs(got - reference) / reference:.2g})")
        assert abs(got - reference) <= 0.01 * reference


def test_encoder_identity_follows_the_files(flux2_folder, diffusers_vae):
    """Changed autoencoder weights change the ``vae`` key only (the text key stays), read without loading."""
    root, _ = flux2_folder(False)
    before = bundle_of(root).encoder_identity()
    with torch.no_grad():
        diffusers_vae.bn.running_mean.add_(0.5)
    diffusers_vae.save_pretrained(root / "vae")
    bundle = bundle_of(root)
    after = bundle.encoder_identity()
    assert after["vae"] != before["vae"] and after["text"] == before["text"]
    assert not bundle.loaded("vae") and not bundle.loaded("text")
