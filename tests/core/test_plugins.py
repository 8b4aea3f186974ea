"""Plugin discovery through real entry points: broken plugins, subsets, strict mode, conflicts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import attrs
import pytest

import echo_plugin
from diffcore.errors import PluginError
from diffcore.hookspecs import hookimpl
from diffcore.plugins import Plugins
from diffcore.testing import plugins_for_test


def make_distribution(site: Path, dist: str, module: str, source: str, version: str = "0.1.0") -> None:
    """A real installed distribution: module + .dist-info with a ``diffcore`` entry point."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[diffcore]\n{dist.removeprefix('diffcore-')} = {module}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    make_distribution(site, "diffcore-broken", "diffcore_broken_mod", 'raise RuntimeError("boom at import")\n')
    make_distribution(site, "diffcore-echo", "diffcore_echo_mod", Path(echo_plugin.__file__).read_text(),
                      version="1.2.3")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("DIFFCORE_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("DIFFCORE_STRICT_PLUGINS", raising=False)
    return site


def test_broken_plugin_is_recorded_and_others_work(site):
    pm = Plugins().load()
    broken = pm.info["broken"]
    assert broken.distribution == "diffcore-broken" and broken.version == "0.1.0"
    assert "RuntimeError: boom at import" in broken.error
    assert "echo" in pm.registry("jobs") and pm.registry("jobs").get("echo").plugin == "echo"
    assert pm.info["echo"].version == "1.2.3" and pm.info["echo"].error is None


def test_strict_mode_raises_on_broken_plugin(site, monkeypatch):
    monkeypatch.setenv("DIFFCORE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="broken .diffcore-broken 0.1.0. failed to load.*boom"):
        Plugins().load()


@pytest.mark.parametrize("selection,expected", [("echo", {"echo"}), ("", set()), ("broken,echo", {"broken", "echo"})])
def test_load_plugins_env_selects_a_subset(site, monkeypatch, selection, expected):
    monkeypatch.setenv("DIFFCORE_LOAD_PLUGINS", selection)
    pm = Plugins().load()
    assert set(pm.info) - {"diffcore"} == expected


def cli(*args: str, site: Path, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
                   **(env or {})}
    environment.pop("DIFFCORE_LOAD_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", "diffcore", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=120)


def test_cli_reports_broken_plugin_and_still_runs_jobs(site, tmp_path):
    listing = cli("plugins", site=site, cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "broken (diffcore-broken 0.1.0) BROKEN" in listing.stdout
    assert "boom at import" in listing.stdout
    assert "echo (diffcore-echo 1.2.3)" in listing.stdout and "jobs: echo" in listing.stdout
    (tmp_path / "job.toml").write_text(f'[job]\nkind = "echo"\noutput_dir = "{tmp_path / "out"}"\n')
    result = cli("run", "job.toml", "--set", "job.steps=3", site=site, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert '"steps": 3' in (tmp_path / "out" / "echo.json").read_text()


def test_cli_user_error_is_one_paragraph_without_traceback(site, tmp_path):
    (tmp_path / "job.toml").write_text('[job]\nkind = "echo"\nstpes = 3\n')
    result = cli("run", "job.toml", site=site, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert 'job.toml, at job.stpes: unknown key \'stpes\' (did you mean "steps"?)' in result.stderr
    debug = cli("--debug", "run", "job.toml", site=site, cwd=tmp_path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_cli_config_show_and_validate(site, tmp_path):
    (tmp_path / "job.toml").write_text('[job]\nkind = "echo"\n')
    shown = cli("config", "show", "job.toml", "--set", "job.steps=4", site=site, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "steps = 4" in shown.stdout and 'name = "toy"' in shown.stdout
    valid = cli("config", "validate", "job.toml", site=site, cwd=tmp_path)
    assert valid.returncode == 0 and "ok (echo job)" in valid.stdout


def test_cli_list_shows_fields_and_defaults(site, tmp_path):
    result = cli("list", "samplers", site=site, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "toy  [echo]  toy sampler" in result.stdout and "eta: float = 0.0" in result.stdout
    bad = cli("list", "sampler", site=site, cwd=tmp_path)
    assert bad.returncode == 1 and 'did you mean "samplers"' in bad.stderr


@attrs.frozen
class OtherConfig:
    eta: float = 1.0


class Clash:
    @hookimpl
    def register_samplers(self, register):
        register("toy", lambda c: None, config=OtherConfig)


def _toy_factory(cfg):
    return cfg


def test_two_plugins_registering_one_name_is_an_error_naming_both():
    with plugins_for_test(echo_plugin, Clash(), entry_points=False) as pm:
        with pytest.raises(PluginError, match=r"samplers 'toy' is registered by two plugins: echo_plugin and test-plugin-1"):
            pm.registry("samplers")


def test_identical_reregistration_is_a_no_op():
    from diffcore.registry import Registry

    reg = Registry("samplers")
    reg.add("toy", _toy_factory, config=OtherConfig, plugin="a")
    reg.add("toy", _toy_factory, config=OtherConfig, plugin="a")
    assert len(reg) == 1


def test_misspelt_hook_implementation_is_an_error():
    class Typo:
        @hookimpl
        def register_sampler(self, register):  # missing "s"
            pass

    pm = Plugins().load(entry_points=False)
    with pytest.raises(PluginError, match="register_sampler"):
        pm.register_module(Typo(), name="typo")


def test_plugin_commands_module_is_cheap_to_import():
    """Listing plugins and their components must not import torch (factories import it lazily)."""
    code = ("import sys, diffcore.cli; from diffcore.plugins import get_plugins; pm = get_plugins(); "
            "[pm.registry(k) for k in pm.registries]; print('torch' in sys.modules, [p.name for p in pm.broken])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False []", out.stdout + out.stderr
