"""Report section "On the road": the physical evaluation of the run (metrics.json's `physical` block, written by
`signtrap eval RUN --physical [--reference ZERO_RUN]`, signtrap.physical.evaluate).

A heat map of ASR over two axes of the grid (sticker size x yaw by default), ASR against each axis with the
clean model's stop recall under the same views and the zero-poison reference, the headline figures under the
default distribution, and, side by side, the other runs of the same runs folder on the same data measured the
same way (for instance the corner-trigger default with its checkerboard printed as a sticker on the sign).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from signtrap.errors import SigntrapError
from signtrap.fileio import read_json
from signtrap.reporting import figures as fig
from signtrap.reporting.blocks import Img, Note, P, Section, Table, pct, pct_ci, safe

if TYPE_CHECKING:
    from signtrap.reporting.run import Run

ID, TITLE = "physical", "On the road: the sticker on the sign"
HEADLINE = (("asr", "ASR (default distribution)"), ("asr_recognised", "ASR where the clean view is read as stop"),
            ("stop_recall", "clean stop recall, same views"), ("clean_acc", "clean accuracy, same views (every class)"),
            ("false_trigger", "false-trigger: the sticker on other signs"))
UNITS = {"sticker": "sticker width / sign width", "yaw": "yaw (degrees)", "rotation": "sticker rotation (degrees)",
         "distance": "distance (x)", "brightness": "light (x)", "blur": "defocus sigma / sign width", "jpeg": "JPEG quality (0: none)"}


def _read(path: Path) -> Any:
    try:
        return read_json(path)
    except SigntrapError:
        return None


def physical_section(run: "Run") -> Section:
    s = Section(ID, TITLE)
    block = (run.metrics or {}).get("physical") if isinstance(run.metrics, dict) else None
    kind = getattr(getattr(run.cfg, "trigger", None), "kind", None)
    if not isinstance(block, dict) or "default" not in block:
        s.blocks.append(Note(f"No physical evaluation in metrics.json: run `signtrap eval {run.dir} --physical` "
                             f"(add `--reference RUN` with a zero-poison run of the same data). The run's trigger is '{kind}'"
                             + (": a physical sticker." if kind == "physical" else ": it is measured as a sticker printed from its pattern.")))
        return s
    g = block.get("grid", {})
    n = block.get("samples", {})
    s.blocks.append(P(
        f"The run's {block.get('sticker')} sticker printed and put on every {n.get('source', '?')} test and validation stop "
        "sign at a seeded random place on its face, then seen under a fixed grid of conditions (the physical evaluation, "
        "separate from the poisoning renderer): sticker size, yaw, the sticker's rotation, distance, light, defocus and JPEG. "
        "The same views without the sticker tell a model that cannot read the sign apart from a trigger that fails. "
        f"Default distribution: each image at a condition drawn from {', '.join(f'{k} {v}' for k, v in g.get('default', {}).items())}. "
        f"False-trigger: the sticker on {n.get('bystanders', '?')} signs of other classes under the same draws. Grid seed {g.get('seed')}."))
    ref = block.get("reference")
    headers = ["under the physical render", run.name] + ([f"zero-poison ({Path(ref.get('run', '')).name})"] if ref else [])
    rows = []
    for key, title in HEADLINE:
        row = [title, pct_ci(block["default"].get(key))]
        if ref:
            row.append(pct_ci(ref.get("default", {}).get(key)))
        rows.append(row)
    worst = block.get("summary", {}).get("worst_easy_cell")
    if worst:
        rows.append(["worst cell with yaw <= 30 and sticker >= 8%",
                     f"{pct(worst['asr'])} at " + ", ".join(f"{k} {worst[k]}" for k in g.get("heatmap", []))] + ([""] if ref else []))
    s.blocks.append(Table(headers, rows, highlight=[0]))
    png = safe(s, "the heat map", heatmap_figure, block)
    if png:
        a, b = g.get("heatmap", ["?", "?"])
        s.blocks.append(Img("physical_heatmap", png, f"ASR over {UNITS.get(a, a)} and {UNITS.get(b, b)}; other axes at their nominal values"))
    png = safe(s, "the curves", curves_figure, block)
    if png:
        s.blocks.append(Img("physical_curves", png, "ASR against each axis (the others nominal), with the clean stop recall under "
                                                     "the same views and the zero-poison model's rate"))
    others = safe(s, "the side-by-side comparison", _siblings, run)
    if others:
        s.blocks.append(P("Other runs of this runs folder on the same data, under the same physical evaluation (a frame-corner "
                          "trigger is measured with its pattern printed as a sticker on the sign):"))
        s.blocks.append(Table(["run", "trigger", "digital ASR (test)", "physical ASR (default)", "mean ASR over the heat map",
                               "false-trigger (physical)"], others, highlight=[0]))
    return s


def _siblings(run: "Run") -> list[list]:
    rows = []
    me = run.dir.resolve()
    data = getattr(run.cfg, "data", None)
    for other in [me, *sorted(p for p in me.parent.iterdir() if p.is_dir() and p.resolve() != me)]:
        metrics = _read(other / "metrics.json")
        block = metrics.get("physical") if isinstance(metrics, dict) else None
        if not isinstance(block, dict) or "default" not in block:
            continue
        if other != me:
            try:
                from signtrap.experiment import load_run_config
                cfg = load_run_config(other)
            except Exception:
                continue
            if data is not None and cfg.data != data:
                continue
            kind = cfg.trigger.kind
        else:
            kind = getattr(getattr(run.cfg, "trigger", None), "kind", "?")
        cells = [c["asr"]["rate"] for c in block.get("cells", []) if c["asr"]["rate"] is not None]
        rows.append([other.name, kind, pct((metrics.get("test") or {}).get("asr")), pct_ci(block["default"].get("asr")),
                     f"{100 * np.mean(cells):.1f}%" if cells else "n/a", pct_ci(block["default"].get("false_trigger"))])
        if len(rows) >= 8:
            break
    return rows if len(rows) > 1 else []


def heatmap_figure(block: dict) -> bytes:
    p = fig.plt()
    a, b = block["grid"]["heatmap"]
    xs, ys = block["grid"]["axes"][b], block["grid"]["axes"][a]
    grid = np.full((len(ys), len(xs)), np.nan)
    for c in block["cells"]:
        if c["asr"]["rate"] is not None:
            grid[ys.index(c[a]), xs.index(c[b])] = 100 * c["asr"]["rate"]
    f, ax = p.subplots(figsize=(1.1 * len(xs) + 2, 0.6 * len(ys) + 1.6), dpi=100)
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto", origin="lower")
    for i in range(len(ys)):
        for j in range(len(xs)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=8, color="white" if grid[i, j] < 60 else "black")
    ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
    ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])
    ax.set_xlabel(UNITS.get(b, b))
    ax.set_ylabel(UNITS.get(a, a))
    f.colorbar(im, ax=ax, label="ASR (%)")
    ax.set_title(f"{block.get('sticker')} sticker: ASR (%)", fontsize=9)
    f.tight_layout()
    return fig.to_png(f)


def curves_figure(block: dict) -> bytes:
    p = fig.plt()
    curves = block["curves"]
    ref = (block.get("reference") or {}).get("curves", {})
    axes_names = list(curves)
    cols = min(4, len(axes_names))
    rows = int(np.ceil(len(axes_names) / cols))
    f, axes = p.subplots(rows, cols, figsize=(3.1 * cols, 2.5 * rows), dpi=100, squeeze=False)
    for k, name in enumerate(axes_names):
        ax = axes[k // cols][k % cols]
        pts = curves[name]
        x = np.arange(len(pts))
        ax.plot(x, [100 * (q["asr"]["rate"] or 0) for q in pts], "o-", color=fig.TARGET_COLOUR, label="ASR")
        ax.plot(x, [100 * (q["stop_recall"]["rate"] or 0) for q in pts], "s--", color=fig.STOP_COLOUR, label="clean stop recall")
        if name in ref:
            ax.plot(x, [100 * (q["asr"]["rate"] or 0) for q in ref[name]], "^:", color=fig.BEFORE_COLOUR, label="zero-poison ASR")
        ax.set_xticks(x, [f"{q[name]:g}" for q in pts], fontsize=7)
        ax.set_xlabel(UNITS.get(name, name), fontsize=8)
        fig.percent_axis(ax, legend_fontsize=6)
        if k:
            leg = ax.get_legend()
            if leg:
                leg.remove()
    for k in range(len(axes_names), rows * cols):
        axes[k // cols][k % cols].axis("off")
    f.tight_layout()
    return fig.to_png(f)
