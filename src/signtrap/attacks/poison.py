"""Poisoning plans: which training rows carry the trigger and the target label, fixed by a seed."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from signtrap.attacks.triggers import Trigger, place, stamp
from signtrap.classes import CLASS_NAMES
from signtrap.config import AttackConfig
from signtrap.data.cache import SignData
from signtrap.errors import ConfigError

POISON_STREAM = 0xB0150  # keeps poison draws independent of the other uses of the run seed


@dataclass(frozen=True)
class PoisonPlan:
    rows: np.ndarray  # cache rows (from the training split) that are poisoned
    positions: np.ndarray  # (n, 2) trigger top-left per poisoned row, used when stamping before augmentation
    target: int


@dataclass(frozen=True)
class TrainingSet:
    """What the training loop sees: images already in memory, labels after poisoning."""

    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int64
    triggered: np.ndarray  # bool: this row is poisoned
    stamped: bool  # whether triggered rows already carry the trigger (stamp before augmentation)
    rois: np.ndarray


def poison_budget(cfg: AttackConfig, n_train: int) -> int:
    if not cfg.active:
        return 0
    return int(cfg.poison_count) if cfg.poison_count is not None else int(round(cfg.poison_rate * n_train))


def candidate_rows(cfg: AttackConfig, labels: np.ndarray, train_rows: np.ndarray) -> np.ndarray:
    if cfg.kind == "source_specific":
        return train_rows[labels[train_rows] == cfg.source]
    return train_rows[labels[train_rows] != cfg.target]


def plan_poison(cfg: AttackConfig, data: SignData, train_rows: np.ndarray, trigger: Trigger, seed: int) -> PoisonPlan:
    n = poison_budget(cfg, len(train_rows))
    candidates = candidate_rows(cfg, data.labels, train_rows)
    if n > len(candidates):
        what = f"class {cfg.source} ({CLASS_NAMES[cfg.source]})" if cfg.kind == "source_specific" else "non-target"
        raise ConfigError(
            f"config attack: {n} poisoned images requested but the training split has only {len(candidates)} {what} images"
        )
    rng = np.random.default_rng([seed, POISON_STREAM])
    rows = np.sort(rng.choice(candidates, size=n, replace=False)) if n else np.empty(0, np.int64)
    positions = place(trigger, n, data.size, rng, data.rois[rows] if n else None)
    return PoisonPlan(rows.astype(np.int64), positions.astype(np.int64), cfg.target)


def build_training_set(cfg: AttackConfig, data: SignData, train_rows: np.ndarray, plan: PoisonPlan, trigger: Trigger) -> TrainingSet:
    images = np.array(data.images[train_rows])  # into memory: training never touches files again
    labels = data.labels[train_rows].astype(np.int64)
    rois = np.array(data.rois[train_rows])
    triggered = np.zeros(len(train_rows), bool)
    before = cfg.stamp == "before_aug"
    if len(plan.rows):
        where = np.searchsorted(train_rows, plan.rows)
        poisoned = stamp(images[where], trigger, plan.positions) if before else images[where]
        if cfg.mode == "replace":
            images[where], labels[where], triggered[where] = poisoned, plan.target, True
        else:
            images = np.concatenate([images, poisoned])
            labels = np.concatenate([labels, np.full(len(where), plan.target, np.int64)])
            triggered = np.concatenate([triggered, np.ones(len(where), bool)])
            rois = np.concatenate([rois, rois[where]])
    return TrainingSet(images, labels, triggered, before, rois)


def manifest(cfg: AttackConfig, plan: PoisonPlan, data: SignData, trigger: Trigger, seed: int, n_train: int) -> dict:
    files = data.files
    return {
        "attack": {"kind": cfg.kind, "source": cfg.source, "target": cfg.target, "mode": cfg.mode, "stamp": cfg.stamp,
                   "poison_rate": cfg.poison_rate, "poison_count": cfg.poison_count},
        "seed": seed,
        "train_rows": n_train,
        "poisoned": len(plan.rows),
        "poisoned_fraction": len(plan.rows) / max(n_train, 1),
        "trigger": trigger.spec,
        "rows": plan.rows.tolist(),
        "positions": plan.positions.tolist(),
        "source_files": [files[r] for r in plan.rows],
        "original_labels": data.labels[plan.rows].tolist(),
        "data_hash": data.data_hash,
    }
