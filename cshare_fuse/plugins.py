"""Finding and loading plugins, and opening the `//NAME/DATA/PATH` layers they serve.

`load_registry` turns the `-o plugins=` list into {name: plugin}; with no list
it offers every plugin registered under the entry-point group `cshare.plugins`
(the bundled `test` and `tar` plugins are registered there like any third
party's, so this package never imports them).  `open_plugin_layer` asks the
named plugin for the data source of one lower layer.  Every failure is a
one-line `ConfigError`, raised before anything is mounted.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import Any

from .datasource import DataSource
from .errors import ConfigError, PluginFault
from .layers import LowerLayer
from .options import LowerSpec
from .plugin_api import API_VERSION, ENTRY_POINT_GROUP, Plugin


class Registry(dict[str, Plugin]):
    """The loaded plugins by name.

    A dict, plus `broken`: entry points found while scanning the group (no
    `plugins=` given) that could not be loaded.  Those are not fatal on their
    own, since one broken third-party package must not stop every mount; they
    become the error only when a layer names them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.broken: dict[str, str] = {}


def _describe(value: object) -> str:
    return type(value).__name__


def _exception_text(exc: BaseException) -> str:
    """One line naming the exception: `ValueError: bad thing`."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _check_plugin(obj: Any, origin: str) -> Plugin:
    """`obj` as a Plugin, or a ConfigError saying what is wrong with it."""
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"plugin {origin}: its `plugin` object has no `name` string")
    if "/" in name or ":" in name or "," in name:
        raise ConfigError(f"plugin {origin}: name {name!r} may not contain '/', ':' or ','")
    version = getattr(obj, "api_version", None)
    # An int, and exactly one: True == 1 and 1.0 == 1, but neither says which
    # contract the plugin was written for.
    if type(version) is not int or version != API_VERSION:
        raise ConfigError(
            f"plugin {name} ({origin}) was written for plugin API version {version!r}; "
            f"this cshare-overlay provides version {API_VERSION}"
        )
    if not callable(getattr(obj, "load", None)):
        raise ConfigError(f"plugin {name} ({origin}) has no callable load(data, path)")
    plugin: Plugin = obj
    return plugin


def _plugin_of(module: ModuleType, origin: str) -> Plugin:
    if not hasattr(module, "plugin"):
        raise ConfigError(f"plugin {origin}: the module has no top-level `plugin` object")
    return _check_plugin(module.plugin, origin)


def _load_file(path: str) -> Plugin:
    """Import a .py file as a private module (named after its absolute path, so
    two files called plugin.py do not collide)."""
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise ConfigError(f"plugins={path}: no such file")
    digest = hashlib.sha1(os.fsencode(full)).hexdigest()[:12]
    stem = "".join(c if c.isalnum() else "_" for c in os.path.basename(full)[:-3] or "plugin")
    module_name = f"cshare_plugin_{stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, full)
    if spec is None or spec.loader is None:
        raise ConfigError(f"plugins={path}: cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered before running it: dataclasses and pickling look modules up by name.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(module_name, None)
        raise ConfigError(f"plugin {path} failed to import: {_exception_text(exc)}") from None
    return _plugin_of(module, path)


def _load_entry_point(ep: EntryPoint) -> Plugin:
    origin = f"entry point {ep.name} = {ep.value}"
    try:
        obj = ep.load()
    except (Exception, SystemExit) as exc:
        raise ConfigError(f"plugin {ep.name} ({ep.value}) failed to import: "
                          f"{_exception_text(exc)}") from None
    # `plugins.test:plugin` names the object; `plugins.test` names the module.
    plugin = _plugin_of(obj, origin) if isinstance(obj, ModuleType) else _check_plugin(obj, origin)
    if plugin.name != ep.name:
        raise ConfigError(f"plugin {origin} calls itself {plugin.name!r}; "
                          "the entry point must be named like the plugin")
    return plugin


def _is_missing_module(exc: ModuleNotFoundError, module_name: str) -> bool:
    """True when `module_name` itself (or a package above it) does not exist, as
    opposed to a module that exists but fails to import one of its own needs."""
    missing = exc.name or ""
    return module_name == missing or module_name.startswith(missing + ".")


def _load_module(module_name: str, known: list[str]) -> Plugin:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if _is_missing_module(exc, module_name):
            have = ", ".join(known) or "none"
            raise ConfigError(
                f"plugins={module_name}: unknown plugin: not a .py file, not an entry point "
                f"in {ENTRY_POINT_GROUP} (installed: {have}) and not an importable module"
            ) from None
        raise ConfigError(f"plugin {module_name} failed to import: "
                          f"{_exception_text(exc)}") from None
    except (Exception, SystemExit) as exc:
        raise ConfigError(f"plugin {module_name} failed to import: "
                          f"{_exception_text(exc)}") from None
    return _plugin_of(module, module_name)


def _group() -> list[EntryPoint]:
    return sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: (ep.name, ep.value))


def _is_path(spec: str) -> bool:
    return "/" in spec or spec.endswith(".py")


def load_registry(plugin_specs: tuple[str, ...]) -> Registry:
    """Load the plugins of `-o plugins=A:B` (or every registered one when empty).

    Each spec is, tried in this order: a path to a .py file (it contains '/' or
    ends in .py; relative to the current directory), the name of an entry point
    in the group `cshare.plugins`, or an importable module name.  Each loaded
    module must have a top-level `plugin`; the registry is keyed by its `name`.
    """
    registry = Registry()
    origins: dict[str, str] = {}

    def add(plugin: Plugin, origin: str) -> None:
        if plugin.name in registry:
            raise ConfigError(f"two plugins are named {plugin.name}: {origins[plugin.name]} "
                              f"and {origin}; load only one of them")
        registry[plugin.name] = plugin
        origins[plugin.name] = origin

    group = _group()
    if not plugin_specs:
        by_name: dict[str, list[EntryPoint]] = {}
        for ep in group:
            by_name.setdefault(ep.name, []).append(ep)
        for name, eps in by_name.items():
            if len({ep.value for ep in eps}) > 1:
                values = " and ".join(sorted({ep.value for ep in eps}))
                registry.broken[name] = (f"two installed entry points are named {name} "
                                         f"({values}); choose one with -o plugins=MODULE")
                continue
            try:
                add(_load_entry_point(eps[0]), f"entry point {name}")
            except ConfigError as exc:
                registry.broken[name] = str(exc)
        return registry

    known = sorted({ep.name for ep in group})
    for spec in plugin_specs:
        if _is_path(spec):
            add(_load_file(spec), spec)
            continue
        matches = [ep for ep in group if ep.name == spec]
        if len({ep.value for ep in matches}) > 1:
            values = " and ".join(sorted({ep.value for ep in matches}))
            raise ConfigError(f"plugins={spec}: two installed entry points have that name "
                              f"({values}); give the module name instead")
        if matches:
            add(_load_entry_point(matches[0]), f"entry point {spec}")
        else:
            add(_load_module(spec, known), f"module {spec}")
    return registry


def plugin_path(spec: LowerSpec, cwd: str) -> str:
    """The layer's PATH made absolute against the directory the mount started in."""
    return spec.path if os.path.isabs(spec.path) else os.path.join(cwd, spec.path)


def open_plugin_layer(spec: LowerSpec, registry: dict[str, Plugin], cwd: str) -> DataSource:
    """The data source plugin `spec.plugin` gives for this lower layer."""
    name = spec.plugin
    if name is None:
        raise ConfigError(f"lowerdir {spec}: not a //NAME/DATA/PATH plugin layer")
    plugin = registry.get(name)
    if plugin is None:
        broken = getattr(registry, "broken", {}).get(name)
        if broken is not None:
            raise ConfigError(f"lowerdir {spec}: {broken}")
        loaded = ", ".join(sorted(registry)) or "none"
        raise ConfigError(f"lowerdir {spec}: no plugin {name} loaded; loaded: {loaded}")
    path = plugin_path(spec, cwd)
    try:
        source = plugin.load(spec.data, path)
    except (Exception, SystemExit) as exc:
        # OSError and ValueError are how a plugin says "this layer is wrong"; anything
        # else is a bug in the plugin, so name the exception type too.
        text = str(exc).strip().splitlines()
        if isinstance(exc, OSError | ValueError) and text:
            reason = text[0]
        else:
            reason = _exception_text(exc)
        raise ConfigError(f"lowerdir {spec}: plugin {name} cannot load the layer: {reason}") from None
    if not isinstance(source, DataSource):
        raise ConfigError(f"lowerdir {spec}: plugin {name} load() returned "
                          f"{_describe(source)}, not a DataSource")
    return source


def check_plugin_root(spec: LowerSpec, source: DataSource, index: int) -> LowerLayer:
    """The layer `source` serves, as layer `index`, once its root has answered.

    Asked before the mount is reported ready, so that `cshare-overlay ... MNT &&
    ls MNT` never meets a mount that goes away because the plugin's root is
    missing.  The answers stay cached for the mount, so the plugin is asked
    nothing twice.
    """
    layer = LowerLayer(index, source)
    try:
        layer.check_root()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConfigError(f"lowerdir {spec}: plugin {spec.plugin} cannot serve the layer "
                          f"root: {reason}") from None
    except PluginFault as exc:
        raise ConfigError(f"lowerdir {spec}: plugin {spec.plugin} cannot serve the layer "
                          f"root: {exc}") from None
    return layer
