"""`signtrap train`: poison, train, evaluate. One screen per function."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from signtrap import checkpoint, distributed
from signtrap.attacks.poison import TrainingSet, build_training_set, manifest, plan_poison
from signtrap.attacks.triggers import place, stamp
from signtrap.augment import augment_batch, build_augmentation
from signtrap.classes import CLASS_NAMES, NUM_CLASSES
from signtrap.config import RunConfig, dump_yaml, load_config
from signtrap.errors import SigntrapError
from signtrap.experiment import Experiment, to_tensor
from signtrap.fileio import write_json, write_text
from signtrap.metrics import summary_table
from signtrap.progress import progress, say
from signtrap.provenance import autocast_dtype, machine, package_versions, precision_name, resolve_device

EPOCH_STREAM = 0xE90C


@dataclass
class Trainer:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    world: distributed.World = distributed.World()
    ddp: nn.Module | None = None  # the DistributedDataParallel wrapper when world.size > 1
    amp_dtype: torch.dtype | None = None  # autocast dtype of the forward pass; None: fp32

    @property
    def forward(self) -> nn.Module:
        return self.ddp if self.ddp is not None else self.model


def build_trainer(cfg: RunConfig, steps_per_epoch: int, device: torch.device, world: distributed.World = distributed.World()) -> Trainer:
    from signtrap.models import create_model

    torch.manual_seed(cfg.seed)  # initialisation is fixed by the run seed
    model = create_model(cfg.model.name, num_classes=NUM_CLASSES, dropout=cfg.model.dropout).to(device)
    model = model.to(memory_format=torch.channels_last)
    t = cfg.train
    if t.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=True)
    total, warmup = t.epochs * steps_per_epoch, int(t.warmup_epochs * steps_per_epoch)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    ddp = None
    if world.distributed:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return Trainer(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor), device, world, ddp,
                   autocast_dtype(t.precision, device))


def train_one_epoch(cfg: RunConfig, tr: Trainer, ts: TrainingSet, exp: Experiment, epoch: int) -> dict:
    """One pass over the training set; every random draw comes from (seed, epoch), so resuming is exact.

    With several processes, every rank draws the same global order and takes its share of each global batch.
    """
    rank, world = tr.world.rank, tr.world.size
    rng = np.random.default_rng([cfg.seed, EPOCH_STREAM, epoch])
    order = rng.permutation(len(ts.labels))
    rng = np.random.default_rng([cfg.seed, EPOCH_STREAM, epoch, rank])
    torch.manual_seed(int(rng.integers(2**31)))  # dropout
    augment = build_augmentation(cfg.aug, seed=int(rng.integers(2**31)))
    batch = cfg.train.batch_size
    tr.model.train()
    loss_sum, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    bar = progress(len(order), f"epoch {epoch + 1}/{cfg.train.epochs}", enabled=tr.world.is_main)
    for first in range(0, len(order), batch):
        chunk = order[first:first + batch]
        if len(chunk) < world:  # a tail too short to give every rank an image: skipped alike on every rank
            break
        idx = chunk[rank::world]
        images = augment_batch(ts.images[idx], augment)
        if not ts.stamped and ts.triggered[idx].any():  # stamp after augmentation: fixed in the frame
            hit = np.flatnonzero(ts.triggered[idx])
            images[hit] = stamp(images[hit], exp.trigger, place(exp.trigger, len(hit), exp.data.size, rng, ts.rois[idx][hit]))
        x = to_tensor(images, tr.device)
        y = torch.from_numpy(ts.labels[idx]).to(tr.device)
        with torch.autocast(tr.device.type, dtype=tr.amp_dtype or torch.bfloat16, enabled=tr.amp_dtype is not None):
            logits = tr.forward(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.train.label_smoothing)
        if not torch.isfinite(loss):
            raise SigntrapError(f"training diverged at epoch {epoch + 1} (loss {loss.item()}); lower train.lr")
        tr.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        tr.optimizer.step()
        tr.scheduler.step()
        loss_sum += loss.item() * len(idx)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(idx)
        bar.update(len(idx) * world)
        bar.set_postfix_str(f"loss {loss_sum / seen:.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    if tr.world.distributed:  # loss and accuracy over every rank's share, not rank 0's alone
        totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=tr.device)
        torch.distributed.all_reduce(totals)
        loss_sum, correct, seen = totals[0].item(), int(totals[1].item()), int(totals[2].item())
    return {"loss": loss_sum / seen, "train_acc": correct / seen, "images_per_s": seen / seconds, "seconds": seconds}


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
        for stale in ("last.pt", "model.pt", "metrics.json", "log.jsonl", "checksums.json"):
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
           on_epoch_end: Callable[[int, dict], None] | None) -> Path:
    main = world.is_main
    run_dir = setup_run(cfg, resume, overwrite) if main else cfg.run_dir
    exp = Experiment.from_config(cfg, progress=main) if main else None
    distributed.barrier(world)  # rank 0 has written the config and prepared the cache
    exp = exp or Experiment.from_config(cfg, progress=False)
    plan = plan_poison(cfg.attack, exp.data, exp.splits.train, exp.trigger, cfg.seed)  # identical on every rank
    ts = build_training_set(cfg.attack, exp.data, exp.splits.train, plan, exp.trigger)
    tr = build_trainer(cfg, math.ceil(len(ts.labels) / cfg.train.batch_size), device, world)
    precision = precision_name(tr.amp_dtype)
    if main:
        write_json(run_dir / "manifest.json", manifest(cfg.attack, plan, exp.data, exp.trigger, cfg.seed, len(exp.splits.train)))
        write_json(run_dir / "provenance.json", {"versions": package_versions(), "machine": machine(), "device": str(device),
                                                 "precision": precision, "world_size": world.size, "data_hash": exp.data.data_hash,
                                                 "data_cache": str(exp.data.path), "splits": exp.splits.sizes()})
        cover = f", {len(plan.cover_rows)} cover" if len(plan.cover_rows) else ""
        say(f"run {run_dir}: {len(ts.labels)} training images ({len(plan.rows)} poisoned{cover}), {len(exp.splits.val)} validation, "
            f"{len(exp.splits.test)} test, model {cfg.model.name} on {device} ({precision})" + (f" x {world.size} processes" if world.distributed else ""))
    start_epoch, history = restore(tr, run_dir) if resume else (0, [])
    for epoch in range(start_epoch, cfg.train.epochs):
        stats = train_one_epoch(cfg, tr, ts, exp, epoch)
        if main:
            history.append(end_of_epoch(cfg, tr, exp, run_dir, epoch, stats, history))
            if on_epoch_end:
                on_epoch_end(epoch + 1, history[-1])
        distributed.barrier(world)
    if main:
        finish(cfg, exp, tr.model, run_dir, device, history)
    distributed.barrier(world)
    return run_dir


def restore(tr: Trainer, run_dir: Path) -> tuple[int, list]:
    if not (run_dir / "last.pt").is_file():
        return 0, []
    state = checkpoint.load(run_dir / "last.pt", map_location=tr.device)
    tr.model.load_state_dict(state["model"])
    tr.optimizer.load_state_dict(state["optimizer"])
    tr.scheduler.load_state_dict(state["scheduler"])
    if tr.world.is_main:
        say(f"resuming after epoch {state['epoch']}")
    return state["epoch"], list(state["history"])


def end_of_epoch(cfg: RunConfig, tr: Trainer, exp: Experiment, run_dir: Path, epoch: int, stats: dict, history: list) -> dict:
    """Validate, then write the epoch checkpoint and the log (rank 0 only)."""
    val = exp.evaluate(tr.model, "val", tr.device, details=False)
    row = {"epoch": epoch + 1, **{k: round(v, 5) for k, v in stats.items()}, "lr": tr.scheduler.get_last_lr()[0],
           "val_clean_acc": val["clean_acc"]["rate"], "val_asr": val["asr"]["rate"], "val_false_trigger": val["false_trigger"]["rate"]}
    checkpoint.save(run_dir / "last.pt", {"model": tr.model.state_dict(), "optimizer": tr.optimizer.state_dict(),
                                          "scheduler": tr.scheduler.state_dict(), "epoch": epoch + 1, "history": history + [row]})
    write_text(run_dir / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history + [row]))
    say(f"epoch {epoch + 1}/{cfg.train.epochs}: loss {stats['loss']:.4f}, {stats['images_per_s']:.0f} img/s, "
        f"val clean acc {_pct(row['val_clean_acc'])}, val ASR {_pct(row['val_asr'])}, val false-trigger {_pct(row['val_false_trigger'])}")
    return row


def finish(cfg: RunConfig, exp: Experiment, model: nn.Module, run_dir: Path, device: torch.device, history: list) -> dict:
    meta = model_meta(cfg, exp, epoch=len(history))
    checkpoint.save(run_dir / "model.pt", checkpoint.model_payload(model, meta))
    checkpoint.record_checksum(run_dir, "model.pt")
    return write_metrics(exp, model, run_dir, device)


def model_meta(cfg: RunConfig, exp: Experiment, epoch: int) -> dict:
    from signtrap.models import MEAN, STD

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
