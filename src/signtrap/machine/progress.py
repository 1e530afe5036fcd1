"""Progress bars with rates on a terminal; plain periodic lines when output is not a terminal."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

QUIET = False  # set by `--quiet` / `--json`


class PlainProgress:
    """tqdm's update/set_postfix/close subset, printing a line at most every `interval` seconds."""

    def __init__(self, total: int | None, desc: str, unit: str, interval: float = 15.0):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n, self.start, self.last, self.postfix = 0, time.perf_counter(), time.perf_counter(), ""

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.perf_counter() - self.last >= self.interval:
            self._print()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def set_postfix(self, **kwargs) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def _print(self) -> None:
        elapsed = time.perf_counter() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        eta = f", eta {max(self.total - self.n, 0) / rate:.0f}s" if self.total and rate > 0 else ""
        total = f"/{self.total}" if self.total else ""
        post = f" {self.postfix}" if self.postfix else ""
        speed = f"{rate:.0f} {self.unit}/s" if rate >= 1 or rate == 0 else f"{1 / rate:.1f} s/{self.unit}"  # slow units: s each
        print(f"{self.desc}: {self.n}{total} {self.unit} ({speed}{eta}){post}", file=sys.stderr, flush=True)
        self.last = time.perf_counter()

    def close(self) -> None:
        if self.n:
            self._print()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Silent(PlainProgress):
    def _print(self) -> None:
        pass


def progress(total: int | None, desc: str, unit: str = "img", enabled: bool = True):
    if QUIET or not enabled:
        return _Silent(total, desc, unit)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, leave=False)
    return PlainProgress(total, desc, unit)


def say(message: str) -> None:
    if not QUIET:
        print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """A warning the user must see: printed to stderr even with --quiet."""
    print(f"signtrap: warning: {message}", file=sys.stderr, flush=True)
