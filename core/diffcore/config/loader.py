"""Reading job files: TOML, ``extends`` inheritance (deep merge) and ``--set`` overrides.

Every value remembers which file (or ``--set``) it came from, so a later error can name it.
"""

from __future__ import annotations

import re
import stat
import sys
from pathlib import Path
from typing import Any

import attrs

from diffcore.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAX_JOB_FILE = 1 << 20  # bytes; a job file is settings: anything bigger is the wrong file (docs/reliability.md)


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
    _load_into(doc, _resolve(path), stack=[])
    for text in overrides:
        apply_override(doc, text)
    return doc


def _resolve(path: Path) -> Path:
    """The absolute, symlink-free path; a symlink loop stays as it is, for reading to report."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: Python < 3.13 on a symlink loop
        return path.absolute()


def _read_toml(path: Path, *, referrer: Path | None) -> dict[str, Any]:
    raw = _read_bytes(path, referrer)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - raw.rfind(b"\n", 0, exc.start)
        raise ConfigError(f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at line {line}, column {column} "
                          f"({exc.reason}); job files are TOML, which is UTF-8", file=str(path)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_syntax_message(str(exc), text), file=str(path)) from None


def _read_bytes(path: Path, referrer: Path | None) -> bytes:
    """The file's bytes, at most ``MAX_JOB_FILE`` of them. Checked before reading: a folder, a
    device or a FIFO (which would block) is refused by what it is, a big file by its size."""
    def refused(problem: str) -> ConfigError:
        if referrer is None:
            return ConfigError(f"job file {path} {problem}")
        return ConfigError(f"extends {path}, which {problem}", file=str(referrer), path="extends")

    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise refused("is a folder; expected a TOML file")
        if not stat.S_ISREG(info.st_mode):
            raise refused("is not a regular file; expected a TOML file")
        if info.st_size > MAX_JOB_FILE:
            raise refused(_too_big(info.st_size))
        with open(path, "rb") as f:
            raw = f.read(MAX_JOB_FILE + 1)
    except FileNotFoundError:
        if referrer is None:
            raise ConfigError(f"job file not found: {path}") from None
        raise ConfigError(f"extends a file that does not exist: {path}", file=str(referrer), path="extends") from None
    except OSError as exc:  # permissions, a symlink loop, an I/O error
        raise refused(f"cannot be read: {exc.strerror or exc}") from None
    if len(raw) > MAX_JOB_FILE:  # grew since stat
        raise refused(_too_big(len(raw)))
    return raw


def _too_big(size: int) -> str:
    return (f"is {size:,} bytes; job files are settings, limited to {MAX_JOB_FILE:,} bytes (1 MiB): "
            f"is this the right file?")


_AT = re.compile(r"^(?P<what>.*) \(at (?:line (?P<line>\d+), column (?P<column>\d+)|end of document)\)$", re.S)
_TWICE = re.compile(r"Cannot declare \((?P<parts>.*?),?\) twice")


def _syntax_message(message: str, text: str) -> str:
    """tomllib's message with the offending line quoted and a key or table given twice said so."""
    m = _AT.match(message)
    if not m:
        return f"TOML syntax error: {message}"
    what = m["what"]
    if what == "Cannot overwrite a value":
        what = "a key set a second time (each key may appear once)"
    elif twice := _TWICE.match(what):
        table = ".".join(part.strip().strip("'\"") for part in twice["parts"].split(","))
        what = f"table [{table}] declared a second time (each table may appear once)"
    if m["line"] is None:
        return f"TOML syntax error at the end of the file: {what}"
    lines = text.splitlines()
    number = int(m["line"])
    shown = lines[number - 1].strip() if number <= len(lines) else ""
    if shown and not shown.isprintable():
        quoted = " (the line holds non-printing characters: is this a binary file?)"
    else:
        quoted = f": {shown[:80]!r}" if shown else ""
    return f"TOML syntax error at line {number}, column {m['column']}: {what}{quoted}"


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
        _load_into(doc, _resolve(path.parent / parent), [*stack, path], referrer=path)
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
