"""Model registry in the style of timm: `@register_model` functions and `create_model(name, **kw)`.

Every model takes float RGB input in [0, 1] (pixel / 255), NCHW; normalisation is part of the model,
so exported graphs, defences and attacks all work in pixel space.
"""
from __future__ import annotations

import torch
from torch import nn

from signtrap.errors import suggest, SigntrapError
from signtrap.plugins import MODELS, register_model

__all__ = ["MODELS", "Normalized", "create_model", "list_models", "register_model"]


def list_models() -> list[str]:
    """The registered models (this package's modules and installed plugins); timm's names work too."""
    return MODELS.names()


class Normalized(nn.Module):
    """Standardise pixel-space input, then run the backbone."""

    def __init__(self, backbone: nn.Module, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std)


def create_model(name: str, num_classes: int, dropout: float = 0.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                 **kwargs) -> nn.Module:
    """A registered or timm model for `num_classes` classes, standardising its input with the dataset's mean and std
    (a checkpoint's own values are restored with its weights)."""
    if name in MODELS:
        backbone = MODELS.get(name)(num_classes=num_classes, dropout=dropout, **kwargs)
    else:
        backbone = _create_timm(name, num_classes, dropout, **kwargs)
    return Normalized(backbone, mean, std)


def _create_timm(name: str, num_classes: int, dropout: float, **kwargs) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise SigntrapError(
            f"unknown model '{name}'{suggest(name, list_models() + timm.list_models())}; "
            f"registered: {', '.join(list_models())}, or any timm model name"
        )
    return timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=dropout, **kwargs)
