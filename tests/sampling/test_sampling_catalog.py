"""The registered schedules, samplers and guidance: names, configs, validators, built components."""

import subprocess
import sys

import attrs
import pytest
import torch

from diffcore.plugins import Plugins
from diffcore.sampling import catalog, samplers
from diffcore.sampling import schedules as S
from diffcore.sampling.cfg import CFG


@pytest.fixture(scope="module")
def registries():
    plugins = Plugins().load(entry_points=False)
    return {kind: plugins.registry(kind) for kind in ("schedules", "samplers", "guidance")}


def test_catalog_imports_no_torch():
    code = "import sys, diffcore.sampling.catalog; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "diffcore.sampling.catalog imported torch"


def test_everything_is_registered_with_a_description(registries):
    names = {kind: {c.name for c in reg} for kind, reg in registries.items()}
    assert names["schedules"] == {"flow", "ddpm", "karras", "exponential", "beta"}   # families add their presets
    assert names["samplers"] >= {"euler", "heun", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde", "ddim"}
    assert "cfg" in names["guidance"]
    for reg in registries.values():
        for comp in reg:
            assert comp.description and comp.plugin == "diffcore"
            assert attrs.has(comp.config) and attrs.fields(comp.config) is not None


def test_built_schedules_give_their_functions_sigmas(registries):
    reg = registries["schedules"]
    torch.testing.assert_close(reg.get("flow").build().sigmas(5), S.flow_sigmas(5))
    dynamic = reg.get("flow").build(catalog.DynamicShiftConfig(base_shift=0.4, max_seq_len=2048))
    torch.testing.assert_close(dynamic.sigmas(5, seq_len=1024),
                               S.flow_sigmas(5, mu=S.dynamic_shift_mu(1024, base_shift=0.4, max_seq_len=2048)))
    torch.testing.assert_close(reg.get("flow").build(catalog.FlowConfig(shift=3.0, train_steps=1000)).sigmas(5),
                               S.flow_sigmas(5, shift=3.0, train_steps=1000))
    torch.testing.assert_close(reg.get("ddpm").build().sigmas(5), S.ddpm_sigmas(5, spacing="leading", steps_offset=1))
    for name, fn in [("karras", S.karras_sigmas), ("exponential", S.exponential_sigmas), ("beta", S.beta_sigmas)]:
        torch.testing.assert_close(reg.get(name).build().sigmas(7), fn(7))
    custom = reg.get("karras").build(catalog.KarrasConfig(sigma_min=0.002, sigma_max=80.0, rho=5.0))
    torch.testing.assert_close(custom.sigmas(4), S.karras_sigmas(4, sigma_min=0.002, sigma_max=80.0, rho=5.0))
    with pytest.raises(ValueError, match="pass seq_len"):
        dynamic.sigmas(5)


def test_config_defaults_match_the_schedule_functions():
    assert catalog.SigmaRange().sigma_min == S.SD_SIGMA_MIN and catalog.SigmaRange().sigma_max == S.SD_SIGMA_MAX
    assert catalog.DynamicShiftConfig().dynamic and not catalog.FlowConfig().dynamic


def test_built_samplers_bind_their_options(registries):
    reg = registries["samplers"]
    assert reg.get("euler").build() is samplers.euler
    sde = reg.get("dpmpp_2m_sde").build(catalog.SDEConfig(eta=0.5, solver_type="heun"))
    assert sde.func is samplers.dpmpp_2m_sde and sde.keywords == {"eta": 0.5, "solver_type": "heun"}
    assert reg.get("ddim").build().keywords == {"eta": 0.0}
    assert reg.get("euler_ancestral").build().keywords == {"eta": 1.0}


def test_built_guidance_is_the_cfg_processor(registries):
    cfg = registries["guidance"].get("cfg").build(catalog.CFGConfig(scale=5.0, start=0.1, stop=0.9))
    assert isinstance(cfg, CFG) and (cfg.scale, cfg.start, cfg.stop) == (5.0, 0.1, 0.9)
    assert registries["guidance"].get("cfg").build().scale == 4.0


@pytest.mark.parametrize("make", [
    lambda: catalog.FlowConfig(shift=0.0),
    lambda: catalog.DynamicShiftConfig(base_seq_len=4096, max_seq_len=256),
    lambda: catalog.DDPMConfig(beta_start=0.02, beta_end=0.01),
    lambda: catalog.KarrasConfig(sigma_min=1.0, sigma_max=0.5),
    lambda: catalog.KarrasConfig(rho=0.0),
    lambda: catalog.AncestralConfig(eta=-0.1),
    lambda: catalog.DDIMConfig(eta=1.5),
    lambda: catalog.SDEConfig(eta=-1.0),
    lambda: catalog.CFGConfig(scale=-1.0),
    lambda: catalog.CFGConfig(start=0.6, stop=0.4),
    lambda: catalog.CFGConfig(stop=1.5),
], ids=["shift", "seq-lens", "betas", "sigma-range", "rho", "ancestral-eta", "ddim-eta", "sde-eta", "scale",
        "window", "stop"])
def test_validators_reject_bad_values(make):
    with pytest.raises(ValueError):
        make()


def test_job_tables_structure_into_the_configs(registries):
    from diffcore.config.structure import structure
    from diffcore.errors import ConfigError

    assert structure({"spacing": "trailing", "steps_offset": 0}, catalog.DDPMConfig).spacing == "trailing"
    with pytest.raises(ConfigError, match="spacing"):
        structure({"spacing": "uniform"}, catalog.DDPMConfig)
    with pytest.raises(ConfigError, match="start"):
        structure({"start": 0.9, "stop": 0.5}, catalog.CFGConfig)
