"""Jobs: what ``diffcore run`` does, dispatched on ``[job] kind``.

A job registers ``register(kind, run, config=JobClass)``. ``JobClass`` structures the whole job
file (``requires`` and ``extends`` removed, ``kind`` removed from ``[job]``); its ``job`` field is
a ``JobSettings`` subclass. ``run(config, ctx)`` does the work.
"""

from __future__ import annotations

import os
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
