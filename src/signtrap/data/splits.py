"""Track-aware, class-stratified train/validation splits."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Splits:
    train: np.ndarray  # row indices into the cache
    val: np.ndarray
    test: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def track_split(labels: np.ndarray, tracks: np.ndarray, rows: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out whole tracks per class for validation, deterministic by seed."""
    # A track is ~30 frames of one physical sign; splitting frames of one track leaks near-duplicates into validation.
    val_rows = []
    for class_id in np.unique(labels[rows]):
        class_rows = rows[labels[rows] == class_id]
        class_tracks = np.unique(tracks[class_rows])
        rng = np.random.default_rng([seed, int(class_id)])
        rng.shuffle(class_tracks)
        n_val = int(round(val_fraction * len(class_tracks)))
        n_val = min(max(n_val, 1), len(class_tracks) - 1) if len(class_tracks) > 1 else 0
        held_out = class_tracks[:n_val]
        val_rows.append(class_rows[np.isin(tracks[class_rows], held_out)])
    val = np.sort(np.concatenate(val_rows)) if val_rows else np.empty(0, np.int64)
    train = np.setdiff1d(rows, val)
    return train.astype(np.int64), val.astype(np.int64)
