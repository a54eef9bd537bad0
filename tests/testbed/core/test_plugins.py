"""The plugin registry: names read from source without importing, one import on first use, clear errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from testbed.core.plugins import (
    DEVICE_PROFILES,
    INDEX_CODECS,
    LINK_BACKENDS,
    LINK_PROFILES,
    STRATEGIES,
    VALUE_CODECS,
    PluginError,
    PluginRegistry,
)


@pytest.fixture
def plugin_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A package of our own on sys.path, named uniquely per test so that imports do not leak between tests."""
    name = f"plugin_home_{tmp_path.name.replace('-', '_')}"
    home = tmp_path / name
    home.mkdir()
    (home / "__init__.py").write_text('"""Test plugins."""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    return home


def _registry(home: Path) -> PluginRegistry[object]:
    registry: PluginRegistry[object] = PluginRegistry("gadget", home.name, "register_gadget")
    sys.modules["gadget_registry"] = type(sys)("gadget_registry")
    sys.modules["gadget_registry"].register_gadget = registry.register  # type: ignore[attr-defined]
    return registry


def test_names_come_from_source_and_only_get_imports(plugin_home: Path) -> None:
    (plugin_home / "spinner.py").write_text(textwrap.dedent('''
        from gadget_registry import register_gadget
        IMPORTED = True

        @register_gadget("spinner", wire_id=7)
        class Spinner:
            pass

        register_gadget("top", "a value")
    '''))
    registry = _registry(plugin_home)
    assert registry.names() == ("spinner", "top")
    assert registry.attributes("spinner") == {"wire_id": 7}
    assert f"{plugin_home.name}.spinner" not in sys.modules  # knowing the names imported nothing
    spinner = registry.get("spinner")
    assert isinstance(spinner, type) and spinner.name == "spinner"  # type: ignore[attr-defined]
    assert registry.get("top") == "a value"
    assert registry.check("top") == "top"
    with pytest.raises(ValueError, match="unknown gadget 'wheel'; choose one of spinner, top"):
        registry.check("wheel")
    with pytest.raises(PluginError, match="unknown gadget 'wheel'; choose one of spinner, top"):
        registry.get("wheel")


def test_a_name_registered_in_two_modules_is_an_error(plugin_home: Path) -> None:
    for module in ("one", "two"):
        (plugin_home / f"{module}.py").write_text('from gadget_registry import register_gadget\n'
                                                   'register_gadget("same", 1)\n')
    with pytest.raises(PluginError, match=r"register_gadget\('same'\) appears twice"):
        _registry(plugin_home).names()


def test_a_name_that_is_not_a_literal_is_an_error(plugin_home: Path) -> None:
    (plugin_home / "dynamic.py").write_text('from gadget_registry import register_gadget\n'
                                            'NAME = "x"\nregister_gadget(NAME, 1)\n')
    with pytest.raises(PluginError, match=r"dynamic.py:3: register_gadget\(\) needs the plugin's name as a string"):
        _registry(plugin_home).names()


def test_a_module_that_claims_a_name_but_does_not_register_it(plugin_home: Path) -> None:
    (plugin_home / "liar.py").write_text('def unused():\n    register_gadget("ghost", 1)\n')
    registry = _registry(plugin_home)
    assert registry.names() == ("ghost",)
    with pytest.raises(PluginError, match="did not register it on import"):
        registry.get("ghost")


def test_the_project_registries_list_what_the_scenarios_use() -> None:
    assert {"full", "dpu", "gcpu", "lcpu", "rpu", "pruning", "magnitude"} <= set(STRATEGIES.names())
    assert set(LINK_BACKENDS.names()) == {"proxy", "tun", "netem"}
    assert {"nb-iot", "lte-m", "wifi-weak"} <= set(LINK_PROFILES.names())
    assert set(DEVICE_PROFILES.names()) == {"jetson-nano", "rpi4"}
    assert [INDEX_CODECS.attributes(name)["wire_id"] for name in ("dense", "raw", "bitmap", "golomb-rice")] == [0, 1, 2, 3]
    assert [VALUE_CODECS.attributes(name)["wire_id"] for name in ("fp32", "fp16", "int8")] == [0, 1, 2]


def test_knowing_every_name_imports_no_plugin_module() -> None:
    code = ("import sys\nfrom testbed.core import plugins\n"
            "for registry in (plugins.STRATEGIES, plugins.LINK_BACKENDS, plugins.LINK_PROFILES, plugins.DEVICE_PROFILES,"
            " plugins.ENERGY_METERS):\n    registry.names()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('server', 'channel', 'devices', 'torch')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
