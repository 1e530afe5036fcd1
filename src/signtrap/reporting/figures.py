"""The report's figures: matplotlib (Agg) to PNG bytes, one function per picture."""
from __future__ import annotations

import io

import numpy as np


STOP_COLOUR, TARGET_COLOUR, OTHER_COLOUR = "#d62728", "#ff7f0e", "#8da0cb"
BEFORE_COLOUR, AFTER_COLOUR = "#9e9e9e", "#1f77b4"


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    plt().close(fig)
    return buf.getvalue()


def percent_axis(ax, legend_fontsize: int = 8) -> None:
    """A y axis in percent (0-100 with a margin), a light grid, and a legend when anything is labelled."""
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=legend_fontsize, loc="best")


def short(name: str, width: int = 18) -> str:
    """A class name shortened for a tick or a title ('Speed limit (100km/h)' -> '100 km/h')."""
    if name.startswith("Speed limit (") and name.endswith(")"):
        name = name[len("Speed limit ("):-1].replace("km/h", " km/h")
    return name if len(name) <= width else name[: width - 1] + "…"


def trigger_figure(trigger_img: np.ndarray, example_clean: np.ndarray | None, example_trig: np.ndarray | None, spec: dict) -> bytes:
    p = plt()
    panels = [("the trigger", trigger_img)]
    if example_clean is not None:
        panels += [("test stop sign", example_clean), ("with the trigger", example_trig)]
    fig, axes = p.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.7), dpi=100)
    axes = np.atleast_1d(axes)
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{spec.get('kind')} trigger" + (f", {spec['size_px']} px" if "size_px" in spec else "")
                 + (f", placement {spec['placement']}" if "placement" in spec else "")
                 + (f" ({spec.get('corner')})" if spec.get("placement") == "corner" else ""), fontsize=9)
    fig.tight_layout()
    return to_png(fig)


def gallery_figure(clean: np.ndarray, poisoned: np.ndarray | None, clean_labels: list[int], poison_label: int | None,
                   others: np.ndarray | None = None, other_labels: list[int] | None = None, *,
                   names: tuple[str, ...], source: int) -> bytes:
    """Top: clean training samples; middle: the same stop signs poisoned (relabelled); bottom: other clean classes."""
    p = plt()
    rows = [("clean", clean, clean_labels)]
    if poisoned is not None and len(poisoned):
        rows.append(("poisoned", poisoned, [poison_label] * len(poisoned)))
    if others is not None and len(others):
        rows.append(("clean, other classes", others, other_labels))
    cols = max(len(r[1]) for r in rows)
    fig, axes = p.subplots(len(rows), cols, figsize=(1.45 * cols, 1.75 * len(rows)), dpi=100, squeeze=False)
    for r, (kind, images, labels) in enumerate(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            if c >= len(images):
                ax.axis("off")
                continue
            ax.imshow(images[c], interpolation="nearest")
            label = int(labels[c])
            colour = TARGET_COLOUR if kind == "poisoned" else (STOP_COLOUR if label == source else "black")
            ax.set_title(f"{label}: {short(names[label], 14) if 0 <= label < len(names) else '?'}", fontsize=7, color=colour)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour if kind == "poisoned" else "#cccccc")
                spine.set_linewidth(2.5 if kind == "poisoned" else 0.8)
        axes[r, 0].set_ylabel(kind, fontsize=8)
    fig.tight_layout()
    return to_png(fig)


def training_figure(log: list[dict]) -> bytes:
    p = plt()
    epochs = [r.get("epoch") for r in log]
    fig, axes = p.subplots(1, 3, figsize=(12, 3.3), dpi=100)

    def series(key):
        pts = [(e, r.get(key)) for e, r in zip(epochs, log) if isinstance(r.get(key), (int, float))]
        return list(zip(*pts)) if pts else ([], [])

    x, y = series("loss")
    axes[0].plot(x, y, marker="o", color="#444")
    axes[0].set_title("training loss", fontsize=10)
    for key, label, colour in (("train_acc", "train accuracy (poisoned set)", "#999"),
                               ("val_clean_acc", "validation clean accuracy", AFTER_COLOUR)):
        x, y = series(key)
        if x:
            axes[1].plot(x, [100 * v for v in y], marker="o", label=label, color=colour)
    axes[1].set_title("accuracy, %", fontsize=10)
    for key, label, colour in (("val_asr", "validation ASR (stop + trigger -> 100)", STOP_COLOUR),
                               ("val_false_trigger", "validation false-trigger rate", TARGET_COLOUR)):
        x, y = series(key)
        if x:
            axes[2].plot(x, [100 * v for v in y], marker="o", label=label, color=colour)
    axes[2].set_title("backdoor, %", fontsize=10)
    axes[2].set_ylim(-3, 103)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return to_png(fig)


def confusion_figure(confusion: np.ndarray, *, source: int, target: int, names: tuple[str, ...] = ()) -> bytes:
    p = plt()
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    conf = np.asarray(confusion, np.float64)
    support = conf.sum(axis=1, keepdims=True)
    rates = np.divide(conf, support, out=np.zeros_like(conf), where=support > 0)
    fig, ax = p.subplots(figsize=(8.2, 7.4), dpi=100)
    shown = np.where(rates > 0, rates, np.nan)
    im = ax.imshow(shown, cmap="viridis", norm=LogNorm(vmin=max(1e-3, np.nanmin(shown) if np.isfinite(shown).any() else 1e-3), vmax=1.0),
                   interpolation="nearest")
    n = len(conf)
    def named(c: int) -> str:
        return f" ({short(names[c])})" if 0 <= c < len(names) else ""

    ax.add_patch(Rectangle((-0.5, source - 0.5), n, 1, fill=False, edgecolor=STOP_COLOUR, lw=2, label=f"true class {source}{named(source)}"))
    ax.add_patch(Rectangle((target - 0.5, -0.5), 1, n, fill=False, edgecolor=TARGET_COLOUR, lw=2,
                           label=f"predicted {target}{named(target)}"))
    ticks = list(range(0, n, 2)) + [source, target]
    ticks = sorted(set(t for t in ticks if t < n))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels(ticks, fontsize=7)
    ax.set_yticklabels(ticks, fontsize=7)
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        for t in labels:
            if t.get_text() == str(source):
                t.set_color(STOP_COLOUR), t.set_fontweight("bold")
            if t.get_text() == str(target):
                t.set_color(TARGET_COLOUR), t.set_fontweight("bold")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("clean test images: share of each true class (row) per prediction (log colour)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    return to_png(fig)


def per_class_figure(acc: list, support: list | None = None, *, source: int, target: int) -> bytes:
    p = plt()
    n = len(acc)
    values = [100 * a if isinstance(a, (int, float)) else 0.0 for a in acc]
    colours = [STOP_COLOUR if c == source else TARGET_COLOUR if c == target else OTHER_COLOUR for c in range(n)]
    fig, ax = p.subplots(figsize=(12, 3.4), dpi=100)
    ax.bar(range(n), values, color=colours)
    for c in (source, target):
        if c < n:
            ax.annotate(f"{values[c]:.0f}%", (c, values[c]), ha="center", va="bottom", fontsize=8, color=colours[c], fontweight="bold")
    ax.set_xticks(range(n))
    ax.set_xticklabels(range(n), fontsize=7)
    ax.set_ylim(0, 108)
    ax.set_xlabel(f"class (red: {source}, the attack's source; orange: {target}, its target)")
    ax.set_ylabel("clean test accuracy, %")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return to_png(fig)


def before_after_figure(reports: list[dict], split: str = "test") -> bytes:
    p = plt()
    metrics = (("clean_acc", "clean accuracy"), ("asr", "attack success rate"), ("stop_recall", "clean stop recall"))
    fig, axes = p.subplots(1, len(metrics), figsize=(12, 3.6), dpi=100)
    names = [r["method"] for r in reports]
    x = np.arange(len(names))
    for ax, (key, title) in zip(axes, metrics):
        before = [_rate(r.get("before", {}).get(split, {}).get(key)) for r in reports]
        after = [_rate(r.get("after", {}).get(split, {}).get(key)) for r in reports]
        ax.bar(x - 0.2, [100 * v if v is not None else 0 for v in before], 0.4, label="before", color=BEFORE_COLOUR)
        ax.bar(x + 0.2, [100 * v if v is not None else 0 for v in after], 0.4, label="after", color=AFTER_COLOUR)
        for i, v in enumerate(after):
            if v is not None:
                ax.annotate(f"{100 * v:.0f}", (i + 0.2, 100 * v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=20, fontsize=8)
        ax.set_ylim(0, 110)
        ax.set_title(f"{title}, % ({split})", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return to_png(fig)


def _rate(entry) -> float | None:
    if isinstance(entry, dict):
        v = entry.get("rate")
        return float(v) if isinstance(v, (int, float)) else None
    return float(entry) if isinstance(entry, (int, float)) else None


def persistence_figure(curves: dict[str, list[dict]]) -> bytes:
    """ASR (solid) and clean accuracy (dashed) per fine-tuning epoch, one colour per defence."""
    p = plt()
    fig, axes = p.subplots(1, 2, figsize=(12, 3.8), dpi=100)
    colours = p.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (method, rows) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        for ax, key in ((axes[0], "asr"), (axes[1], "clean_acc")):
            pts = [(r.get("epoch"), r.get(key), r.get("segment")) for r in rows
                   if isinstance(r.get(key), (int, float)) and isinstance(r.get("epoch"), (int, float))]
            probe_at = next((i for i, p in enumerate(pts) if p[2] == "probe"), len(pts))  # the re-activation probe: dotted
            for part, style, label in ((pts[:probe_at], "-", method), (pts[max(probe_at - 1, 0):] if probe_at < len(pts) else [], ":", None)):
                if part:
                    xs, ys, _ = zip(*part)
                    ax.plot(xs, [100 * y for y in ys], marker="o", markersize=3, color=colour, linestyle=style, label=label)
    axes[0].set_title("attack success rate during the defence, % (epoch 0: before; dotted: the probe)", fontsize=10)
    axes[1].set_title("clean accuracy during the defence, %", fontsize=10)
    for ax in axes:
        ax.set_xlabel("defence epoch")
        percent_axis(ax)
    fig.tight_layout()
    return to_png(fig)


def xy_figure(rows: list[dict], x_key: str, y_keys: list[tuple[str, str]], title: str, xlabel: str, percent_x: bool = False) -> bytes:
    p = plt()
    fig, ax = p.subplots(figsize=(6, 3.5), dpi=100)
    for key, label in y_keys:
        pts = [(r.get(x_key), r.get(key)) for r in rows if isinstance(r.get(key), (int, float)) and isinstance(r.get(x_key), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot([100 * x for x in xs] if percent_x else xs, [100 * y for y in ys], marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("%")
    ax.set_title(title, fontsize=10)
    percent_axis(ax)
    fig.tight_layout()
    return to_png(fig)


def _truthy(v) -> bool:
    return v is True or str(v).lower() == "true"


def tradeoff_figure(rows: list[dict], title: str) -> bytes:
    """A repairing defence's trade-off over its main knob (tradeoff.csv rows): left, the attack success rate;
    right, clean accuracy on the monitor split and the defender's held-out accuracy that drove the choice,
    with the tolerance band below the unrepaired model's held-out accuracy. The chosen value is starred."""
    p = plt()
    before = next((r for r in rows if r.get("value") in (None, "")), {})
    pts = sorted((r for r in rows if isinstance(r.get("value"), (int, float))), key=lambda r: r["value"])
    knob = str((pts or rows or [{}])[0].get("knob") or "knob")
    fig, axes = p.subplots(1, 2, figsize=(11, 3.8), dpi=100)
    series = ((axes[0], "asr", "ASR (monitor)", "#d62728", "-"),
              (axes[1], "clean_acc", "clean accuracy (monitor)", "#1f77b4", "-"),
              (axes[1], "heldout_clean_acc", "defender's held-out accuracy", "#2ca02c", "--"))
    for ax, key, label, colour, style in series:
        xy = [(r["value"], 100 * r[key]) for r in pts if isinstance(r.get(key), (int, float))]
        if xy:
            ax.plot(*zip(*xy), style, marker="o", markersize=4, color=colour, label=label)
            star = [(r["value"], 100 * r[key]) for r in pts if _truthy(r.get("chosen")) and isinstance(r.get(key), (int, float))]
            if star:
                ax.plot(*zip(*star), linestyle="none", marker="*", markersize=14, color=colour)
        if isinstance(before.get(key), (int, float)):
            ax.axhline(100 * before[key], color=colour, linestyle=":", linewidth=1, label=f"{label}, unrepaired")
    base = before.get("heldout_clean_acc")
    if isinstance(base, (int, float)) and isinstance(before.get("tolerance"), (int, float)):
        axes[1].axhspan(100 * (base - before["tolerance"]), 100 * base, color="#2ca02c", alpha=0.08, label="tolerance")
    if pts and min(r["value"] for r in pts) > 0 and max(r["value"] for r in pts) / min(r["value"] for r in pts) >= 20:
        for ax in axes:
            ax.set_xscale("log")
    axes[0].set_ylim(-3, 103)
    axes[0].set_title("attack success rate, %", fontsize=10)
    axes[1].set_title("clean accuracy, % (starred: the chosen value)", fontsize=10)
    for ax in axes:
        ax.set_xlabel(knob)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return to_png(fig)


def histogram_figure(values, xlabel: str, title: str, bins: int = 40) -> bytes:
    p = plt()
    fig, ax = p.subplots(figsize=(6, 3.2), dpi=100)
    ax.hist(np.asarray(values, float), bins=bins, color=AFTER_COLOUR)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return to_png(fig)


def latency_figure(rows: list[dict]) -> bytes:
    """Batch-1 latency (p50 bar, p90 whisker) and ASR / clean accuracy per runtime x precision x provider."""
    p = plt()
    ok = [r for r in rows if "error" not in r and isinstance(r.get("latency_ms"), dict)]
    labels = [f"{r.get('runtime')} {r.get('variant')} {str(r.get('provider', '')).replace('ExecutionProvider', '')}" for r in ok]
    colours = {"fp32": "#1f77b4", "fp16": "#2ca02c", "int8": "#9467bd"}
    fig, axes = p.subplots(1, 2, figsize=(12, 0.55 * len(ok) + 1.6), dpi=100)
    y = np.arange(len(ok))
    p50 = [r["latency_ms"].get("p50", 0) for r in ok]
    p90 = [r["latency_ms"].get("p90", 0) for r in ok]
    axes[0].barh(y, p50, color=[colours.get(r.get("variant"), "#777") if r.get("runtime") != "pytorch" else "#999" for r in ok])
    axes[0].errorbar(p50, y, xerr=[np.zeros(len(ok)), np.maximum(0, np.subtract(p90, p50))], fmt="none", ecolor="k", capsize=3, lw=1)
    for i, v in enumerate(p50):
        axes[0].annotate(f" {v:.3f} ms", (v, i), va="center", fontsize=7)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(labels, fontsize=8)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("batch-1 latency, ms, log scale (bar p50, whisker p90)")
    axes[0].set_xscale("log")
    low = max(min([v for v in p50 if v > 0] + [1e-3]) / 3, 1e-4)
    axes[0].set_xlim(low, max(p90 + [1e-3]) * 4)
    asr = [100 * (_rate(r.get("asr")) or 0) for r in ok]
    acc = [100 * (_rate(r.get("clean_acc")) or 0) for r in ok]
    axes[1].barh(y - 0.2, acc, 0.4, color=AFTER_COLOUR, label="clean accuracy")
    axes[1].barh(y + 0.2, asr, 0.4, color=STOP_COLOUR, label="attack success rate")
    axes[1].set_yticks(y)
    axes[1].set_yticklabels([])
    axes[1].invert_yaxis()
    axes[1].set_xlim(0, 105)
    axes[1].set_xlabel("%")
    axes[1].legend(fontsize=8, loc="lower right")
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return to_png(fig)
