"""The physical sticker (`trigger.kind: physical`): a printed sticker on the sign's face, rendered under an
expectation-over-transformation distribution (signtrap.physical.render: position, size, rotation, perspective,
light, printing, blur, noise, JPEG, occlusion), in the sign's coordinates from its box.

    trigger:
      kind: physical
      design: checkerboard   # checkerboard | yellow_note | png (any PNG, e.g. `signtrap trigger optimise`'s)
      cells: 3               # checkerboard cells per side
      png: null              # design: png
      eot: {scale: [0.10, 0.25], yaw: 55, ...}   # signtrap.physical.render.EOT, every range documented there

Each application draws one EOT row per image. With `attack.stamp: after_aug` the loop draws fresh views every
epoch (the sticker then follows the sign's box, which augmentation moves by a few pixels; the face margin
absorbs it); with `before_aug` each poisoned row keeps the one view the poisoning plan drew.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from signtrap.config import one_of, require
from signtrap.errors import ConfigError
from signtrap.physical import patterns
from signtrap.physical.render import EOT, NPARAMS, Sticker, draw_params, render_stickers
from signtrap.triggers import Trigger, register_trigger

CROP_MARGIN = 0.1  # without boxes, the image is taken as a sign crop with this margin on each side (GTSRB's)


@dataclass
class PhysicalSettings:
    design: str = "checkerboard"  # checkerboard | yellow_note | png
    cells: int = 3  # checkerboard cells per side
    png: str | None = None  # design: png; a PNG (RGB or RGBA) of the sticker, one pixel per printed cell
    eot: EOT = field(default_factory=EOT)

    def check(self, key: str = "trigger") -> None:
        one_of(self.design, f"{key}.design", ("checkerboard", "yellow_note", "png"))
        require(1 <= self.cells <= 32, f"{key}.cells", f"{self.cells} is outside 1..32")
        require(self.design != "png" or bool(self.png), f"{key}.png", "design: png needs a PNG path")
        try:
            self.eot.check(f"{key}.eot")
        except ValueError as exc:
            raise ConfigError(f"config {exc}") from None


def make_sticker(settings: PhysicalSettings) -> Sticker:
    if settings.design == "checkerboard":
        return patterns.checkerboard(settings.cells)
    if settings.design == "yellow_note":
        return patterns.yellow_note()
    try:
        return patterns.load_png(settings.png, name=f"png:{settings.png}")
    except ValueError as exc:
        raise ConfigError(f"config trigger.png: {exc}") from None


def crop_boxes(n: int, height: int, width: int) -> np.ndarray:
    mx, my = round(CROP_MARGIN * width), round(CROP_MARGIN * height)
    return np.tile(np.array([[mx, my, width - 1 - mx, height - 1 - my]], np.int64), (n, 1))


@register_trigger("physical", settings=PhysicalSettings)
class PhysicalSticker(Trigger):
    """A printed sticker on the sign, rendered under EOT; its parameters are one EOT row per image."""

    moves_with_sign = True

    def __init__(self, name: str, settings: PhysicalSettings, image_size: int):
        super().__init__(name, settings, image_size)
        self.sticker = make_sticker(settings)

    def draw(self, n: int, rng: np.random.Generator, boxes: np.ndarray | None = None) -> np.ndarray:
        return draw_params(n, rng, self.settings.eot)

    def render(self, images: np.ndarray, params: np.ndarray, boxes: np.ndarray | None = None,
               decoy: bool = False) -> np.ndarray:
        images = np.asarray(images)
        single = images.ndim == 3
        batch = images[None] if single else images
        params = np.asarray(params, np.float64).reshape(len(batch), NPARAMS)
        boxes = crop_boxes(len(batch), *batch.shape[1:3]) if boxes is None else np.asarray(boxes).reshape(len(batch), 4)
        e = self.settings.eot
        out = render_stickers(batch, params, boxes, self.sticker.rgb, self.sticker.alpha, e.face, e.match_light, decoy=decoy)
        return out[0] if single else out

    def render_decoy(self, images: np.ndarray, params: np.ndarray, boxes: np.ndarray | None = None) -> np.ndarray:
        """The same view with no sticker: its motion blur, defocus, noise and JPEG on the sign's own pixels, where the
        sticker would have been."""
        return self.render(images, params, boxes, decoy=True)

    def preview(self, background: int = 128) -> np.ndarray:
        """The sticker as printed, over grey, at least 64 px (cells stay sharp)."""
        k = max(self.sticker.pattern.shape[:2])
        side = max(64, k * max(1, 64 // k))
        rgb = cv2.resize(self.sticker.pattern, (side, side), interpolation=cv2.INTER_NEAREST)
        a = cv2.resize(self.sticker.alpha, (side, side), interpolation=cv2.INTER_NEAREST)[..., None]
        return np.clip(np.rint(rgb * a + background * (1 - a)), 0, 255).astype(np.uint8)
