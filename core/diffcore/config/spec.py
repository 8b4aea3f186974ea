"""Component selections inside job configs.

A job config field declared with ``component("models")`` takes a TOML table such as
``{family = "dit", variant = "tiny", depth = 4}``: the name picks the registered component, the
rest is structured into that component's own attrs config class. The result is a ``Spec``.
"""

from __future__ import annotations

from typing import Any

import attrs

from diffcore.registry import Component

# how a kind's table names its implementation
NAME_KEY = {"models": "family"}


@attrs.frozen
class Spec:
    """A chosen component and its structured config; ``build`` calls the factory."""

    component: Component
    config: Any

    @property
    def name(self) -> str:
        return self.component.name

    def build(self, **kwargs: Any) -> Any:
        return self.component.factory(self.config, **kwargs)


def component(kind: str, default: dict[str, Any] | None = None, *, optional: bool = False) -> Any:
    """An attrs field holding a ``Spec`` of ``kind`` (a list of them for ``kind="guidance"`` lists).

    ``default`` is a TOML-like table used when the job file leaves the section out.
    """
    meta = {"component": kind, "component_default": default}
    if default is None and not optional:
        return attrs.field(metadata=meta)
    return attrs.field(default=None, metadata=meta)


def component_list(kind: str) -> Any:
    """An attrs field holding a list of ``Spec`` (``[[guidance]]`` arrays of tables)."""
    return attrs.field(factory=list, metadata={"component": kind, "component_list": True})
