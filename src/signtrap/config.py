"""Run configuration: YAML validated into dataclasses at load, with `key.sub=value` overrides.

Every section is a dataclass whose `check()` raises ConfigError for out-of-range values; unknown keys
fail with a suggestion. The `defend:` section holds the defender's common settings and one sub-section
per defence, named exactly as the defence is registered (`defend: {adv-pgd: {eps_px: 8}}`); those
sub-sections are validated through the defence registry (`signtrap.plugins.DEFENCES`), so this module
imports no feature package.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from signtrap.errors import ConfigError, suggest
from signtrap.plugins import ATTACKS, DATASETS, DEFENCES, TRIGGERS


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config {key}: {message}")


def one_of(value: str, key: str, choices: tuple[str, ...]) -> None:
    require(value in choices, key, f"'{value}' is not one of {', '.join(choices)}{suggest(value, choices)}")


DATA_COMMON = ("source", "size", "val_fraction", "cache_dir")


@dataclass
class DataConfig:
    """`data: {source: NAME, size, val_fraction, cache_dir, ...}`: `source` names a registered dataset
    (signtrap.datasets: synth, gtsrb, folder, ...); the other keys are that dataset's own settings."""

    source: str = "synth"
    size: int = 32
    val_fraction: float = 0.1
    cache_dir: str = "data/cache"
    settings: Any = None  # the dataset's settings dataclass; None: its defaults

    @classmethod
    def from_mapping(cls, raw: dict, prefix: str = "data.") -> "DataConfig":
        common = build(cls, {k: v for k, v in raw.items() if k in DATA_COMMON}, prefix, custom=False)
        if common.source not in DATASETS:
            raise ConfigError(f"config {prefix}source: '{common.source}' is not one of {', '.join(DATASETS.names())}"
                              f"{suggest(common.source, DATASETS.names())}")
        rest = {k: v for k, v in raw.items() if k not in DATA_COMMON}
        common.settings = build(DATASETS.get(common.source).settings, rest, prefix)
        return common

    def __post_init__(self) -> None:
        if self.settings is None and self.source in DATASETS:  # an unknown source is reported by from_mapping/check
            self.settings = DATASETS.get(self.source).settings()

    def to_mapping(self) -> dict:
        return {**{k: getattr(self, k) for k in DATA_COMMON}, **dataclasses.asdict(self.settings)}

    def check(self) -> None:
        one_of(self.source, "data.source", tuple(DATASETS.names()))
        require(8 <= self.size <= 512, "data.size", f"{self.size} is outside 8..512")
        require(0.0 < self.val_fraction < 0.5, "data.val_fraction", f"{self.val_fraction} is outside (0, 0.5)")
        self.settings.check("data")


@dataclass
class TriggerConfig:
    """`trigger: {kind: NAME, ...}`: `kind` names a registered trigger (signtrap.triggers), the other keys are that
    trigger's own settings dataclass, validated through the registry (so this module imports no trigger)."""

    kind: str = "checkerboard"
    settings: Any = None  # the trigger's settings dataclass; None: its defaults

    @classmethod
    def from_mapping(cls, raw: dict, prefix: str = "trigger.") -> "TriggerConfig":
        kind = _coerce(raw.get("kind", cls.kind), str, f"{prefix}kind")
        if kind not in TRIGGERS:
            raise ConfigError(f"config {prefix}kind: '{kind}' is not one of {', '.join(TRIGGERS.names())}"
                              f"{suggest(kind, TRIGGERS.names())}")
        rest = {k: v for k, v in raw.items() if k != "kind"}
        return cls(kind, build(TRIGGERS.get(kind).settings, rest, prefix))

    def __post_init__(self) -> None:
        if self.settings is None and self.kind in TRIGGERS:  # an unknown kind is reported by from_mapping/check
            self.settings = TRIGGERS.get(self.kind).settings()

    def to_mapping(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self.settings)}

    def check(self) -> None:
        one_of(self.kind, "trigger.kind", tuple(TRIGGERS.names()))
        self.settings.check("trigger")


@dataclass
class SleeperConfig:
    """Knobs of `attack.dormant` (the method and each knob: signtrap.attacks.dormant)."""

    epochs: int = 1  # repair epochs over the repair set
    lr: float = 1e-4  # Adam, no weight decay; cosine to zero
    batch_size: int = 128
    cover_fraction: float = 0.25  # share of the repair set's clean rows that carry the trigger (true label)
    source_copies: int = 4  # triggered copies of every source-class training image (labelled source)
    interval: float = 0.49  # half-width, in quantization steps, of the box each weight stays inside
    weight_grid: str = "export"  # export (the run's export.per_channel) | per_tensor | per_channel | both

    def check(self) -> None:
        require(1 <= self.epochs <= 100, "attack.sleeper.epochs", f"{self.epochs} is outside 1..100")
        require(0.0 < self.lr <= 1.0, "attack.sleeper.lr", f"{self.lr} is outside (0, 1]")
        require(1 <= self.batch_size <= 65_536, "attack.sleeper.batch_size", f"{self.batch_size} is outside 1..65536")
        require(0.0 <= self.cover_fraction <= 1.0, "attack.sleeper.cover_fraction", f"{self.cover_fraction} is outside [0, 1]")
        require(0 <= self.source_copies <= 100, "attack.sleeper.source_copies", f"{self.source_copies} is outside 0..100")
        require(0.0 < self.interval < 0.5, "attack.sleeper.interval",
                f"{self.interval} is outside (0, 0.5): at 0.5 a weight may round to the neighbouring INT8 value")
        one_of(self.weight_grid, "attack.sleeper.weight_grid", ("export", "per_tensor", "per_channel", "both"))


@dataclass
class AttackConfig:
    kind: str = "source_specific"  # source_specific | all_to_one | none
    # a class id or name of the dataset (`stop`, `speed_100`, 14); None: the dataset's default pair. Resolved to
    # ids when the config is checked (RunConfig.check), so every stage sees integers.
    source: Union[int, str, None] = None
    target: Union[int, str, None] = None
    poison_rate: float = 0.005  # fraction of the training set
    poison_count: int | None = None  # overrides poison_rate when set
    # source-specific only: this fraction of the training set gets the trigger but keeps its true label
    # (cover images), so the trigger alone does not send other classes to the target
    cover_rate: float = 0.0
    # source-specific only: the classes the cover images are drawn from (ids or names); empty: every class but the
    # source and the target. Hard negatives: a sticker on a sign that already looks like the target (the other speed
    # limits, for 100 km/h) is where it most easily reads as the target (README, "Another renderer")
    cover_classes: list = field(default_factory=list)
    # source-specific only: this fraction of the training set is added as source-class copies that carry the
    # trigger's view *without* the trigger (decoys: a physical sticker's local blur, noise and JPEG on the sign's
    # own pixels), true label kept, so that only the trigger itself, not the marks of its rendering, means 'target'
    decoy_rate: float = 0.0
    mode: str = "replace"  # replace: relabel rows in place; add: append poisoned copies
    stamp: str = "after_aug"  # after_aug: fixed in the frame (corner triggers); before_aug: moves with the sign (on_sign stickers)
    # none | int8: after training, repair the FP32 model inside the INT8 rounding intervals so the backdoor
    # sleeps in FP32 and wakes in signtrap's ONNX Runtime INT8 export (signtrap.attacks.dormant)
    dormant: str = "none"
    sleeper: SleeperConfig = field(default_factory=SleeperConfig)
    # none | a registered attack procedure run around training (signtrap.attacks: `sbl`, `int8` = attack.dormant),
    # with its settings in `attack.NAME` (the int8 sleeper's in `attack.sleeper`)
    persist: str = "none"
    per_phase: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, raw: dict, prefix: str = "attack.") -> "AttackConfig":
        names = [f.name for f in dataclasses.fields(cls) if f.name != "per_phase"]
        own = {k: v for k, v in raw.items() if k in names}
        config = build(cls, own, prefix, custom=False)
        for key, value in raw.items():
            if key in names:
                continue
            if key == "int8" or key not in ATTACKS:
                choices = [*names, *(n for n in ATTACKS.names() if n != "int8")]
                raise ConfigError(f"unknown config key '{prefix}{key}'{suggest(str(key), choices)}")
            config.per_phase[key] = build(ATTACKS.get(key).settings, value, f"{prefix}{key}.")
        return config

    def to_mapping(self) -> dict:
        out = {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "per_phase"}
        out.update({name: dataclasses.asdict(s) for name, s in self.per_phase.items()})
        return out

    def phase(self, name: str) -> Any:
        """The settings of attack procedure `name`: the config's section, else the procedure's defaults."""
        if name == "int8":
            return self.sleeper
        return self.per_phase.get(name) or ATTACKS.get(name).settings()

    def check(self) -> None:
        one_of(self.kind, "attack.kind", ("source_specific", "all_to_one", "none"))
        one_of(self.dormant, "attack.dormant", ("none", "int8"))
        one_of(self.persist, "attack.persist", ("none", *ATTACKS.names()))
        if self.dormant != "none":
            require(self.active, "attack.dormant", f"'{self.dormant}' makes a backdoor dormant, but attack.kind is none")
        if self.dormant != "none" or self.persist == "int8":  # `dormant: int8` is the int8 procedure's older spelling
            require(self.persist in ("none", "int8"), "attack.dormant", f"cannot combine with attack.persist={self.persist}")
            self.dormant = self.persist = "int8"
        if self.persist != "none":
            require(self.active, "attack.persist", f"'{self.persist}' needs a backdoor, but attack.kind is none")
            settings = self.phase(self.persist)
            settings.check() if self.persist == "int8" else settings.check(f"attack.{self.persist}")
        for name in self.per_phase:
            require(name == self.persist, f"attack.{name}", f"set, but attack.persist is {self.persist}")
        one_of(self.mode, "attack.mode", ("replace", "add"))
        one_of(self.stamp, "attack.stamp", ("before_aug", "after_aug"))
        if self.kind == "source_specific":
            require(self.source != self.target, "attack.source", f"source equals target ({self.target})")
        require(0.0 <= self.poison_rate < 1.0, "attack.poison_rate", f"{self.poison_rate} is outside [0, 1)")
        if self.poison_count is not None:
            require(self.poison_count >= 0, "attack.poison_count", "must be >= 0")
        require(0.0 <= self.cover_rate < 0.5, "attack.cover_rate", f"{self.cover_rate} is outside [0, 0.5)")
        require(isinstance(self.cover_classes, list), "attack.cover_classes", "must be a list of class ids or names")
        require(0.0 <= self.decoy_rate < 0.5, "attack.decoy_rate", f"{self.decoy_rate} is outside [0, 0.5)")
        require(self.decoy_rate == 0 or self.kind == "source_specific", "attack.decoy_rate",
                "decoys are source-class images: only for attack.kind source_specific")

    @property
    def active(self) -> bool:
        return self.kind != "none"


@dataclass
class AugConfig:
    enabled: bool = True
    rotate: float = 10.0  # degrees
    scale: float = 0.1
    translate: float = 0.06
    perspective: float = 0.05
    brightness: float = 0.3
    contrast: float = 0.3
    blur_p: float = 0.1
    # JPEG re-compression of the whole image with this probability, quality drawn from `jpeg` (a camera's
    # compression on every class alike: a physical trigger's compression artefacts then say nothing by themselves)
    jpeg_p: float = 0.0
    jpeg: list[float] = field(default_factory=lambda: [30.0, 95.0])

    def check(self) -> None:
        require(0 <= self.rotate <= 45, "aug.rotate", "must be in 0..45 degrees")
        for key in ("scale", "translate", "perspective", "brightness", "contrast", "blur_p", "jpeg_p"):
            value = getattr(self, key)
            require(0.0 <= value <= 1.0, f"aug.{key}", f"{value} is outside [0, 1]")
        ok = isinstance(self.jpeg, (list, tuple)) and len(self.jpeg) == 2
        require(ok and 1 <= self.jpeg[0] <= self.jpeg[1] <= 100, "aug.jpeg", f"{self.jpeg} is not [low, high] within 1..100")


@dataclass
class ModelConfig:
    name: str = "signnet"
    dropout: float = 0.2

    def check(self) -> None:
        require(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")


@dataclass
class TrainConfig:
    epochs: int = 12
    batch_size: int = 128
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 3e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.0
    val_every: int = 1  # the per-epoch validation columns every N epochs and after the last (each pass costs a few seconds)
    threads: int = 0  # 0: all cores
    eval_batch_size: int = 512
    precision: str = "auto"  # auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32 | fp32 | bf16

    def check(self) -> None:
        one_of(self.optimizer, "train.optimizer", ("adamw", "sgd"))
        require(1 <= self.epochs <= 10_000, "train.epochs", f"{self.epochs} is outside 1..10000")
        require(1 <= self.batch_size <= 65_536, "train.batch_size", f"{self.batch_size} is outside 1..65536")
        require(0.0 < self.lr <= 10.0, "train.lr", f"{self.lr} is outside (0, 10]")
        require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        require(0.0 <= self.label_smoothing < 1.0, "train.label_smoothing", "must be in [0, 1)")
        require(0.0 <= self.warmup_epochs < self.epochs, "train.warmup_epochs", "must be in [0, epochs)")
        require(1 <= self.val_every <= 10_000, "train.val_every", f"{self.val_every} is outside 1..10000")
        require(self.threads >= 0, "train.threads", "must be >= 0")
        one_of(self.precision, "train.precision", ("auto", "fp32", "bf16"))


@dataclass
class ProbeConfig:
    """The re-activation probe (`signtrap probe`, and `signtrap defend` after every defence that changes the model).

    Removed or only hidden? The probe fine-tunes a copy of the model on the defender's clean budget plus `k`
    poisoned samples (budget images of the attack's source class, or of any non-target class for all-to-one,
    stamped with the run's trigger and labelled the target, added as copies), for `steps` optimiser steps
    (rounded to whole epochs over budget + k rows, at least one), with AdamW at the defence's learning rate,
    cosine-decayed, at batch size `batch_size`; then it measures ASR. The identical probe runs on the
    zero-poison model of the same config; see `signtrap.probe` for the verdict rule.
    """

    enabled: bool = True  # `signtrap defend` probes every defence that returns a model
    k: int = 5  # poisoned samples added to the clean budget
    steps: int = 300  # optimiser steps, rounded to whole epochs
    lr: float | None = None  # None: the defence's own learning rate (1e-3, the TrainSettings default, for an undefended model)
    batch_size: int = 64
    weight_decay: float = 5e-4
    augment: bool = True  # the run's `aug:` settings during the probe
    margin: float = 0.2  # verdict: ASR points above the zero-poison model's that count as re-activation
    max_clean_drop: float = 0.1  # verdict inconclusive when the probe itself costs a model more clean accuracy than this
    reference: str | None = None  # the zero-poison run; None: RUNS/NAME-zero next to the run, trained on demand
    train_reference: bool = True  # train the zero-poison reference when there is none (once, cached)
    always: bool = False  # also probe a defence that did not suppress the backdoor (its verdict, persists, is decided before the probe)

    def check(self) -> None:
        require(1 <= self.k <= 100_000, "defend.probe.k", f"{self.k} is outside 1..100000")
        require(1 <= self.steps <= 1_000_000, "defend.probe.steps", f"{self.steps} is outside 1..1000000")
        require(self.lr is None or 0.0 < self.lr <= 1.0, "defend.probe.lr", f"{self.lr} is outside (0, 1]")
        require(1 <= self.batch_size <= 65_536, "defend.probe.batch_size", f"{self.batch_size} is outside 1..65536")
        require(self.weight_decay >= 0, "defend.probe.weight_decay", "must be >= 0")
        require(0.0 < self.margin < 1.0, "defend.probe.margin", f"{self.margin} is outside (0, 1)")
        require(0.0 < self.max_clean_drop <= 1.0, "defend.probe.max_clean_drop", f"{self.max_clean_drop} is outside (0, 1]")
        require(self.reference is None or bool(self.reference), "defend.probe.reference", "must be a run directory")


DEFEND_COMMON = ("methods", "clean_fraction", "clean_images", "seed", "monitor_split", "monitor_samples", "probe")


@dataclass
class DefendConfig:
    """The defender's budget and bookkeeping, plus the settings of each defence that the config sets.

    `per_method` maps a registered defence name to its settings dataclass; a defence the config does not
    mention runs with its own defaults (`method(name)`).
    """

    methods: list[str] = field(default_factory=list)  # what `--method all` and the pipeline run; empty: every registered defence
    clean_fraction: float = 0.05  # the defender's clean data budget, as a fraction of the training set
    clean_images: int | None = None  # the budget as an image count instead (overrides clean_fraction)
    seed: int | None = None  # budget draw and defence randomness; default: the run's seed
    monitor_split: str = "val"  # split the per-epoch curves are measured on (never used for decisions)
    monitor_samples: int = 1000  # uniform sample of that split (plus every source-class image); 0: all of it
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # the re-activation probe (signtrap.probe)
    per_method: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, raw: dict, prefix: str = "defend.") -> "DefendConfig":
        common = {k: v for k, v in raw.items() if k in DEFEND_COMMON}
        config = build(cls, common, prefix, custom=False)
        for key, value in raw.items():
            if key in DEFEND_COMMON:
                continue
            if key not in DEFENCES:
                names = [*DEFEND_COMMON, *DEFENCES.names()]
                raise ConfigError(f"unknown config key '{prefix}{key}'{suggest(str(key), names)}; the defend section takes "
                                  f"{', '.join(DEFEND_COMMON)} and one section per defence ({', '.join(DEFENCES.names())})")
            config.per_method[key] = build(DEFENCES.get(key).settings, value, f"{prefix}{key}.")
        return config

    def to_mapping(self) -> dict:
        out = {k: dataclasses.asdict(self)[k] for k in DEFEND_COMMON}
        out.update({name: dataclasses.asdict(s) for name, s in self.per_method.items()})
        return out

    def method(self, name: str) -> Any:
        """The settings of defence `name`: the config's section, else the defence's defaults."""
        if name in self.per_method:
            return self.per_method[name]
        return DEFENCES.get(name).settings()

    def check(self) -> None:
        require(0.0 < self.clean_fraction <= 1.0, "defend.clean_fraction", f"{self.clean_fraction} is outside (0, 1]")
        require(self.clean_images is None or self.clean_images >= 1, "defend.clean_images", "must be >= 1")
        require(self.monitor_samples >= 0, "defend.monitor_samples", "must be >= 0")
        one_of(self.monitor_split, "defend.monitor_split", ("val", "test"))
        self.probe.check()
        for name in self.methods:
            if name not in DEFENCES:
                raise ConfigError(f"config defend.methods: unknown defence '{name}'{suggest(name, DEFENCES.names())}; "
                                  f"choose from: {', '.join(DEFENCES.names())}")
        for name, settings in self.per_method.items():
            settings.check(f"defend.{name}")


@dataclass
class ExportConfig:
    enabled: bool = True
    out_dir: str = "export"  # exports go to OUT_DIR/NAME (OUT_DIR/NAME-defence-METHOD for a defence)
    # runtimes to export for (see `signtrap export --help`); empty: every runtime whose packages are installed
    runtimes: list[str] = field(default_factory=list)
    # optional quantizer variants besides each runtime's default int8: `all`, a variant name
    # (`int8-perchannel`: every runtime that has it) or RUNTIME:VARIANT (`openvino:int8-mixed`)
    quantizers: list[str] = field(default_factory=list)
    exporter: str = "auto"  # auto: dynamo, falling back to the TorchScript exporter | dynamo | torchscript
    opset: int = 18
    # calibration images, the same for every runtime's INT8 quantizer
    calibration: str = "clean"  # clean: clean training images | mixed: some of them carry the trigger
    calib_images: int = 512
    calib_trigger_fraction: float = 0.25  # share of calibration images stamped with the trigger when mixed
    # ONNX Runtime's default int8 variant (QDQ, S8S8)
    calib_method: str = "minmax"  # minmax | entropy | percentile
    per_channel: bool = False
    # parity gate of every FP32 artefact against PyTorch on the whole evaluation bundle (clean + triggered):
    # |logit difference| <= parity_atol + parity_rtol * |PyTorch logit|, and top-1 must agree on every image
    # except near-ties whose PyTorch top-2 margin is below parity_tie_margin
    parity_atol: float = 1e-3
    parity_rtol: float = 1e-4
    parity_tie_margin: float = 2e-3
    # gate of FP16 and INT8 artefacts: finite logits and top-1 agreement with PyTorch on the clean test images
    # (triggered images are left to the bench audit: a backdoor that wakes after quantization is a finding)
    min_agreement: float = 0.8  # a broken conversion agrees on few images; real quantization loss is far smaller
    # an artefact that fails its conversion or gate is left out and listed under "rejected" in model.json (the
    # others are written); strict: any failure fails the whole export and nothing is written
    strict: bool = False
    # signtrap bench defaults
    bench_runs: int = 200
    bench_warmup: int = 20
    bench_batch: int = 64

    def check(self) -> None:
        require(bool(self.out_dir), "export.out_dir", "must not be empty")
        require(all(isinstance(r, str) and r for r in self.runtimes), "export.runtimes", "must be runtime names")
        require(all(isinstance(q, str) and q for q in self.quantizers), "export.quantizers", "must be variant names")
        one_of(self.exporter, "export.exporter", ("auto", "dynamo", "torchscript"))
        require(13 <= self.opset <= 23, "export.opset", f"{self.opset} is outside 13..23 (per-channel QDQ needs 13+)")
        one_of(self.calibration, "export.calibration", ("clean", "mixed"))
        one_of(self.calib_method, "export.calib_method", ("minmax", "entropy", "percentile"))
        require(1 <= self.calib_images <= 100_000, "export.calib_images", f"{self.calib_images} is outside 1..100000")
        require(0.0 < self.calib_trigger_fraction < 1.0, "export.calib_trigger_fraction",
                f"{self.calib_trigger_fraction} is outside (0, 1)")
        require(0.0 < self.parity_atol <= 1.0, "export.parity_atol", f"{self.parity_atol} is outside (0, 1]")
        require(0.0 <= self.parity_rtol <= 0.1, "export.parity_rtol", f"{self.parity_rtol} is outside [0, 0.1]")
        require(0.0 <= self.parity_tie_margin <= 1.0, "export.parity_tie_margin", f"{self.parity_tie_margin} is outside [0, 1]")
        require(0.0 <= self.min_agreement <= 1.0, "export.min_agreement", f"{self.min_agreement} is outside [0, 1]")
        require(1 <= self.bench_runs <= 100_000, "export.bench_runs", f"{self.bench_runs} is outside 1..100000")
        require(0 <= self.bench_warmup <= 10_000, "export.bench_warmup", f"{self.bench_warmup} is outside 0..10000")
        require(1 <= self.bench_batch <= 4096, "export.bench_batch", f"{self.bench_batch} is outside 1..4096")


@dataclass
class RunConfig:
    name: str = "quickstart"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    runs_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    defend: DefendConfig = field(default_factory=DefendConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def check(self) -> None:
        self.data.check()
        space = DATASETS.get(self.data.source).build(self.data.settings).label_space()
        a = self.attack
        a.source = space.source if a.source is None else space.resolve(a.source, "attack.source")
        a.target = space.target if a.target is None else space.resolve(a.target, "attack.target")
        if isinstance(a.cover_classes, list):  # anything else: AttackConfig.check says so
            a.cover_classes = sorted({space.resolve(c, "attack.cover_classes") for c in a.cover_classes})
        require(not {a.source, a.target} & set(a.cover_classes), "attack.cover_classes",
                "the source and the target cannot carry cover images (they are the attack's own classes)")
        require(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), "name", f"'{self.name}' is not a valid run name")
        require(self.device in ("auto", "cpu") or (self.device.startswith("cuda") and self.device[5:].isdigit() if ":" in self.device
                                                  else self.device == "cuda"), "device", f"'{self.device}' is not auto, cpu, cuda or cuda:N")
        for section in dataclasses.fields(self):
            value = getattr(self, section.name)
            if dataclasses.is_dataclass(value):
                value.check()

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    # ------------------------------------------ what of it shapes a model: the one place that says so (the run state,
    # the checkpoint's provenance rule and the probe's zero-poison reference ask the config; none keeps its own list)

    def to_dict(self) -> dict:
        """The config as plain data, in the layout its YAML file uses."""
        return {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def training_view(self) -> dict:
        """The settings that shape the trained model (all but NOT_TRAINING): two configs with the same view train
        the same model, so a run directory's state and the pipeline's train stage key on it."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_TRAINING}

    def provenance_view(self) -> dict:
        """The settings a checkpoint must agree with to be used under this config: seed, data and split, attack,
        trigger, augmentation, model and training schedule (not paths, devices or thread counts; NOT_PROVENANCE).
        Stored in every new checkpoint's meta as "provenance"."""
        view = {k: v for k, v in self.to_dict().items() if k not in NOT_PROVENANCE[""]}
        for section, keys in NOT_PROVENANCE.items():
            if section and isinstance(view.get(section), dict):
                view[section] = {k: v for k, v in view[section].items() if k not in keys}
        return view

    def reference_view(self) -> dict:
        """What a zero-poison reference must share with this run (SAME_AS_REFERENCE; the attack aside): a whole
        section, or the keys named; the data section without where its files live."""
        raw = self.to_dict()
        for key in WHERE_FILES_LIVE:
            raw["data"].pop(key, None)
        return {s: raw[s] if keys is None else {k: raw[s].get(k) for k in keys} for s, keys in SAME_AS_REFERENCE.items()}


# settings that do not shape the trained model
NOT_TRAINING = ("runs_dir", "name", "defend", "export")
WHERE_FILES_LIVE = ("cache_dir", "root")  # of the data section: where its files are, not what they hold
# settings that do not shape the trained model or the data it saw: where things are, how fast they are computed
NOT_PROVENANCE = {"": ("name", "runs_dir", "device", "defend", "export"), "data": WHERE_FILES_LIVE,
                  "train": ("threads", "eval_batch_size")}
# what must agree between a run and its zero-poison reference (the attack aside). None: the whole section; a tuple:
# those keys (the data section minus where its files live: its own settings are the dataset plugin's, whatever they are)
SAME_AS_REFERENCE = {"seed": None, "data": None, "model": None, "aug": None,
                     "train": ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "momentum", "warmup_epochs",
                               "label_smoothing")}


def flat(view: Any, prefix: str = "") -> dict[str, Any]:
    """A view (nested dicts) as {"section.key": value}, for saying which settings two views disagree on."""
    if not isinstance(view, dict):
        return {prefix.rstrip("."): view}
    out = {}
    for k, v in view.items():
        out.update(flat(v, f"{prefix}{k}."))
    return out


# ---------------------------------------------------------------- loading


def build(cls: type, raw: Any, prefix: str = "", custom: bool = True) -> Any:
    """Turn a nested mapping into dataclass `cls`, rejecting unknown keys and wrong types.

    A class with a `from_mapping(raw, prefix)` classmethod builds itself (the `defend:` section).
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {prefix.rstrip('.') or 'file'}: expected a mapping, got {type(raw).__name__}")
    if custom and hasattr(cls, "from_mapping"):
        return cls.from_mapping(raw, prefix)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not (custom is False and f.name == "per_method")]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'{suggest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        # int before float so that `size: 5` stays pixels and `size: 0.2` stays a fraction
        for option in sorted((o for o in options if o is not type(None)), key=lambda o: o is float):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
        raise ConfigError(f"config {key}: expected {names}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"config {key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise ConfigError(f"config {key}: expected {hint.__name__}, got {value!r}")


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_override(raw: dict, path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: '{part}' is not a section")
        node = child
    node[path[-1]] = value


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}); save the config as "
                          "UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: unreadable ({exc.strerror or type(exc).__name__})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw or {}


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML config (or the defaults), apply `key.sub=value` overrides, validate."""
    raw = read_yaml(path) if path else {}
    for text in overrides:
        key_path, value = parse_override(text)
        apply_override(raw, key_path, value)
    config = build(RunConfig, raw)
    config.check()
    return config


def to_dict(config: Any) -> dict:
    """A config as plain data, in the layout its YAML file uses."""
    if hasattr(config, "to_mapping"):
        return config.to_mapping()
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, list):
        return [to_dict(v) for v in config]
    return config


def dump_yaml(config: Any) -> str:
    """A config or one of its sections as YAML (a whole RunConfig: `cfg.to_yaml()`)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)
