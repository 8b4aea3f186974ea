"""The training contract: ``training_inputs`` gives the MMDiT's text conditioning for a captioned
batch (dropped to the empty prompt for CFG), and the core's full trainer takes a step on it with
SD3's logit-normal timestep sampling."""

import pytest
import torch

from diffcore.api import ConfigError, registry, structure
from diffcore.testing import plugins_for_test
from diffcore_sd3.bundle import SD3Bundle
from diffcore_sd3.load import load_transformer
from diffcore_sd3.text import SD3TextEncoder


def test_full_trainer_steps_on_sd3(tiny_pipeline):
    folder, _ = tiny_pipeline
    text = SD3TextEncoder.from_folder(folder, max_length=8)
    bundle = SD3Bundle(network=load_transformer(folder).train(), text=text)
    captions = ["a red cat", "a blue dog"]
    inputs = bundle.training_inputs({"caption": captions})
    context, y = text.encode(captions)
    assert torch.equal(inputs["context"], context) and torch.equal(inputs["y"], y)
    dropped = bundle.training_inputs({"caption": captions}, dropout=1.0, generator=torch.Generator().manual_seed(0))
    empty = text.encode([""])   # what a text cache stores as the empty prompt, one row for every dropped caption
    assert torch.equal(dropped["context"], empty[0].expand(2, -1, -1))
    assert torch.equal(dropped["y"], empty[1].expand(2, -1))

    with plugins_for_test():
        full = registry("trainers").get("full")
        trainer = full.factory(structure({"timestep_sampling": "logit-normal", "cond_dropout": 0.1}, full.config),
                               bundle)
    optimizer = torch.optim.SGD(trainer.trainable_parameters(), lr=1e-2)
    # cached VAE latents (what bundle.encode returns) are x0 as they are
    batch = {"latents": torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1)), "caption": captions}
    before = bundle.network.final_layer.linear.weight.detach().clone()
    loss = trainer.loss(bundle, batch, torch.Generator().manual_seed(2))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and loss.item() > 0
    assert not torch.equal(before, bundle.network.final_layer.linear.weight)
    assert bundle.network.joint_blocks[0].x_block.attn.qkv.weight.grad.abs().sum() > 0


# -- the contract on a bundle built from files ------------------------------------------------------
SEQ = 8
CAPTIONS = ["a red cat", "a blue dog", "green hills", "a tall tower"]


def bundle_of(folder, **overrides):
    from diffcore_sd3.plugin import SD3Config, build_sd3

    return build_sd3(SD3Config(path=str(folder), **{"dtype": "float32", "max_sequence_length": SEQ, **overrides}))


def full_trainer(bundle, **config):
    with plugins_for_test():
        full = registry("trainers").get("full")
        return full.factory(structure({"timestep_sampling": "logit-normal", "cond_dropout": 0.0, **config},
                                      full.config), bundle)


def test_encoders_load_on_first_use(tiny_pipeline):
    folder, pipe = tiny_pipeline
    bundle = bundle_of(folder)
    identity = bundle.encoder_identity()
    assert set(identity) == {"vae", "text"} and not bundle.loaded("vae") and not bundle.loaded("text")
    cached = {"latents": torch.randn(2, 16, 8, 6),
              "text": {"context": torch.randn(2, 77 + SEQ, 48), "y": torch.randn(2, 40)}}
    bundle.empty_text = {"context": torch.zeros(1, 77 + SEQ, 48), "y": torch.zeros(1, 40)}
    loss = full_trainer(bundle, cond_dropout=0.5).loss(bundle, cached, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and not bundle.loaded("vae") and not bundle.loaded("text")
    # captions load the text encoders only, and give diffusers' StableDiffusion3Pipeline.encode_prompt embeddings
    text = bundle.encode_captions(CAPTIONS[:2])
    assert bundle.loaded("text") and not bundle.loaded("vae") and set(text) == {"context", "y"}
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(CAPTIONS[:2], None, None, do_classifier_free_guidance=False,
                                                   max_sequence_length=SEQ)
    torch.testing.assert_close(text["context"], context, rtol=0, atol=1e-5)
    torch.testing.assert_close(text["y"], pooled, rtol=0, atol=1e-5)
    bundle.encode(torch.zeros(1, 3, 16, 16))
    assert bundle.loaded("vae")
    assert bundle_of(folder).encoder_identity() == identity            # from the files: stable across loads
    assert bundle_of(folder, max_sequence_length=SEQ + 1).encoder_identity()["text"] != identity["text"]


def test_cached_text_and_empty_prompt_dropout(tiny_pipeline):
    bundle = bundle_of(tiny_pipeline[0])
    kept = bundle.training_inputs({"caption": CAPTIONS})
    drop = torch.rand(4, generator=torch.Generator().manual_seed(1)) < 0.5
    assert 0 < drop.sum() < 4
    dropped = bundle.training_inputs({"text": kept}, dropout=0.5, generator=torch.Generator().manual_seed(1))
    empty = bundle.encode_captions([""])
    for i in range(4):
        for key in ("context", "y"):
            assert torch.equal(dropped[key][i:i + 1], empty[key] if drop[i] else kept[key][i:i + 1])
    with pytest.raises(ConfigError, match="captioned"):
        bundle.training_inputs({"latents": torch.zeros(1, 16, 2, 2)})


def test_full_trainer_loss_is_diffusers_flow_loss(tiny_pipeline):
    """images + captions -> FullTrainer.loss (logit-normal timesteps), against the same flow loss
    through diffusers: ``(vae.encode().mode() - shift) * scale``, ``encode_prompt``, and
    ``SD3Transformer2DModel`` at timestep ``1000 s`` regressing ``noise - x0``."""
    import torch.nn.functional as F

    folder, pipe = tiny_pipeline
    bundle = bundle_of(folder)
    pixels = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = {"image": pixels, "caption": CAPTIONS[:2]}
    loss = full_trainer(bundle).loss(bundle, batch, torch.Generator().manual_seed(7))
    loss.backward()

    vae, transformer = pipe.vae, pipe.transformer
    with torch.no_grad():
        x0 = (vae.encode(pixels).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
        context, _, pooled, _ = pipe.encode_prompt(CAPTIONS[:2], None, None, do_classifier_free_guidance=False,
                                                   max_sequence_length=SEQ)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(x0.shape, generator=g)
    s = torch.sigmoid(torch.randn(2, generator=g))
    x = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise
    transformer.zero_grad(set_to_none=True)
    pred = transformer(hidden_states=x, timestep=1000 * s, encoder_hidden_states=context,
                       pooled_projections=pooled).sample
    expected = F.mse_loss(pred, noise - x0)
    expected.backward()
    print(f"SD3 flow loss {loss.item():.6f} vs diffusers {expected.item():.6f}")
    assert abs(loss.item() - expected.item()) <= 1e-5
    torch.testing.assert_close(bundle.network.context_embedder.weight.grad, transformer.context_embedder.weight.grad,
                               rtol=1e-4, atol=1e-6)
    transformer.zero_grad(set_to_none=True)


def test_gradient_checkpointing_gives_the_same_grads(tiny_pipeline):
    bundle = bundle_of(tiny_pipeline[0])
    trainer = full_trainer(bundle)
    g = torch.Generator().manual_seed(1)
    batch = {"latents": torch.randn(2, 16, 8, 6, generator=g),
             "text": {"context": torch.randn(2, 77 + SEQ, 48, generator=g), "y": torch.randn(2, 40, generator=g)}}
    calls = []
    bundle.network.joint_blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))

    def grads(checkpointing: bool):
        bundle.network.gradient_checkpointing = checkpointing
        calls.clear()
        trainer.loss(bundle, batch, torch.Generator().manual_seed(3)).backward()
        out = {n: p.grad.clone() for n, p in bundle.network.named_parameters() if p.grad is not None}
        bundle.network.zero_grad(set_to_none=True)
        return out, len(calls)

    plain, forwards = grads(False)
    checkpointed, recomputed = grads(True)
    assert (forwards, recomputed) == (1, 2)    # the block ran again in the backward pass
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-7, msg=name)


def test_lora_targets_in_both_namings(tiny_pipeline):
    bundle = bundle_of(tiny_pipeline[0])
    depth, dual = bundle.network.params.depth, bundle.network.params.dual_attention_layers
    last = depth - 1            # its context stream is pre-only: qkv, no output projection or MLP
    attention = {*(f"joint_blocks.{i}.{s}_block.attn.{p}" for i in range(depth) for s in ("context", "x")
                   for p in ("qkv", "proj") if not (i == last and s == "context" and p == "proj")),
                 *(f"joint_blocks.{i}.x_block.attn2.{p}" for i in dual for p in ("qkv", "proj"))}
    assert dual and set(bundle.lora_targets("attention")) == attention
    assert set(bundle.lora_targets("attention-mlp")) - attention == {
        f"joint_blocks.{i}.{s}_block.mlp.fc{j}" for i in range(depth) for s in ("context", "x") for j in (1, 2)
        if not (i == last and s == "context")}
    linears = [n for n, m in bundle.network.named_modules() if isinstance(m, torch.nn.Linear)]
    assert bundle.lora_targets("all-linear") == linears
    # diffusers' train_dreambooth_lora_sd3 default list is the attention preset without attn2
    default = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
               "attn.to_out.0", "attn.to_q", "attn.to_v"]
    assert set(bundle.lora_targets(default)) == {n for n in attention if ".attn2." not in n}
    assert set(bundle.lora_targets(["to_q", "transformer.transformer_blocks.1.ff_context.net.2", "proj_out"])) == {
        *(f"joint_blocks.{i}.x_block.attn.qkv" for i in range(depth)),
        *(f"joint_blocks.{i}.x_block.attn2.qkv" for i in dual), "joint_blocks.1.context_block.mlp.fc2",
        "final_layer.linear"}
    with pytest.raises(ConfigError, match="'to_qq' matches no linear layer"):
        bundle.lora_targets(["to_qq"])


def test_diffusers_names_cover_every_diffusers_linear(tiny_pipeline):
    from diffcore_sd3.convert import diffusers_modules

    bundle, transformer = bundle_of(tiny_pipeline[0]), tiny_pipeline[1].transformer
    linears = [n for n, m in bundle.network.named_modules() if isinstance(m, torch.nn.Linear)]
    rows = diffusers_modules(linears)
    assert {d for d, _ in rows} == {n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {o for _, o in rows} == set(linears)
