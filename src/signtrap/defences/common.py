"""What the defences share: the clean budget, the context, a fine-tuning loop with persistence curves, patches."""
from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from signtrap.config import AugConfig
from signtrap.errors import SigntrapError
from signtrap.experiment import EvalSet, predict, to_tensor
from signtrap.metrics import backdoor_metrics
from signtrap.progress import progress

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


def check_finite(loss: torch.Tensor, method: str, where: str) -> None:
    if not torch.isfinite(loss):
        raise SigntrapError(f"defence {method} diverged {where} (loss {loss.item()}); lower defend.{method.replace('-', '_')}.lr")


def _augmenter(enabled: bool, seed: int):
    from signtrap.augment import build_augmentation

    return build_augmentation(AugConfig(), seed) if enabled else None


def fit(model: nn.Module, clean: CleanData, ctx: DefenceContext, *, method: str, epochs: int, lr: float, batch_size: int,
        weight_decay: float = 5e-4, augment: bool = True,
        batch_hook: Callable[[torch.Tensor, torch.Tensor, np.random.Generator], tuple[torch.Tensor, torch.Tensor]] | None = None,
        loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        after_step: Callable[[], None] | None = None,
        probe: Callable[[nn.Module], dict] | None = None) -> list[dict]:
    """Fine-tune `model` in place on the clean budget (AdamW, cosine to zero); returns one curve row per epoch.

    `batch_hook(x, y, rng)` may rewrite a batch (stamp patches); `loss_fn(model, x, y)` replaces plain
    cross-entropy (PGD); `after_step` re-applies constraints (pruning masks); `probe(model)` adds columns.
    """
    from signtrap.augment import augment_batch

    device = ctx.device
    rng = np.random.default_rng([ctx.seed, 0xF17E, sum(map(ord, method))])
    torch.manual_seed(int(rng.integers(2**31)))
    augmenter = _augmenter(augment, int(rng.integers(2**31)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(clean) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    use_amp = device.type == "cuda"
    curve = [_curve_row(0, None, model, ctx, probe)]
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(clean))
        loss_sum, seen, start = 0.0, 0, time.perf_counter()
        bar = progress(len(order), f"{method} epoch {epoch + 1}/{epochs}", enabled=ctx.show_progress)
        for first in range(0, len(order), batch_size):
            idx = order[first:first + batch_size]
            images = clean.images[idx]
            if augmenter is not None:
                images = augment_batch(images, augmenter)
            x = to_tensor(images, device)
            y = torch.from_numpy(clean.labels[idx]).to(device)
            if batch_hook is not None:
                x, y = batch_hook(x, y, rng)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = loss_fn(model, x, y) if loss_fn is not None else F.cross_entropy(model(x).float(), y)
            check_finite(loss, method, f"at epoch {epoch + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step()
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
            bar.update(len(idx))
        bar.close()
        curve.append(_curve_row(epoch + 1, loss_sum / seen, model, ctx, probe, time.perf_counter() - start))
    model.eval()
    return curve


def _curve_row(epoch: int, loss: float | None, model: nn.Module, ctx: DefenceContext, probe, seconds: float = 0.0) -> dict:
    row = {"epoch": epoch, "loss": None if loss is None else round(loss, 5), "seconds": round(seconds, 2), **ctx.measure(model)}
    if probe is not None:
        row.update(probe(model))
    return row


# ---------------------------------------------------------------- patches (pixel space, float NCHW in [0, 1])


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
