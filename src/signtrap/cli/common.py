"""What every command shares: the config positional plus `key.sub=value` overrides."""
from __future__ import annotations

import argparse
from pathlib import Path

from signtrap.config import RunConfig, load_config


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (default: built-in defaults, SynthSigns)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.epochs=3")


def split_config_args(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """A first positional containing '=' is an override, not a config path."""
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not Path(config).is_file():
        return None, [config, *overrides]
    return config, overrides


def load_cli_config(args: argparse.Namespace, extra: list[str] = ()) -> RunConfig:
    config, overrides = split_config_args(args)
    return load_config(config, [*overrides, *extra])
