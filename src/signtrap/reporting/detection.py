"""Two report sections and the tables behind `benchmarks/detection_bench.py` and `benchmarks/probe_bench.py`:

- "Removed or only hidden?": the re-activation probe (signtrap.probing.reactivation) of every probed defence, with the
  undefended and the zero-poison models as the table's two ends, and the probe curves;
- "Detection": what each detector (Neural Cleanse, STRIP, SCAn) saw, by attack: the flagged class with its
  statistic, or STRIP's detection rate at its measured false-rejection rate, with 95% CIs.

Everything is read from the defence folders (report.json, probe.json); nothing is recomputed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from signtrap.config import RunConfig
from signtrap.plugins import DEFENCES
from signtrap.probing.reactivation import HEADERS as PROBE_HEADERS
from signtrap.probing.reactivation import pool, table_rows
from signtrap.reporting import figures as fig
from signtrap.reporting.blocks import Img, Note, P, Section, Table, safe
from signtrap.runs import layout

ATTACKS = ("all-to-one", "source-specific, cover", "source-specific, no cover", "zero poison")


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def attack_label(cfg: RunConfig | None) -> str:
    """Which column of the detection table a run belongs to."""
    if cfg is None:
        return "unknown"
    a = cfg.attack
    if a.kind == "none" or (a.poison_count == 0) or (a.poison_count is None and a.poison_rate == 0):
        return "zero poison"
    if a.kind == "all_to_one":
        return "all-to-one"
    return "source-specific, cover" if a.cover_rate > 0 else "source-specific, no cover"


# ---------------------------------------------------------------- detection


def detector_outcome(run_dir: Path, method: str, target: int) -> dict | None:
    """What `method` saw on this run, from RUN/defence-METHOD/report.json; None when it did not run. `target` (the
    attack's) only picks which class's statistic to show."""
    rep = _read(layout.defence_dir(run_dir, method) / layout.REPORT_JSON)
    if rep is None:
        return None
    outcome = DEFENCES.get(method).detects(rep.get("details") or {}, target)
    return None if outcome is None else {"method": method, **outcome}


def detectors() -> list[str]:
    """Every registered defence that reports a detection outcome (`@DEFENCE.detection`), by name."""
    return [name for name in DEFENCES.names() if DEFENCES.get(name).detects is not None]


def _rate(entry: dict) -> str:
    if entry.get("rate") is None:
        return "n/a"
    lo, hi = entry["ci95"]
    return f"{100 * entry['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({entry['k']}/{entry['n']})"


def detection_cell(outcomes: list[dict]) -> str:
    """One table cell over the runs (seeds) of one attack."""
    if not outcomes:
        return "not run"
    if "detection" in outcomes[0]:  # an input filter: the share of triggered inputs it rejects
        det, frr = pool([o["detection"] for o in outcomes]), pool([o["frr"] for o in outcomes])
        cell = f"detects {_rate(det)} at FRR {_rate(frr)}"
        if all(o.get("roc_detection") for o in outcomes):  # the ROC point at the target FRR measured on the test images
            roc, roc_frr = pool([o["roc_detection"] for o in outcomes]), pool([o["roc_frr"] for o in outcomes])
            cell += f"; at a measured FRR of {_rate(roc_frr)}: {_rate(roc)}"
        return cell
    runs = len(outcomes)
    flags: dict[int, int] = {}
    for o in outcomes:
        for c in o["flagged"]:
            flags[c] = flags.get(c, 0) + 1
    name = outcomes[0]["statistic"]
    target = [o["target_value"] for o in outcomes if isinstance(o.get("target_value"), (int, float))]
    target_text = f"{name} of class {outcomes[0]['target']}: " + ", ".join(f"{v:.2f}" for v in target) if target else ""
    if not flags:
        return f"flags nothing ({runs} run{'s' * (runs > 1)}; {target_text})"
    flagged = ", ".join(f"{c} in {n}/{runs}" for c, n in sorted(flags.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"flags {flagged} ({target_text})"


def detection_table(run_dirs: list[Path], cfgs: list[RunConfig | None]) -> tuple[list[str], list[list[str]]]:
    """Detector x attack over runs (several seeds of one attack share a column)."""
    by_attack: dict[str, list[tuple[Path, int]]] = {}
    for run_dir, cfg in zip(run_dirs, cfgs):
        by_attack.setdefault(attack_label(cfg), []).append((Path(run_dir), cfg.attack.target if cfg is not None else 7))
    columns = [a for a in ATTACKS if a in by_attack] + [a for a in by_attack if a not in ATTACKS]
    rows = []
    for method in detectors():
        outcomes = {a: [o for o in (detector_outcome(r, method, t) for r, t in by_attack[a]) if o is not None] for a in columns}
        if not any(outcomes.values()):
            continue
        rows.append([method] + [detection_cell(outcomes[a]) for a in columns])
    return ["detector"] + [f"{a} ({len(by_attack[a])} run{'s' * (len(by_attack[a]) > 1)})" for a in columns], rows


DETECTION_NOTE = ("Neural Cleanse and SCAn flag classes (Neural Cleanse: anomaly index > 2; SCAn: J* > e^2 = 7.39); STRIP rejects "
                  "inputs: its detection rate is the share of the attack's triggered inputs rejected at the threshold fitted to a "
                  "5% false-rejection rate on the defender's clean data, and FRR is the rate measured on clean test images. "
                  "95% Wilson intervals, counts pooled over runs.")


def detection_section(run) -> Section:
    s = Section("detection", "Detection: which detectors see this backdoor?")
    headers, rows = detection_table([run.dir], [run.cfg])
    if not rows:
        s.blocks.append(Note("No detector ran on this model (no defence-neural-cleanse, defence-strip or defence-scan folder): "
                             "run `signtrap defend RUN --method scan` (or neural-cleanse, strip)."))
        return s
    s.blocks.append(Table(headers, rows))
    s.blocks.append(P(DETECTION_NOTE + " `benchmarks/detection_bench.py` prints this table over attacks and seeds: the "
                      "all-to-one backdoor is what Neural Cleanse and STRIP were built for; a source-specific backdoor trained "
                      "with cover images is not (Tang et al. 2021), and SCAn was built for it."))
    return s


# ---------------------------------------------------------------- the probe


def probe_records(run_dir: Path) -> list[dict]:
    """The probe records of every defence folder that holds one (probe.json)."""
    records = []
    for folder in layout.defence_dirs(run_dir):
        rec = _read(folder / "probe.json")
        if rec and isinstance(rec.get("model"), dict) and isinstance(rec.get("verdict"), dict):
            records.append(rec)
    return records


def probe_section(run) -> Section:
    s = Section("probe", "Removed or only hidden? The re-activation probe")
    records = probe_records(run.dir)
    for folder in layout.defence_dirs(run.dir):
        skipped = (_read(folder / "report.json") or {}).get("probe_skipped")
        if isinstance(skipped, str):
            s.blocks.append(Note(f"{folder.name}: the re-activation probe was not run: {skipped}."))
    if not records:
        s.blocks.append(Note("No defence was probed (no probe.json in a defence folder): `signtrap defend` probes every "
                             "defence that returns a model unless defend.probe.enabled=false; `signtrap probe RUN/defence-METHOD` "
                             "probes one."))
        return s
    r0 = records[0]
    if all(r.get("trained") is False for r in records):
        s.blocks.append(P("No probe was trained: before any probe, every repaired model's held-out ASR was already more than "
                          "the margin above the zero-poison model's, which decides the verdict (persists) whatever a probe "
                          f"would do. `defend.probe.always=true` trains the probes anyway (k={r0['k']} poisoned images added to "
                          f"the defender's {r0['budget_images']} clean ones, ~{r0['settings']['steps']} steps)."))
    else:
        s.blocks.append(P(f"Each repaired model was fine-tuned on the defender's {r0['budget_images']} clean images plus k={r0['k']} "
                          f"poisoned ones (~{r0['settings']['steps']} steps at the defence's learning rate); the identical probe ran on "
                          "the undefended model and on the zero-poison model of the same config. A defence whose model re-learns the "
                          "backdoor no faster than the zero-poison model removed it; one whose ASR jumps back far above it only hid it."))
    s.blocks.append(Table(PROBE_HEADERS, table_rows(records),
                          highlight=[i for i, row in enumerate(table_rows(records)) if row[-1] == "hidden"]))
    s.blocks.append(P(r0["rule"] + "."))
    for r in records:
        untrained = f" The probe was {r['note']}." if r.get("trained") is False and r.get("note") else ""
        s.blocks.append(P(f"{r['label']}: {r['verdict']['verdict']}: {r['verdict']['reason']}.{untrained}"))
    if not any(r.get("curves") for r in records):
        return s  # every verdict was decided before the probe: no curve to draw
    png = safe(s, "the probe curves", probe_figure, records)
    if png:
        s.blocks.append(Img("probe_curves", png, "ASR on the monitor split during the probe: each probed defence (colours), the "
                                                  "undefended model (black) and the zero-poison model (grey, dashed)."))
    return s


def probe_figure(records: list[dict]) -> bytes:
    p = fig.plt()
    figure, ax = p.subplots(figsize=(7, 3.8), dpi=100)
    colours = p.rcParams["axes.prop_cycle"].by_key()["color"]

    def line(rows: list[dict], **style: Any) -> None:
        pts = [(r["epoch"], 100 * r["asr"]) for r in rows if isinstance(r.get("asr"), (int, float))]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, **style)

    seen = set()
    for i, r in enumerate(records):
        curves = r.get("curves") or {}
        line(curves.get("model") or [], color=colours[i % len(colours)], label=r["label"])
        lr = r["settings"]["lr"]
        if lr not in seen:  # the zero-poison model at this defence's learning rate
            seen.add(lr)
            line(curves.get("reference") or [], color="grey", linestyle="--", label=f"zero-poison (lr {lr:g})")
        ends_lr = (r.get("ends") or {}).get("lr")  # none when the verdict was decided before the probe
        if ends_lr is not None and ("ends", ends_lr) not in seen:
            seen.add(("ends", ends_lr))
            line(curves.get("backdoored") or [], color="black", label=f"undefended (lr {ends_lr:g})")
    ax.set_xlabel("probe epoch (0: before)")
    ax.set_ylabel("ASR, %")
    fig.percent_axis(ax, legend_fontsize=7)
    figure.tight_layout()
    return fig.to_png(figure)
