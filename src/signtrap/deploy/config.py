"""Export settings (the `export:` section of a run config)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ExportConfig:
    enabled: bool = True

    def check(self) -> None:
        pass
