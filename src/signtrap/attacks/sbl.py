"""SBL: Sequential Backdoor Learning (Pham et al., ECCV 2024, "Flatness-Aware Sequential Learning Generates Resilient
Backdoors"; code: mail-research/SBL-resilient-backdoors).

Fine-tuning defences remove a backdoor by catastrophic forgetting: a few clean epochs push the model out of the
backdoor's region of the loss. SBL trains the backdoor as the first of two continual-learning tasks:

1. task 1, the poisoned training set, with sharpness-aware minimisation (SAM, radius `rho`): the backdoored
   model lands in a flat region (signtrap's own training, with SAM as its loss hook);
2. task 2, a clean share of the training set (`clean_fraction`), at a tenth of the training learning rate
   (`lr_factor`), with an EWC penalty (`lambd` x sum F (w - w1)^2, F the diagonal Fisher of task 1, each
   example's squared gradient weighted by its predicted probability, as the authors' `models/ewc.py`): the model
   moves to clean-loss minima *inside* the backdoor region, where the defender's clean fine-tuning starts from
   and stays.

Settings follow the authors' GTSRB script (`run_gtsrb.sh`: task portions 0.85 poisoned / 0.1 clean, SGD lr 0.01
then sec_lr 0.001, lambd 1, SAM in task 1, `cl_method` naive or ewc). Deviations: signtrap's optimiser and
schedule (AdamW, cosine) for both tasks, so task 2 runs at `lr_factor` x train.lr; `epochs` 5 for task 2 (the
authors: 100 on ResNet-18 over 150 task-1 epochs; 5 keeps the 2-core budget) and the Fisher from `fisher_images`
(512) task-1 images rather than the whole task-1 set; the clean share is drawn from the training split minus the
poisoned and cover rows (the authors hold it out of task 1; here task 1 sees every training image, so the
attacker needs no extra data); SAM is the plain (non-adaptive) one of the authors' `sam.py` with its rho 0.05.
SAM doubles the cost of task 1.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from signtrap.attacks import AttackProcedure, register_attack
from signtrap.attacks.poison import PoisonPlan, build_training_set
from signtrap.config import one_of, require
from signtrap.experiment import to_tensor
from signtrap.fileio import write_json
from signtrap.training.loop import Hooks, Loop, Schedule, clean_training_set, sam_loss
from signtrap.machine.progress import say
from signtrap.runs.state import ATTACK_REPORT

SBL_STREAM = 0x5B1
REPORT_KEYS = ("clean_acc", "asr", "stop_recall", "false_trigger")


@dataclass
class SBLSettings:
    rho: float = 0.05  # SAM radius of task 1 (the authors' sam.py default); 0: plain training
    clean_fraction: float = 0.1  # task 2's clean share of the training split (the authors' task portion 0.1)
    epochs: int = 5  # task 2's epochs
    lr_factor: float = 0.1  # task 2's learning rate as a share of train.lr (the authors: 0.001 after 0.01)
    method: str = "ewc"  # ewc | naive (plain clean fine-tuning as task 2)
    lambd: float = 1.0  # weight of the EWC penalty
    fisher_images: int = 512  # task-1 images the Fisher information is estimated on

    def check(self, key: str = "attack.sbl") -> None:
        require(0.0 <= self.rho <= 10.0, f"{key}.rho", f"{self.rho} is outside [0, 10]")
        require(0.0 < self.clean_fraction <= 1.0, f"{key}.clean_fraction", f"{self.clean_fraction} is outside (0, 1]")
        require(1 <= self.epochs <= 1000, f"{key}.epochs", f"{self.epochs} is outside 1..1000")
        require(0.0 < self.lr_factor <= 1.0, f"{key}.lr_factor", f"{self.lr_factor} is outside (0, 1]")
        one_of(self.method, f"{key}.method", ("ewc", "naive"))
        require(self.lambd >= 0, f"{key}.lambd", "must be >= 0")
        require(1 <= self.fisher_images <= 1_000_000, f"{key}.fisher_images", f"{self.fisher_images} is outside 1..1000000")


@register_attack("sbl", settings=SBLSettings)
class SBL(AttackProcedure):
    """Task 1 with SAM (the loss hook of signtrap's training), task 2 with EWC after it."""

    def loss(self):
        s, smoothing = self.settings, self.cfg.train.label_smoothing
        if s.rho <= 0:
            return None
        return lambda net, x, y: sam_loss(net, x, y, s.rho, False, smoothing)

    def after_training(self, model: nn.Module, exp, plan: PoisonPlan, run_dir, meta: dict, device) -> nn.Module:
        cfg, s = self.cfg, self.settings
        started = time.perf_counter()
        before = {split: _headline(exp.evaluate(model, split, device, details=False)) for split in ("val", "test")}
        anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        fisher = task1_fisher(model, exp, plan, s.fisher_images, cfg.seed, device) if s.method == "ewc" else None
        rows = clean_share(exp, plan, s.clean_fraction, cfg.seed)
        data = clean_training_set(np.asarray(exp.data.images[rows]), exp.data.labels[rows])
        t = cfg.train
        schedule = Schedule(epochs=s.epochs, lr=t.lr * s.lr_factor, batch_size=t.batch_size, optimizer=t.optimizer,
                            weight_decay=t.weight_decay, momentum=t.momentum, label_smoothing=t.label_smoothing,
                            lr_key="attack.sbl.lr_factor")

        def ewc_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            loss = F.cross_entropy(net(x).float(), y, label_smoothing=t.label_smoothing)
            if fisher is None or s.lambd == 0:
                return loss
            named = dict(model.named_parameters())
            penalty = sum((fisher[n] * (named[n] - anchor[n]) ** 2).sum() for n in fisher)
            return loss + s.lambd * penalty

        say(f"sbl: task 2 on {len(rows)} clean training images, {s.epochs} epochs at lr {schedule.lr:g} ({s.method})")
        Loop(model, data, schedule, device, cfg.seed, SBL_STREAM, aug=cfg.aug, precision=t.precision,
             hooks=Hooks(loss=ewc_loss), desc="sbl task 2").fit()
        after = {split: _headline(exp.evaluate(model, split, device, details=False)) for split in ("val", "test")}
        write_json(run_dir / ATTACK_REPORT, {
            "procedure": "sbl", "method": "Sequential Backdoor Learning (Pham et al. 2024): task 1 with SAM, task 2 clean with "
                                          f"{s.method}", "settings": vars(s), "task2_images": int(len(rows)),
            "task2_lr": schedule.lr, "fisher_mean": float(np.mean([f.mean().item() for f in fisher.values()])) if fisher else None,
            "after_task1": before, "after_task2": after, "seconds": round(time.perf_counter() - started, 2)})
        say(f"sbl: val clean accuracy {before['val']['clean_acc']} -> {after['val']['clean_acc']}, "
            f"ASR {before['val']['asr']} -> {after['val']['asr']}")
        return model


def _headline(metrics: dict) -> dict:
    return {k: metrics[k]["rate"] for k in REPORT_KEYS}


def clean_share(exp, plan: PoisonPlan, fraction: float, seed: int) -> np.ndarray:
    """Task 2's rows: a seeded share of the training split, never a poisoned or cover row."""
    pool = np.setdiff1d(exp.splits.train, np.concatenate([plan.rows, plan.cover_rows]))
    n = max(1, int(round(fraction * len(exp.splits.train))))
    rng = np.random.default_rng([seed, SBL_STREAM, 1])
    return np.sort(rng.choice(pool, size=min(n, len(pool)), replace=False))


def task1_fisher(model: nn.Module, exp, plan: PoisonPlan, n: int, seed: int, device) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of task 1 on `n` of its images (every poisoned one first, with the trigger and the target
    label, then a seeded sample of the rest): each example's squared gradient of its log-likelihood, weighted by
    the probability the model gives its label (the authors' EWC)."""
    cfg = exp.cfg
    ts = build_training_set(cfg.attack, exp.data, exp.splits.train, plan, exp.trigger)
    rng = np.random.default_rng([seed, SBL_STREAM, 2])
    hit = np.flatnonzero(ts.triggered)
    rest = np.flatnonzero(~ts.triggered)
    pick = np.concatenate([hit[:n], rng.permutation(rest)[:max(0, n - len(hit))]])
    images = np.array(ts.images[pick])
    if not ts.stamped:
        carries = np.flatnonzero(ts.triggered[pick])
        images[carries] = exp.trigger.apply(images[carries], rng, ts.rois[pick][carries])
    labels = torch.from_numpy(ts.labels[pick]).to(device)
    params = {n_: p for n_, p in model.named_parameters() if p.requires_grad}
    fisher = {n_: torch.zeros_like(p) for n_, p in params.items()}
    was_training = model.training
    model.eval()
    for i in range(len(pick)):
        model.zero_grad(set_to_none=True)
        log_p = F.log_softmax(model(to_tensor(images[i:i + 1], device)).float(), dim=1)[0, labels[i]]
        log_p.backward()
        weight = log_p.detach().exp()
        for n_, p in params.items():
            if p.grad is not None:
                fisher[n_] += weight * p.grad.detach() ** 2
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {n_: f / max(1, len(pick)) for n_, f in fisher.items()}
