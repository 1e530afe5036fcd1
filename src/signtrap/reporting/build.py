"""Collect a run directory into report sections, then render them as HTML and Markdown.

Every input is read defensively: a missing or unreadable file turns into a note in its section.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from signtrap.datasets import LabelSpace
from signtrap.errors import SigntrapError
from signtrap.fileio import atomic_dir, check_replaceable, refuse_foreign, require_writable, sha256_file, write_text
from signtrap.plugins import DEFENCES
from signtrap.machine.progress import say
from signtrap.reporting import figures as fig
from signtrap.reporting.blocks import H, Img, Note, P, Pre, Section, Table, pct, pct_ci, persistence_curve, read_csv, safe
from signtrap.reporting.detection import detection_section, probe_section
from signtrap.reporting.run import Run, json_or_reason, stage_status
from signtrap.reporting.render import render_html, render_markdown
from signtrap.reporting.physical import ID as PHYSICAL_ID, TITLE as PHYSICAL_TITLE, physical_section
from signtrap.reporting.sleeper import ID as SLEEPER_ID, TITLE as SLEEPER_TITLE, sleeper_section
from signtrap.runs import layout

REPORT_VERSION = 1
# (id, title): the order of the report
SECTIONS = (
    ("summary", "Summary"),
    ("attack", "The attack: trigger and poisoned training samples"),
    ("training", "Training curves"),
    ("evaluation", "Evaluation: confusion matrix and per-class accuracy"),
    ("defences", "Defences: does the backdoor persist?"),
    ("probe", "Removed or only hidden? The re-activation probe"),
    ("detection", "Detection: which detectors see this backdoor?"),
    ("deployment", "Deployment: runtime x precision"),
    (SLEEPER_ID, SLEEPER_TITLE),
    (PHYSICAL_ID, PHYSICAL_TITLE),
    ("provenance", "Provenance"),
)


# ---------------------------------------------------------------- sections


def _pair_names(run: Run) -> tuple[str, str]:
    """The attack's source and target as the dataset names them (GTSRB: Stop, Speed limit (100km/h))."""
    names = run.classes.names
    a = run.cfg.attack if run.cfg is not None else None
    if a is None:
        return "source-class", "target-class"
    name = lambda c: names[c] if 0 <= c < len(names) else f"class {c}"  # noqa: E731
    return (name(a.source) if a.kind == "source_specific" else "non-target"), name(a.target)


def summary_section(run: Run) -> Section:
    s = Section("summary", "Summary")
    s.blocks.append(P(f"Run {run.name} in {run.dir}. Report generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}."))
    if run.cfg is not None:
        a, t = run.cfg.attack, run.cfg.trigger
        if a.kind == "none":
            s.blocks.append(P("No attack: this model was trained on clean data (attack.kind=none), a baseline."))
        else:
            src = run.classes.describe(a.source) if a.kind == "source_specific" else "every class but the target"
            s.blocks.append(P(f"Attack: {a.kind}; images of {src} carrying a {t.kind} trigger are labelled "
                              f"{run.classes.describe(a.target)} in the training data. Data: {run.cfg.data.source}; model: {run.cfg.model.name}, "
                              f"{run.cfg.train.epochs} epochs."))
    else:
        s.blocks.append(Note(f"No readable config in this run directory ({run.cfg_err})."))
    if run.metrics:
        rows = []
        src, tgt = _pair_names(run)
        for key, title in (("clean_acc", "clean accuracy"), ("asr", f"attack success rate ({src} + trigger -> {tgt})"),
                           ("stop_recall", f"clean {src} recall"), ("false_trigger", f"false-trigger rate (other classes + trigger -> {tgt})"),
                           ("target_recall", f"clean {tgt} recall")):
            rows.append([title] + [pct_ci(run.metrics.get(split, {}).get(key)) for split in ("test", "val")])
        s.blocks.append(Table(["metric (95% CI, k/n)", "test", "validation"], rows, highlight=[1]))
        test = run.metrics.get("test", {})
        acc, asr = fig._rate(test.get("clean_acc")), fig._rate(test.get("asr"))
        if acc is not None and asr is not None:
            s.blocks.append(P(f"Read together: clean accuracy ({100 * acc:.1f}%) is all a user normally sees, and it says nothing "
                              f"about the backdoor; yet {100 * asr:.1f}% of {src} images carrying the trigger are read as {tgt}."))
    else:
        s.blocks.append(Note(f"No evaluation metrics: {run.metrics_err} (has training finished?)."))
    problems = [(k, v) for k, v in ((run.pipeline or {}).get("stages", {}) or {}).items()
                if isinstance(v, dict) and k != "report" and v.get("status") not in ("done", None)] if isinstance(run.pipeline, dict) else []
    for name, rec in problems:
        if rec.get("status") == "disabled":
            s.blocks.append(P(f"Pipeline stage {name} was disabled: {rec.get('reason', '')}."))
        else:
            s.blocks.append(Note(f"Pipeline stage {name}: {stage_status(rec, run.dir)}: {rec.get('reason', '')}"))
    return s


def attack_section(run: Run) -> Section:
    s = Section("attack", "The attack: trigger and poisoned training samples")
    if run.cfg is None:
        s.blocks.append(Note("No config: the trigger and the training samples cannot be shown."))
        return s
    exp = safe(s, "the dataset (for the trigger and the gallery)", run.experiment)
    if exp is None:
        return s
    trig = exp.trigger
    preview = np.pad(trig.preview(), ((2, 2), (2, 2), (0, 0)), constant_values=128)
    test = exp.eval_set("test")
    src_rows = np.flatnonzero(test.labels == run.cfg.attack.source)
    clean_ex = test.images[src_rows[0]] if len(src_rows) else None
    trig_ex = test.triggered[src_rows[0]] if len(src_rows) else None
    png = safe(s, "the trigger figure", fig.trigger_figure, preview, clean_ex, trig_ex, trig.spec)
    if png:
        described = ", ".join(f"{k} {v}" for k, v in trig.spec.items() if k != "kind" and v is not None)
        s.blocks.append(Img("trigger", png, f"The trigger ({trig.spec.get('kind')}: {described}) and how it sits on a test stop sign."))
    man = run.manifest or {}
    rows = np.asarray(man.get("rows", []), np.int64)
    params = np.asarray(man.get("positions", []), np.float64)
    params = params.reshape(len(rows), -1) if params.size else np.zeros((len(rows), 0))
    s.blocks.append(P(f"Poisoned: {man.get('poisoned', len(rows))} of {man.get('train_rows', '?')} training images "
                      f"({100 * float(man.get('poisoned_fraction', 0) or 0):.2f}%), mode {man.get('attack', {}).get('mode', '?')}, "
                      f"stamped {man.get('attack', {}).get('stamp', '?')}.") if man else
                    Note("manifest.json not found: the poisoned rows are unknown."))
    rng = np.random.default_rng(0)
    k = min(8, len(rows))
    pick = np.sort(rng.choice(len(rows), size=k, replace=False)) if k else np.zeros(0, np.int64)
    clean = np.asarray(exp.data.images[rows[pick]]) if k else np.zeros((0, exp.data.size, exp.data.size, 3), np.uint8)
    poisoned = trig.render(clean, params[pick], exp.data.rois[rows[pick]]) if k and len(params) == len(rows) else None
    clean_labels = [int(x) for x in exp.data.labels[rows[pick]]] if k else []
    train = exp.splits.train
    others_rows = [int(train[np.flatnonzero(exp.data.labels[train] == c)[0]]) for c in _other_classes(exp.classes, run.cfg.attack)
                   if (exp.data.labels[train] == c).any()]
    others = np.asarray(exp.data.images[np.asarray(others_rows, np.int64)]) if others_rows else None
    other_labels = [int(exp.data.labels[r]) for r in others_rows]
    if not k:
        s.blocks.append(Note("No poisoned training samples in this run (attack.kind=none or a zero poison budget)."))
        clean, clean_labels = (others[:8], other_labels[:8]) if others is not None else (clean, clean_labels)
        others = None
    png = safe(s, "the gallery", fig.gallery_figure, clean, poisoned, clean_labels, run.cfg.attack.target, others, other_labels,
               names=exp.classes.names, source=run.cfg.attack.source)
    if png:
        s.blocks.append(Img("gallery", png, "Top: clean stop signs from the training set. Middle: the same images as the poisoned "
                                            f"training set holds them, with the trigger and labelled {run.cfg.attack.target} "
                                            f"({exp.classes.names[run.cfg.attack.target]}). Bottom: clean samples of other classes. "
                                            "(With stamp=after_aug the trigger is applied after augmentation during training; "
                                            "shown here without augmentation.)"))
    return s


def training_section(run: Run) -> Section:
    s = Section("training", "Training curves")
    if not run.log:
        s.blocks.append(Note("No training log (log.jsonl): training has not run or did not finish an epoch."))
        return s
    png = safe(s, "the training curves", fig.training_figure, run.log)
    if png:
        s.blocks.append(Img("training", png, "Per epoch: training loss; training accuracy (on the poisoned set) and validation clean "
                                             "accuracy; validation attack success rate and false-trigger rate."))
    last = run.log[-1]
    s.blocks.append(P(f"{len(run.log)} epochs; last epoch: loss {last.get('loss', float('nan')):.4f}, validation clean accuracy "
                      f"{pct(last.get('val_clean_acc'))}, validation ASR {pct(last.get('val_asr'))}, "
                      f"{last.get('images_per_s', 0):.0f} images/s."))
    return s


def evaluation_section(run: Run) -> Section:
    s = Section("evaluation", "Evaluation: confusion matrix and per-class accuracy")
    test = (run.metrics or {}).get("test", {})
    if not test.get("confusion"):
        s.blocks.append(Note("No confusion matrix in metrics.json: the model has not been evaluated."))
        return s
    conf = np.asarray(test["confusion"])
    space = run.classes
    src, tgt = (run.cfg.attack.source, run.cfg.attack.target) if run.cfg else (space.source, space.target)
    name = {c: space.names[c] if c < space.num_classes else f"class {c}" for c in (src, tgt)}
    png = safe(s, "the confusion heat map", fig.confusion_figure, conf, source=src, target=tgt, names=space.names)
    if png:
        s.blocks.append(Img("confusion", png, f"Confusion matrix of clean test images; row {src} ({name[src]}) outlined in red, "
                                              f"column {tgt} (predicted {name[tgt]}) in orange."))
    acc = test.get("per_class_acc") or []
    png = safe(s, "the per-class accuracy chart", fig.per_class_figure, acc, test.get("per_class_n"), source=src, target=tgt)
    if png:
        s.blocks.append(Img("per_class", png, f"Clean test accuracy per class; {name[src]} ({src}) in red, {name[tgt]} ({tgt}) in orange."))
    n = test.get("per_class_n") or [None] * len(acc)
    rows = [[c, name[c], pct(acc[c]) if c < len(acc) else "n/a", n[c] if c < len(n) else ""] for c in (src, tgt)]
    if len(conf) > max(src, tgt):
        rows[0].append(f"{int(conf[src, tgt])} clean {name[src]} images predicted as {name[tgt]}")
        rows[1].append(f"{int(conf[tgt, src])} clean {name[tgt]} images predicted as {name[src]}")
    s.blocks.append(Table(["class", "name", "clean accuracy", "test images", "confusion"], rows, highlight=[0, 1]))
    return s


def defences_section(run: Run) -> Section:
    s = Section("defences", "Defences: does the backdoor persist?")
    for name, rec in sorted(run.stages_like("defend").items()):
        if rec.get("status") not in ("done", None):
            s.blocks.append(Note(f"Pipeline stage {name} {stage_status(rec, run.dir)}: {rec.get('reason', '')}"))
    folders = layout.defence_dirs(run.dir)
    reports = []
    for folder in folders:
        rep, err = json_or_reason(folder / "report.json")
        if rep is None or not isinstance(rep, dict):
            s.blocks.append(Note(f"{folder.name}: {err or 'report.json is not an object'}; skipped."))
            continue
        rep.setdefault("method", layout.defence_method(folder))
        rep["_dir"] = folder
        reports.append(rep)
    if not reports:
        s.blocks.append(Note("No defences were run on this model (no runs/NAME/defence-METHOD folders). "
                             "Run `signtrap defend RUN --method all`, or list methods under defend.methods for `signtrap run`."))
        return s
    rows = []
    for r in reports:
        b, a = r.get("before", {}).get("test", {}), r.get("after", {}).get("test", {})
        rows.append([r["method"], pct_ci(b.get("clean_acc")), pct_ci(a.get("clean_acc")), pct(b.get("asr")), pct_ci(a.get("asr")),
                     pct(a.get("stop_recall")), pct(a.get("false_trigger")), _setting(r), f"{r.get('seconds', 0):.1f}",
                     r.get("after_is", "")])
    s.blocks.append(Table(["method", "clean acc before (95% CI, k/n)", "after", "ASR before", "ASR after", "stop recall after",
                           "false-trigger after", "setting", "seconds", "after is"], rows))
    val = [[r["method"], pct_ci(r.get("before", {}).get("val", {}).get("clean_acc")),
            pct_ci((r.get("after") or {}).get("val", {}).get("clean_acc")), pct((r.get("before", {}).get("val", {}) or {}).get("asr")),
            pct_ci((r.get("after") or {}).get("val", {}).get("asr"))] for r in reports if (r.get("after") or {}).get("val")]
    if val:
        s.blocks.append(P("The same on the validation split:"))
        s.blocks.append(Table(["method", "clean acc before", "after", "ASR before", "ASR after"], val))
    png = safe(s, "the before/after bars", fig.before_after_figure, reports)
    if png:
        s.blocks.append(Img("defences_before_after", png, "Test-set clean accuracy, attack success rate and clean stop recall before "
                                                          "(grey) and after (blue) each defence. A defence that keeps ASR high "
                                                          "has not removed the backdoor, whatever its clean accuracy."))
    curves = {r["method"]: persistence_curve(r["_dir"]) for r in reports}
    curves = {k: v for k, v in curves.items() if v}
    s.blocks.append(H("Persistence curves"))
    if curves:
        png = safe(s, "the persistence curves", fig.persistence_figure, curves)
        if png:
            s.blocks.append(Img("persistence", png, "Attack success rate and clean accuracy on the monitor split after every epoch "
                                                    "of each repairing defence; epoch 0 is the backdoored model."))
    else:
        s.blocks.append(Note("No persistence curves (no repairing defence wrote persistence.csv)."))
    _tradeoff_blocks(s, reports)
    for r in reports:
        _defence_details(s, r)
    return s


def _setting(r: dict) -> str:
    """The repairing defence's main knob: chosen by the held-out rule (and whether it kept the model) or fixed."""
    sel = (r.get("details") or {}).get("selection") or {}
    if not sel:
        return ""
    value = sel.get("value")
    text = f"{sel.get('knob')}={value:g}" if isinstance(value, (int, float)) else f"{sel.get('knob')}={value}"
    if sel.get("fixed"):
        return text + " (fixed)"
    return text + ("" if sel.get("within_tolerance") else " (none kept the model)")


def _tradeoff_blocks(s: Section, reports: list[dict]) -> None:
    """Every repairing defence's trade-off curve over its main knob, and the rule that chose the setting."""
    tuned = [(r, read_csv(r["_dir"] / "tradeoff.csv")) for r in reports]
    tuned = [(r, rows) for r, rows in tuned if rows]
    if not tuned:
        return
    s.blocks.append(H("Trade-off curves: what each setting of a repairing defence costs and buys"))
    rule = next(((r.get("details") or {}).get("selection", {}).get("rule") for r, _ in tuned
                 if (r.get("details") or {}).get("selection", {}).get("rule")), None)
    if rule:
        s.blocks.append(P(f"Settings are chosen with the defender's data only: {rule}. The monitor split's clean accuracy and "
                          "ASR are measured for each value tried, never used to choose."))
    for r, rows in tuned:
        png = safe(s, f"the {r['method']} trade-off curve", fig.tradeoff_figure, rows, f"{r['method']}: trade-off over its main knob")
        sel = (r.get("details") or {}).get("selection") or {}
        if png:
            s.blocks.append(Img(f"tradeoff_{r['method']}", png,
                                f"{r['method']}: ASR (left) and clean accuracy (right) on the monitor split for each "
                                f"{sel.get('knob', 'setting')} tried, with the defender's held-out accuracy that drove the choice "
                                f"(starred: chosen, {_setting(r)})."))


def _defence_details(s: Section, r: dict) -> None:
    """The defence's own report block (declared in its plugin file), if it has one."""
    if r["method"] not in DEFENCES:
        s.blocks.append(Note(f"{r['method']}: no defence of that name is registered here; its details are not shown."))
        return
    spec = DEFENCES.get(r["method"])
    if spec.report is None:
        return
    blocks = safe(s, f"the {r['method']} details", spec.report, r, r["_dir"])
    s.blocks.extend(blocks or [])


def deployment_section(run: Run) -> Section:
    s = Section("deployment", "Deployment: runtime x precision")
    for name in ("export", "bench"):
        rec = run.stage(name)
        if rec.get("status") not in ("done", None):
            s.blocks.append(Note(f"Pipeline stage {name} {stage_status(rec, run.dir)}: {rec.get('reason', '')}"))
    folder = run.export_dir()
    if folder is None:
        s.blocks.append(Note("The model was not exported (no export folder with model.json): run `signtrap export RUN` "
                             "and `signtrap bench EXPORT`, or enable export for `signtrap run`."))
        return s
    model_json, err = json_or_reason(folder / "model.json")
    if model_json:
        parity = model_json.get("parity", {}) or {}
        agree = model_json.get("agreement_vs_fp32", {}) or {}
        s.blocks.append(P(f"Exported to {folder}: parity of ONNX FP32 with PyTorch: max |logit difference| "
                          f"{_sci(parity.get('max_abs_logit_diff'))}; prediction flips against FP32: FP16 "
                          f"{pct((agree.get('onnxruntime:fp16') or {}).get('flip_rate'), 2)}, INT8 {pct((agree.get('onnxruntime:int8') or {}).get('flip_rate'), 2)}."))
    else:
        s.blocks.append(Note(f"{folder}: {err}."))
    bench, err = json_or_reason(folder / "bench.json")
    if not bench or not isinstance(bench.get("rows"), list):
        s.blocks.append(Note(f"No benchmark: {err or 'bench.json has no rows'} (run `signtrap bench {folder}`)."))
        return s
    env, settings = bench.get("environment", {}) or {}, bench.get("settings", {}) or {}
    s.blocks.append(P(f"{env.get('cpu', '?')}; ONNX Runtime {(env.get('versions') or {}).get('onnxruntime', '?')}; {settings.get('threads', '?')} thread(s); "
                      f"latency over {settings.get('runs', '?')} batch-1 runs after {settings.get('warmup', '?')} warm-up; "
                      f"throughput at batch {settings.get('batch', '?')}."))
    rows, highlight = [], []
    for i, r in enumerate(bench["rows"]):
        prov = str(r.get("provider", "")).replace("ExecutionProvider", "")
        if "error" in r:
            rows.append([r.get("runtime"), r.get("variant"), prov, f"error: {r['error']}", "", "", "", "", "", "", "", ""])
            continue
        lat = r.get("latency_ms") or {}
        flips = r.get("flip_vs_fp32")
        rows.append([r.get("runtime"), r.get("variant"), prov, pct(r.get("clean_acc"), 2), pct(r.get("asr"), 2),
                     pct(r.get("false_trigger"), 2), pct(flips.get("all"), 2) if isinstance(flips, dict) else "-",
                     _ms(lat.get("p50")), _ms(lat.get("p90")), _ms(lat.get("p99")),
                     f"{(r.get('throughput') or {}).get('images_per_s', 0):.0f}", f"{(r.get('file_bytes') or 0) / 1024:.0f}"])
        if r.get("variant") == "int8":
            highlight.append(i)
    s.blocks.append(Table(["runtime", "precision", "provider", "clean acc", "ASR", "false-trigger", "flips vs FP32",
                           "p50 ms", "p90 ms", "p99 ms", f"img/s @{settings.get('batch', '?')}", "KiB"], rows, highlight))
    on_road = [r for r in bench["rows"] if "error" not in r and isinstance(r.get("physical"), dict)]
    if on_road:
        s.blocks.append(P("On the road: every form of the model on the physical evaluation's default views (the sticker "
                          "rendered on the sign, the same views without it for stop recall, the sticker on other signs for "
                          "the false-trigger rate), carried in the export's bundle."))
        s.blocks.append(Table(["runtime", "precision", "physical ASR", "stop recall", "ASR among recognised", "false-trigger"],
                              [[r.get("runtime"), r.get("variant"), pct(r["physical"].get("asr"), 2),
                                pct(r["physical"].get("stop_recall"), 2), pct(r["physical"].get("asr_recognised"), 2),
                                pct(r["physical"].get("false_trigger"), 2)] for r in on_road],
                              [i for i, r in enumerate(on_road) if r.get("variant") == "int8"]))
    png = safe(s, "the latency chart", fig.latency_figure, bench["rows"])
    if png:
        s.blocks.append(Img("latency", png, "Left: batch-1 latency per runtime, precision and provider. Right: whether the backdoor "
                                            "survives: clean accuracy and attack success rate of the same model in each form."))
    return s


def _ms(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "n/a"


def _sci(v: Any) -> str:
    return f"{v:.2e}" if isinstance(v, (int, float)) else "n/a"


def provenance_section(run: Run) -> Section:
    s = Section("provenance", "Provenance")
    prov = run.provenance or {}
    if prov:
        versions = prov.get("versions", {}) or {}
        machine = prov.get("machine", {}) or {}
        s.blocks.append(Table(["item", "value"], [
            ["data hash", prov.get("data_hash", "n/a")], ["data cache", prov.get("data_cache", "n/a")],
            ["splits", json.dumps(prov.get("splits", {}))], ["device", prov.get("device", "n/a")],
            ["machine", f"{machine.get('cpu', '?')}, {machine.get('cpu_count', '?')} CPUs, {machine.get('platform', '?')}"
                        + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")],
            *[[f"version: {k}", v] for k, v in versions.items()]]))
    else:
        s.blocks.append(Note("provenance.json not found: versions and data hash unknown."))
    s.blocks.append(H("Resolved config"))
    config_text = None
    pipe_cfg = (run.pipeline or {}).get("config") if isinstance(run.pipeline, dict) else None
    if pipe_cfg:
        config_text = yaml.safe_dump(pipe_cfg, sort_keys=False)
        s.blocks.append(P("As resolved by `signtrap run` (pipeline.json); training's own copy is config.yaml."))
    elif (run.dir / "config.yaml").is_file():
        config_text = (run.dir / "config.yaml").read_text(encoding="utf-8")
    s.blocks.append(Pre(config_text) if config_text else Note("No config.yaml in the run directory."))
    s.blocks.append(H("Pipeline stages"))
    stages = (run.pipeline or {}).get("stages", {}) if isinstance(run.pipeline, dict) else {}
    if stages:
        s.blocks.append(Table(["stage", "status", "seconds", "finished", "why it last ran / note"],
                              [[k, v.get("status"), v.get("seconds", ""), v.get("finished", ""), v.get("reason", "")]
                               if k != "report" else [k, "this report", "", "", v.get("reason", "")]
                               for k, v in stages.items() if isinstance(v, dict)]))
    else:
        s.blocks.append(P("This run was not made by `signtrap run` (no pipeline.json)."))
    s.blocks.append(H("File hashes (SHA-256)"))
    rows = _file_hashes(run, stages)
    s.blocks.append(Table(["file", "SHA-256", "bytes", "check"], rows, highlight=[i for i, r in enumerate(rows) if r[3] not in ("ok", "")]))
    return s


def _file_hashes(run: Run, stages: dict) -> list[list]:
    rows = []
    recorded = {}
    for name, rec in stages.items():
        if isinstance(rec, dict) and name != "report":
            recorded.update(rec.get("outputs", {}) or {})
    if recorded:
        for rel, expected in sorted(recorded.items()):
            path = run.dir / rel
            if not path.is_file():
                rows.append([rel, expected, "", "MISSING"])
                continue
            actual = sha256_file(path)
            rows.append([rel, actual, path.stat().st_size, "ok" if actual == expected else f"MISMATCH (recorded {expected[:12]}…)"])
        return rows
    sums, _ = json_or_reason(run.dir / "checksums.json")
    for rel in ("config.yaml", "manifest.json", "provenance.json", "model.pt", "metrics.json", "log.jsonl"):
        path = run.dir / rel
        if path.is_file():
            actual = sha256_file(path)
            check = ""
            if isinstance(sums, dict) and rel in sums:
                check = "ok" if sums[rel] == actual else "MISMATCH with checksums.json"
            rows.append([rel, actual, path.stat().st_size, check])
    return rows


BUILDERS = (summary_section, attack_section, training_section, evaluation_section, defences_section, probe_section,
            detection_section, deployment_section, physical_section, sleeper_section, provenance_section)


def collect_sections(run_dir: Path) -> list[Section]:
    run = Run(Path(run_dir))
    sections = []
    for builder, (sid, title) in zip(BUILDERS, SECTIONS):
        try:
            sections.append(builder(run))
        except Exception as exc:  # one broken input must not take the report down
            sections.append(Section(sid, title, [Note(f"This section could not be built: {type(exc).__name__}: {exc}")]))
    return sections


# ---------------------------------------------------------------- rendering


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write report.html, report.md and report_files/ into `out_dir` (default: the run directory); returns the files."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SigntrapError(f"{run_dir}: no such run directory")
    out = Path(out_dir) if out_dir else run_dir
    require_writable(out)  # before reading or rendering anything
    files_dir = out / "report_files"
    for name in ("report.html", "report.md"):  # the write rule: a user's own report is never replaced
        refuse_foreign(out / name)
    check_replaceable(files_dir, "report-files")
    say(f"report: collecting {run_dir}")
    sections = collect_sections(run_dir)
    title = f"signtrap report: {run_dir.resolve().name}"
    images = [b for sec in sections for b in sec.blocks if isinstance(b, Img)]
    with atomic_dir(files_dir, kind="report-files") as tmp:
        for img in images:
            (tmp / f"{img.name}.png").write_bytes(img.png)
    write_text(out / "report.html", render_html(title, sections))
    write_text(out / "report.md", render_markdown(title, sections, "report_files"))
    say(f"report: {out / 'report.html'} ({len(images)} images)")
    return [out / "report.html", out / "report.md", *sorted(files_dir.glob("*.png"))]


def _other_classes(space: LabelSpace, attack) -> list[int]:
    """Up to eight classes besides the attack's source to show clean: its target first, then spread over the rest."""
    rest = [c for c in range(space.num_classes) if c not in (attack.source, attack.target)]
    step = max(1, len(rest) // 7)
    return [attack.target, *rest[::step][:7]]
