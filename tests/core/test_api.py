"""diffcore.api: every promised name resolves, and importing the plugin-facing ones is cheap."""

import subprocess
import sys

import diffcore.api as api


def test_every_api_name_resolves():
    for name in api.__all__:
        assert getattr(api, name) is not None, name


def test_unknown_name_lists_what_is_offered():
    try:
        api.nothing_here  # noqa: B018
    except AttributeError as exc:
        assert "hookimpl" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_plugin_facing_names_do_not_import_torch():
    code = ("import sys; from diffcore.api import hookimpl, ConfigError, component, JobSettings, NoConfig; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
