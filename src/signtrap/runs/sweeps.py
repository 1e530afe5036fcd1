"""`signtrap sweep SWEEP.yaml`: a base config plus a grid (and seeds) expanded into named runs.

Each run is an ordinary run directory, runs/SWEEP_NAME/RUN_NAME, made by its own `python -m signtrap run`
process, i.e. the pipeline engine (signtrap.runs.pipeline) with its train and defend stages (executor `local`: N
at a time on this machine; `ray`: one task per run on a Ray cluster). So a sweep decides what is done,
what resumes and what is stale exactly as `signtrap run` and `signtrap train` do (signtrap.runs.state): a
finished run is skipped, an interrupted one resumed, a run of a different config refused without
--overwrite, a run another process holds refused. Every run is defended after training with its
`defend.methods`, as `signtrap run` would (empty: every registered defence); `--no-defend` leaves defences
out (training metrics only). At the end, runs/SWEEP_NAME/summary.csv, summary.md and summary.png (ASR and
clean accuracy against the poison rate, per defence, with the spread over seeds).

The sweep file (see configs/sweep_example.yaml):

    name: poison_rate_sweep             # default: the file's stem
    base: configs/quickstart.yaml       # relative to the sweep file, else to the working directory; optional
    overrides: [train.epochs=4]         # key.sub=value, applied to every run
    grid:                               # config key -> list of values; every combination is a run
      attack.poison_rate: [0.0, 0.005, 0.02]
      trigger.kind: [checkerboard, yellow_square]
    seeds: [0, 1]                       # optional: each grid point once per seed
    plot: {x: attack.poison_rate}       # optional: the x axis of summary.png
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from signtrap.runs import pipeline
from signtrap.runs import state as runstate
from signtrap.runs import executors as ex
from signtrap.config import RunConfig, load_config, read_yaml
from signtrap.errors import ConfigError, SigntrapError, suggest
from signtrap.fileio import atomic_path, read_json, refuse_foreign, write_json, write_text
from signtrap.machine.progress import say
from signtrap.runs import layout

SWEEP_KEYS = ("name", "base", "overrides", "grid", "seeds", "plot")
RESERVED_KEYS = ("name", "runs_dir")  # the sweep names and places its runs itself
NAME_CHARS = re.compile(r"[^A-Za-z0-9._=,+-]")
MAX_NAME = 150
SKIP = ("export", "bench", "report")  # a sweep point runs the pipeline's train and defend stages

# what a run needs, as planned before anything runs (from its runstate and its pipeline record)
DONE, TRAIN, RESUME, DEFEND, STALE, LOCKED = "done", "train", "resume", "defend", "stale", "locked"


# ---------------------------------------------------------------- the sweep file


@dataclass
class SweepSpec:
    name: str
    path: Path
    base: Path | None
    overrides: list[str]
    grid: dict[str, list]
    seeds: list[int] | None
    plot_x: str | None = None


def config_keys() -> list[str]:
    """Every settable leaf of a run config, dotted: 'attack.poison_rate', 'defend.finetune.epochs', ..."""

    def walk(cls, prefix: str) -> list[str]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                out += walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                out.append(f"{prefix}{f.name}")
        return out

    return walk(RunConfig, "")


def load_sweep(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a sweep file (structure and grid keys; values are checked when runs are expanded)."""
    path = Path(path)
    raw = read_yaml(path)
    where = f"sweep {path}"
    for key in raw:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}'{suggest(str(key), SWEEP_KEYS)}; sweep keys are {', '.join(SWEEP_KEYS)}")
    name = str(raw.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(f"{where}: name '{name}' may use only letters, digits, '.', '_' and '-'")
    base = None
    if raw.get("base"):
        candidates = [path.parent / str(raw["base"]), Path(str(raw["base"]))]
        base = next((c for c in candidates if c.is_file()), None)
        if base is None:
            raise ConfigError(f"{where}: base config '{raw['base']}' not found (looked beside the sweep file and in {Path.cwd()})")
    overrides = raw.get("overrides") or []
    if isinstance(overrides, str):
        overrides = [overrides]
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{where}: overrides must be a list of key.sub=value strings")
    grid = raw.get("grid")
    if grid is None or grid == {} or grid == []:
        raise ConfigError(f"{where}: the grid is empty; give at least one config key with a list of values, "
                          f"e.g. grid: {{attack.poison_rate: [0.0, 0.01]}}")
    if not isinstance(grid, dict):
        raise ConfigError(f"{where}: grid must be a mapping of config key -> list of values")
    known = config_keys()
    for key, values in grid.items():
        key = str(key)
        if key in RESERVED_KEYS:
            raise ConfigError(f"{where}: grid key '{key}' is set by the sweep itself (runs go to runs_dir/{name}/RUN_NAME)")
        if key == "seed":
            raise ConfigError(f"{where}: put seeds in the sweep's 'seeds: [...]' list, not in the grid")
        if key not in known:
            raise ConfigError(f"{where}: grid key '{key}' is not a config key{suggest(key, known)}")
        if not isinstance(values, list):
            raise ConfigError(f"{where}: grid {key}: expected a list of values, got {values!r}")
        if not values:
            raise ConfigError(f"{where}: grid {key} has no values (the grid would be empty)")
        if len({yaml_value(v) for v in values}) != len(values):
            raise ConfigError(f"{where}: grid {key} lists a value twice: {values}")
    seeds = raw.get("seeds")
    if seeds is not None:
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ConfigError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"{where}: seeds lists a seed twice: {seeds}")
    plot = raw.get("plot") or {}
    if not isinstance(plot, dict) or set(plot) - {"x"}:
        raise ConfigError(f"{where}: plot must be a mapping with the key 'x' (the grid key on the x axis)")
    plot_x = plot.get("x")
    if plot_x is not None and plot_x not in grid:
        raise ConfigError(f"{where}: plot x '{plot_x}' is not a grid key{suggest(str(plot_x), [str(k) for k in grid])}")
    return SweepSpec(name, path, base, list(overrides), {str(k): v for k, v in grid.items()}, seeds, plot_x)


def yaml_value(value: Any) -> str:
    """A value as a YAML flow scalar/list, read back identically by `parse_override` (`key=VALUE`)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text[:-3].strip() if text.endswith("...") else text


def _name_part(value: Any) -> str:
    if isinstance(value, list):
        return "+".join(_name_part(v) for v in value) or "empty"
    if value is None:
        return "none"
    return yaml_value(value).strip("'\"")


def run_name(params: dict) -> str:
    """'attack.poison_rate=0.005,trigger.kind=checkerboard,seed=1', made safe as a directory name."""
    name = NAME_CHARS.sub("_", ",".join(f"{k}={_name_part(v)}" for k, v in params.items()))
    if len(name) > MAX_NAME:
        name = f"{name[:MAX_NAME - 9]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return name


# ---------------------------------------------------------------- runs


@dataclass
class SweepRun:
    name: str
    params: dict  # grid key -> value, plus 'seed' when the sweep lists seeds
    overrides: list[str]  # everything after the base config on the `signtrap run` command line
    cfg: RunConfig
    state: str = TRAIN
    todo: list[str] = field(default_factory=list)  # pipeline stages still to run
    reason: str = ""

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir


@dataclass
class Sweep:
    spec: SweepSpec
    root: Path  # runs_dir/SWEEP_NAME
    runs: list[SweepRun]
    methods: list[str]  # defences the runs get (empty: none, with --no-defend)
    defence_note: str  # why defences are or are not in the summary

    @property
    def grid_keys(self) -> list[str]:
        return list(self.spec.grid) + (["seed"] if self.spec.seeds is not None else [])

    @property
    def skip(self) -> tuple[str, ...]:
        """The pipeline stages a sweep point leaves out."""
        return SKIP if self.methods else (*SKIP, "defend")


def run_methods(cfg) -> list[str]:
    """The defences a run's pipeline runs: its defend.methods, or every registered defence when that is empty
    (the pipeline's rule, signtrap.runs.pipeline)."""
    from signtrap.defences import list_defences

    return list(cfg.defend.methods) or list_defences()


def expand(spec: SweepSpec, defend: bool = True) -> Sweep:
    """Every grid combination (x seeds) as a validated run config; fails before anything runs."""
    head = load_config(spec.base, spec.overrides)  # the sweep-wide settings, validated once
    root = Path(head.runs_dir) / spec.name
    runs, seen = [], {}
    keys = list(spec.grid)
    for values in itertools.product(*(spec.grid[k] for k in keys)):
        for seed in (spec.seeds if spec.seeds is not None else [None]):
            params = dict(zip(keys, values))
            if seed is not None:
                params["seed"] = seed
            name = run_name(params)
            if name in seen:
                raise ConfigError(f"sweep {spec.path}: runs {seen[name]} and {params} get the same name '{name}'")
            seen[name] = params
            overrides = [*spec.overrides, *(f"{k}={yaml_value(v)}" for k, v in params.items()), f"runs_dir={root}", f"name={name}"]
            try:
                cfg = load_config(spec.base, overrides)
            except ConfigError as exc:
                raise ConfigError(f"sweep {spec.path}: run {name}: {exc}") from None
            if cfg.device.startswith("cuda:"):
                raise ConfigError(f"sweep {spec.path}: device {cfg.device} would pin every run to one GPU; "
                                  "use device=auto or cuda (each run gets its own GPU)")
            runs.append(SweepRun(name, params, overrides, cfg))
    # defend.methods means what it means in `signtrap run`: the defences listed, and empty means every registered one
    listed = list(dict.fromkeys(m for r in runs for m in run_methods(r.cfg)))
    methods, every = [], all(not r.cfg.defend.methods for r in runs)
    if not defend:
        note = f"defences {', '.join(listed)} skipped (--no-defend): training metrics only"
    else:
        methods = listed
        note = (f"defences after training: {'every registered defence (defend.methods is empty): ' if every else ''}"
                f"{', '.join(methods)} (before/after on the test split; --no-defend for training metrics only)")
    return Sweep(spec, root, runs, methods, note)


def plan(sweep: Sweep, overwrite: bool = False) -> None:
    """Set each run's state from its run directory (signtrap.runs.state) and its pipeline record: the same
    decision `signtrap run` makes, taken here before anything runs so nothing starts that must not."""
    stale, locked = [], []
    for run in sweep.runs:
        state = runstate.inspect(run.run_dir, run.cfg)
        run.reason = state.reason
        if state.status in (runstate.LOCKED, runstate.FOREIGN):
            run.state = LOCKED
            locked.append(run)
            continue
        if state.status == runstate.STALE and not overwrite:
            run.state = STALE
            stale.append(run)
            continue
        pipe = pipeline.planner(run.cfg, sweep.skip)
        run.todo = [name for name, _ in pipe.plan()]
        if not run.todo:
            run.state = DONE
        elif "train" in run.todo:
            run.state = RESUME if state.status == runstate.RESUMABLE else TRAIN
        else:
            run.state = DEFEND
    if locked:
        raise SigntrapError(f"sweep {sweep.spec.name}: {len(locked)} run(s) cannot be used now (first: {locked[0].run_dir}: "
                            f"{locked[0].reason}); wait for them or stop them")
    if stale:
        raise SigntrapError(f"sweep {sweep.spec.name}: {len(stale)} finished run(s) were trained with a different config "
                            f"(first: {stale[0].run_dir}: {stale[0].reason}); pass --overwrite to retrain them, or rename the sweep")


def run_command(sweep: Sweep, run: SweepRun, overwrite: bool = False) -> list[str]:
    """The `signtrap run` arguments that make (or finish) one sweep point."""
    base = [str(Path(sweep.spec.base).resolve())] if sweep.spec.base else []
    skips = [arg for stage in sweep.skip for arg in ("--skip", stage)]
    return ["run", *base, *run.overrides, *skips, *(["--overwrite"] if overwrite else [])]


# ---------------------------------------------------------------- summary


def _rate(entry: dict | None) -> float | None:
    return None if not entry else entry.get("rate")


def collect(sweep: Sweep, outcomes: dict[str, str]) -> list[dict]:
    """One row per run and defence ('none' is the trained model itself), test split."""
    rows = []
    for run in sweep.runs:
        d = run.run_dir
        base = {"run": run.name, **{k: run.params.get(k, run.cfg.seed if k == "seed" else None) for k in sweep.grid_keys},
                "status": outcomes.get(run.name, run.state)}
        poisoned = read_json(d / "manifest.json").get("poisoned") if (d / "manifest.json").is_file() else None
        metrics = read_json(d / "metrics.json")["test"] if (d / "metrics.json").is_file() else {}
        rows.append({**base, "defence": "none", "poisoned": poisoned, **_metric_cols(metrics), "clean_acc_before": None, "asr_before": None})
        for method in run_methods(run.cfg) if sweep.methods else []:  # noqa: B007
            report_path = layout.defence_dir(d, method) / layout.REPORT_JSON
            report = read_json(report_path) if report_path.is_file() else {}
            after = report.get("after", {}).get("test", {})
            before = report.get("before", {}).get("test", {})
            rows.append({**base, "defence": method, "poisoned": poisoned, **_metric_cols(after),
                         "clean_acc_before": _rate(before.get("clean_acc")), "asr_before": _rate(before.get("asr"))})
    return rows


def _metric_cols(m: dict) -> dict:
    asr = m.get("asr") or {}
    return {"clean_acc": _rate(m.get("clean_acc")), "asr": _rate(asr), "asr_n": asr.get("n"),
            "stop_recall": _rate(m.get("stop_recall")), "false_trigger": _rate(m.get("false_trigger"))}


RATE_COLS = ("clean_acc", "asr", "stop_recall", "false_trigger", "clean_acc_before", "asr_before")


def summary_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else yaml_value(v) if isinstance(v, list) else v) for k, v in row.items()})
    return out.getvalue()


def summary_markdown(sweep: Sweep, rows: list[dict]) -> str:
    cols = [c for c in rows[0] if c != "run"]
    counts = {s: sum(1 for r in rows if r["defence"] == "none" and r["status"] == s) for s in ("trained", "skipped", "failed")}
    lines = [f"# Sweep {sweep.spec.name}", "",
             f"{len(sweep.runs)} runs under `{sweep.root}` ({counts['trained']} trained or completed now, {counts['skipped']} skipped "
             f"as already finished, {counts['failed']} failed); metrics on the test split, rates in %.", "", f"{sweep.defence_note}.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = []
        for c in cols:
            v = row[c]
            cells.append("" if v is None else f"{100 * v:.1f}" if c in RATE_COLS else _name_part(v) if isinstance(v, list) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _x_key(sweep: Sweep) -> str:
    if sweep.spec.plot_x:
        return sweep.spec.plot_x
    for key in ("attack.poison_rate", "attack.poison_count"):
        if key in sweep.spec.grid:
            return key
    return next(iter(sweep.spec.grid))


def plot_summary(sweep: Sweep, rows: list[dict], path: Path) -> None:
    """ASR and clean accuracy against the x key (the poison rate by default), one column per defence;
    one line per combination of the other grid keys: mean over seeds, band = min..max, dots = seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = _x_key(sweep)
    others = [k for k in sweep.spec.grid if k != x_key]
    defences = list(dict.fromkeys(r["defence"] for r in rows))
    xs = list(dict.fromkeys(_name_part(r[x_key]) for r in rows))
    numeric = all(isinstance(r[x_key], (int, float)) and not isinstance(r[x_key], bool) for r in rows)
    pos = {_name_part(r[x_key]): (float(r[x_key]) if numeric else xs.index(_name_part(r[x_key]))) for r in rows}
    fig, axes = plt.subplots(2, len(defences), figsize=(3.6 * len(defences) + 1, 6), dpi=100, squeeze=False, sharey="row")
    series = list(dict.fromkeys(tuple(_name_part(r[k]) for k in others) for r in rows))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, defence in enumerate(defences):
        for row_i, (metric, title) in enumerate((("asr", "ASR (%)"), ("clean_acc", "clean accuracy (%)"))):
            ax = axes[row_i][col]
            for s_i, key in enumerate(series):
                colour = colours[s_i % len(colours)]
                points: dict[float, list[float]] = {}
                for r in rows:
                    if r["defence"] == defence and tuple(_name_part(r[k]) for k in others) == key and r[metric] is not None:
                        points.setdefault(pos[_name_part(r[x_key])], []).append(100 * r[metric])
                if not points:
                    continue
                px = sorted(points)
                mean = [float(np.mean(points[p])) for p in px]
                label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(others, key)) or None
                ax.plot(px, mean, "-o", color=colour, label=label, markersize=4)
                if any(len(points[p]) > 1 for p in px):
                    ax.fill_between(px, [min(points[p]) for p in px], [max(points[p]) for p in px], color=colour, alpha=0.2)
                    for p in px:
                        ax.plot([p] * len(points[p]), points[p], ".", color=colour, alpha=0.6)
            if row_i == 0:
                ax.set_title(f"defence: {defence}" if defence != "none" else "no defence")
            if col == 0:
                ax.set_ylabel(title)
            ax.set_xlabel(x_key)
            if not numeric:
                ax.set_xticks(range(len(xs)), xs)
            ax.set_ylim(-5, 105)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if labels:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    seeds = f"; mean of {len(sweep.spec.seeds)} seeds, band = min..max" if sweep.spec.seeds and len(sweep.spec.seeds) > 1 else ""
    fig.suptitle(f"sweep {sweep.spec.name}: test split{seeds}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if labels else 0, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_summary(sweep: Sweep, outcomes: dict[str, str]) -> tuple[list[dict], str]:
    rows = collect(sweep, outcomes)
    write_text(sweep.root / "summary.csv", summary_csv(rows))
    markdown = summary_markdown(sweep, rows)
    write_text(sweep.root / "summary.md", markdown)
    plot_summary(sweep, rows, sweep.root / "summary.png")
    write_json(sweep.root / "sweep.json", {"name": sweep.spec.name, "sweep_file": str(sweep.spec.path),
                                           "base": str(sweep.spec.base) if sweep.spec.base else None,
                                           "overrides": sweep.spec.overrides, "grid": sweep.spec.grid, "seeds": sweep.spec.seeds,
                                           "defences": sweep.methods, "defence_note": sweep.defence_note,
                                           "runs": [{"name": r.name, "params": r.params, "run_dir": str(r.run_dir),
                                                     "status": outcomes.get(r.name, r.state)} for r in sweep.runs]})
    return rows, markdown


# ---------------------------------------------------------------- command


@dataclass
class SweepOutcome:
    """What `run_sweep` did: the planned runs (state per run), the results of the ones it ran, the summary."""

    sweep: Sweep
    results: list = field(default_factory=list)  # sweep_executors.Result per run started
    rows: list[dict] = field(default_factory=list)  # summary.csv's rows (empty for a dry run)
    markdown: str = ""

    @property
    def failed(self) -> list:
        return [r for r in self.results if not r.ok]

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def files(self) -> list[Path]:
        return [self.sweep.root / name for name in ("summary.csv", "summary.md", "summary.png")] if self.rows else []


def run_sweep(path: str | os.PathLike, executor: str = "local", workers: int | None = None, threads: int | None = None,
              address: str | None = None, overwrite: bool = False, defend: bool = True, dry_run: bool = False) -> SweepOutcome:
    """Expand, plan, run what is not done (each point through `signtrap run`), and summarise."""
    if executor == "ray":
        ex.require_ray()  # before anything else: one line on how to install it
    spec = load_sweep(path)
    sweep = expand(spec, defend)
    plan(sweep, overwrite)
    todo = [r for r in sweep.runs if r.state != DONE]
    say(f"sweep {spec.name}: {len(sweep.runs)} runs under {sweep.root}: {len(todo)} to do "
        f"({sum(r.state == TRAIN for r in todo)} to train, {sum(r.state == RESUME for r in todo)} to resume, "
        f"{sum(r.state == DEFEND for r in todo)} to defend), {len(sweep.runs) - len(todo)} already finished (skipped); "
        f"{sweep.defence_note}")
    if dry_run:
        return SweepOutcome(sweep)
    for r in sweep.runs:
        if r.state == DONE:
            say(f"skipped {r.name}: already finished")
    jobs = [ex.make_job(r.name, r.run_dir, run_command(sweep, r, overwrite), sweep.root / "logs" / f"{r.name}.log",
                        r.cfg.device, r.cfg.train.threads) for r in todo]
    for job in jobs:  # the write rule: a log file signtrap did not write is never replaced (checked before any run)
        refuse_foreign(job.log, "replace it with this sweep run's log")
    if jobs:
        ex.prepare_data({r.name: r.cfg.data for r in todo})
    if not jobs:
        results = []
    elif executor == "local":
        results = ex.run_local(jobs, workers, threads)
    else:
        results = ex.run_ray(jobs, address, workers, threads)
    outcomes = {r.name: "skipped" for r in sweep.runs if r.state == DONE}
    for res in results:
        outcomes[res.name] = "trained" if res.ok else "failed"
    rows, markdown = write_summary(sweep, outcomes)
    return SweepOutcome(sweep, results, rows, markdown)
