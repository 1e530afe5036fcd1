"""User-facing errors: the CLI prints their message as one line and exits non-zero."""
from __future__ import annotations

import difflib
from typing import Iterable


class SigntrapError(Exception):
    """A problem with the user's input or files, reported without a traceback."""

    exit_code = 2


class ConfigError(SigntrapError):
    pass


class DataError(SigntrapError):
    pass


class IntegrityError(SigntrapError):
    """A file whose hash does not match the one recorded when it was written."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def unknown(kind: str, name: str, choices: Iterable[str]) -> SigntrapError:
    choices = sorted(choices)
    return SigntrapError(f"unknown {kind} '{name}'{suggest(name, choices)}; choose from: {', '.join(choices)}")
