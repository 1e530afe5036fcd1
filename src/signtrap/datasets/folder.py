"""Your own signs: images in one folder per class (any resolution, any format OpenCV reads), optionally with boxes.

Layout: `root/CLASS/*.png|jpg|ppm|...` (a seeded, stratified `test_fraction` of each class becomes the test
partition), or `root/train/CLASS/...` plus `root/test/CLASS/...`. Class ids follow the sorted folder names;
the folder names are the class names configs use (`attack.source: stop`). Boxes: `root/boxes.csv` (or
`boxes=FILE`), `;`-separated with a header `file;x1;y1;x2;y2`, `file` relative to root, pixels of the original
image, x2 and y2 exclusive; an image without a row is its own box. Every image is its own track unless
`track_pattern` (a regex whose first group names the track, matched against the file name) groups frames of
one physical sign, so validation can hold whole signs out. Normalisation: the training images' channel
statistics, measured when the cache is built.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from signtrap.machine import progress as progress_mod
from signtrap.config import require
from signtrap.data.decode import crop_and_resize, decode_image
from signtrap.datasets import TEST, TRAIN, Dataset, Decoded, LabelSpace, register_dataset, slug
from signtrap.errors import DataError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".webp", ".tif", ".tiff")
SPLIT_STREAM = 0xF01D


@dataclass
class FolderSettings:
    root: str | None = None  # the folder of class folders (required)
    test_fraction: float = 0.2  # per class, when root has no train/ and test/ folders
    split_seed: int = 0
    boxes: str | None = None  # box CSV; default root/boxes.csv when present
    crop: bool = False  # crop each image to its box before resizing
    track_pattern: str | None = None  # regex; its first group, matched on the file name, names the image's track
    source: str | None = None  # default attack source class (folder name); default: 'stop' if present, else the first
    target: str | None = None  # default attack target; default: 'speed_100' if present, else the next class

    def check(self, key: str = "data") -> None:
        require(bool(self.root), f"{key}.root", "data.source=folder needs data.root=DIR (one folder per class)")
        require(0.0 < self.test_fraction < 1.0, f"{key}.test_fraction", f"{self.test_fraction} is outside (0, 1)")
        if self.track_pattern is not None:
            try:
                pattern = re.compile(self.track_pattern)
            except re.error as exc:
                raise DataError(f"config {key}.track_pattern: not a regular expression ({exc})") from None
            require(pattern.groups >= 1, f"{key}.track_pattern", "needs a group naming the track, e.g. '^(\\d+)_'")


@register_dataset("folder", settings=FolderSettings)
class Folder(Dataset):
    """Images in class folders."""

    def _root(self) -> Path:
        root = Path(str(self.settings.root)).expanduser().resolve()
        if not root.is_dir():
            raise DataError(f"{root}: image folder not found (data.root must hold one folder per class)")
        return root

    def _partitions(self) -> list[tuple[int | None, Path]]:
        root = self._root()
        if (root / "train").is_dir() and (root / "test").is_dir():
            return [(TRAIN, root / "train"), (TEST, root / "test")]
        return [(None, root)]  # split per class by test_fraction

    def class_folders(self) -> list[str]:
        names: set[str] = set()
        for _, base in self._partitions():
            names.update(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not names:
            raise DataError(f"{self._root()}: no class folders (expected root/CLASS/image files)")
        return sorted(names)

    def label_space(self) -> LabelSpace:
        names = tuple(self.class_folders())
        if len(names) < 2:
            raise DataError(f"{self._root()}: {len(names)} class folder; a classifier needs at least 2")
        keys = tuple(slug(n) or f"class_{i}" for i, n in enumerate(names))
        if len(set(keys)) != len(keys):
            raise DataError(f"{self._root()}: class folder names collide once lower-cased ({', '.join(names)})")
        s = self.settings

        def pick(wanted: str | None, fallback: str, avoid: int | None) -> int:
            if wanted is not None:
                if slug(wanted) not in keys:
                    raise DataError(f"config data.source/target: '{wanted}' is not a class folder of {self._root()}")
                return keys.index(slug(wanted))
            if fallback in keys and keys.index(fallback) != avoid:
                return keys.index(fallback)
            return next(i for i in range(len(keys)) if i != avoid)

        source = pick(s.source, "stop", None)
        target = pick(s.target, "speed_100", source)
        return LabelSpace(names, keys, source, target)

    def fingerprint(self) -> dict:
        """Every file's name, size and modification time, and the settings that shape the arrays."""
        root, entries = self._root(), []
        for dirpath, _, files in os.walk(root):
            for name in files:
                stat = os.stat(os.path.join(dirpath, name))
                entries.append((os.path.relpath(os.path.join(dirpath, name), root), stat.st_size, stat.st_mtime_ns))
        s = self.settings
        settings = {"root": str(root), "test_fraction": s.test_fraction, "split_seed": s.split_seed, "boxes": s.boxes,
                    "crop": s.crop, "track_pattern": s.track_pattern, "source": s.source, "target": s.target}
        return {**settings, "files": hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()}

    def _images(self, names: list[str]) -> list[tuple[Path, int, int | None]]:
        """(file, class id, partition or None) for every image, in a fixed order; a class without images is an error."""
        found: list[tuple[Path, int, int | None]] = []
        for partition, base in self._partitions():
            for cid, name in enumerate(names):
                folder = base / name
                files = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS) if folder.is_dir() else []
                if not files and (partition in (None, TRAIN)):
                    raise DataError(f"{folder}: class '{name}' has no images ({', '.join(EXTENSIONS)})")
                found.extend((f, cid, partition) for f in files)
        return found

    def _boxes(self) -> dict[str, tuple[int, int, int, int]]:
        root, s = self._root(), self.settings
        path = Path(s.boxes).expanduser() if s.boxes else root / "boxes.csv"
        if not path.is_absolute():
            path = root / path
        if not path.is_file():
            if s.boxes:
                raise DataError(f"{path}: box file not found")
            return {}
        boxes = {}
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter=";")
            if reader.fieldnames is None or not {"file", "x1", "y1", "x2", "y2"} <= set(reader.fieldnames):
                raise DataError(f"{path}: box file needs a header file;x1;y1;x2;y2")
            for line, row in enumerate(reader, start=2):
                try:
                    box = tuple(int(float(row[k])) for k in ("x1", "y1", "x2", "y2"))
                except (TypeError, ValueError):
                    raise DataError(f"{path}:{line}: box coordinates must be numbers") from None
                boxes[str(Path(row["file"]))] = box
        return boxes

    def decode(self, size: int, progress: bool) -> Decoded:
        root, s = self._root(), self.settings
        space = self.label_space()
        items = self._images(list(space.names))
        boxes = self._boxes()
        known = {str(f.relative_to(root)) for f, _, _ in items}
        for name in boxes:
            if name not in known:
                raise DataError(f"box file: '{name}' is not an image under {root}")
        images = np.empty((len(items), size, size, 3), np.uint8)
        rois = np.empty((len(items), 4), np.int32)
        bar = progress_mod.progress(len(items), "decode images", enabled=progress)
        for i, (file, _, _) in enumerate(items):
            bar.update()
            rel = str(file.relative_to(root))
            try:
                image = decode_image(file.read_bytes(), rel)
            except OSError as exc:
                raise DataError(f"{file}: unreadable ({exc.strerror or exc})") from None
            h, w = image.shape[:2]
            x1, y1, x2, y2 = boxes.get(rel, (0, 0, w, h))
            if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
                raise DataError(f"{file}: box ({x1}, {y1}, {x2}, {y2}) lies outside the {w}x{h} image")
            if s.crop:
                images[i] = crop_and_resize(image, (x1, y1, x2, y2), size)
                rois[i] = (0, 0, size, size)
            else:
                images[i] = crop_and_resize(image, None, size)
                sx, sy = size / w, size / h
                rois[i] = (int(x1 * sx), int(y1 * sy), max(int(x1 * sx) + 1, round(x2 * sx)), max(int(y1 * sy) + 1, round(y2 * sy)))
        bar.close()
        labels = np.array([c for _, c, _ in items], np.int64)
        partition = self._split(items, labels)
        tracks = self._tracks(items)
        train = images[partition == TRAIN].reshape(-1, 3).astype(np.float64) / 255.0
        mean = tuple(round(float(v), 4) for v in train.mean(0))
        std = tuple(round(max(float(v), 1e-3), 4) for v in train.std(0))
        space = LabelSpace(space.names, space.keys, space.source, space.target, mean, std)
        return Decoded(images, labels, tracks, partition, rois, [str(f.relative_to(root)) for f, _, _ in items],
                       {"root": str(root), "boxes": len(boxes)}, space)

    def _split(self, items: list, labels: np.ndarray) -> np.ndarray:
        fixed = np.array([TRAIN if p is None else p for _, _, p in items], np.uint8)
        if items and items[0][2] is not None:
            return fixed
        rng = np.random.default_rng([self.settings.split_seed, SPLIT_STREAM])
        partition = np.full(len(items), TRAIN, np.uint8)
        for c in np.unique(labels):
            rows = np.flatnonzero(labels == c)
            n_test = int(round(self.settings.test_fraction * len(rows)))
            if len(rows) >= 2:
                partition[rng.choice(rows, size=min(max(1, n_test), len(rows) - 1), replace=False)] = TEST
        return partition

    def _tracks(self, items: list) -> np.ndarray:
        if self.settings.track_pattern is None:
            return np.arange(len(items), dtype=np.int64)
        pattern, ids, out = re.compile(self.settings.track_pattern), {}, []
        for file, cid, _ in items:
            match = pattern.search(file.name)
            key = (cid, match.group(1)) if match else (cid, str(file))
            out.append(ids.setdefault(key, len(ids)))
        return np.asarray(out, np.int64)


__all__ = ["Folder", "FolderSettings"]
