"""The core's keys of a ``[model]`` table, which every family takes: ``compile = true`` draws the
same images compiled as eager, ``weight_dtype`` / ``fp8_matmul`` store the denoiser in fp8 and draw
nearly the same images, and bad values are refused by key."""

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


def random_dit(folder, hidden: int, scale: float):
    """Random weights for a tiny DiT: its fresh init (adaLN-Zero) outputs zeros, which any
    compiled graph or rounding would reproduce."""
    from safetensors.torch import save_file

    from diffcore_dit.model import DiT2D
    from diffcore_dit.plugin import DiTConfig

    network = DiT2D(DiTConfig(hidden=hidden, depth=1, heads=2).params())
    g = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(v.shape, generator=g) * scale for k, v in network.state_dict().items()}
    path = folder / "dit.safetensors"
    save_file(weights, str(path))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_dit(tmp_path_factory.mktemp("dit"), 32, 0.2)


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    """Layers of 256 features and more: the ones fp8 storage converts."""
    return random_dit(tmp_path_factory.mktemp("dit256"), 256, 0.05)


def job(tmp_path, model="", name="job.toml", hidden=32):
    path = tmp_path / name
    text = TINY.format(out=(tmp_path / name.replace(".toml", "")).as_posix(), model=model)
    path.write_text(text.replace("hidden = 32", f"hidden = {hidden}"))
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
                                         "(and the core: compile, compile_mode, compile_dynamic, weight_dtype"]),
    ('weight_dtype = "fp8"', "model.weight_dtype",
     ["expected one of 'auto', 'float8_e4m3fn', 'float8_e5m2'", "found 'fp8'"]),
    ('weight_dtype = "float8_e5m2"\nfp8_matmul = true', "model.weight_dtype",
     ["fp8_matmul = true multiplies float8_e4m3fn weights"]),
    ('fp8_skip = ["*mod*"]', "model.fp8_skip", ["fp8_skip has no effect without weight_dtype"]),
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


def test_fp8_generate_draws_nearly_the_same_images(tmp_path, wide_checkpoint):
    weights = f'checkpoint = "{wide_checkpoint.as_posix()}"'
    plain = run(job(tmp_path, weights, "plain.toml", hidden=256))
    stored = run(job(tmp_path, weights + '\nweight_dtype = "float8_e4m3fn"', "stored.toml", hidden=256))
    fast = run(job(tmp_path, weights + "\nfp8_matmul = true", "fast.toml", hidden=256))
    assert plain.abs().max() > 0.1
    for images in (stored, fast):
        error = ((images - plain).norm() / plain.norm()).item()
        assert 1e-5 < error < 0.05, error


@pytest.mark.parametrize("merge", [False, True])
def test_a_lora_over_fp8_weights_keeps_its_effect(tmp_path, wide_checkpoint, merge):
    """The LoRA goes onto the fp8 layers (merged: rounded again; unmerged: a full-precision branch),
    so its images stay those of the LoRA in full precision, within fp8's error."""
    from diffcore.lora.files import save_lora
    from diffcore.lora.weights import LoraLayer

    g = torch.Generator().manual_seed(1)
    adapter = save_lora(tmp_path / "lora.safetensors", {name: LoraLayer(
        down=torch.randn(4, inp, generator=g) * 0.3, up=torch.randn(out, 4, generator=g) * 0.3, alpha=4.0)
        for name, out, inp in [("blocks.0.attn.qkv", 768, 256), ("blocks.0.mlp.0", 1024, 256)]})
    weights = f'checkpoint = "{wide_checkpoint.as_posix()}"'
    fp8 = '\nweight_dtype = "float8_e4m3fn"'
    table = f'\n[[lora]]\npath = "{adapter.as_posix()}"\nmerge = {str(merge).lower()}\n'
    full = run(job(tmp_path, weights + table, "full.toml", hidden=256))
    stored = run(job(tmp_path, weights + fp8 + table, "stored.toml", hidden=256))
    without = run(job(tmp_path, weights + fp8, "without.toml", hidden=256))
    error, effect = ((stored - full).norm() / full.norm()).item(), ((stored - without).norm() / without.norm()).item()
    assert error < 0.05 and effect > 0.2, (error, effect)


def test_fp8_layers_and_skips_in_a_built_pipeline(tmp_path, wide_checkpoint):
    from diffcore.nn.fp8 import Float8Linear
    from diffcore.sampling.pipeline import Pipeline

    weights = f'checkpoint = "{wide_checkpoint.as_posix()}"\nweight_dtype = "float8_e4m3fn"\n'
    config = prepare(job(tmp_path, weights + 'fp8_skip = ["*modulation"]', hidden=256)).config
    network = Pipeline.build(config.model, config.sampler, device="cpu").bundle.network
    converted = {name for name, m in network.named_modules() if isinstance(m, Float8Linear)}
    assert converted and not any("modulation" in name for name in converted) and "blocks.0.attn.qkv" in converted
    assert all(m.weight_fp8.dtype == torch.float8_e4m3fn for m in network.modules() if isinstance(m, Float8Linear))
    config = prepare(job(tmp_path, weights + 'fp8_skip = ["no_such_layer*"]', "typo.toml", hidden=256)).config
    with pytest.raises(ConfigError) as info:
        Pipeline.build(config.model, config.sampler, device="cpu")
    assert info.value.path == "model.fp8_skip" and "'no_such_layer*' matches no layer" in str(info.value)


def test_the_family_builds_its_model_inside_the_fp8_rounding(tmp_path, wide_checkpoint):
    """What ``load_model(..., denoiser=True)`` reads to round each weight as it loads it."""
    import attrs

    from diffcore.nn.fp8_options import Rounding, rounding_while_loading
    from diffcore.sampling.pipeline import Pipeline

    text = f'checkpoint = "{wide_checkpoint.as_posix()}"\nfp8_matmul = true\nfp8_skip = ["*modulation"]\n'
    config = prepare(job(tmp_path, text, hidden=256)).config
    seen, factory = [], config.model.component.factory

    def build(*args, **kwargs):
        seen.append(rounding_while_loading())
        return factory(*args, **kwargs)

    model = attrs.evolve(config.model, component=attrs.evolve(config.model.component, factory=build))
    Pipeline.build(model, config.sampler, device="cpu")
    assert seen == [Rounding("float8_e4m3fn", True, ("*modulation",))] and rounding_while_loading() is None


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


def train_job(tmp_path, model: str, trainer: str = "", name: str = "train.toml", hidden: int = 32):
    text = TINY.replace('kind = "generate"', 'kind = "train"').replace("cfg_scale = 2.0\nnum_samples = 2\n", "")
    text = text.replace("sampling_steps = 3", "steps = 3\nbatch_size = 8\nlr = 1e-3\n"
                        "final_grid = {{ samples_per_class = 1, sampling_steps = 2 }}")
    text = text.replace("progress = false\n", "")
    text = text.replace("{model}", model + "\n\n[dataset]\nname = \"digits\"\n" + trainer)
    path = tmp_path / name
    path.write_text(text.format(out=(tmp_path / name.replace(".toml", "")).as_posix()).replace("hidden = 32",
                                                                                                f"hidden = {hidden}"))
    return path


@pytest.mark.parametrize("key, fragment", [('weight_dtype = "float8_e4m3fn"', "the full trainer trains them"),
                                           ("fp8_matmul = true", "its backward pass is not built")])
def test_a_train_job_refuses_fp8_it_cannot_train_by_key(tmp_path, key, fragment):
    with pytest.raises(ConfigError) as info:
        prepare(train_job(tmp_path, key))
    assert info.value.path == "model." + key.split(" ")[0] and fragment in str(info.value), str(info.value)
    assert not (tmp_path / "train").exists()


def test_a_lora_trains_on_fp8_base_weights(tmp_path, wide_checkpoint):
    """kohya's --fp8_base: the base frozen in fp8, the adapters trained through it in full
    precision; they come out as a full-precision run on the same rounded weights makes them."""
    from safetensors.torch import load_file, save_file

    from diffcore.nn.fp8 import store_fp8
    from diffcore_dit.model import DiT2D
    from diffcore_dit.plugin import DiTConfig

    network = DiT2D(DiTConfig(hidden=256, depth=1, heads=2).params())
    network.load_state_dict(load_file(str(wide_checkpoint)))
    assert store_fp8(network)
    save_file(network.state_dict(), str(tmp_path / "rounded.safetensors"))   # the rounded values, float32
    trainer = '[trainer]\nname = "lora"\nrank = 4\ninit = "gaussian"\ntarget_modules = ["attn.qkv", "mlp.0"]\n'
    fp8 = f'checkpoint = "{wide_checkpoint.as_posix()}"\nweight_dtype = "float8_e4m3fn"'
    run(train_job(tmp_path, fp8, trainer, "fp8.toml", hidden=256))
    rounded = f'checkpoint = "{(tmp_path / "rounded.safetensors").as_posix()}"'
    run(train_job(tmp_path, rounded, trainer, "rounded.toml", hidden=256))
    got, want = (load_file(str(tmp_path / name / "lora.safetensors")) for name in ("fp8", "rounded"))
    assert got.keys() == want.keys() and any("attn.qkv" in k for k in got)
    ups = [k for k in got if "lora_B" in k]
    assert ups and all(got[k].abs().max() > 0 for k in ups)   # trained: B starts at zero
    error = max(((got[k] - want[k]).norm() / want[k].norm()).item() for k in ups)
    assert error < 1e-3, error


def test_text_weight_dtype_is_refused_where_it_cannot_apply(tmp_path, checkpoint):
    """A model without text encoders (the DiT) names the key while building; a train job that
    trains text-encoder adapters is refused before anything loads."""
    from diffcore.sampling.pipeline import Pipeline

    weights = f'checkpoint = "{checkpoint.as_posix()}"\ntext_weight_dtype = "float8_e4m3fn"'
    config = prepare(job(tmp_path, weights)).config
    with pytest.raises(ConfigError) as info:
        Pipeline.build(config.model, config.sampler, device="cpu")
    assert info.value.path == "model.text_weight_dtype" and "has none" in str(info.value)
    trainer = '[trainer]\nname = "lora"\ntarget_modules = ["attn.qkv"]\ntrain_text_encoder = true\n'
    with pytest.raises(ConfigError) as info:
        prepare(train_job(tmp_path, 'text_weight_dtype = "float8_e4m3fn"', trainer))
    assert info.value.path == "model.text_weight_dtype" and "train_text_encoder" in str(info.value)
