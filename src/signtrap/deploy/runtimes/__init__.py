"""The runtime zoo: one file per deployment runtime, registered by name on import.

A plugin file (e.g. `openvino_ir.py`) defines a `Runtime` subclass decorated with `@register_runtime`
(settings, availability, conversion and quantization with the runtime's own tools, report block) and, between
the markers

    # >>> edge section: NAME
    ...torch-free code: an `EdgeRuntime` subclass decorated with `@edge_runtime`...
    # <<< edge section: NAME

the device side (loading an artefact and running a batch). `discover()` imports every module of this
package, so adding a runtime never touches a list elsewhere. `assemble_edge_script()` pastes every edge
section, verbatim and in file-name order, into the core of signtrap/deploy/edge_bench.py: that one file is
the edge_bench.py written into each export folder, and the same classes run inside `signtrap bench`.
"""
from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

from signtrap.deploy import edge_bench
from signtrap.deploy.runtime import Runtime
from signtrap.errors import SigntrapError, unknown

RUNTIMES: dict[str, Runtime] = {}
SECTION = re.compile(r"^# >>> edge section: (?P<name>[\w.-]+)\n(?P<body>.*?)^# <<< edge section: (?P=name)\n",
                     re.MULTILINE | re.DOTALL)
MARKER = "# @@ RUNTIME SECTIONS @@ (signtrap export pastes every runtime plugin's edge section here)\n"
_discovered = False


def register_runtime(cls: type[Runtime]) -> type[Runtime]:
    """Class decorator: register a runtime plugin under `cls.name`."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in RUNTIMES and type(RUNTIMES[cls.name]) is not cls:
        raise TypeError(f"runtime '{cls.name}' is registered twice ({type(RUNTIMES[cls.name]).__name__}, {cls.__name__})")
    RUNTIMES[cls.name] = cls()
    return cls


def plugin_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_"))


def discover() -> dict[str, Runtime]:
    """Import every plugin module of this package (once); returns the registry."""
    global _discovered
    if not _discovered:
        for name in plugin_modules():
            importlib.import_module(f"{__name__}.{name}")
        _discovered = True
    return RUNTIMES


def get(name: str) -> Runtime:
    registry = discover()
    if name not in registry:
        raise unknown("runtime", name, registry)
    return registry[name]


def names() -> list[str]:
    return sorted(discover())


def edge_sections() -> dict[str, str]:
    """{plugin module: its edge-section text including the markers}, in file-name order."""
    out = {}
    for name in plugin_modules():
        text = (Path(__file__).parent / f"{name}.py").read_text(encoding="utf-8")
        sections = [m.group(0) for m in SECTION.finditer(text)]
        if len(sections) != 1:
            raise SigntrapError(f"runtime plugin {name}.py must hold exactly one edge section, found {len(sections)}")
        out[name] = sections[0]
    return out


def assemble_edge_script() -> str:
    """The standalone edge_bench.py: the core module with every plugin's edge section pasted at the marker."""
    core = Path(edge_bench.__file__).read_text(encoding="utf-8")
    if core.count(MARKER) != 1:
        raise SigntrapError(f"{edge_bench.__file__}: the runtime-sections marker is missing or repeated")
    sections = "\n\n".join(edge_sections().values())
    return core.replace(MARKER, sections)
