"""Plugins in this repository keep the promise made to third parties: they import the core only
through ``diffcore.api`` (the surface that stays stable between releases)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(ROOT.glob("plugins/*/diffcore_*/**/*.py")) + sorted(ROOT.glob("examples/*/**/*.py"))
CORE_IMPORT = re.compile(r"^\s*(from|import) diffcore\.(?!api\b)[\w.]+", re.M)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugin_imports_only_the_api(source):
    found = [m.group(0).strip() for m in CORE_IMPORT.finditer(source.read_text())]
    assert not found, f"{source.relative_to(ROOT)} imports core internals: {found}; use diffcore.api"
