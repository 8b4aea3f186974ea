"""Every job file shipped in examples/ validates against the installed plugins. The real-size
ones point at model and data folders a user has (``./models/...``), so the check skips only
whether those exist (``diffcore config validate --no-paths``)."""

from pathlib import Path

import pytest

from diffcore.jobs.runner import prepare

ROOT = Path(__file__).resolve().parents[2]
JOBS = [p for p in sorted(ROOT.glob("examples/**/*.toml")) if p.name != "pyproject.toml"]


@pytest.mark.parametrize("job", JOBS, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_job_validates(job):
    prepared = prepare(job, check_paths=False)
    assert prepared.kind in {"train", "generate", "serve", "train-guidance"}
