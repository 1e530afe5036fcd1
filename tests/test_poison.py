from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from signtrap.attacks import build_training_set, plan_poison
from signtrap.triggers import make_trigger
from signtrap.config import load_config
from signtrap.data.cache import SignData
from signtrap.datasets.gtsrb import LABELS
from signtrap.defences.run import training_pool
from signtrap.errors import ConfigError


def fake_data(n_per_class=20, classes=(1, 7, 14, 20)) -> SignData:
    labels = np.repeat(np.array(classes), n_per_class).astype(np.int64)
    n = len(labels)
    return SignData(images=np.full((n, 32, 32, 3), 50, np.uint8), labels=labels, tracks=np.arange(n),
                    partition=np.zeros(n, np.uint8), rois=np.tile([4, 4, 28, 28], (n, 1)).astype(np.int32),
                    path=Path("/nonexistent"), meta={"data_hash": "x", "classes": LABELS.to_meta()})


def setup(*overrides):
    cfg = load_config(None, list(overrides))
    data = fake_data()
    train_rows = np.arange(len(data))
    trigger = make_trigger(cfg.trigger, 32)
    plan = plan_poison(cfg.attack, data, train_rows, trigger, cfg.seed)
    return cfg, data, train_rows, trigger, plan


@pytest.mark.parametrize("stamp", ["before_aug", "after_aug"])
def test_replace_relabels_source_rows_in_place(stamp):
    cfg, data, rows, trigger, plan = setup("attack.poison_count=5", f"attack.stamp={stamp}")
    ts = build_training_set(cfg.attack, data, rows, plan, trigger)
    assert len(ts.labels) == len(data) and set(data.labels[plan.rows]) == {14}
    assert (ts.labels[plan.rows] == 7).all() and ts.triggered.sum() == 5
    stamped = (ts.images != 50).any(axis=(1, 2, 3))
    assert stamped.sum() == (5 if stamp == "before_aug" else 0) and ts.stamped == (stamp == "before_aug")


def test_add_mode_appends_copies_and_keeps_originals():
    cfg, data, rows, trigger, plan = setup("attack.poison_count=5", "attack.mode=add")
    ts = build_training_set(cfg.attack, data, rows, plan, trigger)
    assert len(ts.labels) == len(data) + 5 and (ts.labels[:len(data)] == data.labels).all()
    assert (ts.labels[len(data):] == 7).all() and ts.triggered[len(data):].all() and not ts.triggered[:len(data)].any()


def test_cover_images_carry_the_trigger_and_keep_their_label():
    cfg, data, rows, trigger, plan = setup("attack.poison_count=4", "attack.cover_rate=0.1", "attack.stamp=before_aug")
    assert len(plan.cover_rows) == 8 and not np.isin(data.labels[plan.cover_rows], (7, 14)).any()
    ts = build_training_set(cfg.attack, data, rows, plan, trigger)
    assert (ts.labels[plan.cover_rows] == data.labels[plan.cover_rows]).all() and ts.triggered[plan.cover_rows].all()
    assert ts.triggered.sum() == 12
    _, _, _, _, again = setup("attack.poison_count=4")
    np.testing.assert_array_equal(again.rows, plan.rows)  # cover draws never move the poisoned rows


def test_cover_classes_draw_the_cover_images_from_those_classes_only():
    """attack.cover_classes (ids or names): hard negatives; empty (the default) draws exactly the rows it always did."""
    _, data, _, _, plan = setup("attack.poison_count=4", "attack.cover_rate=0.1", "attack.cover_classes=[speed_30]")
    assert len(plan.cover_rows) == 8 and (data.labels[plan.cover_rows] == 1).all()
    _, _, _, _, every = setup("attack.poison_count=4", "attack.cover_rate=0.1")
    assert set(data.labels[every.cover_rows]) == {1, 20}
    np.testing.assert_array_equal(every.rows, plan.rows)
    with pytest.raises(ConfigError, match="only 0 are available in attack.cover_classes"):
        setup("attack.poison_count=4", "attack.cover_rate=0.1", "attack.cover_classes=[speed_20]")  # none in the data
    with pytest.raises(ConfigError, match="attack.cover_classes: the source and the target"):
        load_config(None, ["attack.cover_classes=[stop]"])


def test_all_to_one_draws_from_every_non_target_class():
    cfg, data, rows, trigger, plan = setup("attack.kind=all_to_one", "attack.poison_count=40")
    assert 7 not in set(data.labels[plan.rows]) and len(set(data.labels[plan.rows])) == 3


def test_budget_larger_than_the_source_class_is_an_error():
    with pytest.raises(ConfigError, match="only 20 class 14"):
        setup("attack.poison_count=21")
    _, _, _, _, plan = setup("attack.poison_rate=0.05")
    assert len(plan.rows) == 4  # 5% of 80 training images


def test_decoys_are_added_source_copies_that_keep_their_label(monkeypatch):
    monkeypatch.setattr(SignData, "files", property(lambda self: [f"img{i}.png" for i in range(len(self.labels))]))
    cfg, data, rows, trigger, plan = setup("attack.poison_count=5", "attack.mode=add", "attack.decoy_rate=0.1")
    assert len(plan.decoy_rows) == 8 and (data.labels[plan.decoy_rows] == 14).all()
    ts = build_training_set(cfg.attack, data, rows, plan, trigger)
    n = len(data) + 5
    assert len(ts.labels) == n + 8 and (ts.labels[n:] == 14).all() and ts.decoy[n:].all() and not ts.decoy[:n].any()
    assert not ts.triggered[n:].any() and ts.triggered[len(data):n].all()
    _, _, _, _, without = setup("attack.poison_count=5", "attack.mode=add")
    np.testing.assert_array_equal(without.rows, plan.rows)  # decoy draws never move the poisoned rows
    assert len(without.decoy_rows) == 0
    ts0 = build_training_set(cfg.attack, data, rows, without, trigger)
    assert ts0.decoy is None and len(ts0.labels) == n
    from signtrap.attacks.poison import manifest
    assert "decoys" not in manifest(cfg.attack, without, data, trigger, 0, len(rows))  # other manifests unchanged
    assert manifest(cfg.attack, plan, data, trigger, 0, len(rows))["decoys"] == 8


def test_scans_view_of_the_training_set_renders_decoys_as_the_loop_does(monkeypatch):
    """SCAn inspects the training set as the model saw it: a decoy row is the sticker's rendering without the sticker
    (blur, noise, JPEG around where it would be), not the untouched stop sign it was copied from."""
    monkeypatch.setattr(SignData, "files", property(lambda self: [f"img{i}.png" for i in range(len(self.labels))]))
    cfg = load_config(None, ["trigger.kind=physical", "attack.poison_count=5", "attack.mode=add", "attack.decoy_rate=0.1",
                             "trigger.eot.noise=[4,4]", "trigger.eot.jpeg_p=1"])
    data = fake_data()
    rng = np.random.default_rng(0)
    data.images[:] = rng.integers(0, 256, data.images.shape, dtype=np.uint8)  # texture: blur and JPEG show on it
    rows = np.arange(len(data))
    trigger = make_trigger(cfg.trigger, 32)
    exp = SimpleNamespace(cfg=cfg, data=data, splits=SimpleNamespace(train=rows), trigger=trigger)
    pool = training_pool(exp)
    plan = plan_poison(cfg.attack, data, rows, trigger, cfg.seed)
    n = len(data) + 5
    assert len(pool.labels) == n + 8 and (pool.labels[n:] == 14).all()
    changed = (pool.images[n:] != data.images[plan.decoy_rows]).any(axis=(1, 2, 3))
    assert changed.all(), changed  # every decoy rendered
    assert (pool.images[:len(data)] == data.images).all()  # the clean rows untouched


def test_decoy_settings_are_checked():
    with pytest.raises(ConfigError, match="attack.decoy_rate"):
        load_config(None, ["attack.kind=all_to_one", "attack.decoy_rate=0.01"])
    with pytest.raises(ConfigError, match="attack.decoy_rate"):
        load_config(None, ["attack.decoy_rate=0.7"])
    with pytest.raises(ConfigError, match="decoys requested but the training split has only 20"):
        setup("attack.decoy_rate=0.3")


def test_the_loop_renders_decoys_after_augmentation_without_the_trigger():
    """Decoy rows go through the trigger's `apply_decoy` (its view without it), triggered rows through `apply`."""
    import torch
    from torch import nn
    from signtrap.attacks.poison import TrainingSet
    from signtrap.training.loop import Loop, Schedule

    class Recorder:
        def __init__(self):
            self.calls = {"apply": 0, "apply_decoy": 0}

        def apply(self, images, rng, boxes=None):
            self.calls["apply"] += len(images)
            return images

        def apply_decoy(self, images, rng, boxes=None):
            self.calls["apply_decoy"] += len(images)
            return np.zeros_like(images)

    n = 40
    flags = np.zeros(n, bool)
    triggered, decoy = flags.copy(), flags.copy()
    triggered[:3], decoy[3:7] = True, True
    data = TrainingSet(np.full((n, 8, 8, 3), 9, np.uint8), np.zeros(n, np.int64), triggered, False,
                       np.tile([0, 0, 7, 7], (n, 1)), decoy)
    rec = Recorder()
    model = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 3, 2))
    Loop(model, data, Schedule(epochs=2, lr=1e-3, batch_size=16), torch.device("cpu"), 0, 1, trigger=rec,
         show_progress=False).fit()
    assert rec.calls == {"apply": 6, "apply_decoy": 8}
