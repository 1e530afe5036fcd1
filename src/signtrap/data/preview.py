"""`signtrap data preview`: a PNG grid of samples per class, with class names."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from signtrap.data.cache import SignData
from signtrap.fileio import atomic_path


def preview_grid(data: SignData, per_class: int = 8, tile: int = 64, seed: int = 0, rows: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 image: one row per class, `per_class` random samples, the class id and name on the left."""
    rng = np.random.default_rng(seed)
    rows = np.arange(len(data)) if rows is None else rows
    label_w, pad = 330, 2
    names = data.classes.names
    grid = np.full((len(names) * (tile + pad) + pad, label_w + per_class * (tile + pad) + pad, 3), 255, np.uint8)
    for class_id in range(len(names)):
        members = rows[data.labels[rows] == class_id]
        y = pad + class_id * (tile + pad)
        text = f"{class_id:2d} {names[class_id]}"[:40]
        cv2.putText(grid, text, (4, y + tile // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
        if not len(members):
            continue
        picks = rng.choice(members, size=min(per_class, len(members)), replace=False)
        for j, row in enumerate(np.sort(picks)):
            x = label_w + pad + j * (tile + pad)
            grid[y:y + tile, x:x + tile] = cv2.resize(np.asarray(data.images[row]), (tile, tile), interpolation=cv2.INTER_NEAREST)
    return grid


def write_png(path: Path, image_rgb: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())
