"""What a run directory holds, one notion for every command (train, run, sweep), and its lock.

A run directory is in one of these states, as seen by a config that wants to use it:

- `new`: absent, empty, or holding no trained epoch yet (a start that never finished an epoch);
- `resumable`: the same training config and an epoch checkpoint (last.pt) to continue from;
- `done`: the same training config and every file of a finished run, its model.pt matching checksums.json;
- `incomplete`: the same training config, a model.pt but not a finished run, and no last.pt to resume;
- `stale`: a trained model or epoch checkpoint made with a different training config;
- `locked`: another live process holds the run's lock (`in use by process N on HOST`);
- `foreign`: a folder that is not a signtrap run directory (signtrap writes nothing into it).

"The same training config" means the parsed configs agree on everything that shapes the trained model:
every setting except `runs_dir`, `name`, `defend` and `export` (`RunConfig.training_view`). A stored config.yaml is
read as the current code reads it, so a setting added since keeps its default and does not count.

The lock is an exclusive `flock` on `RUN/.signtrap.lock` (O_EXCL where flock is missing), holding the
holder's PID, host and command. The kernel drops it when its process dies, so a lock left by a killed
process is taken over by the next one. Under torchrun only rank 0 takes it. It is re-entrant within a
process (`signtrap run` holds it while its train stage takes it again).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from signtrap.config import RunConfig, flat, load_config, read_yaml
from signtrap.errors import SigntrapError
from signtrap.fileio import (CHECKSUMS, HOST_ID, KINDS, WRITTEN, clean_orphans, make_dirs, pid_alive,
                             read_checksums, read_json, remove_written, sha256_file, write_json)
from signtrap.runs import layout

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: O_EXCL lock files
    fcntl = None

LOCK_FILE = ".signtrap.lock"
EPOCH_CHECKPOINT = "last.pt"
# every file of a finished `signtrap train` run
FINISHED_FILES = ("config.yaml", "manifest.json", "provenance.json", "model.pt", CHECKSUMS, "metrics.json", "log.jsonl")
# what a run directory may hold that signtrap derives from its model (removed with the model by --overwrite)
DERIVED_FILES = ("pipeline.json", "report.html", "report.md", "probe.json", EPOCH_CHECKPOINT)
# what `attack.dormant` training adds (signtrap.attacks.dormant): the model before the repair, the repair's report
DORMANT_FILES = ("backdoored.pt", "sleeper.json")
ATTACK_REPORT = "attack.json"  # what an `attack.persist` procedure (signtrap.attacks) reports about itself
DERIVED_DIRS = {"export": "export", "report_files": "report-files"}  # folder -> kind; plus defence-* folders

NEW, RESUMABLE, DONE, INCOMPLETE, STALE, LOCKED, FOREIGN = "new", "resumable", "done", "incomplete", "stale", "locked", "foreign"


class RunLockedError(SigntrapError):
    """Another live process holds the run directory."""


# ---------------------------------------------------------------- the lock


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    command: str = ""
    started: str = ""

    def describe(self) -> str:
        what = f" ({self.command}, since {self.started})" if self.command else ""
        return f"process {self.pid} on host {self.host}{what}"


def _read_holder(path: Path) -> Holder | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8") or "null")
        return Holder(int(raw["pid"]), str(raw["host"]), str(raw.get("command", "")), str(raw.get("started", "")))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _holder_text(command: str) -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "host_id": HOST_ID, "command": command,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n"


class RunLock:
    """The exclusive lock of one run directory (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike, command: str = "signtrap"):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.command = command
        self.fd: int | None = None
        self.created_dir = False
        self.took_over: Holder | None = None

    def acquire(self) -> "RunLock":
        if self.run_dir.is_dir() and not (self.path.is_file() or is_run_dir(self.run_dir)) and any(self.run_dir.iterdir()):
            raise SigntrapError(f"{self.run_dir}: not a signtrap run directory (it holds "
                                f"{', '.join(sorted(p.name for p in self.run_dir.iterdir())[:3])}); signtrap will not write into it")
        self.created_dir = not self.run_dir.exists()
        make_dirs(self.run_dir)
        for _ in range(5):
            if self._try():
                clean_orphans(self.run_dir, owned=True)  # temporary files of killed writers: nobody else writes here
                for sub in self.run_dir.iterdir():
                    if sub.is_dir() and not sub.name.startswith("."):
                        clean_orphans(sub, owned=True)
                return self
        raise SigntrapError(f"{self.run_dir}: could not take the run's lock ({self.path} keeps changing)")

    def _try(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | (0 if fcntl else os.O_EXCL), 0o666)
        except FileExistsError:  # O_EXCL mode: a holder, alive or not
            holder = _read_holder(self.path)
            if holder is None or (holder.host == socket.gethostname() and not pid_alive(holder.pid)):
                self.took_over = holder
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                return False
            raise RunLockedError(f"{self.run_dir}: in use by {holder.describe()}; wait for it to finish or stop it") from None
        except OSError as exc:
            raise SigntrapError(f"{self.run_dir}: cannot lock the run directory ({exc.strerror}); "
                                "is it writable?") from None
        if fcntl:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                holder = _read_holder(self.path)
                who = holder.describe() if holder else "another process"
                raise RunLockedError(f"{self.run_dir}: in use by {who}; wait for it to finish or stop it") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the file was removed by a releasing holder after we opened it: lock the new one
                os.close(fd)
                return False
            previous = _read_holder(self.path)
            if previous and (previous.pid, previous.host) != (os.getpid(), socket.gethostname()):
                self.took_over = previous
        os.ftruncate(fd, 0)
        os.write(fd, _holder_text(self.command).encode())
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is None:
            return
        if fcntl is None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        os.close(self.fd)  # drops the flock
        self.fd = None


_HELD: dict[str, list] = {}  # resolved run dir -> [RunLock, depth]: this process's locks


def _key(run_dir: Path) -> str:
    return str(Path(run_dir).absolute().resolve())


@contextlib.contextmanager
def locked(run_dir: str | os.PathLike, command: str | None = None) -> Iterator[RunLock]:
    """Hold the run directory's lock for the block (re-entrant in one process).

    A folder this call created is removed again when the block leaves nothing in it but the lock (a
    command that failed validation leaves no run directory behind); so is its write record, then naming nothing."""
    run_dir = Path(run_dir)
    key = _key(run_dir)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield _HELD[key][0]
        finally:
            _HELD[key][1] -= 1
        return
    lock = RunLock(run_dir, command or " ".join(["signtrap", *sys.argv[1:2]]))
    lock.acquire()
    _HELD[key] = [lock, 1]
    try:
        yield lock
    finally:
        del _HELD[key]
        leftover = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
        if lock.created_dir and leftover <= {LOCK_FILE, WRITTEN}:  # the lock and, at most, an empty write record
            with contextlib.suppress(OSError):
                (run_dir / WRITTEN).unlink(missing_ok=True)
                lock.path.unlink()
                run_dir.rmdir()
        lock.release()


def lock_holder(run_dir: str | os.PathLike) -> Holder | None:
    """The live process (other than this one) holding the run's lock, or None."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    if _key(run_dir) in _HELD or not path.is_file():
        return None
    holder = _read_holder(path)
    if fcntl is None:
        alive = holder is not None and (holder.host != socket.gethostname() or pid_alive(holder.pid))
        return holder if alive else None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return holder or Holder(0, "?", "unknown holder")
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# ---------------------------------------------------------------- configs


def config_diff(a: RunConfig, b: RunConfig) -> list[str]:
    """'key: old -> new' for every training setting on which two configs disagree."""
    fa, fb = flat(a.training_view()), flat(b.training_view())
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def same_training(a: RunConfig, b: RunConfig) -> bool:
    return a.training_view() == b.training_view()


def stored_config(run_dir: str | os.PathLike) -> RunConfig:
    """The config stored in a run directory, read as the current code reads it."""
    return load_config(Path(run_dir) / "config.yaml")


def without_new_settings(now: Any, named: Any, read: Any) -> Any:
    """`now` (settings, nested dicts) without the keys that `named` (what an earlier signtrap recorded) does not name
    and whose value is the one `read` (what today's code reads for them there: their defaults) gives: the settings
    that version keyed a pipeline stage on, so that upgrading signtrap does not re-make a stage whose settings did
    not change."""
    if not isinstance(now, dict) or not isinstance(named, dict):
        return now
    out = {}
    for key, value in now.items():
        if key not in named:
            if isinstance(read, dict) and key in read and read[key] == value:
                continue  # a setting added since, left at its default
            out[key] = value
        else:
            out[key] = without_new_settings(value, named[key], read.get(key) if isinstance(read, dict) else None)
    return out


def view_before_new_settings(run_dir: str | os.PathLike, view: dict) -> dict | None:
    """`view` (a training view, `cfg.training_view()` and what else a stage keys on) without the settings signtrap
    gained after the run in `run_dir` was trained: those its stored config.yaml does not name, left at the value
    today's code reads for them from that file. None when config.yaml is unreadable."""
    try:
        raw = read_yaml(Path(run_dir) / "config.yaml")
        filled = stored_config(run_dir).training_view()
    except SigntrapError:
        return None
    return without_new_settings(view, raw, filled)


# ---------------------------------------------------------------- state


@dataclass(frozen=True)
class RunState:
    run_dir: Path
    status: str
    reason: str
    holder: Holder | None = None
    epochs_done: int = 0  # epochs in log.jsonl (what a resume continues from)
    diff: tuple[str, ...] = ()  # training settings that differ (stale)

    @property
    def done(self) -> bool:
        return self.status == DONE


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder signtrap made as a run directory: its config.yaml or its pipeline record."""
    path = Path(path)
    try:
        raw = read_yaml(path / "config.yaml") if (path / "config.yaml").is_file() else {}
    except SigntrapError:
        raw = {}
    if {"name", "attack", "train"} <= set(raw):
        return True
    try:
        return str(json.loads((path / "pipeline.json").read_text(encoding="utf-8")).get("format", "")).startswith("signtrap.runs.pipeline/")
    except (OSError, ValueError, AttributeError):
        return False


def record_remeasured(run_dir: str | os.PathLike, path: str | os.PathLike) -> bool:
    """After signtrap re-measured a model and rewrote `path` (a metrics.json inside `run_dir`), record its new SHA-256
    wherever a pipeline record lists it -- the run's own pipeline.json and, for a zero-poison twin `NAME-zero`, the
    record of the run `NAME` whose `reference` stage trained it -- so that `signtrap run` finds those stages intact
    instead of re-making them (retraining the model) as if the file were corrupted. A measurement is not what a later
    stage builds on (`signtrap.runs.pipeline.MEASUREMENTS`), so no other stage is re-run for it. Call it under the
    run's lock; the twin's run is locked here (when another command holds it, its record is left as it is, with a
    warning: its pipeline will re-make the twin). Returns whether a record was updated."""
    run_dir, path = Path(run_dir), Path(path)
    changed = _rehash_listed(run_dir, path)
    name, suffix = run_dir.name, layout.REFERENCE_SUFFIX
    parent = run_dir.parent / name[:-len(suffix)] if name.endswith(suffix) and len(name) > len(suffix) else None
    if parent is not None and layout.reference_dir(parent) == run_dir and (parent / layout.PIPELINE).is_file():
        try:
            with locked(parent, "signtrap eval"):
                changed = _rehash_listed(parent, path) or changed
        except RunLockedError as exc:
            print(f"signtrap: warning: {exc}; its next `signtrap run` re-makes the reference {name}", file=sys.stderr)
    return changed


def _rehash_listed(run_dir: Path, path: Path) -> bool:
    """Store the current SHA-256 of `path` in every stage of run_dir/pipeline.json that lists it (paths relative to
    the run, `../NAME-zero/...` for its twin, as the pipeline records them)."""
    record_path = run_dir / layout.PIPELINE
    if not record_path.is_file():
        return False
    try:
        record = read_json(record_path)
        stages = record["stages"]
        rel = layout.recorded_name(run_dir, path)
    except (SigntrapError, KeyError, TypeError, ValueError):
        return False  # an unreadable record: the pipeline itself starts a fresh one
    changed = False
    for rec in stages.values() if isinstance(stages, dict) else ():
        outputs = rec.get("outputs") if isinstance(rec, dict) else None
        if isinstance(outputs, dict) and rel in outputs:
            outputs[rel] = sha256_file(path)
            changed = True
    if changed:
        write_json(record_path, record)
    return changed


def finished(run_dir: str | os.PathLike) -> str | None:
    """None when `run_dir` holds every file of a finished run and model.pt matches its recorded hash; else why not."""
    run_dir = Path(run_dir)
    missing = [f for f in FINISHED_FILES if not (run_dir / f).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    try:
        sums = read_checksums(run_dir)
    except SigntrapError as exc:
        return str(exc)
    if sums.get("model.pt") != sha256_file(run_dir / "model.pt"):
        return "model.pt does not match its hash in checksums.json"
    return None


def _epochs_logged(run_dir: Path) -> int:
    try:
        return sum(1 for line in (run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines() if line.strip())
    except OSError:
        return 0


def inspect(run_dir: str | os.PathLike, cfg: RunConfig | None = None) -> RunState:
    """The state of `run_dir` for a command that wants to train `cfg` there (cfg None: the stored config)."""
    run_dir = Path(run_dir)
    entries = [p.name for p in run_dir.iterdir()] if run_dir.is_dir() else []
    if run_dir.exists() and not run_dir.is_dir():
        return RunState(run_dir, FOREIGN, f"{run_dir} is a file, not a run directory")
    holder = lock_holder(run_dir) if entries else None
    if holder is not None:
        return RunState(run_dir, LOCKED, f"in use by {holder.describe()}", holder=holder)
    if not [e for e in entries if e not in (LOCK_FILE, WRITTEN) and not e.endswith(".tmp")]:
        return RunState(run_dir, NEW, "empty" if entries else "does not exist yet")
    if not is_run_dir(run_dir):
        return RunState(run_dir, FOREIGN, f"{run_dir} is not a signtrap run directory (it holds {', '.join(sorted(entries)[:3])}"
                                          f"{', ...' if len(entries) > 3 else ''}); signtrap will not write into it")
    has_model, has_last = (run_dir / "model.pt").is_file(), (run_dir / EPOCH_CHECKPOINT).is_file()
    if not has_model and not has_last:
        return RunState(run_dir, NEW, "holds no trained epoch yet")
    epochs = _epochs_logged(run_dir)
    try:
        stored = stored_config(run_dir)
    except SigntrapError as exc:
        return RunState(run_dir, STALE, f"its config.yaml no longer loads ({exc})", epochs_done=epochs)
    if cfg is not None and not same_training(stored, cfg):
        diff = tuple(config_diff(stored, cfg))
        shown = "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
        return RunState(run_dir, STALE, f"holds a run trained with a different config ({shown})", epochs_done=epochs, diff=diff)
    why_not = finished(run_dir)
    if why_not is None:
        return RunState(run_dir, DONE, "finished (model.pt matches its recorded hash)", epochs_done=epochs)
    if has_last:
        return RunState(run_dir, RESUMABLE, f"interrupted after epoch {epochs} (last.pt)", epochs_done=epochs)
    return RunState(run_dir, INCOMPLETE, f"holds model.pt but not a finished run ({why_not}) and no last.pt to resume from",
                    epochs_done=epochs)


def decide(state: RunState, resume: bool = False, overwrite: bool = False) -> str:
    """What `signtrap train` does with a run directory in `state`: 'fresh', 'resume' or 'nothing'; raises
    a one-line error where it must not touch it (the user has to say --resume or --overwrite)."""
    d, why = state.run_dir, state.reason
    if resume and overwrite:
        raise SigntrapError("--resume and --overwrite contradict each other; pass one of them")
    if state.status == LOCKED:
        raise RunLockedError(f"{d}: {why}; wait for it to finish or stop it")
    if state.status == FOREIGN:
        raise SigntrapError(f"{why}; choose another run name or runs_dir")
    if state.status == NEW:
        if resume:
            raise SigntrapError(f"{d}: nothing to resume (no last.pt); run it without --resume to start it")
        return "fresh"
    if overwrite:
        return "fresh"
    if state.status == RESUMABLE:
        if resume:
            return "resume"
        raise SigntrapError(f"{d}: {why}; pass --resume to continue it or --overwrite to start it again")
    if state.status == DONE:
        if resume:
            return "nothing"
        raise SigntrapError(f"{d}: already holds a trained model; pass --overwrite to replace it")
    if state.status == STALE:
        if resume:
            raise SigntrapError(f"{d}: --resume with a different config than the stored config.yaml: {why}")
        raise SigntrapError(f"{d}: {why}; pass --overwrite to replace it, or choose another run name")
    raise SigntrapError(f"{d}: {why}; pass --overwrite to train it again")


def derived_folders(run_dir: str | os.PathLike) -> list[Path]:
    """The folders of a run directory signtrap derives from its model: export, report_files, defence-*."""
    run_dir = Path(run_dir)
    folders = [(run_dir / name, kind) for name, kind in DERIVED_DIRS.items()]
    folders += [(p, "defence") for p in layout.defence_dirs(run_dir)]
    return [path for path, kind in folders if path.is_dir() and KINDS[kind].recognise(path)]


def clear_run(run_dir: str | os.PathLike) -> list[Path]:
    """Remove what signtrap made in a run directory (its files, defence outputs, export, report, probe.json), for
    --overwrite: only files signtrap wrote (signtrap.fileio's record); anything else stays where it is, and so
    does the folder holding it. The caller holds the lock."""
    run_dir = Path(run_dir)
    names = [n for n in (*FINISHED_FILES, *DERIVED_FILES, *DORMANT_FILES, ATTACK_REPORT) if (run_dir / n).is_file()]
    names += sorted(p.name for p in run_dir.glob(layout.probe_file("*")) if p.is_file())  # probes at other settings
    names += [p.name for p in derived_folders(run_dir)]
    return remove_written(run_dir, names)
