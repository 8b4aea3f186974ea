"""Every job file shipped in examples/ validates against the installed plugins."""

from pathlib import Path

import pytest

from diffcore.jobs.runner import prepare

ROOT = Path(__file__).resolve().parents[2]
JOBS = [p for p in sorted(ROOT.glob("examples/**/*.toml")) if p.name != "pyproject.toml"]


@pytest.mark.parametrize("job", JOBS, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_job_validates(job):
    prepared = prepare(job)
    assert prepared.kind in {"train", "generate", "serve", "train-guidance"}
