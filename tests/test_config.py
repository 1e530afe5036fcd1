import pytest

from signtrap.config import dump_yaml, load_config
from signtrap.errors import ConfigError


def test_defaults_and_overrides_beat_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ntrain:\n  epochs: 3\n  lr: 0.01\n")
    cfg = load_config(path, ["train.epochs=5", "attack.poison_count=12", "trigger.size=0.2"])
    assert cfg.train.epochs == 5 and cfg.train.lr == 0.01 and cfg.attack.poison_count == 12
    assert cfg.trigger.size == 0.2 and isinstance(load_config(None, ["trigger.size=4"]).trigger.size, int)
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


def test_shipped_configs_load():
    from pathlib import Path

    import yaml

    from signtrap.sweeps import expand, load_sweep

    configs = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
    assert configs
    for path in configs:
        if "grid" in (yaml.safe_load(path.read_text()) or {}):  # a sweep file: base config + grid
            assert expand(load_sweep(path))
        else:
            load_config(path)
