"""Sticker designs: a checkerboard, a plain yellow note (the BadNets sticker, Gu et al. 2017), and a pattern
loaded from a PNG (for instance the optimised pattern of signtrap.physical.optimise).

Every design is a small uint8 RGB array (one entry per printed cell) and an alpha mask; the renderer scales
it to the sticker's size with nearest-neighbour sampling, so printed cells keep sharp edges.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from signtrap.fileio import atomic_path
from signtrap.physical.render import Sticker

YELLOW_NOTE = (250, 222, 40)  # a sticky note's yellow, inside an office printer's gamut
DESIGNS = ("checkerboard", "yellow_note", "optimised", "png")


def checkerboard(cells: int = 3) -> Sticker:
    """Black and white cells, `cells` x `cells`, white in the top-left corner."""
    yy, xx = np.indices((cells, cells))
    on = ((yy + xx) % 2 == 0)[..., None]
    return Sticker("checkerboard", np.where(on, 255, 0).astype(np.uint8).repeat(3, axis=2))


def yellow_note() -> Sticker:
    return Sticker("yellow_note", np.broadcast_to(np.array(YELLOW_NOTE, np.uint8), (1, 1, 3)).copy())


def load_png(path: str | Path, name: str = "png") -> Sticker:
    """A sticker design from a PNG (RGB or RGBA); raises ValueError when it cannot be read."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED) if Path(path).is_file() else None
    if image is None or image.size == 0:
        raise ValueError(f"{path}: sticker PNG not found or unreadable")
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGRA)
    elif image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2BGRA)
    rgb = cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2RGB)
    return Sticker(name, rgb, image[..., 3].astype(np.float32) / 255.0)


def save_png(sticker: Sticker, path: str | Path) -> Path:
    """The design as a PNG, one pixel per printed cell; written to a temporary file and renamed, never over a file
    signtrap did not write."""
    path = Path(path)
    rgba = np.dstack([sticker.pattern, np.rint(sticker.alpha * 255).astype(np.uint8)])
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    if not ok:
        raise OSError(f"{path}: could not encode the PNG")
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())
    return path


def from_image(image: np.ndarray, name: str = "trigger") -> Sticker:
    """Any trigger's preview (uint8 HxWx3) used as a sticker design: how a frame-fixed trigger looks when
    someone prints it and puts it on a sign."""
    return Sticker(name, np.asarray(image, np.uint8)[..., :3])
