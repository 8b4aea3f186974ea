"""A run stopped by bad input leaves the output folder as it found it; one that wrote results
keeps them. A job here writes ``result.txt`` or not, then raises a ``ConfigError`` without a file."""

from __future__ import annotations

import sys
from pathlib import Path

import attrs
import pytest

from diffcore.api import ConfigError, JobSettings, hookimpl
from diffcore.jobs.runner import run
from diffcore.testing import plugins_for_test


@attrs.define
class FailSettings(JobSettings):
    write_first: bool = False


@attrs.define
class FailJob:
    job: FailSettings = attrs.Factory(FailSettings)


def run_fail(config: FailJob, ctx) -> None:
    if config.job.write_first:
        (ctx.output_dir / "result.txt").write_text("half a run")
    raise ConfigError("the input turned out to be bad", path="job.write_first")


@hookimpl
def register_jobs(register):
    register("fail", run_fail, config=FailJob, description="fails (tests)")


@pytest.fixture(autouse=True)
def fail_plugin():
    with plugins_for_test(sys.modules[__name__], entry_points=False):
        yield


def job(tmp_path: Path, output: Path, write_first: bool = False) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(f'[job]\nkind = "fail"\noutput_dir = "{output}"\nwrite_first = {str(write_first).lower()}\n')
    return path


def test_fresh_folders_are_removed_and_the_error_names_the_job_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        run(job(tmp_path, tmp_path / "runs" / "a" / "b"))
    assert not (tmp_path / "runs").exists()
    assert info.value.file == str(tmp_path / "job.toml") and info.value.path == "job.write_first"


def test_an_existing_folder_gets_its_config_back(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.toml").write_text("# the previous run's\n")
    (out / "grid.png").write_bytes(b"png")
    with pytest.raises(ConfigError):
        run(job(tmp_path, out))
    assert sorted(p.name for p in out.iterdir()) == ["config.toml", "grid.png"]
    assert (out / "config.toml").read_text() == "# the previous run's\n"


def test_a_run_that_wrote_results_keeps_them(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError):
        run(job(tmp_path, out, write_first=True))
    assert (out / "result.txt").read_text() == "half a run"
    assert 'kind = "fail"' in (out / "config.toml").read_text()
