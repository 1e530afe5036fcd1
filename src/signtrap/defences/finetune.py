"""Clean fine-tuning on the defender's budget (the baseline of Liu et al. 2018, "Fine-Pruning"); curves per epoch."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from signtrap.defences import register_defence
from signtrap.defences.common import CleanData, DefenceContext, DefenceResult, TrainSettings, fit


@dataclass
class FinetuneSettings(TrainSettings):
    """Clean fine-tuning: AdamW on the clean budget, cosine-decayed to zero."""


@register_defence("finetune", settings=FinetuneSettings)
def finetune(model: nn.Module, clean: CleanData, s: FinetuneSettings, ctx: DefenceContext) -> DefenceResult:
    curve = fit(model, clean, ctx, method="finetune", schedule=s.schedule("defend.finetune"), augment=s.augment)
    return DefenceResult(model, {"clean_images": len(clean)}, {"persistence": curve})
