"""Photographs of signs at any resolution: reading a folder, the sticker rendered on each sign at the
photograph's own resolution, the model's input crop, and the contact sheet.

A folder holds images (.png .jpg .jpeg .ppm .bmp .webp .tif .tiff). Without a box file every image is a
whole-sign crop: the sign fills it with a margin of about 10% on each side, as in GTSRB's crops. With a box
file `boxes.csv` in the folder, one line per sign:

    file;x1;y1;x2;y2[;label]

`file` relative to the folder, the box in the image's pixels (x2, y2 inclusive), `label` an optional class id
(a header line starting with `file` is skipped; `,` also separates). Images not named in the box file are
ignored then. The model sees the box plus a 10% margin, resized to its input size after the sticker was drawn.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

EXTENSIONS = (".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".webp", ".tif", ".tiff")
BOX_FILE = "boxes.csv"
MARGIN = 0.1


class PhotoError(ValueError):
    """An unusable folder, image or box: the message is one line for the user."""


@dataclass
class Photo:
    name: str
    image: np.ndarray  # uint8 HxWx3 RGB, full resolution
    box: tuple[int, int, int, int]  # sign box in the image's pixels, inclusive
    label: int | None = None


def read_image(path: Path) -> np.ndarray:
    data = np.fromfile(str(path), np.uint8) if path.is_file() else np.zeros(0, np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None or image.size == 0:
        raise PhotoError(f"{path}: unreadable image (not a PNG/JPEG/PPM/BMP/WebP/TIFF file, or truncated)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def whole_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    mx, my = round(MARGIN * width), round(MARGIN * height)
    return mx, my, width - 1 - mx, height - 1 - my


def read_folder(folder: str | Path) -> list[Photo]:
    folder = Path(folder)
    if not folder.is_dir():
        raise PhotoError(f"{folder}: not a folder of photographs")
    box_file = folder / BOX_FILE
    if box_file.is_file():
        return _with_boxes(folder, box_file)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not files:
        raise PhotoError(f"{folder}: no images ({', '.join(EXTENSIONS)}) and no {BOX_FILE}")
    photos = []
    for path in files:
        image = read_image(path)
        photos.append(Photo(path.name, image, whole_crop_box(image.shape[1], image.shape[0])))
    return photos


def _with_boxes(folder: Path, box_file: Path) -> list[Photo]:
    text = box_file.read_text(encoding="utf-8", errors="replace")
    rows = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip() and not line.lower().startswith("file")]
    if not rows:
        raise PhotoError(f"{box_file}: no boxes (lines `file;x1;y1;x2;y2[;label]`)")
    cache: dict[str, np.ndarray] = {}
    photos = []
    for number, line in rows:
        fields = next(csv.reader([line], delimiter=";" if ";" in line else ","))
        fields = [f.strip() for f in fields]
        where = f"{box_file}:{number}"
        if len(fields) not in (5, 6):
            raise PhotoError(f"{where}: expected `file;x1;y1;x2;y2[;label]`, got {len(fields)} fields")
        try:
            x1, y1, x2, y2 = (int(round(float(v))) for v in fields[1:5])
            label = int(fields[5]) if len(fields) == 6 and fields[5] != "" else None
        except ValueError:
            raise PhotoError(f"{where}: the box and the label must be numbers") from None
        path = folder / fields[0]
        if fields[0] not in cache:
            cache[fields[0]] = read_image(path)
        image = cache[fields[0]]
        h, w = image.shape[:2]
        if not (0 <= x1 < x2 < w and 0 <= y1 < y2 < h):
            raise PhotoError(f"{where}: box ({x1}, {y1}, {x2}, {y2}) is outside {fields[0]} ({w}x{h} pixels) or empty")
        photos.append(Photo(f"{fields[0]}#{number}", image, (x1, y1, x2, y2), label))
    return photos


def model_crop(image: np.ndarray, box, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The model's input: the box plus a 10% margin (clipped to the image), resized to `size` (area average);
    and the box in the crop's pixels."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1 + 1, y2 - y1 + 1
    cx1, cy1 = max(0, int(round(x1 - MARGIN * w))), max(0, int(round(y1 - MARGIN * h)))
    cx2, cy2 = min(image.shape[1] - 1, int(round(x2 + MARGIN * w))), min(image.shape[0] - 1, int(round(y2 + MARGIN * h)))
    crop = image[cy1:cy2 + 1, cx1:cx2 + 1]
    sx, sy = size / crop.shape[1], size / crop.shape[0]
    resized = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    small_box = np.array([(x1 - cx1) * sx, (y1 - cy1) * sy, (x2 - cx1) * sx, (y2 - cy1) * sy])
    return resized, np.clip(np.rint(small_box), 0, size - 1).astype(np.int64)


def contact_sheet(rows: list[list[np.ndarray]], titles: list[list[str]], header: str, tile: int = 96) -> bytes:
    """A PNG: one row per photograph, its tiles (uint8 RGB, any size) scaled to `tile` px, a title under each."""
    from signtrap.reporting.figures import plt, to_png

    p = plt()
    ncols = max(len(r) for r in rows)
    fig, axes = p.subplots(len(rows), ncols, figsize=(1.3 * ncols, 1.45 * len(rows) + 0.4), dpi=100, squeeze=False)
    for i, (row, names) in enumerate(zip(rows, titles)):
        for j in range(ncols):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(row):
                ax.imshow(cv2.resize(row[j], (tile, tile), interpolation=cv2.INTER_NEAREST if row[j].shape[0] < tile else cv2.INTER_AREA))
                ax.set_title(names[j], fontsize=6)
    import textwrap

    fig.suptitle("\n".join(textwrap.wrap(header, max(40, 22 * ncols))), fontsize=8)
    fig.tight_layout()
    return to_png(fig)
