"""`signtrap run`: the stage record (skip intact, re-make missing or corrupted, dependants follow) and the real pipeline."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides
from signtrap.cli import main
from signtrap.errors import SigntrapError
from signtrap.runs import state as runstate
from signtrap.runs.pipeline import BLOCKED, DISABLED, FAILED, RAN, SKIPPED, Pipeline, Stage

# ---------------------------------------------------------------- the engine, with stand-in stages (fast)


class Toy:
    """A -> B -> D and A -> C; each stage writes one file whose content depends on its inputs."""

    def __init__(self, root: Path):
        self.root = root
        self.calls: list[str] = []
        self.fail: set[str] = set()
        self.settings = {"A": 1, "B": 1, "C": 1, "D": 1}

    def make(self, name: str, deps: tuple[str, ...]):
        def run():
            self.calls.append(name)
            if name in self.fail:
                raise SigntrapError(f"{name} broke")
            text = name + "".join((self.root / f"{d}.txt").read_text() for d in deps)
            (self.root / f"{name}.txt").write_text(text)
            return [self.root / f"{name}.txt"]
        return run

    def stages(self, disabled: dict | None = None) -> list[Stage]:
        graph = {"A": (), "B": ("A",), "C": ("A",), "D": ("B",)}
        return [Stage(n, d, self.settings[n], self.make(n, d), disabled=(disabled or {}).get(n)) for n, d in graph.items()]

    def run(self, **kw) -> dict[str, str]:
        self.calls.clear()
        return {o.name: o.status for o in Pipeline(self.root, self.stages(**kw)).run()}


@pytest.fixture
def toy(tmp_path) -> Toy:
    return Toy(tmp_path)


def test_second_run_skips_every_stage(toy):
    assert set(toy.run().values()) == {RAN}
    assert toy.run() == {"A": SKIPPED, "B": SKIPPED, "C": SKIPPED, "D": SKIPPED}
    assert toy.calls == []
    record = json.loads((toy.root / "pipeline.json").read_text())
    assert record["stages"]["B"]["outputs"].keys() == {"B.txt"}


def test_deleted_artefact_reruns_only_its_dependants(toy):
    toy.run()
    (toy.root / "B.txt").unlink()
    assert toy.run() == {"A": SKIPPED, "B": RAN, "C": SKIPPED, "D": RAN}
    assert toy.calls == ["B", "D"]


def test_corrupted_artefact_is_detected_and_remade(toy):
    toy.run()
    (toy.root / "A.txt").write_text("tampered")
    assert toy.run() == {"A": RAN, "B": RAN, "C": RAN, "D": RAN}
    assert (toy.root / "A.txt").read_text() == "A"  # re-made, the tampered bytes never reached B or C
    assert (toy.root / "B.txt").read_text() == "BA"


def test_settings_change_reruns_the_stage_and_dependants(toy):
    toy.run()
    toy.settings["C"] = 2
    assert toy.run() == {"A": SKIPPED, "B": SKIPPED, "C": RAN, "D": SKIPPED}


def test_failure_blocks_dependants_and_is_retried(toy):
    toy.fail = {"B"}
    assert toy.run() == {"A": RAN, "B": FAILED, "C": RAN, "D": BLOCKED}
    toy.fail = set()
    assert toy.run() == {"A": SKIPPED, "B": RAN, "C": SKIPPED, "D": RAN}


def test_disabled_stage_is_recorded_and_blocks_its_dependants(toy):
    out = toy.run(disabled={"B": "skipped with --skip B"})
    assert out == {"A": RAN, "B": DISABLED, "C": RAN, "D": BLOCKED}
    record = json.loads((toy.root / "pipeline.json").read_text())
    assert record["stages"]["B"] == {"status": DISABLED, "reason": "skipped with --skip B"}


def test_plan_says_what_run_would_do_without_running_anything(toy):
    assert [name for name, _ in Pipeline(toy.root, toy.stages()).plan()] == ["A", "B", "C", "D"]
    toy.run()
    (toy.root / "B.txt").unlink()
    toy.calls.clear()
    assert Pipeline(toy.root, toy.stages()).plan() == [("B", "B.txt is missing"), ("D", "upstream B re-made")]
    assert toy.calls == [] and not (toy.root / "B.txt").exists()
    assert {n: s for n, s in toy.run().items() if s == RAN} == {"B": RAN, "D": RAN}  # what the plan said


def test_unreadable_record_starts_afresh(toy):
    toy.run()
    (toy.root / "pipeline.json").write_text("{not json")
    assert set(toy.run().values()) == {RAN}



class MeasuredToy(Toy):
    """The toy whose stage A also writes a measurement, metrics.json, as the train stage does."""

    def make(self, name: str, deps: tuple[str, ...]):
        inner = super().make(name, deps)
        if name != "A":
            return inner

        def run():
            (self.root / "metrics.json").write_text('{"acc": 1}')
            return [*inner(), self.root / "metrics.json"]
        return run


def test_a_re_measurement_keeps_every_stage_and_a_tampered_measurement_does_not(tmp_path):
    """`signtrap eval` rewrites metrics.json and records its new hash (runstate.record_remeasured): the next
    `signtrap run` skips the stage that wrote it (it retrained the model before) and every stage after it; the same
    edit made by anything else is still a corrupted file, re-made with its dependants."""
    toy = MeasuredToy(tmp_path)
    assert set(toy.run().values()) == {RAN}
    (tmp_path / "metrics.json").write_text('{"acc": 1, "physical": {}}')
    assert runstate.record_remeasured(tmp_path, tmp_path / "metrics.json")
    assert toy.run() == {"A": SKIPPED, "B": SKIPPED, "C": SKIPPED, "D": SKIPPED} and toy.calls == []
    (tmp_path / "metrics.json").write_text('{"acc": 0}')  # not recorded
    assert toy.run() == {"A": RAN, "B": RAN, "C": RAN, "D": RAN}
    assert not runstate.record_remeasured(tmp_path, tmp_path / "A.txt.unlisted")  # a file no stage lists: nothing to do


def test_a_record_keyed_with_its_measurements_is_skipped_and_rekeyed(tmp_path):
    """Records written before measurements were left out of the keys (their dependants' keys hash metrics.json too)
    are still intact: skipped, and stored under today's key, so a re-measurement then re-runs nothing."""
    toy = MeasuredToy(tmp_path)
    toy.run()
    pipe = Pipeline(tmp_path, toy.stages())
    graph = {s.name: list(s.deps) for s in toy.stages()}
    record = json.loads((tmp_path / "pipeline.json").read_text())
    for stage in toy.stages():
        record["stages"][stage.name]["key"] = pipe.key(stage, graph[stage.name], measurements=True)  # the old key
    (tmp_path / "pipeline.json").write_text(json.dumps(record))
    assert toy.run() == {"A": SKIPPED, "B": SKIPPED, "C": SKIPPED, "D": SKIPPED}
    (tmp_path / "metrics.json").write_text('{"acc": 1, "physical": {}}')
    runstate.record_remeasured(tmp_path, tmp_path / "metrics.json")
    assert toy.run() == {"A": SKIPPED, "B": SKIPPED, "C": SKIPPED, "D": SKIPPED}


def test_re_measuring_the_zero_poison_twin_keeps_the_runs_reference_stage(tmp_path):
    """The pipeline's `reference` stage records the twin's files as ../NAME-zero/...: `signtrap eval` of the twin
    records the new hash in the run's record too (under the run's lock), so the twin is not retrained."""
    run, twin = tmp_path / "run", tmp_path / "run-zero"
    run.mkdir()
    calls = []

    def train_twin():
        calls.append("reference")
        twin.mkdir(exist_ok=True)
        (twin / "metrics.json").write_text('{"acc": 1}')
        return [twin / "metrics.json"]

    def stages():
        return [Stage("reference", (), 1, train_twin), Stage("B", ("reference",), 1, lambda: calls.append("B") or [])]

    assert {o.name: o.status for o in Pipeline(run, stages()).run()} == {"reference": RAN, "B": RAN}
    assert "../run-zero/metrics.json" in json.loads((run / "pipeline.json").read_text())["stages"]["reference"]["outputs"]
    (twin / "metrics.json").write_text('{"acc": 1, "physical": {}}')
    assert runstate.record_remeasured(twin, twin / "metrics.json")  # (the stand-in twin holds no run of its own to lock)
    assert runstate.lock_holder(run) is None  # the run's lock, taken for its record, is let go again
    calls.clear()
    assert {o.name: o.status for o in Pipeline(run, stages()).run()} == {"reference": SKIPPED, "B": SKIPPED} and calls == []


def test_re_measuring_the_twin_while_its_run_is_locked_warns_and_leaves_the_runs_record(tmp_path, capsys):
    """While another command holds the run's lock, `signtrap eval` of its twin does not wait for it or write the run's
    record behind its back: a warning names the holder and says the next `signtrap run` re-makes the twin."""
    run, twin = tmp_path / "run", tmp_path / "run-zero"
    run.mkdir()

    def train_twin():
        twin.mkdir(exist_ok=True)
        (twin / "metrics.json").write_text('{"acc": 1}')
        return [twin / "metrics.json"]

    Pipeline(run, [Stage("reference", (), 1, train_twin)]).run()
    before = (run / "pipeline.json").read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom signtrap.runs import state\n"
                               "with state.locked(sys.argv[1], 'signtrap defend'):\n    print('held', flush=True)\n"
                               "    time.sleep(120)", str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (twin / "metrics.json").write_text('{"acc": 1, "physical": {}}')
        assert not runstate.record_remeasured(twin, twin / "metrics.json")
        err = capsys.readouterr().err
        assert "warning" in err and "signtrap defend" in err and "re-makes the reference run-zero" in err, err
        assert (run / "pipeline.json").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
    assert {o.name: o.status for o in Pipeline(run, [Stage("reference", (), 1, train_twin)]).run()} == {"reference": RAN}


def test_a_run_trained_before_signtrap_gained_a_setting_is_not_retrained_after_the_upgrade(tmp_path):
    """A setting added to signtrap (here `attack.cover_classes`, and `weight_decay` of a defence, at their defaults)
    is absent from what an earlier version recorded (the run's config.yaml, the defence's report.json) and from the
    settings it keyed the stages on: `signtrap run` after the upgrade keeps the model and the repaired model (it used
    to re-make both, "settings or upstream outputs changed") and stores the stages under today's keys; the same
    setting set to another value is a change, and re-makes them."""
    import yaml

    from signtrap.config import load_config
    from signtrap.fileio import sha256_file
    from signtrap.runs.pipeline import digest, planner

    args = [*tiny_overrides(tmp_path, "old"), "train.epochs=1", "train.threads=1", "defend.methods=[finetune]",
            "defend.finetune.epochs=1", "defend.finetune.grid=[1e-3]", "defend.clean_fraction=0.2", "defend.probe.enabled=false"]
    skip = ("export", "bench", "report")
    assert main(["run", *args, *[f for s in skip for f in ("--skip", s)], "--quiet"]) == 0
    run = tmp_path / "runs" / "old"
    models = {f: sha256_file(run / f) for f in ("model.pt", "defence-finetune/model.pt")}

    def as_before_the_settings():  # what the earlier version left: no such settings in its files or in its keys
        raw = yaml.safe_load((run / "config.yaml").read_text())
        raw["attack"].pop("cover_classes", None)
        (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        report = json.loads((run / "defence-finetune" / "report.json").read_text())
        report["settings"].pop("weight_decay", None)
        (run / "defence-finetune" / "report.json").write_text(json.dumps(report))
        record = json.loads((run / "pipeline.json").read_text())
        stages = record["stages"]
        stages["train"]["outputs"]["config.yaml"] = sha256_file(run / "config.yaml")  # as that version hashed them
        stages["defend:finetune"]["outputs"]["defence-finetune/report.json"] = sha256_file(run / "defence-finetune" / "report.json")
        (run / "pipeline.json").write_text(json.dumps(record))
        pipe = planner(load_config(None, args), skip=skip)
        train, defend = pipe.stages[0], next(s for s in pipe.stages if s.name == "defend:finetune")
        old_train = {**train.settings, "attack": {k: v for k, v in train.settings["attack"].items() if k != "cover_classes"}}
        old_defend = {**defend.settings, "settings": {k: v for k, v in defend.settings["settings"].items() if k != "weight_decay"}}
        stages["train"]["key"] = digest({"settings": old_train, "deps": {}})
        stages["defend:finetune"]["key"] = digest({"settings": old_defend, "deps": {"train": pipe.outputs_digest("train")}})
        (run / "pipeline.json").write_text(json.dumps(record))
        return stages["train"]["key"], stages["defend:finetune"]["key"]

    old_keys = as_before_the_settings()
    pipe = planner(load_config(None, args), skip=skip)
    assert pipe.plan() == []  # nothing to run: both stages are intact
    assert {o.name: o.status for o in pipe.run()} == {"train": SKIPPED, "reference": DISABLED, "defend:finetune": SKIPPED,
                                                      "probe:finetune": DISABLED, "export": DISABLED, "bench": DISABLED,
                                                      "report": DISABLED}
    assert {f: sha256_file(run / f) for f in models} == models
    stages = json.loads((run / "pipeline.json").read_text())["stages"]
    assert stages["train"]["key"] != old_keys[0] and stages["defend:finetune"]["key"] != old_keys[1]  # re-keyed

    as_before_the_settings()
    changed = load_config(None, [*args, "attack.cover_classes=[1]"])
    assert [name for name, _ in planner(changed, skip=skip).plan()] == ["train", "defend:finetune"]
    as_before_the_settings()
    changed = load_config(None, [*args, "defend.finetune.weight_decay=0.01"])
    assert [name for name, _ in planner(changed, skip=skip).plan()] == ["defend:finetune"]


def test_a_session_takes_the_config_object_it_is_handed(tiny_run, monkeypatch):
    """The pipeline hands its validated config to the defence session: no flattening to strings, no re-reading."""
    from signtrap import config as config_mod
    from signtrap.config import load_config
    from signtrap.defences import run as run_mod

    cfg = load_config(tiny_run / "config.yaml", ["defend.finetune.epochs=3", "defend.clean_images=50"])

    def no_reading(*args, **kwargs):
        raise AssertionError("a stage handed its config read config.yaml again")

    monkeypatch.setattr(run_mod, "load_run_config", no_reading)
    monkeypatch.setattr(config_mod, "load_config", no_reading)
    session = run_mod.Session.open(tiny_run, show_progress=False, cfg=cfg)
    assert session.cfg is cfg and session.cfg.defend.method("finetune").epochs == 3 and len(session.clean.labels) == 50


# ---------------------------------------------------------------- the real pipeline on a tiny config


def tiny_pipeline_args(base: Path) -> list[str]:
    return [*tiny_overrides(base, "pipe"), "defend.methods=[finetune,strip]", "defend.finetune.epochs=1",
            "defend.finetune.augment=false", "defend.strip.overlays=4", "defend.strip.eval_samples=64",
            "export.calib_images=32", "export.bench_runs=5", "export.bench_warmup=1", "export.bench_batch=8", "train.threads=1",
            # the probe and the runtime zoo have their own tests (test_probe.py, test_runtimes.py)
            "defend.probe.enabled=false", "export.runtimes=[onnxruntime]"]


def run_json(args: list[str], capsys) -> dict:
    code = main(["run", *args, "--json"])
    summary = json.loads(capsys.readouterr().out)
    summary["code"] = code
    return summary


def statuses(summary: dict) -> dict[str, str]:
    return {s["name"]: s["status"] for s in summary["stages"]}


@pytest.mark.slow
def test_pipeline_end_to_end_resumes_and_remakes(tmp_path, capsys):
    args = tiny_pipeline_args(tmp_path)
    first = run_json(args, capsys)
    assert first["code"] == 0, first
    assert statuses(first) == {**{s: RAN for s in ("train", "defend:finetune", "defend:strip", "export", "bench", "report")},
                               **{s: DISABLED for s in ("reference", "probe:finetune", "probe:strip")}}  # probe.enabled=false
    run_dir = Path(first["run"])
    assert Path(first["report"]).is_file() and (run_dir / "report.md").is_file()
    assert (run_dir / "defence-finetune" / "report.json").is_file() and (run_dir / "export" / "bench.json").is_file()

    second = run_json(args, capsys)
    assert set(statuses(second).values()) == {SKIPPED, DISABLED}

    (run_dir / "defence-finetune" / "persistence.csv").unlink()
    third = statuses(run_json(args, capsys))
    assert {k for k, v in third.items() if v == RAN} == {"defend:finetune", "report"}

    onnx = run_dir / "export" / "model.int8.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-7] + b"garbage")
    fourth = run_json(args, capsys)
    assert {k for k, v in statuses(fourth).items() if v == RAN} == {"export", "bench", "report"}
    assert "corrupted" in next(s["reason"] for s in fourth["stages"] if s["name"] == "export")
    record = json.loads((run_dir / "pipeline.json").read_text())
    from signtrap.fileio import sha256_file

    assert record["stages"]["export"]["outputs"]["export/model.int8.onnx"] == sha256_file(onnx)


@pytest.mark.slow
def test_the_probe_and_its_reference_are_stages_that_resume(tmp_path, capsys, monkeypatch):
    """The zero-poison twin the probe needs is the pipeline's `reference` stage, and each repaired model's probe is
    the stage `probe:M` after `defend:M`: recorded and hashed in pipeline.json, resumed where an interruption left
    them (the defence is not run again), and the probes use the twin instead of training one of their own."""
    from signtrap.defences.run import Session
    from signtrap.probing import reactivation

    args = [*tiny_overrides(tmp_path, "pipe"), "defend.methods=[finetune]", "defend.finetune.epochs=1", "defend.finetune.lr=1e-3",
            "defend.finetune.augment=false", "defend.probe.k=2", "defend.probe.steps=20", "defend.clean_fraction=0.2", "train.threads=1",
            "--skip", "export", "--skip", "report"]
    real_train = reactivation.train

    def stop_after_first_epoch(cfg, resume=False, **kw):
        def stop(epoch, row):
            if epoch == 1:
                raise KeyboardInterrupt
        return real_train(cfg, resume=resume, on_epoch_end=stop)

    monkeypatch.setattr(reactivation, "train", stop_after_first_epoch)
    assert main(["run", *args, "--quiet"]) == 130  # interrupted while the twin trains
    run_dir = tmp_path / "runs" / "pipe"
    record = json.loads((run_dir / "pipeline.json").read_text())
    assert record["stages"]["reference"]["status"] == "interrupted"
    assert (tmp_path / "runs" / "pipe-zero" / "last.pt").is_file()  # one epoch of the twin, kept for the resume

    monkeypatch.setattr(reactivation, "train", real_train)
    real_probe = Session.probe

    def killed_during_the_probe(self, folder, label=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(Session, "probe", killed_during_the_probe)
    assert main(["run", *args, "--quiet"]) == 130  # the twin finished, the defence ran, interrupted in its probe
    record = json.loads((run_dir / "pipeline.json").read_text())
    assert [record["stages"][s]["status"] for s in ("reference", "defend:finetune", "probe:finetune")] == ["done", "done", "interrupted"]
    assert "../pipe-zero/model.pt" in record["stages"]["reference"]["outputs"]
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "runs" / "pipe-zero" / "log.jsonl").read_text().splitlines()]
    assert epochs == sorted(set(epochs))  # resumed after epoch 1, not restarted

    monkeypatch.setattr(Session, "probe", real_probe)
    second = run_json(args, capsys)
    assert second["code"] == 0, second
    assert {k: v for k, v in statuses(second).items() if v == RAN} == {"probe:finetune": RAN}  # resumed at the probe
    assert (run_dir / "defence-finetune" / "probe.json").is_file()
    record = json.loads((run_dir / "pipeline.json").read_text())
    assert list(record["stages"]["probe:finetune"]["outputs"]) == ["defence-finetune/probe.json"]
    assert "defence-finetune/probe.json" not in record["stages"]["defend:finetune"]["outputs"]
    note = next(s for s in second["stages"] if s["name"] == "probe:finetune")["note"]
    assert "held-out ASR" in note and "zero-poison twin" in note, note  # the closing table says what the probe found

    third = run_json([*args, "defend.probe.k=3"], capsys)  # a probe setting changed: the probe alone runs again
    assert {k for k, v in statuses(third).items() if v == RAN} == {"probe:finetune"}
    assert json.loads((run_dir / "defence-finetune" / "probe.json").read_text())["k"] == 3

    # re-measuring the run (digital and on the road), its defence and its twin rewrites their metrics.json and
    # re-makes nothing (the train and reference stages were re-made, with everything after them, before)
    for command in (["eval", str(run_dir)], ["eval", str(run_dir), "--physical"], ["eval", str(run_dir / "defence-finetune")],
                    ["eval", str(tmp_path / "runs" / "pipe-zero")]):
        assert main(["--quiet", *command]) == 0, command
    capsys.readouterr()
    fourth = run_json([*args, "defend.probe.k=3"], capsys)
    assert set(statuses(fourth).values()) <= {SKIPPED, DISABLED}, statuses(fourth)


def test_unknown_defence_fails_before_training(tmp_path, capsys):
    code = main(["run", *tiny_overrides(tmp_path, "bad"), "defend.methods=[finetun]", "--quiet"])
    assert code == 2
    assert "finetune" in capsys.readouterr().err  # the suggestion
    assert not (tmp_path / "runs" / "bad" / "model.pt").exists()
