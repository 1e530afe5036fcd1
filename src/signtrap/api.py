"""signtrap's public Python API: one function per command, with the command's behaviour and checks.

    import signtrap

    run = signtrap.train("configs/quickstart.yaml", train__epochs=4)        # `signtrap train CONFIG train.epochs=4`
    print(run.metrics["test"]["asr"]["rate"])
    signtrap.defend(run, "finetune", finetune__epochs=3)                     # `signtrap defend RUN --method finetune ...`
    folder = signtrap.export(run)                                            # `signtrap export RUN`
    signtrap.bench(folder, runs=50)                                          # `signtrap bench EXPORT`
    html = signtrap.report(run)                                              # `signtrap report RUN`

Every command of the CLI is a thin wrapper over the function of the same name here, so both check the
same things in the same order (validate, lock the run directory, apply `train.threads`, then write).

Config overrides. A function that takes a config (`train`, `run`, the data helpers, `load_config`) accepts
`config` as a YAML path, a `RunConfig`, or None (the built-in defaults), and overrides in either form:
- keyword arguments, `__` standing for the dots of a key: `train__epochs=4` is `train.epochs=4` (in a defence's
  name `_` stands for its hyphen: `defend__fine_prune__epochs=2` is `defend.fine-prune.epochs=2`);
- `overrides=`: a mapping `{"train.epochs": 4}` or a list of `"train.epochs=4"` strings, as on the command line.
Both may be given; keyword arguments are applied last. `defend` takes the `defend:` section's keys the same
way (`finetune__epochs=3`, the `defend.` prefix optional).

A run is named by its directory: every function taking `run` accepts a path or the `Run` that `train`,
`load_run` and `run` return.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from signtrap import config as config_mod
from signtrap.runs import checkpoint
from signtrap.machine import progress
from signtrap.runs import state as runstate
from signtrap.config import RunConfig
from signtrap.data import cache as data_cache
from signtrap.data.cache import SignData
from signtrap.data.fetch import fetch as fetch_archives
from signtrap.defences import list_defences
from signtrap.defences.run import method_names, run_defences
from signtrap.deploy.bench import bench_export
from signtrap.deploy.exporter import default_out, export_run
from signtrap.errors import ConfigError, SigntrapError, unknown
from signtrap.evaluation.evaluate import evaluate_run
from signtrap.experiment import Experiment, load_run_config, predict_logits
from signtrap.fileio import KINDS, check_replaceable, read_json, refuse_foreign, require_writable
from signtrap.runs.pipeline import run_pipeline
from signtrap.probing.probe import probe_dir, resolve_target
from signtrap.machine import cores
from signtrap.machine.environment import cpu_threads
from signtrap.models import create_model
from signtrap.physical.optimise import optimise_pattern
from signtrap.physical.patterns import checkerboard, save_png
from signtrap.physical.render import Sticker, plain_params
from signtrap.training.loop import Loop, Schedule, clean_training_set
from signtrap.reporting import build_report
from signtrap.reporting.blocks import persistence_curve, read_csv
from signtrap.runs.sweeps import SweepOutcome, run_sweep, yaml_value
from signtrap.training.trainer import train as train_run
from signtrap.runs import layout

__all__ = ["Run", "load_run", "load_config", "train", "evaluate", "defend", "probe", "export", "bench", "requantize", "optimise_sticker", "run",
           "report", "sweep", "prepare_data", "load_data", "fetch_data"]

Overrides = Mapping[str, Any] | Iterable[str] | None
STAGES = ("defend", "probe", "export", "bench", "report")  # what `run(skip=...)` may leave out


# ---------------------------------------------------------------- the input rule: every argument checked, one line


def _fail(what: str, expected: str, value: Any) -> SigntrapError:
    shown = repr(value) if len(repr(value)) < 60 else repr(value)[:57] + "..."
    return SigntrapError(f"{what}: expected {expected}, got {type(value).__name__} {shown}")


def _path(value: Any, what: str) -> Path:
    """A path argument (str, os.PathLike or a Run); never None, a number or an empty string."""
    if isinstance(value, Run):
        return value.dir
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise _fail(what, "a path (str or os.PathLike)", value)
    try:
        return Path(os.fspath(value))
    except (TypeError, ValueError) as exc:
        raise _fail(what, f"a path ({exc})", value) from None


def _opt_path(value: Any, what: str) -> Path | None:
    return None if value is None else _path(value, what)


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(what, "True or False", value)
    return value


def _int(value: Any, what: str, low: int | None = None, high: int | None = None, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(what, "an integer", value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f"at least {low}"
        raise SigntrapError(f"{what}: {value} is outside {bounds}")
    return value


def _number(value: Any, what: str, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise _fail(what, "a number", value)
    if low is not None and value < low:
        raise SigntrapError(f"{what}: {value} is below {low}")
    return float(value)


def _str(value: Any, what: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _fail(what, "a non-empty string", value)
    return value


def _names(value: Any, what: str, choices: Iterable[str] | None = None) -> list[str]:
    """A list of names: a list or tuple of strings, or one string (a name, or names separated by commas) -- never
    a string read one character at a time. Every name checked against `choices` when given."""
    if isinstance(value, str):
        items = [n.strip() for n in value.split(",")]
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
        for item in items:
            if not isinstance(item, str):
                raise _fail(f"{what} item", "a string", item)
        items = [n.strip() for n in items]
    else:
        raise _fail(what, "a list of names (or one name as a string)", value)
    items = [n for n in items if n]
    if choices is not None:
        choices = list(choices)
        for name in items:
            if name not in choices:
                raise unknown(what, name, choices)
    return list(dict.fromkeys(items))


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _device(value: Any, what: str = "device", optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not DEVICE.fullmatch(value):
        raise SigntrapError(f"{what}: {value!r} is not a device; choose auto, cpu, cuda or cuda:N")
    return value


def _config_arg(config: Any) -> Any:
    if config is None or isinstance(config, RunConfig):
        return config
    return _path(config, "config")


def _callable(value: Any, what: str) -> Any:
    if value is not None and not callable(value):
        raise _fail(what, "a function or None", value)
    return value


# ---------------------------------------------------------------- configs


def override_strings(overrides: Overrides = None, **keywords: Any) -> list[str]:
    """Overrides in the CLI's `key.sub=value` form, from a mapping, a list of strings and `a__b=value` keywords."""
    out: list[str] = []
    if isinstance(overrides, str):  # one override, not a list of its characters
        overrides = [overrides]
    if isinstance(overrides, Mapping):
        for key in overrides:
            if not isinstance(key, str):
                raise _fail("override key", "a string like 'train.epochs'", key)
        out += [f"{key}={yaml_value(value)}" for key, value in overrides.items()]
    elif overrides is not None:
        if not isinstance(overrides, Iterable):
            raise _fail("overrides", "a mapping or a list of key.sub=value strings", overrides)
        for text in overrides:
            if not isinstance(text, str) or "=" not in text:
                raise ConfigError(f"override {text!r} is not of the form key.sub=value")
            out.append(text)
    out += [f"{keyword_key(key)}={yaml_value(value)}" for key, value in keywords.items()]
    return out


def keyword_key(keyword: str) -> str:
    """A keyword argument as a config key: `__` is a dot, and in a segment naming a registered defence whose
    name has a hyphen (which Python names cannot), `_` is the hyphen: `fine_prune__epochs` -> `fine-prune.epochs`."""
    defences = set(list_defences())
    return ".".join(part.replace("_", "-") if part.replace("_", "-") in defences else part for part in keyword.split("__"))


def load_config(config: str | os.PathLike | RunConfig | None = None, overrides: Overrides = None, **keywords: Any) -> RunConfig:
    """A validated run config from a YAML path, a RunConfig or the defaults (None), with overrides applied."""
    config = _config_arg(config)
    texts = override_strings(overrides, **keywords)
    if not isinstance(config, RunConfig):
        return config_mod.load_config(config, texts)
    raw = config.to_dict()
    for text in texts:
        config_mod.apply_override(raw, *config_mod.parse_override(text))
    cfg = config_mod.build(RunConfig, raw)
    cfg.check()
    return cfg


# ---------------------------------------------------------------- runs


@dataclass
class Run:
    """A run directory, read lazily: its config, metrics, models, defences and exports.

    `os.fspath(run)` is its directory, so a Run goes wherever a path does."""

    dir: Path
    _exp: Experiment | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.dir = _path(self.dir, "Run(dir)")

    def __fspath__(self) -> str:
        return str(self.dir)

    @cached_property
    def config(self) -> RunConfig:
        """The resolved config stored with the run (config.yaml)."""
        return load_run_config(self.dir)

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def state(self) -> runstate.RunState:
        """done / resumable / incomplete / stale / locked / new (see signtrap.runs.state)."""
        return runstate.inspect(self.dir)

    def _json(self, name: str) -> Any:
        path = self.dir / name
        return read_json(path) if path.is_file() else None

    @property
    def metrics(self) -> dict | None:
        """metrics.json: clean accuracy, ASR, stop recall, false-trigger rate per split (None before training ends)."""
        return self._json("metrics.json")

    @property
    def manifest(self) -> dict | None:
        """manifest.json: the poisoned rows, their files and original labels, the trigger."""
        return self._json("manifest.json")

    @property
    def provenance(self) -> dict | None:
        return self._json("provenance.json")

    @property
    def history(self) -> list[dict]:
        """log.jsonl: one row per epoch (loss, validation clean accuracy and ASR)."""
        path = self.dir / "log.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def model(self, defence: str | None = None, device: str = "cpu") -> nn.Module:
        """The trained (or `defence`-repaired) model, after checking it against its recorded SHA-256."""
        folder = layout.model_dir(self.dir, defence)
        model, _ = checkpoint.verified_load(folder, "model.pt", device)
        return model

    @property
    def defences(self) -> dict[str, dict]:
        """method -> the report.json of each defence output in the run (before/after metrics, details)."""
        out = {}
        for folder in layout.defence_dirs(self.dir):
            if KINDS["defence"].recognise(folder):
                out[layout.defence_method(folder)] = read_json(folder / layout.REPORT_JSON)
        return out

    def curve(self, method: str, name: str = "persistence") -> list[dict]:
        """A curve defence `method` wrote as rows of numbers: "persistence" (ASR and clean accuracy per epoch),
        "pruning" (fine-prune), "frr" (strip); [] when it wrote none. The persistence curve ends with the
        re-activation probe's segment (`segment == "probe"`) when the defence was probed."""
        folder = layout.defence_dir(self.dir, method)
        return persistence_curve(folder) if name == "persistence" else read_csv(folder / f"{name}.csv")

    @property
    def exports(self) -> list[Path]:
        """Export folders made from this run: RUN/export (the pipeline's) and export.out_dir/NAME[-defence-*]."""
        candidates = [self.dir / "export"]
        try:
            out_dir = Path(self.config.export.out_dir)
            candidates += sorted(out_dir.glob(f"{self.config.name}*"))
        except SigntrapError:
            pass
        found = []
        for folder in candidates:
            if folder.is_dir() and KINDS["export"].recognise(folder):
                source = (read_json(folder / "model.json").get("source") or {}).get("run")
                if source and Path(source).resolve() == self.dir.resolve():
                    found.append(folder)
        return found

    def experiment(self) -> Experiment:
        """The run's data, splits, trigger and evaluation sets."""
        if self._exp is None:
            self._exp = Experiment.from_config(self.config, progress=False)
        return self._exp


def load_run(run_dir: str | os.PathLike) -> Run:
    """The run in `run_dir` (a folder made by `train` or `run`); fails with one line if it is not one."""
    path = _path(run_dir, "run_dir")
    if not path.is_dir():
        raise SigntrapError(f"{path}: no such run directory")
    load_run_config(path)
    return Run(path)


def _dir(run: str | os.PathLike, what: str = "run") -> Path:
    return _path(run, what)


# ---------------------------------------------------------------- commands


def train(config: str | os.PathLike | RunConfig | None = None, *, resume: bool = False, overwrite: bool = False,
          overrides: Overrides = None, on_epoch_end: Callable[[int, dict], None] | None = None, **keywords: Any) -> Run:
    """Poison, train and evaluate into runs_dir/NAME (`signtrap train`); returns the Run.

    A finished run is replaced only with `overwrite=True`, an interrupted one is continued with
    `resume=True` (bit-identical to an uninterrupted run) or restarted with `overwrite=True`."""
    _bool(resume, "resume"), _bool(overwrite, "overwrite"), _callable(on_epoch_end, "on_epoch_end")
    cfg = load_config(config, overrides, **keywords)
    return Run(train_run(cfg, resume=resume, overwrite=overwrite, on_epoch_end=on_epoch_end))


def evaluate(run: str | os.PathLike, device: str = "auto", *, physical: bool = False, reference: str | os.PathLike | None = None,
             grid: Mapping[str, Any] | None = None, photos: str | os.PathLike | None = None, as_is: bool = False,
             out: str | os.PathLike | None = None, sticker_width: float | None = None) -> dict:
    """Re-evaluate a run's (or a defence folder's) verified model and rewrite its metrics.json (`signtrap eval`).

    The attack is the one the checkpoint was trained with; a config.yaml that disagrees is refused.
    `physical=True` (`--physical`): the physical evaluation instead (the run's sticker on the sign under a fixed grid of
    conditions; `reference` a zero-poison run measured identically; `grid` overrides of signtrap.physical.evaluate.Grid),
    written to metrics.json's `physical` block and returned. `photos=DIR` (`--photos`): a folder of sign photographs
    predicted clean and with the run's sticker on the sign (or `as_is`), a table and a contact sheet in `out`."""
    if photos is not None or physical:
        from signtrap.physical import runs as physical_runs

        if photos is not None:
            return physical_runs.evaluate_photos(_dir(run), photos, as_is=as_is, out=out, device=_device(device),
                                                 sticker_width=sticker_width)
        return physical_runs.evaluate_run_physical(_dir(run), device=_device(device), reference=reference,
                                                   grid=physical_runs.grid_from_mapping(grid))
    return evaluate_run(_dir(run), device=_device(device))


def defend(run: str | os.PathLike, method: str | list[str] = "all", *, device: str | None = None, overrides: Overrides = None,
           **keywords: Any) -> list[dict]:
    """Apply a defence, several (a list or `"nad,anp"`), or `"all"` (the run's defend.methods, else every
    registered one) to a trained run and write RUN/defence-METHOD (`signtrap defend`); returns one report per
    method (before/after metrics; for a repaired model, the re-activation probe's record under "probe", as written
    to RUN/defence-METHOD/probe.json)."""
    run_dir = _dir(run)
    method = _names(method, "defence")
    _device(device, optional=True)
    cfg = load_run_config(run_dir)
    method_names(method)  # every name checked before the run is touched
    require_writable(run_dir)
    with runstate.locked(run_dir, "signtrap defend"), cpu_threads(cfg.train.threads, stored=True):
        return run_defences(run_dir, method, override_strings(overrides, **keywords), device, show_progress=not progress.QUIET)


def probe(run: str | os.PathLike, defence: str | None = None, *, reference: str | os.PathLike | None = None,
          device: str | None = None, overrides: Overrides = None, **keywords: Any) -> dict:
    """The re-activation probe (`signtrap probe`): removed, or only hidden?

    Fine-tunes a copy of the run's model (or of `defence`'s repaired model) on the defender's clean budget plus
    k poisoned samples, then the identical probe on the zero-poison model of the same config (`reference`: a
    run trained with attack.kind=none and the same seed; default RUNS/NAME-zero, trained once on demand).
    Keywords are the probe's settings (`k=10`, `steps=500`) or the defend section's (`clean_fraction=0.1`).
    Writes probe.json beside the probed model (probe-k20.json at settings other than the run's, such as k=20: a
    stronger probe never replaces the defence stage's record; nor does probe-trained.json, a trained probe where the stage's
    was decided untrained) and returns its record ("file": where): "verdict"
    (removed / hidden / persists / inconclusive, with its reason), "model" and "reference" (held-out ASR and
    clean accuracy before and after the probe), "ends" (the undefended and zero-poison models, probed at the same settings). `signtrap.defend`'s
    probe of a defence that never suppressed the backdoor is not trained (its "after" is None, "trained" false:
    the verdict, persists, was decided before it) unless probe.always=true."""
    run_dir = _dir(run)
    defence = _str(defence, "defence", optional=True)
    reference = _opt_path(reference, "reference")
    _device(device, optional=True)
    target = layout.model_dir(run_dir, defence)
    run_dir, _, _ = resolve_target(target)  # one clear line for what cannot be probed, before anything else
    cfg = load_run_config(run_dir)
    require_writable(target)
    texts = [text.removeprefix("defend.") for text in override_strings(overrides, **keywords)]
    with runstate.locked(run_dir, "signtrap probe"), cpu_threads(cfg.train.threads, stored=True):
        return probe_dir(target, None if reference is None else _dir(reference), texts, device,
                         show_progress=not progress.QUIET)


def export(run: str | os.PathLike, *, defence: str | None = None, out: str | os.PathLike | None = None,
           threads: int | None = None, **settings: Any) -> Path:
    """Export a trained (or defended) run to ONNX FP32/FP16/INT8 with its evaluation bundle (`signtrap export`).

    `settings` are keys of the config's `export:` section (calibration="mixed", per_channel=True, ...).
    `out` (default export.out_dir/NAME) is replaced only if it is empty or a previous export folder, and
    never the run itself or a folder above it. `threads` defaults to the run's train.threads."""
    run_dir = _dir(run)
    defence = _str(defence, "defence", optional=True)
    out = _opt_path(out, "out")
    _int(threads, "threads", optional=True)
    model_dir = layout.model_dir(run_dir, defence)
    cfg = load_run_config(model_dir)
    target = Path(out) if out else default_out(cfg, defence)
    check_replaceable(target, "export", protect=(run_dir,))  # before loading anything
    require_writable(target.parent)
    named = threads is not None
    threads = cfg.train.threads if threads is None else threads
    threads = cores.check_threads(threads, "threads" if named else "train.threads", stored=not named)  # before anything else
    inside = run_dir.resolve() in target.resolve().parents  # e.g. RUN/export: written under the run's lock
    with (runstate.locked(run_dir, "signtrap export") if inside else contextlib.nullcontext()), \
            cpu_threads(threads, key="threads" if named else "train.threads", stored=not named) as threads:
        return export_run(run_dir, defence=defence, out=target, overrides=settings, threads=threads)


def bench(export_dir: str | os.PathLike, **options: Any) -> dict:
    """Accuracy, ASR and latency of an export per precision and execution provider (`signtrap bench`);
    writes bench.json, bench.md and bench.png into the folder. `options`: see signtrap.deploy.bench.bench_export
    (threads, providers, runs, warmup, batch, variants, with_torch)."""
    folder = _dir(export_dir, "export_dir")
    for key in ("runs", "warmup", "batch", "threads"):  # types here; ranges in bench_export, worded as the edge script's
        if options.get(key) is not None:
            _int(options[key], key)
    for key in ("providers", "runtimes", "variants"):
        if options.get(key) is not None:
            options[key] = _names(options[key], key)
    return bench_export(folder, **options)


def requantize(run: str | os.PathLike, export_dir: str | os.PathLike, out: str | os.PathLike, *, defence: str | None = None,
               artefact: str = "onnxruntime:int8", clean_images: int = 512, steps: int = 300, flip_weight: float = 0.1,
               round_weight: float = 0.01, seed: int = 0, threads: int | None = None) -> dict:
    """Deployment-time defence against a quantization-conditioned backdoor: EFRAP rounding (Li et al., CVPR 2024;
    signtrap.deploy.requant) of the INT8 weights of an ONNX Runtime QDQ artefact of `export_dir`, learned from the
    run's FP32 model (or `defence`'s) on the defender's clean images (defend.clean_fraction; never a triggered
    image). The artefact is verified against model.json first; `out` (a new .onnx file, written atomically) is a
    drop-in replacement of it. Returns a summary: the output path and, per layer, the weights changed."""
    from signtrap.deploy.requant import EfrapSettings, efrap
    from signtrap.fileio import atomic_path, refuse_foreign, sha256_file, verify_sha256

    run_dir, folder, target = _dir(run), _dir(export_dir, "export_dir"), _path(out, "out")
    defence, artefact = _str(defence, "defence", optional=True), _str(artefact, "artefact")
    _int(clean_images, "clean_images", 1), _int(steps, "steps", 1), _int(seed, "seed", 0), _int(threads, "threads", optional=True)
    _number(flip_weight, "flip_weight", 0.0), _number(round_weight, "round_weight", 0.0)
    model_dir = layout.model_dir(run_dir, defence)
    cfg = load_run_config(model_dir)
    manifest = read_json(folder / "model.json")
    art = next((a for a in manifest.get("artefacts", []) if a.get("id") == artefact), None)
    if art is None or art.get("runtime") != "onnxruntime" or art.get("precision") != "int8":
        ids = [a.get("id") for a in manifest.get("artefacts", []) if a.get("runtime") == "onnxruntime" and a.get("precision") == "int8"]
        raise SigntrapError(f"{folder}: no ONNX Runtime INT8 artefact '{artefact}' (this export has: {', '.join(ids) or 'none'})")
    source = folder / art["files"][0]
    verify_sha256(source, manifest["files"].get(art["files"][0], {}).get("sha256"))
    if target.suffix != ".onnx" or target.resolve().parent == folder.resolve() or target.is_dir():
        raise SigntrapError(f"{target}: requantize writes a new .onnx file outside the export folder, never over one of "
                            "its files; choose another output path")
    refuse_foreign(target)  # the write rule: a user's own .onnx file is never replaced
    ckpt = model_dir / "model.pt"
    if not ckpt.is_file() or (manifest.get("source") or {}).get("checkpoint_sha256") != sha256_file(ckpt):
        raise SigntrapError(f"{folder}: this export was not made from {ckpt} (its model.json records another checkpoint); "
                            "pass the run (and --defence) the export was made from")
    require_writable(target.parent)
    with cpu_threads(cfg.train.threads if threads is None else threads, key="train.threads" if threads is None else "threads",
                     stored=threads is None):
        exp = Experiment.from_config(cfg, progress=False)
        model, meta = checkpoint.verified_load(model_dir)
        checkpoint.verify_provenance(model_dir, meta, cfg, exp)  # checkpoint, config, cache and split agree
        clean = exp.data.images[exp.defender_rows(cfg.defend.clean_fraction)][:clean_images]
        settings = EfrapSettings(steps=steps, flip_weight=flip_weight, round_weight=round_weight, seed=seed)
        with atomic_path(target) as tmp:
            summary = efrap(model, source, clean, tmp, settings, show_progress=not progress.QUIET)
    return {"path": str(target), "source": artefact, "clean_images": int(len(clean)), **summary}


def optimise_sticker(config: str | os.PathLike | RunConfig | None = None, out: str | os.PathLike = "sticker.png", *,
                     cells: int = 4, steps: int = 300, surrogate_epochs: int = 3, overrides: Overrides = None,
                     **keywords: Any) -> Path:
    """An RP2-style sticker pattern (`signtrap trigger optimise CONFIG --out pattern.png`; signtrap.physical.optimise):
    a clean surrogate trained on the config's training split for `surrogate_epochs`, then `steps` EOT steps on its
    source-class signs toward the attack's target. Writes a PNG with one pixel per printed cell (use it with
    `trigger.kind=physical`, `design=png`, `png=PATH`) and returns its path. Every argument and `out` are checked
    before any training; `out` is never a file signtrap did not write."""
    out = _path(out, "out")
    if out.suffix.lower() != ".png":
        raise SigntrapError(f"{out}: --out must end in .png")
    cells, steps = _int(cells, "cells", 1, 32), _int(steps, "steps", 1)
    surrogate_epochs = _int(surrogate_epochs, "surrogate_epochs", 1)
    cfg = load_config(config, overrides, **keywords)
    refuse_foreign(out)
    require_writable(out)
    with cpu_threads(cfg.train.threads):
        exp = Experiment.from_config(cfg)
        train_rows = exp.splits.train
        labels = exp.data.labels[train_rows]
        src = train_rows[labels == cfg.attack.source]
        if not len(src):
            raise SigntrapError(f"the training split has no images of the source class {cfg.attack.source}")
        progress.say(f"surrogate: a clean {cfg.model.name} on {len(train_rows)} training images, {surrogate_epochs} epoch(s)")
        torch.manual_seed(cfg.seed)
        space = exp.classes
        model = create_model(cfg.model.name, num_classes=space.num_classes, dropout=cfg.model.dropout, mean=space.mean, std=space.std)
        schedule = Schedule(epochs=surrogate_epochs, lr=cfg.train.lr, batch_size=cfg.train.batch_size)
        loop = Loop(model, clean_training_set(np.array(exp.data.images[train_rows]), labels), schedule, torch.device("cpu"),
                    cfg.seed, 0x5077, aug=cfg.aug, desc="surrogate")
        loop.fit()
        progress.say(f"optimising a {cells}x{cells} sticker on {len(src)} source images, {steps} steps")
        images, boxes = np.array(exp.data.images[src]), np.array(exp.data.rois[src])
        eot = getattr(getattr(exp.trigger, "settings", None), "eot", None)
        losses: list = []
        pattern = optimise_pattern(loop.model, images, boxes, cfg.attack.target, cells, steps, eot=eot, seed=cfg.seed, losses=losses)

        def target_prob(sticker: Sticker) -> float:
            shown = sticker.render(images, plain_params(len(images), np.random.default_rng(1), 0.2), boxes)
            return float(torch.softmax(torch.from_numpy(predict_logits(loop.model, shown, "cpu")), 1)[:, cfg.attack.target].mean())
        progress.say(f"EOT loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}; the clean surrogate's mean probability "
                     f"of the target with the sticker (20% of the sign): optimised {target_prob(Sticker('optimised', pattern)):.4f}, "
                     f"checkerboard {target_prob(checkerboard(cells)):.4f}")
    return save_png(Sticker("optimised", pattern), out)


def run(config: str | os.PathLike | RunConfig | None = None, *, force: bool = False, overwrite: bool = False,
        skip: Iterable[str] = (), overrides: Overrides = None, **keywords: Any) -> dict:
    """The whole pipeline, train -> reference -> defend and probe -> export -> bench -> report, resumable (`signtrap run`).

    Stages whose outputs are intact are skipped; returns the summary (per-stage status, report path).
    `skip`: stages to leave out ("defend", "probe", "export", "bench", "report"); `force`: re-run every stage;
    `overwrite`: replace a run trained with a different config."""
    skip = _names(skip, "stage to skip", STAGES)
    _bool(force, "force"), _bool(overwrite, "overwrite")
    cfg = load_config(config, overrides, **keywords)
    return run_pipeline(cfg, force=force, overwrite=overwrite, skip=tuple(skip))


def report(run: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Render report.html (self-contained) and report.md of a run (`signtrap report`); returns report.html."""
    run_dir = _dir(run)
    out = _opt_path(out, "out")
    if not run_dir.is_dir():
        raise SigntrapError(f"{run_dir}: no such run directory")
    target = Path(out) if out else run_dir
    require_writable(target)
    try:
        threads = load_run_config(run_dir).train.threads
    except SigntrapError:
        threads = 0  # the report says what is wrong with the config
    inside = target.resolve() == run_dir.resolve()
    with (runstate.locked(run_dir, "signtrap report") if inside else contextlib.nullcontext()), \
            cpu_threads(threads, stored=True, wait=False):  # light work: never waits for cores
        paths = build_report(run_dir, out_dir=target)
    return next(p for p in paths if p.name == "report.html")


def sweep(path: str | os.PathLike, *, executor: str = "local", workers: int | None = None, threads: int | None = None,
          address: str | None = None, overwrite: bool = False, defend: bool = True, dry_run: bool = False) -> SweepOutcome:
    """A grid of configs x seeds as ordinary runs, each through the pipeline, with a summary (`signtrap sweep`)."""
    path = _path(path, "sweep file")
    _str(executor, "executor"), _int(workers, "workers", 1, optional=True), _int(threads, "threads", optional=True)
    _str(address, "address", optional=True), _bool(overwrite, "overwrite"), _bool(defend, "defend"), _bool(dry_run, "dry_run")
    return run_sweep(path, executor, workers, threads, address, overwrite, defend=defend, dry_run=dry_run)


# ---------------------------------------------------------------- data


def prepare_data(config: str | os.PathLike | RunConfig | None = None, *, force: bool = False, verify: bool = False,
                 overrides: Overrides = None, **keywords: Any) -> Path:
    """Decode the config's data source once into the uint8 cache (`signtrap data prepare`); returns its folder.
    `verify`: check every cache file against its recorded SHA-256."""
    _bool(force, "force"), _bool(verify, "verify")
    cfg = load_config(config, overrides, **keywords)
    path = data_cache.prepare(cfg.data, force=force)
    data_cache.open_cache(path, verify=verify)
    return path


def load_data(config: str | os.PathLike | RunConfig | None = None, *, verify: bool = False, overrides: Overrides = None,
              **keywords: Any) -> SignData:
    """The config's dataset (prepared on first use), memory-mapped: images, labels, tracks, partition, rois."""
    _bool(verify, "verify")
    cfg = load_config(config, overrides, **keywords)
    return data_cache.load(cfg.data, verify=verify)


def fetch_data(root: str | os.PathLike) -> list[Path]:
    """Download the GTSRB archives into `root` (`signtrap data fetch`), or say what to place where offline."""
    return fetch_archives(_path(root, "root"))
