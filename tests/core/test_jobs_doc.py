"""docs/jobs.md names every setting of the core's jobs."""

from pathlib import Path

import attrs
import pytest

from diffcore.jobs.generate import GenerateSettings
from diffcore.jobs.train import TrainSettings

DOC = (Path(__file__).resolve().parents[2] / "docs" / "jobs.md").read_text()


@pytest.mark.parametrize("settings", [GenerateSettings, TrainSettings])
def test_every_job_setting_is_documented(settings):
    missing = [a.name for a in attrs.fields(settings) if f"`{a.name}`" not in DOC]
    assert not missing, f"docs/jobs.md does not mention {missing}"
