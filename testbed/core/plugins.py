"""One way to add a plugin: a registry per kind, filled by decorator, whose names are known without importing plugins.

Every kind of plugin (strategy, link backend, index or value codec, device or link profile, energy
meter) has one ``PluginRegistry`` here and one ``register_<kind>("name")`` decorator. A plugin is a
module in its kind's home (``server/strategies/``, ``channel/``, …) that applies the decorator:

    @register_strategy("dpu")
    class DeepPartialUpdating(Strategy): ...

    register_link_profile("nb-iot", LinkProfile(...))   # a value registers with the same call

The scenario schema must accept exactly the registered names, yet validating a scenario must not
import plugin code (torch, kernel helpers, trace files). So ``names()`` reads the home's source with
``ast`` and collects the literal first argument of every ``register_<kind>(...)`` call, and only
``get(name)`` imports the one module that registers ``name``. A name registered twice, or a module
that claims a name and then does not register it, is a ``PluginError``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

from testbed.core.errors import TestbedError

T = TypeVar("T")


class PluginError(TestbedError):
    """A plugin name nobody registered, or a plugin home whose registrations contradict each other."""


@dataclass(frozen=True)
class _Declaration:
    module: str
    attributes: dict[str, Any]


def _module_files(home: str) -> list[tuple[str, Path]]:
    """(module name, file) of ``home`` (a module or a package's direct modules), found without importing it."""
    top, _, rest = home.partition(".")
    spec = importlib.util.find_spec(top)  # a top-level spec is found without running the package
    if spec is None:
        raise PluginError(f"plugin home {home!r}: package {top!r} is not installed")
    if not spec.submodule_search_locations:
        raise PluginError(f"plugin home {home!r}: {top!r} is the module {spec.origin}, not the package; a file of that "
                          "name earlier on sys.path (the script's folder?) hides it")
    path = Path(next(iter(spec.submodule_search_locations)))
    for part in rest.split(".") if rest else []:
        path = path / part
    if path.is_dir():
        return [(f"{home}.{file.stem}" if file.stem != "__init__" else home, file)
                for file in sorted(path.glob("*.py"))]
    file = path.with_suffix(".py")
    if file.is_file():
        return [(home, file)]
    raise PluginError(f"plugin home {home!r} is neither a package nor a module under {path.parent}")


def _literal(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def _declarations(home: str, decorator: str) -> dict[str, _Declaration]:
    """Every ``decorator("name", key=literal, …)`` call in ``home``'s source, by name."""
    found: dict[str, _Declaration] = {}
    for module, file in _module_files(home):
        text = file.read_text(encoding="utf-8")
        if decorator not in text:  # most modules of a home hold other plugins or none: skip the parse
            continue
        tree = ast.parse(text, filename=str(file))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            function = node.func
            called = function.id if isinstance(function, ast.Name) else \
                function.attr if isinstance(function, ast.Attribute) else None
            if called != decorator:
                continue
            name = _literal(node.args[0])
            if not isinstance(name, str):
                raise PluginError(f"{file}:{node.lineno}: {decorator}() needs the plugin's name as a string literal")
            if name in found:
                raise PluginError(f"{decorator}({name!r}) appears twice: in {found[name].module} and {module}")
            attributes = {keyword.arg: _literal(keyword.value) for keyword in node.keywords if keyword.arg}
            found[name] = _Declaration(module, attributes)
    return found


class PluginRegistry(Generic[T]):
    """The plugins of one kind: names read from source, objects imported on first use."""

    def __init__(self, kind: str, home: str, decorator: str) -> None:
        self.kind = kind
        self.home = home
        self.decorator = decorator
        self._declared: dict[str, _Declaration] | None = None
        self._registered: dict[str, T] = {}

    def _declarations(self) -> dict[str, _Declaration]:
        if self._declared is None:
            self._declared = _declarations(self.home, self.decorator)
        return self._declared

    @overload
    def register(self, name: str, plugin: None = None, **attributes: Any) -> Callable[[T], T]: ...
    @overload
    def register(self, name: str, plugin: T, **attributes: Any) -> T: ...

    def register(self, name: str, plugin: T | None = None, **attributes: Any) -> Any:
        """Register ``plugin`` under ``name`` (as a decorator when ``plugin`` is not given)."""
        def add(value: T) -> T:
            previous = self._registered.get(name)
            if previous is not None and previous is not value:
                raise PluginError(f"{self.kind} {name!r} is registered twice")
            self._registered[name] = value
            if isinstance(value, type):
                value.name = name  # type: ignore[attr-defined]  # a plugin class knows the name it is used by
            return value

        return add if plugin is None else add(plugin)

    def names(self) -> tuple[str, ...]:
        """Every registered name, sorted, without importing any plugin."""
        return tuple(sorted(self._declarations()))

    def attributes(self, name: str) -> dict[str, Any]:
        """The literal keyword arguments ``name`` was registered with (e.g. a codec's wire id)."""
        return dict(self._declaration(name).attributes)

    def _unknown(self, name: str) -> str:
        return f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}"

    def check(self, name: str) -> str:
        """``name`` if it is registered; otherwise ValueError listing the registered names (for validators)."""
        if name not in self._declarations():
            raise ValueError(self._unknown(name))
        return name

    def _declaration(self, name: str) -> _Declaration:
        declaration = self._declarations().get(name)
        if declaration is None:
            raise PluginError(self._unknown(name))
        return declaration

    def get(self, name: str) -> T:
        """The plugin registered as ``name``, importing the module that registers it."""
        if name not in self._registered:
            module = self._declaration(name).module
            importlib.import_module(module)
            if name not in self._registered:
                raise PluginError(f"{module} mentions {self.decorator}({name!r}) but did not register it on import")
        return self._registered[name]

    def load_all(self) -> dict[str, T]:
        """Every plugin of this kind by name (imports them all)."""
        return {name: self.get(name) for name in self.names()}


STRATEGIES: PluginRegistry[Any] = PluginRegistry("strategy", "server.strategies", "register_strategy")
LINK_BACKENDS: PluginRegistry[Any] = PluginRegistry("channel backend", "channel", "register_link_backend")
LINK_PROFILES: PluginRegistry[Any] = PluginRegistry("channel profile", "channel", "register_link_profile")
DEVICE_PROFILES: PluginRegistry[Any] = PluginRegistry("device profile", "devices", "register_device_profile")
ENERGY_METERS: PluginRegistry[Any] = PluginRegistry("energy reader", "devices", "register_energy_meter")
INDEX_CODECS: PluginRegistry[Any] = PluginRegistry("index codec", "testbed.core.codecs", "register_index_codec")
VALUE_CODECS: PluginRegistry[Any] = PluginRegistry("value codec", "testbed.core.codecs", "register_value_codec")

register_strategy = STRATEGIES.register
register_link_backend = LINK_BACKENDS.register
register_link_profile = LINK_PROFILES.register
register_device_profile = DEVICE_PROFILES.register
register_energy_meter = ENERGY_METERS.register
register_index_codec = INDEX_CODECS.register
register_value_codec = VALUE_CODECS.register
