import pytest

from signtrap.config import dump_yaml, load_config
from signtrap.errors import ConfigError


def test_defaults_and_overrides_beat_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ntrain:\n  epochs: 3\n  lr: 0.01\n")
    cfg = load_config(path, ["train.epochs=5", "attack.poison_count=12", "trigger.size=0.2"])
    assert cfg.train.epochs == 5 and cfg.train.lr == 0.01 and cfg.attack.poison_count == 12
    assert cfg.trigger.settings.size == 0.2 and isinstance(load_config(None, ["trigger.size=4"]).trigger.settings.size, int)
    assert load_config(None, ["defend.methods=finetune,strip"]).defend.methods == ["finetune", "strip"]


def test_round_trip_of_resolved_config(tmp_path):
    cfg = load_config(None, ["train.epochs=2", "trigger.size=6"])
    (tmp_path / "r.yaml").write_text(dump_yaml(cfg))
    assert load_config(tmp_path / "r.yaml") == cfg


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown config key 'train.epoch' (did you mean 'epochs'?)"),
    ("trian.epochs=3", "unknown config key 'trian' (did you mean 'train'?)"),
    ("train.epochs=0", "train.epochs: 0 is outside"),
    ("train.epochs=abc", "train.epochs: expected int"),
    ("attack.source=7", "source equals target"),
    ("attack.poison_rate=1.5", "poison_rate"),
    ("trigger.kind=checkerbord", "did you mean 'checkerboard'"),
    ("data.source=imagenet", "data.source"),
    ("trigger.opacity=0", "trigger.opacity"),
    ("train", "not of the form key.sub=value"),
    ("train.precision=fp16", "train.precision"),
    ("aug.jpeg=90,40", "aug.jpeg: [90.0, 40.0] is not [low, high] within 1..100"),
    ("aug.jpeg_p=1.5", "aug.jpeg_p: 1.5 is outside [0, 1]"),
])
def test_bad_values_fail_with_a_clear_message(override, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        load_config(None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def _get(cfg, dotted: str):
    """A dotted key of a config, read from its resolved mapping (as written to config.yaml)."""
    from signtrap.config import to_dict

    node = to_dict(cfg)
    for part in dotted.split("."):
        node = node[part]
    return node


def _leaves(raw: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_shipped_configs_load(tmp_path):
    import itertools
    import math
    from pathlib import Path

    import yaml

    from signtrap.runs.sweeps import expand, load_sweep

    configs = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
    assert configs
    for path in configs:
        raw = yaml.safe_load(path.read_text()) or {}
        if "grid" in raw:  # a sweep file: base config + grid, every combination (x seeds) is one run
            sweep = expand(load_sweep(path))
            seeds = raw.get("seeds") or [None]
            assert len(sweep.runs) == math.prod(len(v) for v in raw["grid"].values()) * len(seeds), path
            assert len({r.name for r in sweep.runs}) == len(sweep.runs) and len({r.run_dir for r in sweep.runs}) == len(sweep.runs)
            combos = {tuple(r.params[k] for k in raw["grid"]) for r in sweep.runs}
            assert combos == set(itertools.product(*raw["grid"].values()))
            for run in sweep.runs:
                for key, value in run.params.items():
                    assert _get(run.cfg, key) == value, (path, run.name, key)
                assert run.cfg.run_dir == sweep.root / run.name
        else:  # every value written in the file is the value the run gets, and the resolved config round-trips
            cfg = load_config(path)
            for key, value in _leaves(raw).items():
                assert _get(cfg, key) == value, (path, key)
            again = tmp_path / path.name
            again.write_text(dump_yaml(cfg))
            assert load_config(again) == cfg


def test_jpeg_augmentation_compresses_every_class_alike_and_is_seeded():
    import numpy as np

    from signtrap.training.augment import augment_batch, build_augmentation

    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    only_jpeg = ["aug.rotate=0", "aug.scale=0", "aug.translate=0", "aug.perspective=0", "aug.brightness=0",
                 "aug.contrast=0", "aug.blur_p=0"]
    off = load_config(None, only_jpeg).aug
    assert off.jpeg_p == 0.0  # off by default: existing configs train as before
    on = load_config(None, [*only_jpeg, "aug.jpeg_p=1", "aug.jpeg=20,20"]).aug
    plain = augment_batch(images, build_augmentation(off, 0))
    compressed = augment_batch(images, build_augmentation(on, 0))
    assert np.array_equal(plain, images) and not np.array_equal(compressed, images)
    assert np.array_equal(compressed, augment_batch(images, build_augmentation(on, 0)))
