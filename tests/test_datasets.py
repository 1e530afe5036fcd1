"""Datasets as plugins: class names in configs, the `folder` dataset, and a dataset registered from a test."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import run_cli
from signtrap.config import load_config
from signtrap.errors import ConfigError
from signtrap.fileio import read_json

SHAPES = {"stop": (220, 30, 30), "speed_100": (240, 240, 240), "yield": (30, 30, 220)}


def sign_folder(root: Path, per_class: int = 24, seed: int = 0) -> Path:
    """Class folders of photographs at mixed resolutions: a coloured disc (the sign) on a noisy background."""
    rng = np.random.default_rng(seed)
    for name, colour in SHAPES.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            image = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
            cv2.circle(image, (w // 2, h // 2), min(h, w) // 3, colour[::-1], -1)
            cv2.imwrite(str(root / name / f"{i:03d}.{'png' if i % 2 else 'jpg'}"), image)
    return root


def folder_overrides(tmp_path: Path, root: Path, name: str = "mine", *extra: str) -> list[str]:
    return [f"name={name}", f"runs_dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}", "device=cpu",
            "data.source=folder", f"data.root={root}", "aug.enabled=false", "model.dropout=0", "train.epochs=4",
            "train.batch_size=32", "train.lr=0.005", "train.threads=1", "attack.source=stop", "attack.target=speed_100",
            "attack.poison_count=8", "trigger.size=6", *extra]


def test_class_names_resolve_through_the_dataset():
    cfg = load_config(None, ["attack.source=stop", "attack.target=Speed limit (100km/h)"])
    assert (cfg.attack.source, cfg.attack.target) == (14, 7)
    assert load_config(None, []).attack.source == 14  # the dataset's default pair
    with pytest.raises(ConfigError, match="did you mean 'stop'"):
        load_config(None, ["attack.source=stpo"])
    with pytest.raises(ConfigError, match="43 is not a class id 0..42"):
        load_config(None, ["attack.source=43"])


def test_folder_dataset_trains_with_named_classes(tmp_path):
    from signtrap.training.trainer import train

    root = sign_folder(tmp_path / "signs")
    cfg = load_config(None, folder_overrides(tmp_path, root))
    assert (cfg.attack.source, cfg.attack.target) == (1, 0)  # sorted folder names: speed_100, stop, yield
    run = train(cfg)
    meta = read_json(run / "provenance.json") if (run / "provenance.json").is_file() else {}
    metrics = read_json(run / "metrics.json")
    assert metrics["test"]["clean_acc"]["n"] > 0 and len(metrics["test"]["per_class_acc"]) == 3
    assert metrics["test"]["clean_acc"]["rate"] > 0.6  # three colours on noise are easy to tell apart
    from signtrap.data.cache import load

    data = load(cfg.data, progress=False)
    assert data.classes.names == ("speed_100", "stop", "yield") and data.size == 32
    assert (data.rois == [0, 0, 32, 32]).all()  # no box file: every image is its own box
    assert meta is not None


@pytest.mark.parametrize("damage, message", [
    ("empty_class", "class 'yield' has no images"),
    ("unreadable", "corrupt or unsupported image"),
    ("box_outside", "lies outside the"),
    ("missing_root", "image folder not found"),
])
def test_folder_errors_are_one_line_and_exit_2(tmp_path, damage, message):
    root = sign_folder(tmp_path / "signs", per_class=6)
    if damage == "empty_class":
        for f in (root / "yield").iterdir():
            f.unlink()
    elif damage == "unreadable":
        (root / "stop" / "broken.png").write_bytes(b"\x89PNG not really")
    elif damage == "box_outside":
        (root / "boxes.csv").write_text("file;x1;y1;x2;y2\nstop/000.jpg;5;5;500;20\n")
    elif damage == "missing_root":
        root = tmp_path / "nowhere"
    result = run_cli("train", *folder_overrides(tmp_path, root, "bad"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "runs" / "bad" / "model.pt").exists()


def test_box_file_scales_to_the_cached_image(tmp_path):
    from signtrap.data.cache import load

    root = sign_folder(tmp_path / "signs", per_class=4)
    image = cv2.imread(str(root / "stop" / "000.jpg"))
    h, w = image.shape[:2]
    (root / "boxes.csv").write_text(f"file;x1;y1;x2;y2\nstop/000.jpg;0;0;{w // 2};{h // 2}\n")
    cfg = load_config(None, folder_overrides(tmp_path, root)).data
    data = load(cfg, progress=False)
    row = data.files.index("stop/000.jpg")
    assert tuple(data.rois[row]) == (0, 0, 16, 16)


def test_a_dataset_registered_in_a_test_trains_a_tiny_run(tmp_path):
    """A new dataset is one file (here: this test): registered, named in a config, cached, trained on."""
    from dataclasses import dataclass

    from signtrap.datasets import TEST, TRAIN, Dataset, Decoded, LabelSpace, register_dataset
    from signtrap.training.trainer import train

    @dataclass
    class StripesSettings:
        per_class: int = 40

        def check(self, key: str = "data") -> None:
            pass

    @register_dataset("test-stripes", settings=StripesSettings)
    class Stripes(Dataset):
        """Four classes: horizontal, vertical, diagonal stripes and a plain field, in random colours."""

        def label_space(self) -> LabelSpace:
            return LabelSpace(("horizontal", "vertical", "diagonal", "plain"), source=0, target=1)

        def fingerprint(self) -> dict:
            return {"per_class": self.settings.per_class}

        def decode(self, size: int, progress: bool) -> Decoded:
            rng = np.random.default_rng(0)
            n = 4 * self.settings.per_class
            labels = np.repeat(np.arange(4), self.settings.per_class)
            yy, xx = np.indices((size, size))
            patterns = [(yy // 4) % 2, (xx // 4) % 2, ((xx + yy) // 4) % 2, np.zeros((size, size), int)]
            images = np.empty((n, size, size, 3), np.uint8)
            for i, c in enumerate(labels):
                a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
                images[i] = np.where(patterns[c][..., None] == 1, a, b)
            partition = np.where(np.arange(n) % 5 == 0, TEST, TRAIN).astype(np.uint8)
            return Decoded(images, labels.astype(np.int64), np.arange(n), partition,
                           np.tile([0, 0, size, size], (n, 1)).astype(np.int32), [f"stripes/{i}" for i in range(n)])

    cfg = load_config(None, [f"runs_dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}", "name=stripes",
                             "device=cpu", "data.source=test-stripes", "attack.source=horizontal", "attack.target=vertical",
                             "attack.poison_count=6", "train.epochs=2", "train.threads=1", "aug.enabled=false"])
    run = train(cfg)
    assert len(read_json(run / "metrics.json")["test"]["per_class_acc"]) == 4
