"""Training augmentation with albumentations; never a horizontal flip (it turns 'keep left' into 'keep right')."""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

from signtrap.config import AugConfig


def build_augmentation(cfg: AugConfig, seed: int) -> A.Compose | None:
    if not cfg.enabled:
        return None
    steps = [
        A.Affine(scale=(1 - cfg.scale, 1 + cfg.scale), rotate=(-cfg.rotate, cfg.rotate),
                 translate_percent=(-cfg.translate, cfg.translate), border_mode=cv2.BORDER_REFLECT_101, p=0.9),
    ]
    if cfg.perspective > 0:
        steps.append(A.Perspective(scale=(cfg.perspective / 2, cfg.perspective), p=0.3))
    if cfg.brightness > 0 or cfg.contrast > 0:
        steps.append(A.RandomBrightnessContrast(brightness_limit=cfg.brightness, contrast_limit=cfg.contrast, p=0.8))
    if cfg.blur_p > 0:
        steps.append(A.GaussianBlur(blur_limit=(3, 3), p=cfg.blur_p))
    if cfg.jpeg_p > 0:
        steps.append(A.ImageCompression(compression_type="jpeg", quality_range=(round(cfg.jpeg[0]), round(cfg.jpeg[1])), p=cfg.jpeg_p))
    return A.Compose(steps, seed=seed)


def augment_batch(images: np.ndarray, pipeline: A.Compose | None) -> np.ndarray:
    if pipeline is None:
        return images
    return np.stack([pipeline(image=image)["image"] for image in images])
