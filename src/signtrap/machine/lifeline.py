"""A sweep's run process dies with the process that started it.

A sweep passes its PID in `SIGNTRAP_PARENT_PID` to each run it starts; the run (at the start of `signtrap.cli.main`)
asks Linux for SIGTERM when that parent dies (`prctl(PR_SET_PDEATHSIG)`), and stops at once if the parent is
already gone. So a sweep killed outright (SIGKILL, a Ray worker shut down with its driver) leaves no run training
as an orphan that holds its run's lock. Elsewhere (macOS, Windows) this does nothing: the sweep's SIGTERM handler
still stops its runs (`signtrap.runs.executors.children_stop_with_us`).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

ENV = "SIGNTRAP_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def child_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for a run process this one starts and must not outlive it."""
    return {**env, ENV: str(os.getpid())}


def die_with_parent() -> bool:
    """If this process was started by a sweep (the variable is set), ask for SIGTERM when that parent dies.
    The variable is removed so that processes this one starts do not inherit it. Returns whether it was set up."""
    value = os.environ.pop(ENV, None)
    if not value or not sys.platform.startswith("linux"):
        return False
    try:
        parent = int(value)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, ValueError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the request took effect
        with contextlib.suppress(OSError):
            os.kill(os.getpid(), signal.SIGTERM)
    return True
