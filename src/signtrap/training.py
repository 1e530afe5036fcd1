"""`signtrap train`: poison, train, evaluate. One screen per function."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from signtrap import checkpoint, distributed
from signtrap.attacks.dormant import Sleeper
from signtrap.attacks.poison import build_training_set, manifest, plan_poison
from signtrap.classes import CLASS_NAMES, NUM_CLASSES
from signtrap.config import RunConfig, dump_yaml, load_config
from signtrap.errors import SigntrapError
from signtrap.experiment import Experiment
from signtrap.fileio import write_json, write_text
from signtrap.loop import Hooks, Loop, Schedule
from signtrap.metrics import summary_table
from signtrap.models import MEAN, STD, create_model
from signtrap.progress import say
from signtrap.provenance import machine, package_versions, precision_name, resolve_device

EPOCH_STREAM = 0xE90C


def setup_run(cfg: RunConfig, resume: bool, overwrite: bool) -> Path:
    run_dir = cfg.run_dir
    config_text = dump_yaml(cfg)
    if (run_dir / "config.yaml").is_file():
        if resume and load_config(run_dir / "config.yaml") != cfg:  # parsed, so new defaulted keys do not count
            raise SigntrapError(f"{run_dir}: --resume with a different config than the stored config.yaml")
        if not resume and not overwrite and (run_dir / "model.pt").is_file():
            raise SigntrapError(f"{run_dir}: already holds a trained model; pass --resume to continue or --overwrite to replace it")
    elif resume:
        raise SigntrapError(f"{run_dir}: nothing to resume (no config.yaml)")
    run_dir.mkdir(parents=True, exist_ok=True)
    if overwrite and not resume:
        for stale in ("last.pt", "model.pt", "metrics.json", "log.jsonl", "checksums.json", "backdoored.pt", "sleeper.json"):
            (run_dir / stale).unlink(missing_ok=True)
    write_text(run_dir / "config.yaml", config_text)
    return run_dir


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False,
          on_epoch_end: Callable[[int, dict], None] | None = None) -> Path:
    """Train (or continue) the run described by `cfg`; returns its run directory.

    Under torchrun every rank runs this same function; only rank 0 writes files.
    """
    world, device = distributed.init(resolve_device(cfg.device))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        return _train(cfg, world, device, resume, overwrite, on_epoch_end)
    finally:
        distributed.shutdown(world)


def _train(cfg: RunConfig, world: distributed.World, device: torch.device, resume: bool, overwrite: bool,
           on_epoch: Callable[[int, dict], None] | None) -> Path:
    main = world.is_main
    sleeper = Sleeper.prepare(cfg) if cfg.attack.dormant != "none" else None  # a missing INT8 path fails before anything is written
    run_dir = setup_run(cfg, resume, overwrite) if main else cfg.run_dir
    exp = Experiment.from_config(cfg, progress=main) if main else None
    distributed.barrier(world)  # rank 0 has written the config and prepared the cache
    exp = exp or Experiment.from_config(cfg, progress=False)
    plan = plan_poison(cfg.attack, exp.data, exp.splits.train, exp.trigger, cfg.seed)  # identical on every rank
    ts = build_training_set(cfg.attack, exp.data, exp.splits.train, plan, exp.trigger)
    torch.manual_seed(cfg.seed)  # initialisation is fixed by the run seed
    model = create_model(cfg.model.name, num_classes=NUM_CLASSES, dropout=cfg.model.dropout)
    hooks = Hooks(probe=lambda m: validation_columns(exp, m, device))
    loop = Loop(model, ts, Schedule.from_train(cfg.train), device, cfg.seed, EPOCH_STREAM, aug=cfg.aug,
                precision=cfg.train.precision, trigger=exp.trigger, hooks=hooks, world=world, desc="epoch",
                show_progress=main)
    precision = precision_name(loop.amp_dtype)
    if main:
        write_json(run_dir / "manifest.json", manifest(cfg.attack, plan, exp.data, exp.trigger, cfg.seed, len(exp.splits.train)))
        write_json(run_dir / "provenance.json", {"versions": package_versions(), "machine": machine(), "device": str(device),
                                                 "precision": precision, "world_size": world.size, "data_hash": exp.data.data_hash,
                                                 "data_cache": str(exp.data.path), "splits": exp.splits.sizes()})
        cover = f", {len(plan.cover_rows)} cover" if len(plan.cover_rows) else ""
        say(f"run {run_dir}: {len(ts.labels)} training images ({len(plan.rows)} poisoned{cover}), {len(exp.splits.val)} validation, "
            f"{len(exp.splits.test)} test, model {cfg.model.name} on {device} ({precision})" + (f" x {world.size} processes" if world.distributed else ""))
    start_epoch, history = restore(loop, run_dir) if resume else (0, [])

    def on_epoch_end(epoch: int, row: dict) -> None:
        if main:
            end_of_epoch(cfg, loop, run_dir, epoch, row, loop.history)
            if on_epoch:
                on_epoch(epoch, row)

    loop.hooks.on_epoch_end = on_epoch_end
    history = loop.fit(start_epoch, history)
    if main:
        model = loop.model
        if sleeper is not None:
            model = sleeper.apply(model, exp, run_dir, model_meta(cfg, exp, epoch=len(history)), device)
        finish(cfg, exp, model, run_dir, device, history)
    distributed.barrier(world)
    return run_dir


def validation_columns(exp: Experiment, model: nn.Module, device: torch.device) -> dict:
    """The per-epoch probe of `signtrap train`: clean accuracy, ASR and false-trigger rate on validation."""
    val = exp.evaluate(model, "val", device, details=False)
    return {"val_clean_acc": val["clean_acc"]["rate"], "val_asr": val["asr"]["rate"], "val_false_trigger": val["false_trigger"]["rate"]}


def restore(loop: Loop, run_dir: Path) -> tuple[int, list]:
    if not (run_dir / "last.pt").is_file():
        return 0, []
    state = checkpoint.load(run_dir / "last.pt", map_location=loop.device)
    loop.load_state_dict(state)
    if loop.world.is_main:
        say(f"resuming after epoch {state['epoch']}")
    return state["epoch"], list(state["history"])


def end_of_epoch(cfg: RunConfig, loop: Loop, run_dir: Path, epoch: int, row: dict, history: list) -> None:
    """Write the epoch checkpoint and the log (rank 0 only); `history` already ends with `row`."""
    checkpoint.save(run_dir / "last.pt", {**loop.state_dict(), "epoch": epoch, "history": history})
    write_text(run_dir / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    say(f"epoch {epoch}/{cfg.train.epochs}: loss {row['loss']:.4f}, {row['images_per_s']:.0f} img/s, "
        f"val clean acc {_pct(row['val_clean_acc'])}, val ASR {_pct(row['val_asr'])}, val false-trigger {_pct(row['val_false_trigger'])}")


def finish(cfg: RunConfig, exp: Experiment, model: nn.Module, run_dir: Path, device: torch.device, history: list) -> dict:
    meta = model_meta(cfg, exp, epoch=len(history))
    checkpoint.save(run_dir / "model.pt", checkpoint.model_payload(model, meta))
    checkpoint.record_checksum(run_dir, "model.pt")
    return write_metrics(exp, model, run_dir, device)


def model_meta(cfg: RunConfig, exp: Experiment, epoch: int) -> dict:
    return {"model_name": cfg.model.name, "dropout": cfg.model.dropout, "num_classes": NUM_CLASSES,
            "classes": list(CLASS_NAMES), "input_size": exp.data.size, "input": "float32 NCHW RGB in [0,1] (pixel/255)",
            "normalisation": {"mean": list(MEAN), "std": list(STD), "inside_model": True},
            "trigger": exp.trigger.spec, "attack": {"kind": cfg.attack.kind, "source": cfg.attack.source, "target": cfg.attack.target},
            "run": cfg.name, "epoch": epoch, "data_hash": exp.data.data_hash}


def write_metrics(exp: Experiment, model: nn.Module, out_dir: Path, device: torch.device | str) -> dict:
    metrics = {split: exp.evaluate(model, split, device) for split in ("test", "val")}
    metrics["samples"] = {split: len(exp.eval_set(split).labels) for split in ("test", "val")}
    write_json(Path(out_dir) / "metrics.json", metrics)
    say(summary_table({s: metrics[s] for s in ("test", "val")}))
    return metrics


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"
