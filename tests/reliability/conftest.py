"""What every bad-input case must show, through the real ``diffcore run``: exit code 1, one
paragraph that names the file and what was expected, no traceback, and the folder left as it was
(no output folder, no ``config.toml``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from diffcore.cli import cli

ROOT = Path(__file__).resolve().parents[2]
Files = dict[str, "str | bytes | Callable[[Path], None]"]


def write_files(folder: Path, files: Files) -> None:
    """Text and bytes are written as they are; a callable builds its file (or folder) itself."""
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def listing(folder: Path) -> list[str]:
    """Every path under ``folder`` with its size: what a refused run must leave unchanged."""
    out = []
    for p in sorted(folder.rglob("*")):
        size = p.lstat().st_size if p.is_file() and not p.is_symlink() else "-"
        out.append(f"{p.relative_to(folder)} {size}")
    return out


def check_refusal(output: str, exit_code: int, names: list[str], fragments: list[str]) -> None:
    assert exit_code == 1, output
    assert "Traceback" not in output, output
    text = output.strip()
    assert text.startswith("Error: "), output
    assert "\n\n" not in text, f"more than one paragraph:\n{output}"
    for name in names:
        assert name in text, f"the message does not name {name}:\n{output}"
    for fragment in fragments:
        assert fragment in text, f"expected {fragment!r} in:\n{output}"


@pytest.fixture
def refused(diffcore_plugins, tmp_path, monkeypatch):
    """``refused(files, names, fragments, *args)``: write ``files`` into a fresh folder, run
    ``diffcore run job.toml *args`` there in-process, and check the refusal."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DIFFCORE_DEBUG", raising=False)

    def run(files: Files, names: list[str], fragments: list[str], *args: str) -> str:
        write_files(tmp_path, files)
        before = listing(tmp_path)
        result = CliRunner().invoke(cli, ["run", "job.toml", *args])
        # an exception other than the CLI's own exit is a crash, whatever the exit code says
        assert isinstance(result.exception, SystemExit), (result.output, result.exc_info)
        check_refusal(result.output, result.exit_code, names, fragments)
        assert listing(tmp_path) == before, "the refused run wrote or removed files"
        return result.output

    return run


def run_subprocess(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m diffcore run job.toml`` in ``folder``, importing this checkout's code."""
    paths = [ROOT / "core", *sorted((ROOT / "plugins").glob("*"))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, paths), os.environ.get("PYTHONPATH", "")])}
    env.pop("DIFFCORE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "diffcore", "run", "job.toml", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def refused_process(tmp_path):
    """Like ``refused``, in a real process: the exit status and stderr as a shell sees them."""

    def run(files: Files, names: list[str], fragments: list[str]) -> str:
        write_files(tmp_path, files)
        before = listing(tmp_path)
        proc = run_subprocess(tmp_path)
        assert proc.stdout == "", proc.stdout
        check_refusal(proc.stderr, proc.returncode, names, fragments)
        assert listing(tmp_path) == before, "the refused run wrote or removed files"
        return proc.stderr

    return run
