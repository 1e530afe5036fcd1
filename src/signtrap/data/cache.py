"""Decode once: a uint8 image cache keyed by the source and the preprocessing settings, memory-mapped on load."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from signtrap.machine import progress as progress_mod
from signtrap.config import DataConfig
from signtrap.data.splits import Splits, track_split
from signtrap.datasets import TEST, TRAIN, LabelSpace, dataset_for
from signtrap.errors import DataError
from signtrap.fileio import atomic_dir, clean_orphans, require_writable, sha256_file, write_json

CACHE_VERSION = 3  # 2: meta.json records every file's size and SHA-256; 3: and the dataset's label space
ARRAYS = ("images", "labels", "tracks", "partition", "rois")
FILES = (*(f"{name}.npy" for name in ARRAYS), "files.txt")


@dataclass(frozen=True)
class SignData:
    """A prepared dataset: parallel arrays over rows, images uint8 (N, H, W, 3) RGB."""

    images: np.ndarray
    labels: np.ndarray  # int64
    tracks: np.ndarray  # int64; frames of one physical sign share a track
    partition: np.ndarray  # uint8: TRAIN (0) or TEST (1), the official partition
    rois: np.ndarray  # int32 (N, 4): sign box x1, y1, x2, y2 in image pixels
    path: Path
    meta: dict

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    @property
    def data_hash(self) -> str:
        return self.meta["data_hash"]

    @cached_property
    def files(self) -> list[str]:
        return (self.path / "files.txt").read_text(encoding="utf-8").splitlines()

    @cached_property
    def classes(self) -> LabelSpace:
        """The dataset's classes, default attack pair and normalisation, as recorded when the cache was built."""
        return LabelSpace.from_meta(self.meta["classes"])

    def splits(self, val_fraction: float, seed: int) -> Splits:
        pool = np.flatnonzero(self.partition == TRAIN)
        train, val = track_split(self.labels, self.tracks, pool, val_fraction, seed)
        return Splits(train, val, np.flatnonzero(self.partition == TEST))


def cache_key(cfg: DataConfig) -> str:
    dataset = dataset_for(cfg)
    settings = {"version": CACHE_VERSION, "source": cfg.source, "size": cfg.size, **dataset.fingerprint()}
    if dataset.cache_code:  # a generator: its code is part of what the arrays depend on
        settings["code"] = hashlib.sha256(b"".join(Path(f).read_bytes() for f in dataset.cache_code)).hexdigest()
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir) / f"{cfg.source}-{cfg.size}px-{cache_key(cfg)}"


def load(cfg: DataConfig, progress: bool = True, verify: bool = False) -> SignData:
    """Memory-map the cache for `cfg`, preparing it first when missing.

    Every load checks each file's size and array header against meta.json (cheap); `verify` also checks
    each file's SHA-256 recorded when the cache was written (a full read)."""
    path = cache_path(cfg)
    if not (path / "meta.json").is_file():
        prepare(cfg, progress=progress)
    return open_cache(path, verify=verify)


def _corrupt(path: Path, what: str) -> DataError:
    return DataError(f"{path}: corrupted data cache ({what}); rebuild it with `signtrap data prepare --force` "
                     "and the same data settings")


def open_cache(path: Path, verify: bool = False) -> SignData:
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _corrupt(path, f"meta.json unreadable: {type(exc).__name__}") from None
    recorded = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(recorded, dict) or set(recorded) != set(FILES) or not isinstance(meta.get("classes"), dict):
        raise _corrupt(path, "meta.json records no file hashes or classes: made by an older signtrap")
    for name in FILES:
        file = path / name
        size = file.stat().st_size if file.is_file() else None
        if size != recorded[name].get("bytes"):
            raise _corrupt(path, f"{name} is {'missing' if size is None else f'{size} bytes'}, "
                                 f"recorded {recorded[name].get('bytes')} bytes")
    try:
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
    except (OSError, ValueError) as exc:
        raise _corrupt(path, f"unreadable array: {exc}") from None
    if arrays["images"].ndim != 4 or len({len(a) for a in arrays.values()}) != 1 or len(arrays["labels"]) != meta.get("rows"):
        raise _corrupt(path, "array shapes disagree with each other or with meta.json")
    data = SignData(path=path, meta=meta, **arrays)
    if verify:
        verify_cache(data)
    return data


def verify_cache(data: SignData) -> None:
    """Check every cache file against the SHA-256 recorded when it was written (reads the whole cache)."""
    for name in FILES:
        if sha256_file(data.path / name) != data.meta["files"][name]["sha256"]:
            raise _corrupt(data.path, f"{name} does not match its SHA-256 recorded in meta.json")


def _file_records(folder: Path) -> dict:
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)} for name in FILES}


def prepare(cfg: DataConfig, progress: bool = True, force: bool = False) -> Path:
    path = cache_path(cfg)
    if (path / "meta.json").is_file() and not force:
        return path
    require_writable(cfg.cache_dir)  # before decoding anything
    clean_orphans(cfg.cache_dir)  # half-written caches of killed processes
    progress = progress and not progress_mod.QUIET
    start = time.perf_counter()
    dataset = dataset_for(cfg)
    decoded = dataset.decode(cfg.size, progress)
    space = decoded.labels_space or dataset.label_space()
    arrays = {name: getattr(decoded, name) for name in ARRAYS}
    files, extra = decoded.files, decoded.extra
    digest = hashlib.sha256()
    for name in ("images", "labels"):
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    counts = np.bincount(arrays["labels"], minlength=space.num_classes)
    meta = {
        "source": cfg.source,
        "size": cfg.size,
        "rows": int(len(arrays["labels"])),
        "train_rows": int((arrays["partition"] == TRAIN).sum()),
        "test_rows": int((arrays["partition"] == TEST).sum()),
        "class_counts": counts.tolist(),
        "data_hash": digest.hexdigest(),
        "classes": space.to_meta(),
        "prepare_seconds": round(time.perf_counter() - start, 2),
        **extra,
    }
    with atomic_dir(path, kind="cache") as tmp:
        for name in ARRAYS:
            np.save(tmp / f"{name}.npy", arrays[name])
        (tmp / "files.txt").write_text("\n".join(files) + "\n", encoding="utf-8")
        meta["files"] = _file_records(tmp)
        write_json(tmp / "meta.json", meta)
    return path
