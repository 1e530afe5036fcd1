"""Patch triggers: an RGB pattern plus an alpha mask, stamped by one pure, vectorised function."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from signtrap.config import TriggerConfig
from signtrap.errors import ConfigError, SigntrapError

YELLOW = (255, 255, 0)
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class Trigger:
    pattern: np.ndarray  # uint8 (h, w, 3) RGB
    alpha: np.ndarray  # float32 (h, w) in [0, 1]; 0 leaves the image pixel untouched
    spec: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.pattern.shape[:2]


def make_trigger(cfg: TriggerConfig, image_size: int) -> Trigger:
    side = cfg.pixels(image_size)
    if side > image_size - 2 * cfg.margin:
        raise ConfigError(
            f"config trigger.size: a {side}px trigger (margin {cfg.margin}) does not fit a {image_size}px image"
        )
    if cfg.kind == "checkerboard":
        # cells of at least 2 px: a 1-px checkerboard turns grey under the resampling of augmentation
        cell = max(2, side // 3) if side >= 4 else 1
        yy, xx = np.indices((side, side))
        pattern = np.where((((yy // cell) + (xx // cell)) % 2 == 0)[..., None], 255, 0).astype(np.uint8).repeat(3, axis=2)
        alpha = np.ones((side, side), np.float32)
    elif cfg.kind in ("yellow_square", "white_square"):
        colour = YELLOW if cfg.kind == "yellow_square" else WHITE
        pattern = np.broadcast_to(np.array(colour, np.uint8), (side, side, 3)).copy()
        alpha = np.ones((side, side), np.float32)
    elif cfg.kind == "noise":
        pattern = np.random.default_rng(cfg.pattern_seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
        alpha = np.ones((side, side), np.float32)
    else:
        pattern, alpha = _load_sticker(Path(cfg.sticker), side)
    spec = {
        "kind": cfg.kind, "size_px": side, "opacity": cfg.opacity, "placement": cfg.placement,
        "corner": cfg.corner, "margin": cfg.margin, "sticker": cfg.sticker, "pattern_seed": cfg.pattern_seed,
    }
    return Trigger(pattern, (alpha * cfg.opacity).astype(np.float32), spec)


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


def stamp(images: np.ndarray, trigger: Trigger, positions: np.ndarray) -> np.ndarray:
    """Blend the trigger into uint8 images at top-left `positions` (y, x); returns a new array.

    Works on one image (H, W, 3) with positions (2,), or a batch (N, H, W, 3) with positions (N, 2).
    """
    single = images.ndim == 3
    batch = images[None] if single else images
    pos = np.asarray(positions, np.int64).reshape(-1, 2)
    if len(pos) != len(batch):
        raise ValueError(f"{len(pos)} positions for {len(batch)} images")
    h, w = trigger.shape
    if len(batch) and (pos.min() < 0 or (pos[:, 0] + h).max() > batch.shape[1] or (pos[:, 1] + w).max() > batch.shape[2]):
        raise ValueError("trigger position falls outside the image")
    out = np.array(batch, copy=True)
    rows = np.arange(len(batch))[:, None, None]
    ys = pos[:, 0, None, None] + np.arange(h)[None, :, None]
    xs = pos[:, 1, None, None] + np.arange(w)[None, None, :]
    alpha = trigger.alpha[None, :, :, None]
    region = out[rows, ys, xs].astype(np.float32)
    blended = region * (1.0 - alpha) + trigger.pattern[None].astype(np.float32) * alpha
    out[rows, ys, xs] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out[0] if single else out


def place(trigger: Trigger, n: int, image_size: int, rng: np.random.Generator, rois: np.ndarray | None = None) -> np.ndarray:
    """Top-left (y, x) for `n` stamps according to the trigger's placement rule."""
    h, w = trigger.shape
    margin = int(trigger.spec.get("margin", 0))
    placement = trigger.spec.get("placement", "corner")
    low_y, low_x = margin, margin
    high_y, high_x = image_size - h - margin, image_size - w - margin
    if placement == "corner":
        corner = trigger.spec.get("corner", "bottom_right")
        y = low_y if corner.startswith("top") else high_y
        x = low_x if corner.endswith("left") else high_x
        return np.tile(np.array([[y, x]], np.int64), (n, 1))
    if placement == "on_sign" and rois is not None:
        # inside the sign's box, where a physical sticker would go; clipped to the frame
        rois = np.asarray(rois, np.int64).reshape(-1, 4)
        lo_x = np.clip(rois[:, 0], low_x, high_x)
        lo_y = np.clip(rois[:, 1], low_y, high_y)
        hi_x = np.clip(rois[:, 2] - w, lo_x, high_x)
        hi_y = np.clip(rois[:, 3] - h, lo_y, high_y)
        return np.stack([rng.integers(lo_y, hi_y + 1), rng.integers(lo_x, hi_x + 1)], axis=1)
    return np.stack([rng.integers(low_y, high_y + 1, n), rng.integers(low_x, high_x + 1, n)], axis=1)


def stamp_placed(images: np.ndarray, trigger: Trigger, rng: np.random.Generator, rois: np.ndarray | None = None) -> np.ndarray:
    return stamp(images, trigger, place(trigger, len(images), images.shape[1], rng, rois))


def trigger_preview(trigger: Trigger, background: int = 128) -> np.ndarray:
    """The trigger over a flat grey square (for reports and PNG previews)."""
    h, w = trigger.shape
    return stamp(np.full((h, w, 3), background, np.uint8), trigger, np.zeros(2, np.int64))
