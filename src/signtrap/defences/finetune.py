"""Clean fine-tuning on the defender's budget (as in Liu et al. 2018's baseline); curves per epoch."""
from __future__ import annotations

from torch import nn

from signtrap.defences import register_defence
from signtrap.defences.common import CleanData, DefenceContext, DefenceResult, fit
from signtrap.defences.config import FinetuneConfig


@register_defence("finetune")
def finetune(model: nn.Module, clean: CleanData, cfg: FinetuneConfig, ctx: DefenceContext) -> DefenceResult:
    curve = fit(model, clean, ctx, method="finetune", epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                weight_decay=cfg.weight_decay, augment=cfg.augment)
    return DefenceResult(model, {"clean_images": len(clean)}, {"persistence": curve})
