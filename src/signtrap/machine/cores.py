"""The CPU cores a signtrap process may use, and the core budget concurrent signtrap processes share.

Why: two trainings started together on a 2-core machine, each with a 2-thread pool, ran at 7% of their solo
speed (the pools' threads spin-wait for each other); with one thread each they ran at 94%. So every command
that computes (train, eval, defend, probe, export, bench, requantize, report, `signtrap run` and each sweep
run, and the same functions called through the Python API) claims CPU cores from a machine-wide budget
before it computes, sets its threads to the cores it holds, and gives them back when it ends.

The budget: one lock file per core this process may use, in a per-user folder on this host
(`$SIGNTRAP_CORES_DIR`, else `$XDG_RUNTIME_DIR/signtrap/cores-HOST`, else `~/.cache/signtrap/cores-HOST`).
A process holds a core by holding an exclusive `fcntl.flock` on its file, which also records the holder's
PID, command and start time so a waiting process can name it. The kernel drops the locks of a process that
dies, however it dies: no cleanup, no stale claims. Claims are atomic (one short-lived mutex file guards the
scan), so two processes never take cores piecemeal from each other.

The cores this process may use (`allowance`): its CPU affinity (`sched_getaffinity`), cut to the cgroup's CPU
quota (`cpu.max`, or v1's `cpu.cfs_quota_us`, rounded down, at least 1), not the machine's core count.

Policy (`SIGNTRAP_CORES`, default `wait`):
- `train.threads` / `--threads` N >= 1: the command needs N cores; it takes them when N are free, else waits
  until N are (printing which processes hold them, and again every minute), so a run computes with exactly
  the threads its config names and stays bit-identical whatever else runs.
- 0 (the default): the cores this process may use (at most `OMP_NUM_THREADS` when that is set, as in sweep
  runs): it takes the free ones, as many as there are (saying so when that is fewer than all), and waits only
  when none is free.
- A value above the allowance is refused with one line (exit status 2), in the config and on the command line
  alike; a negative one too. A value stored in a run made on a bigger machine (defend/eval/export/report of
  an existing run) is capped to the allowance with a warning instead, since the user did not name it now.
- `SIGNTRAP_CORES=share`: never wait; run on the free cores (at least one thread, over-subscribing when none
  is free). `SIGNTRAP_CORES=off`: no budget (threads as named, or the allowance).
- Nested claims in one process (the pipeline's stages, an API call inside another) reuse the outer claim and
  never wait; under torchrun (WORLD_SIZE > 1) the launcher has placed the ranks and no budget is used.

A waiting process holds nothing while it waits, so signtrap processes cannot deadlock on the budget; a
process that waits for N cores may be overtaken by ones that need fewer. Other programs are not counted.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from signtrap.errors import ConfigError

ENV_DIR = "SIGNTRAP_CORES_DIR"
ENV_POLICY = "SIGNTRAP_CORES"
POLICIES = ("wait", "share", "off")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
POLL_S = 0.5
REMIND_S = 60.0
MUTEX = "claim.lock"


# ---------------------------------------------------------------- what this process may use


def _cgroup_quota() -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 cpu.max, else v1 cfs), or None when unlimited."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    paths = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in (parts[1].split(",") if parts[1] else [""]):
                paths[controller] = parts[2]
    candidates = []
    if "" in paths:  # cgroup v2
        rel = paths[""].lstrip("/")
        candidates += [(Path("/sys/fs/cgroup") / rel / "cpu.max", "v2"), (Path("/sys/fs/cgroup/cpu.max"), "v2")]
    if "cpu" in paths:  # cgroup v1
        rel = paths["cpu"].lstrip("/")
        for base in (Path("/sys/fs/cgroup/cpu") / rel, Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpu,cpuacct") / rel):
            candidates.append((base / "cpu.cfs_quota_us", "v1"))
    for path, kind in candidates:
        try:
            if kind == "v2":
                quota, period = path.read_text().split()[:2]
                if quota == "max":
                    return None
                return int(quota) / int(period)
            quota = int(path.read_text())
            if quota <= 0:
                return None
            return quota / int((path.parent / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
    return None


def allowed_cpus() -> list[int]:
    """The ids of the CPUs this process may use: its affinity, cut to the cgroup quota (rounded down, >= 1)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = list(range(os.cpu_count() or 1))
    quota = _cgroup_quota()
    if quota is not None:
        cpus = cpus[:max(1, int(quota))]
    return cpus or [0]


def allowance() -> int:
    """How many CPU cores this process may use (affinity and cgroup quota), not the machine's count."""
    return len(allowed_cpus())


def check_threads(threads, key: str = "train.threads", stored: bool = False) -> int:
    """`threads` validated against the allowance: 0 (all of them) or 1..allowance.

    Above the allowance: one-line ConfigError, or, for a value stored in an existing run (`stored`), capped
    with a warning. Negative values and non-integers are always refused."""
    n = allowance()
    named = f"{key} {threads!r}" if key.startswith("--") else f"{key}={threads!r}"
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise ConfigError(f"{named}: the thread count must be a whole number, 0 (all {n} CPU cores this process may use) or 1..{n}")
    if threads < 0:
        raise ConfigError(f"{named} is outside 1..{n}: a thread count cannot be negative (0: all {n} CPU cores this process may use)")
    if threads > n:
        if stored:
            _say(f"signtrap: warning: {named} (from the run's config) is more than the {n} CPU core(s) this process may "
                 f"use here (affinity, cgroup quota); running on {n}", always=True)
            return n
        raise ConfigError(f"{named} is outside 1..{n}: more than the {n} CPU core(s) this process may use (CPU affinity "
                          f"and cgroup quota, not the machine's count); 0 uses all of them")
    return threads


# ---------------------------------------------------------------- the budget on disk


def budget_dir() -> Path:
    """The per-user, per-host folder of core lock files."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    host = socket.gethostname() or "localhost"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "signtrap" if runtime and Path(runtime).is_dir() else Path.home() / ".cache" / "signtrap"
    return base / f"cores-{host}"


def _open_dir() -> Path | None:
    for folder in (budget_dir(), Path(tempfile.gettempdir()) / f"signtrap-cores-{os.getuid()}-{socket.gethostname()}"):
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            probe = folder / MUTEX
            os.close(os.open(probe, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            return folder
        except OSError:
            continue
    return None


def _lock_path(folder: Path, cpu: int) -> Path:
    return folder / f"cpu{cpu}.lock"


def _read_info(fd: int) -> dict | None:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def _try_lock(path: Path) -> tuple[int | None, dict | None]:
    """(fd holding the core's lock, None) or (None, the holder's record) when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        info = _read_info(fd)
        os.close(fd)
        return None, info or {}
    return fd, None


@contextlib.contextmanager
def _mutex(folder: Path) -> Iterator[None]:
    fd = os.open(folder / MUTEX, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _command() -> str:
    argv = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    if argv[0] in ("__main__.py", "-m"):
        argv[0] = "signtrap"
    text = " ".join(argv)
    return text if len(text) <= 100 else text[:99] + "…"


def _take(folder: Path, cpus: list[int], want: int, need: int) -> tuple[list[tuple[int, int]], dict[int, dict]]:
    """Atomically take up to `want` free cores (at least `need`, else none): ([(cpu, fd)], {busy cpu: holder})."""
    taken: list[tuple[int, int]] = []
    busy: dict[int, dict] = {}
    with _mutex(folder):
        for cpu in cpus:
            fd, info = _try_lock(_lock_path(folder, cpu))
            if fd is None:
                busy[cpu] = info or {}
            elif len(taken) < want:
                taken.append((cpu, fd))
            else:
                os.close(fd)
        if len(taken) < need:
            for _, fd in taken:
                os.close(fd)
            return [], busy
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": _command(),
                             "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "cores": [c for c, _ in taken]}).encode()
        for _, fd in taken:
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
    return taken, busy


def _release(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):
            os.close(fd)


def holders() -> dict[int, dict | None]:
    """{cpu: the holder's record (pid, command, since, cores), or None when free} over this process's allowance."""
    folder = _open_dir()
    if folder is None:
        return {cpu: None for cpu in allowed_cpus()}
    out = {}
    for cpu in allowed_cpus():
        fd, info = _try_lock(_lock_path(folder, cpu))
        if fd is not None:
            os.close(fd)
        out[cpu] = info
    return out


def describe(busy: dict[int, dict]) -> str:
    """'cores 0, 1: pid 4242 (signtrap train ..., since 22:15:03)' per holding process."""
    by_pid: dict = {}
    for cpu, info in sorted(busy.items()):
        by_pid.setdefault(info.get("pid"), [info, []])[1].append(cpu)
    parts = []
    for pid, (info, cpus) in by_pid.items():
        who = f"pid {pid} ({info.get('command', '?')}, since {str(info.get('since', '?'))[-8:]})" if pid else "another process"
        parts.append(f"core{'s' if len(cpus) > 1 else ''} {', '.join(map(str, cpus))}: {who}")
    return "; ".join(parts) or "no holder recorded"


# ---------------------------------------------------------------- claims


@dataclass
class Claim:
    """What this process holds: `cores` (CPU ids of the budget; empty without one) and `threads` to compute with."""

    cores: list[int]
    threads: int
    policy: str = "wait"
    waited_s: float = 0.0
    fds: list[int] = field(default_factory=list, repr=False)


_lock = threading.RLock()
_state: dict = {"pid": None, "claim": None, "depth": 0}


def claimed() -> Claim | None:
    """This process's current claim (None outside every computing command)."""
    with _lock:
        return _state["claim"] if _state["pid"] == os.getpid() else None


def _env_threads() -> int | None:
    try:
        value = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return value if value >= 1 else None


def _policy() -> str:
    policy = os.environ.get(ENV_POLICY, "wait").strip().lower() or "wait"
    if policy not in POLICIES:
        raise ConfigError(f"{ENV_POLICY}={policy}: choose from {', '.join(POLICIES)}")
    try:
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            return "off"
    except ValueError:
        pass
    return policy


def _say(text: str, always: bool = False) -> None:
    from signtrap.machine import progress

    if always or not progress.QUIET:
        print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def claim(threads: int = 0, *, key: str = "train.threads", stored: bool = False, wait: bool = True) -> Iterator[Claim]:
    """Hold cores of the budget for the block; yields the Claim (its `threads` is what to compute with).

    Sets OMP_NUM_THREADS / MKL_NUM_THREADS / OPENBLAS_NUM_THREADS to the claimed count for the block (for child
    processes and libraries initialised inside it); the caller sets its own pools (torch: provenance.cpu_threads).
    `wait=False` (light commands: the report) never waits, as `SIGNTRAP_CORES=share`."""
    threads = check_threads(threads, key, stored)
    with _lock:
        outer = claimed()
        if outer is not None:
            _state["depth"] += 1
    if outer is not None:  # nested: reuse the outer claim, never wait
        try:
            yield Claim(outer.cores, min(threads, outer.threads) if threads else outer.threads, outer.policy)
        finally:
            with _lock:
                _state["depth"] -= 1
        return
    policy = _policy()
    if not wait and policy == "wait":
        policy = "share"
    n = allowance()
    want = threads or min(n, _env_threads() or n)
    held = _acquire(want, exact=bool(threads), key=key, policy=policy)
    saved = {name: os.environ.get(name) for name in THREAD_ENV}
    with _lock:
        _state.update(pid=os.getpid(), claim=held, depth=1)
    os.environ.update({name: str(held.threads) for name in THREAD_ENV})
    try:
        yield held
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        with _lock:
            _state.update(pid=None, claim=None, depth=0)
        _release(held.fds)


def _acquire(want: int, exact: bool, key: str, policy: str) -> Claim:
    if policy == "off":
        return Claim([], want, policy)
    folder = _open_dir()
    if folder is None:
        _say("signtrap: no writable folder for the CPU core budget; running without one", always=True)
        return Claim([], want, "off")
    cpus = allowed_cpus()
    need = want if exact else 1
    start = time.monotonic()
    reminded = None
    while True:
        taken, busy = _take(folder, cpus, want, need if policy == "wait" else 0)
        if taken or policy == "share":
            break
        now = time.monotonic()
        if reminded is None or now - reminded >= REMIND_S:
            waited = f" (waiting {now - start:.0f} s)" if reminded is not None else ""
            what = f"{need} free CPU core{'s' if need > 1 else ''} ({key}={want})" if exact else "a free CPU core"
            _say(f"signtrap: waiting for {what}{waited}: {describe(busy)}; it starts when they are free "
                 f"(Ctrl-C stops it; {ENV_POLICY}=share runs now on fewer threads)", always=True)
            reminded = now
        time.sleep(POLL_S * (0.75 + 0.5 * random.random()))
    cores = [c for c, _ in taken]
    threads = want if exact and len(cores) == want else max(1, len(cores))
    waited = time.monotonic() - start
    if len(cores) < want:
        share = f"{len(cores)} of {len(cpus)}" if cores else "none of the"
        note = "; numbers may differ in the last bits from a run with all of them" if exact else ""
        _say(f"signtrap: {share} CPU cores free ({describe(busy)}); running on {threads} thread{'s' if threads > 1 else ''}{note}")
    elif reminded is not None:
        _say(f"signtrap: got {len(cores)} CPU core{'s' if len(cores) > 1 else ''} after waiting {waited:.0f} s", always=True)
    return Claim(cores, threads, policy, round(waited, 2), [fd for _, fd in taken])
