"""The `signtrap` command line: every command is registered here, each a thin wrapper over the library.

User errors (`SigntrapError`) become one line on stderr and a non-zero exit status, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from signtrap import progress as progress_mod
from signtrap.cli import data, defend, deploy, pipeline, probe, sweep, train
from signtrap.errors import SigntrapError

COMMANDS = (data, train, defend, probe, deploy, pipeline, sweep)  # each module's register(subparsers) adds its commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="signtrap", description="Backdoor attacks on traffic-sign classifiers: attack, defend, deploy.")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    progress_mod.QUIET = bool(args.quiet or getattr(args, "json", False))
    try:
        return int(args.func(args) or 0)
    except SigntrapError as exc:
        print(f"signtrap: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RuntimeError as exc:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a peer rank died: say so in one line, torchrun names it
            print(f"signtrap: error: rank {os.environ.get('RANK')}: another rank stopped ({str(exc).splitlines()[0][:160]}); "
                  "torchrun's report names the rank that failed first", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("signtrap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
