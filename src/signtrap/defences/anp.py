"""Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021, "Adversarial Neuron Pruning Purifies Backdoored Deep Models").

Every channel of every BatchNorm layer gets a mask m in [0, 1] and multiplicative perturbations of its
scale and shift in [-eps, eps]: the layer computes gamma * (m + d_w) * x_hat + beta * (1 + d_b). The masks
are trained on clean data against the worst-case perturbation (one signed step from a random start), so
neurons whose perturbation most easily breaks the model (the backdoor's, per the paper) end with small
masks; the channels whose mask falls below a threshold are pruned (gamma set to zero, as in the paper's code).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from signtrap.config import require
from signtrap.defences import register_defence
from signtrap.defences.common import CleanData, DefenceContext, DefenceResult, TunedSettings, fit, select
from signtrap.errors import SigntrapError
from signtrap.training.loop import Hooks, Schedule
from signtrap.reporting import figures as fig
from signtrap.reporting.blocks import H, Img, Note, P, read_csv, safe


@dataclass
class ANPSettings(TunedSettings):
    """ANP's mask optimisation (the paper's eps 0.4, one perturbation step, alpha 0.2, SGD lr 0.2 with
    momentum 0.9, batch 128) and the pruning threshold on the learned masks, chosen by the held-out rule
    unless `threshold` is set."""

    KNOB: ClassVar[str] = "threshold"
    threshold: float | None = None  # prune every channel whose mask is <= this; None: chosen by the held-out rule
    grid: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 19)])  # 0.05 .. 0.9
    sweep: str = "full"  # pruning candidates are cheap (no training each): try every threshold, for the whole curve
    eps: float = 0.4  # bound of the multiplicative neuron perturbations
    steps: int = 1  # signed ascent steps of the perturbation per batch
    alpha: float = 0.2  # loss = alpha * natural + (1 - alpha) * perturbed
    epochs: int = 40  # mask-training epochs (about 400 mask updates on the default budget's fit part)
    lr: float = 0.2  # SGD with momentum 0.9 on the masks
    batch_size: int = 128
    weight_decay: float = 0.0
    probe_lr: float = 1e-4  # AdamW rate of the re-activation probe (`lr` is the masks' SGD rate, not a weight rate)

    def check(self, key: str) -> None:
        super().check(key)
        require(0.0 < self.probe_lr <= 1.0, f"{key}.probe_lr", f"{self.probe_lr} is outside (0, 1]")
        require(0.0 <= self.eps <= 1.0, f"{key}.eps", f"{self.eps} is outside [0, 1]")
        require(1 <= self.steps <= 100, f"{key}.steps", f"{self.steps} is outside 1..100")
        require(0.0 <= self.alpha <= 1.0, f"{key}.alpha", f"{self.alpha} is outside [0, 1]")


class NeuronMasks:
    """Masks and perturbations on the channels of every BatchNorm layer, applied by forward hooks."""

    def __init__(self, model: nn.Module):
        self.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                       and m.affine]
        if not self.layers:
            raise SigntrapError("anp needs a model with affine BatchNorm layers (its neurons are their channels)")
        dev = self.layers[0][1].weight.device
        self.masks = [nn.Parameter(torch.ones(m.num_features, device=dev)) for _, m in self.layers]
        self.noise_w = [torch.zeros(m.num_features, device=dev, requires_grad=True) for _, m in self.layers]
        self.noise_b = [torch.zeros(m.num_features, device=dev, requires_grad=True) for _, m in self.layers]
        self.perturbed = False
        self.handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module: nn.Module, inputs, out: torch.Tensor) -> torch.Tensor:
            shape = (1, -1) + (1,) * (out.dim() - 2)
            bias = module.bias.view(shape)  # out = gamma * x_hat + beta
            if self.perturbed:
                return (out - bias) * (self.masks[i] + self.noise_w[i]).view(shape) + bias * (1 + self.noise_b[i]).view(shape)
            return (out - bias) * self.masks[i].view(shape) + bias
        return hook

    @property
    def noise(self) -> list[torch.Tensor]:
        return self.noise_w + self.noise_b

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    @contextlib.contextmanager
    def perturb(self, on: bool = True) -> Iterator[None]:
        was, self.perturbed = self.perturbed, on
        try:
            yield
        finally:
            self.perturbed = was

    def values(self) -> list[dict]:
        return [{"layer": name, "channel": c, "mask": round(float(v), 5)}
                for (name, _), mask in zip(self.layers, self.masks) for c, v in enumerate(mask.detach().cpu().tolist())]

    def clip(self) -> None:
        with torch.no_grad():
            for mask in self.masks:
                mask.clamp_(0.0, 1.0)


@torch.no_grad()
def prune_by_mask(model: nn.Module, masks: list[dict], threshold: float) -> int:
    """Set gamma of every channel whose mask is <= threshold to zero (ANP's pruning); returns how many."""
    modules = dict(model.named_modules())
    pruned = 0
    for row in masks:
        if row["mask"] <= threshold:
            modules[row["layer"]].weight[row["channel"]] = 0.0
            pruned += 1
    return pruned


@register_defence("anp", settings=ANPSettings)
def anp(model: nn.Module, clean: CleanData, s: ANPSettings, ctx: DefenceContext) -> DefenceResult:
    """Train neuron masks against adversarial neuron perturbations on clean data, then prune by mask.

    The masks are trained through the one loop (the masks are its only parameters; the loss hook runs the
    perturbation's ascent step; after each step the masks are clipped to [0, 1]); BatchNorm normalises with
    each batch's statistics as in the paper's code (the next layer's normalisation absorbs a perturbation's
    overall scale, so perturbations do not compound through a plain chain of layers), its running statistics
    left unchanged. Selection rule (main knob: the pruning threshold, `grid` 0.05..0.9): the budget is split by
    whole tracks, drawn at random, into a fit part (the masks are trained on it) and a held-out third; every
    threshold is tried and the largest one whose held-out clean accuracy is at most `tolerance` (1 point)
    below the backdoored model's is kept. (The paper's code keeps the threshold with the lowest test ASR
    among those within 10% accuracy: that uses the attack, which a defender cannot.)
    """
    gen = torch.Generator().manual_seed(ctx.seed)

    def prepare(data: CleanData):
        work = copy.deepcopy(model).to(ctx.device)
        for p in work.parameters():
            p.requires_grad_(False)
        for m in work.modules():  # normalise with each batch's statistics, as the paper's code, but keep the running ones
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.0
        nm = NeuronMasks(work)

        def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if s.eps > 0:
                with torch.no_grad():
                    for n in nm.noise:
                        n.copy_((torch.rand(n.shape, generator=gen) * 2 - 1).to(n.device) * s.eps)
                with nm.perturb(True):
                    for _ in range(s.steps):
                        loss = F.cross_entropy(m(x).float(), y)
                        grads = torch.autograd.grad(loss, nm.noise)
                        with torch.no_grad():  # ascend: the perturbation that hurts clean accuracy most
                            for n, g in zip(nm.noise, grads):
                                n.add_(g.sign(), alpha=s.eps / s.steps).clamp_(-s.eps, s.eps)
                    robust = F.cross_entropy(m(x).float(), y)
            else:
                robust = torch.zeros((), device=x.device)
            with nm.perturb(False):
                natural = F.cross_entropy(m(x).float(), y)
            return s.alpha * natural + (1 - s.alpha) * robust

        schedule = Schedule(epochs=s.epochs, lr=s.lr, batch_size=s.batch_size, optimizer="sgd", momentum=0.9,
                            weight_decay=s.weight_decay, lr_key="defend.anp.lr")
        curve = fit(work, data, ctx, method="anp", schedule=schedule, augment=s.augment, params=nm.masks,
                    hooks=Hooks(loss=loss_fn, after_step=nm.clip), measure_every=max(1, s.epochs // 8))
        masks = nm.values()
        nm.remove()

        def repair(m: nn.Module, threshold: float) -> DefenceResult:
            pruned = prune_by_mask(m, masks, threshold)
            report = {"clean_images": len(data), "threshold": threshold, "pruned_neurons": pruned, "neurons": len(masks),
                      "layers": len(nm.layers), "eps": s.eps, "alpha": s.alpha, "mask_updates": _updates(len(data), s),
                      "probe_lr": s.probe_lr}
            return DefenceResult(m, report, {"persistence": curve, "masks": masks})
        return repair

    return select(model, clean, ctx, s, method="anp", prepare=prepare)


def _updates(rows: int, s: ANPSettings) -> int:
    return s.epochs * -(-rows // s.batch_size)


@anp.summary
def _summary(report: dict) -> list[str]:
    d = report.get("details", {})
    return [f"anp: pruned {d.get('pruned_neurons')} of {d.get('neurons')} BatchNorm channels (mask <= {d.get('threshold')}) "
            f"after {d.get('mask_updates')} mask updates"]


@anp.report_block
def _report(report: dict, folder: Path) -> list:
    d = report.get("details") or {}
    blocks: list = [H("ANP: neuron masks")]
    rows = read_csv(folder / "masks.csv")
    if not rows:
        return blocks + [Note("anp wrote no masks.csv.")]
    values = np.array([r["mask"] for r in rows if isinstance(r.get("mask"), float)])
    blocks.append(P(f"{len(values)} BatchNorm channels; masks after training: {int((values <= 0.2).sum())} at or below 0.2, "
                    f"{int((values >= 0.9).sum())} at or above 0.9. Pruned {d.get('pruned_neurons', '?')} with threshold "
                    f"{d.get('threshold', '?')}."))
    png = safe(blocks, "the mask histogram", fig.histogram_figure, values, "mask value", "ANP: learned neuron masks (low: pruned first)")
    if png:
        blocks.append(Img("anp_masks", png, "Distribution of the learned masks over every BatchNorm channel."))
    return blocks
