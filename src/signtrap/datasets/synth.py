"""SynthSigns: GTSRB's 43 classes drawn procedurally (signtrap.data.synth), offline and in seconds; every image is
its own scene (its own track) and knows its sign's box exactly."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from signtrap.config import require
from signtrap.data import synth
from signtrap.datasets import TEST, TRAIN, Dataset, Decoded, LabelSpace, register_dataset
from signtrap.datasets.gtsrb import LABELS


@dataclass
class SynthSettings:
    synth_per_class: int = 200  # training-partition images per class
    synth_test_per_class: int = 30  # test-partition images per class
    synth_seed: int = 0

    def check(self, key: str = "data") -> None:
        require(self.synth_per_class >= 2, f"{key}.synth_per_class", "must be at least 2")
        require(self.synth_test_per_class >= 1, f"{key}.synth_test_per_class", "must be at least 1")


@register_dataset("synth", settings=SynthSettings)
class SynthSigns(Dataset):
    """GTSRB's label space and normalisation, rendered: the offline dataset of the demo, the tests and the labs."""

    cache_code = (synth.__file__,)

    def label_space(self) -> LabelSpace:
        return LABELS

    def fingerprint(self) -> dict:
        s = self.settings
        return {"per_class": s.synth_per_class, "test_per_class": s.synth_test_per_class, "seed": s.synth_seed}

    def decode(self, size: int, progress: bool) -> Decoded:
        s = self.settings
        parts = [(TRAIN, synth.generate(s.synth_per_class, seed=s.synth_seed, size=size, progress=progress)),
                 (TEST, synth.generate(s.synth_test_per_class, seed=s.synth_seed + 1_000_003, size=size, progress=progress))]
        labels = np.concatenate([b.labels for _, b in parts]).astype(np.int64)
        files = [f"synth:{'train' if p == TRAIN else 'test'}/{c:02d}/{i}" for p, b in parts for i, c in enumerate(b.labels)]
        return Decoded(images=np.concatenate([b.images for _, b in parts]), labels=labels,
                       tracks=np.arange(len(labels), dtype=np.int64),  # each synthetic image is an independent scene
                       partition=np.concatenate([np.full(len(b.labels), p, np.uint8) for p, b in parts]),
                       rois=np.concatenate([b.rois for _, b in parts]).astype(np.int32), files=files,
                       extra={"synth_seed": s.synth_seed, "per_class": s.synth_per_class,
                              "test_per_class": s.synth_test_per_class})
