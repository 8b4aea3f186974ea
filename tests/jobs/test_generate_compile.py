"""``compile = true`` in a ``[model]`` table: every family takes it (the core does), a tiny DiT
generate job draws the same images compiled as eager, and bad values are refused by key."""

from __future__ import annotations

import tomllib

import pytest
import torch

from diffcore.errors import ConfigError
from diffcore.jobs.runner import prepare, run
from diffcore.testing import plugins_for_test

pytest.importorskip("diffcore_dit")

TINY = """
[job]
kind = "generate"
output_dir = "{out}"
sampling_steps = 3
cfg_scale = 2.0
num_samples = 2
seed = 3
progress = false

[model]
family = "dit"
variant = "digits"
hidden = 32
depth = 1
heads = 2
{model}
"""


@pytest.fixture(autouse=True)
def plugins():
    with plugins_for_test() as pm:
        yield pm


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Random weights for the tiny DiT: its fresh init (adaLN-Zero) outputs zeros, which any
    compiled graph would reproduce."""
    from safetensors.torch import save_file

    from diffcore_dit.model import DiT2D
    from diffcore_dit.plugin import DiTConfig

    network = DiT2D(DiTConfig(hidden=32, depth=1, heads=2).params())
    g = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in network.state_dict().items()}
    path = tmp_path_factory.mktemp("dit") / "dit.safetensors"
    save_file(weights, str(path))
    return path


def job(tmp_path, model="", name="job.toml"):
    path = tmp_path / name
    path.write_text(TINY.format(out=(tmp_path / name.replace(".toml", "")).as_posix(), model=model))
    return path


def test_compiled_generate_draws_the_eager_images(tmp_path, checkpoint):
    import torch._dynamo as dynamo

    weights = f'checkpoint = "{checkpoint.as_posix()}"'
    eager = run(job(tmp_path, weights, "eager.toml"))
    dynamo.reset()
    compiled = run(job(tmp_path, weights + "\ncompile = true", "compiled.toml"))
    dynamo.reset()
    assert eager.abs().max() > 0.1 and (compiled - eager).abs().max().item() <= 1e-5
    resolved = tomllib.loads((tmp_path / "compiled" / "config.toml").read_text())
    assert resolved["model"]["compile"] is True and "compile" not in tomllib.loads(
        (tmp_path / "eager" / "config.toml").read_text())["model"]


def test_model_options_are_taken_by_the_core_for_any_family(tmp_path):
    config = prepare(job(tmp_path, 'compile = true\ncompile_mode = "max-autotune"\ncompile_dynamic = true')).config
    assert config.model.name == "dit" and config.model.config.depth == 1
    options = config.model.options
    assert (options.compile, options.compile_mode, options.compile_dynamic) == (True, "max-autotune", True)
    assert prepare(job(tmp_path, "", "plain.toml")).config.model.options is None


BAD = [
    ('compile = "yes"', "model.compile", ["expected true or false", "found a string 'yes'"]),
    ('compile = true\ncompile_mode = "fast"', "model.compile_mode",
     ["expected one of 'default', 'reduce-overhead', 'max-autotune'", "found 'fast'"]),
    ("compile = true\ncompile_dynamic = 1", "model.compile_dynamic", ["expected true or false", "found an integer 1"]),
    ('compile_mode = "max-autotune"', "model.compile_mode", ["compile_mode has no effect without compile = true"]),
    ("compiel = true", "model.compiel", ["unknown key 'compiel'", 'did you mean "compile"',
                                         "(and the core: compile, compile_mode, compile_dynamic)"]),
]


@pytest.mark.parametrize("model,path,fragments", BAD, ids=[b[1] + ":" + b[0].split("\n")[-1] for b in BAD])
def test_bad_compile_keys_are_refused_by_key(tmp_path, model, path, fragments):
    with pytest.raises(ConfigError) as info:
        prepare(job(tmp_path, model))
    message = str(info.value)
    assert info.value.path == path, message
    assert info.value.file and info.value.file.endswith("job.toml"), message
    for fragment in fragments:
        assert fragment in message, message


def test_a_train_job_refuses_compile_by_key(tmp_path):
    text = TINY.replace('kind = "generate"', 'kind = "train"').replace("cfg_scale = 2.0\nnum_samples = 2\n", "")
    text = text.replace("sampling_steps = 3", "steps = 2").replace("progress = false\n", "")
    text = text.replace("{model}", "compile = true\n\n[dataset]\nname = \"digits\"")
    path = tmp_path / "train.toml"
    path.write_text(text.format(out=(tmp_path / "train").as_posix()))
    with pytest.raises(ConfigError) as info:
        prepare(path)
    assert info.value.path == "model.compile" and "generate and serve jobs" in str(info.value), str(info.value)
    assert not (tmp_path / "train").exists()
