"""Load, validate and run a job file: ``diffcore run`` and ``diffcore config`` use this."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import tomli_w

from diffcore.config.loader import Document, load_document
from diffcore.config.structure import structure, unstructure
from diffcore.errors import ConfigError, DiffcoreError
from diffcore.jobs import JobContext, is_main_process, rename_settings
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


def prepare(path: str | Path, overrides: list[str] = ()) -> PreparedJob:
    """Read the file, check ``requires``, pick the job kind and structure everything."""
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
    data = rename_settings(data, getattr(component.config, "renamed", {}), file=file)
    return PreparedJob(doc, component, structure(data, component.config, doc))


def run(path: str | Path, overrides: list[str] = (), *, debug: bool = False) -> Any:
    """Prepare the job, write its resolved config next to the outputs, run it."""
    job = prepare(path, overrides)
    output_dir = Path(getattr(job.config.job, "output_dir", "outputs"))
    resolved = job.resolved()
    if is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        write_toml(output_dir / "config.toml", resolved)
    ctx = JobContext(file=job.doc.file, output_dir=output_dir, resolved=resolved, debug=debug)
    return job.component.factory(job.config, ctx)


def write_toml(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(tomli_w.dumps(data))
    tmp.replace(path)
