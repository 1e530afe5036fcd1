"""Decode once: a uint8 image cache keyed by the source and the preprocessing settings, memory-mapped on load."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from signtrap import progress as progress_mod
from signtrap.classes import NUM_CLASSES
from signtrap.config import DataConfig
from signtrap.data import gtsrb, synth
from signtrap.data.splits import Splits, track_split
from signtrap.errors import DataError
from signtrap.fileio import atomic_dir, clean_orphans, require_writable, sha256_file, write_json

CACHE_VERSION = 2  # 2: meta.json records every file's size and SHA-256
TRAIN, TEST = gtsrb.TRAIN, gtsrb.TEST
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

    def splits(self, val_fraction: float, seed: int) -> Splits:
        pool = np.flatnonzero(self.partition == TRAIN)
        train, val = track_split(self.labels, self.tracks, pool, val_fraction, seed)
        return Splits(train, val, np.flatnonzero(self.partition == TEST))


def cache_key(cfg: DataConfig) -> str:
    settings = {"version": CACHE_VERSION, "source": cfg.source, "size": cfg.size}
    if cfg.source == "gtsrb":
        root = _gtsrb_root(cfg)
        settings.update(roi=cfg.roi, skip_corrupt=cfg.skip_corrupt, fingerprint=_fingerprint(root))
    else:
        code = hashlib.sha256(Path(synth.__file__).read_bytes()).hexdigest()
        settings.update(per_class=cfg.synth_per_class, test_per_class=cfg.synth_test_per_class, seed=cfg.synth_seed, code=code)
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
    if not isinstance(recorded, dict) or set(recorded) != set(FILES):
        raise _corrupt(path, "meta.json records no file hashes: made by an older signtrap")
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
    if cfg.source == "gtsrb":
        arrays, files, extra = _decode_gtsrb(cfg, progress)
    else:
        arrays, files, extra = _generate_synth(cfg, progress)
    digest = hashlib.sha256()
    for name in ("images", "labels"):
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    counts = np.bincount(arrays["labels"], minlength=NUM_CLASSES)
    meta = {
        "source": cfg.source,
        "size": cfg.size,
        "rows": int(len(arrays["labels"])),
        "train_rows": int((arrays["partition"] == TRAIN).sum()),
        "test_rows": int((arrays["partition"] == TEST).sum()),
        "class_counts": counts.tolist(),
        "data_hash": digest.hexdigest(),
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


def _gtsrb_root(cfg: DataConfig) -> Path:
    root = cfg.resolved_root()
    if not root:
        raise DataError("data.source=gtsrb needs data.root=DIR or the SIGNTRAP_GTSRB environment variable")
    return Path(root).expanduser().resolve()


def _fingerprint(root: Path) -> list:
    """Names, sizes and modification times of everything under root: cheap, and changes when the data does."""
    if not root.is_dir():
        raise DataError(f"{root}: GTSRB folder not found (run `signtrap data fetch --root {root}` or set data.root)")
    entries = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            stat = os.stat(os.path.join(dirpath, name))
            entries.append((os.path.relpath(os.path.join(dirpath, name), root), stat.st_size, stat.st_mtime_ns))
    return [str(root), hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()]


def _decode_gtsrb(cfg: DataConfig, progress: bool):
    root = _gtsrb_root(cfg)
    records = gtsrb.find_records(root)
    size = cfg.size
    images = np.empty((len(records), size, size, 3), np.uint8)
    rois = np.empty((len(records), 4), np.int32)
    keep = np.ones(len(records), bool)
    skipped: list[str] = []
    bar = progress_mod.progress(len(records), "decode GTSRB", enabled=progress)
    for i, record in enumerate(records):
        bar.update()
        try:
            images[i], rois[i] = gtsrb.load_record(record, size, cfg.roi)
        except DataError as exc:
            if not cfg.skip_corrupt:
                raise DataError(f"{exc} (use --skip-corrupt to continue without it)") from None
            keep[i] = False
            skipped.append(str(exc))
    bar.close()
    if skipped and progress:
        print(f"skipped {len(skipped)} corrupt or unreadable image(s); first: {skipped[0]}")
    kept = [r for r, k in zip(records, keep) if k]
    arrays = {
        "images": images[keep],
        "labels": np.array([r.label for r in kept], np.int64),
        "tracks": np.array([r.track for r in kept], np.int64),
        "partition": np.array([r.partition for r in kept], np.uint8),
        "rois": rois[keep],
    }
    if arrays["labels"].size and (arrays["labels"].min() < 0 or arrays["labels"].max() >= NUM_CLASSES):
        raise DataError(f"{root}: labels outside 0..{NUM_CLASSES - 1} in the GT CSVs")
    files = [r.where for r in kept]
    return arrays, files, {"root": str(root), "roi": cfg.roi, "skipped": len(skipped), "skipped_files": skipped[:100]}


def _generate_synth(cfg: DataConfig, progress: bool):
    parts = [
        (TRAIN, synth.generate(cfg.synth_per_class, seed=cfg.synth_seed, size=cfg.size, progress=progress)),
        (TEST, synth.generate(cfg.synth_test_per_class, seed=cfg.synth_seed + 1_000_003, size=cfg.size, progress=progress)),
    ]
    images = np.concatenate([b.images for _, b in parts])
    labels = np.concatenate([b.labels for _, b in parts]).astype(np.int64)
    partition = np.concatenate([np.full(len(b.labels), p, np.uint8) for p, b in parts])
    # each synthetic image is an independent scene, so it is its own track
    tracks = np.arange(len(labels), dtype=np.int64)
    files = [f"synth:{'train' if p == TRAIN else 'test'}/{c:02d}/{i}" for p, b in parts for i, c in enumerate(b.labels)]
    arrays = {"images": images, "labels": labels, "tracks": tracks, "partition": partition,
              "rois": np.concatenate([b.rois for _, b in parts]).astype(np.int32)}
    return arrays, files, {"synth_seed": cfg.synth_seed, "per_class": cfg.synth_per_class, "test_per_class": cfg.synth_test_per_class}
