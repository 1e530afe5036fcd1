"""Export settings: `ExportConfig` lives in `signtrap.config` (the `export:` section of a run config)."""
from signtrap.config import ExportConfig

__all__ = ["ExportConfig"]
