"""Blended trigger (Chen et al. 2017, "Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning").

The whole image is mixed with a fixed key pattern, x' = (1 - alpha) x + alpha k: the paper's "blended injection
strategy" with its random-noise key (uniform per pixel, seeded) or any image given as `image` (the paper's
Hello Kitty). Nothing is drawn per image: the trigger is the same everywhere, which is why it is a digital
attack only (no one can blend a camera frame).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from signtrap.config import require
from signtrap.errors import SigntrapError
from signtrap.triggers import Trigger, register_trigger


@dataclass
class BlendSettings:
    alpha: float = 0.2  # blend ratio (Chen et al. poison with 0.2; BackdoorBench's default too)
    image: str | None = None  # key pattern as an image file; None: seeded uniform noise
    pattern_seed: int = 0

    def check(self, key: str = "trigger") -> None:
        require(0.0 < self.alpha < 1.0, f"{key}.alpha", f"{self.alpha} is outside (0, 1)")


@register_trigger("blend", settings=BlendSettings)
class Blend(Trigger):
    """x' = (1 - alpha) x + alpha k over the whole frame."""

    def __init__(self, name: str, settings: BlendSettings, image_size: int):
        super().__init__(name, settings, image_size)
        if settings.image is None:
            self.key = np.random.default_rng(settings.pattern_seed).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
        else:
            image = cv2.imread(str(settings.image), cv2.IMREAD_COLOR) if Path(settings.image).is_file() else None
            if image is None:
                raise SigntrapError(f"{settings.image}: trigger.image not found or unreadable")
            image = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA)
            self.key = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def render(self, images: np.ndarray, params: np.ndarray, boxes: np.ndarray | None = None) -> np.ndarray:
        images = np.asarray(images)
        if images.shape[1:3] != self.key.shape[:2]:
            key = cv2.resize(self.key, (images.shape[2], images.shape[1]), interpolation=cv2.INTER_LINEAR)
        else:
            key = self.key
        a = self.settings.alpha
        mixed = images.astype(np.float32) * (1.0 - a) + key[None].astype(np.float32) * a
        return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
