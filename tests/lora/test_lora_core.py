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
