"""`signtrap run CONFIG`: train -> reference -> defend:M, probe:M (each defence) -> export -> bench -> report in one
run directory, resumable. The probe's zero-poison twin (`reference`, RUNS/NAME-zero) and the re-activation probe of
each repaired model (`probe:M`, defence-M/probe.json) are stages like the others.

Each stage records, in runs/NAME/pipeline.json, the SHA-256 of every file it wrote and a key: a hash of
the settings it was made from and of its upstream stages' outputs. A later run skips a stage whose key
matches and whose files are all present and intact; it re-runs a stage whose file is missing or
corrupted (hash mismatch), whose settings changed, or whose upstream stage was re-made, and never hands
a corrupted file to a later stage. `signtrap report RUN` renders the report of any run directory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from signtrap.machine import progress as progress_mod
from signtrap.runs import state as runstate
from signtrap.config import to_dict
from signtrap.data.cache import cache_path
from signtrap.deploy.bench import bench_export
from signtrap.deploy.exporter import export_run
from signtrap.errors import SigntrapError
from signtrap.config import DEFEND_COMMON
from signtrap.defences import list_defences
from signtrap.defences.run import Session
from signtrap.fileio import read_json, sha256_file, write_json
from signtrap.machine.progress import say
from signtrap.probing.reactivation import reference_config, train_reference
from signtrap.machine import cores
from signtrap.machine.environment import cpu_threads
from signtrap.reporting import REPORT_VERSION, build_report
from signtrap.training.trainer import train
from signtrap.runs import layout

PIPELINE_FILE = layout.PIPELINE
FORMAT = "signtrap.runs.pipeline/1"
EXPORT_DIR = layout.EXPORT  # the pipeline's export folder, inside the run directory
BENCH_FILES = ("bench.json", "bench.md", "bench.png")
# files a stage records and checks but no later stage builds on: re-measuring a model (`signtrap eval`, digital or
# --physical) rewrites its metrics.json and records the new hash (runs.state.record_remeasured); the stages after it
# are not re-run for that
MEASUREMENTS = (layout.METRICS,)

# stage outcomes
RAN, SKIPPED, FAILED, DISABLED, BLOCKED = "ran", "skipped", "failed", "disabled", "blocked"


@dataclass
class Stage:
    """One step: `run()` makes its outputs and returns the files (absolute paths) to record."""

    name: str
    deps: tuple[str, ...]
    settings: Any  # JSON-able: what, besides the upstream outputs, the stage's result depends on
    run: Callable[[], list[Path]] | None
    disabled: str | None = None  # why the config turned it off
    soft_deps: bool = False  # run with whatever upstream stages succeeded (the report)
    describe: Callable[[], str] | None = None  # one line on what its outputs say (the closing table's note)
    # its settings as the signtrap version that made the recorded outputs keyed them (settings added since, at their
    # defaults, left out), or None: a stage recorded before an upgrade is then still intact
    recorded_as: Callable[[], Any] | None = None


@dataclass
class Outcome:
    name: str
    status: str
    reason: str = ""  # why it ran (or was skipped, disabled, blocked; the failure when it failed)
    seconds: float = 0.0
    note: str = ""  # what happened: a ran or intact stage's outputs in one line (the closing table's note column)


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class Pipeline:
    """Runs stages in order against the record in `run_dir/pipeline.json`."""

    def __init__(self, run_dir: Path, stages: list[Stage], config: dict | None = None, force: bool = False):
        self.run_dir = Path(run_dir)
        self.stages = stages
        self.config = config
        self.force = force
        self.path = self.run_dir / PIPELINE_FILE
        self.record = self._load()

    def _load(self) -> dict:
        if not self.path.is_file():
            return {"format": FORMAT, "stages": {}}
        try:
            record = read_json(self.path)
        except SigntrapError as exc:
            say(f"pipeline: {exc}; starting a fresh record (every stage is checked again)")
            return {"format": FORMAT, "stages": {}}
        if not isinstance(record, dict) or not isinstance(record.get("stages"), dict):
            say(f"pipeline: {self.path} is not a pipeline record; starting a fresh one")
            return {"format": FORMAT, "stages": {}}
        return record

    def save(self) -> None:
        self.record["format"] = FORMAT
        self.record["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if self.config is not None:
            self.record["config"] = self.config
        write_json(self.path, self.record)

    # ------------------------------------------------------------ checks

    def outputs_digest(self, name: str, measurements: bool = False) -> str | None:
        """The digest of a done stage's outputs that the stages after it build on: its measurements (MEASUREMENTS)
        left out unless `measurements` (the key of records written before they were)."""
        rec = self.record["stages"].get(name)
        if not rec or rec.get("status") != "done":
            return None
        outputs = rec["outputs"] if measurements else {k: v for k, v in rec["outputs"].items() if Path(k).name not in MEASUREMENTS}
        return digest(outputs)

    def key(self, stage: Stage, deps: list[str], measurements: bool = False, settings: Any = None) -> str:
        return digest({"settings": stage.settings if settings is None else settings,
                       "deps": {d: self.outputs_digest(d, measurements) for d in deps}})

    def same_key(self, stage: Stage, deps: list[str]) -> bool:
        """Whether the stage's recorded key is today's, or one an earlier signtrap wrote for the same settings: keyed
        before measurements were left out of the digests (MEASUREMENTS), or before settings were added (their
        defaults left out, `Stage.recorded_as`)."""
        recorded = self.record["stages"][stage.name].get("key")
        if recorded in (self.key(stage, deps), self.key(stage, deps, measurements=True)):
            return True
        older = stage.recorded_as() if stage.recorded_as is not None else None
        return older is not None and older != stage.settings and recorded in (
            self.key(stage, deps, settings=older), self.key(stage, deps, measurements=True, settings=older))

    def check_outputs(self, name: str) -> str | None:
        """None when every recorded output is present with its recorded hash; else what is wrong."""
        rec = self.record["stages"][name]
        for rel, expected in sorted(rec.get("outputs", {}).items()):
            path = self.run_dir / rel
            if not path.is_file():
                return f"{rel} is missing"
            if sha256_file(path) != expected:
                return f"{rel} is corrupted (SHA-256 mismatch with the recorded hash)"
        return None

    def why_run(self, stage: Stage, deps: list[str], remade: set[str]) -> str | None:
        rec = self.record["stages"].get(stage.name)
        if self.force:
            return "--force"
        if not rec or rec.get("status") != "done":
            if not rec:
                return "not run yet"
            if rec.get("status") in ("running", "interrupted"):  # this process holds the run's lock: that attempt is dead
                return "previous attempt was interrupted (its process is gone); resuming"
            return f"previous attempt {rec.get('status', 'incomplete')}"
        upstream = [d for d in deps if d in remade]
        if upstream:
            return f"upstream {', '.join(upstream)} re-made"
        if not self.same_key(stage, deps):
            return "settings or upstream outputs changed"
        return self.check_outputs(stage.name)

    # ------------------------------------------------------------ run

    def gate(self, stage: Stage, status: dict[str, str], remade: set[str]) -> tuple[str, str | None, list[str]]:
        """(what to do, why, the upstream stages it builds on) for `stage`, given what happened upstream:
        DISABLED / BLOCKED (with the reason), SKIPPED (intact) or RAN (with why it must run)."""
        if stage.disabled:
            return DISABLED, stage.disabled, []
        missing = [d for d in stage.deps if status.get(d) not in (RAN, SKIPPED)]
        if missing and not stage.soft_deps:
            return BLOCKED, f"needs {', '.join(missing)}, which did not complete", []
        deps = [d for d in stage.deps if status.get(d) in (RAN, SKIPPED)]
        reason = self.why_run(stage, deps, remade)
        return (SKIPPED, "outputs intact", deps) if reason is None else (RAN, reason, deps)

    def plan(self) -> list[tuple[str, str]]:
        """The stages `run()` would run now, with why, without running anything (failures are not foreseen)."""
        status: dict[str, str] = {}
        remade: set[str] = set()
        todo = []
        for stage in self.stages:
            kind, reason, _ = self.gate(stage, status, remade)
            status[stage.name] = kind
            if kind == RAN:
                remade.add(stage.name)
                todo.append((stage.name, reason))
        return todo

    def run(self) -> list[Outcome]:
        outcomes: list[Outcome] = []
        status: dict[str, str] = {}
        remade: set[str] = set()
        active = [s for s in self.stages if not s.disabled]
        previous = {s.name: self.record["stages"].get(s.name, {}).get("seconds") for s in active}
        started = time.perf_counter()
        for index, stage in enumerate(self.stages, 1):
            head = f"[{index}/{len(self.stages)}] {stage.name}"
            kind, reason, deps = self.gate(stage, status, remade)
            if kind in (DISABLED, BLOCKED):
                self._mark(stage.name, kind, reason)
                outcomes.append(Outcome(stage.name, kind, reason))
                status[stage.name] = kind
                say(f"{head}: {kind}: {reason}")
                continue
            if kind == SKIPPED:
                rec, key = self.record["stages"][stage.name], self.key(stage, deps)
                if rec.get("key") != key:  # keyed by an earlier signtrap (Pipeline.same_key): stored under today's key
                    rec["key"] = key
                    self.save()
                outcomes.append(Outcome(stage.name, SKIPPED, reason, note=self._describe(stage, "up to date")))
                status[stage.name] = SKIPPED
                say(f"{head}: up to date (outputs present, hashes match), skipped")
                continue
            eta = self._eta(self.stages[index - 1:], previous, status)
            say(f"{head}: running ({reason}); {time.perf_counter() - started:.0f} s elapsed{eta}")
            self._mark(stage.name, "running", reason)
            t0 = time.perf_counter()
            try:
                files = stage.run()
            except KeyboardInterrupt:
                self._mark(stage.name, "interrupted", "interrupted; the next run resumes here")
                raise
            except Exception as exc:  # one failed stage blocks its dependants, not the others
                seconds = time.perf_counter() - t0
                text = str(exc).splitlines()[0] if str(exc) else ""
                message = f"{type(exc).__name__}: {text}" if not isinstance(exc, SigntrapError) else text
                self._mark(stage.name, FAILED, message, seconds=seconds)
                outcomes.append(Outcome(stage.name, FAILED, message, seconds))
                status[stage.name] = FAILED
                say(f"{head}: FAILED after {seconds:.1f} s: {message}")
                if not isinstance(exc, SigntrapError) and os.environ.get("SIGNTRAP_DEBUG"):
                    traceback.print_exc(file=sys.stderr)
                continue
            seconds = time.perf_counter() - t0
            self.record["stages"][stage.name] = {
                "status": "done", "key": None, "outputs": self._hashes(files), "seconds": round(seconds, 2),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reason": reason}
            self.record["stages"][stage.name]["key"] = self.key(stage, deps)
            self.save()
            remade.add(stage.name)
            status[stage.name] = RAN
            outcomes.append(Outcome(stage.name, RAN, reason, seconds, note=self._describe(stage, "" if reason == "not run yet" else reason)))
            say(f"{head}: done in {seconds:.1f} s")
        return outcomes

    @staticmethod
    def _describe(stage: Stage, why: str) -> str:
        """The stage's own one-line account of its outputs, with why it ran when that is news (not a first run)."""
        text = ""
        if stage.describe is not None:
            try:
                text = stage.describe()
            except Exception:  # an account of the outputs never fails the pipeline
                text = ""
        return "; ".join(t for t in (text, why) if t)

    def _eta(self, remaining: list[Stage], previous: dict, status: dict) -> str:
        known = [previous.get(s.name) for s in remaining if not s.disabled]
        if known and all(isinstance(k, (int, float)) for k in known):
            return f", about {sum(known):.0f} s left (last run's timings)"
        return ""

    def _hashes(self, files: list[Path]) -> dict[str, str]:
        out = {}
        for path in files:
            path = Path(path)
            out[layout.recorded_name(self.run_dir, path)] = sha256_file(path)  # ../NAME-zero/...: the reference
        return dict(sorted(out.items()))

    def _mark(self, name: str, status: str, reason: str, seconds: float | None = None) -> None:
        rec = {"status": status, "reason": reason}
        if seconds is not None:
            rec["seconds"] = round(seconds, 2)
        old = self.record["stages"].get(name, {})
        if status == "running" and old.get("seconds") is not None:
            rec["seconds"] = old["seconds"]  # keep the last timing for ETAs
        self.record["stages"][name] = rec
        self.save()


# ---------------------------------------------------------------- the signtrap stages


def files_under(folder: Path, exclude: tuple[str, ...] = ()) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name not in exclude and not p.name.startswith("."))


def _without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


class SigntrapStages:
    """Builds the train / defend / export / bench / report stages of one config."""

    def __init__(self, cfg, skip: tuple[str, ...] = (), force: bool = False):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.skip = set(skip)
        self.force = force
        self.raw = cfg.to_dict()
        self._session = None

    # -------------------------------------------------- train

    def train_settings(self) -> dict:
        settings = self.cfg.training_view()  # the one notion of "the same training config"
        try:
            settings["data_cache"] = cache_path(self.cfg.data).name  # changes with the data and the generator code
        except SigntrapError:
            pass  # the train stage reports the data problem itself
        return settings

    def train_recorded_as(self) -> dict | None:
        return runstate.view_before_new_settings(self.run_dir, self.train_settings())

    def run_train(self) -> list[Path]:
        state = runstate.inspect(self.run_dir, self.cfg)
        resume = state.status == runstate.RESUMABLE and not self.force
        if resume:
            say(f"train: resuming the interrupted training ({state.reason})")
        train(self.cfg, resume=resume, overwrite=not resume and state.status != runstate.NEW)
        return [self.run_dir / f for f in runstate.FINISHED_FILES]

    def adopt(self, pipe: "Pipeline", stage: Stage) -> bool:
        """Record a finished `signtrap train` run of the same training config as the train stage."""
        if pipe.record["stages"].get("train") or not runstate.inspect(self.run_dir, self.cfg).done:
            return False
        pipe.record["stages"]["train"] = {"status": "done", "outputs": pipe._hashes([self.run_dir / f for f in runstate.FINISHED_FILES]),
                                          "key": pipe.key(stage, []), "reason": "adopted a finished `signtrap train` run",
                                          "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        say(f"train: adopting the existing trained run in {self.run_dir} (same config, checkpoint hash verified)")
        return True

    # -------------------------------------------------- defend

    def methods(self) -> list[str]:
        """The defences to run: the config's `defend.methods` (validated at load), else every registered defence."""
        return list(self.cfg.defend.methods) or list_defences()

    def defend_settings(self, method: str) -> dict:
        """What a defence's output depends on besides the trained model: the common settings and its own."""
        d = self.cfg.defend
        common = {k: v for k, v in to_dict(d).items() if k in DEFEND_COMMON and k not in ("methods", "probe")}  # probe: its stage
        return {"common": common, "method": method, "settings": dataclasses.asdict(d.method(method))}

    def defend_recorded_as(self, method: str) -> dict | None:
        """The defence's settings without those added to it since its folder was made (absent from the settings its
        report.json recorded, at their defaults): what the earlier version keyed the stage on."""
        try:
            stored = read_json(layout.defence_dir(self.run_dir, method) / "report.json")["settings"]
        except (SigntrapError, KeyError, TypeError):
            return None
        now = self.defend_settings(method)
        defaults = dataclasses.asdict(type(self.cfg.defend.method(method))())
        return {**now, "settings": runstate.without_new_settings(now["settings"], stored, defaults)}

    def session(self) -> Session:
        if self._session is None:
            self._session = Session.open(self.run_dir, device=None, show_progress=not progress_mod.QUIET, cfg=self.cfg)
        return self._session

    # -------------------------------------------------- the probe's zero-poison reference

    def reference_off(self, methods: list[str]) -> str | None:
        """Why there is no reference stage (the probe needs none, or none trained here), or None."""
        p = self.cfg.defend.probe
        if "defend" in self.skip or not methods:
            return "no defence runs (the probe follows the defences)"
        if "probe" in self.skip:
            return "skipped with --skip probe"
        if not p.enabled:
            return "defend.probe.enabled is false"
        if not self.cfg.attack.active:
            return "the run is zero-poison: its own reference"
        if p.reference is not None:
            return f"given: {p.reference} (checked by each defence's probe)"
        if not p.train_reference:
            return "defend.probe.train_reference is false"
        return None

    def reference_dir(self) -> Path:
        return layout.reference_dir(self.run_dir)

    def reference_settings(self) -> dict:
        return reference_config(self.cfg, self.reference_dir()).training_view()

    def reference_recorded_as(self) -> dict | None:
        return runstate.view_before_new_settings(self.reference_dir(), self.reference_settings())

    def run_reference(self) -> list[Path]:
        """The zero-poison twin RUNS/NAME-zero that every defence's probe compares with: trained (or resumed) here,
        as a stage of its own, so it is recorded, hashed and resumed like the run itself. Nothing is trained when the
        defender's budget cannot feed the probe (too few source-class images for probe.k: each probe says so)."""
        ref = self.reference_dir()
        self._no_probe = self.session().probe_unavailable
        if self._no_probe:
            return []
        train_reference(self.run_dir, self.cfg, ref)
        return [ref / f for f in runstate.FINISHED_FILES]

    def describe_reference(self) -> str:
        if getattr(self, "_no_probe", None):
            return f"none trained: {self._no_probe}"
        m = read_json(self.reference_dir() / "metrics.json")["test"]
        return f"{self.reference_dir().name}: test clean acc {_rate(m.get('clean_acc'))}, ASR {_rate(m.get('asr'))}"

    def run_defence(self, method: str) -> list[Path]:
        self.session().run(method, probe=False)  # the probe is the next stage
        return files_under(layout.defence_dir(self.run_dir, method), exclude=(layout.PROBE,))

    # -------------------------------------------------- the re-activation probe of each repaired model

    def probe_off(self) -> str | None:
        """Why no defence is probed, or None (a defence that changes no model is found out when its probe stage runs)."""
        if "defend" in self.skip:
            return "skipped with --skip defend"
        if "probe" in self.skip:
            return "skipped with --skip probe"
        if not self.cfg.defend.probe.enabled:
            return "defend.probe.enabled is false"
        return None

    def probe_settings(self, method: str) -> dict:
        """What a probe's record depends on besides the repaired model and the reference: the probe's settings and
        the defender's budget (the defence's own settings reach it through the defence stage's outputs)."""
        return {**self.defend_settings(method)["common"], "probe": to_dict(self.cfg.defend.probe)}

    def run_probe(self, method: str) -> list[Path]:
        folder = layout.defence_dir(self.run_dir, method)
        self.session().probe(folder)
        return [folder / layout.PROBE] if (folder / layout.PROBE).is_file() else []

    def describe_probe(self, method: str) -> str:
        folder = layout.defence_dir(self.run_dir, method)
        if not (folder / layout.PROBE).is_file():
            report = read_json(folder / layout.REPORT_JSON)
            return (f"not run: {report['probe_skipped']}" if report.get("probe_skipped") else
                    "nothing to probe: the defence changed no model (detector or filter)")
        record = read_json(folder / layout.PROBE)
        m, ref = record["model"], record["reference"]
        if m.get("after") is None:  # the verdict was decided before the probe: none trained
            return (f"{record['verdict']['verdict']}: held-out ASR {_rate(m['before']['held_out']['asr'])} against the zero-poison "
                    f"twin's {_rate(ref['before']['held_out']['asr'])} before any probe; the probe was not trained (probe.always=true trains it)")
        return (f"{record['verdict']['verdict']}: held-out ASR {_rate(m['before']['held_out']['asr'])} -> "
                f"{_rate(m['after']['held_out']['asr'])} with k={record['k']} (zero-poison twin -> "
                f"{_rate(ref['after']['held_out']['asr'])})")

    # -------------------------------------------------- export / bench

    def export_settings(self) -> dict:
        return _without(self.raw["export"], "enabled", "out_dir", "bench_runs", "bench_warmup", "bench_batch")

    def run_export(self) -> list[Path]:
        out = self.run_dir / EXPORT_DIR
        export_run(self.run_dir, out=out, overrides=self.export_settings(), threads=self.cfg.train.threads)
        return files_under(out, exclude=BENCH_FILES)

    def bench_settings(self) -> dict:
        e = self.raw["export"]
        return {"runs": e["bench_runs"], "warmup": e["bench_warmup"], "batch": e["bench_batch"], "threads": self.cfg.train.threads}

    def run_bench(self) -> list[Path]:
        folder = self.run_dir / EXPORT_DIR
        e = self.cfg.export
        bench_export(folder, threads=self.cfg.train.threads, runs=e.bench_runs, warmup=e.bench_warmup, batch=e.bench_batch)
        return [folder / f for f in BENCH_FILES if (folder / f).is_file()]

    # -------------------------------------------------- report

    def run_report(self) -> list[Path]:
        return build_report(self.run_dir)

    # -------------------------------------------------- what each stage's outputs say (the closing table)

    def describe_train(self) -> str:
        m = read_json(self.run_dir / "metrics.json")["test"]
        return f"test clean acc {_rate(m.get('clean_acc'))}, ASR {_rate(m.get('asr'))}"

    def describe_defence(self, method: str) -> str:
        r = read_json(layout.defence_dir(self.run_dir, method) / layout.REPORT_JSON)
        before, after = r["before"]["test"], (r.get("after") or {}).get("test") or {}
        parts = [f"ASR {_rate(before.get('asr'))} -> {_rate(after.get('asr'))}, "
                 f"clean {_rate(before.get('clean_acc'))} -> {_rate(after.get('clean_acc'))}"]
        sel = (r.get("details") or {}).get("selection") or {}
        if sel and not sel.get("fixed"):
            parts.append(f"{sel['knob']}={sel['value']:g} chosen" + ("" if sel.get("within_tolerance") else " (none kept the model)"))
        if not r.get("repaired_model"):
            parts.append("no repair (detector or filter)")
        return "; ".join(parts)

    def describe_export(self) -> str:
        manifest = read_json(self.run_dir / EXPORT_DIR / "model.json")
        arts = manifest.get("artefacts", [])
        runtimes = sorted({a.get("runtime") for a in arts if a.get("runtime")})
        rejected = manifest.get("rejected") or []
        return (f"{len(arts)} artefacts for {len(runtimes)} runtime{'s' if len(runtimes) != 1 else ''} ({', '.join(runtimes)})"
                + (f", {len(rejected)} rejected by the gate" if rejected else ""))

    def describe_bench(self) -> str:
        rows = [r for r in read_json(self.run_dir / EXPORT_DIR / "bench.json").get("rows", []) if "error" not in r]
        asr = [r["asr"]["rate"] for r in rows if (r.get("asr") or {}).get("rate") is not None]
        fastest = min(rows, key=lambda r: r["latency_ms"]["p50"], default=None)
        text = f"{len(rows)} artefacts measured"
        if asr:
            text += f", ASR {100 * min(asr):.1f}-{100 * max(asr):.1f}%"
        if fastest is not None:
            text += f", fastest batch-1 {fastest['artefact']} {fastest['latency_ms']['p50']:.2f} ms"
        return text

    def describe_report(self) -> str:
        return "report.html and report.md written"

    # -------------------------------------------------- all

    def on_cores(self, run: Callable[[], list[Path]], wait: bool = True) -> Callable[[], list[Path]]:
        """A stage's work with CPU cores claimed for it alone (signtrap.machine.cores): between stages the pipeline
        holds none, so a pipeline started beside another job grows to the cores that job gives back."""
        def claimed() -> list[Path]:
            with cpu_threads(self.cfg.train.threads, wait=wait):
                return run()
        return claimed

    def stages(self) -> list[Stage]:
        stages = [Stage("train", (), self.train_settings(), self.on_cores(self.run_train), describe=self.describe_train,
                        recorded_as=self.train_recorded_as)]
        methods = self.methods()
        reference_off = self.reference_off(methods)
        stages.append(Stage("reference", ("train",), self.reference_settings(), self.on_cores(self.run_reference),
                            disabled=reference_off, describe=self.describe_reference, recorded_as=self.reference_recorded_as))
        probe_off = self.probe_off()
        for m in methods:
            off = "skipped with --skip defend" if "defend" in self.skip else None
            stages.append(Stage(f"defend:{m}", ("train",), self.defend_settings(m), self.on_cores(lambda m=m: self.run_defence(m)),
                                disabled=off, describe=lambda m=m: self.describe_defence(m),
                                recorded_as=lambda m=m: self.defend_recorded_as(m)))
            stages.append(Stage(f"probe:{m}", (f"defend:{m}",) if reference_off else (f"defend:{m}", "reference"),
                                self.probe_settings(m), self.on_cores(lambda m=m: self.run_probe(m)), disabled=probe_off,
                                describe=lambda m=m: self.describe_probe(m)))
        if not methods:
            stages.append(Stage("defend", ("train",), None, None, disabled="no defences registered"))
        export_off = ("export.enabled is false" if not self.cfg.export.enabled else
                      "skipped with --skip export" if "export" in self.skip else None)
        stages.append(Stage("export", ("train",), self.export_settings(), self.on_cores(self.run_export), disabled=export_off,
                            describe=self.describe_export))
        bench_off = export_off or ("skipped with --skip bench" if "bench" in self.skip else None)
        stages.append(Stage("bench", ("export",), self.bench_settings(), self.on_cores(self.run_bench), disabled=bench_off,
                            describe=self.describe_bench))
        upstream = tuple(s.name for s in stages if s.run is not None)
        stages.append(Stage("report", upstream, {"version": REPORT_VERSION}, self.on_cores(self.run_report, wait=False), soft_deps=True,
                            disabled="skipped with --skip report" if "report" in self.skip else None,
                            describe=self.describe_report))
        return stages


def planner(cfg, skip: tuple[str, ...] = (), force: bool = False) -> Pipeline:
    """The pipeline of `cfg` against its run directory's record (a finished `signtrap train` run of the same
    training config adopted as the train stage); `.plan()` says what would run, `.run()` runs it."""
    builder = SigntrapStages(cfg, skip, force=force)
    pipe = Pipeline(builder.run_dir, builder.stages(), config=cfg.to_dict(), force=force)
    if not force:
        builder.adopt(pipe, pipe.stages[0])
    return pipe


def check_run_dir(cfg, force: bool = False, overwrite: bool = False) -> runstate.RunState:
    """Refuse, before anything runs, a run directory `signtrap run` must not touch: another process's,
    not a run directory, or holding a model of a different training config (unless force or overwrite)."""
    state = runstate.inspect(cfg.run_dir, cfg)
    if state.status in (runstate.LOCKED, runstate.FOREIGN):
        runstate.decide(state)
    if state.status == runstate.STALE and not (force or overwrite):
        raise SigntrapError(f"{cfg.run_dir}: {state.reason}; pass --overwrite to retrain it, or choose another run name (name=...)")
    return state


def run_pipeline(cfg, force: bool = False, skip: tuple[str, ...] = (), overwrite: bool = False) -> dict:
    """Run (or resume) the whole pipeline for `cfg`; returns a summary dict (also what `--json` prints)."""
    check_run_dir(cfg, force, overwrite)
    run_dir = Path(cfg.run_dir)
    cores.check_threads(cfg.train.threads)  # one line before anything; each stage claims its cores itself
    with runstate.locked(run_dir, "signtrap run") as lock:
        pipe = planner(cfg, skip, force)  # validates the stage settings (e.g. unknown defences) before any stage runs
        say(f"pipeline {run_dir}: " + " -> ".join(s.name for s in pipe.stages))
        started = time.perf_counter()
        outcomes = pipe.run()
        seconds = time.perf_counter() - started
        report = run_dir / "report.html"
        problems = [o for o in outcomes if o.status in (FAILED, BLOCKED)]
        summary = {"run": str(run_dir), "report": str(report) if report.is_file() else None,
                   "report_md": str(run_dir / "report.md") if (run_dir / "report.md").is_file() else None,
                   "seconds": round(seconds, 2), "ok": not problems,
                   "stages": [dataclasses.asdict(o) for o in outcomes]}
        made = any(rec.get("status") == "done" for rec in pipe.record["stages"].values())
        if lock.created_dir and not made:  # nothing was made: leave no run directory behind
            pipe.path.unlink(missing_ok=True)
        else:
            pipe.record["last_run"] = {"seconds": summary["seconds"], "ok": summary["ok"],
                                       "outcomes": {o.name: o.status for o in outcomes}}
            pipe.save()
    return summary


def _rate(entry: dict | None) -> str:
    return "n/a" if not entry or entry.get("rate") is None else f"{100 * entry['rate']:.1f}%"


def summary_text(summary: dict) -> str:
    """The closing table: per stage its status, seconds and a note: what its outputs say for a stage that ran or
    was intact (with why it re-ran, when it did not run for the first time); why, for the others."""
    lines = [f"{'stage':<26}{'status':<13}{'seconds':>9}  note", "-" * 78]
    for s in summary["stages"]:
        secs = f"{s['seconds']:.1f}" if s["status"] in (RAN, FAILED) else "-"
        note = s.get("note") or (s["reason"] if s["status"] != RAN or s["reason"] != "not run yet" else "done")
        lines.append(f"{s['name']:<26}{s['status']:<13}{secs:>9}  {note}")
    lines.append(f"total {summary['seconds']:.1f} s")
    return "\n".join(lines)
