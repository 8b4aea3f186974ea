"""diffcore.testing.wheels: which of the running environment's distributions a test venv gets.

The packaging tests (plugins/*/tests/*packaging*) build and install real wheels; these check the
dependency walk on hand-written wheel metadata, in milliseconds.
"""

from __future__ import annotations

import zipfile
from importlib import metadata

import pytest

from diffcore.testing.wheels import link_merged, top_level_entries, dependency_closure


def _metadata(name, version, requires):
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
    return "\n".join(lines) + "\n"


def wheel(tmp_path, name, *requires):
    path = tmp_path / "wheels" / name / f"{name}-1.0-py3-none-any.whl"
    path.parent.mkdir(parents=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}-1.0.dist-info/METADATA", _metadata(name, "1.0", requires))
    return path


def installed(site, name, version, *requires):
    """A distribution of the running environment (a .dist-info on sys.path) with one module."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(_metadata(name, version, requires))
    (site / f"{name}.py").write_text("")
    (info / "RECORD").write_text(f"{name}.py,,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")


def names(dists):
    return {d.metadata["Name"].lower() for d in dists}


def test_the_closure_follows_requirements_transitively_and_skips_what_the_wheels_provide(tmp_path):
    core = wheel(tmp_path, "mycore", "cattrs>=1")
    plugin = wheel(tmp_path, "myplugin", "mycore>=1", 'not-installed-anywhere; extra == "test"',
                   'not-installed-anywhere; python_version < "3"')
    found = names(dependency_closure([core, plugin]))
    assert {"cattrs", "attrs"} <= found   # cattrs needs attrs
    assert not found & {"mycore", "myplugin", "not-installed-anywhere", "diffcore"}


def test_extras_of_a_requirement_bring_their_dependencies(tmp_path, monkeypatch):
    site = tmp_path / "site"
    installed(site, "fancybase", "2.0", 'fancyextra>=1; extra == "fancy"')
    installed(site, "fancyextra", "1.5")
    monkeypatch.syspath_prepend(str(site))
    assert names(dependency_closure([wheel(tmp_path, "plain", "fancybase")])) == {"fancybase"}
    wanted = dependency_closure([wheel(tmp_path, "wants", "fancybase[fancy]>=2")])
    assert names(wanted) == {"fancybase", "fancyextra"}
    # what the test venv links: each distribution's module and its .dist-info, from where it lies
    assert top_level_entries(wanted[1]) == {site / "fancyextra.py", site / "fancyextra-1.5.dist-info"}


def test_a_missing_or_out_of_range_dependency_is_named(tmp_path):
    with pytest.raises(RuntimeError, match="needy requires not-installed-anywhere>=2, which the running environment"):
        dependency_closure([wheel(tmp_path, "needy", "not-installed-anywhere>=2")])
    version = metadata.version("attrs")
    with pytest.raises(RuntimeError, match=f"old requires attrs<1, but the running environment has attrs {version}"):
        dependency_closure([wheel(tmp_path, "old", "attrs<1")])


def test_a_namespace_folder_from_two_places_is_merged(tmp_path):
    for where, child in (("one", "a.py"), ("two", "b.py")):
        (tmp_path / where / "ns").mkdir(parents=True)
        (tmp_path / where / "ns" / child).write_text(f"NAME = {child!r}\n")
    site = tmp_path / "site"
    site.mkdir()
    link_merged(tmp_path / "one" / "ns", site / "ns")
    link_merged(tmp_path / "one" / "ns", site / "ns")   # the same folder again: nothing to do
    assert (site / "ns").is_symlink()
    link_merged(tmp_path / "two" / "ns", site / "ns")
    assert not (site / "ns").is_symlink() and sorted(p.name for p in (site / "ns").iterdir()) == ["a.py", "b.py"]
    assert (site / "ns" / "b.py").resolve() == (tmp_path / "two" / "ns" / "b.py").resolve()
