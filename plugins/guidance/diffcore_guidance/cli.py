"""CLI commands this plugin adds: ``diffcore layers`` (the attention layer names a family has) and
``diffcore rewards``. Registering them imports click only; each command imports what it runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs, values read as TOML (``depth=2`` is an integer, ``name=x`` a string)."""
    try:
        import tomllib
    except ModuleNotFoundError:   # Python 3.10
        import tomli as tomllib

    from diffcore.api import ConfigError

    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            values[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key.strip()] = raw
    return values


def model_layers(family: str, variant: str | None = None, overrides: Sequence[str] = (),
                 device: str = "meta") -> list[str]:
    """Attention layer names of ``family``'s network, built with its config (``variant`` and
    ``--set`` fields) on ``device``; the meta device allocates nothing, so any size is instant."""
    import attrs
    import torch

    from diffcore.api import ConfigError, attention_layers, registry

    comp = registry("models").get(family)
    values = parse_overrides(overrides)
    if variant is not None:
        values["variant"] = variant
    fields = {a.name for a in attrs.fields(comp.config) if a.init}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{family} has no config field {', '.join(map(repr, unknown))}; "
                          f"it accepts: {', '.join(sorted(fields))}")
    try:
        config = comp.config(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{family} config: {exc}") from None
    try:
        with torch.device(device):
            bundle = comp.factory(config, device=device)
    except (RuntimeError, NotImplementedError) as exc:
        raise ConfigError(f"building {family} on the {device} device failed ({exc}); try --device cpu") from None
    return list(attention_layers(bundle.network))


def add_commands(cli: Any) -> None:
    import click

    @cli.command("layers")
    @click.argument("family")
    @click.option("--variant", default=None, help="The family's variant (its config's `variant`).")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="A model config field, e.g. --set depth=2 (value parsed as TOML).")
    @click.option("--device", default="meta", show_default=True,
                  help="Where to build the network; meta allocates no weights.")
    def layers(family: str, variant: str | None, overrides: tuple[str, ...], device: str) -> None:
        """Attention layer names of FAMILY's network, one a line: what PAG, NAG and NAG-PAG's
        `layers` take (diffusers-style names work too where the family maps them)."""
        for name in model_layers(family, variant, overrides, device):
            click.echo(name)

    @cli.command("rewards")
    def rewards() -> None:
        """Rewards for train-guidance jobs (a component kind of diffcore-guidance), with their fields."""
        import attrs

        from diffcore.api import get_plugins

        for comp in get_plugins().registry("rewards"):
            click.echo(f"{comp.name}  [{comp.plugin}]  {comp.description}")
            for a in attrs.fields(comp.config):
                default = "(required)" if a.default is attrs.NOTHING else f"= {a.default!r}"
                kind = a.type.__name__ if isinstance(a.type, type) else a.type  # resolved once structured
                click.echo(f"    {a.name}: {kind} {default}")
