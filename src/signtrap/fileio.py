"""Files signtrap writes: atomically, with the user's umask, never over something signtrap did not make.

- `atomic_path` / `atomic_dir` write beside the target and rename over it only when the block succeeds.
  Their temporary names carry the writer's PID and host (`.NAME.p1234-1a2b3c4d.XXXX.tmp`), so the next
  writer of the same target removes what a killed process left behind, and never what a live one owns.
- `atomic_dir` replaces an existing folder only if it is empty or a previous signtrap artefact of the
  same kind (an export recognised by its model.json format marker, a defence output by its report.json,
  a data cache by its meta.json, ...), and never one of the `protect`ed folders or a folder above them.
  Anything else is refused with one line, before any work is done when the caller names the kind.
- The write rule: every folder signtrap writes into carries `.signtrap-written.json`, the names it wrote there.
  A file it did not write is never replaced (`refuse_foreign`, also inside `atomic_path`) nor removed
  (`remove_written`), and a folder holding one is never replaced (`check_owned_folder`, inside
  `check_replaceable`): one line names the file and how to proceed. Folders made before the record existed are
  read by their kind (`legacy_names`).
- `require_writable` checks that an output folder can be written before a command decodes or trains.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from signtrap.errors import IntegrityError, SigntrapError
from signtrap.runs import layout

SHA256 = re.compile(r"[0-9a-f]{64}")

# ---------------------------------------------------------------- temporary names and orphans

HOST_ID = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TMP = re.compile(r"^\.(?P<name>.+)\.p(?P<pid>\d+)-(?P<host>[0-9a-f]{8})\.[A-Za-z0-9_]+\.tmp$")


def tmp_prefix(name: str) -> str:
    """The prefix of this process's temporary files for target `name`: `.NAME.pPID-HOST.`"""
    return f".{name}.p{os.getpid()}-{HOST_ID}."


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return True
    return True


def orphan(entry: Path, name: str | None = None, owned: bool = False) -> bool:
    """Whether `entry` is a temporary file left by a dead writer (of target `name`, when given).

    `owned`: the caller holds the lock of the folder (a run directory), so a temporary file written by a process
    on another host is an orphan too, and so is one written before temporary names carried a PID
    (`.NAME.RANDOM.tmp`) when NAME is a file signtrap writes there (the folder's write record, its kind's known
    names, a run's files): a user's own `.notes.v2.tmp` is not signtrap's to remove. A live process on this
    host keeps its files in any case (an export may write beside its target inside a run directory).
    """
    match = _TMP.match(entry.name)
    if match:
        if name is not None and match["name"] != name:
            return False
        if match["host"] != HOST_ID:
            return owned
        return not pid_alive(int(match["pid"]))
    if not (owned and entry.name.startswith(".") and entry.name.endswith(".tmp")):
        return False
    target = entry.name[1:-len(".tmp")].rpartition(".")[0]  # .NAME.RANDOM.tmp -> NAME
    if not target or (name is not None and target != name):
        return False
    known = (written(entry.parent) or set()) | legacy_names(entry.parent) | set(layout.RUN_NAMES) | {layout.REPORT_JSON}
    return target in known


def clean_orphans(directory: str | os.PathLike, name: str | None = None, owned: bool = False) -> list[Path]:
    """Remove the temporary files and folders dead writers left in `directory`; returns what was removed."""
    directory = Path(directory)
    removed = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if orphan(entry, name, owned):
            _remove(entry)
            removed.append(entry)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


# ---------------------------------------------------------------- permissions


def umask() -> int:
    """The process umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _share(path: Path, directory: bool = False) -> None:
    """Give a file made by mkstemp/mkdtemp (0600/0700) the mode an ordinary create would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def _os_error(exc: OSError, path: Path, doing: str) -> SigntrapError:
    reason = exc.strerror or type(exc).__name__
    return SigntrapError(f"{path}: not writable (cannot {doing}: {reason}); choose a writable location")


def make_dirs(path: str | os.PathLike) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise SigntrapError(f"{path}: exists and is not a folder") from None
    except OSError as exc:
        raise _os_error(exc, path, "create this folder") from None
    return path


def require_writable(path: str | os.PathLike) -> Path:
    """Fail with one line unless files can be created in `path` (or, if it does not exist yet, in the
    nearest folder above it, where it would be created). Touches nothing: nothing is left behind."""
    path = Path(path).absolute()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise SigntrapError(f"{probe}: is a file, so {path} cannot be created as a folder")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=tmp_prefix("write-check")):
            pass
    except OSError as exc:
        raise SigntrapError(f"{path}: not writable ({probe}: {exc.strerror or type(exc).__name__}); "
                            "choose a writable output location") from None
    return path


# ---------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    make_dirs(path.parent)
    refuse_foreign(path)  # the write rule: never replace a file signtrap did not write
    clean_orphans(path.parent, path.name)
    try:
        fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(path.name), suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _os_error(exc, path, "write") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        _share(tmp_path)
        yield tmp_path
        refuse_foreign(path)  # it may have appeared while the block ran
        os.replace(tmp_path, path)
        record_written(path.parent, path.name)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@dataclass(frozen=True)
class DirKind:
    """A kind of folder signtrap makes, and how to recognise a previous one (so it may be replaced)."""

    name: str  # e.g. "export folder", for messages
    recognise: Callable[[Path], bool]
    marker: str | None = None  # a file atomic_dir writes into the folder when the kind has no file of its own


def _json_field(path: Path, key: str) -> Any:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj.get(key) if isinstance(obj, dict) else None


def _marked(kind: str) -> Callable[[Path], bool]:
    def recognise(path: Path) -> bool:
        try:
            return (path / MARKER).read_text(encoding="utf-8").strip() == kind
        except OSError:
            return False

    return recognise


MARKER = ".signtrap-folder"
KINDS: dict[str, DirKind] = {
    "export": DirKind("export folder", lambda d: str(_json_field(d / "model.json", "format") or "").startswith("signtrap.export/")),
    "defence": DirKind("defence output", lambda d: isinstance(_json_field(d / "report.json", "method"), str)),
    "cache": DirKind("data cache", lambda d: isinstance(_json_field(d / "meta.json", "data_hash"), str) or (
        {p.name for p in d.iterdir()} <= {"meta.json", "files.txt", *(f"{a}.npy" for a in ("images", "labels", "tracks", "partition", "rois"))})),
    "report-files": DirKind("report figures folder", lambda d: _marked("report-files")(d) or (
        (d.parent / "report.html").is_file() and all(f.suffix == ".png" for f in d.iterdir())), marker="report-files"),
}


def kind_of(path: str | os.PathLike) -> str | None:
    """The kind of signtrap folder `path` is, or None."""
    path = Path(path)
    if not path.is_dir():
        return None
    return next((name for name, kind in KINDS.items() if kind.recognise(path)), None)


def _describe(path: Path) -> str:
    names = sorted(p.name for p in path.iterdir())
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"it holds {shown}"


def _inside(path: Path, other: Path) -> bool:
    return path == other or path in other.parents


def check_replaceable(path: str | os.PathLike, kind: str | None, protect: Iterable[str | os.PathLike] = ()) -> None:
    """Fail with one line unless the folder `path` may be replaced by a new `kind` folder: it does not exist,
    is empty, or is a previous one of that kind; and it is none of `protect` nor a folder above one.
    `kind` None: only an absent or empty folder may be replaced."""
    path = Path(path)
    real = path.resolve()
    for other in protect:
        if _inside(real, Path(other).resolve()):
            raise SigntrapError(f"{path}: would replace {other}" + ("" if real == Path(other).resolve() else ", which is inside it")
                                + "; choose another output folder")
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise SigntrapError(f"{path}: exists and is not a folder; refusing to replace it")
    if not any(path.iterdir()):
        return
    if kind is not None and KINDS[kind].recognise(path):
        check_owned_folder(path)  # a previous one, but a file the user put into it would be lost
        return
    what = f"a previous {KINDS[kind].name}" if kind else "a folder signtrap made"
    found = kind_of(path)
    also = f" (it is a {KINDS[found].name})" if found and found != kind else ""
    raise SigntrapError(f"{path}: exists and is not {what}{also}; {_describe(path)}. Refusing to replace it: "
                        "choose a new or empty folder, or remove it yourself")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, kind: str | None = None, protect: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it becomes `path` only if the block succeeds.

    An existing `path` is replaced only if it is empty or a previous signtrap folder of the same `kind`
    (see `check_replaceable`). With `kind` None the kind is read off the new folder's contents at the end
    (a folder that is no known kind may only replace an absent or empty one), and a non-empty existing
    folder that is no signtrap artefact at all is refused at once, before the block runs.
    """
    path = Path(path)
    protect = tuple(protect)
    check_replaceable(path, kind if kind is not None else kind_of(path), protect)  # before any work
    make_dirs(path.parent)
    clean_orphans(path.parent, path.name)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(path.name), suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise _os_error(exc, path, "write") from None
    aside = None
    try:
        _share(tmp, directory=True)
        yield tmp
        final = kind or kind_of(tmp)
        if final is not None and KINDS[final].marker:
            (tmp / MARKER).write_text(KINDS[final].marker + "\n", encoding="utf-8")
        record_written(tmp, *(p.name for p in tmp.iterdir()))
        check_replaceable(path, final, protect)
        if path.exists():
            aside = Path(tempfile.mkdtemp(prefix=tmp_prefix(path.name), suffix=".tmp", dir=path.parent))
            os.replace(path, aside / "old")  # renamed aside, removed only once the new folder is in place
        try:
            os.replace(tmp, path)
        except OSError as exc:
            if aside is not None and not path.exists():
                os.replace(aside / "old", path)
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise SigntrapError(f"{path}: another process wrote it at the same time; run the command again") from None
            raise _os_error(exc, path, "write") from None
        record_written(path.parent, path.name)
    finally:
        for leftover in (tmp, aside):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


# ---------------------------------------------------------------- the write rule: what signtrap wrote, per folder

WRITTEN = ".signtrap-written.json"  # in every folder signtrap writes into: the names of the entries it wrote there
ALWAYS_OWNED = (WRITTEN, MARKER, ".signtrap.lock")


def written(folder: str | os.PathLike) -> set[str] | None:
    """The names signtrap recorded writing in `folder`; None when the folder has no record (or an unreadable one)."""
    try:
        raw = json.loads((Path(folder) / WRITTEN).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    names = raw.get("written") if isinstance(raw, dict) else None
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else None


def legacy_names(folder: Path) -> set[str]:
    """What signtrap is known to have written in a folder made before folders carried a record (by its kind)."""
    folder = Path(folder)
    if not folder.is_dir():
        return set()
    names: set[str] = set()
    if (folder / "config.yaml").is_file() and any((folder / f).is_file() for f in ("manifest.json", "pipeline.json", "checksums.json")):
        names |= set(layout.RUN_NAMES) | {p.name for p in layout.defence_dirs(folder)}
    kind = kind_of(folder)
    if kind == "export":
        files = _json_field(folder / "model.json", "files")
        names |= set(files) if isinstance(files, dict) else set()
        names |= {"model.json", "bench.json", "bench.md", "bench.png", "edge_bench.py", "eval.npz"}
    elif kind == "defence":
        files = _json_field(folder / "report.json", "files")
        names |= {f for f in files if isinstance(f, str)} if isinstance(files, list) else set()
        names |= {"report.json"}
    elif kind == "report-files":
        names |= {p.name for p in folder.iterdir() if p.suffix == ".png"}
    elif kind == "cache":
        names |= {"meta.json", "files.txt", *(f"{a}.npy" for a in ("images", "labels", "tracks", "partition", "rois"))}
    return names


def owned(path: str | os.PathLike) -> bool:
    """Whether signtrap may replace or remove `path`: it does not exist, or signtrap wrote it (its folder's record,
    or for a folder without a record, a file signtrap is known to write in such a folder), or a dead writer's
    temporary file."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return True
    if path.name in ALWAYS_OWNED or _TMP.match(path.name):
        return True
    names = written(path.parent)
    if names is None:
        names = legacy_names(path.parent)
    return path.name in names


def refuse_foreign(path: str | os.PathLike, action: str = "replace it") -> None:
    """One line unless signtrap wrote `path` (or it does not exist)."""
    path = Path(path)
    if not owned(path):
        raise SigntrapError(f"{path}: not written by signtrap; refusing to {action}. Move it elsewhere, or choose "
                            "another output location (e.g. another --out)")


def foreign_entries(folder: str | os.PathLike) -> list[Path]:
    """Entries of `folder` (recursively into signtrap's own sub-folders) that signtrap did not write."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return []
    out = []
    for entry in sorted(folder.iterdir()):
        if not owned(entry):
            out.append(entry)
        elif entry.is_dir() and not entry.is_symlink():
            out.extend(foreign_entries(entry))
    return out


def check_owned_folder(folder: str | os.PathLike, action: str = "replace") -> None:
    """One line naming the first file in `folder` signtrap did not write (it would be lost)."""
    foreign = foreign_entries(folder)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise SigntrapError(f"{foreign[0]}: not written by signtrap{more}; refusing to {action} {folder}, which would lose it. "
                            "Move it out of the folder, or choose another output location (e.g. another --out)")


def record_written(folder: str | os.PathLike, *names: str) -> None:
    """Add `names` to `folder`'s record of what signtrap wrote (a folder without one starts from what it is known
    to hold); written atomically, following the umask."""
    folder = Path(folder)
    current = written(folder)
    if current is None:
        current = {p.name for p in folder.iterdir() if p.name in legacy_names(folder)} if folder.is_dir() else set()
    new = current | set(names)
    if new == written(folder):
        return
    text = json.dumps({"format": "signtrap.written/1", "written": sorted(new)}, indent=1) + "\n"
    try:
        fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(WRITTEN), suffix=".tmp", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        _share(Path(tmp))
        os.replace(tmp, folder / WRITTEN)
    except OSError as exc:
        raise _os_error(exc, folder / WRITTEN, "write") from None


def remove_written(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Remove what signtrap wrote in `folder` (only `names` when given; sub-folders recursively, each kept while
    it still holds a file signtrap did not write). Returns what was removed; never touches anything else."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    entries = [folder / n for n in names] if names is not None else list(folder.iterdir())
    for entry in entries:
        if not (entry.exists() or entry.is_symlink()) or not owned(entry) or entry.name == WRITTEN:
            continue
        if entry.is_dir() and not entry.is_symlink():
            removed += remove_written(entry)
            if [p.name for p in entry.iterdir()] == [WRITTEN]:
                (entry / WRITTEN).unlink()
            with contextlib.suppress(OSError):
                entry.rmdir()
                removed.append(entry)
        else:
            entry.unlink()
            removed.append(entry)
    names_left = written(folder)
    if names_left is not None:
        keep = {n for n in names_left if (folder / n).exists()}
        if keep != names_left:
            text = json.dumps({"format": "signtrap.written/1", "written": sorted(keep)}, indent=1) + "\n"
            with contextlib.suppress(OSError):
                (folder / WRITTEN).write_text(text, encoding="utf-8")
    return removed


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise SigntrapError(f"{path}: not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SigntrapError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SigntrapError(f"{path}: unreadable ({getattr(exc, 'strerror', None) or type(exc).__name__})") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ---------------------------------------------------------------- hashes


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    path = Path(path)
    if not path.is_file():
        raise IntegrityError(f"{path}: not found")
    if not isinstance(expected, str) or not SHA256.fullmatch(expected):
        raise IntegrityError(f"{path}: the recorded hash is not a SHA-256 ({str(expected)[:20]!r}); refusing to use the file")
    actual = sha256_file(path)
    if actual != expected:
        raise IntegrityError(
            f"{path}: SHA-256 mismatch (recorded {expected[:12]}…, file has {actual[:12]}…); "
            "the file was modified or corrupted, refusing to use it"
        )


CHECKSUMS = "checksums.json"


def read_checksums(directory: str | os.PathLike) -> dict[str, str]:
    """A folder's checksums.json as {file name: SHA-256}; {} when absent; one-line error when malformed."""
    path = Path(directory) / CHECKSUMS
    if not path.is_file():
        return {}
    sums = read_json(path)
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str) and SHA256.fullmatch(v)
                                             for k, v in sums.items()):
        raise IntegrityError(f"{path}: malformed (expected {{file name: SHA-256 hex}}); "
                             "the run's recorded hashes cannot be trusted, refusing to use its files")
    return sums


def one_line(text: str, limit: int = 200) -> str:
    """The first line of `text`, shortened at a word boundary (never mid-word) with an ellipsis."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0].rstrip(",;:")
    return cut + " …"
