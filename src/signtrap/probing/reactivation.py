"""Removed or only hidden? The re-activation probe (after Min et al., NeurIPS 2024, "Uncovering, Explaining, and
Mitigating the Superficial Safety of Backdoor Defense": after many defences the backdoor comes back after fine-tuning
on a handful of poisoned samples, far faster than a clean model learns it).

The probe (settings: `defend.probe`, `signtrap.config.ProbeConfig`):
- data: the defender's clean budget (the images the defences used) plus `k` poisoned copies: `k` budget images of
  the attack's source class (of any non-target class for all-to-one), drawn with the seed, carrying the run's
  trigger (stamped after augmentation, as in training, or before it when the run stamps before) and labelled the
  target (default k = 5 stop signs labelled 100 km/h);
- training: through the one loop (`signtrap.training.loop.Loop`), AdamW at the defence's learning rate (`probe.lr` overrides
  it; a model no defence trained is probed at 1e-3, the defences' TrainSettings default), weight decay 5e-4,
  batch 64, cosine-decayed to zero, for `probe.steps` = 300 optimiser steps rounded to whole epochs over the
  budget + k rows (the actual count is reported), with the run's augmentation and precision. The batch order
  depends on the seed only, so every model probed with the same settings sees the same batches;
- measurement: clean accuracy and ASR on the test and validation splits before and after the probe; the verdict
  pools test + validation (held out from training and from every defence decision) for larger counts. The curve
  (the defence's monitor metrics while the probe trains) is measured at about `CURVE_POINTS` evenly spaced epochs
  and the last, not after every epoch: a small budget makes hundreds of short epochs, and measuring each cost more
  than the training (SynthSigns' demo: 43 epochs of 7 steps per probed model). Measuring trains nothing, so the
  probed model and the verdict do not depend on it.

Work not done: a defence whose repaired model's held-out ASR is, before any probe, already more than the margin
above the zero-poison model's has not suppressed the backdoor, and its verdict (persists) does not depend on what
the probe would do; its probe is not trained (probe.json says so, with the before-probe figures that decided it),
nor are the zero-poison and undefended models probed for it. `probe.always=true` trains it anyway (the curve), as
`signtrap probe` does for the model it is pointed at.

The identical probe runs on the zero-poison model of the same config (attack.kind=none, same seed, data, model and
training settings: `--reference RUN`, or RUNS/NAME-zero next to the run, trained on demand once and reused).

Verdict, per probed model, from pooled counts with 95% Newcombe intervals of a difference of two rates and a
margin d = `probe.margin` (default 0.2, i.e. 20 ASR points):
- persists: before the probe, its ASR is more than d above the zero-poison model's (the interval's lower end is
  above d): the defence did not even suppress the backdoor;
- hidden: suppressed, but after the probe its ASR is more than d above the zero-poison model's after the same
  probe (lower end above d): the backdoor was only hidden, and k samples wake it;
- removed: after the probe its ASR stays within d of the zero-poison model's (the interval's upper end is below d);
- inconclusive: neither (too few held-out images for the gap, or a gap close to d), or the probe itself cost the
  probed or the zero-poison model more than `probe.max_clean_drop` (10 points) of held-out clean accuracy: an ASR
  read off a model the probe broke says nothing about the backdoor (a learning rate too high for the model).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from signtrap.runs import checkpoint
from signtrap.runs import state as runstate
from signtrap.attacks.poison import TrainingSet
from signtrap.config import SAME_AS_REFERENCE, ProbeConfig, RunConfig
from signtrap.defences.common import CleanData, DefenceContext, TrainSettings, fit
from signtrap.errors import SigntrapError
from signtrap.experiment import Experiment, load_run_config
from signtrap.fileio import read_json, write_text
from signtrap.training.loop import Schedule
from signtrap.evaluation.metrics import wilson
from signtrap.machine.progress import say
from signtrap.training.trainer import train
from signtrap.triggers import Trigger
from signtrap.runs import layout

PROBE_STREAM = 0x9B0B  # the draw of the k poisoned budget images
DEFAULT_LR = TrainSettings.lr  # the learning rate for a model no defence trained
SPLITS = ("test", "val")
KEYS = ("clean_acc", "asr", "stop_recall", "false_trigger")
VERDICTS = ("removed", "hidden", "persists", "inconclusive")
Z95 = 1.959964


# ---------------------------------------------------------------- the probe's data and schedule


def poison_candidates(labels: np.ndarray, kind: str, source: int, target: int) -> np.ndarray:
    """Budget rows the probe may poison: the source class, or every non-target class for all-to-one."""
    return np.flatnonzero(labels != target) if kind == "all_to_one" else np.flatnonzero(labels == source)


def shortfall(labels: np.ndarray, k: int, kind: str, source: int, target: int) -> str | None:
    """Why the probe cannot draw `k` poisoned samples from this budget, or None when it can."""
    candidates = poison_candidates(labels, kind, source, target)
    if k <= len(candidates):
        return None
    what = "non-target" if kind == "all_to_one" else f"class {source}"
    return (f"probe: k={k} poisoned samples requested but the defender's clean budget holds only "
            f"{len(candidates)} {what} images; lower defend.probe.k or raise defend.clean_fraction")


def choose_poison(labels: np.ndarray, k: int, kind: str, source: int, target: int, seed: int) -> np.ndarray:
    """The `k` budget rows the probe poisons, drawn with the seed; one clear error when there are too few."""
    reason = shortfall(labels, k, kind, source, target)
    if reason:
        raise SigntrapError(reason)
    candidates = poison_candidates(labels, kind, source, target)
    rng = np.random.default_rng([seed, PROBE_STREAM])
    return np.sort(rng.choice(candidates, size=k, replace=False))


def probe_set(clean: CleanData, rows: np.ndarray, target: int, trigger: Trigger, stamp_before: bool, seed: int) -> TrainingSet:
    """The clean budget plus poisoned copies of `rows` (trigger + target label), as the loop trains on them."""
    poisoned = np.asarray(clean.images[rows])
    boxes = clean.boxes()  # a sticker on the sign needs the sign's box, after augmentation as before it
    if stamp_before:  # the run stamps before augmentation (stickers that move with the sign): do the same
        rng = np.random.default_rng([seed, PROBE_STREAM, 1])
        poisoned = trigger.apply(poisoned, rng, boxes[rows])
    images = np.concatenate([np.asarray(clean.images), poisoned])
    labels = np.concatenate([clean.labels, np.full(len(rows), target, np.int64)])
    triggered = np.concatenate([np.zeros(len(clean), bool), np.ones(len(rows), bool)])
    return TrainingSet(images, labels, triggered, stamp_before, np.concatenate([boxes, boxes[rows]]))


CURVE_POINTS = 10  # the probe's curve: measured at about this many epochs (and the last)


def probe_schedule(settings: ProbeConfig, rows: int, lr: float) -> Schedule:
    """`settings.steps` optimiser steps as whole epochs over `rows` (at least one), AdamW, cosine to zero."""
    per_epoch = math.ceil(rows / settings.batch_size)
    epochs = max(1, round(settings.steps / per_epoch))
    return Schedule(epochs=epochs, lr=lr, batch_size=settings.batch_size, weight_decay=settings.weight_decay,
                    lr_key="defend.probe.lr")


def defence_lr(settings: Any, details: dict | None) -> float | None:
    """The (AdamW) learning rate to probe a defence at: the one it names (details["probe_lr"], for a defence that
    trains with another optimiser), else the value its held-out rule chose when its knob is the learning rate
    (details["selection"]), else its settings' `lr`; None for a defence that does not train."""
    if isinstance((details or {}).get("probe_lr"), (int, float)):  # a defence training with another optimiser names it
        return float(details["probe_lr"])
    selection = (details or {}).get("selection") or {}
    if selection.get("knob") == "lr" and isinstance(selection.get("value"), (int, float)):
        return float(selection["value"])
    lr = settings.get("lr") if isinstance(settings, dict) else getattr(settings, "lr", None)
    return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None


# ---------------------------------------------------------------- statistics


def pool(entries: list[dict]) -> dict:
    """One rate from several (splits, seeds): counts added, Wilson interval recomputed."""
    k, n = sum(e["k"] for e in entries), sum(e["n"] for e in entries)
    return {"rate": k / n if n else None, "k": k, "n": n, "ci95": wilson(k, n)}


def pooled(metrics: dict, key: str) -> dict:
    """One rate over the test and validation splits together."""
    return pool([metrics[s][key] for s in SPLITS])


def newcombe(a: dict, b: dict) -> tuple[float, float, float] | None:
    """Rate difference a - b and its 95% interval (Newcombe's hybrid score method, from two Wilson intervals)."""
    if not a["n"] or not b["n"]:
        return None
    p1, p2 = a["k"] / a["n"], b["k"] / b["n"]
    (l1, u1), (l2, u2) = wilson(a["k"], a["n"], Z95), wilson(b["k"], b["n"], Z95)
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def decided_before(model_before: dict, reference_before: dict, margin: float) -> dict | None:
    """The verdict when the measurements before the probe already decide it (persists: the backdoor was never
    suppressed), else None: the probe must run."""
    before = newcombe(model_before["held_out"]["asr"], reference_before["held_out"]["asr"])
    if before is None or not before[1] > margin:
        return None
    return {"margin": margin, "before_diff": before, "after_diff": None, "verdict": "persists",
            "reason": f"before the probe its ASR is {100 * before[0]:+.1f} points [{100 * before[1]:+.1f}, {100 * before[2]:+.1f}] "
                      f"from the zero-poison model's: more than {100 * margin:g} above, the backdoor was never suppressed"}


def verdict(model: dict, reference: dict, margin: float, max_clean_drop: float = 0.1) -> dict:
    """Removed, hidden, persists or inconclusive (rule in the module docstring) from two probe results."""
    decided = decided_before(model["before"], reference["before"], margin)
    if decided is not None:
        return {**decided, "after_diff": newcombe(model["after"]["held_out"]["asr"], reference["after"]["held_out"]["asr"])}
    before = newcombe(model["before"]["held_out"]["asr"], reference["before"]["held_out"]["asr"])
    after = newcombe(model["after"]["held_out"]["asr"], reference["after"]["held_out"]["asr"])
    out = {"margin": margin, "before_diff": before, "after_diff": after}
    if before is None or after is None:
        return {**out, "verdict": "inconclusive", "reason": "no held-out triggered images to measure ASR on"}
    pct = f"{100 * margin:g}"
    for who, result in (("the probed model", model), ("the zero-poison model", reference)):
        change = result.get("clean_acc_change")
        if isinstance(change, (int, float)) and change < -max_clean_drop:  # an ASR read off a broken model means nothing
            return {**out, "verdict": "inconclusive",
                    "reason": f"the probe itself cost {who} {-100 * change:.1f} points of clean accuracy (more than "
                              f"{100 * max_clean_drop:g}): its learning rate is too high to read re-activation from; set probe.lr"}
    gap = f"{100 * after[0]:+.1f} points [{100 * after[1]:+.1f}, {100 * after[2]:+.1f}]"
    if after[1] > margin:
        return {**out, "verdict": "hidden", "reason": f"after the probe its ASR is {gap} from the zero-poison model's: "
                                                      f"more than {pct} above, the backdoor was only hidden"}
    if after[2] < margin:
        return {**out, "verdict": "removed", "reason": f"after the probe its ASR is {gap} from the zero-poison model's: "
                                                       f"less than {pct} above, like a model that never had the backdoor"}
    return {**out, "verdict": "inconclusive", "reason": f"after the probe its ASR is {gap} from the zero-poison model's: "
                                                        f"the interval contains {pct}"}


RULE = ("verdict (95% Newcombe intervals of ASR differences on test+val counts, margin {margin:g} pt): persists = before "
        "the probe, ASR > margin above the zero-poison model's; hidden = after the probe, > margin above the zero-poison "
        "model's after the same probe; removed = after the probe, < margin above it; else inconclusive (also when the probe "
        "itself cost either model more than {max_drop:g} pt of clean accuracy)")


# ---------------------------------------------------------------- the zero-poison reference


def config_differences(cfg: RunConfig, ref: RunConfig) -> list[str]:
    """Keys (outside the attack) whose values differ between a run's config and a candidate reference's: the
    config's `reference_view` (a whole section: its first differing key; a section's named keys: each differing one)."""
    a, b = cfg.reference_view(), ref.reference_view()
    diffs = []
    for section, keys in SAME_AS_REFERENCE.items():
        if keys is None:
            if a[section] != b[section]:
                diffs.append(section if not isinstance(a[section], dict) else
                             next((f"{section}.{k}" for k in {**a[section], **b[section]}
                                   if a[section].get(k) != b[section].get(k)), section))
            continue
        diffs.extend(f"{section}.{k}" for k in keys if a[section].get(k) != b[section].get(k))  # a key may move between versions
    return diffs


def is_zero_poison(run_dir: Path, cfg: RunConfig) -> bool:
    if cfg.attack.kind == "none":
        return True
    manifest = run_dir / "manifest.json"
    return manifest.is_file() and read_json(manifest).get("poisoned") == 0


def check_reference_config(ref_dir: Path, cfg: RunConfig) -> None:
    """That `ref_dir` is a zero-poison run of `cfg`'s config (cheap: its config and manifest only)."""
    if not (ref_dir / "config.yaml").is_file():
        raise SigntrapError(f"probe reference {ref_dir}: not a run directory (no config.yaml)")
    ref_cfg = load_run_config(ref_dir)
    if not is_zero_poison(ref_dir, ref_cfg):
        raise SigntrapError(f"probe reference {ref_dir}: not a zero-poison run (attack.kind={ref_cfg.attack.kind}); "
                            "train one with attack.kind=none")
    diffs = config_differences(cfg, ref_cfg)
    if diffs:
        raise SigntrapError(f"probe reference {ref_dir}: not the zero-poison model of the same config ({', '.join(diffs[:4])} "
                            "differ); train it from the same config with attack.kind=none")


def load_reference(ref_dir: Path, cfg: RunConfig, meta: dict, device) -> nn.Module:
    """The zero-poison model of `ref_dir`, after checking it is one and matches the probed run's config and data."""
    check_reference_config(ref_dir, cfg)
    model, ref_meta = checkpoint.verified_load(ref_dir, "model.pt", device)
    ref_cfg = load_run_config(ref_dir)
    try:  # the reference's own checkpoint, config, cache and split agree (the one provenance rule)
        checkpoint.verify_provenance(ref_dir, ref_meta, ref_cfg, Experiment.from_config(ref_cfg, progress=False))
    except SigntrapError as exc:
        raise SigntrapError(f"probe reference {exc}") from None
    if (ref_meta.get("attack") or {}).get("kind", "none") != "none":
        raise SigntrapError(f"probe reference {ref_dir}: its checkpoint was trained with attack.kind="
                            f"{ref_meta['attack']['kind']}, not as a zero-poison model")
    if ref_meta.get("data_hash") != meta.get("data_hash"):
        raise SigntrapError(f"probe reference {ref_dir}: trained on other data (data hash {str(ref_meta.get('data_hash'))[:12]}, "
                            f"the run's {str(meta.get('data_hash'))[:12]})")
    return model


def reference_config(cfg: RunConfig, ref_dir: Path) -> RunConfig:
    """The zero-poison twin of a run's config (attack.kind=none, no attack procedure, same seed), living in `ref_dir`."""
    ref_cfg = copy.deepcopy(cfg)
    ref_cfg.attack = dataclasses.replace(cfg.attack, kind="none", dormant="none", persist="none", per_phase={})
    ref_cfg.name, ref_cfg.runs_dir = ref_dir.name, str(ref_dir.parent)
    return ref_cfg


def train_reference(run_dir: Path, cfg: RunConfig, ref_dir: Path) -> None:
    """Train the zero-poison model of the run's config (attack.kind=none, same seed) into `ref_dir`; an interrupted
    training resumes, a finished one of the same config is kept."""
    ref_cfg = reference_config(cfg, ref_dir)
    state = runstate.inspect(ref_dir, ref_cfg)
    if state.done:
        return
    say(f"probe: training the zero-poison reference {ref_dir} (the run's config with attack.kind=none, seed {cfg.seed}); "
        "once: later probes reuse it")
    train(ref_cfg, resume=state.status == runstate.RESUMABLE)


# ---------------------------------------------------------------- probing


@dataclass
class Prober:
    """Probes models of one run with one budget; the zero-poison reference (and the undefended model) are probed
    once per learning rate and reused."""

    run_dir: Path
    cfg: RunConfig
    exp: Experiment
    clean: CleanData
    ctx: DefenceContext
    settings: ProbeConfig
    backdoored: nn.Module  # the run's own (undefended) model
    meta: dict
    _reference: nn.Module | None = None
    reference_dir: Path | None = None
    _cache: dict = field(default_factory=dict)
    _ends_lr: float | None = None  # the learning rate the table's two ends were probed at (the session's first)

    def __post_init__(self) -> None:
        a = self.cfg.attack
        self.kind = "all_to_one" if a.kind == "all_to_one" else "source_specific"
        self.rows = choose_poison(self.clean.labels, self.settings.k, self.kind, a.source, a.target, self.ctx.seed)
        self.data = probe_set(self.clean, self.rows, a.target, self.exp.trigger, a.stamp == "before_aug", self.ctx.seed)

    # ------------------------------------------------ the reference

    def reference_plan(self) -> tuple[Path, bool]:
        """Where the zero-poison reference is and whether it must be trained; one clear error when there is none
        and no way to train one. Cheap: nothing is loaded or trained."""
        given = self.settings.reference
        if not given and is_zero_poison(self.run_dir, self.cfg):
            return self.run_dir, False  # the run is its own reference
        ref_dir = Path(given) if given else layout.reference_dir(self.run_dir)
        if ref_dir.resolve() == self.run_dir.resolve():
            raise SigntrapError(f"probe reference {ref_dir}: is the probed run itself; the reference must be another run "
                                "directory, the zero-poison model of the same config and seed (attack.kind=none)")
        if (ref_dir / "model.pt").is_file():
            return ref_dir, False
        if given:
            raise SigntrapError(f"probe reference {ref_dir}: no trained model (model.pt); train it with attack.kind=none")
        if not self.settings.train_reference:
            raise SigntrapError(f"probe: no zero-poison reference for {self.run_dir} (none at {ref_dir}) and probe.train_reference=false; "
                                "pass --reference RUN (probe.reference=RUN) or allow training one")
        if not os.access(ref_dir.parent, os.W_OK) or (ref_dir.exists() and not os.access(ref_dir, os.W_OK)):
            raise SigntrapError(f"probe: no zero-poison reference for {self.run_dir} and {ref_dir} cannot be written to train one; "
                                "pass --reference RUN (probe.reference=RUN)")
        return ref_dir, True

    def check_reference(self) -> None:
        """Everything about the reference that can be checked before any work: that there is one (or a way to
        train one) and that a given one is a zero-poison run of the same config. One clear error otherwise."""
        ref_dir, needs_training = self.reference_plan()
        if not needs_training and ref_dir != self.run_dir:
            self.reference()  # its config, checkpoint, cache and split, checked now (then kept for the probe)

    def reference(self) -> nn.Module:
        if self._reference is None:
            ref_dir, needs_training = self.reference_plan()
            if ref_dir == self.run_dir:
                self._reference = self.backdoored
            else:
                if needs_training:
                    train_reference(self.run_dir, self.cfg, ref_dir)
                self._reference = load_reference(ref_dir, self.cfg, self.meta, self.ctx.device)
            self.reference_dir = ref_dir
        return self._reference

    # ------------------------------------------------ one probe

    def lr_for(self, trained_lr: float | None) -> float:
        """probe.lr when set, else the defence's learning rate, else the default for an untrained-by-defence model."""
        if self.settings.lr is not None:
            return self.settings.lr
        return DEFAULT_LR if trained_lr is None else float(trained_lr)

    def measure(self, model: nn.Module) -> dict:
        out = {}
        for split in SPLITS:
            m = self.exp.evaluate(model, split, self.ctx.device, details=False)
            out[split] = {key: m[key] for key in KEYS}
        out["held_out"] = {key: pooled(out, key) for key in ("clean_acc", "asr")}
        return out

    def run(self, model: nn.Module, lr: float, label: str, before: dict | None = None) -> dict:
        """Fine-tune a copy of `model` with the probe; returns before/after metrics, the curve and the schedule.
        `before`: the model's measurement already taken (`measure` is deterministic), not taken again."""
        model = copy.deepcopy(model)
        schedule = probe_schedule(self.settings, len(self.data.labels), lr)
        start = time.perf_counter()
        before = self.measure(model) if before is None else before
        curve = fit(model, self.clean, self.ctx, method="probe", schedule=schedule, augment=self.settings.augment,
                    data=self.data, trigger=self.exp.trigger, measure_every=math.ceil(schedule.epochs / CURVE_POINTS))
        after = self.measure(model)
        change = None
        if before["held_out"]["clean_acc"]["rate"] is not None:
            change = after["held_out"]["clean_acc"]["rate"] - before["held_out"]["clean_acc"]["rate"]
        return {"label": label, "lr": lr, "epochs": schedule.epochs,
                "steps": schedule.epochs * schedule.steps_per_epoch(len(self.data.labels)), "before": before, "after": after,
                "clean_acc_change": change, "curve": curve, "seconds": round(time.perf_counter() - start, 2)}

    def measured(self, which: str) -> dict:
        """A model's held-out metrics before any probe (the zero-poison reference's or the undefended one's), measured once."""
        key = (which, "before")
        if key not in self._cache:
            self._cache[key] = self.measure(self.reference() if which == "reference" else self.backdoored)
        return self._cache[key]

    def cached(self, which: str, lr: float) -> dict:
        """The probe of the zero-poison reference or of the undefended model at `lr`, computed once."""
        key = (which, lr)
        if key not in self._cache:
            model = self.reference() if which == "reference" else self.backdoored
            self._cache[key] = self.run(model, lr, "zero-poison model" if which == "reference" else "backdoored (no defence)",
                                        before=self._cache.get((which, "before")))
        return self._cache[key]

    def compare(self, model: nn.Module | None, label: str, trained_lr: float | None = None) -> dict:
        """Probe `model` (None: the undefended model) and the zero-poison reference at the same learning rate (the
        defence's); the table's two ends (the undefended and zero-poison models) are probed once per session, at the
        first learning rate used. Returns the record written to probe.json, with the seconds this call took."""
        start = time.perf_counter()
        lr = self.lr_for(trained_lr)
        before = None
        if model is not None and not self.settings.always:
            before = self.measure(model)
            decided = decided_before(before, self.measured("reference"), self.settings.margin)
            if decided is not None:
                return self.untrained(label, lr, before, decided, start)
        if self._ends_lr is None:
            self._ends_lr = lr
        reference = self.cached("reference", lr)
        ends = {"lr": self._ends_lr, "backdoored": self.cached("backdoored", self._ends_lr),
                "reference": self.cached("reference", self._ends_lr)}
        probed = ends["backdoored"] if model is None and lr == self._ends_lr else (
            self.cached("backdoored", lr) if model is None else self.run(model, lr, label, before=before))
        margin = self.settings.margin
        return {**self.header(label, lr),
                "verdict": verdict(probed, reference, margin, self.settings.max_clean_drop), "model": strip_curve(probed), "reference": strip_curve(reference),
                "ends": {"lr": ends["lr"], "backdoored": strip_curve(ends["backdoored"]), "reference": strip_curve(ends["reference"]),
                         "backdoored_verdict": verdict(ends["backdoored"], ends["reference"], margin,
                                                       self.settings.max_clean_drop)},
                "curves": {"model": probed["curve"], "reference": reference["curve"], "backdoored": ends["backdoored"]["curve"],
                           "ends_reference": ends["reference"]["curve"]},
                "seconds": round(time.perf_counter() - start, 2)}

    def header(self, label: str, lr: float) -> dict:
        """What every probe.json record of this session starts with: the probe's settings, data and rule."""
        return {"label": label, "settings": {**dataclasses.asdict(self.settings), "lr": lr}, "k": len(self.rows),
                "poisoned_budget_rows": [int(r) for r in (self.clean.rows[self.rows] if self.clean.rows is not None else self.rows)],
                "budget_images": len(self.clean), "reference_dir": str(self.reference_dir),
                "rule": RULE.format(margin=100 * self.settings.margin, max_drop=100 * self.settings.max_clean_drop)}

    def untrained(self, label: str, lr: float, before: dict, decided: dict, start: float) -> dict:
        """probe.json's record for a model whose verdict the measurements before the probe decided: no probe trained."""
        note = ("not trained: the verdict was decided before the probe (the backdoor was never suppressed); "
                "probe.always=true trains it anyway")
        return {**self.header(label, lr), "trained": False, "note": note,
                "verdict": decided, "model": {"label": label, "lr": lr, "before": before, "after": None, "clean_acc_change": None},
                "reference": {"label": "zero-poison model", "lr": lr, "before": self.measured("reference"), "after": None,
                              "clean_acc_change": None},
                "ends": None, "curves": {},
                "seconds": round(time.perf_counter() - start, 2)}


def strip_curve(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "curve"}


def probe_segment(persistence: list[dict], probe_curve: list[dict]) -> list[dict]:
    """The defence's persistence curve with the probe appended as a final segment (epochs continue; column `segment`)."""
    last = max((r.get("epoch") or 0 for r in persistence), default=0)
    rows = [{**r, "segment": r.get("segment", "defence")} for r in persistence]
    rows += [{**r, "epoch": last + r["epoch"], "segment": "probe"} for r in probe_curve if r.get("epoch")]
    return rows


def probe_json(record: dict) -> bytes:
    return (json.dumps(record, indent=2, default=_default) + "\n").encode()


def write_probe(path: Path, record: dict) -> dict:
    """Write `record` to probe.json at `path` (atomically, the write rule applied) and return what the file holds."""
    text = probe_json(record).decode()
    write_text(path, text)
    return json.loads(text)


def _default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ---------------------------------------------------------------- tables


def _rate(entry: dict | None) -> str:
    if not entry or entry.get("rate") is None:
        return "n/a"
    lo, hi = entry["ci95"]
    return f"{100 * entry['rate']:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}]"


def table_rows(records: list[dict]) -> list[list[str]]:
    """One row per probed model, then the two ends (undefended and zero-poison models) once per learning rate."""
    rows, ends = [], {}
    for r in records:
        m, ref = r["model"], r["reference"]
        rows.append([r["label"], f"{r['settings']['lr']:g}", _rate(m["before"]["held_out"]["asr"]), _after(m), _after(ref),
                     _pts(m["clean_acc_change"]), r["verdict"]["verdict"]])
        if r.get("ends"):
            ends.setdefault(r["ends"]["lr"], r["ends"])
    for lr, e in ends.items():
        for key, verdict_of in (("backdoored", e["backdoored_verdict"]["verdict"]), ("reference", "reference")):
            x = e[key]
            if any(row[0] == x["label"] and row[1] == f"{lr:g}" for row in rows):
                continue
            rows.append([x["label"], f"{lr:g}", _rate(x["before"]["held_out"]["asr"]), _rate(x["after"]["held_out"]["asr"]),
                         _rate(e["reference"]["after"]["held_out"]["asr"]), _pts(x["clean_acc_change"]), verdict_of])
    return rows


HEADERS = ["model", "probe lr", "ASR before probe", "ASR after probe", "zero-poison after probe", "clean acc change", "verdict"]


def _after(result: dict) -> str:
    """ASR after the probe, or why there is none (a verdict decided before the probe trains no probe)."""
    return "not trained" if result.get("after") is None else _rate(result["after"]["held_out"]["asr"])


def _pts(change: float | None) -> str:
    return "n/a" if change is None else f"{100 * change:+.1f} pt"


def format_table(records: list[dict]) -> str:
    """The probe table as text (test + validation pooled, 95% Wilson intervals), with the rule under it."""
    if not records:
        return ""
    rows = table_rows(records)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADERS)]
    r0 = records[0]
    lines = [f"re-activation probe: k={r0['k']} poisoned + {r0['budget_images']} clean budget images, "
             f"~{r0['settings']['steps']} steps (ASR on test+val, 95% CI)",
             "  ".join(h.ljust(w) for h, w in zip(HEADERS, widths))]
    lines.append("-" * len(lines[-1]))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.append(r0["rule"])
    return "\n".join(lines)
