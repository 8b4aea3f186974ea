"""The ``dit`` family through the plugin registry: config, build, checkpoints."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from diffcore.api import CheckpointError, ConfigError
from diffcore.testing import Plugins
from diffcore_dit.bundle import DiTBundle
from diffcore_dit.plugin import DiTConfig, build_dit


def test_plugin_module_imports_no_torch():
    code = "import sys, diffcore_dit.plugin; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registered_through_the_entry_point():
    models = Plugins().load().registry("models")
    component = models.get("dit")
    assert component.plugin == "dit" and component.config is DiTConfig
    bundle = component.build(DiTConfig(image_size=16))
    assert isinstance(bundle, DiTBundle) and bundle.latent_shape(None) == (1, 16, 16)


def test_config_validates_variant_and_dtype():
    with pytest.raises(ConfigError, match='did you mean "B-2"'):
        DiTConfig(variant="B2")
    with pytest.raises(ConfigError, match="float16"):
        DiTConfig(dtype="float16")
    with pytest.raises(ConfigError, match="at depth"):
        DiTConfig(depth=0)


def test_overrides_replace_variant_fields():
    params = DiTConfig(variant="cifar", depth=2, num_classes=100).params()
    assert (params.hidden, params.heads, params.depth, params.num_classes, params.image_size) == (384, 6, 2, 100, 32)


def test_bfloat16_build():
    bundle = build_dit(DiTConfig(depth=1, dtype="bfloat16"))
    assert all(p.dtype == torch.bfloat16 for p in bundle.network.parameters())
    assert bundle.forward(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 1])).dtype == torch.float32


def _weights(config: DiTConfig, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = build_dit(config).network
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    return {k: v.contiguous() for k, v in net.state_dict().items()}


def test_checkpoint_file_and_folder(tmp_path):
    config = DiTConfig(depth=2)
    model, ema = _weights(config, 0), _weights(config, 1)
    save_file(model, tmp_path / "model.safetensors")

    def loads(path, expected):
        got = build_dit(DiTConfig(depth=2, checkpoint=str(path))).network.state_dict()
        return all(torch.equal(got[k], v) for k, v in expected.items())

    assert loads(tmp_path / "model.safetensors", model)
    assert loads(tmp_path, model)  # a folder without ema
    save_file(ema, tmp_path / "ema.safetensors")
    assert loads(tmp_path, ema) and not loads(tmp_path, model)  # ema preferred


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="neither ema.safetensors nor model.safetensors"):
        build_dit(DiTConfig(checkpoint=str(tmp_path)))
    save_file(_weights(DiTConfig(depth=2, num_classes=3), 0), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"y_embed.weight \(4, 64\) \(model: \(11, 64\)\)"):
        build_dit(DiTConfig(depth=2, checkpoint=str(tmp_path)))
    with pytest.raises(CheckpointError, match="missing blocks.2"):
        build_dit(DiTConfig(depth=3, num_classes=3, checkpoint=str(tmp_path)))


def test_diffusers_checkpoint_is_converted_on_load(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from diffcore_dit.convert import diffusers_config

    config = DiTConfig(depth=2)
    ref = diffusers.DiTTransformer2DModel(**diffusers_config(config.params()))
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    for k in sd:
        if ".norm1.emb." in k:
            sd[k] = sd["transformer_blocks.0." + k.split(".", 2)[2]].clone()
    save_file(sd, tmp_path / "dit.safetensors")
    net = build_dit(DiTConfig(depth=2, checkpoint=str(tmp_path / "dit.safetensors"))).network
    q = net.blocks[1].attn.qkv.weight[:config.params().hidden]
    assert torch.equal(q, sd["transformer_blocks.1.attn1.to_q.weight"])
