"""One test per hook: a plugin implementing it is called and what it registers is used."""

from __future__ import annotations

import attrs
import click
import pytest
from click.testing import CliRunner

from diffcore.hookspecs import hookimpl
from diffcore.testing import plugins_for_test


@attrs.frozen
class Cfg:
    value: int = 1


def _factory(cfg, **kwargs):
    return ("built", cfg.value, kwargs)


def _plugin_for(kind: str):
    class Plugin:
        pass

    def impl(self, register):
        register(f"test-{kind}", _factory, config=Cfg, description=f"a test {kind}")

    impl.__name__ = f"register_{kind}"
    setattr(Plugin, impl.__name__, hookimpl(impl))
    return Plugin()


def _check(kind: str):
    with plugins_for_test(_plugin_for(kind), entry_points=False) as pm:
        comp = pm.registry(kind).get(f"test-{kind}")
        assert comp.description == f"a test {kind}" and comp.plugin == "test-plugin-0"
        assert comp.build(Cfg(3), extra=1) == ("built", 3, {"extra": 1})
        assert pm.info["test-plugin-0"].registered == {kind: [f"test-{kind}"]}


def test_hook_register_models():
    _check("models")


def test_hook_register_schedules():
    _check("schedules")


def test_hook_register_samplers():
    _check("samplers")


def test_hook_register_guidance():
    _check("guidance")


def test_hook_register_trainers():
    _check("trainers")


def test_hook_register_conditioning():
    _check("conditioning")


def test_hook_register_datasets():
    _check("datasets")


def test_hook_register_jobs():
    _check("jobs")


def test_hook_register_request_fields():
    from diffcore.errors import PluginError
    from diffcore.jobs.serve import request_fields

    class Plugin:
        @hookimpl
        def register_request_fields(self, register):
            register("cfg_strength", guidance="cfg", option="scale")

    class Clash:
        @hookimpl
        def register_request_fields(self, register):
            register("cfg_strength", guidance="cfg", option="stop")

    with plugins_for_test(Plugin(), entry_points=False) as pm:
        assert request_fields(pm) == {"cfg_strength": ("cfg", "scale")}
    with plugins_for_test(Plugin(), Clash(), entry_points=False) as pm:
        with pytest.raises(PluginError, match="'cfg_strength' is registered by two plugins"):
            request_fields(pm)


def test_hook_register_commands():
    class Plugin:
        @hookimpl
        def register_commands(self, cli):
            @cli.command()
            def hello():
                """Say hello."""
                click.echo("hello from a plugin")

    from diffcore.cli import cli

    with plugins_for_test(Plugin(), entry_points=False) as pm:
        pm.add_commands(cli)
        try:
            result = CliRunner().invoke(cli, ["hello"])
        finally:
            cli.commands.pop("hello", None)
    assert result.exit_code == 0 and "hello from a plugin" in result.output


def test_hook_register_hookspecs():
    import pluggy

    spec = pluggy.HookspecMarker("diffcore")

    class RewardSpecs:
        @spec
        def register_rewards(register):
            """Register reward functions."""

    class Declares:
        @hookimpl
        def register_hookspecs(self, add):
            add(RewardSpecs)

    class Contributes:
        @hookimpl
        def register_rewards(self, register):
            register("sharpness", _factory, config=Cfg, description="a test reward")

    # the contributor registers before the declaring plugin: pending until load() ends
    with plugins_for_test(entry_points=False) as pm:
        pm.register_module(Contributes(), name="contributes", check=False)
        pm.register_module(Declares(), name="declares")
        assert pm.registry("rewards").get("sharpness").plugin == "contributes"
