"""pytest fixtures for diffcore plugin authors (auto-registered via the ``pytest11`` entry point)."""

from __future__ import annotations

import pytest

from diffcore.testing import plugins_for_test


@pytest.fixture
def diffcore_plugins():
    """A fresh plugin manager for one test; register test plugins with ``.register_module(obj, name=...)``."""
    with plugins_for_test() as pm:
        yield pm
