"""PAM: path-aware minimisation (Min et al., NeurIPS 2024, "Uncovering, Explaining, and Mitigating the Superficial
Safety of Backdoor Defense"; code: AISafety-HKUST/stable_backdoor_purification, `fine_tune/BTIDBF/sam.py` and
`btidbfu.py --use_pam`).

Built on BTI-DBF(U), as the authors run it: the trigger generator of BTI-DBF (bti_dbf.py) is trained, then the
model unlearns with 20% (+1) of each batch replaced by generated images, true labels kept, but every step
takes the gradient at weights moved a distance rho along the path towards the backdoored model,
w + rho (w_bd - w) / ||w_bd - w|| (sam.py's PAM.first_step), and applies it at w. A purified model that is
still low-loss where the path leads back to the backdoor is far from it, so a few re-tuning steps (signtrap's
re-activation probe) should not bring the backdoor back: the superficial safety PAM was designed against.

Deviations from the authors' code, with reasons (the inversion's own are in bti_dbf.py):
- The base optimiser is AdamW with a cosine schedule at a learning rate chosen by the held-out rule from
  3e-5..1e-3 (theirs: SGD lr 0.01, momentum 0.1, fixed), through signtrap's one loop with the run's
  augmentation: one optimiser and learning-rate grid for every fine-tuning defence, and the probe re-tunes at the
  chosen rate. rho stays at the authors' 0.5 (their defense.sh), in the same units (the L2 norm over all weights).
- One round and 10 unlearning epochs (their script: 3 rounds of 30 epochs): the 5-minute budget on 2 CPU cores.
- The loss is cross-entropy on the batch with generated rows only, as the authors' `unlearn_pam` (no feature term).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from signtrap.config import require
from signtrap.defences import register_defence
from signtrap.defences.bti_dbf import inversion_blocks, inversion_line
from signtrap.defences.bti_dbf_u import UnlearnSettings, purify
from signtrap.defences.common import CleanData, DefenceContext, DefenceResult


@dataclass
class PAMSettings(UnlearnSettings):
    """BTI-DBF(U) with path-aware minimisation (rho 0.5, the authors' script); the learning rate is chosen by the
    held-out rule unless `lr` is set."""

    rho: float = 0.5  # distance along the path towards the backdoored weights at which the gradient is taken

    def check(self, key: str) -> None:
        super().check(key)
        require(0.0 <= self.rho <= 100.0, f"{key}.rho", f"{self.rho} is outside [0, 100]")


def path_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, anchor: dict[str, torch.Tensor], rho: float) -> torch.Tensor:
    """Cross-entropy at w + rho (w_anchor - w) / ||w_anchor - w||, differentiable in w (the step carries no
    gradient): backward gives the gradient there, the optimiser then steps from w. At w = w_anchor the step is 0."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        diff = {n: anchor[n] - p for n, p in named}
        scale = rho / (torch.sqrt(sum(d.float().pow(2).sum() for d in diff.values())) + 1e-12)
    out = functional_call(model, {n: p + diff[n] * scale for n, p in named}, (x,))
    return F.cross_entropy(out.float(), y)


@register_defence("pam", settings=PAMSettings)
def pam(model: nn.Module, clean: CleanData, s: PAMSettings, ctx: DefenceContext) -> DefenceResult:
    """BTI-DBF(U) whose unlearning steps take the gradient along the path to the backdoored model (PAM).

    Selection rule (main knob: the learning rate, `grid` 3e-5..1e-3): the budget is split by whole tracks, drawn
    at random, into a fit part and a held-out third; the generator is trained once on the fit part, the model is
    unlearned with PAM on the fit part at each learning rate, largest first, and the largest one whose held-out
    clean accuracy is at most `tolerance` (1 point) below the backdoored model's is kept.
    """
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss_for(m: nn.Module, state: dict):
        return lambda net, x, y: path_loss(net, x, y, anchor, s.rho)

    return purify(model, clean, s, ctx, method="pam", loss_for=loss_for, extra={"rho": s.rho})


@pam.summary
def _summary(report: dict) -> list[str]:
    d = report.get("details", {})
    return [inversion_line("pam", d) + f" (unlearned with rho {d.get('rho')})"]


@pam.report_block
def _report(report: dict, folder: Path) -> list:
    return inversion_blocks("PAM: the inverted trigger it unlearned along the path", "pam", report, folder)
