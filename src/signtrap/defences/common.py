"""What the defences share: the clean budget, the context, training settings and `fit` (the one loop,
`signtrap.loop.Loop`, with persistence curves), patches, curve files."""
from __future__ import annotations

import csv
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import matplotlib
import numpy as np
import torch
from torch import nn

from signtrap.config import AugConfig, require
from signtrap.errors import SigntrapError
from signtrap.experiment import EvalSet, predict
from signtrap.loop import Hooks, Loop, Schedule, clean_training_set
from signtrap.metrics import backdoor_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

CURVE_KEYS = ("clean_acc", "asr", "stop_recall", "false_trigger")


@dataclass
class CleanData:
    """The defender's clean budget: un-poisoned images (uint8 NHWC) with their true labels."""

    images: np.ndarray
    labels: np.ndarray
    rows: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, np.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) == 0:
            raise SigntrapError("the defender's clean budget is empty")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DefenceContext:
    """Everything a defence may need besides the model and its clean data.

    `source`/`target` describe the behaviour the defender worries about (stop read as 100 km/h), never
    the trigger. `monitor` (clean and triggered images of a held-out split) is for measurement only:
    curves and reports use it, no defence decision may.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    source: int = 14
    target: int = 7
    all_to_one: bool = False
    seed: int = 0
    monitor: EvalSet | None = None
    evaluation: EvalSet | None = None  # the test split, for measuring input filters (strip)
    eval_batch_size: int = 512
    show_progress: bool = True
    aug: AugConfig = field(default_factory=AugConfig)  # the run's augmentation: defences train with it
    precision: str = "auto"  # the run's train.precision: defences train with it

    def measure(self, model: nn.Module) -> dict:
        """Clean accuracy, ASR, stop recall and false-trigger rate on the monitor split (empty without one)."""
        if self.monitor is None:
            return {}
        m = self.monitor
        clean = predict(model, m.images, self.device, self.eval_batch_size)
        trig = predict(model, m.triggered, self.device, self.eval_batch_size)
        metrics = backdoor_metrics(m.labels, clean, trig, self.source, self.target, self.all_to_one, details=False)
        return {key: metrics[key]["rate"] for key in CURVE_KEYS}


@dataclass
class DefenceResult:
    """A defence's outcome: the repaired model (None when it does not repair), a JSON-able report,
    curves ({name: list of row dicts}) and artefacts ({file name: bytes or ndarray image})."""

    model: nn.Module | None
    report: dict = field(default_factory=dict)
    curves: dict[str, list[dict]] = field(default_factory=dict)
    artefacts: dict[str, Any] = field(default_factory=dict)
    filtered_metrics: dict | None = None  # for input filters (strip): metrics with the filter in place


# ---------------------------------------------------------------- training


@dataclass
class TrainSettings:
    """The settings every defence that trains shares; a defence's settings dataclass extends it."""

    epochs: int = 10
    lr: float = 1e-3  # AdamW, cosine-decayed to zero
    batch_size: int = 64
    weight_decay: float = 5e-4
    augment: bool = True  # the run's `aug:` settings; false: no augmentation

    def check(self, key: str) -> None:
        check_training(key, self.epochs, self.lr, self.batch_size)
        require(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")

    def schedule(self, key: str, epochs: int | None = None, lr: float | None = None) -> Schedule:
        return Schedule(epochs=self.epochs if epochs is None else epochs, lr=self.lr if lr is None else lr,
                        batch_size=self.batch_size, weight_decay=self.weight_decay, lr_key=f"{key}.lr")


def check_training(key: str, epochs: int, lr: float, batch_size: int, min_epochs: int = 1, epochs_key: str = "epochs",
                   lr_key: str = "lr") -> None:
    require(min_epochs <= epochs <= 1000, f"{key}.{epochs_key}", f"{epochs} is outside {min_epochs}..1000")
    require(0.0 < lr <= 1.0, f"{key}.{lr_key}", f"{lr} is outside (0, 1]")
    require(1 <= batch_size <= 65_536, f"{key}.batch_size", f"{batch_size} is outside 1..65536")


def check_finite(loss: torch.Tensor, method: str, where: str) -> None:
    if not torch.isfinite(loss):
        raise SigntrapError(f"defence {method} diverged {where} (loss {loss.item()}); lower defend.{method}.lr")


def stream_of(method: str) -> int:
    """A fixed random stream per defence name, so two defences never share randomness."""
    return zlib.crc32(method.encode())


def fit(model: nn.Module, clean: CleanData, ctx: DefenceContext, *, method: str, schedule: Schedule, augment: bool = True,
        hooks: Hooks | None = None, probe: Callable[[nn.Module], dict] | None = None, frozen_bn: bool = False,
        stream: int | None = None) -> list[dict]:
    """Train `model` in place on the clean budget through the one loop; returns one curve row per epoch (row 0: before).

    The run's `train.precision` and `aug:` settings reach the loop through `ctx`; `hooks.batch` may rewrite
    a batch (stamp patches), `hooks.loss` replaces cross-entropy (PGD, distillation), `hooks.after_step`
    re-applies constraints (pruning masks); every row carries the monitor metrics plus `probe(model)`.
    """
    hooks = hooks or Hooks()

    def columns(m: nn.Module) -> dict:
        return {**ctx.measure(m), **(probe(m) if probe is not None else {})}

    hooks.probe = columns
    loop = Loop(model, clean_training_set(clean.images, clean.labels), schedule, ctx.device, ctx.seed,
                stream_of(method) if stream is None else stream, aug=ctx.aug if augment else AugConfig(enabled=False),
                precision=ctx.precision, hooks=hooks, frozen_bn=frozen_bn, desc=method, show_progress=ctx.show_progress)
    return loop.fit(measure_start=True)


# ---------------------------------------------------------------- patches (pixel space, float NCHW in [0, 1])


POSITIONS = ("top_left", "top_right", "bottom_left", "bottom_right", "centre")


def patch_origin(position: str, side: int, image_size: int, margin: int = 1) -> tuple[int, int]:
    far = image_size - side - margin
    mid = (image_size - side) // 2
    return {"top_left": (margin, margin), "top_right": (margin, far), "bottom_left": (far, margin),
            "bottom_right": (far, far), "centre": (mid, mid)}[position]


def apply_patch(x: torch.Tensor, patch: torch.Tensor, origin: tuple[int, int]) -> torch.Tensor:
    """Paste a (3, s, s) patch at (y, x) into a batch; differentiable in the patch."""
    y0, x0 = origin
    s = patch.shape[-1]
    out = x.clone()
    out[:, :, y0:y0 + s, x0:x0 + s] = patch.unsqueeze(0).expand(len(x), -1, -1, -1)
    return out


def apply_mask(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Neural Cleanse's trigger: (1 - m) * x + m * p with m (1, H, W) and p (3, H, W) in [0, 1]."""
    return (1 - mask) * x + mask * pattern


@torch.no_grad()
def target_rate(model: nn.Module, x: torch.Tensor, target: int, batch_size: int = 512) -> float:
    """Share of a float batch classified as `target`."""
    if len(x) == 0:
        return float("nan")
    was = model.training
    model.eval()
    hits = sum(int((model(x[i:i + batch_size]).argmax(1) == target).sum()) for i in range(0, len(x), batch_size))
    model.train(was)
    return hits / len(x)


# ---------------------------------------------------------------- curves on disk


def write_curve_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in keys})


def plot_curve(path: Path, rows: list[dict], x_key: str, title: str) -> None:
    skip = {x_key, "loss", "seconds", "epoch", "pruned", "channels", "threshold", "round"}
    ys = [k for k in rows[0] if k not in skip and any(isinstance(r.get(k), (int, float)) and r.get(k) is not None for r in rows)]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for key in ys:
        pts = [(r[x_key], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=key)
    ax.set_xlabel(x_key.replace("_", " "))
    ax.set_ylabel("rate")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def to_uint8_image(chw: torch.Tensor | np.ndarray, scale: int = 1) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H*scale, W*scale, 3) uint8."""
    arr = chw.detach().cpu().float().numpy() if isinstance(chw, torch.Tensor) else np.asarray(chw, np.float32)
    if arr.shape[0] == 1:
        arr = np.repeat(arr, 3, axis=0)
    img = np.clip(np.rint(arr.transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8)
    return img.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else img
