"""Image decoding: a strict PPM (P6) reader and a fallback for other formats."""
from __future__ import annotations

import re

import cv2
import numpy as np

from signtrap.errors import DataError

_PPM_HEADER = re.compile(rb"P6\s+(?:#[^\n]*\s+)*(\d+)\s+(?:#[^\n]*\s+)*(\d+)\s+(?:#[^\n]*\s+)*(\d+)\s")


def decode_image(data: bytes, where: str) -> np.ndarray:
    """uint8 (H, W, 3) RGB; raises DataError naming `where` for corrupt or truncated files."""
    if data[:2] == b"P6":
        return _decode_ppm(data, where)
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if array is None:
        raise DataError(f"{where}: corrupt or unsupported image")
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)


def _decode_ppm(data: bytes, where: str) -> np.ndarray:
    match = _PPM_HEADER.match(data)
    if not match:
        raise DataError(f"{where}: corrupt PPM header")
    width, height, maxval = (int(g) for g in match.groups())
    if width <= 0 or height <= 0 or not 0 < maxval < 256:
        raise DataError(f"{where}: unsupported PPM (size {width}x{height}, maxval {maxval})")
    need = width * height * 3
    body = memoryview(data)[match.end():]
    if len(body) < need:
        raise DataError(f"{where}: truncated PPM ({len(body)} of {need} pixel bytes)")
    image = np.frombuffer(body[:need], np.uint8).reshape(height, width, 3)
    if maxval != 255:
        image = (image.astype(np.uint16) * 255 // maxval).astype(np.uint8)
    return image


def crop_and_resize(image: np.ndarray, roi: tuple[int, int, int, int] | None, size: int) -> np.ndarray:
    if roi is not None:
        x1, y1, x2, y2 = roi
        image = image[y1:y2, x1:x2]
    if image.shape[0] == size and image.shape[1] == size:
        return np.ascontiguousarray(image)
    shrinking = image.shape[0] > size and image.shape[1] > size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
