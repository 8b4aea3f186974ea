"""The plugin surface cannot drift from its documentation (as datasette checks its hooks)."""

import inspect
import re
from pathlib import Path

import pytest

from diffcore import hookspecs

ROOT = Path(__file__).resolve().parents[2]
HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_")]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hookspec_is_documented_with_its_signature(hook):
    signature = f"{hook}{inspect.signature(getattr(hookspecs, hook))}"
    headings = re.findall(r"^### (.+)$", (ROOT / "docs" / "plugins.md").read_text(), re.M)
    assert signature in headings, f"docs/plugins.md needs a heading '### {signature}'"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hookspec_has_a_test(hook):
    tests = (ROOT / "tests" / "core" / "test_hooks.py").read_text()
    assert f"def test_hook_{hook}(" in tests
