"""Plugins in this repository keep the promise made to third parties: their code imports the core
only through ``diffcore.api`` (the surface that stays stable between releases), and their tests
through ``diffcore.api`` and ``diffcore.testing`` (fixtures, conformance checks, goldens)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(ROOT.glob("plugins/*/diffcore_*/**/*.py")) + sorted(ROOT.glob("examples/*/**/*.py"))
TESTS = sorted(ROOT.glob("plugins/*/tests/**/*.py"))


def core_imports(text: str, allowed: str) -> list[str]:
    """``from diffcore.x import ...``, ``import diffcore.x`` and ``from diffcore import x`` for
    every ``x`` not matching ``allowed``."""
    dotted = re.compile(rf"^\s*(from|import) diffcore\.(?!(?:{allowed})\b)[\w.]+", re.M)
    bare = re.compile(rf"^\s*from diffcore import (?!(?:{allowed})\b)\w+", re.M)
    return [m.group(0).strip() for pattern in (dotted, bare) for m in pattern.finditer(text)]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugin_imports_only_the_api(source):
    found = core_imports(source.read_text(), "api")
    assert not found, f"{source.relative_to(ROOT)} imports core internals: {found}; use diffcore.api"


@pytest.mark.parametrize("test", TESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugin_tests_import_only_the_api_and_testing(test):
    found = core_imports(test.read_text(), "api|testing")
    assert not found, (f"{test.relative_to(ROOT)} imports core internals: {found}; use diffcore.api or "
                       f"diffcore.testing")


def test_the_scan_sees_every_form():
    text = ("from diffcore.models import X\nimport diffcore.nn.linear as l\nfrom diffcore import plugins\n"
            "    from diffcore.api import Y\nfrom diffcore.testing.goldens import z\n")
    assert core_imports(text, "api|testing") == ["from diffcore.models", "import diffcore.nn.linear",
                                                 "from diffcore import plugins"]
    assert TESTS and SOURCES
