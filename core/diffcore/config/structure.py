"""TOML tables -> attrs config classes, with errors that name the file and the dotted path.

Why not plain ``cattrs.structure``: a component table picks its config class by its ``name``
(resolved in a registry at run time), and users need did-you-mean hints and one message per
mistake with its full path. This walk does the typing strictly (no silent 3.7 -> 3) and runs
each field's attrs validators itself so a failure is attributed to its key. Unstructuring
(config -> TOML-ready dict) is plain cattrs with one hook for component specs.
"""

from __future__ import annotations

import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import attrs
import cattrs

from diffcore.config.loader import Document
from diffcore.config.spec import COMMON_OPTIONS, NAME_KEY, Spec
from diffcore.errors import ConfigError, DiffcoreError, did_you_mean
from diffcore.registry import singular

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", Path: "a path"}


def structure(data: Any, cls: type, doc: Document | None = None, path: str = "") -> Any:
    """Structure ``data`` (from TOML) into ``cls``; errors cite ``doc``'s files and ``path``."""
    return _Walk(doc or Document({})).value(data, cls, path)


class _Walk:
    def __init__(self, doc: Document):
        self.doc = doc

    def error(self, path: str, message: str) -> ConfigError:
        return ConfigError(message, file=self.doc.origin(path), path=path or None)

    def value(self, data: Any, tp: Any, path: str) -> Any:
        if tp is Any:
            return data
        if attrs.has(tp):
            return self.attrs_class(data, tp, path)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is Literal:
            if data not in args:
                raise self.error(path, f"expected one of {', '.join(map(repr, args))}, found {data!r}"
                                 f"{did_you_mean(str(data), map(str, args))}")
            return data
        if origin in (Union, types.UnionType):
            if data is None and type(None) in args:
                return None
            options = [a for a in args if a is not type(None)]
            errors = []
            for option in options:
                try:
                    return self.value(data, option, path)
                except ConfigError as exc:
                    errors.append(exc)
            if len(errors) == 1:
                raise errors[0]
            raise self.error(path, f"expected {' or '.join(_describe(o) for o in options)}, found {_found(data)}")
        if origin in (list, tuple) or tp in (list, tuple):
            if not isinstance(data, list):
                raise self.error(path, f"expected {_describe(tp)}, found {_found(data)}")
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(args) != len(data):
                    raise self.error(path, f"expected {len(args)} values, found {len(data)}")
                return tuple(self.value(d, a, f"{path}[{i}]") for i, (d, a) in enumerate(zip(data, args)))
            item = args[0] if args else Any
            out = [self.value(d, item, f"{path}[{i}]") for i, d in enumerate(data)]
            return tuple(out) if origin is tuple else out
        if origin is dict or tp is dict:
            if not isinstance(data, dict):
                raise self.error(path, f"expected a table, found {_found(data)}")
            vt = args[1] if args else Any
            return {k: self.value(v, vt, f"{path}.{k}") for k, v in data.items()}
        return self.scalar(data, tp, path)

    def scalar(self, data: Any, tp: Any, path: str) -> Any:
        ok = {
            bool: isinstance(data, bool),
            int: isinstance(data, int) and not isinstance(data, bool),
            float: isinstance(data, (int, float)) and not isinstance(data, bool),
            str: isinstance(data, str),
            Path: isinstance(data, str),
        }.get(tp)
        if ok is None:
            raise TypeError(f"config type {tp!r} at {path} is not supported by diffcore.config")
        if not ok:
            raise self.error(path, f"expected {_describe(tp)}, found {_found(data)}")
        if tp is float and not math.isfinite(data):  # TOML has nan and inf; no setting means them
            raise self.error(path, f"expected a finite number, found {data!r}")
        return tp(data) if tp in (float, Path) else data

    def attrs_class(self, data: Any, cls: type, path: str, common: type | None = None) -> Any:
        """``common``: the class of the keys the core took out of this table before (a model's
        ``compile``); an unknown key's message lists them too."""
        if not isinstance(data, dict):
            raise self.error(path, f"expected a table, found {_found(data)}")
        fields = {a.name: a for a in attrs.fields(attrs.resolve_types(cls)) if a.init}
        keys = {(a.alias or a.name): a for a in fields.values()}
        extra = _keys(common) if common is not None else []
        for key in data:
            if key not in keys:
                where = f"{path}.{key}" if path else key
                also = f" (and the core: {', '.join(extra)})" if extra else ""
                raise self.error(where, f"unknown key {key!r}{did_you_mean(key, [*keys, *extra])}; "
                                        f"{_name(cls)} accepts: {', '.join(keys) or 'nothing'}{also}")
        kwargs = {}
        for key, field in keys.items():
            where = f"{path}.{key}" if path else key
            if "component" in field.metadata:
                kwargs[key] = self.component_field(data.get(key), field, where)
                continue
            if key not in data:
                if field.default is attrs.NOTHING:
                    raise self.error(where, f"missing required key {key!r} ({_describe(field.type)})")
                continue
            value = self.value(data[key], field.type, where)
            if field.validator is not None:
                try:
                    field.validator(None, field, value)
                except (ValueError, TypeError) as exc:
                    raise self.error(where, f"invalid value {value!r}: {_validator_message(exc)}") from None
                except ConfigError as exc:  # a plugin's validator: it knows its field, not the file
                    raise self._placed(exc, where, field_path=True) from None
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as exc:  # cross-field checks in __attrs_post_init__
            raise self.error(path, _validator_message(exc)) from None
        except ConfigError as exc:
            raise self._placed(exc, path) from None

    def _placed(self, exc: ConfigError, path: str, field_path: bool = False) -> ConfigError:
        """A ``ConfigError`` raised inside a config class, placed in the file: its path (relative
        to the class's table) gets the table's prefix, the file that set it is named. A
        validator's error is about its own field, whatever path it gave."""
        if exc.file is not None:
            return exc
        where = path if field_path else ".".join(p for p in (path, exc.path) if p)
        return self.error(where, exc.detail)

    def component_field(self, data: Any, field: attrs.Attribute, path: str) -> Any:
        kind = field.metadata["component"]
        if field.metadata.get("component_list"):
            data = [] if data is None else data
            if not isinstance(data, list):
                raise self.error(path, f"expected an array of tables ([[{path}]]), found {_found(data)}")
            return [self.component(d, kind, f"{path}[{i}]") for i, d in enumerate(data)]
        default = field.metadata.get("component_default")
        key = NAME_KEY.get(kind, "name")
        if isinstance(data, dict) and key not in data and default is not None:
            data = {**default, **data}  # `[sampler] eta = 1` tunes the default sampler
        if data is None:
            if default is None:
                if field.default is None:
                    return None
                raise self.error(path, f"missing required table [{path}] choosing a {singular(kind)}")
            data = dict(default)
        return self.component(data, kind, path)

    def component(self, data: Any, kind: str, path: str) -> Spec:
        from diffcore.plugins import registry

        if not isinstance(data, dict):
            raise self.error(path, f"expected a table, found {_found(data)}")
        key = NAME_KEY.get(kind, "name")
        if key not in data:
            raise self.error(path, f"missing key {key!r} naming the {singular(kind)}")
        name = data[key]
        reg = registry(kind)
        if not isinstance(name, str) or name not in reg:
            known = ", ".join(c.name for c in reg) or "none installed"
            raise self.error(f"{path}.{key}", f"unknown {singular(kind)} {name!r}{did_you_mean(str(name), [c.name for c in reg])}"
                                              f"; registered: {known} (see `diffcore list {kind}`)")
        comp = reg.get(name)
        rest = {k: v for k, v in data.items() if k != key}
        common = COMMON_OPTIONS.get(kind)
        options = None
        if common is not None:   # keys every component of this kind takes, before its own config sees the table
            mine = {k: rest.pop(k) for k in _keys(common) if k in rest}
            options = self.attrs_class(mine, common, path) if mine else None
        return Spec(comp, self.attrs_class(rest, comp.config, path, common), where=path, options=options)


def _keys(cls: type) -> list[str]:
    return [a.alias or a.name for a in attrs.fields(cls) if a.init]


def _validator_message(exc: Exception) -> str:
    return str(exc.args[0]) if exc.args else str(exc)


def _name(cls: type) -> str:
    return cls.__name__


def _describe(tp: Any) -> str:
    if tp in _TYPE_NAMES:
        return _TYPE_NAMES[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple) or tp in (list, tuple):
        return f"an array of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "an array"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if attrs.has(tp) or origin is dict:
        return "a table"
    return getattr(tp, "__name__", str(tp))


def _found(data: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(data), type(data).__name__)
    shown = repr(data) if not isinstance(data, (list, dict)) else ""
    return f"{kind} {shown}".strip()


_converter = cattrs.Converter()
_converter.register_unstructure_hook(Path, str)


def _unstructure_spec(spec: Spec) -> dict[str, Any]:
    key = NAME_KEY.get(spec.component.kind, "name")
    options = {} if spec.options is None else unstructure(spec.options)
    return {key: spec.name, **unstructure(spec.config), **options}


_converter.register_unstructure_hook(Spec, _unstructure_spec)


def unstructure(config: Any) -> Any:
    """Config -> plain dict ready for TOML (``None`` values dropped: TOML has no null)."""
    return _drop_none(_converter.unstructure(config))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value


__all__ = ["DiffcoreError", "structure", "unstructure"]
