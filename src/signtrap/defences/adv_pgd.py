"""Adversarial fine-tuning with L-inf PGD (Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks")."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from signtrap.config import require
from signtrap.defences import register_defence
from signtrap.defences.common import CleanData, DefenceContext, DefenceResult, LrTunedSettings, fit, select
from signtrap.experiment import to_tensor
from signtrap.training.loop import Hooks


@dataclass
class AdvPGDSettings(LrTunedSettings):
    """Adversarial fine-tuning against an L-inf PGD adversary; pixel budgets in 0..255 units; the learning
    rate is chosen by the held-out rule unless `lr` is set."""

    epochs: int = 5
    eps_px: float = 4.0  # L-inf budget in pixel units (4/255)
    step_px: float = 1.0
    steps: int = 5
    clean_weight: float = 0.5  # loss = w * clean + (1 - w) * adversarial; 0 is Madry's pure adversarial training

    def check(self, key: str) -> None:
        super().check(key)
        require(0.0 < self.eps_px <= 255.0, f"{key}.eps_px", f"{self.eps_px} is outside (0, 255]")
        require(0.0 < self.step_px <= 255.0, f"{key}.step_px", f"{self.step_px} is outside (0, 255]")
        require(1 <= self.steps <= 1000, f"{key}.steps", f"{self.steps} is outside 1..1000")
        require(0.0 <= self.clean_weight < 1.0, f"{key}.clean_weight", f"{self.clean_weight} is outside [0, 1)")


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float, steps: int,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Untargeted L-inf PGD from a random start, in [0, 1] pixel space; BN statistics are left alone."""
    was = model.training
    model.eval()
    delta = (torch.rand(x.shape, generator=generator, device="cpu").to(x.device) * 2 - 1) * eps
    delta = ((x + delta).clamp(0, 1) - x).detach()
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta).float(), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta + step * grad.sign()).clamp(-eps, eps)
        delta = ((x + delta).clamp(0, 1) - x).detach()
    model.train(was)
    return (x + delta).detach()


@register_defence("adv-pgd", settings=AdvPGDSettings)
def adv_pgd(model: nn.Module, clean: CleanData, cfg: AdvPGDSettings, ctx: DefenceContext) -> DefenceResult:
    """Fine-tune on a mix of clean and PGD-perturbed budget images (eps 4/255, 5 steps, weight 0.5 each).

    Selection rule (main knob: the learning rate, `grid` 3e-5..1e-3; the adversary stays at its defaults):
    the budget is split by whole tracks, drawn at random, into a fit part and a held-out third; the model is
    trained on the fit part at each learning rate, largest first, and the largest one whose held-out clean
    accuracy is at most `tolerance` (1 point) below the backdoored model's is kept.
    """
    eps, step = cfg.eps_px / 255.0, cfg.step_px / 255.0
    gen = torch.Generator().manual_seed(ctx.seed)

    def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = pgd(m, x, y, eps, step, cfg.steps, gen)  # in the run's training precision, as the loss
        adv = F.cross_entropy(m(x_adv).float(), y)
        if cfg.clean_weight == 0:
            return adv
        return cfg.clean_weight * F.cross_entropy(m(x).float(), y) + (1 - cfg.clean_weight) * adv

    def prepare(data: CleanData):
        def robust_probe(m: nn.Module) -> dict:
            """Robust accuracy under the training adversary on the first 256 images the defence trains on."""
            x = to_tensor(data.images[:256], ctx.device)
            y = torch.from_numpy(data.labels[:256]).to(ctx.device)
            x_adv = pgd(m, x, y, eps, step, cfg.steps, torch.Generator().manual_seed(ctx.seed + 1))
            with torch.no_grad():
                m.eval()
                return {"budget_robust_acc": round(float((m(x_adv).argmax(1) == y).float().mean()), 4)}

        def repair(m: nn.Module, lr: float) -> DefenceResult:
            gen.manual_seed(ctx.seed)  # every candidate sees the same PGD starts
            curve = fit(m, data, ctx, method="adv-pgd", schedule=cfg.schedule("defend.adv-pgd", lr=lr), augment=cfg.augment,
                        hooks=Hooks(loss=loss_fn), probe=robust_probe)
            report = {"clean_images": len(data), "lr": lr, "eps": f"{cfg.eps_px:g}/255", "step": f"{cfg.step_px:g}/255",
                      "budget_robust_acc_before": curve[0]["budget_robust_acc"], "budget_robust_acc_after": curve[-1]["budget_robust_acc"]}
            return DefenceResult(m, report, {"persistence": curve})
        return repair

    return select(model, clean, ctx, cfg, method="adv-pgd", prepare=prepare)


@adv_pgd.summary
def _summary(report: dict) -> list[str]:
    d = report.get("details", {})
    return [f"adv-pgd: robust accuracy on the budget under eps {d.get('eps')}: "
            f"{d.get('budget_robust_acc_before')} -> {d.get('budget_robust_acc_after')}"]
