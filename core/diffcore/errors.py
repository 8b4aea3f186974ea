"""Errors a user can act on. The CLI prints these as one paragraph, without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DiffcoreError(Exception):
    """Base of every error caused by input (job files, checkpoints, plugins), not by a bug."""


class ConfigError(DiffcoreError):
    """A job file or override is wrong; the message names the file and the dotted key path."""

    def __init__(self, message: str, *, file: str | None = None, path: str | None = None):
        self.file, self.path, self.detail = file, path, message
        where = ", ".join(p for p in (str(file) if file else None, f"at {path}" if path else None) if p)
        super().__init__(f"{where}: {message}" if where else message)


class PluginError(DiffcoreError):
    """A plugin is broken, missing or conflicts with another."""


class CheckpointError(DiffcoreError):
    """A weights file does not match the model it is loaded into."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean "x"?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""
