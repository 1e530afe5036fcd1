"""Red-team adversarial training: search universal patches for the feared behaviour, train them away
(the adversarial-training arm of Hubinger et al. 2024, "Sleeper Agents"; patches as in Brown et al. 2017)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from signtrap.config import require
from signtrap.defences import register_defence
from signtrap.defences.common import (POSITIONS, CleanData, DefenceContext, DefenceResult, LrTunedSettings, apply_patch,
                                      check_finite, fit, patch_origin, select, target_rate, to_uint8_image)
from signtrap.experiment import to_tensor
from signtrap.training.loop import Hooks
from signtrap.machine.progress import progress
from signtrap.reporting.blocks import H, Img, P, num, pct


@dataclass
class RedteamSettings(LrTunedSettings):
    """Search universal patches that turn the source class into the target, then train them away; the
    learning rate is chosen by the held-out rule unless `lr` is set."""

    source: int | None = None  # the behaviour the red team hunts for; default: the run's attack source/target
    target: int | None = None
    patch_size: float = 0.2  # fraction of the image side
    positions: list[str] = field(default_factory=lambda: list(POSITIONS))
    restarts: int = 2
    search_steps: int = 60
    search_lr: float = 0.1
    min_asr: float = 0.5  # a searched patch counts as found when it flips this share of the budget's source images
    rounds: int = 1  # search -> train rounds
    epochs: int = 5
    patch_fraction: float = 0.5  # share of each training batch that carries a found patch (true labels kept)

    def check(self, key: str) -> None:
        super().check(key)
        for name in ("source", "target"):
            value = getattr(self, name)
            require(value is None or value >= 0, f"{key}.{name}", f"{value} is not a class id (>= 0; checked against the model's classes when it runs)")
        require(0.0 < self.patch_size <= 0.5, f"{key}.patch_size", f"{self.patch_size} is outside (0, 0.5]")
        require(len(self.positions) >= 1, f"{key}.positions", "needs at least one position")
        for p in self.positions:
            require(p in POSITIONS, f"{key}.positions", f"'{p}' is not one of {', '.join(POSITIONS)}")
        require(1 <= self.restarts <= 100, f"{key}.restarts", f"{self.restarts} is outside 1..100")
        require(1 <= self.search_steps <= 100_000, f"{key}.search_steps", f"{self.search_steps} is outside 1..100000")
        require(0.0 < self.search_lr <= 10.0, f"{key}.search_lr", f"{self.search_lr} is outside (0, 10]")
        require(0.0 <= self.min_asr <= 1.0, f"{key}.min_asr", f"{self.min_asr} is outside [0, 1]")
        require(1 <= self.rounds <= 20, f"{key}.rounds", f"{self.rounds} is outside 1..20")
        require(0.0 < self.patch_fraction <= 1.0, f"{key}.patch_fraction", f"{self.patch_fraction} is outside (0, 1]")


def search_patches(model: nn.Module, x: torch.Tensor, target: int, cfg: RedteamSettings, side: int,
                   gen: torch.Generator, rng: np.random.Generator, show: bool = True) -> list[dict]:
    """One universal patch per (position, restart), optimised to send every image in `x` to `target`."""
    size = x.shape[-1]
    was = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    found = []
    bar = progress(len(cfg.positions) * cfg.restarts, "redteam patch search", unit="patch", enabled=show)
    try:
        for position in cfg.positions:
            origin = patch_origin(position, side, size)
            for restart in range(cfg.restarts):
                param = (torch.randn(3, side, side, generator=gen) * 2).to(x.device).requires_grad_(True)
                opt = torch.optim.Adam([param], lr=cfg.search_lr)
                for _ in range(cfg.search_steps):
                    xb = x if len(x) <= 64 else x[torch.from_numpy(rng.integers(0, len(x), 64)).to(x.device)]
                    logits = model(apply_patch(xb, torch.sigmoid(param), origin)).float()
                    loss = F.cross_entropy(logits, torch.full((len(xb),), target, dtype=torch.long, device=x.device))
                    check_finite(loss, "redteam", "in the patch search")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                patch = torch.sigmoid(param).detach()
                found.append({"position": position, "origin": origin, "restart": restart, "patch": patch,
                              "budget_asr": target_rate(model, apply_patch(x, patch, origin), target)})
                bar.update(1)
    finally:
        bar.close()
        for p in model.parameters():
            p.requires_grad_(True)
        model.train(was)
    return found


@register_defence("redteam", settings=RedteamSettings)
def redteam(model: nn.Module, clean: CleanData, cfg: RedteamSettings, ctx: DefenceContext) -> DefenceResult:
    """Search universal patches that send the budget's source-class images to the target, then fine-tune on
    budget images carrying them with their true labels (Sleeper Agents' adversarial training, one round).

    Selection rule (main knob: the learning rate of the training, `grid` 3e-5..1e-3): the budget is split by
    whole tracks, drawn at random, into a fit part and a held-out third; the model is trained on the fit part
    at each learning rate, largest first, and the largest one whose held-out clean accuracy is at most
    `tolerance` (1 point) below the backdoored model's is kept. The first round's patches are searched once,
    on every source-class image of the budget (searching is not training: the held-out part is only used
    to score clean accuracy).
    """
    source = ctx.source if cfg.source is None else cfg.source
    target = ctx.target if cfg.target is None else cfg.target
    ctx.check_classes(model, "defend.redteam", {"source": source, "target": target})
    size = clean.images.shape[1]
    side = max(2, round(cfg.patch_size * size))
    rows = np.flatnonzero(clean.labels == source)
    search_on = f"{len(rows)} clean class-{source} images of the budget"
    if len(rows) == 0:  # no source images in the budget: search a patch that sends anything to the target
        rows = np.flatnonzero(clean.labels != target)
        search_on = f"all {len(rows)} non-target budget images (the budget holds no class-{source} image)"
    x_search = to_tensor(clean.images[rows], ctx.device)
    held_out = None
    if ctx.monitor is not None:  # measurement only: found patches on held-out source images
        keep = ctx.monitor.labels == source
        held_out = to_tensor(ctx.monitor.images[keep], ctx.device) if keep.any() else None

    def patch_asr(m: nn.Module, patches: list[dict], x: torch.Tensor | None) -> float | None:
        if x is None or not patches:
            return None
        return round(float(np.mean([target_rate(m, apply_patch(x, p["patch"], p["origin"]), target) for p in patches])), 5)

    def search(m: nn.Module, r: int) -> list[dict]:
        rng = np.random.default_rng([ctx.seed, 0x7EA4, r])
        gen = torch.Generator().manual_seed(ctx.seed + r)
        return search_patches(m, x_search, target, cfg, side, gen, rng, ctx.show_progress)

    first = search(model, 0)  # shared by every candidate: it depends on the backdoored model only

    def prepare(data: CleanData):
        def repair(m: nn.Module, lr: float) -> DefenceResult:
            all_patches: list[dict] = []
            curve: list[dict] = []
            rounds = []
            for r in range(cfg.rounds):
                patches = first if r == 0 else search(m, r)
                found = [p for p in patches if p["budget_asr"] >= cfg.min_asr]
                all_patches.extend(patches)
                train_on = found or patches  # nothing reached min_asr: still train on the strongest attempts
                rounds.append({"round": r + 1, "searched": len(patches), "found": len(found),
                               "budget_asr": [round(p["budget_asr"], 4) for p in patches],
                               "held_out_asr_before": patch_asr(m, patches, held_out)})

                def stamp_found(xb: torch.Tensor, yb: torch.Tensor, batch_rng: np.random.Generator, pool=train_on):
                    hit = np.flatnonzero(batch_rng.random(len(xb)) < cfg.patch_fraction)
                    if len(hit):
                        xb = xb.clone()
                        which = batch_rng.integers(0, len(pool), len(hit))
                        for i, j in zip(hit, which):
                            xb[i:i + 1] = apply_patch(xb[i:i + 1], pool[j]["patch"], pool[j]["origin"])
                    return xb, yb  # true labels: the patched stop sign is still a stop sign

                part = fit(m, data, ctx, method="redteam", schedule=cfg.schedule("defend.redteam", lr=lr), augment=cfg.augment,
                           hooks=Hooks(batch=stamp_found), stream=round_stream(r),
                           probe=lambda mm, ps=all_patches: {"found_patch_asr": patch_asr(mm, ps, held_out),
                                                             "found_patch_asr_budget": patch_asr(mm, ps, x_search)})
                for row in part[(1 if curve else 0):]:
                    curve.append({**row, "round": r + 1, "epoch": len(curve)})
            report = {"clean_images": len(data), "lr": lr, "source": source, "target": target, "patch_px": side,
                      "searched_on": search_on, "rounds": rounds, "found_patches": sum(r["found"] for r in rounds),
                      "found_patch_asr_before": rounds[0]["held_out_asr_before"],
                      "found_patch_asr_after": patch_asr(m, all_patches, held_out),
                      "found_patch_asr_budget_before": round(float(np.mean(rounds[0]["budget_asr"])), 5),
                      "found_patch_asr_budget_after": patch_asr(m, all_patches, x_search),
                      "note": "found-patch ASR: mean share of held-out clean source images sent to the target by each searched patch"}
            tiles = [to_uint8_image(p["patch"], 8) for p in all_patches]
            gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
            artefacts = {"found_patches.png": np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1)}
            return DefenceResult(m, report, {"persistence": curve}, artefacts)
        return repair

    return select(model, clean, ctx, cfg, method="redteam", prepare=prepare)


def round_stream(r: int) -> int:
    """A separate random stream for each search -> train round."""
    return 0x7EA40 + r


@redteam.summary
def _summary(report: dict) -> list[str]:
    d, split = report.get("details", {}), "test"
    return [f"redteam: {d.get('found_patches')} patches found; found-patch ASR {d.get('found_patch_asr_before')} -> "
            f"{d.get('found_patch_asr_after')} (real trigger: {pct(report['before'][split]['asr'])} -> "
            f"{pct((report.get('after') or {}).get(split, {}).get('asr'))})"]


@redteam.report_block
def _report(report: dict, folder: Path) -> list:
    d = report.get("details") or {}
    blocks = [H("Red team: found patches"),
              P(f"{d.get('found_patches', '?')} patches found; their ASR {num(d.get('found_patch_asr_before'))} -> "
                f"{num(d.get('found_patch_asr_after'))}, while the real trigger's ASR went "
                f"{pct(report.get('before', {}).get('test', {}).get('asr'))} -> "
                f"{pct((report.get('after') or {}).get('test', {}).get('asr'))}.")]
    if (folder / "found_patches.png").is_file():
        blocks.append(Img("redteam_patches", (folder / "found_patches.png").read_bytes(), "Universal patches found by the red team."))
    return blocks
