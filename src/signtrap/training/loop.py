"""The one training loop: `signtrap train` and every defence, probe and attack that trains goes through `Loop`.

Read top to bottom, one epoch is: a seeded permutation of the rows; per batch, augmentation (the run's
`aug:` settings), the trigger stamped after augmentation on rows that carry it, the `batch` hook (patches,
unlearning triggers), the loss under autocast (`train.precision`; the `loss` hook replaces plain
cross-entropy: PGD, distillation, dual FP32/INT8 objectives), a non-finite-loss check, the optimiser and
schedule step, then the `after_step` hook (pruning masks, projections). After each epoch the `probe` hook
adds columns to the epoch's row (validation metrics, monitor curves) and `on_epoch_end` sees the finished
row (checkpoints, logs).

The schedule is defined once (`Schedule`): AdamW or SGD, linear warm-up then cosine to zero, over
`epochs * ceil(rows / batch_size)` steps. Every random draw of epoch `e` comes from
`(seed, stream, e)` (and the rank), so resuming after epoch `e` is bit-identical, and two loops with
different `stream`s (a defence and the training it repairs) never share randomness.

With several processes (torchrun), every rank draws the same global order and takes its share of each
global batch; gradients are averaged by DistributedDataParallel.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from signtrap.training import distributed
from signtrap.attacks.poison import TrainingSet
from signtrap.training.augment import augment_batch, build_augmentation
from signtrap.config import AugConfig
from signtrap.errors import ConfigError, SigntrapError
from signtrap.experiment import to_tensor
from signtrap.machine.progress import progress
from signtrap.machine.environment import autocast, autocast_dtype
from signtrap.triggers import Trigger

BatchHook = Callable[[torch.Tensor, torch.Tensor, np.random.Generator], "tuple[torch.Tensor, torch.Tensor]"]
LossHook = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Schedule:
    """Epochs, optimiser and learning-rate schedule of one piece of training."""

    epochs: int
    lr: float
    batch_size: int
    optimizer: str = "adamw"  # adamw | sgd (Nesterov momentum)
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: float = 0.0  # linear warm-up, then cosine to zero
    label_smoothing: float = 0.0
    lr_key: str = "train.lr"  # the setting to name when training diverges

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"config {self.lr_key.rsplit('.', 1)[0]}.optimizer: '{self.optimizer}' is not one of adamw, sgd")
        if self.epochs < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError(f"config {self.lr_key.rsplit('.', 1)[0]}: epochs >= 0, batch_size >= 1 and lr > 0 are required")

    @classmethod
    def from_train(cls, train) -> "Schedule":
        """The schedule of a run's `train:` section."""
        return cls(epochs=train.epochs, lr=train.lr, batch_size=train.batch_size, optimizer=train.optimizer,
                   weight_decay=train.weight_decay, momentum=train.momentum, warmup_epochs=train.warmup_epochs,
                   label_smoothing=train.label_smoothing)

    def steps_per_epoch(self, rows: int) -> int:
        return max(1, math.ceil(rows / self.batch_size))


@dataclass
class Hooks:
    """What a piece of training may change about the loop; every hook is optional."""

    batch: BatchHook | None = None  # (x, y, rng) -> (x, y) after augmentation and stamping, float NCHW in [0, 1]
    loss: LossHook | None = None  # (model, x, y) -> scalar loss, called under autocast; default: cross-entropy
    after_step: Callable[[], None] | None = None  # after every optimiser step (masks, projections)
    probe: Callable[[nn.Module], dict] | None = None  # extra columns of an epoch's row (and of row 0 with measure_start)
    on_epoch_end: Callable[[int, dict], None] | None = None  # (epoch, row) once the row is complete (rows so far: loop.history)


@dataclass
class Loop:
    """Trains `model` in place on `data` (a TrainingSet: uint8 images, labels, rows carrying the trigger)."""

    model: nn.Module
    data: TrainingSet
    schedule: Schedule
    device: torch.device
    seed: int
    stream: int  # separates this loop's randomness from every other use of the seed
    aug: AugConfig = field(default_factory=lambda: AugConfig(enabled=False))
    precision: str = "fp32"  # the run's train.precision: auto | fp32 | bf16
    trigger: Trigger | None = None  # applied after augmentation to data.triggered rows (when not data.stamped)
    hooks: Hooks = field(default_factory=Hooks)
    params: list[nn.Parameter] | None = None  # what the optimiser updates; default: every parameter requiring grad
    frozen_bn: bool = False  # keep BatchNorm statistics fixed (eval-mode BN) while training
    # the model's and the batches' memory layout: channels-last (the fastest first-order training on CPU and GPU), or
    # torch.contiguous_format for a loss that differentiates twice (I-BAU: 1.6x faster on 2 CPU cores, where
    # oneDNN's channels-last double backward converts layouts at every layer)
    memory_format: torch.memory_format = torch.channels_last
    world: distributed.World = field(default_factory=distributed.World)
    desc: str = "epoch"
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.history: list[dict] = []
        if len(self.data.labels) == 0:
            raise SigntrapError(f"{self.desc}: nothing to train on (no images)")
        marked = self.data.triggered.any() or (self.data.decoy is not None and self.data.decoy.any())
        if marked and not self.data.stamped and self.trigger is None:
            raise SigntrapError(f"{self.desc}: rows carry the trigger but no trigger was given to stamp them")
        self.model = self.model.to(self.device, memory_format=self.memory_format)
        s = self.schedule
        params = self.params if self.params is not None else [p for p in self.model.parameters() if p.requires_grad]
        if s.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, nesterov=True)
        per_epoch = s.steps_per_epoch(len(self.data.labels))
        total, warmup = max(1, s.epochs * per_epoch), int(s.warmup_epochs * per_epoch)

        def lr_factor(step: int) -> float:  # linear warm-up, then cosine to zero
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / max(1, total - warmup)))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
        self.amp_dtype = autocast_dtype(self.precision, self.device)
        self.ddp = None
        if self.world.distributed:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    @property
    def forward(self) -> nn.Module:
        return self.ddp if self.ddp is not None else self.model

    # ------------------------------------------------------------ state (exact resume)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    # ------------------------------------------------------------ training

    def fit(self, start_epoch: int = 0, history: list[dict] | None = None, measure_start: bool = False) -> list[dict]:
        """Epochs `start_epoch + 1 .. epochs`; returns the rows (row 0 measures the model before training when asked)."""
        self.history = history = list(history or [])
        if measure_start and start_epoch == 0 and not history:
            history.append({"epoch": 0, "loss": None, "seconds": 0.0, **self._probe()})
        for epoch in range(start_epoch, self.schedule.epochs):
            stats = self.epoch(epoch)
            row = {"epoch": epoch + 1, **stats, "lr": self.scheduler.get_last_lr()[0], **self._probe()}
            history.append(row)
            if self.hooks.on_epoch_end is not None:
                self.hooks.on_epoch_end(epoch + 1, row)
            distributed.barrier(self.world)
        self.model.eval()
        return history

    def _probe(self) -> dict:
        if self.hooks.probe is None or not self.world.is_main:
            return {}
        return self.hooks.probe(self.model)

    def _train_mode(self) -> None:
        self.model.train()
        if self.frozen_bn:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def epoch(self, epoch: int) -> dict:
        """One pass over the data; every random draw comes from (seed, stream, epoch[, rank])."""
        rank, world = self.world.rank, self.world.size
        data, s, hooks = self.data, self.schedule, self.hooks
        rng = np.random.default_rng([self.seed, self.stream, epoch])
        order = rng.permutation(len(data.labels))
        rng = np.random.default_rng([self.seed, self.stream, epoch, rank])
        torch.manual_seed(int(rng.integers(2**31)))  # dropout
        augment = build_augmentation(self.aug, seed=int(rng.integers(2**31)))
        self._train_mode()
        loss_sum, correct, scored, seen, start = 0.0, 0, 0, 0, time.perf_counter()
        bar = progress(len(order), f"{self.desc} {epoch + 1}/{s.epochs}", enabled=self.world.is_main and self.show_progress)
        for first in range(0, len(order), s.batch_size):
            chunk = order[first:first + s.batch_size]
            if len(chunk) < world:  # a tail too short to give every rank an image: skipped alike on every rank
                break
            idx = chunk[rank::world]
            images = data.render(augment_batch(data.images[idx], augment), idx, self.trigger, rng)  # after augmentation: fixed in the frame
            x = to_tensor(images, self.device)  # a channels-last view
            if self.memory_format != torch.channels_last:
                x = x.contiguous(memory_format=self.memory_format)
            y = torch.from_numpy(data.labels[idx]).to(self.device)
            if hooks.batch is not None:
                x, y = hooks.batch(x, y, rng)
            logits = None
            with autocast(self.device.type, self.amp_dtype):
                if hooks.loss is not None:
                    loss = hooks.loss(self.forward, x, y)
                else:
                    logits = self.forward(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=s.label_smoothing)
            if not torch.isfinite(loss):
                raise SigntrapError(f"{self.desc}: training diverged at epoch {epoch + 1} (loss {loss.item()}); lower {s.lr_key}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            if hooks.after_step is not None:
                hooks.after_step()
            loss_sum += loss.item() * len(idx)
            if logits is not None:
                correct += int((logits.argmax(1) == y).sum())
                scored += len(idx)
            seen += len(idx)
            bar.update(len(idx) * world)
            bar.set_postfix_str(f"loss {loss_sum / seen:.3f}")
        bar.close()
        seconds = time.perf_counter() - start
        if self.world.distributed:  # loss and accuracy over every rank's share, not rank 0's alone
            totals = torch.tensor([loss_sum, correct, scored, seen], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(totals)
            loss_sum, correct, scored, seen = totals[0].item(), int(totals[1].item()), int(totals[2].item()), int(totals[3].item())
        return {"loss": round(loss_sum / max(seen, 1), 5), "train_acc": round(correct / scored, 5) if scored else None,
                "images_per_s": round(seen / seconds, 1) if seconds > 0 else None, "seconds": round(seconds, 2)}


def measured(epoch: int, every: int, epochs: int) -> bool:
    """Whether the row after epoch `epoch` (0: before training) of `epochs` carries the monitor columns: every
    `every`-th epoch and the last (`train.val_every` for training; the defences' and the probe's curves)."""
    return epoch % every == 0 or epoch == epochs


def clean_training_set(images: np.ndarray, labels: np.ndarray) -> TrainingSet:
    """A TrainingSet of clean images (the defender's budget): no row carries the trigger."""
    images = np.asarray(images)
    return TrainingSet(images, np.asarray(labels, np.int64), np.zeros(len(images), bool), True,
                       np.zeros((len(images), 4), np.int64))


# ---------------------------------------------------------------- loss hooks shared by defences and attacks


@contextlib.contextmanager
def running_stats_frozen(model: nn.Module) -> Iterator[None]:
    """BatchNorm normalises with the batch but leaves its running statistics alone (SAM's second pass)."""
    saved = [(m, m.momentum) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        for m, _ in saved:
            m.momentum = 0.0
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum


def sam_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rho: float, adaptive: bool, label_smoothing: float) -> torch.Tensor:
    """The loss at the worst weights of the neighbourhood, differentiable in the weights themselves:
    backward gives the gradient at w + e, the optimiser then steps from w."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    loss = F.cross_entropy(model(x).float(), y, label_smoothing=label_smoothing)
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    with torch.no_grad():
        scaled = [(p.abs() if adaptive else 1.0) * g for (_, p), g in zip(named, grads) if g is not None]
        scale = rho / (torch.norm(torch.stack([s.norm() for s in scaled])) + 1e-12)
        step = {n: (p.pow(2) if adaptive else 1.0) * g * scale for (n, p), g in zip(named, grads) if g is not None}
    with running_stats_frozen(model):  # step carries no gradient: backward gives the gradient at w + step, for w
        worst = functional_call(model, {n: p + step[n] for n, p in named if n in step}, (x,))
    return F.cross_entropy(worst.float(), y, label_smoothing=label_smoothing)
