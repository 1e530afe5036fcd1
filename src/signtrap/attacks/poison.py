"""Poisoning plans: which training rows carry the trigger and the target label, fixed by a seed."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from signtrap.config import AttackConfig
from signtrap.data.cache import SignData
from signtrap.errors import ConfigError
from signtrap.triggers import Trigger

POISON_STREAM = 0xB0150  # keeps poison draws independent of the other uses of the run seed
COVER_STREAM = 0xC0FE
DECOY_STREAM = 0xDEC0


@dataclass(frozen=True)
class PoisonPlan:
    rows: np.ndarray  # cache rows (from the training split) that are poisoned: trigger + target label
    params: np.ndarray  # (n, k) the trigger's drawn parameters per poisoned row (a patch: its top-left y, x), used before augmentation
    target: int
    cover_rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # trigger + true label
    cover_params: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))
    decoy_rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # trigger's view without it + true label
    decoy_params: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))


@dataclass(frozen=True)
class TrainingSet:
    """What the training loop sees: images already in memory, labels after poisoning."""

    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int64
    triggered: np.ndarray  # bool: this row carries the trigger (poisoned, or a cover image keeping its label)
    stamped: bool  # whether triggered rows already carry the trigger (stamp before augmentation)
    rois: np.ndarray
    decoy: np.ndarray | None = None  # bool: this row carries the trigger's view without the trigger (attack.decoy_rate)

    def render(self, images: np.ndarray, idx: np.ndarray, trigger, rng: np.random.Generator) -> np.ndarray:
        """`images` (the rows `idx` of this set, as the model is to see them), with the trigger rendered on the
        triggered rows and the decoys' view on the decoy rows, in place, when the set is not stamped already: the
        training loop's batches (after augmentation) and SCAn's view of the whole set use this one rendering."""
        if self.stamped:
            return images
        if self.triggered[idx].any():
            hit = np.flatnonzero(self.triggered[idx])
            images[hit] = trigger.apply(images[hit], rng, self.rois[idx][hit])
        if self.decoy is not None and self.decoy[idx].any():  # the trigger's view, not the trigger
            hit = np.flatnonzero(self.decoy[idx])
            images[hit] = trigger.apply_decoy(images[hit], rng, self.rois[idx][hit])
        return images


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
        what = data.classes.describe(cfg.source) if cfg.kind == "source_specific" else "non-target"
        raise ConfigError(
            f"config attack: {n} poisoned images requested but the training split has only {len(candidates)} {what} images"
        )
    rng = np.random.default_rng([seed, POISON_STREAM])
    rows = np.sort(rng.choice(candidates, size=n, replace=False)) if n else np.empty(0, np.int64)
    params = trigger.draw(n, rng, data.rois[rows] if n else None)
    cover_rows, cover_params = _plan_cover(cfg, data, train_rows, trigger, seed)
    decoy_rows, decoy_params = _plan_decoys(cfg, data, train_rows, trigger, seed)
    return PoisonPlan(rows.astype(np.int64), params, cfg.target, cover_rows, cover_params, decoy_rows, decoy_params)


def _plan_cover(cfg: AttackConfig, data: SignData, train_rows: np.ndarray, trigger: Trigger, seed: int):
    """Triggered images of other classes that keep their label, so the trigger alone does not mean 'target'."""
    n = int(round(cfg.cover_rate * len(train_rows))) if cfg.active and cfg.kind == "source_specific" else 0
    others = train_rows[~np.isin(data.labels[train_rows], (cfg.source, cfg.target))]
    if cfg.cover_classes:
        others = others[np.isin(data.labels[others], cfg.cover_classes)]
    if n > len(others):
        raise ConfigError(f"config attack.cover_rate: {n} cover images requested but only {len(others)} are available"
                          + (" in attack.cover_classes" if cfg.cover_classes else ""))
    rng = np.random.default_rng([seed, COVER_STREAM])
    rows = np.sort(rng.choice(others, size=n, replace=False)) if n else np.empty(0, np.int64)
    return rows.astype(np.int64), trigger.draw(n, rng, data.rois[rows] if n else None)


def _plan_decoys(cfg: AttackConfig, data: SignData, train_rows: np.ndarray, trigger: Trigger, seed: int):
    """Source-class images to be added with the trigger's view but not the trigger, true label kept (none by default)."""
    n = int(round(cfg.decoy_rate * len(train_rows))) if cfg.active and cfg.kind == "source_specific" else 0
    sources = train_rows[data.labels[train_rows] == cfg.source]
    if n > len(sources):
        raise ConfigError(f"config attack.decoy_rate: {n} decoys requested but the training split has only {len(sources)} "
                          f"{data.classes.describe(cfg.source)} images")
    rng = np.random.default_rng([seed, DECOY_STREAM])
    rows = np.sort(rng.choice(sources, size=n, replace=False)) if n else np.empty(0, np.int64)
    return rows.astype(np.int64), trigger.draw(n, rng, data.rois[rows] if n else None)


def build_training_set(cfg: AttackConfig, data: SignData, train_rows: np.ndarray, plan: PoisonPlan, trigger: Trigger) -> TrainingSet:
    images = np.array(data.images[train_rows])  # into memory: training never touches files again
    labels = data.labels[train_rows].astype(np.int64)
    rois = np.array(data.rois[train_rows])
    triggered = np.zeros(len(train_rows), bool)
    before = cfg.stamp == "before_aug"
    for rows, params, relabel in ((plan.rows, plan.params, True), (plan.cover_rows, plan.cover_params, False)):
        if not len(rows):
            continue
        where = np.searchsorted(train_rows, rows)
        changed = trigger.render(images[where], params, rois[where]) if before else images[where]
        new_labels = np.full(len(where), plan.target, np.int64) if relabel else labels[where]
        if cfg.mode == "replace":
            images[where], labels[where], triggered[where] = changed, new_labels, True
        else:
            images = np.concatenate([images, changed])
            labels = np.concatenate([labels, new_labels])
            triggered = np.concatenate([triggered, np.ones(len(where), bool)])
            rois = np.concatenate([rois, rois[where]])
    decoy = None
    if len(plan.decoy_rows):  # always added copies of the untouched images: a decoy never replaces a clean image
        originals, boxes = np.array(data.images[plan.decoy_rows]), np.array(data.rois[plan.decoy_rows])
        decoys = trigger.render_decoy(originals, plan.decoy_params, boxes) if before else originals
        decoy = np.concatenate([np.zeros(len(labels), bool), np.ones(len(decoys), bool)])
        images = np.concatenate([images, decoys])
        labels = np.concatenate([labels, data.labels[plan.decoy_rows].astype(np.int64)])
        triggered = np.concatenate([triggered, np.zeros(len(decoys), bool)])
        rois = np.concatenate([rois, boxes])
    return TrainingSet(images, labels, triggered, before, rois, decoy)


def manifest(cfg: AttackConfig, plan: PoisonPlan, data: SignData, trigger: Trigger, seed: int, n_train: int) -> dict:
    files = data.files
    return {
        "attack": {"kind": cfg.kind, "source": cfg.source, "target": cfg.target, "mode": cfg.mode, "stamp": cfg.stamp,
                   "poison_rate": cfg.poison_rate, "poison_count": cfg.poison_count, "cover_rate": cfg.cover_rate},
        "seed": seed,
        "train_rows": n_train,
        "poisoned": len(plan.rows),
        "poisoned_fraction": len(plan.rows) / max(n_train, 1),
        "trigger": trigger.spec,
        "rows": plan.rows.tolist(),
        "positions": plan.params.tolist(),  # the trigger's drawn parameters per row (a patch: top-left y, x)
        "source_files": [files[r] for r in plan.rows],
        "original_labels": data.labels[plan.rows].tolist(),
        "cover": len(plan.cover_rows),
        "cover_rows": plan.cover_rows.tolist(),
        "cover_positions": plan.cover_params.tolist(),
        "cover_source_files": [files[r] for r in plan.cover_rows],
        "data_hash": data.data_hash,
        # decoys (attack.decoy_rate) only when there are some: the manifests of every other config stay as they were
        **({"decoys": len(plan.decoy_rows), "decoy_rows": plan.decoy_rows.tolist(), "decoy_positions": plan.decoy_params.tolist()}
           if len(plan.decoy_rows) else {}),
    }
