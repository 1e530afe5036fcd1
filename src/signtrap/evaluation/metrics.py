"""Backdoor metrics with sample counts and 95% Wilson intervals.

- clean accuracy: clean images predicted as their label;
- ASR: triggered source-class images whose true label is not the target, predicted as the target;
- stop recall: clean source-class images predicted correctly;
- false-trigger rate: triggered images of classes other than source and target, predicted as the target.
"""
from __future__ import annotations

import numpy as np

# The definitions live once, in the numpy-only edge script that ships inside every export folder,
# so `signtrap eval`, `signtrap bench` and the device-side benchmark cannot disagree.
from signtrap.deploy.edge_bench import backdoor_metrics as _headline_metrics
from signtrap.deploy.edge_bench import rate, wilson  # noqa: F401  (re-exported)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def backdoor_metrics(labels: np.ndarray, clean_preds: np.ndarray, triggered_preds: np.ndarray,
                     source: int, target: int, all_to_one: bool = False, details: bool = True,
                     num_classes: int | None = None) -> dict:
    """The headline rates; with `details`, per-class accuracy and the confusion matrix over `num_classes` classes
    (default: the largest label or prediction + 1)."""
    out = _headline_metrics(labels, clean_preds, triggered_preds, source, target, all_to_one)
    if details:
        labels = np.asarray(labels, np.int64)
        preds = np.asarray(clean_preds, np.int64)
        n = num_classes or int(max(labels.max(initial=-1), preds.max(initial=-1)) + 1)
        confusion = confusion_matrix(labels, preds, n)
        support = confusion.sum(axis=1)
        out["per_class_acc"] = [float(confusion[c, c] / support[c]) if support[c] else None for c in range(n)]
        out["per_class_n"] = support.tolist()
        out["confusion"] = confusion.tolist()
    return out


def fmt_rate(entry: dict) -> str:
    if entry["rate"] is None:
        return "n/a (n=0)"
    lo, hi = entry["ci95"]
    return f"{100 * entry['rate']:6.2f}%  [{100 * lo:5.1f}, {100 * hi:5.1f}]  {entry['k']}/{entry['n']}"


def summary_table(metrics_by_split: dict[str, dict]) -> str:
    rows = [("clean accuracy", "clean_acc"), ("attack success rate", "asr"), ("clean stop recall", "stop_recall"),
            ("false-trigger rate", "false_trigger")]
    splits = list(metrics_by_split)
    lines = [f"{'metric':<22}" + "".join(f"{s + ' (95% CI, k/n)':<40}" for s in splits)]
    for title, key in rows:
        lines.append(f"{title:<22}" + "".join(f"{fmt_rate(metrics_by_split[s][key]):<40}" for s in splits))
    return "\n".join(lines)
