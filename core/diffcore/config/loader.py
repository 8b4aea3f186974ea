"""Reading job files: TOML, ``extends`` inheritance (deep merge) and ``--set`` overrides.

Every value remembers which file (or ``--set``) it came from, so a later error can name it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import attrs

from diffcore.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@attrs.define
class Document:
    """A merged job file: the data and, per dotted path, the file that set it."""

    data: dict[str, Any]
    file: Path | None = None
    origins: dict[str, str] = attrs.Factory(dict)

    def origin(self, path: str) -> str | None:
        """The file that set ``path`` or its nearest enclosing table."""
        while True:
            if path in self.origins:
                return self.origins[path]
            if not path:
                return str(self.file) if self.file else None
            path = _parent(path)


def load_document(path: str | Path, overrides: list[str] = ()) -> Document:
    """Load ``path`` with everything it extends, then apply ``--set`` overrides in order."""
    path = Path(path)
    doc = Document({}, file=path)
    _load_into(doc, path.resolve(), stack=[])
    for text in overrides:
        apply_override(doc, text)
    return doc


def _read_toml(path: Path, *, referrer: Path | None) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if referrer is None:
            raise ConfigError(f"job file not found: {path}") from None
        raise ConfigError(f"extends a file that does not exist: {path}", file=str(referrer), path="extends") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"TOML syntax error: {exc}", file=str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text: {exc}", file=str(path)) from None


def _load_into(doc: Document, path: Path, stack: list[Path], referrer: Path | None = None) -> None:
    if path in stack:
        cycle = " -> ".join(p.name for p in [*stack, path])
        raise ConfigError(f"extends cycle: {cycle}", file=str(stack[-1]), path="extends")
    data = _read_toml(path, referrer=referrer)
    parents = data.pop("extends", [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"expected a file name or a list of file names, found {parents!r}", file=str(path),
                          path="extends")
    for parent in parents:
        _load_into(doc, (path.parent / parent).resolve(), [*stack, path], referrer=path)
    _merge(doc, doc.data, data, prefix="", source=str(path))


def _merge(doc: Document, base: dict[str, Any], new: dict[str, Any], prefix: str, source: str) -> None:
    """Deep merge: tables merge key by key, everything else (arrays included) replaces."""
    for key, value in new.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            if not isinstance(base.get(key), dict):
                base[key] = {}
                _forget_below(doc, path)
            _merge(doc, base[key], value, path, source)
        else:
            base[key] = value
            _forget_below(doc, path)
        doc.origins[path] = source


def _forget_below(doc: Document, path: str) -> None:
    for key in [k for k in doc.origins if k.startswith(path + ".") or k.startswith(path + "[")]:
        del doc.origins[key]


_SEGMENT = re.compile(r"([A-Za-z0-9_\-]+)|\[(\d+)\]")


def parse_path(path: str) -> list[str | int]:
    """``guidance[0].scale`` -> ["guidance", 0, "scale"]."""
    parts: list[str | int] = []
    pos = 0
    while pos < len(path):
        if path[pos] == "." and parts and pos + 1 < len(path):
            pos += 1
        m = _SEGMENT.match(path, pos)
        if not m:
            raise ConfigError(f"cannot parse key path {path!r} at character {pos + 1}", file="--set", path="--set")
        parts.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    if not parts or not isinstance(parts[0], str):
        raise ConfigError(f"cannot parse key path {path!r}", file="--set", path="--set")
    return parts


def format_path(parts: list[str | int]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word or path: take it as a string, as users expect from a shell


def apply_override(doc: Document, text: str) -> None:
    """Apply ``path=value`` (value parsed as TOML, else taken as a string)."""
    if "=" not in text:
        raise ConfigError(f"expected KEY=VALUE, found {text!r}", file="--set", path="--set")
    key, _, value = text.partition("=")
    parts = parse_path(key.strip())
    node: Any = doc.data
    for i, part in enumerate(parts[:-1]):
        here = format_path(parts[: i + 1])
        nxt = parts[i + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                size = len(node) if isinstance(node, list) else "not a list"
                raise ConfigError(f"--set {key}: index {part} is out of range ({size})", file="--set", path=here)
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {format_path(parts[:i])} is not a table", file="--set", path=here)
            node = node.setdefault(part, [] if isinstance(nxt, int) else {})
    last = parts[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last > len(node):
            raise ConfigError(f"--set {key}: index {last} is out of range", file="--set", path=format_path(parts))
        if last == len(node):
            node.append(None)
    elif not isinstance(node, dict):
        raise ConfigError(f"--set {key}: {format_path(parts[:-1])} is not a table", file="--set", path=format_path(parts))
    node[last] = _parse_value(value.strip())
    doc.origins[format_path(parts)] = "--set"


def _parent(path: str) -> str:
    if path.endswith("]"):
        return path[: path.rindex("[")]
    return path.rsplit(".", 1)[0] if "." in path else ""
