"""FT-SAM: fine-tuning with sharpness-aware minimisation (Zhu et al., ICCV 2023, "Enhancing Fine-Tuning Based
Backdoor Defense with Sharpness-Aware Minimization").

Each step takes the gradient at the worst weights within a neighbourhood of radius rho, in the adaptive
(ASAM) metric that scales the neighbourhood by |w|: e = rho * w^2 * g / ||w * g||. The paper's large
radius (rho = 2) pushes the weights out of the backdoor's sharp basin while the clean loss stays low.
"""
from __future__ import annotations

from dataclasses import dataclass
from torch import nn

from signtrap.config import require
from signtrap.defences import register_defence
from signtrap.defences.common import CleanData, DefenceContext, DefenceResult, LrTunedSettings, fit, select
from signtrap.training.loop import Hooks, sam_loss


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
