"""FST: feature shift tuning (Min et al., NeurIPS 2023, "Towards Stable Backdoor Purification through
Feature Shift Tuning").

The classifier head is re-initialised (at the old weights' norm), then the whole model is fine-tuned with
cross-entropy plus alpha times the inner product of the new head with the old one, the head's norm held
at the old norm after every step: the features must move away from the ones the old head (and the
backdoor) relied on, instead of the head re-learning them.

The optimiser is the authors' (SGD, momentum 0.9 — Nesterov in the loop —, no weight decay, cosine decay), not the AdamW of the
other defences: Adam normalises each weight's step, so the penalty's constant gradient turns the head into
the old head's opposite within a few dozen steps whatever its size, faster than cross-entropy can re-learn
it (on real GTSRB every AdamW learning rate from 3e-5 to 1e-3 left 3-49% held-out accuracy).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from signtrap.config import require
from signtrap.defences import register_defence
from signtrap.defences.common import CleanData, DefenceContext, DefenceResult, LrTunedSettings, fit, select
from signtrap.errors import SigntrapError
from signtrap.loop import Hooks


@dataclass
class FSTSettings(LrTunedSettings):
    """Feature shift tuning with the paper's alpha 0.2 and optimiser (SGD, momentum 0.9); the learning rate
    is chosen by the held-out rule unless `lr` is set."""

    alpha: float = 0.2
    grid: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2, 3e-2])  # SGD's scale (the authors use 0.01)
    weight_decay: float = 0.0  # the authors' SGD has none
    momentum: float = 0.9

    def check(self, key: str) -> None:
        super().check(key)
        require(0.0 <= self.alpha <= 100.0, f"{key}.alpha", f"{self.alpha} is outside [0, 100]")
        require(0.0 <= self.momentum < 1.0, f"{key}.momentum", f"{self.momentum} is outside [0, 1)")

    def schedule(self, key: str, epochs: int | None = None, lr: float | None = None):
        return dataclasses.replace(super().schedule(key, epochs, lr), optimizer="sgd", momentum=self.momentum)


def classifier_head(model: nn.Module) -> tuple[str, nn.Linear]:
    heads = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise SigntrapError("fst needs a model whose classifier is a Linear layer")
    return heads[-1]


@register_defence("fst", settings=FSTSettings)
def fst(model: nn.Module, clean: CleanData, s: FSTSettings, ctx: DefenceContext) -> DefenceResult:
    """Re-initialise the last Linear layer at the old weights' norm, then fine-tune everything on the clean
    budget with cross-entropy + alpha * <new head, old head>, projecting the head back to the old norm
    after every step.

    Selection rule (main knob: SGD's learning rate, `grid` 1e-3..3e-2): the budget is split by whole tracks,
    drawn at random, into a fit part and a held-out third; FST runs on the fit part at each learning rate,
    largest first, and the largest one whose held-out clean accuracy is at most `tolerance` (1 point) below
    the backdoored model's is kept. (A small learning rate may not re-learn the new head: the rule then
    moves on to the next.)
    """
    name, _ = classifier_head(model)

    def prepare(data: CleanData):
        def repair(m: nn.Module, lr: float) -> DefenceResult:
            head = dict(m.named_modules())[name]
            old = head.weight.detach().clone()
            norm = old.norm()
            gen = torch.Generator().manual_seed(ctx.seed)
            with torch.no_grad():
                bound = 1.0 / head.in_features ** 0.5
                fresh = (torch.rand(old.shape, generator=gen) * 2 - 1) * bound
                head.weight.copy_(fresh.to(old.device) * norm / fresh.norm())

            def loss_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return F.cross_entropy(net(x).float(), y) + s.alpha * (head.weight * old).sum()

            def project() -> None:
                with torch.no_grad():
                    head.weight.mul_(norm / head.weight.norm())

            curve = fit(m, data, ctx, method="fst", schedule=s.schedule("defend.fst", lr=lr), augment=s.augment,
                        hooks=Hooks(loss=loss_fn, after_step=project))
            cosine = float(F.cosine_similarity(head.weight.detach().flatten(), old.flatten(), dim=0))
            return DefenceResult(m, {"clean_images": len(data), "lr": lr, "alpha": s.alpha, "head": name,
                                     "head_cosine_to_old": round(cosine, 4)}, {"persistence": curve})
        return repair

    return select(model, clean, ctx, s, method="fst", prepare=prepare)


@fst.summary
def _summary(report: dict) -> list[str]:
    d = report.get("details", {})
    return [f"fst: head {d.get('head')} re-initialised; cosine of the tuned head to the old one {d.get('head_cosine_to_old')}"]
