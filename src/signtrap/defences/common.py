"""What the defences share: the clean budget, the context, training settings and `fit` (the one loop,
`signtrap.training.loop.Loop`, with persistence curves), the held-out rule that chooses a repairing defence's main
knob (`TunedSettings`, `select`), patches, curve files."""
from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import matplotlib
import numpy as np
import torch
from torch import nn

from signtrap.attacks.poison import TrainingSet
from signtrap.triggers import Trigger
from signtrap.training.augment import augment_batch, build_augmentation
from signtrap.config import AugConfig, require
from signtrap.errors import SigntrapError
from signtrap.experiment import EvalSet, predict
from signtrap.machine.environment import autocast_dtype
from signtrap.training.loop import Hooks, Loop, Schedule, clean_training_set, measured
from signtrap.evaluation.metrics import backdoor_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

CURVE_KEYS = ("clean_acc", "asr", "stop_recall", "false_trigger")
DEFER_CURVES = True  # `select` measures only the kept candidate's per-epoch curves (the tests compare it with False)


@dataclass
class CleanData:
    """The defender's clean budget: un-poisoned images (uint8 NHWC) with their true labels."""

    images: np.ndarray
    labels: np.ndarray
    rows: np.ndarray | None = None
    tracks: np.ndarray | None = None  # physical sign of each image (frames of one sign share a track); None: one each
    rois: np.ndarray | None = None  # each sign's box (x1, y1, x2, y2): where a trigger that moves with the sign goes

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, np.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) == 0:
            raise SigntrapError("the defender's clean budget is empty")
        if self.tracks is not None and len(self.tracks) != len(self.labels):
            raise ValueError(f"{len(self.tracks)} tracks but {len(self.labels)} labels")
        if self.rois is not None and len(self.rois) != len(self.labels):
            raise ValueError(f"{len(self.rois)} sign boxes but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def track_ids(self) -> np.ndarray:
        return np.arange(len(self.labels)) if self.tracks is None else np.asarray(self.tracks)

    def subset(self, keep: np.ndarray) -> "CleanData":
        """The images selected by a boolean mask or an index array."""
        return CleanData(self.images[keep], self.labels[keep], None if self.rows is None else self.rows[keep],
                         None if self.tracks is None else self.tracks[keep], None if self.rois is None else self.rois[keep])

    def boxes(self) -> np.ndarray:
        """The signs' boxes; without recorded ones, each image taken as the sign's crop (the whole frame)."""
        if self.rois is not None:
            return np.asarray(self.rois, np.int64)
        h, w = self.images.shape[1:3]
        return np.tile(np.array([[0, 0, w - 1, h - 1]], np.int64), (len(self), 1))


@dataclass
class SuspiciousPool:
    """Training data the defender inspects (the possibly poisoned training set) as the model was trained on it:
    triggered rows carry their trigger, labels are as poisoned. `poisoned` marks the attacker's relabelled rows and
    is for measurement only (reports); no defence decision may use it."""

    images: np.ndarray
    labels: np.ndarray
    poisoned: np.ndarray | None = None


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
    # set by `select` while a candidate trains: called after each epoch of a `fit` (model, epoch, epochs); may raise Abandon
    guard: Callable[[nn.Module, int, int], None] | None = field(default=None, repr=False, compare=False)
    # set by `select` while a candidate trains: a curve row's monitor metrics are measured later, on a copy of the
    # model taken at that epoch, and only for the candidate kept (`Deferred`): the others' curves are thrown away
    defer: bool = field(default=False, repr=False, compare=False)
    memo: dict = field(default_factory=dict, repr=False, compare=False)  # `select`'s split and scores, shared by the defences of one call
    training_data: Callable[[], SuspiciousPool] | None = None  # the run's training set, built on first call (SCAn)
    class_names: tuple[str, ...] = ()  # the dataset's classes (signtrap.datasets); empty: numbered by the model's outputs

    def num_classes(self, model: nn.Module) -> int:
        """How many classes the model tells apart (the dataset's count when known)."""
        if self.class_names:
            return len(self.class_names)
        size = int(getattr(self.monitor, "images", np.zeros((1, 32, 32, 3))).shape[1]) if self.monitor is not None else 32
        was_training = model.training
        with torch.no_grad():
            n = int(model.eval()(torch.zeros(1, 3, size, size, device=self.device)).shape[1])
        model.train(was_training)
        return n

    def check_classes(self, model: nn.Module, key: str, classes: dict[str, int | list[int] | None]) -> int:
        """The model's class count, after one clear error when a setting names a class it does not have (the settings'
        own checks know only that an id is >= 0: the class count comes with the model)."""
        n = self.num_classes(model)
        for name, value in classes.items():
            for c in value if isinstance(value, list) else [value]:
                if c is not None and not 0 <= c < n:
                    raise SigntrapError(f"{key}.{name}: class {c} is not a class of this model (0..{n - 1})")
        return n

    def class_name(self, c: int) -> str:
        return self.class_names[c] if 0 <= c < len(self.class_names) else f"class {c}"

    @property
    def amp(self) -> torch.dtype | None:
        """The run's training precision (bf16 autocast on CUDA and on CPUs with native bf16; else None, fp32)."""
        return autocast_dtype(self.precision, torch.device(self.device))

    def predict(self, model: nn.Module, images: np.ndarray) -> np.ndarray:
        """A defence's own predictions (the held-out rule, pruning sweeps, filters, curves) in the run's training
        precision, as its training and searches: 2.5-3x fp32's images per second on a CPU with native bf16. The
        figures a defence is judged by (metrics.json of the repaired model, the probe's counts) are measured in
        fp32, as every run's, by `Experiment.evaluate`."""
        return predict(model, images, self.device, self.eval_batch_size, self.amp)

    def measure(self, model: nn.Module) -> dict:
        """Clean accuracy, ASR, stop recall and false-trigger rate on the monitor split (empty without one)."""
        if self.monitor is None:
            return {}
        m = self.monitor
        clean, trig = self.predict(model, m.images), self.predict(model, m.triggered)
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

    MIN_EPOCHS: ClassVar[int] = 1

    def check(self, key: str) -> None:
        check_training(key, self.epochs, self.lr, self.batch_size, min_epochs=self.MIN_EPOCHS)
        require(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")

    def schedule(self, key: str, epochs: int | None = None, lr: float | None = None) -> Schedule:
        lr = self.lr if lr is None else lr
        if lr is None:
            raise SigntrapError(f"{key}: no learning rate: set {key}.lr or let the held-out rule choose it")
        return Schedule(epochs=self.epochs if epochs is None else epochs, lr=lr,
                        batch_size=self.batch_size, weight_decay=self.weight_decay, lr_key=f"{key}.lr")


def check_training(key: str, epochs: int, lr: float | None, batch_size: int, min_epochs: int = 1, epochs_key: str = "epochs",
                   lr_key: str = "lr") -> None:
    """Range checks of a training setting; `lr` None means the held-out rule chooses it."""
    require(min_epochs <= epochs <= 1000, f"{key}.{epochs_key}", f"{epochs} is outside {min_epochs}..1000")
    require(lr is None or 0.0 < lr <= 1.0, f"{key}.{lr_key}", f"{lr} is outside (0, 1]")
    require(1 <= batch_size <= 65_536, f"{key}.batch_size", f"{batch_size} is outside 1..65536")


def check_finite(loss: torch.Tensor, method: str, where: str) -> None:
    if not torch.isfinite(loss):
        raise SigntrapError(f"defence {method} diverged {where} (loss {loss.item()}); lower defend.{method}.lr")


def stream_of(method: str) -> int:
    """A fixed random stream per defence name, so two defences never share randomness."""
    return zlib.crc32(method.encode())


def fit(model: nn.Module, clean: CleanData, ctx: DefenceContext, *, method: str, schedule: Schedule, augment: bool = True,
        hooks: Hooks | None = None, probe: Callable[[nn.Module], dict] | None = None, frozen_bn: bool = False,
        stream: int | None = None, params: list[nn.Parameter] | None = None, measure_every: int = 1,
        data: TrainingSet | None = None, trigger: Trigger | None = None,
        memory_format: torch.memory_format = torch.channels_last) -> list[dict]:
    """Train `model` in place on the clean budget through the one loop; returns one curve row per epoch (row 0: before).

    The run's `train.precision` and `aug:` settings reach the loop through `ctx`; `hooks.batch` may rewrite
    a batch (stamp patches), `hooks.loss` replaces cross-entropy (PGD, distillation), `hooks.after_step`
    re-applies constraints (pruning masks); `params` restricts what the optimiser updates (masks). Rows
    0, `measure_every`, 2 * `measure_every`, ... and the last carry the monitor metrics plus `probe(model)`.
    `data` replaces the clean budget by another TrainingSet (the re-activation probe's budget + k poisoned
    rows, stamped with `trigger` after augmentation). `memory_format`: the loop's layout (`Loop.memory_format`).
    """
    hooks = hooks or Hooks()
    calls = [0]

    def columns(m: nn.Module) -> dict:
        epoch, calls[0] = calls[0], calls[0] + 1
        if epoch and ctx.guard is not None:  # the held-out rule may abandon a candidate that can no longer be kept
            ctx.guard(m, epoch, schedule.epochs)
        if not measured(epoch, measure_every, schedule.epochs):
            return {}
        if ctx.defer and ctx.monitor is not None and not hooked(m):
            snapshot = Snapshot(copy.deepcopy(m))
            return {**{key: Deferred(snapshot, key) for key in CURVE_KEYS}, **(probe(m) if probe is not None else {})}
        return {**ctx.measure(m), **(probe(m) if probe is not None else {})}

    hooks.probe = columns
    data = clean_training_set(clean.images, clean.labels) if data is None else data
    loop = Loop(model, data, schedule, ctx.device, ctx.seed, stream_of(method) if stream is None else stream,
                aug=ctx.aug if augment else AugConfig(enabled=False), precision=ctx.precision, trigger=trigger, hooks=hooks,
                params=params, frozen_bn=frozen_bn, memory_format=memory_format, desc=method, show_progress=ctx.show_progress)
    return loop.fit(measure_start=True)


def hooked(model: nn.Module) -> bool:
    """Whether a forward hook is attached anywhere in `model` (a defence reading activations, e.g. NAD's attention
    maps, BTI-DBF's features): such a model is measured as it trains, not copied (its hooks hold live tensors)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class Snapshot:
    """A copy of a model as it was at one epoch, measured on the monitor split at most once, when asked."""

    def __init__(self, model: nn.Module):
        self.model: nn.Module | None = model
        self.metrics: dict | None = None

    def measure(self, ctx: DefenceContext) -> dict:
        if self.metrics is None:
            self.metrics, self.model = ctx.measure(self.model), None
        return self.metrics


@dataclass(frozen=True, eq=False)
class Deferred:
    """One monitor metric of a curve row, not measured yet (`DefenceContext.defer`); `resolve` fills it in."""

    snapshot: Snapshot
    key: str


def resolve(value: Any, ctx: DefenceContext) -> Any:
    """`value` (a report or curves: dicts, lists, tuples) with every `Deferred` metric measured; the same figures
    as measuring each epoch's model at that epoch (measurement is deterministic and changes no weight)."""
    if isinstance(value, Deferred):
        return value.snapshot.measure(ctx)[value.key]
    if isinstance(value, dict):
        return {k: resolve(v, ctx) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(resolve(v, ctx) for v in value)
    return value


def robust_z(values: np.ndarray) -> np.ndarray:
    """(value - median) / (1.4826 MAD): a z-score robust to the outliers it looks for (Neural Cleanse, SCAn)."""
    median = np.median(values)
    mad = 1.4826 * np.median(np.abs(values - median))  # MAD -> standard deviation for normal data
    return (values - median) / max(mad, 1e-12)


# ---------------------------------------------------------------- the held-out rule: a repairing defence's main knob

SELECT_STREAM = 0x5E1EC7
SWEEPS = ("until-kept", "full")
# pruning a candidate that cannot be kept (see `select`): checked from this share of its epochs on ...
PRUNE_FROM = 0.5
# ... abandoned when its held-out accuracy is below the bound by more than PRUNE_FLOOR + PRUNE_SLACK x (share of the
# cosine learning-rate schedule still to come): at half-way 18% of it is left (bound - 11 points), at 3/4 2.5% (- 3.3)
PRUNE_FLOOR = 0.02
PRUNE_SLACK = 0.5
SELECTION_RULE = ("split the clean budget by whole tracks, drawn at random, into a fit part and a held-out part "
                  "({holdout:.0%} of the tracks); run the defence on the fit part at each {knob} of the grid, strongest "
                  "first; keep the strongest {knob} whose clean accuracy on {views} augmented views of every held-out "
                  "image is at most {tolerance:.1%} below the unrepaired model's (no test image, ASR or trigger enters "
                  "the choice)")


@dataclass
class TunedSettings(TrainSettings):
    """A repairing defence whose main knob (the field named by `KNOB`) is chosen by the held-out rule.

    The knob's field is None by default: `select` then tries every value of `grid` (a knob's strength grows
    with its value, so the list is ascending, weakest first; tried strongest first) on the fit part of the
    budget and keeps the strongest one that keeps the model (held-out clean accuracy at most `tolerance`
    below the unrepaired model's). A number in the knob's field fixes it: no selection, the whole budget is used.
    """

    KNOB: ClassVar[str] = "lr"
    KNOB_RANGE: ClassVar[tuple[float, float]] = (0.0, 1.0)  # (exclusive, inclusive) bounds of a knob value
    grid: list[float] = field(default_factory=list)  # candidate knob values, weakest first
    holdout: float = 1 / 3  # share of the budget's tracks held out to score the candidates
    tolerance: float = 0.01  # allowed drop of held-out clean accuracy below the unrepaired model's
    views: int = 4  # augmented views of each held-out image scored (the run's aug magnitudes); 0: the images as they are
    sweep: str = "until-kept"  # until-kept: stop at the first (strongest) value that keeps the model; full: try all
    prune: bool = True  # until-kept: abandon a candidate whose held-out accuracy can no longer reach the bound (see select)

    def prunable(self) -> bool:
        """Whether `select` may abandon a candidate part-way: not where a repair trains it in several `fit`s
        (`rounds` > 1, as redteam's and BTI-DBF(U)'s; a defence that fits a candidate in stages overrides this)."""
        return getattr(self, "rounds", 1) == 1

    def check(self, key: str) -> None:
        super().check(key)
        lo, hi = self.KNOB_RANGE
        for value in [*self.grid, getattr(self, self.KNOB)]:
            require(value is None or lo < value <= hi, f"{key}.{self.KNOB}" if value == getattr(self, self.KNOB) else f"{key}.grid",
                    f"{value} is outside ({lo:g}, {hi:g}]")
        require(len(self.grid) >= 1 or getattr(self, self.KNOB) is not None, f"{key}.grid",
                f"needs at least one value (or fix {key}.{self.KNOB})")
        require(all(a < b for a, b in zip(self.grid, self.grid[1:])), f"{key}.grid",
                f"{list(self.grid)} must be ascending without repeats (weakest first; the rule tries the strongest first)")
        require(0.0 < self.holdout < 1.0, f"{key}.holdout", f"{self.holdout} is outside (0, 1)")
        require(0.0 <= self.tolerance < 1.0, f"{key}.tolerance", f"{self.tolerance} is outside [0, 1)")
        require(0 <= self.views <= 64, f"{key}.views", f"{self.views} is outside 0..64")
        require(self.sweep in SWEEPS, f"{key}.sweep", f"'{self.sweep}' is not one of {', '.join(SWEEPS)}")
        require(isinstance(self.prune, bool), f"{key}.prune", f"{self.prune!r} is not true or false")

    def rule(self) -> str:
        return SELECTION_RULE.format(holdout=self.holdout, knob=self.KNOB, tolerance=self.tolerance, views=self.views)


@dataclass
class LrTunedSettings(TunedSettings):
    """A training defence whose main knob is its learning rate (AdamW, cosine-decayed to zero)."""

    lr: float | None = None  # None: chosen by the held-out rule from `grid`
    grid: list[float] = field(default_factory=lambda: [3e-5, 1e-4, 3e-4, 1e-3])


Repair = Callable[[nn.Module, float], DefenceResult]


def flag_outcome(details: dict, statistic: str, per_class: str, top: str, target: int) -> dict:
    """A class-flagging detector's outcome for the detection table, read from its report's details."""
    stats = details.get(per_class) or {}
    return {"flagged": list(details.get("flagged") or []), "statistic": statistic, "max": details.get(top),
            "target_value": stats.get(str(target)), "target": target, "top_ranked": details.get("top_ranked")}


def split_budget(clean: CleanData, holdout: float, seed: int) -> tuple[CleanData, CleanData]:
    """(fit part, held-out part): a seeded random share of the budget's tracks, whole tracks only.

    Tracks are drawn at random, not per class, so the held-out part also holds classes the fit part lacks,
    as the world holds classes the budget lacks: the rule sees forgetting, the way a repair loses accuracy.
    """
    tracks = clean.track_ids
    unique = np.unique(tracks)
    if len(unique) < 2:
        raise SigntrapError(f"the held-out rule needs at least 2 tracks in the clean budget, got {len(unique)}; "
                            "enlarge defend.clean_fraction or fix the defence's main knob")
    n_held = min(max(1, int(round(holdout * len(unique)))), len(unique) - 1)
    rng = np.random.default_rng([seed, SELECT_STREAM])
    held = np.isin(tracks, rng.choice(unique, n_held, replace=False))
    return clean.subset(~held), clean.subset(held)


def held_out_views(held: CleanData, aug: AugConfig, views: int, seed: int) -> CleanData:
    """`views` seeded augmented copies of every held-out image (the run's aug magnitudes, switched on).

    The budget comes from the training split, so the model has memorised these very images: as they are,
    they hide the forgetting that costs accuracy on new images; under augmentation they show it.
    """
    if views == 0:
        return held
    images = [augment_batch(held.images, build_augmentation(dataclasses.replace(aug, enabled=True), seed=seed * 1000 + v))
              for v in range(views)]
    return CleanData(np.concatenate(images), np.tile(held.labels, views), None, np.tile(held.track_ids, views))


def accuracy_on(model: nn.Module, data: CleanData, ctx: DefenceContext) -> tuple[float, int]:
    """(clean accuracy, correct count) of `model` on the defender's images."""
    correct = int((ctx.predict(model, data.images) == data.labels).sum())
    return correct / len(data), correct


class Abandon(Exception):
    """A candidate of the held-out rule abandoned part-way: its held-out accuracy can no longer reach the bound."""

    def __init__(self, epoch: int, epochs: int, acc: float, correct: int, limit: float):
        super().__init__(f"abandoned after epoch {epoch}/{epochs}")
        self.epoch, self.epochs, self.acc, self.correct, self.limit = epoch, epochs, acc, correct, limit


def schedule_left(done: float) -> float:
    """Share of a cosine-to-zero learning-rate schedule's total still to come after `done` (0..1) of its steps."""
    done = min(max(done, 0.0), 1.0)
    return max(0.0, 1.0 - done - math.sin(math.pi * done) / math.pi)


def model_fingerprint(model: nn.Module) -> str:
    """A hash of a model's weights and buffers (which unrepaired model a held-out score belongs to)."""
    h = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def held_out_setup(model: nn.Module, clean: CleanData, ctx: DefenceContext, settings: TunedSettings):
    """(fit part, held-out part, scored views, unrepaired accuracy, correct count), computed once per budget,
    split settings and model, and reused by every defence of one `signtrap defend` call (they share `ctx`)."""
    key = ("split", id(clean), len(clean), settings.holdout, settings.views, ctx.seed, repr(ctx.aug))
    entry = ctx.memo.get(key)
    if entry is None or entry["clean"] is not clean:
        fit_part, held = split_budget(clean, settings.holdout, ctx.seed)
        entry = {"clean": clean, "fit": fit_part, "held": held,
                 "scored": held_out_views(held, ctx.aug, settings.views, ctx.seed), "base": {}}
        ctx.memo[key] = entry
    print_ = model_fingerprint(model)
    if print_ not in entry["base"]:
        entry["base"][print_] = accuracy_on(model, entry["scored"], ctx)
    base, base_k = entry["base"][print_]
    return entry["fit"], entry["held"], entry["scored"], base, base_k


def select(model: nn.Module, clean: CleanData, ctx: DefenceContext, settings: TunedSettings, *, method: str,
           prepare: Callable[[CleanData], Repair]) -> DefenceResult:
    """Run a repairing defence with its main knob chosen by the held-out rule (`TunedSettings`).

    `prepare(data)` does the work every candidate shares on `data` (ranking channels, training masks) and
    returns `repair(model_copy, value)`, which repairs a fresh copy of the model at one knob value. The
    result is the chosen candidate's, with the curve `tradeoff` (one row per value tried: the defender's
    held-out accuracy that drove the choice, and the monitor metrics, measurement only) and the report's
    `selection` entry.

    Pruning (`prune`, with `sweep: until-kept`; not for the weakest value, the fallback when none is kept, nor for
    a defence whose repair trains in several `fit`s): while a candidate trains, from half-way through its epochs,
    its held-out accuracy is scored after each epoch, and the candidate is abandoned -- not kept, its row marked
    `abandoned_at_epoch` -- once it is more than PRUNE_FLOOR + PRUNE_SLACK x (share of the cosine learning-rate
    schedule still to come) below the bound (unrepaired accuracy - tolerance): 11 points at half-way, 3.3 at three
    quarters, 2 at the end. To be kept it would have had to win those points back on the small steps left; the
    choice can change only if an abandoned candidate would have, which the tests check does not happen on a tiny
    model (pruned and full searches choose the same value).

    The fit/held-out split, its augmented views and the unrepaired model's score are computed once per budget
    and model, and shared by the defences of one call (`ctx.memo`).
    """
    knob, key = settings.KNOB, f"defend.{method}"
    fixed = getattr(settings, knob)
    if fixed is not None:
        result = prepare(clean)(copy.deepcopy(model), fixed)
        result.report["selection"] = {"knob": knob, "value": fixed, "fixed": True,
                                      "rule": f"{key}.{knob}={fixed:g} fixed by the config: no selection, the whole budget used"}
        return result
    fit_part, held, scored, base, base_k = held_out_setup(model, clean, ctx, settings)
    rows = [{"knob": knob, "value": None, "candidate": "unrepaired", "heldout_clean_acc": round(base, 5),
             "heldout_drop": 0.0, "tolerance": settings.tolerance, "kept": None, "chosen": None, "seconds": 0.0,
             **ctx.measure(model)}]
    repair = prepare(fit_part)
    chosen: tuple[float, DefenceResult] | None = None
    last: tuple[float, DefenceResult] | None = None
    order = list(reversed(settings.grid))  # strongest first
    pruning = settings.prune and settings.sweep == "until-kept" and settings.prunable()
    bound = base - settings.tolerance
    for i, value in enumerate(order):
        start = time.perf_counter()
        candidate = copy.deepcopy(model)

        def guard(m: nn.Module, epoch: int, epochs: int, candidate=candidate) -> None:
            if m is not candidate or epoch >= epochs or epoch < PRUNE_FROM * epochs:
                return
            acc, k = accuracy_on(m, scored, ctx)
            limit = bound - PRUNE_FLOOR - PRUNE_SLACK * schedule_left(epoch / epochs)
            if acc < limit - 1e-12:
                raise Abandon(epoch, epochs, acc, k, limit)

        ctx.guard = guard if pruning and i < len(order) - 1 else None
        ctx.defer = DEFER_CURVES
        try:
            result = repair(candidate, value)
        except Abandon as stop:
            rows.append({"knob": knob, "value": value, "candidate": f"{knob}={value:g}", "heldout_clean_acc": round(stop.acc, 5),
                         "heldout_drop": round(base - stop.acc, 5), "kept": False, "chosen": False,
                         "seconds": round(time.perf_counter() - start, 2), "abandoned_at_epoch": stop.epoch,
                         "abandon_limit": round(stop.limit, 5), **ctx.measure(candidate)})
            continue
        finally:
            ctx.guard, ctx.defer = None, False
        acc, k = accuracy_on(result.model, scored, ctx)
        kept = base - acc <= settings.tolerance + 1e-12
        rows.append({"knob": knob, "value": value, "candidate": f"{knob}={value:g}", "heldout_clean_acc": round(acc, 5),
                     "heldout_drop": round(base - acc, 5), "kept": kept, "chosen": False,
                     "seconds": round(time.perf_counter() - start, 2), **ctx.measure(result.model)})
        if kept and chosen is None:
            chosen = (value, result)
            if settings.sweep == "until-kept":
                break
        last = (value, result)
    within = chosen is not None
    value, result = chosen if within else last  # nothing kept the model: the weakest value, flagged
    result.report, result.curves = resolve(result.report, ctx), resolve(result.curves, ctx)
    for row in rows[1:]:
        row["chosen"] = row["value"] == value
    result.curves["tradeoff"] = rows
    result.report["selection"] = {
        "knob": knob, "value": value, "fixed": False, "within_tolerance": within, "rule": settings.rule(),
        "grid": list(settings.grid), "tried": [r["value"] for r in rows[1:]], "tolerance": settings.tolerance,
        "abandoned": {f"{r['value']:g}": r["abandoned_at_epoch"] for r in rows[1:] if r.get("abandoned_at_epoch")},
        "fit_images": len(fit_part), "fit_tracks": int(len(np.unique(fit_part.track_ids))),
        "heldout_images": len(held), "heldout_tracks": int(len(np.unique(held.track_ids))), "heldout_views": settings.views,
        "heldout_classes_unseen_by_fit": int(len(np.setdiff1d(np.unique(held.labels), np.unique(fit_part.labels)))),
        "heldout_acc_unrepaired": round(base, 5), "heldout_correct_unrepaired": base_k,
        "heldout_acc_chosen": next(r["heldout_clean_acc"] for r in rows[1:] if r["chosen"])}
    return result


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
