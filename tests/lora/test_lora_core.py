"""diffcore.lora on a toy network with a fused qkv: fuse / split exactness, formats detected from
keys, merged equals hooked, hooks make ``plain`` false, pickles and stray keys refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffcore.errors import ConfigError
from diffcore.lora import LoraLayer, apply_lora, load_lora, match_lora, remove_lora, save_lora
from diffcore.lora.formats import detect
from diffcore.lora.weights import fuse, part_sizes, split, stack
from diffcore.models import ModelBundle
from diffcore.nn.linear import Linear, plain


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = Linear(8, 24)
        self.proj = Linear(8, 8)

    def forward(self, x):
        return self.proj(self.qkv(x)[..., :8] + self.qkv(x)[..., 16:])


class ToyBundle(ModelBundle):
    def diffusers_modules(self, modules):
        rows = [("attn.to_q", "qkv"), ("attn.to_k", "qkv"), ("attn.to_v", "qkv"), ("attn.to_out.0", "proj")]
        return [(d, o) for d, o in rows if o in modules]


def layer(rank, out, inp, seed, alpha=None):
    g = torch.Generator().manual_seed(seed)
    return LoraLayer(down=torch.randn(rank, inp, generator=g), up=torch.randn(out, rank, generator=g),
                     alpha=float(alpha or rank))


def test_fuse_then_split_is_exact_and_keeps_the_ranks():
    q, v = layer(2, 8, 8, 0, alpha=4), layer(3, 8, 8, 1, alpha=1.5)
    fused = fuse([q, None, v], [8, 8, 8])
    assert fused.rank == 5
    torch.testing.assert_close(fused.delta(), torch.cat([q.delta(), torch.zeros(8, 8), v.delta()]), rtol=0, atol=1e-6)
    back = split(fused, [8, 8, 8])
    assert back[1] is None and back[0].rank == 2 and back[2].rank == 3
    torch.testing.assert_close(back[0].delta(), q.delta(), rtol=0, atol=1e-6)
    torch.testing.assert_close(back[2].delta(), v.delta(), rtol=0, atol=1e-6)
    both = stack([q, layer(1, 8, 8, 2)])
    torch.testing.assert_close(both.delta(), q.delta() + layer(1, 8, 8, 2).delta(), rtol=0, atol=1e-6)
    assert part_sizes(24, 8, 3) == [8] * 3 and part_sizes(56, 8, 4) == [8, 8, 8, 32]


def test_formats_are_told_apart_by_their_keys():
    assert detect(["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]) == "diffusers"
    assert detect(["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]) == "kohya"
    assert detect(["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"]) == "comfyui"
    assert detect(["double_blocks.0.processor.qkv_lora1.down.weight"]) == "xlabs"
    assert detect(["double_blocks.0.img_attn.qkv.lora_A.weight"]) == "diffcore"


@pytest.mark.parametrize("format", ["diffusers", "kohya", "comfyui", "diffcore"])
@torch.no_grad()
def test_round_trip_and_merged_equals_hooked(tmp_path, format):
    torch.manual_seed(0)
    bundle = ToyBundle(network=Toy())
    weights = {"qkv": layer(2, 24, 8, 3, alpha=3), "proj": layer(4, 8, 8, 4)}
    back = load_lora(save_lora(tmp_path / "l.safetensors", weights, bundle, format=format), bundle)
    assert back.format == format
    for n in weights:
        torch.testing.assert_close(back[n].delta(), weights[n].delta(), rtol=0, atol=1e-6)
    x = torch.randn(3, 8)
    base = bundle.network(x)
    apply_lora(bundle.network, back, 0.5, merge=False)
    assert not plain(bundle.network.qkv) and "diffcore_lora" not in str(list(bundle.network.state_dict()))
    hooked = bundle.network(x)
    assert remove_lora(bundle.network) == 2 and plain(bundle.network.qkv)
    torch.testing.assert_close(bundle.network(x), base, rtol=0, atol=0)
    apply_lora(bundle.network, weights, 0.5, merge=True)
    scale = max(hooked.abs().max().item(), 1.0)   # fp32 rounding of W + delta grows with the output
    torch.testing.assert_close(bundle.network(x), hooked, rtol=0, atol=1e-6 * scale)
    assert (hooked - base).abs().max() > 1e-2


def test_stray_keys_pickles_and_shape_mismatches_are_errors(tmp_path):
    from safetensors.torch import save_file

    bundle = ToyBundle(network=Toy())
    good = {"transformer.attn.to_q.lora_A.weight": torch.zeros(2, 8), "transformer.attn.to_q.lora_B.weight": torch.zeros(8, 2)}
    save_file({**good, "transformer.attn.to_qq.lora_A.weight": torch.zeros(2, 8)}, tmp_path / "typo.safetensors")
    with pytest.raises(ConfigError, match=r"typo\.safetensors: 1 of its 3 keys .*transformer\.attn\.to_qq\.lora_A"):
        load_lora(tmp_path / "typo.safetensors", bundle)
    weights, unmatched = match_lora(good, bundle)
    assert list(weights) == ["qkv"] and not unmatched
    save_file({**good, "transformer.attn.to_q.lora_B.weight": torch.zeros(9, 2)}, tmp_path / "shape.safetensors")
    with pytest.raises(ConfigError, match="another model or size"):
        load_lora(tmp_path / "shape.safetensors", bundle)
    (tmp_path / "l.pt").write_bytes(b"\x80\x04")
    with pytest.raises(ConfigError, match="never opened"):
        load_lora(tmp_path / "l.pt", bundle)


@pytest.mark.parametrize("keys, kind", [
    (["lora_unet_attn_to_q.hada_w1_a", "lora_unet_attn_to_q.hada_w1_b"], "LyCORIS LoHa"),
    (["lora_unet_attn_to_q.lokr_w1", "lora_unet_attn_to_q.lokr_w2"], "LyCORIS LoKr"),
    (["transformer.attn.to_q.lora_A.weight", "transformer.attn.to_q.lora_B.weight",
      "transformer.attn.to_q.lora_magnitude_vector"], "DoRA"),
    (["lora_unet_attn_to_q.lora_down.weight", "lora_unet_attn_to_q.lora_up.weight", "lora_unet_attn_to_q.dora_scale"],
     "DoRA")])
def test_other_adapter_kinds_are_named_and_refused(tmp_path, keys, kind):
    """A LoHa, LoKr or DoRA file is not silently applied as a plain LoRA (or half of one)."""
    from safetensors.torch import save_file

    save_file({k: torch.zeros(2, 8) for k in keys}, tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match=rf"other\.safetensors: a {kind} file; diffcore applies plain LoRAs only"):
        load_lora(tmp_path / "other.safetensors", ToyBundle(network=Toy()))


def test_the_trainer_config_checks_save_format():
    from diffcore.training.catalog import LoraConfig

    assert LoraConfig(save_format="kohya").save_format == "kohya"
    with pytest.raises(ConfigError, match="unknown LoRA save_format 'kohyaa'"):
        LoraConfig(save_format="kohyaa")


def test_the_inspect_command(tmp_path):
    from click.testing import CliRunner

    from diffcore.cli import cli

    bundle = ToyBundle(network=Toy())
    path = save_lora(tmp_path / "l.safetensors", {"qkv": layer(2, 24, 8, 3, alpha=3)}, bundle, format="diffusers")
    result = CliRunner().invoke(cli, ["lora", "inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "format: diffusers" in result.output and "rank: 2 (3 layers)" in result.output
    assert "transformer.attn.to_q" not in result.output and "attn.to_q" in result.output
    result = CliRunner().invoke(cli, ["lora", "inspect", str(tmp_path / "none.safetensors")])
    assert result.exit_code == 1 and "no such LoRA file" in result.output


def test_half_a_lora_is_reported_by_its_key(tmp_path):
    bundle = ToyBundle(network=Toy())
    weights, unmatched = match_lora({"transformer.attn.to_out.0.lora_A.weight": torch.zeros(2, 8)}, bundle)
    assert not weights and unmatched == ["transformer.attn.to_out.0.lora_A.weight (its up matrix is missing)"]


class Encoder(nn.Module):
    """A stand-in text encoder: two attention projections under transformers-like names."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"q_proj": nn.Linear(8, 8), "out_proj": nn.Linear(8, 8)})])


class TextBundle(ToyBundle):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.encoder = Encoder()

    def text_encoders(self):
        return {"text_encoder_2": self.encoder}


@pytest.mark.parametrize("format", ["diffusers", "kohya", "comfyui", "diffcore"])
@torch.no_grad()
def test_text_encoder_loras_round_trip_and_apply(tmp_path, format):
    """Text-encoder adapters travel in each format under the encoder's prefix (kohya: lora_te2_),
    the network's keys decide the format, and they apply to the encoder merged or hooked alike."""
    bundle = TextBundle(network=Toy())
    text = {"text_encoder_2": {"layers.0.q_proj": layer(2, 8, 8, 4, alpha=1)}}
    path = save_lora(tmp_path / "l.safetensors", {"proj": layer(2, 8, 8, 3)}, bundle, format=format,
                     text_encoders=text)
    from safetensors.torch import load_file

    keys = set(load_file(path))
    expected = {"diffusers": "text_encoder_2.layers.0.q_proj.lora_A.weight",
                "diffcore": "text_encoder_2.layers.0.q_proj.alpha"}.get(format, "lora_te2_layers_0_q_proj.alpha")
    assert expected in keys
    back = load_lora(path, bundle)
    assert back.format == format and set(back) == {"proj"}
    torch.testing.assert_close(back.text_encoders["text_encoder_2"]["layers.0.q_proj"].delta(),
                               text["text_encoder_2"]["layers.0.q_proj"].delta(), rtol=0, atol=1e-6)
    from diffcore.lora import apply_lora_to_bundle

    x = torch.randn(3, 8)
    outputs = []
    for merge in (True, False):
        fresh = TextBundle(network=Toy())
        fresh.encoder.load_state_dict(bundle.encoder.state_dict())
        apply_lora_to_bundle(fresh, back, 0.5, merge=merge)
        outputs.append(fresh.encoder.layers[0]["q_proj"](x))
    expected = bundle.encoder.layers[0]["q_proj"](x) + 0.5 * x @ text["text_encoder_2"]["layers.0.q_proj"].delta().T
    for out in outputs:
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_text_encoder_keys_that_match_nothing_are_errors_and_other_encoders_warned(tmp_path):
    from safetensors.torch import save_file

    bundle = TextBundle(network=Toy())
    pair = {"lora_unet_proj.lora_down.weight": torch.zeros(2, 8), "lora_unet_proj.lora_up.weight": torch.zeros(8, 2)}
    save_file({**pair, "lora_te2_layers_0_k_proj.lora_down.weight": torch.zeros(2, 8)}, tmp_path / "bad.safetensors")
    with pytest.raises(ConfigError, match="lora_te2_layers_0_k_proj.lora_down.weight"):
        load_lora(tmp_path / "bad.safetensors", bundle)
    save_file({**pair, "lora_te1_layers_0_q_proj.lora_down.weight": torch.zeros(2, 8)}, tmp_path / "te1.safetensors")
    with pytest.warns(UserWarning, match="trainable text encoders are text_encoder_2"):
        assert not load_lora(tmp_path / "te1.safetensors", bundle).text_encoders
    with pytest.raises(ConfigError, match="xlabs format holds no text-encoder"):
        save_lora(tmp_path / "x.safetensors", {}, bundle, format="xlabs",
                  text_encoders={"text_encoder_2": {"layers.0.q_proj": layer(2, 8, 8, 0)}})


def test_a_family_without_trainable_text_encoders_refuses_train_text_encoder():
    pytest.importorskip("peft")
    from diffcore.training.catalog import LoraConfig, build_lora

    with pytest.raises(ConfigError, match="no text encoders a LoRA can train") as info:
        build_lora(LoraConfig(target_modules=["proj"], train_text_encoder=True), ToyBundle(network=Toy()))
    assert info.value.path == "trainer.train_text_encoder"
    with pytest.raises(ConfigError, match="text_encoder_targets"):
        build_lora(LoraConfig(target_modules=["proj"], train_text_encoder=True, text_encoder_targets=["nope"]),
                   TextBundle(network=Toy()))


def test_the_text_embedding_cache_refuses_text_encoder_training():
    from diffcore.config.structure import structure
    from diffcore.jobs.train import TrainJob
    from diffcore.testing import plugins_for_test

    table = {"job": {"cache_text_embeddings": True}, "model": {"family": "dit", "variant": "digits"},
             "dataset": {"name": "digits"}, "trainer": {"name": "lora", "train_text_encoder": True}}
    refusal = r"job\.cache_text_embeddings.*trainer\.train_text_encoder"
    with plugins_for_test(), pytest.raises(ConfigError, match=refusal):
        structure(table, TrainJob)
