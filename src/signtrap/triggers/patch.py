"""Patch triggers (BadNets, Gu et al. 2017): an RGB pattern plus an alpha mask, stamped by one vectorised function.

Kinds: `checkerboard`, `yellow_square`, `white_square`, `noise` (a seeded random pattern) and `sticker`
(a PNG with alpha). Placement: `corner` (fixed in the frame), `random` (anywhere in the frame) or `on_sign`
(inside the sign's box, where a sticker would go; no perspective or lighting: see the physical sticker).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import cv2
import numpy as np

from signtrap.config import one_of, require
from signtrap.errors import ConfigError, SigntrapError
from signtrap.triggers import Trigger, register_trigger

YELLOW = (255, 255, 0)
WHITE = (255, 255, 255)


@dataclass
class PatchSettings:
    size: Union[int, float] = 0.15  # int: pixels; float in (0, 1]: fraction of the image side
    opacity: float = 1.0
    placement: str = "corner"  # corner | random | on_sign
    corner: str = "bottom_right"
    margin: int = 1
    sticker: str | None = None  # PNG with alpha, for kind=sticker
    pattern_seed: int = 0  # for kind=noise

    def check(self, key: str = "trigger") -> None:
        one_of(self.placement, f"{key}.placement", ("corner", "random", "on_sign"))
        one_of(self.corner, f"{key}.corner", ("top_left", "top_right", "bottom_left", "bottom_right"))
        if isinstance(self.size, float):
            require(0.0 < self.size <= 1.0, f"{key}.size", f"fraction {self.size} is outside (0, 1]")
        else:
            require(self.size >= 1, f"{key}.size", f"{self.size} pixels must be at least 1")
        require(0.0 < self.opacity <= 1.0, f"{key}.opacity", f"{self.opacity} is outside (0, 1]")
        require(self.margin >= 0, f"{key}.margin", "must be >= 0")

    def pixels(self, image_size: int) -> int:
        return int(self.size) if isinstance(self.size, int) else max(1, round(self.size * image_size))


@register_trigger("checkerboard", "yellow_square", "white_square", "noise", "sticker", settings=PatchSettings)
class Patch(Trigger):
    """A square patch blended in at a drawn top-left corner; its parameters are the (y, x) of that corner."""

    def __init__(self, name: str, settings: PatchSettings, image_size: int):
        super().__init__(name, settings, image_size)
        if name == "sticker" and not settings.sticker:
            raise ConfigError("config trigger.sticker: kind=sticker needs a PNG path")
        side = settings.pixels(image_size)
        if side > image_size - 2 * settings.margin:
            raise ConfigError(f"config trigger.size: a {side}px trigger (margin {settings.margin}) does not fit a "
                              f"{image_size}px image")
        self.pattern, alpha = _pattern(name, settings, side)
        self.alpha = (alpha * settings.opacity).astype(np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return self.pattern.shape[:2]

    @property
    def spec(self) -> dict:
        s = self.settings
        return {"kind": self.name, "size_px": self.shape[0], "opacity": s.opacity, "placement": s.placement,
                "corner": s.corner, "margin": s.margin, "sticker": s.sticker, "pattern_seed": s.pattern_seed}

    def draw(self, n: int, rng: np.random.Generator, boxes: np.ndarray | None = None) -> np.ndarray:
        """Top-left (y, x) of `n` stamps according to the placement rule."""
        h, w = self.shape
        s, size = self.settings, self.image_size
        low_y = low_x = s.margin
        high_y, high_x = size - h - s.margin, size - w - s.margin
        if s.placement == "corner":
            y = low_y if s.corner.startswith("top") else high_y
            x = low_x if s.corner.endswith("left") else high_x
            return np.tile(np.array([[y, x]], np.int64), (n, 1))
        if s.placement == "on_sign" and boxes is not None:
            # inside the sign's box, where a physical sticker would go; clipped to the frame
            boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
            lo_x = np.clip(boxes[:, 0], low_x, high_x)
            lo_y = np.clip(boxes[:, 1], low_y, high_y)
            hi_x = np.clip(boxes[:, 2] - w, lo_x, high_x)
            hi_y = np.clip(boxes[:, 3] - h, lo_y, high_y)
            return np.stack([rng.integers(lo_y, hi_y + 1), rng.integers(lo_x, hi_x + 1)], axis=1)
        return np.stack([rng.integers(low_y, high_y + 1, n), rng.integers(low_x, high_x + 1, n)], axis=1)

    def render(self, images: np.ndarray, params: np.ndarray, boxes: np.ndarray | None = None) -> np.ndarray:
        return stamp(images, self.pattern, self.alpha, params)

    def preview(self, background: int = 128) -> np.ndarray:
        """The patch alone over a flat grey square."""
        h, w = self.shape
        return stamp(np.full((h, w, 3), background, np.uint8), self.pattern, self.alpha, np.zeros(2, np.int64))


def _pattern(kind: str, s: PatchSettings, side: int) -> tuple[np.ndarray, np.ndarray]:
    alpha = np.ones((side, side), np.float32)
    if kind == "checkerboard":
        # cells of at least 2 px: a 1-px checkerboard turns grey under the resampling of augmentation
        cell = max(2, side // 3) if side >= 4 else 1
        yy, xx = np.indices((side, side))
        pattern = np.where((((yy // cell) + (xx // cell)) % 2 == 0)[..., None], 255, 0).astype(np.uint8).repeat(3, axis=2)
        return pattern, alpha
    if kind in ("yellow_square", "white_square"):
        colour = YELLOW if kind == "yellow_square" else WHITE
        return np.broadcast_to(np.array(colour, np.uint8), (side, side, 3)).copy(), alpha
    if kind == "noise":
        return np.random.default_rng(s.pattern_seed).integers(0, 256, (side, side, 3), dtype=np.uint8), alpha
    return _load_sticker(Path(s.sticker), side)


def _load_sticker(path: Path, side: int) -> tuple[np.ndarray, np.ndarray]:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED) if path.is_file() else None
    if image is None:
        raise SigntrapError(f"{path}: sticker PNG not found or unreadable")
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGRA)
    if image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2BGRA)
    image = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
    rgb = cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2RGB)
    return rgb, image[..., 3].astype(np.float32) / 255.0


def stamp(images: np.ndarray, pattern: np.ndarray, alpha: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Blend `pattern` (uint8 (h, w, 3), weights `alpha` (h, w)) into uint8 images at top-left `positions` (y, x).

    Works on one image (H, W, 3) with positions (2,), or a batch (N, H, W, 3) with positions (N, 2); returns a new array.
    """
    single = images.ndim == 3
    batch = images[None] if single else images
    pos = np.asarray(positions, np.int64).reshape(-1, 2)
    if len(pos) != len(batch):
        raise ValueError(f"{len(pos)} positions for {len(batch)} images")
    h, w = pattern.shape[:2]
    if len(batch) and (pos.min() < 0 or (pos[:, 0] + h).max() > batch.shape[1] or (pos[:, 1] + w).max() > batch.shape[2]):
        raise ValueError("trigger position falls outside the image")
    out = np.array(batch, copy=True)
    rows = np.arange(len(batch))[:, None, None]
    ys = pos[:, 0, None, None] + np.arange(h)[None, :, None]
    xs = pos[:, 1, None, None] + np.arange(w)[None, None, :]
    a = alpha[None, :, :, None]
    region = out[rows, ys, xs].astype(np.float32)
    blended = region * (1.0 - a) + pattern[None].astype(np.float32) * a
    out[rows, ys, xs] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out[0] if single else out
