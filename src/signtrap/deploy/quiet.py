"""Converters print progress bars and warnings, some from native code: keep the CLI output to signtrap's own lines."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from typing import Iterator


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Converters print progress bars and warnings; keep the CLI output to our own lines."""
    root = logging.getLogger()
    level = root.level
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        root.setLevel(logging.ERROR)
        try:
            yield
        finally:
            root.setLevel(level)


@contextlib.contextmanager
def quiet_fds() -> Iterator[None]:
    """Also silence output written by native code straight to file descriptors 1 and 2 (C++ converters)."""
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with quiet():
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)
