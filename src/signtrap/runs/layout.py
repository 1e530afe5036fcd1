"""The layout of a run folder, in one place: every module that reads or writes a run asks here.

    runs/NAME/                      a run (its config, checkpoint, metrics, log, pipeline record, report)
    runs/NAME/defence-METHOD/       one defence's model, report.json and, when probed, probe.json (probe-k20.json:
                                    `signtrap probe` at other settings than the run's, beside it, not over it)
    runs/NAME/export/               the default export folder (model.json, artefacts, bench.json)
    runs/NAME-zero/                 the zero-poison reference the probe compares with (a run of its own)

Pure path functions; imports nothing of signtrap.
"""
from __future__ import annotations

import os
from pathlib import Path

CONFIG, MANIFEST, PROVENANCE, CHECKSUMS = "config.yaml", "manifest.json", "provenance.json", "checksums.json"
MODEL, LAST, METRICS, LOG, PIPELINE = "model.pt", "last.pt", "metrics.json", "log.jsonl", "pipeline.json"
PROBE, REPORT_JSON, EXPORT = "probe.json", "report.json", "export"
DEFENCE_PREFIX = "defence-"
REFERENCE_SUFFIX = "-zero"

# the files of a run directory, trusted in one written before folders carried a write record (fileio's write rule)
RUN_NAMES = (CONFIG, MANIFEST, PROVENANCE, MODEL, CHECKSUMS, METRICS, LOG, PIPELINE, "report.html", "report.md", LAST,
             "backdoored.pt", "sleeper.json", PROBE, EXPORT, "report_files")


def probe_file(variant: str = "") -> str:
    """The probe record's file name: probe.json at the run's own probe settings (what `signtrap defend` and the
    pipeline's probe stage write), probe-VARIANT.json for a probe at other settings (`k20-steps500`)."""
    return f"probe-{variant}.json" if variant else PROBE


def owning_run(model_dir: str | os.PathLike) -> Path:
    """The run directory a model folder belongs to: itself, or its parent for a defence output."""
    model_dir = Path(model_dir)
    return model_dir if (model_dir / CONFIG).is_file() or not (model_dir.parent / CONFIG).is_file() else model_dir.parent


def recorded_name(run_dir: str | os.PathLike, path: str | os.PathLike) -> str:
    """How a run's pipeline record names one of its files: relative to the run, `../NAME-zero/...` for its twin."""
    return Path(os.path.relpath(Path(path).resolve(), Path(run_dir).resolve())).as_posix()


def defence_dir(run_dir: str | os.PathLike, method: str) -> Path:
    """Where defence `method` of the run writes its model and report."""
    return Path(run_dir) / f"{DEFENCE_PREFIX}{method}"


def defence_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """The run's defence folders, sorted by name."""
    return sorted(p for p in Path(run_dir).glob(f"{DEFENCE_PREFIX}*") if p.is_dir())


def defence_method(folder: str | os.PathLike) -> str | None:
    """The defence a defence folder holds (None for any other folder)."""
    name = Path(folder).name
    return name[len(DEFENCE_PREFIX):] if name.startswith(DEFENCE_PREFIX) else None


def model_dir(run_dir: str | os.PathLike, defence: str | None = None) -> Path:
    """The folder of the run's model, or of one defence's model."""
    return defence_dir(run_dir, defence) if defence else Path(run_dir)


def reference_dir(run_dir: str | os.PathLike) -> Path:
    """The default zero-poison reference of a run: a sibling run `NAME-zero`."""
    run_dir = Path(run_dir)
    return run_dir.parent / f"{run_dir.name}{REFERENCE_SUFFIX}"


def export_dir(run_dir: str | os.PathLike) -> Path:
    """The run's default export folder."""
    return Path(run_dir) / EXPORT
