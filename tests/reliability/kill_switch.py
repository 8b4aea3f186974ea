"""Runs ``diffcore run`` jobs in processes that SIGKILL themselves at chosen points (test only).

Started once by test_kill_resume as ``python kill_switch.py``: it imports torch, diffcore and the
plugins, then reads one JSON request a line from stdin, ``{"args": [...], "point": ..., "log": ...}``,
forks a child that runs ``diffcore <args>`` with its output in ``log``, and answers with the
child's exit status (``-9`` for SIGKILL). Forking from this one warm process costs milliseconds
where a fresh interpreter costs seconds of imports; each child is still a process of its own,
killed for real.

The points are code positions, not times, so every kill lands at the same place on every machine:

    step:N        during step N, after the optimizer updated the weights, before the EMA update
    file:N:NAME   while checkpoint N is written, right after NAME is on disk in ``step-N.tmp/``
    publish:N     checkpoint N renamed into place, the older ones not yet pruned
    prune:N       pruning after checkpoint N: an old folder renamed to ``*.old.tmp``, not yet deleted
    grid          sampling the final grid: the first module call outside the training loop
    grid-file     the final grid's PNG in its temporary file, not yet renamed into place
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import traceback
import types
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  (imported by the first optimizer; warm it here once)
from sklearn.datasets import load_digits  # noqa: F401

from diffcore.cli import cli
from diffcore.plugins import get_plugins
from diffcore.training import checkpoint, loop
from diffcore.training.ema import EMA


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def outside_the_loop() -> bool:
    """True unless ``diffcore.training.loop.train`` is on the call stack."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is loop.train.__code__:
            return False
        frame = frame.f_back
    return True


def arm(point: str) -> None:
    """Install the one kill ``point`` names (see the module docstring) in this process."""
    kind, _, rest = point.partition(":")
    if kind == "step":
        n, update = int(rest), EMA.update

        def update_or_die(self: EMA, module: torch.nn.Module) -> None:
            if self.num_updates + 1 == n:
                die()
            update(self, module)

        EMA.update = update_or_die
    elif kind == "file":
        n, name = rest.split(":")
        fsync = checkpoint._fsync

        def fsync_then_die(path: Path) -> None:
            fsync(path)
            if path.name == name and path.parent.name == f"step-{int(n):06d}.tmp":
                die()

        checkpoint._fsync = fsync_then_die
    elif kind == "publish":
        n, prune = int(rest), checkpoint.prune

        def die_or_prune(root: Path, keep_last: int) -> None:
            saving = sys._getframe(1).f_code is checkpoint.save.__code__
            if saving and checkpoint.list_checkpoints(root)[-1] == checkpoint.step_dir(root, n):
                die()
            prune(root, keep_last)

        checkpoint.prune = die_or_prune
    elif kind == "prune":
        n = int(rest)

        def rmtree_or_die(path: Path, *args, **kwargs) -> None:
            if path.name.endswith(".old.tmp") and checkpoint.step_dir(path.parent, n).is_dir():
                die()
            shutil.rmtree(path, *args, **kwargs)

        checkpoint.shutil = types.SimpleNamespace(rmtree=rmtree_or_die)  # only the checkpoint module's view
    elif kind == "grid":
        def die_outside_the_loop(module: torch.nn.Module, args: tuple) -> None:
            if outside_the_loop():
                die()

        torch.nn.modules.module.register_module_forward_pre_hook(die_outside_the_loop)
    elif kind == "grid-file":
        replace = os.replace

        def replace_or_die(src, dst, *args, **kwargs) -> None:
            if str(dst).endswith(".png") and outside_the_loop():
                die()
            replace(src, dst, *args, **kwargs)

        os.replace = replace_or_die
    else:
        raise ValueError(f"unknown kill point {point!r}")


def child(request: dict) -> int:
    """In the forked child: output to the log, arm the kill, run the command line."""
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    signal.alarm(120)  # a hung run ends with SIGALRM, which the test reports as not a kill
    try:
        if request["point"]:
            arm(request["point"])
        cli.main(args=request["args"], prog_name="diffcore")
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def serve() -> None:
    torch.set_num_threads(1)
    plugins = get_plugins()
    for kind in plugins.registries:  # load every plugin's registrations once, before forking
        plugins.registry(kind)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            os._exit(child(request))
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
