"""Job files: extends, --set, structuring, and the error for each kind of mistake."""

from __future__ import annotations

import textwrap
import tomllib
from pathlib import Path

import pytest

from diffcore.errors import ConfigError
from diffcore.jobs.runner import prepare, run
from diffcore.testing import plugins_for_test

import echo_plugin


@pytest.fixture(autouse=True)
def echo_plugins():
    with plugins_for_test(echo_plugin, entry_points=False) as pm:
        yield pm


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


GOOD = """
[job]
kind = "echo"
output_dir = "{out}"
steps = 5
"""


def test_valid_job_runs_and_writes_resolved_config(tmp_path):
    job = write(tmp_path, "job.toml", GOOD.format(out=tmp_path / "out"))
    config, built = run(job)
    assert config.job.steps == 5 and built["sampler"] == ("toy-sampler", 0.0)
    resolved = tomllib.loads((tmp_path / "out" / "config.toml").read_text())
    assert resolved["job"]["kind"] == "echo" and resolved["sampler"] == {"name": "toy", "eta": 0.0}
    # the resolved file runs again to the same config
    again, _ = run(tmp_path / "out" / "config.toml")
    assert again == config


def test_extends_merges_deeply_relative_to_file(tmp_path):
    (tmp_path / "base").mkdir()
    write(tmp_path / "base", "base.toml", """
        [job]
        kind = "echo"
        steps = 7
        tags = ["a", "b"]
        [sampler]
        name = "toy"
        eta = 0.5
        """)
    job = write(tmp_path, "job.toml", """
        extends = "base/base.toml"
        [job]
        tags = ["c"]
        mode = "slow"
        """)
    config = prepare(job).config
    assert (config.job.steps, config.job.tags, config.job.mode) == (7, ["c"], "slow")
    assert config.sampler.config.eta == 0.5


def test_extends_list_later_wins(tmp_path):
    write(tmp_path, "a.toml", '[job]\nkind = "echo"\nsteps = 1\nscale = 2.0\n')
    write(tmp_path, "b.toml", "[job]\nsteps = 2\n")
    job = write(tmp_path, "job.toml", 'extends = ["a.toml", "b.toml"]\n')
    config = prepare(job).config
    assert (config.job.steps, config.job.scale) == (2, 2.0)


def test_set_overrides_parse_toml_values(tmp_path):
    job = write(tmp_path, "job.toml", GOOD.format(out=tmp_path) + '[[guidance]]\nname = "toy-scale"\n')
    config = prepare(job, ["job.steps=30", "guidance[0].scale=4.5", 'job.tags=["x", "y"]',
                           "job.note=plain words", "sampler.eta=1e-2"]).config
    assert config.job.steps == 30 and config.guidance[0].config.scale == 4.5
    assert config.job.tags == ["x", "y"] and config.job.note == "plain words"
    assert config.sampler.config.eta == 0.01


def test_set_can_append_to_an_array(tmp_path):
    job = write(tmp_path, "job.toml", GOOD.format(out=tmp_path))
    config = prepare(job, ['guidance[0]={name = "toy-scale", scale = 2.0}']).config
    assert config.guidance[0].config.scale == 2.0


HEAD = '[job]\nkind = "echo"\n'

# (case id, files {name: text}, overrides, expected path, expected message fragments)
BAD = [
    ("toml-syntax", {"job.toml": '[job]\nkind = "echo"\nsteps = = 3\n'}, [], None,
     ["TOML syntax error", "line 3"]),
    ("wrong-type", {"job.toml": HEAD + 'steps = "ten"\n'}, [], "job.steps",
     ["expected an integer", "found a string 'ten'"]),
    ("unknown-key", {"job.toml": HEAD + "stpes = 3\n"}, [], "job.stpes",
     ["unknown key 'stpes'", 'did you mean "steps"']),
    ("unknown-component", {"job.toml": HEAD + '[sampler]\nname = "tyo"\n'}, [], "sampler.name",
     ["unknown sampler 'tyo'", 'did you mean "toy"', "heun, toy (see `diffcore list samplers`)"]),
    ("missing-extends", {"job.toml": 'extends = "nope.toml"\n' + HEAD}, [], "extends",
     ["does not exist", "nope.toml"]),
    ("extends-cycle", {"job.toml": 'extends = "b.toml"\n' + HEAD, "b.toml": 'extends = "job.toml"\n'}, [],
     "extends", ["extends cycle: job.toml -> b.toml -> job.toml"]),
    ("set-bad-index", {"job.toml": HEAD}, ["guidance[3].scale=1"], "guidance[3]",
     ["index 3 is out of range"]),
    ("set-not-key-value", {"job.toml": HEAD}, ["job.steps"], "--set", ["expected KEY=VALUE"]),
    ("set-into-scalar", {"job.toml": HEAD + "steps = 3\n"}, ["job.steps.x=1"], "job.steps.x",
     ["job.steps is not a table"]),
    ("out-of-range", {"job.toml": HEAD + "steps = 0\n"}, [], "job.steps", ["invalid value 0", "must be > 0"]),
    ("out-of-range-component", {"job.toml": HEAD + '[[guidance]]\nname = "toy-scale"\nscale = 11.0\n'}, [],
     "guidance[0].scale", ["must be <= 10"]),
    ("missing-kind", {"job.toml": "[job]\nsteps = 3\n"}, [], "job.kind", ["missing [job] kind", "echo"]),
    ("unknown-kind", {"job.toml": '[job]\nkind = "ecoh"\n'}, [], "job.kind",
     ["unknown job 'ecoh'", 'did you mean "echo"']),
    ("bad-literal", {"job.toml": HEAD + 'mode = "medium"\n'}, [], "job.mode",
     ["expected one of 'fast', 'slow'", "found 'medium'"]),
    ("guidance-not-array", {"job.toml": "guidance = 3\n" + HEAD}, [], "guidance",
     ["expected an array of tables"]),
    ("component-missing-name", {"job.toml": HEAD + "[[guidance]]\nscale = 1.0\n"}, [], "guidance[0]",
     ["missing key 'name'"]),
    ("requires-missing", {"job.toml": 'requires = ["diffcore-nonexistent>=1"]\n' + HEAD}, [], "requires[0]",
     ["needs diffcore-nonexistent>=1", "not installed"]),
    ("requires-version", {"job.toml": 'requires = ["diffcore>=99"]\n' + HEAD}, [], "requires[0]",
     ["needs diffcore>=99", "is installed"]),
    ("list-item-type", {"job.toml": HEAD + 'tags = ["a", 2]\n'}, [], "job.tags[1]",
     ["expected a string", "found an integer 2"]),
    ("bool-for-number", {"job.toml": HEAD + "scale = true\n"}, [], "job.scale", ["expected a number"]),
    ("table-expected", {"job.toml": "sampler = 3\n" + HEAD}, [], "sampler", ["expected a table"]),
    ("unknown-component-key", {"job.toml": HEAD + '[sampler]\nname = "toy"\netta = 1.0\n'}, [], "sampler.etta",
     ["unknown key 'etta'", 'did you mean "eta"']),
    ("job-file-missing", {}, [], None, ["job file not found"]),
]


@pytest.mark.parametrize("case,files,overrides,path,fragments", BAD, ids=[b[0] for b in BAD])
def test_bad_job_files_give_specific_errors(tmp_path, case, files, overrides, path, fragments):
    for name, text in files.items():
        write(tmp_path, name, text)
    with pytest.raises(ConfigError) as info:
        prepare(tmp_path / "job.toml", overrides)
    message = str(info.value)
    assert info.value.path == path, message
    for fragment in fragments:
        assert fragment in message, message
    if overrides:
        assert info.value.file == "--set", message
    elif files:
        assert info.value.file and Path(info.value.file).name in files, message


def test_error_names_the_extended_file_that_set_the_value(tmp_path):
    write(tmp_path, "base.toml", HEAD + "steps = -1\n")
    job = write(tmp_path, "job.toml", 'extends = "base.toml"\n[job]\nmode = "slow"\n')
    with pytest.raises(ConfigError) as info:
        prepare(job)
    assert info.value.path == "job.steps" and Path(info.value.file).name == "base.toml"


def test_error_from_set_names_the_override(tmp_path):
    job = write(tmp_path, "job.toml", HEAD)
    with pytest.raises(ConfigError) as info:
        prepare(job, ["job.steps=-4"])
    assert info.value.file == "--set" and info.value.path == "job.steps"
