"""Packaging tests: build wheels from this checkout and install them into a virtual environment
that holds exactly what they depend on.

The environment running the tests may be the system Python, a venv or a conda env, so the test
venv must not borrow the *system* interpreter's packages (``--system-site-packages``). Instead it
is an isolated venv whose site-packages gets symlinks to the distributions of the *running*
environment that the wheels' ``Requires-Dist`` need, followed transitively (markers and extras
evaluated, versions checked): the code files and the ``.dist-info`` of each, nothing else. The
distributions the wheels provide themselves (diffcore, the plugin) are never linked, so the
editable checkout cannot shadow them, and only the wheels' entry points are visible.

    wheels = source_wheels(tmp_path / "dist", "flux2")
    venv = wheel_venv(tmp_path / "venv", wheels)
    venv.run("diffcore", "plugins", "--json")
"""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

import attrs
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

#: copied sources never carry build outputs or tests into a wheel
JUNK = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist", "tests")
#: variables that would let the venv see the checkout or change which plugins load
HIDDEN_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "DIFFCORE_LOAD_PLUGINS", "PIP_TARGET", "PIP_PREFIX")


def sh(*args: object, **kw: object) -> subprocess.CompletedProcess:
    """Run a command; a failure raises with its last output, which is what a failing test should show."""
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited with {done.returncode}:\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def repository() -> Path:
    """The checkout the running diffcore comes from (its wheels are built from there)."""
    import diffcore

    root = Path(diffcore.__file__).resolve().parents[2]
    if not (root / "core" / "diffcore").is_dir() or not (root / "pyproject.toml").is_file():
        raise RuntimeError(f"diffcore runs from {Path(diffcore.__file__).parent}, not from a checkout of the "
                           "repository, so there are no sources to build wheels from")
    return root


def build_wheel(project: Path, out: Path) -> Path:
    """The wheel of the project folder ``project``, built without isolation (the running env's
    setuptools) into ``out``, which must hold no other wheel."""
    sh(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, project)
    (wheel,) = out.glob("*.whl")
    return wheel


def source_wheels(out: Path, *plugins: str | Path) -> list[Path]:
    """Wheels of the core and of ``plugins`` (names of folders under ``plugins/``, or paths), built
    from copies of the sources so that no ``build/`` or ``*.egg-info`` lands in the checkout."""
    root = repository()
    src = out / "src"
    shutil.copytree(root / "core", src / "diffcore" / "core", ignore=JUNK)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / "diffcore" / name)
    projects = [src / "diffcore"]
    for plugin in plugins:
        folder = Path(plugin) if Path(plugin).is_absolute() else root / "plugins" / str(plugin)
        shutil.copytree(folder, src / folder.name, ignore=JUNK)
        projects.append(src / folder.name)
    return [build_wheel(project, out / f"wheel-{project.name}") for project in projects]


def wheel_metadata(wheel: Path) -> email.message.Message:
    """The ``METADATA`` of a wheel file (name, version, ``Requires-Dist``)."""
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        return email.parser.BytesParser().parsebytes(zf.read(name))


def _wanted(requirement: Requirement, extras: Iterable[str]) -> bool:
    return requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in extras)


def dependency_closure(wheels: Sequence[Path]) -> list[metadata.Distribution]:
    """The running environment's distributions that ``wheels`` need, transitively: every
    requirement whose marker holds here, with the extras asked for. One that is missing or of a
    version outside the requirement's range raises, naming which wheel or distribution asked."""
    metas = [wheel_metadata(w) for w in wheels]
    provided = {canonicalize_name(m["Name"]) for m in metas}
    todo = [(Requirement(r), m["Name"]) for m in metas for r in m.get_all("Requires-Dist") or []
            if _wanted(Requirement(r), [""])]
    found: dict[str, metadata.Distribution] = {}
    extras_done: dict[str, set[str]] = {}
    while todo:
        req, asked_by = todo.pop()
        name = canonicalize_name(req.name)
        if name in provided:
            continue
        try:
            dist = found.get(name) or metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise RuntimeError(f"{asked_by} requires {req}, which the running environment ({sys.prefix}) "
                               "does not have; install it there") from None
        if not req.specifier.contains(dist.version, prereleases=True):
            raise RuntimeError(f"{asked_by} requires {req}, but the running environment has "
                               f"{dist.metadata['Name']} {dist.version}")
        extras = {""} | set(req.extras)
        if name in found and extras <= extras_done[name]:
            continue
        new = extras - extras_done.get(name, set())
        found[name], extras_done[name] = dist, extras_done.get(name, set()) | extras
        todo += [(Requirement(r), dist.metadata["Name"]) for r in dist.requires or []
                 if _wanted(Requirement(r), new)]
    return sorted(found.values(), key=lambda d: canonicalize_name(d.metadata["Name"]))


def top_level_entries(dist: metadata.Distribution) -> set[Path]:
    """The site-packages entries a distribution installed (packages, modules, its .dist-info)."""
    site = Path(dist.locate_file(""))
    names = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    names.discard("__pycache__")
    if not names:
        raise RuntimeError(f"{dist.metadata['Name']} {dist.version} in {site} lists no installed files "
                           "(no RECORD), so the test venv cannot link it")
    return {site / n for n in names}


def link_merged(src: Path, dst: Path) -> None:
    """Symlink ``src`` at ``dst``; where two distributions share a folder (a namespace package in
    two site directories), ``dst`` becomes a real folder linking the children of both. The loader
    resolves an extension's ``$ORIGIN`` through the link, so RPATHs into the env (conda) hold."""
    if not dst.exists() and not dst.is_symlink():
        dst.symlink_to(src, target_is_directory=src.is_dir())
        return
    if dst.resolve() == src.resolve():
        return
    if not (src.is_dir() and dst.is_dir()):
        raise RuntimeError(f"two distributions install {dst.name}: {src} and {dst.resolve()}")
    if dst.is_symlink():
        first = dst.resolve()
        dst.unlink()
        dst.mkdir()
        for child in first.iterdir():
            link_merged(child, dst / child.name)
    for child in src.iterdir():
        link_merged(child, dst / child.name)


@attrs.frozen
class WheelVenv:
    """A venv holding installed wheels and links to their dependencies; ``run`` executes its
    programs with an environment that cannot reach the checkout."""

    root: Path
    site: Path
    linked: tuple[str, ...]   # the distributions linked from the running environment

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in HIDDEN_ENV}
        return env | {"PATH": f"{self.root / 'bin'}{os.pathsep}{env.get('PATH', '')}"}

    def run(self, program: str, *args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run ``program`` (``python`` or a script the wheels installed) from outside the checkout."""
        return sh(self.root / "bin" / program, *args, env=self.env, cwd=cwd or self.root)


def wheel_venv(root: Path, wheels: Sequence[Path]) -> WheelVenv:
    """A fresh isolated venv at ``root`` with ``wheels`` installed (no dependency resolution, no
    index) and their dependency closure linked from the running environment."""
    deps = dependency_closure(wheels)
    sh(sys.executable, "-m", "venv", "--without-pip", root)
    python = root / "bin" / "python"
    site = Path(sh(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=root).stdout.strip())
    for dist in deps:
        for entry in top_level_entries(dist):
            link_merged(entry, site / entry.name)
    venv = WheelVenv(root=root, site=site, linked=tuple(d.metadata["Name"] for d in deps))
    # the running env's pip drives the install (the venv has none); --isolated: no user pip config
    sh(sys.executable, "-m", "pip", "--isolated", "--python", python, "install", "--no-deps", "--no-index",
       "--no-cache-dir", "--disable-pip-version-check", "--quiet", *wheels, env=venv.env, cwd=root)
    return venv


def installed_alone(root: Path, plugin: str, *, requires: set[str], registered: dict[str, list[str]]) -> WheelVenv:
    """The core's and ``plugins/<plugin>``'s wheels built and installed into an isolated venv under
    ``root``, checked as a user would find them: both packages are real files from the wheels, the
    plugin's version and ``Requires-Dist`` (extras aside) are ``requires``, ``diffcore plugins``
    lists the two distributions and no other, and the plugin loads without error and registers
    ``registered``. The packaging tests of every plugin share this."""
    import json

    distribution, module = f"diffcore-{plugin}", f"diffcore_{plugin}"
    version = metadata.version(distribution)
    wheels = source_wheels(root / "dist", plugin)
    assert wheels[1].name == f"{module}-{version}-py3-none-any.whl", wheels
    venv = wheel_venv(root / "venv", wheels)
    assert "diffcore" not in venv.linked and distribution not in venv.linked
    probe = (f"import json, importlib.metadata as md, diffcore, {module}; print(json.dumps({{"
             f"'files': [diffcore.__file__, {module}.__file__], 'version': md.version('{distribution}'), "
             f"'requires': md.requires('{distribution}'), "
             f"'dists': sorted(d.metadata['Name'] for d in md.distributions())}}))")
    found = json.loads(venv.run("python", "-c", probe).stdout)
    for file in map(Path, found["files"]):   # installed from the wheels: real files in the venv, no links
        assert file.is_relative_to(venv.site) and file.resolve().is_relative_to(venv.site.resolve()), found
    assert found["version"] == version
    assert {r for r in found["requires"] if "extra ==" not in r} == requires
    assert sorted(found["dists"]) == sorted(["diffcore", distribution, *venv.linked])
    listing = json.loads(venv.run("diffcore", "plugins", "--json").stdout)
    assert {row["distribution"] for row in listing} == {"diffcore", distribution}   # no other plugin
    (row,) = [row for row in listing if row["name"] == plugin]
    assert (row["distribution"], row["version"], row["error"]) == (distribution, version, None)
    assert row["registered"] == registered
    assert f"{plugin} ({distribution} {version})" in venv.run("diffcore", "plugins").stdout
    return venv


def same_image(venv: WheelVenv, job: str, root: Path, *plugins: object) -> tuple[object, dict]:
    """The generate job ``job`` (TOML with an ``{out}`` placeholder for its output folder) run in
    ``venv`` and in this checkout (with ``plugins`` registered): the first PNG must be
    byte-identical; returns it (a PIL image) and its recorded parameters."""
    import json

    from PIL import Image

    from diffcore.testing import plugins_for_test, run_job_file

    files = {where: root / f"job-{where}.toml" for where in ("venv", "checkout")}
    for where, file in files.items():
        file.write_text(job.format(out=root / f"out-{where}"))
    venv.run("diffcore", "run", files["venv"])
    with plugins_for_test(*plugins):
        run_job_file(files["checkout"])
    made = Image.open(root / "out-venv" / "sample-0000.png")
    assert made.tobytes() == Image.open(root / "out-checkout" / "sample-0000.png").tobytes()
    return made, json.loads(made.text["parameters"])
