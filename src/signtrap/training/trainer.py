"""`signtrap train`: poison, train, evaluate. One screen per function."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from signtrap.runs import checkpoint
from signtrap.training import distributed
from signtrap.runs import state as runstate
from signtrap.attacks import procedure_for
from signtrap.attacks.poison import build_training_set, manifest, plan_poison
from signtrap.config import RunConfig
from signtrap.data.cache import verify_cache
from signtrap.errors import SigntrapError
from signtrap.experiment import Experiment
from signtrap.fileio import one_line, require_writable, write_json, write_text
from signtrap.training.loop import Hooks, Loop, Schedule, measured
from signtrap.machine import cores
from signtrap.evaluation.metrics import summary_table
from signtrap.models import create_model
from signtrap.machine.progress import say
from signtrap.machine.environment import cpu_threads, machine, package_versions, precision_name, resolve_device

EPOCH_STREAM = 0xE90C


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False,
          on_epoch_end: Callable[[int, dict], None] | None = None) -> Path:
    """Train (or continue) the run described by `cfg`; returns its run directory.

    Nothing in the run directory is touched before everything is validated: the run's state (a finished
    run needs `overwrite`, an interrupted one `resume` or `overwrite`), the data cache (every file against
    its recorded hash), the poisoning plan, the model and, when resuming, last.pt. The run directory is
    locked for the whole run. Under torchrun every rank runs this same function; only rank 0 locks and
    writes files.
    """
    cores.check_threads(cfg.train.threads)  # a thread count above this process's allowance: one line, nothing touched
    world, device = distributed.init(resolve_device(cfg.device))
    try:
        if not world.is_main:
            with cpu_threads(cfg.train.threads):
                return _train(cfg, world, device, resume, overwrite, on_epoch_end)
        # the run's lock first (a second process on the same run is refused at once), then the CPU cores
        with runstate.locked(cfg.run_dir, "signtrap train"), cpu_threads(cfg.train.threads):
            return _train(cfg, world, device, resume, overwrite, on_epoch_end)
    finally:
        distributed.shutdown(world)


def _train(cfg: RunConfig, world: distributed.World, device: torch.device, resume: bool, overwrite: bool,
           on_epoch: Callable[[int, dict], None] | None) -> Path:
    main = world.is_main
    run_dir = cfg.run_dir
    if main:
        action = runstate.decide(runstate.inspect(run_dir, cfg), resume, overwrite)
    else:  # rank 0 holds the lock and has decided the same from the same files
        action = "fresh" if not resume else "nothing" if runstate.finished(run_dir) is None else "resume"
    if action == "nothing":
        say(f"{run_dir}: already finished (model.pt matches its recorded hash); nothing to resume")
        return run_dir
    procedure = procedure_for(cfg)  # attack.persist (the INT8 sleeper, SBL): its checks fail before anything is written
    if procedure is not None:
        procedure.prepare()
    if main:
        require_writable(run_dir)
    exp = Experiment.from_config(cfg, progress=main) if main else None
    if main:
        verify_cache(exp.data)  # its hash goes into provenance.json: the bytes must be the ones it was computed on
    distributed.barrier(world)  # rank 0 has prepared and checked the cache
    exp = exp or Experiment.from_config(cfg, progress=False)
    plan = plan_poison(cfg.attack, exp.data, exp.splits.train, exp.trigger, cfg.seed)  # identical on every rank
    ts = build_training_set(cfg.attack, exp.data, exp.splits.train, plan, exp.trigger)
    torch.manual_seed(cfg.seed)  # initialisation is fixed by the run seed
    space = exp.classes
    model = create_model(cfg.model.name, num_classes=space.num_classes, dropout=cfg.model.dropout, mean=space.mean, std=space.std)
    dry_run(model, cfg.model.name, exp.data.size, space.num_classes)  # a model that cannot run at the data's size fails before any file is touched

    def validate(m: nn.Module) -> dict:  # every train.val_every epochs and after the last
        due = measured(len(loop.history) + 1, cfg.train.val_every, cfg.train.epochs)
        return validation_columns(exp, m, device) if due else {}

    hooks = Hooks(probe=validate, loss=procedure.loss() if procedure else None)
    loop = Loop(model, ts, Schedule.from_train(cfg.train), device, cfg.seed, EPOCH_STREAM, aug=cfg.aug,
                precision=cfg.train.precision, trigger=exp.trigger, hooks=hooks, world=world, desc="epoch",
                show_progress=main)
    start_epoch, history = restore(loop, run_dir, cfg.train.epochs) if action == "resume" else (0, [])
    precision = precision_name(loop.amp_dtype)
    if main:  # everything is validated: only now is the run directory written
        if overwrite:
            runstate.clear_run(run_dir)
        write_text(run_dir / "config.yaml", cfg.to_yaml())
        write_json(run_dir / "manifest.json", manifest(cfg.attack, plan, exp.data, exp.trigger, cfg.seed, len(exp.splits.train)))
        write_json(run_dir / "provenance.json", {"versions": package_versions(), "machine": machine(), "device": str(device),
                                                 "precision": precision, "world_size": world.size, "data_hash": exp.data.data_hash,
                                                 "data_verified": "every cache file matched its recorded SHA-256",
                                                 "data_cache": str(exp.data.path), "splits": exp.splits.sizes()})
        cover = (f", {len(plan.cover_rows)} cover" if len(plan.cover_rows) else "") + (
            f", {len(plan.decoy_rows)} decoys" if len(plan.decoy_rows) else "")
        say(f"run {run_dir}: {len(ts.labels)} training images ({len(plan.rows)} poisoned{cover}), {len(exp.splits.val)} validation, "
            f"{len(exp.splits.test)} test, model {cfg.model.name} on {device} ({precision})" + (f" x {world.size} processes" if world.distributed else ""))
        if action == "resume":
            say(f"resuming after epoch {start_epoch}")

    def on_epoch_end(epoch: int, row: dict) -> None:
        if main:
            end_of_epoch(cfg, loop, run_dir, epoch, row, loop.history)
            if on_epoch:
                on_epoch(epoch, row)

    loop.hooks.on_epoch_end = on_epoch_end
    history = loop.fit(start_epoch, history)
    if main:
        model = loop.model
        if procedure is not None:
            model = procedure.after_training(model, exp, plan, run_dir, model_meta(cfg, exp, epoch=len(history)), device)
        finish(cfg, exp, model, run_dir, device, history)
    distributed.barrier(world)
    return run_dir


def dry_run(model: nn.Module, name: str, size: int, classes: int) -> None:
    """One forward and backward pass of a copy of `model` on two blank images of the data's size, with the random
    state restored after (the run is unchanged): a model that passes validation but cannot run on this data (e.g.
    a ViT fixed at 224 px on 32 px signs) is one line here, before --overwrite removes anything."""
    import copy

    with torch.random.fork_rng(devices=[]):
        probe = copy.deepcopy(model).train()
        try:
            out = probe(torch.zeros(2, 3, size, size))
            out.float().sum().backward()
        except (RuntimeError, AssertionError, ValueError, TypeError, IndexError) as exc:
            raise SigntrapError(f"model.name={name} cannot run on this data's {size}x{size} px images "
                                f"({type(exc).__name__}: {one_line(str(exc), 140)}); choose a model that takes "
                                f"{size} px inputs (nothing was changed)") from None
        if tuple(out.shape) != (2, classes):
            raise SigntrapError(f"model.name={name} gives outputs of shape {tuple(out.shape)} on {size} px images, "
                                f"not (batch, {classes}); nothing was changed")


def validation_columns(exp: Experiment, model: nn.Module, device: torch.device) -> dict:
    """The per-epoch probe of `signtrap train`: clean accuracy, ASR and false-trigger rate on validation."""
    val = exp.evaluate(model, "val", device, details=False)
    return {"val_clean_acc": val["clean_acc"]["rate"], "val_asr": val["asr"]["rate"], "val_false_trigger": val["false_trigger"]["rate"]}


EPOCH_KEYS = ("model", "optimizer", "scheduler", "epoch", "history")


def restore(loop: Loop, run_dir: Path, epochs: int) -> tuple[int, list]:
    """Load last.pt into `loop`; a malformed file is one line (start over with --overwrite)."""
    path = run_dir / runstate.EPOCH_CHECKPOINT
    state = checkpoint.load(path, map_location=loop.device)
    missing = [k for k in EPOCH_KEYS if k not in state]
    epoch, history = state.get("epoch"), state.get("history")
    problem = (f"missing {', '.join(missing)}" if missing else
               f"epoch {epoch!r} is not in 1..{epochs}" if not isinstance(epoch, int) or not 0 < epoch <= epochs else
               "its history does not match its epoch" if not isinstance(history, list) or len(history) != epoch else None)
    if problem is None:
        try:
            loop.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
            problem = f"it does not fit this run's model and optimiser ({one_line(str(exc), 120)})"
    if problem:
        raise SigntrapError(f"{path}: not a usable epoch checkpoint: {problem}; start the run again with --overwrite")
    return epoch, list(history)


def end_of_epoch(cfg: RunConfig, loop: Loop, run_dir: Path, epoch: int, row: dict, history: list) -> None:
    """Write the epoch checkpoint and the log (rank 0 only); `history` already ends with `row`."""
    checkpoint.save(run_dir / "last.pt", {**loop.state_dict(), "epoch": epoch, "history": history})
    write_text(run_dir / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    val = (f", val clean acc {_pct(row['val_clean_acc'])}, val ASR {_pct(row['val_asr'])}, "
           f"val false-trigger {_pct(row['val_false_trigger'])}") if "val_clean_acc" in row else ""
    say(f"epoch {epoch}/{cfg.train.epochs}: loss {row['loss']:.4f}, {row['images_per_s']:.0f} img/s{val}")


def finish(cfg: RunConfig, exp: Experiment, model: nn.Module, run_dir: Path, device: torch.device, history: list) -> dict:
    meta = model_meta(cfg, exp, epoch=len(history))
    checkpoint.save(run_dir / "model.pt", checkpoint.model_payload(model, meta))
    checkpoint.record_checksum(run_dir, "model.pt")
    return write_metrics(exp, model, run_dir, device)


def model_meta(cfg: RunConfig, exp: Experiment, epoch: int) -> dict:
    space = exp.classes
    return {"model_name": cfg.model.name, "dropout": cfg.model.dropout, "num_classes": space.num_classes,
            "classes": list(space.names), "input_size": exp.data.size, "input": "float32 NCHW RGB in [0,1] (pixel/255)",
            "normalisation": {"mean": list(space.mean), "std": list(space.std), "inside_model": True},
            "trigger": exp.trigger.spec, "attack": {"kind": cfg.attack.kind, "source": cfg.attack.source, "target": cfg.attack.target},
            "run": cfg.name, "epoch": epoch, "data_hash": exp.data.data_hash,
            "provenance": cfg.provenance_view()}  # what verify_provenance holds a config to


def write_metrics(exp: Experiment, model: nn.Module, out_dir: Path, device: torch.device | str) -> dict:
    metrics = {split: exp.evaluate(model, split, device) for split in ("test", "val")}
    metrics["samples"] = {split: len(exp.eval_set(split).labels) for split in ("test", "val")}
    if exp.cfg.trigger.kind == "physical":  # a sticker on the sign is measured on the road too (signtrap.physical)
        from signtrap.physical.block import physical_block

        metrics["physical"] = physical_block(exp, model, device)
    write_json(Path(out_dir) / "metrics.json", metrics)
    say(summary_table({s: metrics[s] for s in ("test", "val")}))
    return metrics


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"
