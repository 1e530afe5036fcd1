"""Clean fine-tuning on the defender's budget (the baseline of Liu et al. 2018, "Fine-Pruning"); curves per epoch."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from signtrap.defences import register_defence
from signtrap.defences.common import CleanData, DefenceContext, DefenceResult, LrTunedSettings, fit, select


@dataclass
class FinetuneSettings(LrTunedSettings):
    """Clean fine-tuning: AdamW on the clean budget, cosine-decayed to zero; the learning rate is chosen by
    the held-out rule unless `lr` is set."""


@register_defence("finetune", settings=FinetuneSettings)
def finetune(model: nn.Module, clean: CleanData, s: FinetuneSettings, ctx: DefenceContext) -> DefenceResult:
    """Fine-tune every weight on the clean budget (cross-entropy, the run's augmentation and precision).

    Selection rule (main knob: the learning rate, `grid` 3e-5..1e-3): the budget is split by whole tracks,
    drawn at random, into a fit part and a held-out third; the model is fine-tuned on the fit part at each
    learning rate, largest first, and the largest one whose held-out clean accuracy is at most `tolerance`
    (1 point) below the backdoored model's is kept. Only the defender's budget enters the choice.
    """
    def prepare(data: CleanData):
        def repair(m: nn.Module, lr: float) -> DefenceResult:
            curve = fit(m, data, ctx, method="finetune", schedule=s.schedule("defend.finetune", lr=lr), augment=s.augment)
            return DefenceResult(m, {"clean_images": len(data), "lr": lr}, {"persistence": curve})
        return repair

    return select(model, clean, ctx, s, method="finetune", prepare=prepare)
