"""Helpers for testing diffcore plugins (yours or ours).

The pytest plugin (``diffcore.testing.pytest_plugin``, registered through the ``pytest11``
entry point) gives the fixture ``diffcore_plugins``: a fresh plugin manager with the core's
built-ins and, by default, the installed entry points, made the process-wide one for the test.
Conformance checks for guidance processors and model families live in ``conformance``; golden
outputs (recorded once, then compared bit for bit) in ``goldens``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from diffcore.plugins import Plugins, get_plugins, reset_plugins


@contextmanager
def plugins_for_test(*extra: Any, entry_points: bool = True) -> Iterator[Plugins]:
    """A fresh plugin manager (built-ins, entry points, ``extra`` plugin objects), installed as the
    process-wide one inside the block and restored after it."""
    import diffcore.plugins as plugins_module

    previous = plugins_module._plugins
    pm = Plugins().load(entry_points=entry_points)
    for i, obj in enumerate(extra):
        if pm.pm.is_registered(obj):     # already installed as an entry point: keep that one
            continue
        pm.register_module(obj, name=getattr(obj, "__name__", f"test-plugin-{i}"), distribution="test")
    reset_plugins(pm)
    try:
        yield pm
    finally:
        reset_plugins(previous)


def run_job_file(path: Any, overrides: list[str] = ()) -> Any:
    """Run a job file as ``diffcore run`` does; returns what the job returns (images, a summary, ...)."""
    from diffcore.jobs.runner import run

    return run(path, list(overrides))


def run_cli(args: list[str]) -> Any:
    """``diffcore ARGS`` with the installed plugins' commands, in-process: a ``click.testing.Result``
    (``exit_code``, ``output``)."""
    from click.testing import CliRunner

    from diffcore.cli import cli

    get_plugins().add_commands(cli)
    return CliRunner().invoke(cli, list(args))


def assert_same_weights_output(got: Any, expected: Any, *, ulps: float = 8.0) -> None:
    """The same weights loaded from two files computed the same output, to the last bits.

    Not bit for bit: weights are used where the file maps them, so their addresses differ from
    layout to layout, and MKL's matrix-vector kernel (one-row matmuls: the timestep and pooled-text
    embeddings) rounds by the weight's 16-byte alignment on some CPUs (an AMD EPYC here: 1 ulp per
    matmul; a whole job multiplies it: pass more ``ulps``). A converter error (a swapped scale /
    shift, a transposed matrix) is orders larger."""
    import torch

    scale = expected.abs().max().item()
    error = (got - expected).abs().max().item()
    assert got.shape == expected.shape and error <= ulps * torch.finfo(expected.dtype).eps * max(scale, 1.0), \
        f"outputs differ by {error:.3g} (outputs up to {scale:.3g})"


__all__ = ["Plugins", "assert_same_weights_output", "get_plugins", "plugins_for_test", "reset_plugins", "run_cli",
           "run_job_file"]
