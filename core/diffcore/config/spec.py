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
    recompile once, at the second size, then cover every size). ``weight_dtype`` keeps the
    denoiser's linear weights in fp8, ``fp8_matmul`` multiplies in fp8 too, ``fp8_skip`` names
    layers kept as they are, ``text_weight_dtype`` stores the text encoders' in fp8
    (``diffcore.nn.fp8``)."""

    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    compile_dynamic: bool | None = None
    weight_dtype: Literal["auto", "float8_e4m3fn", "float8_e5m2"] = "auto"
    fp8_matmul: bool = False
    fp8_skip: list[str] = attrs.field(factory=list)
    text_weight_dtype: Literal["auto", "float8_e4m3fn", "float8_e5m2"] = "auto"

    def __attrs_post_init__(self) -> None:
        if not self.compile:
            for key, unset in (("compile_mode", "default"), ("compile_dynamic", None)):
                if getattr(self, key) != unset:
                    raise ConfigError(f"{key} has no effect without compile = true", path=key)
        if self.fp8_matmul and self.weight_dtype == "float8_e5m2":
            raise ConfigError("fp8_matmul = true multiplies float8_e4m3fn weights (GPUs have no e5m2 x e5m2 "
                              "matmul); set weight_dtype = \"float8_e4m3fn\" or leave it out", path="weight_dtype")
        if self.fp8_skip and not self.fp8:
            raise ConfigError("fp8_skip has no effect without weight_dtype = \"float8_e4m3fn\" (or e5m2) or "
                              "fp8_matmul = true", path="fp8_skip")

    @property
    def fp8(self) -> str | None:
        """The fp8 dtype the denoiser's weights are stored in, or None."""
        if self.weight_dtype != "auto":
            return self.weight_dtype
        return "float8_e4m3fn" if self.fp8_matmul else None


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
