"""What every command shares: the config positional plus `key.sub=value` overrides."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (default: built-in defaults, SynthSigns)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.epochs=3 (before or after the options)")


def config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The config path and the override list; a first positional containing '=' is an override, not a path."""
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not Path(config).is_file():
        return None, [config, *overrides]
    return config, overrides
