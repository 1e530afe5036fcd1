"""GTSRB (Stallkamp et al. 2011): 43 German sign classes, from any layout a user downloaded (official or
torchvision zips, or their extracted trees); ROIs from the GT CSVs, scaled to the cached image."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from signtrap.machine import progress as progress_mod
from signtrap.config import require
from signtrap.data import gtsrb as archive
from signtrap.datasets import Dataset, Decoded, LabelSpace, register_dataset
from signtrap.errors import DataError

STOP, SPEED_LIMIT_100 = 14, 7

NAMES: tuple[str, ...] = (
    "Speed limit (20km/h)",
    "Speed limit (30km/h)",
    "Speed limit (50km/h)",
    "Speed limit (60km/h)",
    "Speed limit (70km/h)",
    "Speed limit (80km/h)",
    "End of speed limit (80km/h)",
    "Speed limit (100km/h)",
    "Speed limit (120km/h)",
    "No passing",
    "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection",
    "Priority road",
    "Yield",
    "Stop",
    "No vehicles",
    "Vehicles over 3.5 metric tons prohibited",
    "No entry",
    "General caution",
    "Dangerous curve to the left",
    "Dangerous curve to the right",
    "Double curve",
    "Bumpy road",
    "Slippery road",
    "Road narrows on the right",
    "Road work",
    "Traffic signals",
    "Pedestrians",
    "Children crossing",
    "Bicycles crossing",
    "Beware of ice/snow",
    "Wild animals crossing",
    "End of all speed and passing limits",
    "Turn right ahead",
    "Turn left ahead",
    "Ahead only",
    "Go straight or right",
    "Go straight or left",
    "Keep right",
    "Keep left",
    "Roundabout mandatory",
    "End of no passing",
    "End of no passing by vehicles over 3.5 metric tons",
)

KEYS: tuple[str, ...] = (
    "speed_20",
    "speed_30",
    "speed_50",
    "speed_60",
    "speed_70",
    "speed_80",
    "end_speed_80",
    "speed_100",
    "speed_120",
    "no_passing",
    "no_passing_trucks",
    "right_of_way",
    "priority_road",
    "yield",
    "stop",
    "no_vehicles",
    "no_trucks",
    "no_entry",
    "general_caution",
    "curve_left",
    "curve_right",
    "double_curve",
    "bumpy_road",
    "slippery_road",
    "road_narrows_right",
    "road_work",
    "traffic_signals",
    "pedestrians",
    "children_crossing",
    "bicycles_crossing",
    "ice_snow",
    "wild_animals",
    "end_all_limits",
    "turn_right",
    "turn_left",
    "ahead_only",
    "straight_or_right",
    "straight_or_left",
    "keep_right",
    "keep_left",
    "roundabout",
    "end_no_passing",
    "end_no_passing_trucks",
)

LABELS = LabelSpace(NAMES, KEYS, source=STOP, target=SPEED_LIMIT_100,
                    mean=(0.34, 0.31, 0.32), std=(0.27, 0.26, 0.27))  # GTSRB training-set channel statistics


@dataclass
class GTSRBSettings:
    root: str | None = None  # GTSRB archives or extracted tree; defaults to $SIGNTRAP_GTSRB
    roi: bool = False  # crop each image to its sign's box before resizing
    skip_corrupt: bool = False

    def check(self, key: str = "data") -> None:
        require(self.root is None or bool(str(self.root).strip()), f"{key}.root", "must be a folder")

    def resolved_root(self) -> str | None:
        return self.root or os.environ.get("SIGNTRAP_GTSRB")


@register_dataset("gtsrb", settings=GTSRBSettings)
class GTSRB(Dataset):
    """The real benchmark: 39,209 training images in ~1,300 tracks, 12,630 official test images."""

    def label_space(self) -> LabelSpace:
        return LABELS

    def root(self) -> Path:
        root = self.settings.resolved_root()
        if not root:
            raise DataError("data.source=gtsrb needs data.root=DIR or the SIGNTRAP_GTSRB environment variable")
        return Path(root).expanduser().resolve()

    def fingerprint(self) -> dict:
        s = self.settings
        return {"roi": s.roi, "skip_corrupt": s.skip_corrupt, "fingerprint": _fingerprint(self.root())}

    def decode(self, size: int, progress: bool) -> Decoded:
        root, s = self.root(), self.settings
        records = archive.find_records(root)
        images = np.empty((len(records), size, size, 3), np.uint8)
        rois = np.empty((len(records), 4), np.int32)
        keep = np.ones(len(records), bool)
        skipped: list[str] = []
        bar = progress_mod.progress(len(records), "decode GTSRB", enabled=progress)
        for i, record in enumerate(records):
            bar.update()
            try:
                images[i], rois[i] = archive.load_record(record, size, s.roi)
            except DataError as exc:
                if not s.skip_corrupt:
                    raise DataError(f"{exc} (use --skip-corrupt to continue without it)") from None
                keep[i] = False
                skipped.append(str(exc))
        bar.close()
        if skipped and progress:
            print(f"skipped {len(skipped)} corrupt or unreadable image(s); first: {skipped[0]}")
        kept = [r for r, k in zip(records, keep) if k]
        labels = np.array([r.label for r in kept], np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= LABELS.num_classes):
            raise DataError(f"{root}: labels outside 0..{LABELS.num_classes - 1} in the GT CSVs")
        return Decoded(images[keep], labels, np.array([r.track for r in kept], np.int64),
                       np.array([r.partition for r in kept], np.uint8), rois[keep], [r.where for r in kept],
                       {"root": str(root), "roi": s.roi, "skipped": len(skipped), "skipped_files": skipped[:100]})


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
