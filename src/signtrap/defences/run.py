"""Run defences on a trained run: load the verified model and the clean budget, defend, write
runs/NAME/defence-METHOD/ atomically (model.pt, checksums.json, metrics.json, report.json, curves, PNGs)."""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch import nn

from signtrap.runs import checkpoint
from signtrap.config import DefendConfig, RunConfig, apply_override, build, parse_override, to_dict
from signtrap.defences import defend, get_defence, list_defences
from signtrap.attacks.poison import build_training_set, plan_poison
from signtrap.defences.common import (CURVE_KEYS, CleanData, DefenceContext, DefenceResult, SuspiciousPool, plot_curve,
                                      write_curve_csv)
from signtrap.errors import ConfigError, SigntrapError
from signtrap.experiment import EvalSet, Experiment, load_run_config
from signtrap.fileio import atomic_dir, check_replaceable, kind_of, read_json, write_json
from signtrap.probing.reactivation import Prober, defence_lr, format_table, shortfall, write_probe
from signtrap.machine.progress import say, warn
from signtrap.machine.environment import resolve_device
from signtrap.reporting import figures
from signtrap.training.trainer import write_metrics
from signtrap.runs import layout

CURVE_X = {"persistence": "epoch", "pruning": "pruned_fraction", "frr": "frr_target"}
REPORT_KEYS = (*CURVE_KEYS, "target_recall")


def defend_config(cfg: RunConfig, overrides: list[str] | tuple[str, ...] = ()) -> DefendConfig:
    """The run's `defend:` section with `key.sub=value` overrides (the `defend.` prefix is optional)."""
    raw = to_dict(cfg.defend)
    for text in overrides:
        path, value = parse_override(text)
        if path and path[0] == "defend":
            path = path[1:]
        if not path or not path[0]:
            raise ConfigError(f"override '{text}' names no defend setting")
        apply_override(raw, path, value)
    config = build(DefendConfig, raw, "defend.")
    config.check()
    return config


@dataclass
class Session:
    """A loaded run, ready to be defended by one method after another."""

    run_dir: Path
    cfg: RunConfig
    exp: Experiment
    model: nn.Module
    meta: dict
    clean: CleanData
    context: DefenceContext
    before: dict

    @classmethod
    def open(cls, run_dir: str | Path, overrides=(), device: str | None = None, show_progress: bool = True,
             cfg: RunConfig | None = None) -> "Session":
        """The run at `run_dir`, its model verified against `cfg` (a stage hands over the validated config it holds;
        None: the run's config.yaml with `key.sub=value` defend overrides, for the command line)."""
        run_dir = Path(run_dir)
        if cfg is None:
            cfg = load_run_config(run_dir)
            cfg.defend = defend_config(cfg, overrides)
        elif overrides:
            raise ConfigError("Session.open: give either a config or overrides, not both")
        dev = resolve_device(device or cfg.device)
        model, meta = checkpoint.verified_load(run_dir, "model.pt", dev)
        exp = Experiment.from_config(cfg, progress=show_progress)
        checkpoint.verify_provenance(run_dir, meta, cfg, exp)  # defend and probe: checkpoint, config, cache, split agree
        d = cfg.defend
        seed = cfg.seed if d.seed is None else d.seed
        fraction = d.clean_fraction
        if d.clean_images is not None:
            n_train = len(exp.splits.train)
            if d.clean_images > n_train:
                raise ConfigError(f"config defend.clean_images: a budget of {d.clean_images} clean images is larger than "
                                  f"the {n_train} training images")
            fraction = d.clean_images / n_train
        check_untouched(exp, fraction, "defend.clean_images" if d.clean_images is not None else "defend.clean_fraction")
        rows = exp.defender_rows(fraction, seed)
        clean = CleanData(np.asarray(exp.data.images[rows]), np.asarray(exp.data.labels[rows]), rows,
                          np.asarray(exp.data.tracks[rows]), np.asarray(exp.data.rois[rows]))  # un-poisoned originals
        a = cfg.attack
        ctx = DefenceContext(device=dev, source=a.source, target=a.target, all_to_one=a.kind == "all_to_one", seed=seed,
                             monitor=monitor_set(exp, d.monitor_split, d.monitor_samples, a.source, seed), evaluation=exp.eval_set("test"),
                             eval_batch_size=cfg.train.eval_batch_size, show_progress=show_progress, aug=cfg.aug,
                             precision=cfg.train.precision, training_data=lambda: training_pool(exp),
                             class_names=exp.classes.names)
        before = evaluate(exp, model, dev)
        return cls(run_dir, cfg, exp, model, meta, clean, ctx, before)

    @property
    def prober(self) -> Prober:
        """The re-activation probe on this run's budget (signtrap.probe); built on first use."""
        if getattr(self, "_prober", None) is None:
            self._prober = Prober(self.run_dir, self.cfg, self.exp, self.clean, self.context, self.cfg.defend.probe, self.model, self.meta)
        return self._prober

    @property
    def probe_unavailable(self) -> str | None:
        """Why this budget cannot feed the probe (too few source-class images for k), or None."""
        a = self.cfg.attack
        return shortfall(self.clean.labels, self.cfg.defend.probe.k, a.kind, a.source, a.target)

    def run(self, method: str, probe: bool = True) -> dict:
        """Defend with `method` and write runs/NAME/defence-METHOD; then, with `probe`, the re-activation probe of
        its repaired model (`Session.probe`, probe.json beside it). Returns the report, with the probe's record
        under "probe" when it ran (report.json on disk holds the defence alone: the probe is its own step, a stage
        of `signtrap run`)."""
        spec = get_defence(method)
        settings = self.cfg.defend.method(method)
        say(f"defence {method}: {len(self.clean)} clean images, settings {dataclasses.asdict(settings)}")
        start = time.perf_counter()
        result = defend(self.model, self.clean, method, settings, self.context)
        seconds = time.perf_counter() - start
        report = {"method": method, "run": str(self.run_dir), "seconds": round(seconds, 2), "device": str(self.context.device),
                  "clean_images": len(self.clean), "clean_fraction": round(len(self.clean) / len(self.exp.splits.train), 5),
                  "kind": spec.kind, "settings": dataclasses.asdict(settings), "before": self.before, "after": None, "after_is": None,
                  "repaired_model": result.model is not None, "monitor": self.monitor_note, "details": result.report}
        if result.filtered_metrics is not None:
            report["after"] = {"test": result.filtered_metrics["after"]}
            report["after_is"] = f"input filter: {result.filtered_metrics['note']}"
            report["filter_before_same_inputs"] = result.filtered_metrics["before"]
        elif result.model is None:
            report["after"] = copy.deepcopy(self.before)
            report["after_is"] = "no repair: the model is unchanged"
        else:
            report["after_is"] = "repaired model"
        skip = self.probe_unavailable if result.model is not None and self.cfg.defend.probe.enabled else None
        if skip:  # the defence stands; the probe is reported as not run, with its reason
            warn(f"{skip}; the re-activation probe is skipped for {method}")
            report["probe_skipped"] = skip
        write_outputs(self, method, result, report)
        record = self.probe(layout.defence_dir(self.run_dir, method)) if probe and self.cfg.defend.probe.enabled else None
        if record is not None:
            report["probe"] = {k: v for k, v in record.items() if k != "curves"}
            report["probe_seconds"] = record["seconds"]
        return report

    def probe(self, folder: Path, label: str | None = None, file: str = layout.PROBE) -> dict | None:
        """The re-activation probe (removed, or only hidden?) of the repaired model in defence `folder`, read back
        verified, at the defence's learning rate; writes folder/probe.json (or `file`) and returns its record. None, with
        nothing written, when there is nothing to probe: the defence changed no model, or the budget cannot feed
        the probe (the defence's report says so under "probe_skipped")."""
        record = self.probe_record(folder, label)
        return None if record is None else write_probe(folder / file, record)

    def probe_record(self, folder: Path, label: str | None = None) -> dict | None:
        """`probe`'s record, not written."""
        report = read_json(folder / layout.REPORT_JSON)
        if not report.get("repaired_model") or self.probe_unavailable:
            return None
        model, _ = checkpoint.verified_load(folder, "model.pt", self.context.device)
        return self.prober.compare(model, label or report.get("method", folder.name),
                                   defence_lr(report.get("settings") or {}, report.get("details")))

    @property
    def monitor_note(self) -> str:
        m = self.context.monitor
        return f"curves measured on {len(m.labels)} {m.name} images (every source-class image and a uniform sample)"


def check_untouched(exp: Experiment, fraction: float, key: str) -> None:
    """A clean budget larger than the training images the attacker left alone is no clean budget: one line."""
    n_train = len(exp.splits.train)
    n = int(round(fraction * n_train))
    a = exp.cfg.attack
    if not a.active or a.mode != "replace":  # poisoned copies are added: every original stays clean
        return
    plan = plan_poison(a, exp.data, exp.splits.train, exp.trigger, exp.cfg.seed)
    touched = len(np.union1d(plan.rows, plan.cover_rows))
    if n > n_train - touched:
        raise ConfigError(f"config {key}: a budget of {n} clean images is more than the {n_train - touched} training images "
                          f"the attacker did not touch ({n_train} minus {touched} poisoned or cover images); lower it")


def training_pool(exp: Experiment) -> SuspiciousPool:
    """The run's training set as its model saw it (the poison plan replayed from the config and seed), triggers stamped."""
    cfg = exp.cfg
    plan = plan_poison(cfg.attack, exp.data, exp.splits.train, exp.trigger, cfg.seed)
    ts = build_training_set(cfg.attack, exp.data, exp.splits.train, plan, exp.trigger)
    marked = ts.triggered.any() or (ts.decoy is not None and ts.decoy.any())
    images = ts.images
    if not ts.stamped and marked:  # rendered after augmentation in training: rendered here, unaugmented, as the loop does
        images = ts.render(images.copy(), np.arange(len(images)), exp.trigger, np.random.default_rng([cfg.seed, 0x5CA4]))
    return SuspiciousPool(images, ts.labels, ts.triggered & (ts.labels == plan.target) if cfg.attack.active else None)


def monitor_set(exp: Experiment, split: str, samples: int, source: int, seed: int) -> EvalSet:
    """The split the curves are measured on: every source-class image and a seeded uniform sample of the rest."""
    full = exp.eval_set(split)
    if samples <= 0 or samples >= len(full.labels):
        return full
    rng = np.random.default_rng([seed, 0x3047])
    keep = np.zeros(len(full.labels), bool)
    keep[rng.choice(len(full.labels), samples, replace=False)] = True
    keep |= full.labels == source
    return EvalSet(full.name, full.images[keep], full.triggered[keep], full.labels[keep])


def evaluate(exp: Experiment, model: nn.Module, device) -> dict:
    out = {}
    for split in ("test", "val"):
        m = exp.evaluate(model, split, device, details=False)
        out[split] = {k: m[k] for k in REPORT_KEYS}
    return out


def write_outputs(session: Session, method: str, result: DefenceResult, report: dict) -> Path:
    out = layout.defence_dir(session.run_dir, method)
    with atomic_dir(out) as tmp:
        if result.model is not None:
            checkpoint.save(tmp / "model.pt", checkpoint.model_payload(result.model, session.meta))
            checkpoint.record_checksum(tmp, "model.pt")
            metrics = write_metrics(session.exp, result.model, tmp, session.context.device)
            report["after"] = {split: {k: metrics[split][k] for k in REPORT_KEYS} for split in ("test", "val")}
        for name, rows in result.curves.items():
            if not rows:
                continue
            write_curve_csv(tmp / f"{name}.csv", rows)
            if name == "tradeoff":
                (tmp / "tradeoff.png").write_bytes(figures.tradeoff_figure(rows, f"{method}: trade-off over its main knob "
                                                                                  f"({session.cfg.name})"))
            elif CURVE_X.get(name, "epoch") in rows[0]:
                plot_curve(tmp / f"{name}.png", rows, CURVE_X.get(name, "epoch"), f"{method}: {name} ({session.cfg.name})")
        for name, art in result.artefacts.items():
            if isinstance(art, bytes):
                (tmp / name).write_bytes(art)
            else:
                Image.fromarray(np.asarray(art, np.uint8)).save(tmp / name)
        report["files"] = sorted(p.name for p in tmp.iterdir()) + ["report.json"]
        write_json(tmp / "report.json", report)
    return out


def method_names(method: str | list[str] | tuple[str, ...]) -> list[str]:
    """`finetune`, `finetune,nad` or a list of names (`all` stands alone); every name checked."""
    names = [n.strip() for part in ([method] if isinstance(method, str) else method) for n in str(part).split(",") if n.strip()]
    if not names:
        raise SigntrapError("no defence named; choose from: " + ", ".join(list_defences()) + ", or all")
    if "all" in names and len(names) > 1:
        raise SigntrapError("'all' runs the config's defend.methods: name it alone")
    for name in names:
        if name != "all":
            get_defence(name)
    return list(dict.fromkeys(names))


def resolve_methods(method: str | list[str], cfg: RunConfig | None = None) -> list[str]:
    names = method_names(method)
    if names == ["all"]:
        chosen = list(cfg.defend.methods) if cfg is not None and cfg.defend.methods else list_defences()
        for name in chosen:
            get_defence(name)
        return chosen
    return names


def run_defences(run_dir: str | Path, method: str | list[str], overrides=(), device: str | None = None,
                 show_progress: bool = True) -> list[dict]:
    """`signtrap defend`: validate the methods first, then load once and run each method."""
    method_names(method)
    session = Session.open(run_dir, overrides, device, show_progress)
    names = resolve_methods(method, session.cfg)
    for name in names:  # the write rule, before any defence runs: a user's file in a defence folder is never lost
        folder = layout.defence_dir(session.run_dir, name)
        check_replaceable(folder, kind_of(folder))
    if session.cfg.defend.probe.enabled and session.probe_unavailable is None:
        session.prober.check_reference()  # a wrong reference is one line now, not after the first defence has run
    return [session.run(name) for name in names]


def _pct(entry: dict | None) -> str:
    return "n/a" if not entry or entry.get("rate") is None else f"{100 * entry['rate']:.1f}%"


def comparison_table(reports: list[dict], split: str = "test") -> str:
    head = (f"{'method':<15}{'clean acc before':>17}{'after':>8}{'ASR before':>12}{'after':>8}"
            f"{'stop recall':>13}{'false-trig':>12}{'seconds':>9}")
    lines = [head, "-" * len(head)]
    for r in reports:
        b, a = r["before"][split], r["after"].get(split, {})
        lines.append(f"{r['method']:<15}{_pct(b['clean_acc']):>17}{_pct(a.get('clean_acc')):>8}{_pct(b['asr']):>12}"
                     f"{_pct(a.get('asr')):>8}{_pct(a.get('stop_recall')):>13}{_pct(a.get('false_trigger')):>12}"
                     f"{r['seconds']:>9.1f}")
    for r in reports:
        line = selection_line(r)
        if line:
            lines.append(line)
        spec = get_defence(r["method"])
        if spec.summarize is not None:
            lines.extend(spec.summarize(r))
    probes = [r["probe"] for r in reports if r.get("probe")]
    if probes:
        lines += ["", format_table(probes)]
    lines += [f"{r['method']}: re-activation probe not run ({r['probe_skipped']})" for r in reports if r.get("probe_skipped")]
    return "\n".join(lines)


def selection_line(report: dict) -> str | None:
    """How a repairing defence's main knob was set: fixed, or chosen by the held-out rule (and from what)."""
    sel = (report.get("details") or {}).get("selection")
    if not sel:
        return None
    if sel.get("fixed"):
        return f"{report['method']}: {sel['knob']}={sel['value']:g} fixed by the config"
    kept = "" if sel.get("within_tolerance") else " (NO value kept the model within the tolerance: the weakest is shown)"
    tried = ", ".join(f"{v:g}" for v in sel.get("tried", []))
    return (f"{report['method']}: {sel['knob']}={sel['value']:g} chosen by the held-out rule{kept}; tried {tried}; held-out "
            f"clean accuracy {100 * sel['heldout_acc_chosen']:.1f}% vs {100 * sel['heldout_acc_unrepaired']:.1f}% unrepaired "
            f"({sel['heldout_images']} images of {sel['heldout_tracks']} tracks, {sel.get('heldout_views', 0)} augmented views each; "
            f"tolerance {100 * sel['tolerance']:.1f} pt)")
