"""FT-SAM: fine-tuning with sharpness-aware minimisation (Zhu et al., ICCV 2023, "Enhancing Fine-Tuning Based
Backdoor Defense with Sharpness-Aware Minimization").

Each step takes the gradient at the worst weights within a neighbourhood of radius rho, in the adaptive
(ASAM) metric that scales the neighbourhood by |w|: e = rho * w^2 * g / ||w * g||. The paper's large
radius (rho = 2) pushes the weights out of the backdoor's sharp basin while the clean loss stays low.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from signtrap.config import require
from signtrap.defences import register_defence
from signtrap.defences.common import CleanData, DefenceContext, DefenceResult, LrTunedSettings, fit, select
from signtrap.loop import Hooks


@dataclass
class FTSAMSettings(LrTunedSettings):
    """Fine-tuning with (adaptive) SAM, the paper's rho 2 and label smoothing 0.1; the learning rate is
    chosen by the held-out rule unless `lr` is set."""

    rho: float = 2.0
    adaptive: bool = True  # ASAM's |w|-scaled neighbourhood (the paper's code default)
    label_smoothing: float = 0.1

    def check(self, key: str) -> None:
        super().check(key)
        require(0.0 < self.rho <= 100.0, f"{key}.rho", f"{self.rho} is outside (0, 100]")
        require(0.0 <= self.label_smoothing < 1.0, f"{key}.label_smoothing", f"{self.label_smoothing} is outside [0, 1)")


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


@register_defence("ft-sam", settings=FTSAMSettings)
def ftsam(model: nn.Module, clean: CleanData, s: FTSAMSettings, ctx: DefenceContext) -> DefenceResult:
    """Fine-tune on the clean budget with adaptive SAM (two passes per step: the gradient, then the loss at
    the perturbed weights).

    Selection rule (main knob: the learning rate, `grid` 3e-5..1e-3; rho stays at the paper's 2): the budget
    is split by whole tracks, drawn at random, into a fit part and a held-out third; the model is fine-tuned
    on the fit part at each learning rate, largest first, and the largest one whose held-out clean accuracy
    is at most `tolerance` (1 point) below the backdoored model's is kept.
    """
    def prepare(data: CleanData):
        def repair(m: nn.Module, lr: float) -> DefenceResult:
            curve = fit(m, data, ctx, method="ft-sam", schedule=s.schedule("defend.ft-sam", lr=lr), augment=s.augment,
                        hooks=Hooks(loss=lambda net, x, y: sam_loss(net, x, y, s.rho, s.adaptive, s.label_smoothing)))
            return DefenceResult(m, {"clean_images": len(data), "lr": lr, "rho": s.rho, "adaptive": s.adaptive},
                                 {"persistence": curve})
        return repair

    return select(model, clean, ctx, s, method="ft-sam", prepare=prepare)
