import numpy as np
import pytest

from signtrap.config import load_config
from signtrap.errors import ConfigError
from signtrap.triggers import make_trigger
from signtrap.triggers.patch import stamp as stamp_patch

KINDS = ("checkerboard", "yellow_square", "white_square", "noise")


def trigger(*overrides, size=32):
    return make_trigger(load_config(None, list(overrides)).trigger, size)


def stamp(images, trig, positions):
    return stamp_patch(images, trig.pattern, trig.alpha, positions)


def place(trig, n, size, rng, rois=None):
    assert trig.image_size == size
    return trig.draw(n, rng, rois)


@pytest.mark.parametrize("kind", KINDS)
def test_stamp_changes_exactly_the_masked_pixels(kind):
    trig = trigger(f"trigger.kind={kind}", "trigger.size=6")
    images = np.full((3, 32, 32, 3), 77, np.uint8)
    positions = np.array([[0, 0], [10, 20], [26, 26]])
    out = stamp(images, trig, positions)
    assert out.dtype == np.uint8 and images[0, 0, 0, 0] == 77  # input untouched
    for image, (y, x) in zip(out, positions):
        mask = np.zeros((32, 32), bool)
        mask[y:y + 6, x:x + 6] = trig.alpha > 0
        changed = (image != 77).any(axis=2)
        assert not changed[~mask].any()
        np.testing.assert_array_equal(image[y:y + 6, x:x + 6][trig.alpha == 1], trig.pattern[trig.alpha == 1])


def test_batch_and_single_image_agree():
    trig = trigger("trigger.kind=noise", "trigger.opacity=0.6")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    positions = rng.integers(0, 27, (5, 2))
    batch = stamp(images, trig, positions)
    for i in range(5):
        np.testing.assert_array_equal(batch[i], stamp(images[i], trig, positions[i]))


def test_opacity_blends():
    trig = trigger("trigger.kind=white_square", "trigger.size=4", "trigger.opacity=0.5")
    out = stamp(np.zeros((32, 32, 3), np.uint8), trig, np.array([0, 0]))
    assert set(np.unique(out[:4, :4])) == {128}


def test_size_in_pixels_or_fraction_and_too_large():
    assert trigger("trigger.size=7").shape == (7, 7)
    assert trigger("trigger.size=0.25").shape == (8, 8)
    with pytest.raises(ConfigError, match="does not fit"):
        trigger("trigger.size=40")


def test_placements_stay_inside_image_and_sign():
    rng = np.random.default_rng(0)
    corner = trigger("trigger.size=5", "trigger.corner=top_left", "trigger.margin=2")
    assert (place(corner, 3, 32, rng) == [[2, 2]] * 3).all()
    rand = trigger("trigger.size=5", "trigger.placement=random")
    pos = place(rand, 500, 32, rng)
    assert pos.min() >= 1 and pos.max() <= 32 - 5 - 1 and len(np.unique(pos, axis=0)) > 50
    on_sign = trigger("trigger.size=5", "trigger.placement=on_sign")
    rois = np.tile([8, 10, 24, 26], (200, 1))
    pos = place(on_sign, 200, 32, rng, rois)
    assert (pos[:, 1] >= 8).all() and (pos[:, 1] + 5 <= 24).all() and (pos[:, 0] >= 10).all() and (pos[:, 0] + 5 <= 26).all()


def test_sticker_png_with_alpha(tmp_path):
    import cv2

    sticker = np.zeros((20, 20, 4), np.uint8)
    sticker[..., 2] = 255  # red in BGR
    sticker[5:15, 5:15, 3] = 255  # opaque centre, transparent border
    cv2.imwrite(str(tmp_path / "s.png"), sticker)
    trig = trigger("trigger.kind=sticker", f"trigger.sticker={tmp_path / 's.png'}", "trigger.size=10")
    assert trig.alpha[0, 0] == 0 and trig.alpha[5, 5] == 1 and tuple(trig.pattern[5, 5]) == (255, 0, 0)
    out = stamp(np.zeros((32, 32, 3), np.uint8), trig, np.array([0, 0]))
    assert out[0, 0].sum() == 0 and tuple(out[5, 5]) == (255, 0, 0)


def test_blend_mixes_the_whole_frame_with_a_fixed_key():
    trig = trigger("trigger.kind=blend", "trigger.alpha=0.25")
    images = np.zeros((2, 32, 32, 3), np.uint8)
    out = trig.apply(images, np.random.default_rng(0))
    np.testing.assert_array_equal(out[0], out[1])  # the same key everywhere: nothing drawn per image
    np.testing.assert_array_equal(out[0], np.rint(trig.key * 0.25).astype(np.uint8))
    with pytest.raises(ConfigError, match=r"trigger.alpha: 1.5 is outside"):
        trigger("trigger.kind=blend", "trigger.alpha=1.5")
    with pytest.raises(ConfigError, match="unknown config key 'trigger.placement'"):
        trigger("trigger.kind=blend", "trigger.placement=corner")  # a patch's setting is not the blend's


def test_unknown_trigger_kind_suggests_a_registered_one():
    with pytest.raises(ConfigError, match="did you mean 'blend'"):
        trigger("trigger.kind=blnd")


def test_a_trigger_registered_in_a_test_trains_a_tiny_run(tmp_path):
    """A new trigger is one file (here: this test) plus nothing elsewhere: registered, configured, trained, evaluated."""
    from dataclasses import dataclass

    from conftest import tiny_overrides
    from signtrap.config import require
    from signtrap.fileio import read_json
    from signtrap.training.trainer import train
    from signtrap.triggers import Trigger, register_trigger

    @dataclass
    class BarSettings:
        width: int = 3

        def check(self, key: str = "trigger") -> None:
            require(1 <= self.width <= 8, f"{key}.width", "must be in 1..8")

    @register_trigger("test-bar", settings=BarSettings)
    class Bar(Trigger):
        """A magenta vertical bar at a drawn column."""

        def draw(self, n, rng, boxes=None):
            return rng.integers(0, self.image_size - self.settings.width, (n, 1))

        def render(self, images, params, boxes=None):
            out = np.array(images, copy=True)
            for i, (x,) in enumerate(np.asarray(params, np.int64)):
                out[i, :, x:x + self.settings.width] = (255, 0, 255)
            return out

    overrides = [o for o in tiny_overrides(tmp_path, "bar") if not o.startswith("trigger.")]
    run = train(load_config(None, [*overrides, "trigger.kind=test-bar", "trigger.width=4", "train.threads=1"]))
    metrics = read_json(run / "metrics.json")
    manifest = read_json(run / "manifest.json")
    assert manifest["trigger"] == {"kind": "test-bar", "width": 4}
    assert all(len(p) == 1 for p in manifest["positions"])  # the drawn column of each poisoned row
    assert metrics["test"]["asr"]["rate"] > 0.5  # a magenta bar is an easy trigger to learn
