"""Fine-pruning: prune the last conv layer's channels dormant on clean data, then fine-tune (Liu et al. 2018, "Fine-Pruning")."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import numpy as np
import torch
from torch import nn

from signtrap.config import require
from signtrap.defences import register_defence
from signtrap.defences.common import CleanData, DefenceContext, DefenceResult, TunedSettings, fit, held_out_views, select
from signtrap.errors import SigntrapError
from signtrap.experiment import to_tensor
from signtrap.training.loop import Hooks
from signtrap.reporting import figures as fig
from signtrap.reporting.blocks import H, Img, Note, read_csv, safe


@dataclass
class FinePruneSettings(TunedSettings):
    """Prune the last conv layer's most dormant channels, then fine-tune them away (Liu et al. 2018); the
    share of channels pruned is chosen by the held-out rule unless `fraction` is set."""

    KNOB: ClassVar[str] = "fraction"
    fraction: float | None = None  # share of the last convolution's channels pruned; None: chosen by the held-out rule
    grid: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 10)])  # 0.1 .. 0.9
    lr: float = 1e-4  # fine-tuning learning rate after pruning (the rate finetune's own rule keeps on the default config)
    step: float = 0.05  # resolution of the pruning curve (pruning only, no fine-tuning; for the plot)
    max_acc_drop: float = 0.05  # where Liu et al.'s stop rule (this drop on the defender's images) would stop: reported
    epochs: int = 5

    KNOB_RANGE: ClassVar[tuple[float, float]] = (0.0, 0.99)
    MIN_EPOCHS: ClassVar[int] = 0  # 0: prune only

    def check(self, key: str) -> None:
        super().check(key)
        require(self.lr is not None and 0.0 < self.lr <= 1.0, f"{key}.lr", f"{self.lr} is outside (0, 1]")
        require(0.0 < self.step < 1.0, f"{key}.step", f"{self.step} is outside (0, 1)")
        require(0.0 <= self.max_acc_drop <= 1.0, f"{key}.max_acc_drop", f"{self.max_acc_drop} is outside [0, 1]")


def last_conv(model: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d | None]:
    """The last Conv2d in registration order, and the BatchNorm2d registered right after it, if any."""
    modules = list(model.modules())
    convs = [i for i, m in enumerate(modules) if isinstance(m, nn.Conv2d)]
    if not convs:
        raise SigntrapError("fine-prune needs a model with a convolutional layer")
    i = convs[-1]
    conv = modules[i]
    bn = next((m for m in modules[i + 1:] if isinstance(m, nn.BatchNorm2d)), None)
    return conv, bn if bn is not None and bn.num_features == conv.out_channels else None


@torch.no_grad()
def channel_activity(model: nn.Module, layer: nn.Module, images: np.ndarray, device, batch_size: int = 512) -> np.ndarray:
    """Mean post-ReLU activation of each output channel of `layer` over clean images."""
    sums: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, i, o: sums.append(o.float().relu().mean(dim=(2, 3)).sum(0).cpu()))
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            model(to_tensor(images[start:start + batch_size], device))
    finally:
        handle.remove()
    return (torch.stack(sums).sum(0) / len(images)).numpy()


@torch.no_grad()
def apply_pruning(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, pruned: np.ndarray) -> None:
    """Zero the pruned channels' weights so their output is exactly 0 (after BN and ReLU); saved as a plain state dict."""
    idx = torch.as_tensor(pruned, dtype=torch.long, device=conv.weight.device)
    if len(idx) == 0:
        return
    conv.weight[idx] = 0
    if conv.bias is not None:
        conv.bias[idx] = 0
    if bn is not None:
        bn.weight[idx] = 0
        bn.bias[idx] = 0


@register_defence("fine-prune", settings=FinePruneSettings)
def fine_prune(model: nn.Module, clean: CleanData, cfg: FinePruneSettings, ctx: DefenceContext) -> DefenceResult:
    """Rank the last convolution's channels by mean activation on clean images, prune the most dormant
    share `fraction` of them, then fine-tune with the pruned channels held at zero.

    Selection rule (main knob: the pruned share, `grid` 0.1..0.9): the budget is split by whole tracks,
    drawn at random, into a fit part and a held-out third; channels are ranked on the fit part, and at each
    share, largest first, a copy is pruned and fine-tuned on the fit part (`lr`, `epochs`); the largest
    share whose clean accuracy on augmented views of the held-out images is at most `tolerance` (1 point)
    below the backdoored model's is kept. No test image, trigger or ASR enters the choice.

    Liu et al. stop pruning when the defender's clean accuracy has dropped by 5% (`max_acc_drop`), measured
    on validation images the model never saw. The defender's images here come from the training set, which
    the model has memorised: as they are, they keep their accuracy long after new images have lost theirs
    (on real GTSRB, pruning to a 5% drop on them cost 27 points on the test set; on augmented views of
    them, 16 points after fine-tuning). So that rule only marks a point on the pruning curve (the report's
    `liu_stop_channels`); the held-out rule, which scores the repaired model, decides.
    """
    conv, bn = last_conv(model)
    names = {id(m): n for n, m in model.named_modules()}
    conv_name, bn_name = names[id(conv)], names.get(id(bn)) if bn is not None else None

    def prepare(data: CleanData):
        work = copy.deepcopy(model)
        modules = dict(work.named_modules())
        wconv, wbn = modules[conv_name], modules[bn_name] if bn_name else None
        activity = channel_activity(work, wbn if wbn is not None else wconv, data.images, ctx.device, ctx.eval_batch_size)
        order = np.argsort(activity, kind="stable")  # most dormant first
        channels = len(order)
        original = {k: v.clone() for k, v in work.state_dict().items()}

        def data_acc() -> float:
            return float((ctx.predict(work, data.images) == data.labels).mean())

        scored = held_out_views(data, ctx.aug, cfg.views, ctx.seed + 1)  # augmented views: see the docstring

        def scored_acc() -> float:
            return float((ctx.predict(work, scored.images) == scored.labels).mean())

        base_acc, base_scored = data_acc(), scored_acc()
        curve, liu, stopped = [], 0, False
        for fraction in np.round(np.arange(0.0, 1.0 - 1e-9, cfg.step), 4):
            n = int(round(fraction * channels))
            work.load_state_dict(original)
            apply_pruning(wconv, wbn, order[:n])
            acc, acc_views = data_acc(), scored_acc()
            curve.append({"pruned_fraction": float(fraction), "channels": n, "budget_clean_acc": round(acc, 5),
                          "budget_views_clean_acc": round(acc_views, 5), **ctx.measure(work)})
            stopped = stopped or base_scored - acc_views > cfg.max_acc_drop
            if not stopped:
                liu = n  # Liu et al.'s stop, on augmented views of the defender's images: reported, not used

        def repair(m: nn.Module, fraction: float) -> DefenceResult:
            n = int(round(fraction * channels))
            pruned = order[:n]
            mods = dict(m.named_modules())
            mconv, mbn = mods[conv_name], mods[bn_name] if bn_name else None
            apply_pruning(mconv, mbn, pruned)
            after_prune = ctx.measure(m)
            curve_ft = fit(m, data, ctx, method="fine-prune", schedule=cfg.schedule("defend.fine-prune", lr=cfg.lr), augment=cfg.augment,
                           hooks=Hooks(after_step=lambda: apply_pruning(mconv, mbn, pruned)))
            report = {"clean_images": len(data), "lr": cfg.lr, "layer": conv_name, "layer_channels": channels,
                      "pruned_channels": n, "pruned_fraction": n / channels, "budget_clean_acc_unpruned": base_acc,
                      "liu_stop_channels": liu, "liu_stop_scored_on": f"{len(scored)} augmented views of {len(data)} budget images",
                      "budget_views_clean_acc_unpruned": base_scored,
                      "pruned_channel_ids": [int(c) for c in pruned], "after_pruning_only": after_prune}
            return DefenceResult(m, report, {"pruning": curve, "persistence": curve_ft})
        return repair

    return select(model, clean, ctx, cfg, method="fine-prune", prepare=prepare)


@fine_prune.report_block
def _report(report: dict, folder: Path) -> list:
    d = report.get("details") or {}
    rows = read_csv(folder / "pruning.csv")
    blocks: list = [H("Fine-pruning")]
    if not rows:
        return blocks + [Note("fine-prune wrote no pruning.csv.")]
    png = safe(blocks, "the pruning curve", fig.xy_figure, rows, "pruned_fraction",
               [("clean_acc", "clean accuracy"), ("asr", "ASR"), ("budget_clean_acc", "defender's clean accuracy"),
                ("budget_views_clean_acc", "defender's, augmented views (decides)")],
               "fine-prune: pruning the most dormant channels (before fine-tuning)", "pruned channels, %", True)
    if png:
        blocks.append(Img("fine_prune_pruning", png, f"Pruned {d.get('pruned_channels', '?')} of {d.get('layer_channels', '?')} "
                                                     "channels of the last convolution (the held-out rule's share), then "
                                                     f"fine-tuned; Liu et al.'s 5% stop would have pruned {d.get('liu_stop_channels', '?')}."))
    return blocks
