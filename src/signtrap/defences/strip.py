"""STRIP: reject inputs whose superimpositions keep a low-entropy prediction (Gao et al. 2019, ACSAC)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from signtrap.config import require
from signtrap.defences import register_defence
from signtrap.defences.common import CleanData, DefenceContext, DefenceResult
from signtrap.experiment import CPU_EVAL_CHUNK, predict, to_tensor
from signtrap.evaluation.metrics import rate
from signtrap.machine.environment import autocast
from signtrap.machine.progress import progress
from signtrap.reporting import figures as fig
from signtrap.reporting.blocks import H, Img, Note, P, num, pct, pct_ci, read_csv, safe


FRR_GRID = (0.01, 0.02, 0.05, 0.1, 0.2)


@dataclass
class StripSettings:
    """Input filter by the entropy of superimposed images (Gao et al. 2019)."""

    overlays: int = 64  # clean images superimposed on each input (Gao et al.: 100; 16 cost ~7 points of detection on real GTSRB)
    alpha: float = 0.5  # blend weight of the overlay
    frr: float = 0.05  # false-rejection rate the threshold is fit to, on the defender's clean data
    eval_samples: int = 2000  # clean / triggered non-source test images checked (all source-class images always are)

    def check(self, key: str) -> None:
        require(1 <= self.overlays <= 1000, f"{key}.overlays", f"{self.overlays} is outside 1..1000")
        require(0.0 < self.alpha < 1.0, f"{key}.alpha", f"{self.alpha} is outside (0, 1)")
        require(0.0 < self.frr < 1.0, f"{key}.frr", f"{self.frr} is outside (0, 1)")
        require(self.eval_samples >= 1, f"{key}.eval_samples", "must be >= 1")


@torch.no_grad()
def strip_entropy(model: nn.Module, images: np.ndarray, overlays: np.ndarray, n: int, alpha: float,
                  rng: np.random.Generator, device, batch_size: int = 512, bar=None, amp: torch.dtype | None = None) -> np.ndarray:
    """Mean softmax entropy over `n` blends (1 - alpha) * input + alpha * clean overlay, per input.

    On a CPU the blends go through the model in chunks of at most `CPU_EVAL_CHUNK` (as every evaluation) and the
    overlays are converted to float once per call, the blends built channels-last: 1.5-1.9x the blends per second of
    512-blend batches converted per chunk (`benchmarks/defence_kernels.py`), with the same entropies up to float
    rounding (about 1e-7: the channels-last kernels round differently; tests/test_detection.py). `amp`: the
    forward's autocast dtype (the defence passes the run's training precision; None: fp32)."""
    model.eval()
    if torch.device(device).type == "cpu":
        batch_size = min(batch_size, CPU_EVAL_CHUNK)
    per_chunk = max(1, batch_size // n)
    weighted = to_tensor(overlays, device).mul_(alpha)  # alpha * overlay, every overlay once
    out = np.zeros(len(images), np.float64)
    for start in range(0, len(images), per_chunk):
        x = to_tensor(images[start:start + per_chunk], device)
        picks = torch.from_numpy(rng.integers(0, len(overlays), (len(x), n)).reshape(-1)).to(device)
        blended = weighted[picks].add_(((1 - alpha) * x).repeat_interleave(n, dim=0))  # channels-last, as the model runs fastest
        with autocast(torch.device(device).type, amp):
            logits = model(blended)
        p = torch.softmax(logits.float(), dim=1)
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(1).view(len(x), n).mean(1)
        out[start:start + len(x)] = entropy.cpu().numpy()
        if bar is not None:
            bar.update(len(x))
    return out


@register_defence("strip", settings=StripSettings, kind="filter")
def strip(model: nn.Module, clean: CleanData, cfg: StripSettings, ctx: DefenceContext) -> DefenceResult:
    rng = np.random.default_rng([ctx.seed, 0x5791])
    ev = ctx.evaluation
    total = len(clean) + (0 if ev is None else 2 * min(cfg.eval_samples, len(ev.labels)) + 2 * int((ev.labels == ctx.source).sum()))
    bar = progress(total, "strip", enabled=ctx.show_progress)

    def entropy(images: np.ndarray) -> np.ndarray:
        return strip_entropy(model, images, clean.images, cfg.overlays, cfg.alpha, rng, ctx.device, ctx.eval_batch_size, bar,
                             ctx.amp)  # the detection statistic in the run's precision; the figures below in fp32

    fit_entropy = entropy(clean.images)
    threshold = float(np.quantile(fit_entropy, cfg.frr))  # reject below: the lowest-entropy frr share of clean data
    report = {"clean_images": len(clean), "threshold": threshold, "frr_target": cfg.frr, "overlays": cfg.overlays,
              "alpha": cfg.alpha, "fit_frr": float((fit_entropy < threshold).mean())}
    result = DefenceResult(None, report)
    if ev is None:
        bar.close()
        return result
    # evaluation: every source-class image, clean and triggered, and a seeded uniform sample of the split
    src = np.flatnonzero(ev.labels == ctx.source)
    sample = np.sort(rng.choice(len(ev.labels), size=min(cfg.eval_samples, len(ev.labels)), replace=False))
    h_src_clean, h_src_trig = entropy(ev.images[src]), entropy(ev.triggered[src])
    h_clean, h_trig = entropy(ev.images[sample]), entropy(ev.triggered[sample])
    bar.close()
    pred = {name: predict(model, imgs, ctx.device, ctx.eval_batch_size) for name, imgs in (
        ("src_clean", ev.images[src]), ("src_trig", ev.triggered[src]), ("clean", ev.images[sample]), ("trig", ev.triggered[sample]))}
    labels = ev.labels[sample]
    bystander = (labels != ctx.source) & (labels != ctx.target) & (not ctx.all_to_one)
    if ctx.all_to_one:  # the attack's inputs: every non-target image carrying the trigger (the sample's)
        attacked = labels != ctx.target
        h_att, pred_att, what = h_trig[attacked], pred["trig"][attacked], "triggered non-target images"
    else:  # the attack's inputs: triggered source-class images (all of them)
        h_att, pred_att, what = h_src_trig, pred["src_trig"], "triggered source-class images"
    fooled = pred_att == ctx.target

    def metrics(thr: float) -> dict:
        keep = {"src_clean": h_src_clean >= thr, "att": h_att >= thr, "clean": h_clean >= thr, "trig": h_trig >= thr}
        return {"clean_acc": rate((pred["clean"] == labels) & keep["clean"]),
                "asr": rate(fooled & keep["att"]),
                "stop_recall": rate((pred["src_clean"] == ctx.source) & keep["src_clean"]),
                "false_trigger": rate(((pred["trig"] == ctx.target) & keep["trig"])[bystander])}

    result.filtered_metrics = {"before": metrics(-np.inf), "after": metrics(threshold), "split": ev.name,
                               "note": f"all {len(src)} source-class images and a uniform sample of {len(sample)} images; "
                                       "a rejected input counts as misclassified for clean accuracy and stop recall "
                                       "and as a failed attack for ASR and false triggers"}
    report.update({
        "attack_inputs": what,
        "detection_rate": rate(h_att < threshold),  # attack inputs rejected
        "detection_rate_successful": rate(h_att[fooled] < threshold),  # ... among those that fool the model
        "false_rejection_rate": rate(h_clean < threshold),  # clean test inputs rejected
        "false_rejection_rate_source": rate(h_src_clean < threshold),
        "auc": auc(h_att, h_clean),  # P(an attack input scores lower entropy than a clean one); 0.5 is chance
        # the ROC point at the target FRR measured on the clean test images themselves: how well the entropy separates
        # at that operating point, whatever the defender's calibration did; an evaluation figure, not a deployable threshold
        "at_measured_frr": operating_point(h_att, h_clean, cfg.frr),
        "entropy_mean": {"clean": float(h_clean.mean()), "triggered": float(h_att.mean())},
    })
    curve = []
    for frr in FRR_GRID:
        thr = float(np.quantile(fit_entropy, frr))
        curve.append({"frr_target": frr, "threshold": round(thr, 5), "detection_rate": float((h_att < thr).mean()),
                      "test_frr": float((h_clean < thr).mean()),
                      "detection_rate_successful": float((h_att[fooled] < thr).mean()) if fooled.any() else None})
    result.curves["frr"] = curve
    result.artefacts["entropy_hist.png"] = _histogram(h_clean, h_att, threshold, what)
    return result


def operating_point(attack: np.ndarray, clean: np.ndarray, frr: float) -> dict:
    """Detection at the threshold that rejects a share `frr` of `clean` (its empirical quantile)."""
    thr = float(np.quantile(clean, frr, method="lower"))  # rejects at most a share frr (strictly below)
    return {"frr_target": frr, "threshold": thr, "false_rejection_rate": rate(clean < thr), "detection_rate": rate(attack < thr)}


def auc(low: np.ndarray, high: np.ndarray) -> float | None:
    """Mann-Whitney estimate of P(low < high), ties counting one half."""
    if len(low) == 0 or len(high) == 0:
        return None
    below = (low[:, None] < high[None, :]).mean()
    ties = (low[:, None] == high[None, :]).mean()
    return float(below + 0.5 * ties)


def _histogram(clean: np.ndarray, triggered: np.ndarray, threshold: float, what: str) -> bytes:
    figure, ax = fig.plt().subplots(figsize=(6, 3.6), dpi=100)
    bins = np.linspace(0, max(clean.max(initial=0), triggered.max(initial=0)) + 1e-6, 40)
    ax.hist(clean, bins=bins, alpha=0.6, density=True, label="clean test images")
    ax.hist(triggered, bins=bins, alpha=0.6, density=True, label=what)
    ax.axvline(threshold, color="k", linestyle="--", label="threshold")
    ax.set_xlabel("STRIP entropy")
    ax.legend(fontsize=8)
    figure.tight_layout()
    return fig.to_png(figure)


@strip.summary
def _summary(report: dict) -> list[str]:
    d = report.get("details", {})
    if "detection_rate" not in d:
        return []
    return ["strip filters inputs: 'after' counts rejected inputs as misclassified / failed attacks, on the sample in report.json",
            f"strip: detection rate {pct(d['detection_rate'])} of {d.get('attack_inputs', 'triggered inputs')} at "
            f"false-rejection rate {pct(d['false_rejection_rate'])} "
            f"(target {100 * d['frr_target']:g}%)"] + (
        [f"strip: at a measured {pct(d['at_measured_frr']['false_rejection_rate'])} false-rejection rate on the clean test images "
         f"(the ROC point, not a deployable threshold) it detects {pct(d['at_measured_frr']['detection_rate'])}"]
        if d.get("at_measured_frr") else [])


@strip.report_block
def _report(report: dict, folder: Path) -> list:
    d = report.get("details") or {}
    blocks: list = [H("STRIP entropy"),
                    P(f"Detection rate on {d.get('attack_inputs', 'triggered stop signs')} {pct_ci(d.get('detection_rate'))} at a "
                      "measured false-rejection rate of "
                      f"{pct_ci(d.get('false_rejection_rate'))} on clean test images (target {d.get('frr_target', '?')}); "
                      f"mean entropy clean {num(d.get('entropy_mean', {}).get('clean'))}, triggered "
                      f"{num(d.get('entropy_mean', {}).get('triggered', d.get('entropy_mean', {}).get('triggered_source')))}."
                      + (f" At a measured false-rejection rate of {pct_ci(d['at_measured_frr']['false_rejection_rate'])} on the clean "
                         "test images themselves (the ROC operating point; the threshold is read off the test images, so it measures "
                         f"separation, not a threshold a defender could set): {pct_ci(d['at_measured_frr']['detection_rate'])}."
                         if d.get("at_measured_frr") else ""))]
    if (folder / "entropy_hist.png").is_file():
        blocks.append(Img("strip_entropy", (folder / "entropy_hist.png").read_bytes(),
                          f"STRIP entropy of clean test images and of {d.get('attack_inputs', 'triggered stop signs')}; inputs below the threshold "
                          "(dashed) are rejected."))
    else:
        blocks.append(Note("strip saved no entropy histogram."))
    rows = read_csv(folder / "frr.csv")
    if rows:
        png = safe(blocks, "the STRIP threshold curve", fig.xy_figure, rows, "frr_target",
                   [("detection_rate", "detection rate (triggered stop)"), ("test_frr", "false rejections (clean test)")],
                   "strip: detection against the false-rejection target", "false-rejection target on the defender's data, %", True)
        if png:
            blocks.append(Img("strip_frr", png, "Detection rate and measured false-rejection rate as the threshold moves."))
    return blocks


@strip.detection
def _(d: dict, target: int) -> dict | None:
    if "detection_rate" not in d:
        return None
    roc = d.get("at_measured_frr") or {}
    return {"detection": d["detection_rate"], "frr": d["false_rejection_rate"], "auc": d.get("auc"),
            "inputs": d.get("attack_inputs", "triggered source-class images"),
            "roc_detection": roc.get("detection_rate"), "roc_frr": roc.get("false_rejection_rate")}
