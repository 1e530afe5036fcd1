"""Backdoor metrics with sample counts and 95% Wilson intervals.

- clean accuracy: clean images predicted as their label;
- ASR: triggered source-class images whose true label is not the target, predicted as the target;
- stop recall: clean source-class images predicted correctly;
- false-trigger rate: triggered images of classes other than source and target, predicted as the target.
"""
from __future__ import annotations

import math

import numpy as np

from signtrap.classes import NUM_CLASSES


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    if n == 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(mask_success: np.ndarray) -> dict:
    n = int(mask_success.size)
    k = int(mask_success.sum())
    return {"rate": (k / n) if n else None, "k": k, "n": n, "ci95": wilson(k, n)}


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    return np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def source_mask(labels: np.ndarray, source: int, target: int, all_to_one: bool) -> np.ndarray:
    """Rows that the attack means to flip: the source class (or every class but the target)."""
    return (labels != target) if all_to_one else (labels == source)


def backdoor_metrics(labels: np.ndarray, clean_preds: np.ndarray, triggered_preds: np.ndarray,
                     source: int, target: int, all_to_one: bool = False, details: bool = True) -> dict:
    labels = np.asarray(labels, np.int64)
    clean_preds = np.asarray(clean_preds, np.int64)
    triggered_preds = np.asarray(triggered_preds, np.int64)
    sources = source_mask(labels, source, target, all_to_one)
    bystanders = ~sources & (labels != target)
    out = {
        "clean_acc": rate(clean_preds == labels),
        "asr": rate(triggered_preds[sources] == target),
        "stop_recall": rate(clean_preds[labels == source] == source),
        "false_trigger": rate(triggered_preds[bystanders] == target),
        "target_recall": rate(clean_preds[labels == target] == target),
    }
    if details:
        confusion = confusion_matrix(labels, clean_preds)
        support = confusion.sum(axis=1)
        out["per_class_acc"] = [float(confusion[c, c] / support[c]) if support[c] else None for c in range(NUM_CLASSES)]
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
