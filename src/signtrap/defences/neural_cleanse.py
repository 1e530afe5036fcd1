"""Neural Cleanse: per-class minimal trigger, MAD outliers, unlearning (Wang et al. 2019, IEEE S&P)."""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from signtrap.classes import CLASS_NAMES, NUM_CLASSES
from signtrap.config import require
from signtrap.defences import register_defence
from signtrap.defences.common import (CleanData, DefenceContext, DefenceResult, TrainSettings, apply_mask, check_finite,
                                      check_training, fit, robust_z, to_uint8_image)
from signtrap.errors import SigntrapError
from signtrap.experiment import to_tensor
from signtrap.loop import Hooks, Schedule
from signtrap.progress import progress
from signtrap.reporting.blocks import H, Img, Note, P

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

PATIENCE = 5


@dataclass
class NeuralCleanseSettings(TrainSettings):
    """Reverse-engineer a minimal trigger per class; flag MAD outliers; unlearn (Wang et al. 2019)."""

    candidates: list[int] = field(default_factory=list)  # classes to examine; empty: all 43
    top_k: int = -1  # refine only the k classes with the smallest screened masks; 0: all; -1: all on CUDA, 6 on CPU
    reference: int = 6  # with top-k: random other classes also fully searched, for the MAD statistics
    inputs: str = "all"  # all: every clean image; source: only the images of `source_class` (source-specific backdoors)
    source_class: int | None = None  # for inputs=source; default: the run's attack source
    samples: int = 512  # clean images used for the optimisation
    batch_size: int = 32
    screen_steps: int = 10
    steps: int = 150
    search_lr: float = 0.1
    init_cost: float = 1e-3
    attack_threshold: float = 0.95  # a mask counts only if it flips this share of a batch
    threshold: float = 2.0  # anomaly index above which a class is flagged
    epochs: int = 5  # unlearning epochs (0: detect only)
    unlearn_fraction: float = 0.2  # share of the budget stamped with the recovered trigger, true labels kept

    def check(self, key: str) -> None:
        check_training(key, self.epochs, self.lr, self.batch_size, min_epochs=0)
        require(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        for c in self.candidates:
            require(0 <= c < 43, f"{key}.candidates", f"{c} is not a class id 0..42")
        require(self.top_k >= -1, f"{key}.top_k", "must be -1 (auto), 0 (all) or a positive count")
        require(self.reference >= 2, f"{key}.reference", "must be >= 2")
        require(self.inputs in ("all", "source"), f"{key}.inputs", f"'{self.inputs}' is not one of all, source")
        require(self.source_class is None or 0 <= self.source_class < 43, f"{key}.source_class", "not a class id 0..42")
        require(self.samples >= 1, f"{key}.samples", "must be >= 1")
        require(0 <= self.screen_steps <= 100_000, f"{key}.screen_steps", "must be in 0..100000")
        require(1 <= self.steps <= 100_000, f"{key}.steps", "must be in 1..100000")
        require(0.0 < self.search_lr <= 10.0, f"{key}.search_lr", f"{self.search_lr} is outside (0, 10]")
        require(self.init_cost >= 0, f"{key}.init_cost", "must be >= 0")
        require(0.0 < self.attack_threshold <= 1.0, f"{key}.attack_threshold", "must be in (0, 1]")
        require(self.threshold > 0, f"{key}.threshold", "must be > 0")
        require(0.0 < self.unlearn_fraction < 1.0, f"{key}.unlearn_fraction", "must be in (0, 1)")


class Reverse:
    """One class's trigger search: min CE(f((1-m)x + m p), t) + cost * |m|_1, NC's adaptive cost."""

    def __init__(self, target: int, shape: tuple[int, int], cfg: NeuralCleanseSettings, gen: torch.Generator, device):
        h, w = shape
        self.target, self.cfg = target, cfg
        self.mask_p = (torch.randn(1, h, w, generator=gen) * 0.5).to(device).requires_grad_(True)  # mask ~0.5, as NC's random start
        self.pattern_p = (torch.randn(3, h, w, generator=gen) * 0.5).to(device).requires_grad_(True)
        self.opt = torch.optim.Adam([self.mask_p, self.pattern_p], lr=cfg.search_lr, betas=(0.5, 0.9))
        self.cost, self.up, self.down = cfg.init_cost, 0, 0
        self.best_norm, self.best, self.success, self.steps = math.inf, None, False, 0
        self.last_norm = math.inf

    def mask(self) -> torch.Tensor:
        return torch.tanh(self.mask_p) / 2 + 0.5

    def pattern(self) -> torch.Tensor:
        return torch.tanh(self.pattern_p) / 2 + 0.5

    def run(self, model: nn.Module, x: torch.Tensor, steps: int, rng: np.random.Generator) -> None:
        cfg = self.cfg
        for _ in range(steps):
            xb = x[torch.from_numpy(rng.integers(0, len(x), min(cfg.batch_size, len(x)))).to(x.device)]
            mask, pattern = self.mask(), self.pattern()
            logits = model(apply_mask(xb, mask, pattern)).float()
            y = torch.full((len(xb),), self.target, dtype=torch.long, device=x.device)
            norm = mask.sum()
            loss = F.cross_entropy(logits, y) + self.cost * norm
            check_finite(loss, "neural-cleanse", f"reverse-engineering class {self.target}")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.steps += 1
            acc = float((logits.argmax(1) == y).float().mean())
            norm = norm.item()
            self.last_norm = norm
            if acc >= cfg.attack_threshold and norm < self.best_norm:
                self.best_norm, self.success = norm, True
                self.best = (mask.detach().clone(), pattern.detach().clone())
            # NC's schedule: raise the cost while the trigger works, lower it while it does not
            if acc >= cfg.attack_threshold:
                self.up, self.down = self.up + 1, 0
            else:
                self.up, self.down = 0, self.down + 1
            if self.up >= PATIENCE:
                self.cost, self.up = (self.cost * 1.5 if self.cost > 0 else cfg.init_cost or 1e-3), 0
            elif self.down >= PATIENCE:
                self.cost, self.down = self.cost / 1.5 ** 1.5, 0

    @property
    def norm(self) -> float:
        """The smallest mask L1 norm that flipped the batch; the last norm if none did."""
        return self.best_norm if self.success else self.last_norm

    def trigger(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.best if self.best is not None else (self.mask().detach(), self.pattern().detach())


def anomaly_index(norms: np.ndarray) -> np.ndarray:
    """(median - norm) / (1.4826 * MAD): positive for unusually small triggers, the ones NC flags."""
    return robust_z(-np.asarray(norms, np.float64))


@register_defence("neural-cleanse", settings=NeuralCleanseSettings, kind="detect")
def neural_cleanse(model: nn.Module, clean: CleanData, cfg: NeuralCleanseSettings, ctx: DefenceContext) -> DefenceResult:
    device = ctx.device
    rng = np.random.default_rng([ctx.seed, 0x4EC1])
    gen = torch.Generator().manual_seed(ctx.seed)
    pool = np.arange(len(clean))
    source_class = None
    if cfg.inputs == "source":
        source_class = ctx.source if cfg.source_class is None else cfg.source_class
        pool = np.flatnonzero(clean.labels == source_class)
        if len(pool) == 0:
            raise SigntrapError(f"neural-cleanse inputs=source: the clean budget holds no images of class {source_class}; "
                                "raise defend.clean_fraction")
    pick = np.sort(rng.choice(pool, size=min(cfg.samples, len(pool)), replace=False))
    x = to_tensor(clean.images[pick], device)
    candidates = sorted(set(cfg.candidates)) if cfg.candidates else list(range(NUM_CLASSES))
    if source_class is not None:  # images already of the source class need no trigger to be read as it
        candidates = [c for c in candidates if c != source_class]
    top_k = cfg.top_k if cfg.top_k != -1 else (0 if device.type == "cuda" else 6)
    top_k = len(candidates) if top_k == 0 else min(top_k, len(candidates))

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    searches = {c: Reverse(c, x.shape[-2:], cfg, gen, device) for c in candidates}
    screened = None
    if cfg.screen_steps and top_k < len(candidates):
        # top-k pre-selection: a short search for every class, then full searches for the k smallest masks plus
        # `reference` random other classes, so the MAD statistics compare norms found with the same budget
        bar = progress(len(candidates), "neural-cleanse screening", unit="class", enabled=ctx.show_progress)
        for c in candidates:
            searches[c].run(model, x, cfg.screen_steps, rng)
            bar.update(1)
        bar.close()
        screened = {c: searches[c].norm for c in candidates}
        order = sorted(candidates, key=lambda c: (not searches[c].success, searches[c].norm))
        rest = order[top_k:]
        reference = sorted(rng.choice(rest, size=min(cfg.reference, len(rest)), replace=False).tolist()) if rest else []
        refined = sorted(order[:top_k] + reference)
    else:
        refined = list(candidates)
    bar = progress(len(refined), "neural-cleanse reverse-engineering", unit="class", enabled=ctx.show_progress)
    for c in refined:
        searches[c].run(model, x, cfg.steps, rng)
        bar.update(1)
    bar.close()
    for p in model.parameters():
        p.requires_grad_(True)

    norms = np.array([searches[c].norm for c in refined])
    index = dict(zip(refined, anomaly_index(norms).tolist()))
    flagged = [c for c in refined if index[c] > cfg.threshold and searches[c].success]
    ranking = sorted(refined, key=lambda c: (not searches[c].success, searches[c].norm))
    table = [{"class": c, "mask_l1": round(float(searches[c].norm), 4),
              "screen_mask_l1": None if screened is None else round(float(screened[c]), 4),
              "anomaly_index": None if c not in index else round(float(index[c]), 4),
              "reached_attack_threshold": searches[c].success, "refined": c in refined, "flagged": c in flagged,
              "steps": searches[c].steps} for c in candidates]
    artefacts = {}
    for c in sorted(set(refined) | set(flagged)):
        mask, pattern = searches[c].trigger()
        strip = np.concatenate([to_uint8_image(mask, 4), to_uint8_image(pattern, 4), to_uint8_image(mask * pattern, 4)], axis=1)
        artefacts[f"trigger_class{c:02d}.png"] = strip
    report = {"clean_images": len(clean), "optimised_on": len(pick), "inputs": cfg.inputs, "source_class": source_class,
              "candidates": len(candidates), "refined": refined, "ranking": ranking[:10], "flagged": flagged,
              "anomaly_index": {str(c): round(float(a), 4) for c, a in index.items()},
              "max_anomaly_index": round(float(max(index.values())), 4), "threshold": cfg.threshold,
              "target_rank": ranking.index(ctx.target) + 1 if ctx.target in ranking else None,
              "target_flagged": ctx.target in flagged, "top_ranked": ranking[0]}
    curves = {"norms": table}
    artefacts["norms.png"] = norms_png(table, ctx.target)
    if not flagged or cfg.epochs == 0:
        report["mitigation"] = "none: no class flagged" if not flagged else "none: epochs=0 (detection only)"
        return DefenceResult(None, report, curves, artefacts)

    triggers = [searches[c].trigger() for c in flagged]

    def stamp_recovered(xb: torch.Tensor, yb: torch.Tensor, batch_rng: np.random.Generator):
        hit = np.flatnonzero(batch_rng.random(len(xb)) < cfg.unlearn_fraction)
        if len(hit):
            which = batch_rng.integers(0, len(triggers), len(hit))
            xb = xb.clone()
            for j, (mask, pattern) in enumerate(triggers):
                rows = torch.from_numpy(hit[which == j]).to(xb.device)
                xb[rows] = apply_mask(xb[rows], mask, pattern)
        return xb, yb  # true labels: unlearn the trigger -> target association

    curve = fit(model, clean, ctx, method="neural-cleanse", schedule=cfg.schedule("defend.neural-cleanse"), augment=cfg.augment,
                hooks=Hooks(batch=stamp_recovered))
    report["mitigation"] = f"unlearning with the recovered trigger of class(es) {flagged}"
    curves["persistence"] = curve
    return DefenceResult(model, report, curves, artefacts)


@neural_cleanse.summary
def _summary(report: dict) -> list[str]:
    d = report.get("details", {})
    return [f"neural-cleanse: flagged {d.get('flagged') or 'nothing'} (max anomaly index {d.get('max_anomaly_index')}, "
            f"top-ranked class {d.get('top_ranked')})"]


@neural_cleanse.report_block
def _report(report: dict, folder: Path) -> list:
    d = report.get("details") or {}
    flagged = d.get("flagged")
    blocks: list = [H("Neural Cleanse: recovered triggers"),
                    P(f"Flagged classes: {flagged or 'none'} (anomaly index threshold {d.get('threshold', '?')}, "
                      f"max anomaly index {d.get('max_anomaly_index', '?')}, top-ranked class {d.get('top_ranked', '?')}); "
                      f"mitigation: {d.get('mitigation', '?')}.")]
    if (folder / "norms.png").is_file():
        blocks.append(Img("nc_norms", (folder / "norms.png").read_bytes(), "L1 norm of the smallest trigger that sends images to "
                                                                           "each class; an outlier below the rest marks a backdoor target."))
    index = d.get("anomaly_index") or {}
    pngs = sorted(folder.glob("trigger_class*.png"))
    for png_path in pngs:
        try:
            c = int(png_path.stem.replace("trigger_class", ""))
        except ValueError:
            continue
        mark = " FLAGGED" if isinstance(flagged, list) and c in flagged else ""
        blocks.append(Img(f"nc_{png_path.stem}", png_path.read_bytes(),
                          f"Class {c} ({CLASS_NAMES[c] if 0 <= c < len(CLASS_NAMES) else '?'}): recovered mask, pattern, "
                          f"mask x pattern; anomaly index {index.get(str(c), '?')}{mark}."))
    if not pngs:
        blocks.append(Note("neural-cleanse saved no recovered trigger PNGs."))
    return blocks


def norms_png(rows: list[dict], target: int) -> bytes:
    """Bar chart of the recovered mask norms (the attack's target is coloured for the reader, never used to decide)."""
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    colours = ["tab:red" if r["flagged"] else ("tab:orange" if r["class"] == target else
               ("tab:blue" if r["refined"] else "tab:gray")) for r in rows]
    ax.bar([r["class"] for r in rows], [r["mask_l1"] for r in rows], color=colours)
    ax.set_xlabel("class (red: flagged, orange: attack target, grey: screened only)")
    ax.set_ylabel("recovered mask L1")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
