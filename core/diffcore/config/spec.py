"""Component selections inside job configs.

A job config field declared with ``component("models")`` takes a TOML table such as
``{family = "dit", variant = "tiny", depth = 4}``: the name picks the registered component, the
rest is structured into that component's own attrs config class. The result is a ``Spec``.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from diffcore.errors import ConfigError
from diffcore.registry import Component

# how a kind's table names its implementation
NAME_KEY = {"models": "family"}


@attrs.frozen
class ModelOptions:
    """``[model]`` keys that every family takes, handled by the core rather than each plugin's
    config: ``compile = true`` runs the denoiser through ``torch.compile`` (``diffcore.nn.compile``)
    with ``compile_mode`` and ``compile_dynamic`` (None: PyTorch's automatic dynamic shapes, which
    recompile once, at the second size, then cover every size)."""

    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    compile_dynamic: bool | None = None

    def __attrs_post_init__(self) -> None:
        if not self.compile:
            for key, unset in (("compile_mode", "default"), ("compile_dynamic", None)):
                if getattr(self, key) != unset:
                    raise ConfigError(f"{key} has no effect without compile = true", path=key)


# kind -> the attrs class of the keys the core takes out of every component table of that kind
COMMON_OPTIONS: dict[str, type] = {"models": ModelOptions}


@attrs.frozen
class Spec:
    """A chosen component and its structured config; ``build`` calls the factory. ``where`` is
    the table it came from (``model``, ``guidance[1]``), so a factory's error about one of its
    own fields can be placed in the job file."""

    component: Component
    config: Any
    where: str = attrs.field(default="", eq=False, repr=False)
    #: the kind's common keys (``COMMON_OPTIONS``), e.g. a model's ``ModelOptions``; None: defaults
    options: Any = None

    @property
    def name(self) -> str:
        return self.component.name

    def build(self, **kwargs: Any) -> Any:
        try:
            return self.component.factory(self.config, **kwargs)
        except ConfigError as exc:
            placed = self.placed(exc)
            if placed is exc:
                raise
            raise placed from exc

    def placed(self, exc: ConfigError) -> ConfigError:
        """``exc`` with a path naming one of this component's fields made absolute (``path`` ->
        ``model.path``); other paths (``job.width``) are already absolute."""
        head = (exc.path or "").split(".")[0].split("[")[0]
        fields = {a.alias or a.name for a in attrs.fields(type(self.config))} if attrs.has(type(self.config)) else set()
        if exc.file is not None or not self.where or head not in fields:
            return exc
        return ConfigError(exc.detail, path=f"{self.where}.{exc.path}")


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
