"""The ``diffcore`` command line. User errors print one paragraph and exit 1; ``--debug`` shows
the traceback. Plugins add commands through the ``register_commands`` hook."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import attrs
import click

from diffcore import __version__
from diffcore.errors import DiffcoreError


class DiffcoreGroup(click.Group):
    """Turns DiffcoreError into a short message (no traceback unless --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DiffcoreError as exc:
            if ctx.params.get("debug") or os.environ.get("DIFFCORE_DEBUG"):
                raise
            click.secho(f"Error: {exc}", err=True, fg="red")
            ctx.exit(1)


@click.group(cls=DiffcoreGroup)
@click.version_option(__version__, prog_name="diffcore")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def cli(debug: bool) -> None:
    """diffcore: diffusion and flow-matching models as plugins, jobs as TOML files."""


@cli.command()
@click.argument("job_file", type=click.Path())  # a folder: the loader says so (exit 1)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set sampler.steps=30 (value parsed as TOML).")
@click.option("--processes", type=int, default=1, show_default=True,
              help="Start N processes with torchrun (data split across ranks).")
@click.pass_context
def run(ctx: click.Context, job_file: str, overrides: tuple[str, ...], processes: int) -> None:
    """Run the job described by JOB_FILE."""
    from diffcore.jobs.runner import prepare
    from diffcore.jobs.runner import run as run_job

    debug = bool(ctx.parent and ctx.parent.params.get("debug"))
    if processes > 1:
        prepare(job_file, list(overrides))  # fail fast, in this process, on a bad file
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "diffcore", "run", job_file, *[a for o in overrides for a in ("--set", o)]]
        ctx.exit(subprocess.call(cmd))
    try:
        run_job(job_file, list(overrides), debug=debug)
    finally:
        end_process_group()


def end_process_group() -> None:
    """Close the process group a job under torchrun opened. Left open, the collective library's
    threads outlive the interpreter and a rank can abort at exit ("terminate called without an
    active exception") after all its work is done, failing the whole launch."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """Installed plugins, their versions, what each registers, and load errors."""
    from diffcore.plugins import get_plugins

    pm = get_plugins()
    for kind in pm.registries:
        pm.registry(kind)
    rows = [attrs.asdict(p, filter=lambda a, _: a.name != "traceback") for p in pm.info.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        status = click.style("BROKEN", fg="red") if row["error"] else ""
        click.echo(f"{row['name']} ({row['distribution']} {row['version']}) {status}".rstrip())
        if row["error"]:
            click.echo(textwrap.indent(f"failed to load: {row['error']}", "    "))
        for kind, names in row["registered"].items():
            click.echo(f"    {kind}: {', '.join(names)}")


@cli.command("list")
@click.argument("kind", required=False)
def list_components(kind: str | None) -> None:
    """Registered components of KIND (or all kinds) with their config fields and defaults."""
    from diffcore.errors import ConfigError, did_you_mean
    from diffcore.plugins import get_plugins
    from diffcore.registry import KINDS

    if kind is not None and kind not in KINDS:
        raise ConfigError(f"unknown kind {kind!r}{did_you_mean(kind, KINDS)}; kinds: {', '.join(KINDS)}")
    pm = get_plugins()
    for k in [kind] if kind else KINDS:
        click.secho(f"{k}:", bold=True)
        for comp in pm.registry(k):
            click.echo(f"  {comp.name}  [{comp.plugin}]  {comp.description}")
            for line in describe_fields(comp.config):
                click.echo(f"      {line}")


def describe_fields(cls: type) -> list[str]:
    """``name: type = default`` for each field of an attrs config class."""
    out = []
    for a in attrs.fields(attrs.resolve_types(cls)):
        if "component" in a.metadata:
            continue
        default = a.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = "(table)"
        shown = "(required)" if default is attrs.NOTHING else f"= {default!r}"
        tp = a.type.__name__ if isinstance(a.type, type) else str(a.type)
        out.append(f"{a.name}: {str(tp).replace('typing.', '')} {shown}")
    return out


@cli.group()
def config() -> None:
    """Inspect job files."""


@config.command("show")
@click.argument("job_file", type=click.Path())
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def config_show(job_file: str, overrides: tuple[str, ...]) -> None:
    """Print the fully resolved config (extends merged, overrides applied, defaults filled)."""
    import tomli_w

    from diffcore.jobs.runner import prepare

    click.echo(tomli_w.dumps(prepare(job_file, list(overrides)).resolved()), nl=False)


@config.command("validate")
@click.argument("job_files", nargs=-1, required=True, type=click.Path())
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@click.option("--no-paths", is_flag=True, help="Do not require the local model and data paths to exist "
              "(a job written here to run on another machine).")
def config_validate(job_files: tuple[str, ...], overrides: tuple[str, ...], no_paths: bool) -> None:
    """Check job files without running them."""
    from diffcore.jobs.runner import prepare

    for f in job_files:
        job = prepare(f, list(overrides), check_paths=not no_paths)
        click.echo(f"{f}: ok ({job.kind} job)")


@cli.group()
def lora() -> None:
    """Inspect LoRA files."""


@lora.command("inspect")
@click.argument("file", type=click.Path())
@click.option("--model", "model_job", type=click.Path(), default=None,
              help="A job file whose [model] to match the keys against (prints unmatched keys).")
def lora_inspect(file: str, model_job: str | None) -> None:
    """Format, ranks, alpha and targets of a LoRA FILE (.safetensors)."""
    from diffcore.lora.inspect import describe_lora

    bundle = None
    if model_job is not None:
        from diffcore.jobs.runner import prepare

        job = prepare(model_job, [])
        bundle = job.config.model.build(device="cpu")
    for line in describe_lora(file, bundle):
        click.echo(line)


@functools.cache
def _load_plugin_commands() -> None:
    from diffcore.plugins import get_plugins

    get_plugins().add_commands(cli)


def main() -> None:
    try:
        _load_plugin_commands()
    except DiffcoreError as exc:
        click.secho(f"Error: {exc}", err=True, fg="red")
        sys.exit(1)
    cli(prog_name="diffcore")
