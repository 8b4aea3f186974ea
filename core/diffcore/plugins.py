"""Plugin discovery: pluggy + entry points in the group ``diffcore``, loaded one at a time.

A plugin that fails to import is recorded (distribution, version, error) and the rest keep
working; ``DIFFCORE_STRICT_PLUGINS=1`` raises instead. ``DIFFCORE_LOAD_PLUGINS=a,b`` loads
only the named entry points ("" loads none). The core registers its own components through the
same hooks, from ``diffcore.builtin``.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import traceback
from collections.abc import Callable
from typing import Any

import attrs
import pluggy

from diffcore import hookspecs
from diffcore.errors import PluginError
from diffcore.registry import KINDS, Registry

GROUP = "diffcore"
BUILTIN = "diffcore.builtin"


@attrs.define
class PluginInfo:
    name: str
    distribution: str
    version: str
    module: str
    error: str | None = None
    traceback: str | None = None
    registered: dict[str, list[str]] = attrs.Factory(dict)


class Plugins:
    """The plugin manager and the registries it fills."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("diffcore")
        self.pm.add_hookspecs(hookspecs)
        # plugins may add hookspecs of their own (e.g. the guidance plugin's register_rewards);
        # historic, so a plugin registered later still gets the call
        self.pm.hook.register_hookspecs.call_historic(kwargs={"add": self.pm.add_hookspecs})
        self.registries: dict[str, Registry] = {k: Registry(k) for k in KINDS}
        self.info: dict[str, PluginInfo] = {}
        self._filled = False

    # -- loading ---------------------------------------------------------------------------
    def load(self, *, entry_points: bool = True) -> Plugins:
        """Register the built-in plugin, then every entry point (or the env-selected subset)."""
        import diffcore

        self.register_module(importlib.import_module(BUILTIN), name="diffcore",
                             distribution="diffcore", version=diffcore.__version__)
        if entry_points:
            for ep in _selected(md.entry_points(group=GROUP)):
                self._load_entry_point(ep)
        self._check_pending()
        return self

    def _check_pending(self) -> None:
        """A hook implementation no hookspec declares is a misspelling: name the plugin and the hook."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = self.pm.get_name(exc.plugin) or "?"
            info = self.info.get(name)
            where = f"{name} ({info.distribution} {info.version})" if info else name
            raise PluginError(f"plugin {where}: {exc}") from None

    def _load_entry_point(self, ep: md.EntryPoint) -> None:
        dist = ep.dist.name if ep.dist else ep.name
        version = ep.dist.version if ep.dist else "?"
        if ep.name in self.info:
            return  # the same distribution seen twice on sys.path
        try:
            module = ep.load()
            self.register_module(module, name=ep.name, distribution=dist, version=version, check=False)
        except Exception as exc:
            if _strict():
                raise PluginError(f"plugin {ep.name} ({dist} {version}) failed to load: {exc!r}") from exc
            self.info[ep.name] = PluginInfo(ep.name, dist, version, ep.value, error=f"{type(exc).__name__}: {exc}",
                                            traceback=traceback.format_exc())

    def register_module(self, module: Any, *, name: str, distribution: str = "", version: str = "",
                        check: bool = True) -> None:
        """Register a plugin object (module or class instance) under ``name``.

        ``check``: fail now on a hook implementation no hookspec declares (``load`` checks once at
        the end instead, so a plugin may implement a hookspec that a later plugin adds)."""
        try:
            self.pm.register(module, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginError(f"plugin {name} ({distribution} {version}): {exc}") from exc
        self.info[name] = PluginInfo(name, distribution or name, version or "?",
                                     getattr(module, "__name__", type(module).__name__))
        if check:
            try:
                self._check_pending()
            except PluginError:
                self.unregister(name)
                raise
        self._filled = False

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.info.pop(name, None)
        self._filled = False

    # -- registries ------------------------------------------------------------------------
    def registry(self, kind: str) -> Registry:
        """The registry of ``kind``, filled by calling every plugin's ``register_<kind>`` hook.

        Kinds beyond the core's work the same way once a plugin adds a ``register_<kind>`` hookspec."""
        if kind not in KINDS and kind not in self.registries:
            if not hasattr(self.pm.hook, f"register_{kind}"):
                raise PluginError(f"unknown component kind {kind!r}; no plugin declares a register_{kind} hook")
            self._filled = False
            self.registries[kind] = Registry(kind)
        if not self._filled:
            self._fill()
        return self.registries[kind]

    def _fill(self) -> None:
        kinds = list(self.registries)
        self.registries = {k: Registry(k) for k in kinds}
        for info in self.info.values():
            info.registered = {}
        for kind in kinds:
            hook = getattr(self.pm.hook, f"register_{kind}")
            for impl in hook.get_hookimpls():
                try:
                    impl.function(register=self._registrar(kind, impl.plugin_name))
                except PluginError:
                    raise  # a name clash between two plugins: both are named, nothing to hide
                except Exception as exc:
                    if _strict() or impl.plugin_name == "diffcore":  # the core's own: a bug, never hidden
                        raise PluginError(f"plugin {impl.plugin_name}: register_{kind} failed: {exc!r}") from exc
                    info = self.info.get(impl.plugin_name)
                    if info is not None and info.error is None:
                        info.error = f"register_{kind} failed: {type(exc).__name__}: {exc}"
                        info.traceback = traceback.format_exc()
        self._filled = True

    def _registrar(self, kind: str, plugin: str) -> Callable[..., None]:
        def register(name: str, factory: Callable[..., Any], config: type | None = None,
                     description: str = "") -> None:
            from diffcore.registry import NoConfig

            self.registries[kind].add(name, factory, config=config or NoConfig,
                                      description=description, plugin=plugin)
            if plugin in self.info:
                self.info[plugin].registered.setdefault(kind, []).append(name)

        return register

    def add_commands(self, cli: Any) -> None:
        self.pm.hook.register_commands(cli=cli)

    @property
    def broken(self) -> list[PluginInfo]:
        return [p for p in self.info.values() if p.error]


def _strict() -> bool:
    return os.environ.get("DIFFCORE_STRICT_PLUGINS", "") not in ("", "0")


def _selected(eps: md.EntryPoints) -> list[md.EntryPoint]:
    wanted = os.environ.get("DIFFCORE_LOAD_PLUGINS")
    if wanted is None:
        return list(eps)
    names = {n.strip() for n in wanted.split(",") if n.strip()}
    return [ep for ep in eps if ep.name in names]


_plugins: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugin manager, loaded on first use."""
    global _plugins
    if _plugins is None:
        _plugins = Plugins().load()
    return _plugins


def reset_plugins(plugins: Plugins | None = None) -> None:
    """Forget the loaded plugins (tests use this after changing sys.path or the environment)."""
    global _plugins
    _plugins = plugins


def registry(kind: str) -> Registry:
    return get_plugins().registry(kind)


def check_requirements(requires: list[str], *, file: str | None = None) -> None:
    """Raise a clear error when a job's ``requires = [...]`` is not satisfied."""
    from packaging.requirements import InvalidRequirement, Requirement

    from diffcore.errors import ConfigError

    for i, text in enumerate(requires):
        try:
            req = Requirement(text)
        except InvalidRequirement as exc:
            raise ConfigError(f"not a requirement: {text!r} ({exc})", file=file, path=f"requires[{i}]") from None
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            raise ConfigError(f"this job needs {text} but {req.name} is not installed "
                              f"(pip install '{text}')", file=file, path=f"requires[{i}]") from None
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            raise ConfigError(f"this job needs {text} but {req.name} {have} is installed",
                              file=file, path=f"requires[{i}]")
