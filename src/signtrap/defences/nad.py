"""Neural Attention Distillation (Li et al., ICLR 2021, "Neural Attention Distillation: Erasing Backdoor
Triggers from Deep Neural Networks").

A teacher is the backdoored model fine-tuned on the clean budget; the student (the backdoored model again)
is then trained on the same data with cross-entropy plus the distance between its attention maps and the
teacher's at the last feature stages: A(F) = sum_c |F_c|^p, L2-normalised over space, compared by MSE and
weighted by beta per stage (the paper's p = 2 and betas 500, 1000, 1000, shallow to deep).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from signtrap.config import require
from signtrap.defences import register_defence
from signtrap.defences.common import CleanData, DefenceContext, DefenceResult, LrTunedSettings, fit, select, stream_of
from signtrap.errors import SigntrapError
from signtrap.training.loop import Hooks


@dataclass
class NADSettings(LrTunedSettings):
    """Teacher fine-tuning then attention distillation into the student; one learning rate for both, chosen
    by the held-out rule unless `lr` is set."""

    teacher_epochs: int = 10
    epochs: int = 10  # student epochs
    betas: list[float] = field(default_factory=lambda: [500.0, 1000.0, 1000.0])  # the last len(betas) stages, shallow first
    p: float = 2.0

    def check(self, key: str) -> None:
        super().check(key)
        require(1 <= self.teacher_epochs <= 1000, f"{key}.teacher_epochs", f"{self.teacher_epochs} is outside 1..1000")
        require(1 <= len(self.betas) <= 8, f"{key}.betas", "needs 1..8 weights (one per feature stage)")
        require(all(b >= 0 for b in self.betas), f"{key}.betas", "weights must be >= 0")
        require(0.5 <= self.p <= 8, f"{key}.p", f"{self.p} is outside [0.5, 8]")


def feature_stages(model: nn.Module, size: int, device, count: int) -> list[str]:
    """Names of the modules ending the last `count` resolution stages: for every spatial size a forward pass
    visits (1x1 excluded), the last leaf module that outputs a feature map of that size."""
    seen: list[tuple[str, tuple[int, int]]] = []
    handles = []
    for name, module in model.named_modules():
        if name and not list(module.children()):
            handles.append(module.register_forward_hook(
                lambda m, i, o, name=name: seen.append((name, tuple(o.shape[-2:]))) if isinstance(o, torch.Tensor) and o.dim() == 4 else None))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    last: dict[tuple[int, int], str] = {}
    for name, hw in seen:
        if hw[0] * hw[1] > 1:
            last.pop(hw, None)
            last[hw] = name  # re-inserted: dict order follows each size's last visit
    stages = list(last.values())
    if len(stages) < count:
        raise SigntrapError(f"nad needs {count} feature stages, the model has {len(stages)}; set fewer defend.nad.betas")
    return stages[-count:]


def attention(feature: torch.Tensor, p: float, eps: float = 1e-6) -> torch.Tensor:
    """NAD's attention map: sum over channels of |F|^p, L2-normalised over the spatial positions."""
    am = feature.float().abs().pow(p).sum(dim=1, keepdim=True)
    return am / (am.norm(dim=(2, 3), keepdim=True) + eps)


class Capture:
    """Keeps the outputs of named modules during a forward pass."""

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: self.out.__setitem__(n, o)) for n in names]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@register_defence("nad", settings=NADSettings)
def nad(model: nn.Module, clean: CleanData, s: NADSettings, ctx: DefenceContext) -> DefenceResult:
    """Fine-tune a teacher on the clean budget, then train the backdoored model on the same data with
    cross-entropy plus attention distillation from the teacher at the last feature stages.

    Selection rule (main knob: the learning rate of teacher and student, `grid` 3e-5..1e-3): the budget is
    split by whole tracks, drawn at random, into a fit part and a held-out third; teacher and student are
    trained on the fit part at each learning rate, largest first, and the largest one whose student's
    held-out clean accuracy is at most `tolerance` (1 point) below the backdoored model's is kept.
    """
    stages = feature_stages(model, clean.images.shape[1], ctx.device, len(s.betas))

    def prepare(data: CleanData):
        def repair(m: nn.Module, lr: float) -> DefenceResult:
            teacher = copy.deepcopy(m)
            teacher_curve = fit(teacher, data, ctx, method="nad", schedule=s.schedule("defend.nad", s.teacher_epochs, lr),
                                augment=s.augment, stream=stream_of("nad-teacher"))
            teacher.eval()
            for q in teacher.parameters():
                q.requires_grad_(False)
            student_maps, teacher_maps = Capture(m, stages), Capture(teacher, stages)

            def loss_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                logits = net(x)
                with torch.no_grad():
                    teacher(x)
                loss = F.cross_entropy(logits.float(), y)
                for beta, name in zip(s.betas, stages):
                    loss = loss + beta * F.mse_loss(attention(student_maps.out[name], s.p), attention(teacher_maps.out[name], s.p))
                return loss

            try:
                curve = fit(m, data, ctx, method="nad", schedule=s.schedule("defend.nad", lr=lr), augment=s.augment,
                            hooks=Hooks(loss=loss_fn))
            finally:
                student_maps.remove()
                teacher_maps.remove()
            report = {"clean_images": len(data), "lr": lr, "stages": stages, "betas": list(s.betas), "p": s.p,
                      "teacher_after": {k: teacher_curve[-1].get(k) for k in ("clean_acc", "asr")}}
            return DefenceResult(m, report, {"persistence": curve, "teacher": teacher_curve})
        return repair

    return select(model, clean, ctx, s, method="nad", prepare=prepare)


@nad.summary
def _summary(report: dict) -> list[str]:
    d = report.get("details", {})
    t = d.get("teacher_after") or {}
    asr = t.get("asr")
    return [f"nad: attention distilled at {', '.join(d.get('stages', []))}; the teacher's monitor ASR "
            f"{'n/a' if asr is None else f'{100 * asr:.1f}%'}"]
