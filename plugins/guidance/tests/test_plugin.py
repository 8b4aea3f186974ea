"""The plugin as diffcore sees it: cheap import, registrations, job files, the CLI commands."""

import subprocess
import sys

import pytest
import torch
from guidance_helpers import TINY

from diffcore.api import ConfigError, registry
from diffcore_guidance.cli import model_layers


def test_plugin_module_imports_no_torch():
    code = "import sys, diffcore_guidance.plugin; assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_registered_components():
    from diffcore.api import get_plugins

    pm = get_plugins()
    guidance = {c.name: c for c in pm.registry("guidance")}
    for name in ("apg", "cfg-zero-star", "pag", "nag", "nag-pag", "learned"):
        assert guidance[name].plugin == "guidance"
    assert pm.registry("jobs").get("train-guidance").plugin == "guidance"
    assert {c.name for c in pm.registry("rewards")} >= {"in-range", "total-variation", "mean-target", "classifier"}
    assert pm.info["guidance"].error is None


def generate(tmp_path, guidance_table, cfg_scale=1.0):
    from diffcore.testing import run_job_file as run

    model = "\n".join(f"{k} = {v}" for k, v in TINY.items())
    job = tmp_path / "job.toml"
    job.write_text(f"""
[job]
kind = "generate"
output_dir = "{tmp_path / 'out'}"
num_samples = 4
batch_size = 4
sampling_steps = 3
cfg_scale = {cfg_scale}
progress = false

[model]
family = "dit"
{model}

{guidance_table}
""")
    return run(job)


def test_processors_run_from_a_job_file(tmp_path):
    images = generate(tmp_path, '[[guidance]]\nname = "nag-pag"\nlayers = ["blocks.1.attn"]\n\n'
                                '[[guidance]]\nname = "apg"\nscale = 2.0\n')
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
    assert (tmp_path / "out" / "grid.png").is_file()


def test_job_files_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="guidance\\[0\\].scale: invalid value 12.0"):
        generate(tmp_path, '[[guidance]]\nname = "nag-pag"\nscale = 12.0\n')
    with pytest.raises(ConfigError, match="unknown attention layer 'transformer_blocks.8.attn'.*this model has: "
                                          "blocks.0.attn .. blocks.1.attn"):
        generate(tmp_path, '[[guidance]]\nname = "nag-pag"\n')      # FLUX.1 [dev]'s layers on a 2-block DiT


def test_layers_command_lists_attention_layers_of_a_family():
    from diffcore.testing import run_cli

    result = run_cli(["layers", "dit", "--variant", "digits", "--set", "depth=3"])
    assert result.exit_code == 0, result.output
    assert result.output.split() == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    bad = run_cli(["layers", "dit", "--set", "dept=3"])
    assert bad.exit_code == 1 and "has no config field 'dept'; it accepts: checkpoint, depth" in bad.output
    rewards = run_cli(["rewards"])
    assert "mean-target  [guidance]" in rewards.output and "target: float = 0.0" in rewards.output


def test_layers_are_built_on_the_meta_device_without_weights():
    assert model_layers("dit", "B-2") == [f"blocks.{i}.attn" for i in range(12)]   # 130M parameters, none allocated
    with pytest.raises(ConfigError, match="unknown DiT variant"):
        model_layers("dit", "XL")


def test_cfg_zero_star_and_apg_in_the_catalog_validate_their_fields():
    with pytest.raises(ValueError, match="start \\(0.5\\) must be less than stop \\(0.5\\)"):
        registry("guidance").get("apg").config(start=0.5, stop=0.5)
    with pytest.raises(ValueError):
        registry("guidance").get("cfg-zero-star").config(zero_init_steps=-1)


def test_the_package_exposes_its_public_names_lazily():
    import diffcore_guidance

    for name in diffcore_guidance.__all__[1:]:
        assert getattr(diffcore_guidance, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'APGG'"):
        diffcore_guidance.APGG
