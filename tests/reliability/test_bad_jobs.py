"""The bad job-file corpus: every row is a mistake a user makes, run through ``diffcore run``.

A row is (case id, the files it writes, the files the message must name, fragments the message
must contain: the key path as ``at <path>`` and what was expected). ``refused`` (conftest.py)
checks exit code 1, one paragraph, no traceback, nothing written. The classes and what the user
sees are documented in docs/reliability.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from diffcore.config.loader import MAX_JOB_FILE


def generate(job: str = "", model: str = "", extra: str = "") -> str:
    """A generate job on the digits DiT (fresh weights) with ``job`` / ``model`` lines added."""
    return (f'[job]\nkind = "generate"\noutput_dir = "out"\n{job}\n'
            f'[model]\nfamily = "dit"\nvariant = "digits"\n{model}\n{extra}')


def train(job: str = "", extra: str = "") -> str:
    return (f'[job]\nkind = "train"\noutput_dir = "out"\n{job}\n'
            f'[model]\nfamily = "dit"\nvariant = "digits"\n[dataset]\nname = "digits"\n{extra}')


def serve(job: str = "") -> str:
    return f'[job]\nkind = "serve"\noutput_dir = "out"\n{job}\n[model]\nfamily = "dit"\n'


def big(size: int):
    """A job file of ``size`` bytes: a valid job padded with one long comment."""
    def build(path: Path) -> None:
        head = generate().encode()
        path.write_bytes(head + b"# " + b"x" * (size - len(head) - 3) + b"\n")
    return build


def symlink_loop(path: Path) -> None:
    """A file no one can read, root included: a symlink that points at itself."""
    os.symlink(path.name, path)


def folder(path: Path) -> None:
    path.mkdir()


def unreadable(path: Path) -> None:
    path.write_text(generate())
    path.chmod(0)


JOB = ["job.toml"]
BASE = ["base.toml"]

# (case id, files, names in the message, fragments of the message)
CASES = [
    # -- the file itself: size, encoding, syntax ----------------------------------------------------
    ("file-50mb", {"job.toml": big(50 * 2**20)}, JOB, ["52,428,800 bytes", "limited to 1,048,576 bytes"]),
    ("file-just-over-limit", {"job.toml": big(MAX_JOB_FILE + 1)}, JOB, ["1,048,577 bytes", "1 MiB"]),
    ("file-is-a-folder", {"job.toml": folder}, JOB, ["is a folder; expected a TOML file"]),
    ("file-missing", {}, JOB, ["job file not found"]),
    ("file-symlink-loop", {"job.toml": symlink_loop}, JOB, ["cannot be read", "symbolic links"]),
    ("non-utf8-bytes", {"job.toml": generate().encode() + b"# caf\xe9\n"}, JOB,
     ["not UTF-8 text: byte 0xe9 at line 9, column 6"]),
    ("utf16-file", {"job.toml": generate().encode("utf-16")}, JOB, ["not UTF-8 text: byte 0xff at line 1, column 1"]),
    ("nul-bytes", {"job.toml": b"\x00" * 64}, JOB, ["TOML syntax error at line 1, column 1", "is this a binary file?"]),
    ("toml-syntax", {"job.toml": generate(job="num_steps = = 3")}, JOB,
     ["TOML syntax error at line 4", "'num_steps = = 3'"]),
    ("unclosed-string", {"job.toml": generate(job='prompt = "a cat')}, JOB, ["TOML syntax error at line 4"]),
    ("duplicate-key", {"job.toml": generate(job="num_steps = 3\nnum_steps = 4")}, JOB,
     ["line 5", "a key set a second time", "'num_steps = 4'"]),
    ("duplicate-table", {"job.toml": generate(extra='[model]\nfamily = "dit"')}, JOB,
     ["line 9", "table [model] declared a second time"]),
    ("empty-file", {"job.toml": ""}, JOB, ["at job.kind", 'missing [job] kind = "..."', "registered job kinds: ", "generate, "]),
    # -- extends ------------------------------------------------------------------------------------
    ("extends-folder", {"job.toml": 'extends = "conf"\n' + generate(), "conf": folder}, JOB,
     ["at extends", "conf, which is a folder"]),
    ("extends-unreadable-loop", {"job.toml": 'extends = "base.toml"\n' + generate(), "base.toml": symlink_loop},
     JOB, ["at extends", "base.toml, which cannot be read"]),
    ("extends-missing", {"job.toml": 'extends = "nope.toml"\n' + generate()}, JOB,
     ["at extends", "extends a file that does not exist", "nope.toml"]),
    ("extends-not-a-string", {"job.toml": "extends = 3\n" + generate()}, JOB,
     ["at extends", "expected a file name or a list of file names, found 3"]),
    ("extends-cycle", {"job.toml": 'extends = "base.toml"\n' + generate(), "base.toml": 'extends = "job.toml"\n'},
     BASE, ["at extends", "extends cycle: job.toml -> base.toml -> job.toml"]),
    ("extends-non-utf8", {"job.toml": 'extends = "base.toml"\n' + generate(), "base.toml": b"seed = 1 # \xff\n"},
     BASE, ["not UTF-8 text: byte 0xff at line 1, column 12"]),
    ("extends-syntax", {"job.toml": 'extends = "base.toml"\n' + generate(), "base.toml": "[job\n"}, BASE,
     ["TOML syntax error at line 1"]),
    ("extends-too-big", {"job.toml": 'extends = "base.toml"\n[job]\nseed = 1\n', "base.toml": big(2 * MAX_JOB_FILE)},
     JOB, ["at extends", "base.toml, which is 2,097,152 bytes"]),
    ("extends-bad-value", {"job.toml": 'extends = "base.toml"\n[job]\nseed = 2\n',
                           "base.toml": generate(job="num_steps = 0")}, BASE, ["at job.num_steps", "must be > 0"]),
    # -- types --------------------------------------------------------------------------------------
    ("string-for-int", {"job.toml": generate(job='num_steps = "ten"')}, JOB,
     ["at job.num_steps", "expected an integer, found a string 'ten'"]),
    ("float-for-int", {"job.toml": generate(job="num_steps = 3.7")}, JOB,
     ["at job.num_steps", "expected an integer, found a number 3.7"]),
    ("bool-for-int", {"job.toml": generate(job="num_samples = true")}, JOB,
     ["at job.num_samples", "expected an integer, found a boolean True"]),
    ("string-for-float", {"job.toml": generate(job='cfg_scale = "high"')}, JOB,
     ["at job.cfg_scale", "expected a number, found a string 'high'"]),
    ("int-for-prompt", {"job.toml": generate(job="prompt = 3")}, JOB,
     ["at job.prompt", "expected a string or an array of strings, found an integer 3"]),
    ("seeds-not-array", {"job.toml": generate(job="seeds = 5")}, JOB, ["at job.seeds", "expected an array"]),
    ("seeds-item-type", {"job.toml": generate(job='seeds = [1, "two"]')}, JOB,
     ["at job.seeds[1]", "expected an integer, found a string 'two'"]),
    ("string-for-bool", {"job.toml": generate(job='class_grid = "yes"')}, JOB,
     ["at job.class_grid", "expected true or false"]),
    ("int-for-string", {"job.toml": generate(job="device = 0")}, JOB, ["at job.device", "expected a string"]),
    ("model-not-a-table", {"job.toml": '[job]\nkind = "generate"\noutput_dir = "out"\nmodel = "dit"\n'}, JOB,
     ["at job.model", "unknown key 'model'"]),
    ("model-string", {"job.toml": 'model = "dit"\n[job]\nkind = "generate"\noutput_dir = "out"\n'}, JOB,
     ["at model", "expected a table, found a string 'dit'"]),
    ("sampler-int", {"job.toml": "sampler = 3\n" + generate()}, JOB, ["at sampler", "expected a table"]),
    ("guidance-table", {"job.toml": generate(extra='[guidance]\nname = "cfg"')}, JOB,
     ["at guidance", "expected an array of tables ([[guidance]])"]),
    ("model-field-type", {"job.toml": generate(model="depth = 2.5")}, JOB,
     ["at model.depth", "expected an integer, found a number 2.5"]),
    # -- ranges -------------------------------------------------------------------------------------
    ("steps-0", {"job.toml": generate(job="num_steps = 0")}, JOB, ["at job.num_steps", "invalid value 0", "> 0"]),
    ("batch-0", {"job.toml": generate(job="batch_size = 0")}, JOB, ["at job.batch_size", "> 0"]),
    ("samples-0", {"job.toml": generate(job="num_samples = 0")}, JOB, ["at job.num_samples", "> 0"]),
    ("samples-per-class-0", {"job.toml": generate(job="samples_per_class = 0")}, JOB,
     ["at job.samples_per_class", "> 0"]),
    ("width-7", {"job.toml": generate(job="width = 7")}, JOB,
     ["at job.width", "this DiT (digits) makes 8x8 images, so width must be 8", "not 7"]),
    ("height-100000", {"job.toml": generate(job="height = 100000")}, JOB,
     ["at job.height", "invalid value 100000", "<= 8192"]),
    ("width-negative", {"job.toml": generate(job="width = -16")}, JOB, ["at job.width", "> 0"]),
    ("cfg-nan", {"job.toml": generate(job="cfg_scale = nan")}, JOB,
     ["at job.cfg_scale", "expected a finite number, found nan"]),
    ("cfg-inf", {"job.toml": generate(job="cfg_scale = inf")}, JOB, ["at job.cfg_scale", "finite number, found inf"]),
    ("cfg-negative", {"job.toml": generate(job="cfg_scale = -1.0")}, JOB, ["at job.cfg_scale", ">= 0"]),
    ("strength-0", {"job.toml": generate(job="strength = 0.0")}, JOB, ["at job.strength", "> 0"]),
    ("strength-1.5", {"job.toml": generate(job="strength = 1.5")}, JOB, ["at job.strength", "<= 1"]),
    ("strength-nan", {"job.toml": generate(job="strength = -nan")}, JOB, ["at job.strength", "finite number"]),
    ("seed-negative", {"job.toml": generate(job="seed = -1")}, JOB, ["at job.seed", ">= 0"]),
    ("seeds-negative", {"job.toml": generate(job="seeds = [3, -7]")}, JOB, ["at job.seeds", ">= 0", "-7"]),
    ("class-label-negative", {"job.toml": generate(job="class_label = -2")}, JOB, ["at job.class_label", ">= 0"]),
    ("class-label-too-big", {"job.toml": generate(job="class_label = 10")}, JOB,
     ["at job.class_label", "this model has 10 classes (0..9)"]),
    ("model-depth-0", {"job.toml": generate(model="depth = 0")}, JOB, ["at model.depth", "positive integer"]),
    ("guidance-scale-nan", {"job.toml": generate(extra='[[guidance]]\nname = "cfg"\nscale = nan')}, JOB,
     ["at guidance[0].scale", "finite number"]),
    ("sampler-eta-inf", {"job.toml": generate(extra='[sampler]\nname = "euler_ancestral"\neta = inf')}, JOB,
     ["at sampler.eta", "finite number, found inf"]),
    ("schedule-rho-nan", {"job.toml": generate(extra='[schedule]\nname = "karras"\nrho = nan')}, JOB,
     ["at schedule.rho", "finite number"]),
    # -- names: unknown keys (nested too), unknown choices, missing parts ---------------------------
    ("unknown-top-level", {"job.toml": generate(extra='[sampeler]\nname = "euler"')}, JOB,
     ["at sampeler", "unknown key 'sampeler'", 'did you mean "sampler"']),
    ("unknown-job-key", {"job.toml": generate(job="sampling_step = 3")}, JOB,
     ["at job.sampling_step", 'did you mean "sampling_steps"']),
    ("unknown-model-key", {"job.toml": generate(model="dpeth = 4")}, JOB,
     ["at model.dpeth", 'did you mean "depth"', "DiTConfig accepts"]),
    ("unknown-nested-table", {"job.toml": generate(job="[job.extra]\nsize = 3")}, JOB,
     ["at job.extra", "unknown key 'extra'"]),
    ("unknown-final-grid-key", {"job.toml": train(job="[job.final_grid]\ncfg = 3.0")}, JOB,
     ["at job.final_grid.cfg", "unknown key 'cfg'", "FinalGrid accepts: samples_per_class, cfg_scale, sampling_steps"]),
    ("unknown-model-table", {"job.toml": generate(model="[model.extra]\nlayers = 2")}, JOB,
     ["at model.extra", "unknown key 'extra'", "DiTConfig accepts"]),
    ("table-in-a-list", {"job.toml": generate(extra='[[guidance]]\nname = "nag"\nlayers = [{ at = 1 }]')}, JOB,
     ["at guidance[0].layers[0]", "expected a string, found a table"]),
    ("unknown-sampler-key", {"job.toml": generate(extra='[sampler]\nname = "ddim"\netta = 0.5')}, JOB,
     ["at sampler.etta", 'did you mean "eta"']),
    ("unknown-guidance-key", {"job.toml": generate(extra='[[guidance]]\nname = "cfg"\nscael = 2.0')}, JOB,
     ["at guidance[0].scael", 'did you mean "scale"']),
    ("unknown-variant", {"job.toml": generate().replace('"digits"', '"hueg"')}, JOB,
     ["at model.variant", "unknown DiT variant 'hueg'"]),
    ("unknown-dtype", {"job.toml": generate(model='dtype = "float8"')}, JOB,
     ["at model.dtype", "dtype must be one of float32, bfloat16"]),
    ("unknown-family", {"job.toml": generate().replace('"dit"', '"ditt"')}, JOB,
     ["at model.family", "unknown model 'ditt'", 'did you mean "dit"']),
    ("unknown-sampler", {"job.toml": generate(extra='[sampler]\nname = "eulr"')}, JOB,
     ["at sampler.name", 'did you mean "euler"']),
    ("unknown-kind", {"job.toml": generate().replace('"generate"', '"generat"')}, JOB,
     ["at job.kind", "unknown job 'generat'", 'did you mean "generate"']),
    ("missing-model", {"job.toml": '[job]\nkind = "generate"\noutput_dir = "out"\n'}, JOB,
     ["at model", "missing required table [model]"]),
    ("missing-family", {"job.toml": '[job]\nkind = "generate"\noutput_dir = "out"\n[model]\nvariant = "digits"\n'},
     JOB, ["at model", "missing key 'family'"]),
    ("requires-missing", {"job.toml": 'requires = ["diffcore-nope>=1"]\n' + generate()}, JOB,
     ["at requires[0]", "diffcore-nope>=1", "not installed"]),
    ("init-image-not-an-image", {"job.toml": generate(job='init_image = "notes.txt"'), "notes.txt": "hello\n"},
     ["job.toml", "notes.txt"], ["cannot read image", "cannot identify image file"]),
    ("prompt-file-is-a-folder", {"job.toml": generate(job='prompt_file = "prompts"'), "prompts": folder}, JOB,
     ["at job.prompt_file", "cannot read prompt_file"]),
    # -- the train and serve jobs -------------------------------------------------------------------
    ("train-steps-0", {"job.toml": train(job="steps = 0")}, JOB, ["at job.steps", "> 0"]),
    ("train-batch-0", {"job.toml": train(job="batch_size = 0")}, JOB, ["at job.batch_size", "> 0"]),
    ("train-lr-nan", {"job.toml": train(job="lr = nan")}, JOB, ["at job.lr", "finite number, found nan"]),
    ("train-lr-negative", {"job.toml": train(job="lr = -1e-4")}, JOB, ["at job.lr", "> 0"]),
    ("train-ema-1", {"job.toml": train(job="ema_decay = 1.0")}, JOB, ["at job.ema_decay", "< 1"]),
    ("train-schedule-typo", {"job.toml": train(job='lr_schedule = "cosin"')}, JOB,
     ["at job.lr_schedule", "expected one of 'constant', 'cosine'", 'did you mean "cosine"']),
    ("train-grid-steps-0", {"job.toml": train(job="final_grid = { steps = 0 }")}, JOB,
     ["at job.final_grid.steps", "> 0"]),
    ("train-seed-negative", {"job.toml": train(job="seed = -3")}, JOB, ["at job.seed", ">= 0"]),
    ("train-unknown-dataset", {"job.toml": train().replace('name = "digits"', 'name = "mnist"')}, JOB,
     ["at dataset.name", "unknown dataset 'mnist'"]),
    ("serve-port-range", {"job.toml": serve("port = 70000")}, JOB, ["at job.port", "<= 65535"]),
    ("serve-max-batch-0", {"job.toml": serve("max_batch = 0")}, JOB, ["at job.max_batch", "> 0"]),
]


@pytest.mark.parametrize("case,files,names,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_job_file_is_refused(refused, case, files, names, fragments):
    refused(files, names, fragments)


def test_the_corpus_is_large_and_unique():
    assert len(CASES) >= 50 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode (the symlink-loop cases cover it)")
def test_extends_a_file_without_read_permission(refused):
    refused({"job.toml": 'extends = "base.toml"\n' + generate(), "base.toml": unreadable}, JOB,
            ["at extends", "base.toml, which cannot be read: Permission denied"])


# (case id, job file, --set overrides, fragments): a mistake on the command line names --set
OVERRIDES = [
    ("set-steps-0", generate(), ["job.num_steps=0"], ["--set, at job.num_steps", "> 0"]),
    ("set-nan", generate(), ["job.cfg_scale=nan"], ["--set, at job.cfg_scale", "finite number"]),
    ("set-unknown-key", generate(), ["model.dpeth=2"], ["--set, at model.dpeth", 'did you mean "depth"']),
    ("set-width", generate(), ["job.width=7"], ["--set, at job.width", "must be 8"]),
]


@pytest.mark.parametrize("case,text,overrides,fragments", OVERRIDES, ids=[c[0] for c in OVERRIDES])
def test_bad_override_is_refused(refused, case, text, overrides, fragments):
    refused({"job.toml": text}, [], fragments, *[a for o in overrides for a in ("--set", o)])


SUBPROCESS = ["file-50mb", "non-utf8-bytes", "duplicate-key", "height-100000", "cfg-nan"]


@pytest.mark.parametrize("case", SUBPROCESS)
def test_in_a_real_process_exit_1_and_no_traceback(refused_process, case):
    _, files, names, fragments = next(c for c in CASES if c[0] == case)
    refused_process(files, names, fragments)
