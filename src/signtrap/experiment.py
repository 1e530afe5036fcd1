"""The pieces every stage derives from a config: data, splits, trigger, evaluation sets, the defender's budget."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from signtrap.config import RunConfig, load_config
from signtrap.data.cache import SignData, load
from signtrap.data.splits import Splits
from signtrap.errors import ConfigError, SigntrapError
from signtrap.evaluation.metrics import backdoor_metrics
from signtrap.machine.environment import autocast
from signtrap.triggers import Trigger, make_trigger

EVAL_STREAM = 0xE7A1
DEFENDER_STREAM = 0xDEF0


@dataclass(frozen=True)
class EvalSet:
    """Clean images and the same images carrying the trigger (uint8), with their true labels."""

    name: str
    images: np.ndarray
    triggered: np.ndarray
    labels: np.ndarray


@dataclass
class Experiment:
    cfg: RunConfig
    data: SignData
    splits: Splits
    trigger: Trigger
    _eval_sets: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: RunConfig, progress: bool = True) -> "Experiment":
        data = load(cfg.data, progress=progress)
        splits = data.splits(cfg.data.val_fraction, cfg.seed)
        for split, rows in (("train", splits.train), ("test", splits.test)):
            if len(rows) == 0:
                raise SigntrapError(f"{data.path}: the {split} split is empty")
        return cls(cfg, data, splits, make_trigger(cfg.trigger, data.size))

    @property
    def classes(self):
        """The dataset's label space (signtrap.datasets.LabelSpace)."""
        return self.data.classes

    def eval_set(self, split: str) -> EvalSet:
        if split not in self._eval_sets:
            rows = {"val": self.splits.val, "test": self.splits.test, "train": self.splits.train}[split]
            images = np.array(self.data.images[rows])
            rng = np.random.default_rng([self.cfg.seed, EVAL_STREAM, {"train": 0, "val": 1, "test": 2}[split]])
            triggered = self.trigger.apply(images, rng, self.data.rois[rows])
            self._eval_sets[split] = EvalSet(split, images, triggered, self.data.labels[rows].astype(np.int64))
        return self._eval_sets[split]

    def defender_rows(self, fraction: float, seed: int | None = None) -> np.ndarray:
        """The defender's clean budget: whole tracks of the training split, never validation or test rows."""
        seed = self.cfg.seed if seed is None else seed
        train = self.splits.train
        n = int(round(fraction * len(train)))
        if n < 1 or n > len(train):
            raise ConfigError(f"config defend.clean_fraction: {fraction} of {len(train)} training images is {n} images; need 1..{len(train)}")
        rng = np.random.default_rng([seed, DEFENDER_STREAM])
        # whole tracks in a seeded order until the budget is met, so no physical sign is split across budgets
        tracks, inverse = np.unique(self.data.tracks[train], return_inverse=True)
        track_rank = rng.permutation(len(tracks))[inverse]
        order = train[np.argsort(track_rank, kind="stable")]
        return np.sort(order[:n])

    def evaluate(self, model: nn.Module, split: str, device: torch.device | str = "cpu", details: bool = True) -> dict:
        s = self.eval_set(split)
        clean = predict(model, s.images, device, self.cfg.train.eval_batch_size)
        trig = predict(model, s.triggered, device, self.cfg.train.eval_batch_size)
        a = self.cfg.attack
        metrics = backdoor_metrics(s.labels, clean, trig, a.source, a.target, all_to_one=a.kind == "all_to_one", details=details,
                                   num_classes=self.classes.num_classes)
        metrics["split"] = split
        return metrics


def to_tensor(images: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1]; the permuted view is channels-last in memory already."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)


# On a CPU, inference runs in chunks of at most this many images whatever the batch size asked: signnet at 32 x 32 on
# 2 cores predicts 4,650 images/s in chunks of 128 against 2,450 in batches of 512 (the activations stay in cache;
# benchmarks/eval_throughput.py), with the same logits bit for bit (tests/test_train.py).
CPU_EVAL_CHUNK = 128


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, device: torch.device | str = "cpu", batch_size: int = 512,
                   amp: torch.dtype | None = None) -> np.ndarray:
    """The model's logits (float32) for uint8 NHWC `images`; in fp32 unless `amp` names an autocast dtype (a
    defence's own forward passes in the run's training precision: `DefenceContext.predict`)."""
    was_training = model.training
    model.eval()
    out = []
    kind = torch.device(device).type
    if kind == "cpu":
        batch_size = min(batch_size, CPU_EVAL_CHUNK)
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start:start + batch_size], device)
        with autocast(kind, amp):
            out.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def predict(model: nn.Module, images: np.ndarray, device: torch.device | str = "cpu", batch_size: int = 512,
            amp: torch.dtype | None = None) -> np.ndarray:
    logits = predict_logits(model, images, device, batch_size, amp)
    return logits.argmax(axis=1) if len(logits) else np.zeros(0, np.int64)


def load_run_config(run_dir: Path) -> RunConfig:
    """The resolved config stored in a run directory (or its parent, for a defence's output folder)."""
    run_dir = Path(run_dir)
    for candidate in (run_dir / "config.yaml", run_dir.parent / "config.yaml"):
        if candidate.is_file():
            return load_config(candidate)
    raise SigntrapError(f"{run_dir}: not a run directory (no config.yaml); run `signtrap train` first")
