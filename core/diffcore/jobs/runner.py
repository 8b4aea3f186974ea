"""Load, validate and run a job file: ``diffcore run`` and ``diffcore config`` use this."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import tomli_w

from diffcore.config.loader import Document, load_document
from diffcore.config.structure import structure, unstructure
from diffcore.errors import ConfigError, DiffcoreError
from diffcore.jobs import JobContext, in_given_names, is_main_process, rename_settings
from diffcore.plugins import check_requirements, registry
from diffcore.registry import Component


@attrs.define
class PreparedJob:
    doc: Document
    component: Component
    config: Any

    @property
    def kind(self) -> str:
        return self.component.name

    def resolved(self) -> dict[str, Any]:
        """The full config, defaults filled in, as it would be written next to the outputs."""
        out = unstructure(self.config)
        out.setdefault("job", {})
        out["job"] = {"kind": self.kind, **out["job"]}
        requires = self.doc.data.get("requires")
        return {"requires": requires, **out} if requires else out


def prepare(path: str | Path, overrides: list[str] = (), *, check_paths: bool = True) -> PreparedJob:
    """Read the file, check ``requires``, pick the job kind and structure everything.
    ``check_paths=False`` checks all but the existence of local model and data files."""
    if not check_paths:
        from diffcore.config.validators import paths_unchecked

        with paths_unchecked():
            return prepare(path, overrides)
    doc = load_document(path, list(overrides))
    data = dict(doc.data)
    file = str(doc.file)
    requires = data.pop("requires", [])
    if isinstance(requires, str):
        requires = [requires]
    if not isinstance(requires, list):
        raise ConfigError(f"expected an array of requirement strings, found {requires!r}", file=file, path="requires")
    check_requirements(requires, file=doc.origin("requires"))
    job_table = data.get("job")
    if not isinstance(job_table, dict) or "kind" not in job_table:
        kinds = ", ".join(c.name for c in registry("jobs"))
        raise ConfigError(f"missing [job] kind = \"...\"; registered job kinds: {kinds}", file=file, path="job.kind")
    kind = job_table["kind"]
    jobs = registry("jobs")
    if not isinstance(kind, str) or kind not in jobs:
        try:
            jobs.get(str(kind))
        except DiffcoreError as exc:
            raise ConfigError(str(exc), file=doc.origin("job.kind"), path="job.kind") from None
    data["job"] = {k: v for k, v in job_table.items() if k != "kind"}
    component = jobs.get(kind)
    data, applied = rename_settings(data, getattr(component.config, "renamed", {}), file=file)
    for new, old in applied.items():   # a renamed setting still comes from the file (or --set) that gave it
        if old in doc.origins:
            doc.origins[new] = doc.origins[old]
    try:
        return PreparedJob(doc, component, structure(data, component.config, doc))
    except ConfigError as exc:
        raise in_given_names(exc, applied) from None


def run(path: str | Path, overrides: list[str] = (), *, debug: bool = False) -> Any:
    """Prepare the job, write its resolved config next to the outputs, run it. A job stopped by
    bad input before it wrote anything leaves no trace (see ``untouched_unless_written``); its
    ``ConfigError`` names the job file even when raised deep inside a component."""
    job = prepare(path, overrides)
    output_dir = Path(getattr(job.config.job, "output_dir", "outputs"))
    resolved = job.resolved()
    ctx = JobContext(file=job.doc.file, output_dir=output_dir, resolved=resolved, debug=debug)
    main = is_main_process()
    with untouched_unless_written(output_dir) if main else contextlib.nullcontext():
        if main:
            output_dir.mkdir(parents=True, exist_ok=True)
            write_toml(output_dir / "config.toml", resolved)
        try:
            return job.component.factory(job.config, ctx)
        except ConfigError as exc:
            if exc.file is not None:
                raise
            raise ConfigError(exc.detail, file=job.doc.origin(exc.path or ""), path=exc.path) from exc


@contextlib.contextmanager
def untouched_unless_written(output_dir: Path) -> Iterator[None]:
    """On a ``DiffcoreError``, undo the run's own traces when the job itself changed nothing in
    ``output_dir``: its ``config.toml`` goes (or the previous one comes back), and so do the
    folders made for it. A job that failed after writing results keeps them all."""
    config = output_dir / "config.toml"
    made = [p for p in (output_dir, *output_dir.parents) if not p.exists()]   # deepest first
    previous = config.read_bytes() if config.is_file() else None
    before = _listing(output_dir)
    try:
        yield
    except DiffcoreError:
        if _listing(output_dir) == before:
            if previous is None:
                config.unlink(missing_ok=True)
            else:
                config.write_bytes(previous)
            for folder in made:
                if not folder.is_dir() or any(folder.iterdir()):
                    break
                folder.rmdir()
        raise


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under ``folder`` but its ``config.toml``."""
    if not folder.is_dir():
        return {}
    files = (p for p in folder.rglob("*") if p.is_file() and p != folder / "config.toml")
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def write_toml(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(tomli_w.dumps(data))
    tmp.replace(path)
