"""One registry per component kind: name -> factory, config class, owning plugin, description."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import attrs

from diffcore.errors import PluginError, did_you_mean

KINDS = ("models", "schedules", "samplers", "guidance", "trainers", "conditioning", "datasets", "jobs")


def singular(kind: str) -> str:
    """'models' -> 'model'; 'guidance' stays."""
    return kind[:-1] if kind.endswith("s") else kind


@attrs.frozen
class NoConfig:
    """Config class of components that take no options."""


@attrs.frozen
class Component:
    kind: str
    name: str
    factory: Callable[..., Any]
    config: type
    plugin: str
    description: str

    def build(self, config: Any = None, **kwargs: Any) -> Any:
        """Call the factory with a structured config (default: the config class's defaults)."""
        return self.factory(self.config() if config is None else config, **kwargs)


class Registry:
    """Components of one kind. Identical re-registration is a no-op; a clash names both owners."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Component] = {}

    def add(self, name: str, factory: Callable[..., Any], *, config: type = NoConfig,
            description: str = "", plugin: str = "?") -> None:
        if not attrs.has(config):
            raise PluginError(f"plugin {plugin}: {self.kind} {name!r} config must be an attrs class, got {config!r}")
        new = Component(self.kind, name, factory, config, plugin, description)
        old = self._items.get(name)
        if old is not None:
            if (old.factory, old.config) == (new.factory, new.config):
                return
            raise PluginError(f"{self.kind} {name!r} is registered by two plugins: {old.plugin} and {plugin}")
        self._items[name] = new

    def get(self, name: str) -> Component:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise PluginError(
                f"unknown {singular(self.kind)} {name!r}"
                f"{did_you_mean(name, self._items)}; registered: {known}"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[Component]:
        return iter(sorted(self._items.values(), key=lambda c: c.name))

    def __len__(self) -> int:
        return len(self._items)
