"""Real GTSRB from whatever a user downloaded: official or torchvision zips, or their extracted trees.

Labels come from the GT CSVs; images are decoded once by `signtrap.data.cache`.
"""
from __future__ import annotations

import csv
import io
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import numpy as np

from signtrap.data.archive import DirTree, ZipTree
from signtrap.data.decode import crop_and_resize, decode_image
from signtrap.errors import DataError

Tree = Union[ZipTree, DirTree]

TRAIN_ZIPS = ("GTSRB_Final_Training_Images.zip", "GTSRB-Training_fixed.zip")
TEST_IMAGES_ZIP = "GTSRB_Final_Test_Images.zip"
TEST_GT_ZIP = "GTSRB_Final_Test_GT.zip"
TEST_GT_CSV = "GT-final_test.csv"

_TRAIN_ENTRY = re.compile(r"^(?P<dir>(?:.*/)?GTSRB/(?:Training|Final_Training/Images)/(?P<cls>\d{5}))/(?P<file>[^/]+)$")
_TEST_ENTRY = re.compile(r"^(?P<dir>(?:.*/)?GTSRB/Final_Test/Images)/(?P<file>[^/]+\.ppm)$")
_TRACK = re.compile(r"^(\d+)_\d+\.\w+$")

TRAIN, TEST = 0, 1


@dataclass(frozen=True)
class Record:
    tree: Tree
    name: str  # entry inside the tree
    label: int
    track: int
    partition: int  # TRAIN or TEST (the official partition)
    declared_size: tuple[int, int]  # CSV Width, Height of the original image
    roi: tuple[int, int, int, int]  # CSV Roi.X1, Roi.Y1, Roi.X2, Roi.Y2 (inclusive), original coordinates

    @property
    def where(self) -> str:
        return self.tree.describe(self.name)


def open_trees(root: Path) -> list[Tree]:
    """Every archive or extracted tree under `root` (or torchvision's `root/gtsrb`) that may hold GTSRB."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: GTSRB folder not found (run `signtrap data fetch --root {root}` or set data.root)")
    bases = [root] + ([root / "gtsrb"] if (root / "gtsrb").is_dir() else [])
    trees: list[Tree] = []
    for base in bases:
        for zip_name in (*TRAIN_ZIPS, TEST_IMAGES_ZIP, TEST_GT_ZIP):
            if (base / zip_name).is_file():
                trees.append(ZipTree(base / zip_name))
        if (base / "GTSRB").is_dir() or (base / TEST_GT_CSV).is_file():
            trees.append(DirTree(base))
    return trees


def find_records(root: Path) -> list[Record]:
    trees = open_trees(root)
    train = _train_records(trees, root)
    test = _test_records(trees, root)
    if not train:
        raise DataError(
            f"{root}: no GTSRB training images found; expected {' or '.join(TRAIN_ZIPS)}, "
            "or an extracted GTSRB/Training/000NN/ or GTSRB/Final_Training/Images/000NN/ tree"
        )
    return train + test


def _csv_rows(tree: Tree, name: str) -> Iterator[dict]:
    text = tree.read(name).decode("utf-8-sig", errors="replace")
    reader = csv.DictReader(io.StringIO(text), delimiter=";")
    expected = {"Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"}
    if reader.fieldnames is None or not expected <= set(reader.fieldnames):
        raise DataError(f"{tree.describe(name)}: not a GTSRB annotation CSV (columns {reader.fieldnames})")
    for line, row in enumerate(reader, start=2):
        try:
            row["_box"] = tuple(int(row[k]) for k in ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"))
            row["_size"] = (int(row["Width"]), int(row["Height"]))
            row["_label"] = int(row["ClassId"]) if row.get("ClassId") not in (None, "") else -1
        except (TypeError, ValueError):
            raise DataError(f"{tree.describe(name)}: malformed row at line {line}") from None
        yield row


def _train_records(trees: list[Tree], root: Path) -> list[Record]:
    folders: dict[tuple[int, str], set[str]] = defaultdict(set)
    owner: dict[tuple[int, str], Tree] = {}
    for index, tree in enumerate(trees):
        for name in tree.names():
            match = _TRAIN_ENTRY.match(name)
            if match:
                folders[(index, match["dir"])].add(match["file"])
                owner[(index, match["dir"])] = tree
    records: list[Record] = []
    seen_classes: set[int] = set()
    for (index, folder), files in sorted(folders.items()):
        tree = owner[(index, folder)]
        class_id = int(folder.rsplit("/", 1)[-1])
        if class_id in seen_classes:
            continue  # the same class in a second copy (zip and extracted tree): read it once
        csv_name = f"GT-{class_id:05d}.csv"
        if csv_name not in files:
            raise DataError(f"{tree.describe(folder)}: class folder has no {csv_name} (labels come from it)")
        seen_classes.add(class_id)
        for row in _csv_rows(tree, f"{folder}/{csv_name}"):
            filename = row["Filename"]
            if filename not in files:
                raise DataError(f"{tree.describe(folder + '/' + csv_name)}: row points at missing file '{filename}'")
            track = _TRACK.match(filename)
            label = row["_label"] if row["_label"] >= 0 else class_id
            records.append(
                Record(tree, f"{folder}/{filename}", label, class_id * 100_000 + (int(track[1]) if track else 0),
                       TRAIN, row["_size"], row["_box"])
            )
    return records


def _test_records(trees: list[Tree], root: Path) -> list[Record]:
    images: dict[str, tuple[Tree, str]] = {}
    gt: tuple[Tree, str] | None = None
    for tree in trees:
        for name in tree.names():
            match = _TEST_ENTRY.match(name)
            if match:
                images.setdefault(match["file"], (tree, name))
            elif name.rsplit("/", 1)[-1] == TEST_GT_CSV and gt is None:
                gt = (tree, name)
    if not images:
        return []
    if gt is None:
        raise DataError(f"{root}: test images found but no {TEST_GT_CSV} (from {TEST_GT_ZIP}) with their labels")
    records = []
    for index, row in enumerate(_csv_rows(*gt)):
        if row["Filename"] not in images:
            raise DataError(f"{gt[0].describe(gt[1])}: row points at missing test image '{row['Filename']}'")
        if row["_label"] < 0:
            raise DataError(f"{gt[0].describe(gt[1])}: row for '{row['Filename']}' has no ClassId")
        tree, name = images[row["Filename"]]
        records.append(Record(tree, name, row["_label"], 10_000_000 + index, TEST, row["_size"], row["_box"]))
    return records


def scaled_roi(record: Record, actual_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """The CSV ROI in the decoded image's pixels: images may be smaller than the CSV declares."""
    height, width = actual_hw
    sx, sy = width / max(record.declared_size[0], 1), height / max(record.declared_size[1], 1)
    x1, y1, x2, y2 = record.roi
    box = (int(np.floor(x1 * sx)), int(np.floor(y1 * sy)), int(np.ceil((x2 + 1) * sx)), int(np.ceil((y2 + 1) * sy)))
    x1, y1 = min(max(box[0], 0), width - 1), min(max(box[1], 0), height - 1)
    x2, y2 = max(min(box[2], width), x1 + 1), max(min(box[3], height), y1 + 1)
    return x1, y1, x2, y2


def load_record(record: Record, size: int, roi: bool) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Decode one image to uint8 (size, size, 3) and its sign box in output pixels."""
    image = decode_image(record.tree.read(record.name), record.where)
    box = scaled_roi(record, image.shape[:2])
    if roi:
        return crop_and_resize(image, box, size), (0, 0, size, size)
    height, width = image.shape[:2]
    out_box = (
        int(box[0] * size / width), int(box[1] * size / height),
        max(int(round(box[2] * size / width)), 1), max(int(round(box[3] * size / height)), 1),
    )
    return crop_and_resize(image, None, size), out_box
