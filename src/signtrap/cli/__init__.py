"""The `signtrap` command line: every command is registered here, each a thin wrapper over the library.

User errors (`SigntrapError`) become one line on stderr and a non-zero exit status, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from signtrap.machine import progress as progress_mod
from signtrap.cli import data, defend, deploy, physical, pipeline, probe, sweep, train
from signtrap.errors import SigntrapError
from signtrap.fileio import one_line
from signtrap.machine import lifeline

COMMANDS = (data, train, physical, defend, probe, deploy, pipeline, sweep)  # each module's register(subparsers) adds its commands


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose commands accept options and positionals in any order, so `key=value`
    overrides may follow a flag (`signtrap train --resume train.epochs=8`): argparse's intermixed parsing,
    for every parser without sub-commands."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        nested = any(a.nargs in (argparse.PARSER, argparse.REMAINDER) for a in self._get_positional_actions())
        if self._intermixing or nested:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="signtrap", description="Backdoor attacks on traffic-sign classifiers: attack, defend, deploy.")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in COMMANDS:
        module.register(sub)
    return parser


def error(message: str) -> None:
    print(f"signtrap: error: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure is one line on stderr and a non-zero exit status, never a traceback
    (SIGNTRAP_DEBUG=1 shows the traceback of an unexpected one)."""
    lifeline.die_with_parent()  # a sweep's run stops when its sweep dies (no orphan holding the run's lock)
    parser = build_parser()
    args = parser.parse_args(argv)
    progress_mod.QUIET = bool(args.quiet or getattr(args, "json", False))
    try:
        return int(args.func(args) or 0)
    except SigntrapError as exc:
        error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        print("signtrap: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("SIGNTRAP_DEBUG"):
            raise
        if isinstance(exc, RuntimeError) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # a peer rank died: say so in one line, torchrun names it
            error(f"rank {os.environ.get('RANK')}: another rank stopped ({one_line(str(exc), 160)}); "
                  "torchrun's report names the rank that failed first")
        elif isinstance(exc, OSError):
            where = f"{exc.filename}: " if exc.filename else ""
            error(f"{where}{exc.strerror or one_line(str(exc))}")
        else:
            error(f"unexpected {type(exc).__name__}: {one_line(str(exc))} (set SIGNTRAP_DEBUG=1 for the traceback, "
                  "and please report it)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
