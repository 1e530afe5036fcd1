"""Datasets, one file each, registered by name when their module is imported (`@register_dataset`).

A dataset owns its label space (class names, the short names configs may use, the default attack source and
target), its normalisation, its signs' boxes and how its images are decoded into the uint8 cache
(`signtrap.data.cache`):

    @dataclass
    class MySettings:
        root: str | None = None
        def check(self, key: str) -> None: ...

    @register_dataset("mine", settings=MySettings)
    class Mine(Dataset):
        def label_space(self) -> LabelSpace: ...     # cheap: configs resolve `attack.source: stop` through it
        def fingerprint(self) -> dict: ...           # what the cache key depends on besides source and size
        def decode(self, size, progress) -> Decoded: ...

The config section is `data: {source: NAME, size, val_fraction, cache_dir, ...that dataset's settings}`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from signtrap.errors import ConfigError, suggest
from signtrap.plugins import DATASETS

TRAIN, TEST = 0, 1  # SignData.partition values: the dataset's own training and test partitions


def slug(name: str) -> str:
    """'Speed limit (100km/h)' -> 'speed_limit_100km_h': a class name as a config may spell it."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


@dataclass(frozen=True)
class LabelSpace:
    """The classes of a dataset: names, short names, the attack's default pair and the input normalisation."""

    names: tuple[str, ...]
    keys: tuple[str, ...] = ()  # short names for configs (`stop`); default: slugs of the names
    source: int = 0  # default attack.source
    target: int = 1  # default attack.target
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)

    def __post_init__(self) -> None:
        if not self.keys:
            object.__setattr__(self, "keys", tuple(slug(n) for n in self.names))
        if len(self.keys) != len(self.names) or len(set(self.keys)) != len(self.keys):
            raise ValueError("a label space needs one distinct short name per class")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def resolve(self, value: Any, key: str) -> int:
        """A class id from an id, a short name (`stop`) or a full name (`Stop`, any case)."""
        n = self.num_classes
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            if not 0 <= int(value) < n:
                raise ConfigError(f"config {key}: {value} is not a class id 0..{n - 1}")
            return int(value)
        if isinstance(value, str):
            text = value.strip()
            if text.isdigit():
                return self.resolve(int(text), key)
            lookup = {k: i for i, k in enumerate(self.keys)}
            lookup.update({slug(name): i for i, name in enumerate(self.names)})
            if slug(text) in lookup:
                return lookup[slug(text)]
            raise ConfigError(f"config {key}: '{value}' is not a class of this dataset{suggest(slug(text), self.keys)}; "
                              f"classes: {', '.join(self.keys[:12])}{', ...' if n > 12 else ''}")
        raise ConfigError(f"config {key}: expected a class id or name, got {value!r}")

    def describe(self, class_id: int) -> str:
        return f"class {class_id} ({self.names[class_id]})" if 0 <= class_id < self.num_classes else f"class {class_id}"

    def to_meta(self) -> dict:
        return {"names": list(self.names), "keys": list(self.keys), "source": self.source, "target": self.target,
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_meta(cls, meta: dict) -> "LabelSpace":
        return cls(tuple(meta["names"]), tuple(meta["keys"]), int(meta["source"]), int(meta["target"]),
                   tuple(float(v) for v in meta["mean"]), tuple(float(v) for v in meta["std"]))


@dataclass
class Decoded:
    """What a dataset hands the cache: parallel arrays over rows, one description per row, extra meta."""

    images: np.ndarray  # uint8 (N, size, size, 3) RGB
    labels: np.ndarray  # int64
    tracks: np.ndarray  # int64: frames of one physical sign share a track (validation holds out whole tracks)
    partition: np.ndarray  # uint8: TRAIN or TEST
    rois: np.ndarray  # int32 (N, 4): the sign's box x1, y1, x2, y2 in the cached image's pixels
    files: list[str]
    extra: dict = field(default_factory=dict)
    labels_space: LabelSpace | None = None  # when decoding learns the classes or the normalisation (a folder)


class Dataset:
    """A dataset bound to its settings."""

    cache_code: ClassVar[tuple[str, ...]] = ()  # source files whose bytes enter the cache key (generators)

    def __init__(self, name: str, settings: Any):
        self.name, self.settings = name, settings

    def label_space(self) -> LabelSpace:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """JSON-able: everything besides source and size that the cached arrays depend on."""
        return {}

    def decode(self, size: int, progress: bool) -> Decoded:
        raise NotImplementedError


@dataclass(frozen=True)
class DatasetPlugin:
    name: str
    cls: type
    settings: type
    module: str = ""

    def build(self, settings: Any) -> Dataset:
        return self.cls(self.name, settings)


def register_dataset(name: str, *, settings: type) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Dataset)):
            raise TypeError(f"@register_dataset needs a Dataset subclass, got {cls!r}")
        DATASETS.register(name, DatasetPlugin(name, cls, settings, cls.__module__))
        return cls
    return wrap


def dataset_for(data_cfg: Any) -> Dataset:
    """The dataset a config's `data:` section (signtrap.config.DataConfig) names, bound to its settings."""
    return DATASETS.get(data_cfg.source).build(data_cfg.settings)


def list_datasets() -> list[str]:
    return DATASETS.names()


__all__ = ["TEST", "TRAIN", "Dataset", "Decoded", "LabelSpace", "dataset_for", "list_datasets", "register_dataset", "slug"]
