"""Triggers, one file each, registered by name when their module is imported (`@register_trigger`).

A trigger owns its settings dataclass and one way to put itself on a batch of uint8 NHWC images:

    @dataclass
    class BlendSettings:
        alpha: float = 0.1
        def check(self, key: str) -> None: ...

    @register_trigger("blend", settings=BlendSettings)
    class Blend(Trigger):
        def draw(self, n, rng, boxes): ...          # per-image parameters, (n, k) array
        def render(self, images, params, boxes): ...  # deterministic

`apply(images, rng, boxes)` is `render(images, draw(n, rng, boxes), boxes)`: the poisoning plan records the
drawn parameters of every poisoned row (so the manifest shows where each trigger went), the training loop,
the evaluation sets, the probe, the defences, export calibration and the report call `apply` or `render`,
never a pattern-specific function. `boxes` are the signs' boxes (x1, y1, x2, y2 in the image's pixels):
a trigger that lives on the sign (a sticker) uses them; a frame-fixed one ignores them.

The config section is `trigger: {kind: NAME, ...that trigger's settings}`; `kind` picks the plugin.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from signtrap.errors import ConfigError
from signtrap.plugins import TRIGGERS


class Trigger:
    """A trigger bound to its settings and the data's image side."""

    moves_with_sign: ClassVar[bool] = False  # True: it belongs on the sign (applied before augmentation)

    def __init__(self, name: str, settings: Any, image_size: int):
        self.name, self.settings, self.image_size = name, settings, int(image_size)

    def draw(self, n: int, rng: np.random.Generator, boxes: np.ndarray | None = None) -> np.ndarray:
        """Per-image parameters (n, k) of `n` applications; all randomness comes from `rng`."""
        return np.zeros((n, 0), np.float64)

    def render(self, images: np.ndarray, params: np.ndarray, boxes: np.ndarray | None = None) -> np.ndarray:
        """The images (uint8, (N, H, W, 3) or one (H, W, 3)) carrying the trigger; a new array."""
        raise NotImplementedError

    def apply(self, images: np.ndarray, rng: np.random.Generator, boxes: np.ndarray | None = None) -> np.ndarray:
        single = np.asarray(images).ndim == 3
        batch = np.asarray(images)[None] if single else np.asarray(images)
        boxes = None if boxes is None else np.asarray(boxes, np.int64).reshape(-1, 4)
        out = self.render(batch, self.draw(len(batch), rng, boxes), boxes)
        return out[0] if single else out

    def render_decoy(self, images: np.ndarray, params: np.ndarray, boxes: np.ndarray | None = None) -> np.ndarray:
        """The images as `render` leaves them with the trigger itself left out (a decoy, `attack.decoy_rate`): what
        rendering does around a trigger besides drawing it (a physical sticker's local blur, noise and JPEG). A trigger
        that only draws itself leaves the images unchanged (a copy)."""
        return np.array(images, copy=True)

    def apply_decoy(self, images: np.ndarray, rng: np.random.Generator, boxes: np.ndarray | None = None) -> np.ndarray:
        """`render_decoy` at freshly drawn parameters (the loop's decoys, after augmentation)."""
        boxes = None if boxes is None else np.asarray(boxes, np.int64).reshape(-1, 4)
        return self.render_decoy(images, self.draw(len(images), rng, boxes), boxes)

    def preview(self, background: int = 128) -> np.ndarray:
        """The trigger on a flat grey image (for reports and PNG previews)."""
        side = self.image_size
        grey = np.full((1, side, side, 3), background, np.uint8)
        return self.apply(grey, np.random.default_rng(0), np.array([[0, 0, side, side]]))[0]

    @property
    def spec(self) -> dict:
        """JSON-able description: the plugin's name and settings (recorded in manifests and checkpoints)."""
        return {"kind": self.name, **asdict(self.settings)}


@dataclass(frozen=True)
class TriggerPlugin:
    name: str
    cls: type
    settings: type
    module: str = ""
    doc: str = field(default="", repr=False)

    def build(self, settings: Any, image_size: int) -> Trigger:
        if not isinstance(settings, self.settings):
            raise ConfigError(f"trigger {self.name}: settings must be a {self.settings.__name__}, got {type(settings).__name__}")
        return self.cls(self.name, settings, image_size)


def register_trigger(*names: str, settings: type) -> Callable[[type], type]:
    """Class decorator: register a Trigger subclass under one or more names (each its own `trigger.kind`)."""
    def wrap(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Trigger)):
            raise TypeError(f"@register_trigger needs a Trigger subclass, got {cls!r}")
        for name in names:
            TRIGGERS.register(name, TriggerPlugin(name, cls, settings, cls.__module__, (cls.__doc__ or "").strip()))
        return cls
    return wrap


def make_trigger(cfg: Any, image_size: int) -> Trigger:
    """The trigger a config's `trigger:` section describes (a signtrap.config.TriggerConfig), for `image_size` images."""
    trigger = TRIGGERS.get(cfg.kind).build(cfg.settings, image_size)
    check_fits = getattr(trigger, "check_fits", None)
    if check_fits is not None:
        check_fits()
    return trigger


def list_triggers() -> list[str]:
    return TRIGGERS.names()


__all__ = ["Trigger", "TriggerPlugin", "list_triggers", "make_trigger", "register_trigger"]
