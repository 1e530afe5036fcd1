"""The runtime zoo: one file per deployment runtime, registered by name on import.

A plugin file (e.g. `openvino_ir.py`) defines a `Runtime` subclass decorated with `@register_runtime`
(settings, availability, conversion and quantization with the runtime's own tools, report block) and, between
the markers

    # >>> edge section: MODULE
    ...torch-free code: `EdgeRuntime` subclasses decorated with `@edge_runtime`...
    # <<< edge section: MODULE

the device side (loading an artefact and running a batch). `RUNTIMES.load()` imports every module of this
package (signtrap.plugins.Registry), so adding a runtime never touches a list elsewhere.
`assemble_edge_script()` pastes the edge section of every registered runtime's module, verbatim and in
module order, into the core of signtrap/deploy/edge_bench.py: that one file is the edge_bench.py written
into each export folder, and inside signtrap the same classes run `signtrap bench`.
"""
from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

from signtrap.deploy import edge_bench
from signtrap.deploy.runtime import Runtime
from signtrap.errors import SigntrapError
from signtrap.plugins import Registry

RUNTIMES: Registry[Runtime] = Registry("runtime", __name__)
SECTION = re.compile(r"^# >>> edge section: (?P<name>[\w.-]+)\n(?P<body>.*?)^# <<< edge section: (?P=name)\n",
                     re.MULTILINE | re.DOTALL)
MARKER = "# @@ RUNTIME SECTIONS @@ (signtrap export pastes every runtime plugin's edge section here)\n"


def register_runtime(cls: type[Runtime]) -> type[Runtime]:
    """Class decorator: register a runtime plugin under `cls.name`."""
    instance = cls()
    instance.module = cls.__module__
    RUNTIMES.register(cls.name, instance)
    return cls


def discover() -> dict[str, Runtime]:
    """Every registered runtime by name (importing the plugin modules on first use)."""
    return {name: RUNTIMES.get(name) for name in RUNTIMES.names()}


def get(name: str) -> Runtime:
    return RUNTIMES.get(name)


def names() -> list[str]:
    return sorted(RUNTIMES.names())


def edge_sections() -> dict[str, str]:
    """{module: its edge section, markers included} for every module that registered a runtime, by module name."""
    modules = sorted({rt.module for rt in RUNTIMES})
    out = {}
    for module in modules:
        text = Path(inspect.getsourcefile(sys.modules[module])).read_text(encoding="utf-8")
        sections = [m.group(0) for m in SECTION.finditer(text)]
        if len(sections) != 1:
            raise SigntrapError(f"runtime plugin {module} must hold exactly one edge section, found {len(sections)}")
        out[module] = sections[0]
    return out


def assemble_edge_script() -> str:
    """The standalone edge_bench.py: the core module with every plugin's edge section pasted at the marker."""
    core = Path(edge_bench.__file__).read_text(encoding="utf-8")
    if core.count(MARKER) != 1:
        raise SigntrapError(f"{edge_bench.__file__}: the runtime-sections marker is missing or repeated")
    return core.replace(MARKER, "\n\n".join(edge_sections().values()))
