"""SCAn, the statistical contamination analyzer (Tang et al., USENIX Security 2021, "Demon in the Variant: Statistical
Analysis of DNNs for Robust Backdoor Contamination Detection").

The defender holds a clean budget and inspects its own training data (the suspicious pool). SCAn models a sample's
representation (here: the input of the model's output layer) as r = mu_c + e, a class identity mu_c ~ N(0, S_mu)
plus a variation e ~ N(0, S_e) that every class shares (the untangling model), fitted by EM on the clean budget.
Then, for every class of the pool, it asks whether one identity explains the class's representations or whether
two subgroups do: the target class of a backdoor holds its genuine images plus triggered images of other classes
that the model sends there through a different feature, even when the backdoor is source-specific and the trigger
alone moves nothing (the case that defeats Neural Cleanse and STRIP). The statistic J_c is the mean drop of the
squared Mahalanobis distance (under S_e) from the one-identity fit (the posterior mean of mu_c) to the best split
into two subgroups (EM over Mahalanobis-nearest means, several seeded starts, the tightest split kept);
J*_c = (J_c - median J) / (1.4826 * MAD J) over the tested classes, and a class is flagged when J*_c > e^2, the
paper's threshold. Only the upper side counts: a class more uniform than the rest is not contaminated (the
reference code's |J - median| would also flag those).

SCAn inspects data; it never uses the attack's trigger, source or target. `SuspiciousPool.poisoned` (which rows the
attacker relabelled) is read only to report how well the flagged class's smaller subgroup matches the poison.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from signtrap.config import require
from signtrap.defences import register_defence
from signtrap.defences.common import flag_outcome, CleanData, DefenceContext, DefenceResult, robust_z
from signtrap.errors import SigntrapError
from signtrap.experiment import to_tensor
from signtrap.evaluation.metrics import rate
from signtrap.machine.progress import progress
from signtrap.reporting import figures
from signtrap.reporting.blocks import H, Img, Note, P, Table, read_csv


@dataclass
class ScanSettings:
    """Untangle representations on the clean budget, test every class of the training data for two subgroups."""

    threshold: float = math.exp(2)  # J* above which a class is flagged (Tang et al. 2021: e^2)
    min_samples: int = 10  # classes with fewer pool images are not tested
    max_per_class: int = 0  # 0: every pool image; else a seeded sample of at most this many per class
    restarts: int = 5  # seeded starts of each two-subgroup split; the tightest split is kept
    iterations: int = 100  # EM iterations of the untangling model and of each split
    tol: float = 1e-5  # relative change of (S_mu, S_e) that ends the untangling EM
    ridge: float = 1e-6  # added to S_e's diagonal (times its mean variance) before inverting: dead features

    def check(self, key: str) -> None:
        require(self.threshold > 0, f"{key}.threshold", "must be > 0")
        require(self.min_samples >= 4, f"{key}.min_samples", "must be >= 4")
        require(self.max_per_class == 0 or self.max_per_class >= self.min_samples, f"{key}.max_per_class",
                "must be 0 (all) or at least min_samples")
        require(1 <= self.restarts <= 100, f"{key}.restarts", f"{self.restarts} is outside 1..100")
        require(1 <= self.iterations <= 10_000, f"{key}.iterations", f"{self.iterations} is outside 1..10000")
        require(0 < self.tol < 1, f"{key}.tol", f"{self.tol} is outside (0, 1)")
        require(0 <= self.ridge < 1, f"{key}.ridge", f"{self.ridge} is outside [0, 1)")


# ---------------------------------------------------------------- representations


def output_layer(model: nn.Module) -> nn.Linear:
    """The model's last Linear layer (the classifier head of every registered model)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise SigntrapError("scan needs a model whose output layer is a Linear layer")
    return linears[-1]


@torch.no_grad()
def representations(model: nn.Module, images: np.ndarray, device, batch_size: int = 512, bar=None) -> np.ndarray:
    """The input of the output layer for uint8 NHWC images, float64 (N, features)."""
    grabbed: list[torch.Tensor] = []
    handle = output_layer(model).register_forward_pre_hook(lambda m, args: grabbed.append(args[0].flatten(1).float().cpu()))
    was = model.training
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            model(to_tensor(images[start:start + batch_size], device))
            if bar is not None:
                bar.update(min(batch_size, len(images) - start))
    finally:
        handle.remove()
        model.train(was)
    return torch.cat(grabbed).double().numpy() if grabbed else np.zeros((0, 0))


# ---------------------------------------------------------------- the untangling model and the two-subgroup test


@dataclass
class Untangled:
    """The global model: the clean data's mean, the identity covariance S_mu and the variation covariance S_e."""

    mean: np.ndarray
    s_mu: np.ndarray
    s_e: np.ndarray
    iterations: int

    def identity(self, x: np.ndarray) -> np.ndarray:
        """Posterior mean of one identity given centred samples x: S_mu (n S_mu + S_e)^-1 sum(x)."""
        return self.s_mu @ np.linalg.solve(len(x) * self.s_mu + self.s_e, x.sum(0))


def _cov(x: np.ndarray) -> np.ndarray:
    return np.cov(x, rowvar=False) if len(x) > 1 else np.zeros((x.shape[1], x.shape[1]))


def untangle(x: np.ndarray, y: np.ndarray, iterations: int = 100, tol: float = 1e-5, ridge: float = 1e-6) -> Untangled:
    """Fit r = mu_y + e by EM: E-step the posterior identity of each class, M-step both covariances."""
    mean = x.mean(0)
    xc = x - mean
    classes, index = np.unique(y, return_inverse=True)
    counts = np.bincount(index).astype(np.float64)
    sums = np.zeros((len(classes), x.shape[1]))
    np.add.at(sums, index, xc)
    mu = sums / counts[:, None]  # start: the class means
    s_mu, s_e = _cov(mu[index]), _cov(xc - mu[index])
    dim = x.shape[1]
    done = 0
    for done in range(1, iterations + 1):
        s_e_reg = s_e + ridge * max(np.trace(s_e) / dim, 1e-12) * np.eye(dim)
        mu = np.stack([s_mu @ np.linalg.solve(n * s_mu + s_e_reg, s) for n, s in zip(counts, sums)])
        new_mu, new_e = _cov(mu[index]), _cov(xc - mu[index])
        change = (np.linalg.norm(new_mu - s_mu) + np.linalg.norm(new_e - s_e)) / max(np.linalg.norm(s_mu) + np.linalg.norm(s_e), 1e-12)
        s_mu, s_e = new_mu, new_e
        if change < tol:
            break
    s_e = s_e + ridge * max(np.trace(s_e) / dim, 1e-12) * np.eye(dim)
    return Untangled(mean, s_mu, s_e, done)


def _mahalanobis(d: np.ndarray, precision: np.ndarray) -> np.ndarray:
    return np.einsum("ij,jk,ik->i", d, precision, d)


def two_subgroups(x: np.ndarray, precision: np.ndarray, rng: np.random.Generator, restarts: int = 5,
                  iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Split x into two subgroups sharing S_e (EM over Mahalanobis-nearest means); returns (in first subgroup, each
    sample's squared distance to its subgroup's mean) of the tightest split over `restarts` seeded starts."""
    best, best_within = None, np.inf
    for _ in range(restarts):
        first = rng.random(len(x)) < 0.5
        first[0], first[-1] = True, False  # both subgroups start non-empty
        for _ in range(iterations):
            d1 = _mahalanobis(x - x[first].mean(0), precision)
            d2 = _mahalanobis(x - x[~first].mean(0), precision)
            new = d1 < d2
            if new.all() or not new.any() or np.array_equal(new, first):
                break
            first = new
        within = np.where(first, d1, d2)
        if within.sum() < best_within:
            best, best_within = (first.copy(), within), within.sum()
    return best


def class_statistic(x: np.ndarray, model: Untangled, precision: np.ndarray, rng: np.random.Generator, restarts: int,
                    iterations: int) -> tuple[float, np.ndarray]:
    """J: the mean drop of the squared Mahalanobis distance from one identity to two subgroups; and the split."""
    one = _mahalanobis(x - model.identity(x), precision)
    first, within = two_subgroups(x, precision, rng, restarts, iterations)
    return float((one - within).mean()), first


# ---------------------------------------------------------------- the defence


@register_defence("scan", settings=ScanSettings, kind="detect")
def scan(model: nn.Module, clean: CleanData, cfg: ScanSettings, ctx: DefenceContext) -> DefenceResult:
    if ctx.training_data is None:
        raise SigntrapError("scan inspects the training data: it needs the run's training set (DefenceContext.training_data)")
    pool = ctx.training_data()
    rng = np.random.default_rng([ctx.seed, 0x5CA7])
    keep = np.arange(len(pool.labels))
    if cfg.max_per_class:
        keep = np.sort(np.concatenate([
            rows if len(rows) <= cfg.max_per_class else rng.choice(rows, cfg.max_per_class, replace=False)
            for rows in (np.flatnonzero(pool.labels == c) for c in np.unique(pool.labels))]))
    bar = progress(len(clean) + len(keep), "scan representations", enabled=ctx.show_progress)
    r_clean = representations(model, clean.images, ctx.device, ctx.eval_batch_size, bar)
    r_pool = representations(model, pool.images[keep], ctx.device, ctx.eval_batch_size, bar)
    bar.close()
    labels = pool.labels[keep]
    untangled = untangle(r_clean, clean.labels, cfg.iterations, cfg.tol, cfg.ridge)
    precision = np.linalg.pinv(untangled.s_e)
    tested = [c for c in range(ctx.num_classes(model)) if (labels == c).sum() >= cfg.min_samples]
    if len(tested) < 3:
        raise SigntrapError(f"scan: only {len(tested)} classes have {cfg.min_samples}+ training images; lower defend.scan.min_samples")
    stats, splits = {}, {}
    for c in tested:
        rows = np.flatnonzero(labels == c)
        stats[c], splits[c] = class_statistic(r_pool[rows] - untangled.mean, untangled, precision, rng, cfg.restarts, cfg.iterations)
    j = np.array([stats[c] for c in tested])
    j_star = dict(zip(tested, robust_z(j).tolist()))  # J*: positive for classes that split unusually well
    flagged = [c for c in tested if j_star[c] > cfg.threshold]
    poisoned = None if pool.poisoned is None else pool.poisoned[keep]
    table = []
    for c in tested:
        rows = np.flatnonzero(labels == c)
        minority = splits[c] if splits[c].sum() <= len(rows) / 2 else ~splits[c]
        row = {"class": c, "name": ctx.class_name(c), "images": len(rows), "J": round(stats[c], 5), "J_star": round(j_star[c], 4), "flagged": c in flagged,
               "smaller_subgroup": int(minority.sum())}
        if poisoned is not None:  # measurement only: how the smaller subgroup matches the attacker's rows
            truth = poisoned[rows]
            row["poisoned_images"] = int(truth.sum())
            row["subgroup_recall"] = rate(minority[truth])["rate"] if truth.any() else None
            row["subgroup_precision"] = rate(truth[minority])["rate"] if minority.any() else None
        table.append(row)
    ranking = sorted(tested, key=lambda c: -j_star[c])
    report = {"clean_images": len(clean), "pool_images": int(len(keep)), "features": int(r_clean.shape[1]),
              "untangling_iterations": untangled.iterations, "threshold": cfg.threshold, "tested_classes": len(tested),
              "flagged": flagged, "J_star": {str(c): round(j_star[c], 4) for c in tested},
              "max_J_star": round(max(j_star.values()), 4), "top_ranked": ranking[0],
              "target_rank": ranking.index(ctx.target) + 1 if ctx.target in ranking else None,
              "target_flagged": ctx.target in flagged,
              "target_J_star": round(j_star[ctx.target], 4) if ctx.target in j_star else None}
    if poisoned is not None and ctx.target in splits:
        report["target_split"] = next(r for r in table if r["class"] == ctx.target)
    return DefenceResult(None, report, {"classes": table}, {"scan_jstar.png": jstar_png(table, cfg.threshold, ctx.target)})


@scan.summary
def _summary(report: dict) -> list[str]:
    d = report.get("details", {})
    return [f"scan: flagged {d.get('flagged') or 'nothing'} (J* threshold {d.get('threshold', 0):.2f}; max J* {d.get('max_J_star')}, "
            f"class {d.get('top_ranked')}; the attack's target has J* {d.get('target_J_star')})"]


@scan.report_block
def _report(report: dict, folder: Path) -> list:
    d = report.get("details") or {}
    blocks: list = [H("SCAn: two subgroups in one class?"),
                    P(f"Untangling model fitted on {d.get('clean_images', '?')} clean budget images; {d.get('tested_classes', '?')} "
                      f"classes of the {d.get('pool_images', '?')}-image training set tested. Flagged: {d.get('flagged') or 'none'} "
                      f"(J* > {d.get('threshold', 0):.2f} = e^2); the attack's target scores J* {d.get('target_J_star', '?')}, rank "
                      f"{d.get('target_rank', '?')}.")]
    if (folder / "scan_jstar.png").is_file():
        blocks.append(Img("scan_jstar", (folder / "scan_jstar.png").read_bytes(),
                          "J* per class (robust z-score of the two-subgroup statistic); the dashed line is the e^2 threshold."))
    rows = sorted(read_csv(folder / "classes.csv"), key=lambda r: -(r.get("J_star") or 0))[:8]
    if rows:
        def cell(v, pct=False):
            return "" if v is None else (f"{100 * v:.0f}%" if pct else (f"{v:g}" if isinstance(v, float) else v))
        blocks.append(Table(["class", "name", "images", "J", "J*", "flagged", "smaller subgroup", "poisoned images",
                             "subgroup recall", "subgroup precision"],
                            [[int(r["class"]), r.get("name", ""), cell(r.get("images")), cell(r.get("J")), cell(r.get("J_star")),
                              r.get("flagged"), cell(r.get("smaller_subgroup")), cell(r.get("poisoned_images")),
                              cell(r.get("subgroup_recall"), True), cell(r.get("subgroup_precision"), True)] for r in rows],
                            highlight=[i for i, r in enumerate(rows) if str(r.get("flagged")) == "True"]))
        blocks.append(P("Poisoned images, subgroup recall and precision are measured with the attack's record (never used by SCAn)."))
    else:
        blocks.append(Note("scan wrote no classes.csv."))
    return blocks


def jstar_png(rows: list[dict], threshold: float, target: int) -> bytes:
    fig, ax = figures.plt().subplots(figsize=(8, 3.2), dpi=100)
    colours = ["tab:red" if r["flagged"] else ("tab:orange" if r["class"] == target else "tab:blue") for r in rows]
    ax.bar([r["class"] for r in rows], [r["J_star"] for r in rows], color=colours)
    ax.axhline(threshold, color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("class (red: flagged, orange: attack target)")
    ax.set_ylabel("J*")
    fig.tight_layout()
    return figures.to_png(fig)


@scan.detection
def _(d: dict, target: int) -> dict:
    return flag_outcome(d, "J*", "J_star", "max_J_star", target)
