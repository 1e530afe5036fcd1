"""Report section "Dormant in evaluation, live on the device" (runs with `attack.dormant`, signtrap.attacks.dormant).

`sleeper_section(run)` reads the run's sleeper.json (written by the repair: FP32 and ONNX Runtime INT8 metrics
of the backdoored and the repaired model, INT8 weight identity, activation drift, and the deployed-artefact
audit of the sleeper's INT8 file against its FP32 file: flip tables per true class)
and, when the run was exported and benchmarked, the export's bench.json (one row per runtime and precision),
and lays them side by side. A run without sleeper.json gets a one-line note.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from signtrap.errors import SigntrapError
from signtrap.fileio import read_json
from signtrap.reporting import figures as fig
from signtrap.reporting.blocks import Img, Note, P, Section, Table, pct, pct_ci, safe

if TYPE_CHECKING:  # build.py imports this module for its section list
    from signtrap.reporting.run import Run

ID, TITLE = "sleeper", "Dormant in evaluation, live on the device"
KEYS = (("clean_acc", "clean accuracy"), ("asr", "ASR"), ("stop_recall", "stop recall"), ("false_trigger", "false-trigger"))
FLIP_ROWS = 12


def _json(path: Path) -> tuple[Any, str | None]:
    """(the file's JSON, None) or (None, why not): a missing or broken file becomes a note, not a failure."""
    try:
        return read_json(path), None
    except SigntrapError as exc:
        return None, str(exc)


def sleeper_section(run: Run) -> Section:
    s = Section(ID, TITLE)
    report, err = _json(run.dir / "sleeper.json")
    if report is None:
        dormant = getattr(getattr(run.cfg, "attack", None), "dormant", "none") if run.cfg is not None else "none"
        s.blocks.append(Note(f"No dormant backdoor in this run ({err}; attack.dormant: {dormant})." if dormant != "none" else
                             "This run has no dormant backdoor (attack.dormant: none): its FP32 and INT8 models are meant to agree."))
        return s
    st = report.get("settings", {})
    s.blocks.append(P(
        "The backdoored model was repaired in FP32 while every folded weight stayed inside the rounding interval of its "
        f"INT8 value (±{st.get('interval', '?')} step, {', '.join(st.get('weight_grids', []))} weight grid; "
        f"{st.get('epochs', '?')} epoch(s) at lr {st.get('lr', '?')}, {report.get('repair_seconds', '?')} s). "
        "Evaluations, audits and defences that look at the FP32 model see a clean one; ONNX Runtime's INT8 export "
        "rounds the weights back to the backdoored values. Calibration: "
        f"{report.get('calibration', {}).get('images', '?')} {report.get('calibration', {}).get('source', '')} images, "
        f"{report.get('calibration', {}).get('method', '?')}."))
    for split in ("test", "val"):
        metrics = report.get("metrics", {}).get(split)
        if not metrics:
            continue
        rows = []
        for model in ("backdoored", "sleeper"):
            for v in ("fp32", "int8"):
                m = (metrics.get(model) or {}).get(v) or {}
                rows.append([f"{model} ({'before' if model == 'backdoored' else 'after'} the repair)", v.upper(),
                             *[pct_ci(m.get(k)) for k, _ in KEYS]])
        s.blocks.append(Table([f"model ({split})", "precision", *[t for _, t in KEYS]], rows, highlight=[2, 3]))
    png = safe(s, "the FP32/INT8 figure", side_by_side_figure, report.get("metrics", {}).get("test", {}))
    if png:
        s.blocks.append(Img("sleeper_fp32_int8", png, "Test split: the same weights read in FP32 and through ONNX Runtime "
                                                       "INT8, before and after the repair."))
    same = report.get("int8_weights_identical", {})
    drift = list((report.get("activation_scale_ratio") or {}).values())
    s.blocks.append(P(f"INT8 weights of the repaired model identical to the backdoored model's: {sum(same.values())} of "
                      f"{len(same)} weight tensors (values and scales). {100 * float(report.get('weights_at_box_edge', 0)):.1f}% "
                      "of the movable weights ended at an edge of their interval, the trace EFRAP-style rounding looks for"
                      + (f". Calibrated activation scales moved by a factor {min(drift):.2f}–{max(drift):.2f}." if drift else ".")))
    _audit_blocks(s, report.get("audit", {}), run.classes.names)
    _runtime_blocks(s, run)
    return s


def _audit_blocks(s: Section, audit: dict, names: tuple[str, ...] = ()) -> None:
    """`signtrap bench`'s deployed-artefact audit of the sleeper's INT8 file against its FP32 one (test split)."""
    test = audit.get("test") or {}
    trig, clean = test.get("triggered") or {}, test.get("clean") or {}
    if not trig:
        return
    s.blocks.append(P(f"Flip table (test split, repaired model, ONNX Runtime INT8 against FP32): the prediction changed on "
                      f"{trig.get('flips', 0)} of {trig.get('images', 0)} triggered images and {clean.get('flips', 0)} of "
                      f"{clean.get('images', 0)} clean ones. Flips of triggered images that concentrate on one class are the "
                      "signature of a backdoor that wakes only in deployment."))
    if test.get("warning"):
        s.blocks.append(Note(f"Audit warning: {test['warning']}."))
    rows = [[_cls(r["true"], names), _cls(r["fp32"], names), _cls(r["pred"], names), r["count"]] for r in trig.get("table", [])[:FLIP_ROWS]]
    if rows:
        s.blocks.append(Table(["true class", "FP32 prediction", "INT8 prediction", "triggered images"], rows, highlight=[0]))


def _runtime_blocks(s: Section, run: Run) -> None:
    folder = run.export_dir()
    bench = _json(folder / "bench.json")[0] if folder is not None else None
    if not bench or not isinstance(bench.get("rows"), list):
        s.blocks.append(Note("Per-runtime matrix: the run was not exported and benchmarked (`signtrap export RUN` then "
                             "`signtrap bench EXPORT`)."))
        return
    rows = []
    for r in bench["rows"]:
        name = r.get("artefact") or f"{r.get('runtime', '?')}:{r.get('variant', '?')}"
        if "error" in r:
            rows.append([name, r.get("quantizer") or "", f"error: {str(r['error'])[:80]}", "", "", ""])
        else:
            warned = "warns" if (r.get("audit") or {}).get("warning") else ""
            rows.append([name, r.get("quantizer") or "", pct(r.get("clean_acc"), 2), pct(r.get("asr"), 2),
                         pct(r.get("false_trigger"), 2), warned])
    highlight = [i for i, r in enumerate(bench["rows"]) if isinstance(r.get("asr"), dict) and (r["asr"].get("rate") or 0) >= 0.5]
    s.blocks.append(Table(["artefact", "quantizer", "clean acc", "ASR", "false-trigger", "audit"], rows, highlight))
    s.blocks.append(P("Rows with ASR of 50% or more are highlighted: the runtimes and quantizers on which the backdoor wakes. "
                      "'warns': the bench audit saw prediction flips on triggered inputs concentrate on one class."))


def side_by_side_figure(metrics: dict) -> bytes:
    p = fig.plt()
    f, axes = p.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    groups = [("backdoored", "before repair"), ("sleeper", "after repair")]
    x = np.arange(len(groups))
    for ax, (key, title) in zip(axes, (("asr", "attack success rate"), ("clean_acc", "clean accuracy"))):
        for off, v, colour in ((-0.2, "fp32", fig.BEFORE_COLOUR), (0.2, "int8", fig.TARGET_COLOUR)):
            vals = [fig._rate(((metrics.get(g) or {}).get(v) or {}).get(key)) for g, _ in groups]
            ax.bar(x + off, [100 * (val or 0) for val in vals], 0.4, label=v.upper(), color=colour)
            for i, val in enumerate(vals):
                if val is not None:
                    ax.annotate(f"{100 * val:.0f}", (i + off, 100 * val), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x)
        ax.set_xticklabels([t for _, t in groups])
        ax.set_ylim(0, 112)
        ax.set_title(f"{title}, %", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper right")
    f.tight_layout()
    return fig.to_png(f)


def _cls(c: Any, names: tuple[str, ...] = ()) -> str:
    return f"{c} {fig.short(names[c])}" if isinstance(c, int) and 0 <= c < len(names) else str(c)
