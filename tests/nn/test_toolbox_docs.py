"""Every toolbox name diffcore.api exports is in docs/plugins.md's toolbox reference, and no
toolbox module outgrows the project's 400-line limit."""

from pathlib import Path

import diffcore.api as api

ROOT = Path(__file__).resolve().parents[2]
TOOLBOX = ("diffcore.nn.", "diffcore.config.validators")
OLDER = {"diffcore.nn.attention", "diffcore.nn.linear"}  # documented in their own sections


def test_every_toolbox_export_is_documented():
    doc = (ROOT / "docs" / "plugins.md").read_text()
    section = doc[doc.index("## The toolbox"):]
    names = [n for n, module in api._NAMES.items() if module.startswith(TOOLBOX) and module not in OLDER]
    assert len(names) > 30
    missing = [n for n in names if f"`{n}" not in section and f", {n}" not in section]
    assert not missing, f"docs/plugins.md's toolbox section does not mention {missing}"


def test_toolbox_modules_stay_small():
    for path in sorted((ROOT / "core" / "diffcore" / "nn").glob("*.py")):
        lines = len(path.read_text().splitlines())
        assert lines <= 400, f"{path.name} has {lines} lines"
