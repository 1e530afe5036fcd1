"""Uniform read-only access to a zip archive or an extracted folder, refusing zip-slip entries."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path, PurePosixPath

from signtrap.errors import DataError


def check_member_name(archive: Path, name: str) -> None:
    """Refuse entries that would escape an extraction root (absolute paths, drive letters, '..')."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":") or ".." in PurePosixPath(posix).parts:
        raise DataError(f"{archive}: refusing unsafe zip entry '{name}' (absolute path or '..': zip-slip)")


class ZipTree:
    """Files of a zip archive, by posix path relative to the archive root."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{self.path}: not a readable zip archive ({exc})") from None
        self._names = {}
        for info in self._zip.infolist():
            check_member_name(self.path, info.filename)
            if not info.is_dir():
                self._names[info.filename] = info

    def names(self) -> list[str]:
        return list(self._names)

    def read(self, name: str) -> bytes:
        try:
            return self._zip.read(self._names[name])
        except KeyError:
            raise DataError(f"{self.path}: missing entry '{name}'") from None
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise DataError(f"{self.path}: corrupt entry '{name}' ({exc})") from None

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def describe(self, name: str) -> str:
        return f"{self.path}:{name}"

    def close(self) -> None:
        self._zip.close()


class DirTree:
    """Files below a folder, by posix path relative to it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._names: set[str] | None = None

    def names(self) -> list[str]:
        if self._names is None:
            names = set()
            for dirpath, _, files in os.walk(self.path):
                rel = Path(dirpath).relative_to(self.path).as_posix()
                for f in files:
                    names.add(f if rel == "." else f"{rel}/{f}")
            self._names = names
        return list(self._names)

    def read(self, name: str) -> bytes:
        try:
            return (self.path / name).read_bytes()
        except FileNotFoundError:
            raise DataError(f"{self.path / name}: not found") from None

    def __contains__(self, name: str) -> bool:
        if self._names is not None:
            return name in self._names
        return (self.path / name).is_file()

    def describe(self, name: str) -> str:
        return str(self.path / name)

    def close(self) -> None:
        pass


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a zip after checking every entry name (used by `signtrap data fetch --extract`)."""
    tree = ZipTree(archive)  # validates all names
    dest = Path(dest).resolve()
    for name in tree.names():
        target = (dest / name).resolve()
        if dest not in target.parents:
            raise DataError(f"{archive}: refusing entry '{name}' outside {dest} (zip-slip)")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(tree.read(name))
    tree.close()
