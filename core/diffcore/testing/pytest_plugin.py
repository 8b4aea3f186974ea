"""pytest fixtures for diffcore plugin authors (auto-registered via the ``pytest11`` entry point)."""

from __future__ import annotations

import pytest

from diffcore.testing import plugins_for_test


def pytest_configure(config):
    config.addinivalue_line("markers", "packaging: builds wheels and installs them into a fresh virtual "
                                       "environment (diffcore.testing.wheels; tens of seconds)")


@pytest.fixture
def diffcore_plugins():
    """A fresh plugin manager for one test; register test plugins with ``.register_module(obj, name=...)``."""
    with plugins_for_test() as pm:
        yield pm


@pytest.fixture
def reference_matmuls():
    """Run the test's linear layers on ``F.linear`` (the GEMM the reference uses), for bit-level parity."""
    from diffcore.nn.linear import reference_matmuls

    with reference_matmuls():
        yield


@pytest.fixture
def onednn_matmuls(monkeypatch):
    """Run the test's linears and convolutions on oneDNN whatever the CPU's vendor (on by default
    only on AMD), to check the fast path's accuracy; skips where PyTorch has no oneDNN."""
    import diffcore.nn.linear as switch

    if not switch.ONEDNN_USABLE:
        pytest.skip("this PyTorch build has no oneDNN")
    monkeypatch.setattr(switch, "ONEDNN", True)
