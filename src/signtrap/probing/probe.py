"""`signtrap probe RUN_OR_DEFENCE_DIR`: the re-activation probe (`signtrap.probing.reactivation`) on a run's own model or on
a defence's repaired model, against the zero-poison model of the same config; writes probe.json beside the model, or,
at settings other than the run's (`k=20`), probe-k20.json beside it: a stronger probe never replaces the record of
`signtrap defend` or of the pipeline's probe stage (which would probe again over it). Asked for by name, the probe
trains even where that stage decided the verdict without training it; such a record goes to probe-trained.json.

    signtrap probe runs/NAME                          # the undefended model: where the table's top end lies
    signtrap probe runs/NAME/defence-finetune         # removed or only hidden?
    signtrap probe runs/NAME --reference runs/NAME-zero k=10 steps=500

Bare keys of the probe's settings (`k=10`) stand for `probe.k=10`; other overrides are the `defend:` section's
(`clean_fraction=0.1`), so the probe sees the budget the defences saw.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from signtrap.config import ProbeConfig, parse_override
from signtrap.defences.run import Session
from signtrap.errors import SigntrapError
from signtrap.fileio import read_json, refuse_foreign
from signtrap.probing.reactivation import write_probe
from signtrap.runs import layout

PROBE_KEYS = tuple(f.name for f in dataclasses.fields(ProbeConfig))
NOT_MEASUREMENT = ("reference", "train_reference", "always", "enabled")  # where the twin is, whether to train: same probe
TRAINED = "trained"  # probe-trained.json: a probe trained where the stage's record was decided without training


def probe_variant(overrides=()) -> str:
    """The name of a probe at settings other than the run's, from the overrides that change what it measures
    (`k=20 steps=500` -> `k20-steps500`; `clean_fraction=0.1` -> `clean_fraction0.1`); "" when none does."""
    parts = []
    for text in overrides:
        path, value = parse_override(text)
        if path[-1] in NOT_MEASUREMENT:
            continue
        shown = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(re.sub(r"[^A-Za-z0-9._,+-]", "", f"{path[-1]}{shown}"))
    return "-".join(parts)[:120]


def probe_overrides(overrides=(), reference: str | Path | None = None) -> list[str]:
    """`k=10` -> `probe.k=10` (bare probe keys), others unchanged; `reference` as `probe.reference=PATH`."""
    out = []
    for text in overrides:
        path, _ = parse_override(text)
        out.append(f"probe.{text}" if len(path) == 1 and path[0] in PROBE_KEYS else text)
    if reference is not None:
        out.append(f"probe.reference={Path(reference)}")
    return out


def resolve_target(path: Path) -> tuple[Path, Path | None, dict | None]:
    """(run directory, defence folder or None, the defence's report or None), refusing what cannot be probed."""
    if (path / "config.yaml").is_file() and (path / "model.pt").is_file():
        return path, None, None
    if (path / "report.json").is_file() and (path.parent / "config.yaml").is_file():
        report = read_json(path / "report.json")
        method = report.get("method", path.name)
        if not (path / "model.pt").is_file():
            raise SigntrapError(f"{path}: {method} did not change the model (kind {report.get('kind', '?')}): nothing to probe "
                                f"beyond the run itself; run `signtrap probe {path.parent}`")
        return path.parent, path, report
    if (path / "config.yaml").is_file():
        raise SigntrapError(f"{path}: no trained model (model.pt); run `signtrap train` first")
    raise SigntrapError(f"{path}: neither a run directory nor a defence folder (runs/NAME/defence-METHOD)")


def probe_dir(target: str | Path, reference: str | Path | None = None, overrides=(), device: str | None = None,
              show_progress: bool = True) -> dict:
    """Probe the model in `target` (a run or a defence folder) and the zero-poison reference; writes and returns
    probe.json's record. Everything is validated before anything trains."""
    target = Path(target)
    run_dir, folder, _ = resolve_target(target)
    file = layout.probe_file(probe_variant(overrides))
    refuse_foreign(target / file)  # the write rule, before minutes of probing
    record_file(target, file, {"trained": True})  # and for probe-trained.json, where a trained probe would go
    # asked for by name, the probe trains even where the verdict is decided before it (always=false turns that off)
    session = Session.open(run_dir, ["probe.always=true", *probe_overrides(overrides, reference)], device, show_progress)
    prober = session.prober  # checks k against the budget
    prober.check_reference()  # a reference (checked: zero-poison, same config and seed, another run), or a way to train one
    if folder is not None:
        record = session.probe_record(folder)  # what `signtrap defend` and the probe stage run
        if record is None:
            raise SigntrapError(f"{folder}: nothing to probe (the defence changed no model, or the clean budget cannot feed the probe)")
    else:
        record = prober.compare(None, "zero-poison model" if prober.reference_plan()[0] == run_dir else "backdoored (no defence)")
    file = record_file(target, file, record)
    return {**write_probe(target / file, record), "file": str(target / file)}


def record_file(target: Path, file: str, record: dict) -> str:
    """Where a probe asked for by name writes: `file`, except where that is the stage's probe.json and holds a
    probe that was not trained (the stage decided the verdict before it: `defend.probe.always` false) while this
    one was: a trained probe is another measurement, written to probe-trained.json beside it. Otherwise the
    stage's record would be replaced, and the next `signtrap run` would find its probe stage changed and probe
    again over what the user asked for."""
    if file != layout.PROBE or not record.get("trained", True) or not (target / file).is_file():
        return file
    try:
        held = read_json(target / file)
    except SigntrapError:
        return file  # a broken record of signtrap's (the write rule checked it): replaced
    if isinstance(held, dict) and held.get("trained") is False:
        refuse_foreign(target / layout.probe_file(TRAINED))
        return layout.probe_file(TRAINED)
    return file
