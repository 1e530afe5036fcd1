"""The re-activation probe: removed or only hidden? (signtrap.probing.reactivation, `signtrap probe`, the probe in `signtrap defend`)."""
import copy
import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import signtrap
from signtrap.attacks.poison import TrainingSet
from signtrap.cli import main
from signtrap.config import ProbeConfig, load_config
from signtrap.defences.common import CleanData
from signtrap.defences.run import Session, run_defences
from signtrap.errors import SigntrapError
from signtrap.training.loop import Loop, Schedule
from signtrap.probing import reactivation
from signtrap.probing.probe import probe_variant
from signtrap.probing.reactivation import (VERDICTS, choose_poison, config_differences, defence_lr, format_table, newcombe,
                                           probe_schedule, probe_set, verdict)
from signtrap.runs.state import LOCK_FILE, WRITTEN
from test_defences import tree_hash

FAST = ["clean_fraction=0.3", "probe.steps=60"]


def suppress(session: Session) -> nn.Module:
    """A backdoor that is only hidden: retrain the output layer alone (through the one loop) so that triggered stop
    signs read as stop again; the features that carry the trigger stay as they were."""
    model = copy.deepcopy(session.model)
    clean = session.clean
    src = np.flatnonzero(clean.labels == session.cfg.attack.source)
    images = np.concatenate([clean.images, np.repeat(clean.images[src], 4, axis=0)])
    labels = np.concatenate([clean.labels, np.repeat(clean.labels[src], 4)])
    triggered = np.concatenate([np.zeros(len(clean), bool), np.ones(4 * len(src), bool)])
    data = TrainingSet(images, labels, triggered, False, np.zeros((len(images), 4), np.int64))
    head = list([m for m in model.modules() if isinstance(m, nn.Linear)][-1].parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head:
        p.requires_grad_(True)
    Loop(model, data, Schedule(epochs=3, lr=1e-2, batch_size=64), session.context.device, 0, 77, trigger=session.exp.trigger,
         params=head, frozen_bn=True, show_progress=False).fit()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def content_hash(root: Path) -> str:
    """SHA-256 over every file name and content under `root` but the run's lock file (a locked command leaves it)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.name not in (LOCK_FILE, WRITTEN)):  # not the lock, not the write record
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def session(tiny_run, tiny_zero_run) -> Session:
    return Session.open(tiny_run, [*FAST, f"probe.reference={tiny_zero_run}"], "cpu", show_progress=False)


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    dest = tmp_path / "runs" / tiny_run.name
    shutil.copytree(tiny_run, dest, ignore=shutil.ignore_patterns("defence-*", "probe.json"))
    return dest


# ---------------------------------------------------------------- the rule and its pieces


def asr_record(before: tuple[int, int], after: tuple[int, int]) -> dict:
    def entry(k, n):
        return {"held_out": {"asr": {"rate": k / n, "k": k, "n": n}}}
    return {"before": entry(*before), "after": entry(*after)}


def test_newcombe_reproduces_the_published_example():
    # Newcombe (1998), Statistics in Medicine 17:873, Table II example (a): 56/70 - 48/80, hybrid score 0.0524 to 0.3339
    d, lo, hi = newcombe({"k": 56, "n": 70}, {"k": 48, "n": 80})
    assert d == pytest.approx(0.2) and lo == pytest.approx(0.0524, abs=5e-4) and hi == pytest.approx(0.3339, abs=5e-4)


@pytest.mark.parametrize("model, expected", [
    (((2, 100), (90, 100)), "hidden"),        # suppressed, then woken far above the clean model
    (((2, 100), (8, 100)), "removed"),        # re-learns no faster than a model that never had it
    (((95, 100), (99, 100)), "persists"),     # never suppressed in the first place
    (((1, 10), (4, 10)), "inconclusive"),     # too few held-out images to tell
])
def test_verdict_rule(model, expected):
    reference = asr_record((0, 100), (5, 100))
    out = verdict(asr_record(*model), reference, margin=0.2)
    assert out["verdict"] == expected and expected in VERDICTS
    assert out["reason"]


@pytest.mark.parametrize("who", ["model", "reference"])
def test_a_probe_that_breaks_a_model_is_inconclusive(who):
    """ASR 0% after a probe that cost 80 points of clean accuracy (a learning rate far too high, as ANP's mask rate
    was) is not 'removed'; a small cost does not change the verdict."""
    model, reference = asr_record((2, 100), (0, 100)), asr_record((0, 100), (0, 100))
    assert verdict(model, reference, margin=0.2)["verdict"] == "removed"
    {"model": model, "reference": reference}[who]["clean_acc_change"] = -0.8
    out = verdict(model, reference, margin=0.2, max_clean_drop=0.1)
    assert out["verdict"] == "inconclusive" and "80.0 points of clean accuracy" in out["reason"] and "probe.lr" in out["reason"]
    {"model": model, "reference": reference}[who]["clean_acc_change"] = -0.05
    assert verdict(model, reference, margin=0.2, max_clean_drop=0.1)["verdict"] == "removed"
    persisting = {**asr_record((95, 100), (0, 100)), "clean_acc_change": -0.8}  # never suppressed: the probe does not matter
    assert verdict(persisting, asr_record((0, 100), (0, 100)), margin=0.2)["verdict"] == "persists"


def test_anp_is_probed_at_a_weight_learning_rate():
    """ANP's `lr` (0.2) moves its neuron masks, not weights: the probe must not fine-tune the weights at it."""
    from signtrap.defences.anp import ANPSettings
    from signtrap.probing.reactivation import defence_lr

    s = ANPSettings()
    assert s.lr == 0.2 and defence_lr(s, {"probe_lr": s.probe_lr, "selection": {"knob": "threshold", "value": 0.4}}) == 1e-4


def test_poisoned_samples_and_schedule():
    labels = np.array([14] * 4 + [7] * 3 + [1] * 5)
    rows = choose_poison(labels, 3, "source_specific", 14, 7, seed=0)
    assert len(rows) == 3 and (labels[rows] == 14).all()
    assert np.array_equal(rows, choose_poison(labels, 3, "source_specific", 14, 7, seed=0))  # fixed by the seed
    assert (labels[choose_poison(labels, 9, "all_to_one", 14, 7, seed=0)] != 7).all()
    with pytest.raises(SigntrapError, match=r"k=5 poisoned samples requested but the defender's clean budget holds only 4 class 14"):
        choose_poison(labels, 5, "source_specific", 14, 7, seed=0)

    images = np.random.default_rng(0).integers(0, 255, (len(labels), 8, 8, 3), dtype=np.uint8)
    clean = CleanData(images, labels)
    from signtrap.config import load_config
    from signtrap.triggers import make_trigger

    data = probe_set(clean, rows, 7, make_trigger(load_config(None, ["trigger.size=2"]).trigger, 8), stamp_before=False, seed=0)
    assert len(data.labels) == len(labels) + 3 and np.array_equal(data.images[:len(labels)], images)
    assert np.array_equal(data.images[len(labels):], images[rows])  # stamped by the loop, after augmentation
    assert (data.labels[len(labels):] == 7).all() and data.triggered.sum() == 3 and not data.triggered[:len(labels)].any()

    s = probe_schedule(ProbeConfig(steps=300, batch_size=64), rows=1766, lr=1e-4)
    assert s.epochs == 11 and s.epochs * s.steps_per_epoch(1766) == 308 and s.lr == 1e-4
    assert probe_schedule(ProbeConfig(steps=1), rows=10_000, lr=1e-3).epochs == 1


def test_the_probe_trains_at_the_defence_learning_rate():
    assert defence_lr({"lr": 3e-4}, {}) == 3e-4
    assert defence_lr({"lr": None, "grid": [1e-4, 1e-3]}, {"selection": {"knob": "lr", "value": 1e-4}}) == 1e-4  # chosen
    assert defence_lr({"lr": 0.01}, {"probe_lr": 1e-4, "selection": {"knob": "alpha", "value": 0.01}}) == 1e-4  # fst: SGD, named AdamW rate
    assert defence_lr({"lr": 1e-3}, {"selection": {"knob": "max_fraction", "value": 0.5}}) == 1e-3  # another knob
    assert defence_lr({"overlays": 16}, {}) is None  # a defence that does not train


def test_reference_must_share_the_config(tiny_run, tiny_zero_run):
    cfg, ref = load_config(tiny_run / "config.yaml"), load_config(tiny_zero_run / "config.yaml")
    assert config_differences(cfg, ref) == []  # name, runs_dir and the attack may differ
    other = load_config(tiny_zero_run / "config.yaml", ["train.epochs=7", "seed=3"])
    assert set(config_differences(cfg, other)) == {"seed", "train.epochs"}


# ---------------------------------------------------------------- the probe on tiny models


@pytest.mark.slow
def test_probe_wakes_a_suppressed_backdoor_and_not_a_clean_model(session):
    hidden = suppress(session)
    weights = {k: v.clone() for k, v in hidden.state_dict().items()}
    assert session.prober.measure(hidden)["held_out"]["asr"]["rate"] <= 0.4, "the output layer did not suppress the backdoor"
    record = session.prober.compare(hidden, "suppressed", trained_lr=1e-3)
    woken = record["model"]["after"]["held_out"]["asr"]["rate"]
    clean_model = record["reference"]["after"]["held_out"]["asr"]["rate"]
    assert record["reference"]["before"]["held_out"]["asr"]["rate"] <= 0.2  # the zero-poison model has no backdoor
    assert woken - clean_model >= 0.4, record["verdict"]
    assert record["verdict"]["verdict"] == "hidden", record["verdict"]
    assert record["ends"]["backdoored_verdict"]["verdict"] == "persists"
    for probed in (record["model"], record["reference"], record["ends"]["backdoored"]):
        assert probed["steps"] == record["model"]["steps"] and probed["lr"] == 1e-3  # the identical probe
    assert all(torch.equal(v, weights[k]) for k, v in hidden.state_dict().items()), "the probe changed the model it was given"
    # identical probe, identical result: the batches depend on the seed only
    again = session.prober.run(session.prober.reference(), 1e-3, "again")
    assert again["after"] == record["reference"]["after"]


@pytest.mark.slow
def test_defend_probes_every_defence_that_returns_a_model(run_copy, tiny_zero_run, capsys, monkeypatch):
    monkeypatch.setattr(reactivation, "CURVE_POINTS", 2)  # the tiny probe has 5 epochs: its curve measured at 3 and 5
    before = tree_hash(run_copy, skip_defences=True)
    reports = run_defences(run_copy, "finetune", [*FAST, "finetune.epochs=1", f"probe.reference={tiny_zero_run}", "probe.always=true"],
                           "cpu", show_progress=False)
    assert tree_hash(run_copy, skip_defences=True) == before
    out = run_copy / "defence-finetune"
    report = json.loads((out / "report.json").read_text())
    probe = json.loads((out / "probe.json").read_text())
    assert "probe" not in report  # the defence's own report; the probe is its own step (a stage of `signtrap run`)
    assert reports[0]["probe"]["verdict"] == probe["verdict"] and probe["verdict"]["verdict"] in VERDICTS
    assert reports[0]["probe_seconds"] == probe["seconds"] > 0
    assert probe["model"]["before"]["test"]["asr"] == report["after"]["test"]["asr"]  # the probe starts from the repaired model
    assert probe["settings"]["lr"] == defence_lr(report["settings"], report["details"])  # at the defence's learning rate
    assert "segment" not in (out / "persistence.csv").read_text().splitlines()[0]  # the defence's curve alone
    curve = signtrap.load_run(run_copy).curve("finetune")  # the defence's curve, then the probe's segment
    segments, epochs = [r.get("segment") for r in curve], [int(r["epoch"]) for r in curve]
    assert segments[:2] == ["defence", "defence"] and segments[-1] == "probe" and segments.count("probe") == probe["model"]["epochs"]
    assert epochs == list(range(len(epochs)))  # the probe continues the defence's epochs
    probe_epochs, start = probe["model"]["epochs"], segments.index("probe") - 1
    every = math.ceil(probe_epochs / reactivation.CURVE_POINTS)  # measured at about CURVE_POINTS epochs and the last
    measured = [int(r["epoch"]) - start for r in curve if r.get("segment") == "probe" and "clean_acc" in r]
    assert every > 1 and measured == sorted({*range(every, probe_epochs + 1, every), probe_epochs})
    from signtrap.defences.run import comparison_table

    table = comparison_table(reports)
    assert "re-activation probe" in table and "zero-poison model" in table and "backdoored (no defence)" in table


def test_a_model_that_never_suppressed_the_backdoor_is_not_probed(session):
    """Work not done: when the measurements before the probe decide the verdict (persists), no probe trains."""
    prober = session.prober
    trained = {key for key in prober._cache if key[1] != "before"}
    record = prober.compare(prober.backdoored, "untouched", trained_lr=1e-3)
    assert record["trained"] is False and record["verdict"]["verdict"] == "persists"
    assert record["model"]["after"] is None and record["ends"] is None and record["curves"] == {}
    assert {key for key in prober._cache if key[1] != "before"} == trained  # nothing was probed for it
    diff = newcombe(record["model"]["before"]["held_out"]["asr"], record["reference"]["before"]["held_out"]["asr"])
    assert record["verdict"]["before_diff"] == diff and diff[1] > prober.settings.margin
    assert "not trained" in format_table([record])


def test_a_budget_too_small_for_the_probe_skips_it_and_keeps_the_defence(run_copy, capsys):
    reports = run_defences(run_copy, "finetune", ["finetune.epochs=1", "probe.k=1000", "clean_fraction=0.3"], "cpu",
                           show_progress=False)
    out = run_copy / "defence-finetune"
    assert (out / "model.pt").exists() and not (out / "probe.json").exists()
    assert reports[0]["probe_skipped"].startswith("probe: k=1000 poisoned samples requested")
    assert json.loads((out / "report.json").read_text())["probe_skipped"] == reports[0]["probe_skipped"]
    assert "signtrap: warning: probe: k=1000" in capsys.readouterr().err
    from signtrap.defences.run import comparison_table

    assert "finetune: re-activation probe not run (probe: k=1000" in comparison_table(reports)


@pytest.mark.slow
def test_cli_probe_on_a_run_and_a_defence_folder(run_copy, tiny_zero_run, capsys):
    assert main(["--quiet", "probe", str(run_copy), "steps=20", "clean_fraction=0.3", "--reference", str(tiny_zero_run)]) == 0
    out = capsys.readouterr().out
    written = run_copy / "probe-steps20-clean_fraction0.3.json"  # not the run's probe settings: named by them
    assert "backdoored (no defence)" in out and "persists" in out and str(written) in out
    record = json.loads(written.read_text())
    assert record["verdict"]["verdict"] == "persists" and record["model"]["steps"] >= 20
    assert not (run_copy / "probe.json").exists()
    # the defence's own probe (the stage's record, probe.json), then a stronger probe beside it, not over it
    run_defences(run_copy, "finetune", ["finetune.epochs=1", "probe.steps=20", "clean_fraction=0.3", f"probe.reference={tiny_zero_run}"],
                 "cpu", show_progress=False)
    stage_record = (run_copy / "defence-finetune" / "probe.json").read_bytes()
    assert main(["--quiet", "probe", str(run_copy / "defence-finetune"), "k=3", "steps=20", "clean_fraction=0.3",
                 "--reference", str(tiny_zero_run), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    stored = json.loads((run_copy / "defence-finetune" / "probe-k3-steps20-clean_fraction0.3.json").read_text())
    assert printed["verdict"] == stored["verdict"] and stored["k"] == 3 and stored["label"] == "finetune"
    assert (run_copy / "defence-finetune" / "probe.json").read_bytes() == stage_record


def test_a_trained_probe_never_replaces_the_stages_untrained_record(tmp_path):
    from signtrap.fileio import write_json
    from signtrap.probing.probe import record_file

    folder = tmp_path / "defence-finetune"
    folder.mkdir()
    trained, untrained = {"trained": True, "verdict": {}}, {"trained": False, "verdict": {}}
    assert record_file(folder, "probe.json", trained) == "probe.json"  # nothing there yet
    write_json(folder / "probe.json", untrained)  # the stage decided the verdict without training the probe
    assert record_file(folder, "probe.json", trained) == "probe-trained.json"
    assert record_file(folder, "probe.json", untrained) == "probe.json"  # the same measurement as the stage's
    assert record_file(folder, "probe-k20.json", trained) == "probe-k20.json"
    write_json(folder / "probe.json", trained)
    assert record_file(folder, "probe.json", trained) == "probe.json"  # the stage trained it too
    write_json(folder / "probe.json", untrained)
    (folder / "probe-trained.json").write_text("mine")  # not signtrap's: refused before anything is written
    with pytest.raises(SigntrapError, match="not written by signtrap"):
        record_file(folder, "probe.json", trained)
    assert (folder / "probe-trained.json").read_text() == "mine"


def test_probe_variant_names_only_what_changes_the_measurement():
    assert probe_variant([]) == ""
    assert probe_variant(["reference=/x/runs/a-zero", "probe.always=true", "train_reference=false"]) == ""
    assert probe_variant(["k=20", "probe.steps=500"]) == "k20-steps500"
    assert probe_variant(["clean_fraction=0.1", "lr=1e-4"]) == "clean_fraction0.1-lr1e-4"
    assert probe_variant(["k=../../etc"]) == "k....etc"  # a file name, never a path


@pytest.mark.slow
def test_reference_is_trained_once_on_demand(run_copy):
    session = Session.open(run_copy, ["clean_fraction=0.3", "probe.steps=5"], "cpu", show_progress=False)
    ref_dir, needs = session.prober.reference_plan()
    assert ref_dir == run_copy.parent / f"{run_copy.name}-zero" and needs
    session.prober.reference()
    ref_cfg = load_config(ref_dir / "config.yaml")
    assert ref_cfg.attack.kind == "none" and ref_cfg.seed == session.cfg.seed
    assert json.loads((ref_dir / "manifest.json").read_text())["poisoned"] == 0
    stamp = (ref_dir / "model.pt").stat().st_mtime_ns
    again = Session.open(run_copy, ["clean_fraction=0.3"], "cpu", show_progress=False).prober
    assert again.reference_plan() == (ref_dir, False)
    again.reference()
    assert (ref_dir / "model.pt").stat().st_mtime_ns == stamp  # reused, not retrained


def fake_defence(run_dir: Path, method: str, kind: str) -> Path:
    folder = run_dir / f"defence-{method}"
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"method": method, "kind": kind}))
    return folder


@pytest.mark.parametrize("case, message", [
    ("k", "probe: k=1000 poisoned samples requested but the defender's clean budget holds only"),
    ("no-reference", "no zero-poison reference for"),
    ("poisoned-reference", "not a zero-poison run (attack.kind=source_specific)"),
    ("missing-reference", "no trained model (model.pt)"),
    ("other-config", "not the zero-poison model of the same config (train.epochs differ)"),
    ("filter", "strip did not change the model (kind filter): nothing to probe"),
    ("not-a-run", "neither a run directory nor a defence folder"),
])
def test_bad_input_is_one_line_and_changes_nothing(case, message, run_copy, tiny_run, tiny_zero_run, tmp_path, capsys):
    target, args = run_copy, ["--reference", str(tiny_zero_run)]
    if case == "k":
        args += ["k=1000"]
    elif case == "no-reference":
        args = ["train_reference=false"]
    elif case == "poisoned-reference":
        args = ["--reference", str(tiny_run)]
    elif case == "missing-reference":
        args = ["--reference", str(tmp_path / "nowhere")]
    elif case == "other-config":
        other = tmp_path / "other-zero"
        shutil.copytree(tiny_zero_run, other)
        text = (other / "config.yaml").read_text()
        (other / "config.yaml").write_text(text.replace("epochs: 6", "epochs: 7", 1))
        args = ["--reference", str(other)]
    elif case == "filter":
        target = fake_defence(run_copy, "strip", "filter")
    else:
        target = tmp_path
    before = content_hash(run_copy)
    flags = [a for a in args if "=" not in a]
    rc = main(["--quiet", "probe", str(target), *[a for a in args if "=" in a], "clean_fraction=0.3", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("signtrap: error: ") and message in err[0], err
    assert content_hash(run_copy) == before
    assert not (run_copy.parent / f"{run_copy.name}-zero").exists()  # nothing was trained


def test_defend_checks_the_probe_reference_before_any_defence_runs(run_copy, tiny_zero_run, tmp_path, capsys):
    """A reference of another config (here: another seed) is refused before the first defence trains, not after."""
    other = tmp_path / "other-seed-zero"
    shutil.copytree(tiny_zero_run, other)
    text = (other / "config.yaml").read_text()
    seed = int(re.search(r"^seed: (\d+)$", text, re.M).group(1))
    (other / "config.yaml").write_text(re.sub(r"^seed: \d+$", f"seed: {seed + 1}", text, count=1, flags=re.M))
    before = content_hash(run_copy)
    rc = main(["--quiet", "defend", str(run_copy), "--method", "finetune", f"probe.reference={other}", "clean_fraction=0.3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not the zero-poison model of the same config (seed differ)" in err[0], err
    assert content_hash(run_copy) == before and not (run_copy / "defence-finetune").exists()


def test_api_probe_takes_the_probe_settings_as_keywords(run_copy, tiny_zero_run):
    import signtrap

    assert "probe" in signtrap.__all__ and signtrap.probe.__doc__
    with pytest.raises(SigntrapError, match=r"k=1000 poisoned samples requested"):
        signtrap.probe(run_copy, reference=tiny_zero_run, k=1000, clean_fraction=0.3)
    with pytest.raises(SigntrapError, match=r"k=999 poisoned samples requested"):
        signtrap.probe(signtrap.load_run(run_copy), reference=tiny_zero_run, overrides={"probe.k": 999, "clean_fraction": 0.3})
    fake_defence(run_copy, "strip", "filter")
    with pytest.raises(SigntrapError, match=r"strip did not change the model"):
        signtrap.probe(run_copy, "strip", reference=tiny_zero_run)
    assert not (run_copy / "probe.json").exists()
