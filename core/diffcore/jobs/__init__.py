"""Jobs: what ``diffcore run`` does, dispatched on ``[job] kind``.

A job registers ``register(kind, run, config=JobClass)``. ``JobClass`` structures the whole job
file (``requires`` and ``extends`` removed, ``kind`` removed from ``[job]``); its ``job`` field is
a ``JobSettings`` subclass. ``run(config, ctx)`` does the work. A setting that was renamed stays
accepted for a release: the job class lists it in ``renamed = {"job.old": "job.new"}`` and
``rename_settings`` moves it, with a warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs


@attrs.define
class JobContext:
    """Where a job runs: its file, its output folder, the fully resolved config."""

    file: Path | None
    output_dir: Path
    resolved: dict[str, Any]
    debug: bool = False


def is_main_process() -> bool:
    """Only rank 0 writes files when a launcher (torchrun, accelerate) starts several processes."""
    return int(os.environ.get("RANK", "0")) == 0


@attrs.define
class JobSettings:
    """Fields every job's ``[job]`` table has."""

    output_dir: str = "outputs"
    seed: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    device: str = "auto"   # "auto" = cuda if available, else cpu


class RenamedSetting(FutureWarning):
    """A job file uses a setting's old name (shown by default: it is meant for the job's author)."""


def rename_settings(data: dict[str, Any], renamed: Mapping[str, str], *,
                    file: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """``data`` with each old dotted key in ``renamed`` moved to its new name in the same table
    (a warning says so), and the renames applied, new -> old (for ``in_given_names``). Both names
    given is a ``ConfigError``. Tables on the way are copied, never changed in place."""
    from diffcore.errors import ConfigError

    data, applied = dict(data), {}
    for old, new in renamed.items():
        *parents, key = old.split(".")
        new_key = new.rsplit(".", 1)[-1]
        table = data
        for name in parents:
            if not isinstance(table.get(name), dict):
                break
            table[name] = dict(table[name])
            table = table[name]
        else:
            if key not in table:
                continue
            if new_key in table:
                raise ConfigError(f"{key} is the old name of {new_key}; give {new_key} only", file=file, path=old)
            table[new_key] = table.pop(key)
            applied[new] = old
            warnings.warn(f"{file or 'job'}: {old} is now {new} (the old name still works in this release)",
                          RenamedSetting, stacklevel=2)
    return data, applied


def in_given_names(exc: Any, applied: Mapping[str, str]) -> Any:
    """A ``ConfigError`` about a renamed setting, in the name the job file used."""
    from diffcore.errors import ConfigError

    path = exc.path or ""
    for new, old in applied.items():
        if path == new or path.startswith(f"{new}."):
            detail = exc.detail.replace(repr(new.rsplit(".", 1)[-1]), repr(old.rsplit(".", 1)[-1]))
            return ConfigError(detail, file=exc.file, path=old + path[len(new):])
    return exc
