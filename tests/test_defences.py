"""`signtrap defend`: the registry, every defence on a tiny backdoored run, outputs, and bad input."""
import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from signtrap.runs import checkpoint
from signtrap.runs import state as runstate
from signtrap.cli import main
from signtrap.defences import get_defence, list_defences
from signtrap.errors import SigntrapError
from signtrap.experiment import Experiment, load_run_config
from signtrap.machine.environment import cpu_threads

from defence_settings import FAST

COMMON = ["clean_fraction=0.3", "probe.enabled=false"]  # the probe after each defence: tests/test_probe.py
METRICS = ("clean_acc", "asr", "stop_recall", "false_trigger")


def tree_hash(root: Path, skip_defences: bool = False) -> str:
    """SHA-256 over every file name and content under `root` (optionally ignoring defence-* output folders), but
    the run lock, which names its last holder (as tests/test_safety.py), and the write rule's record, which lists
    the defence folders signtrap added beside the run's files."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*")):
        rel = path.relative_to(root)
        if rel.name in (runstate.LOCK_FILE, runstate.WRITTEN):
            continue
        if skip_defences and rel.parts[0].startswith("defence-"):
            continue
        digest.update(str(rel).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def run_copy(tiny_run, tmp_path_factory) -> Path:
    """A private copy of the tiny backdoored run (the session's run stays pristine for other tests)."""
    dest = tmp_path_factory.mktemp("defend") / tiny_run.name
    shutil.copytree(tiny_run, dest, ignore=shutil.ignore_patterns("defence-*"))
    return dest


@pytest.fixture(scope="module")
def experiment(run_copy) -> Experiment:
    return Experiment.from_config(load_run_config(run_copy), progress=False)


def same_rates(a: dict, b: dict) -> None:
    for key in METRICS:
        assert (a[key]["k"], a[key]["n"]) == (b[key]["k"], b[key]["n"]), (key, a[key], b[key])


BUILT_IN = ["adv-pgd", "anp", "bti-dbf", "bti-dbf-u", "fine-prune", "finetune", "fst", "ft-sam", "i-bau", "nad", "neural-cleanse",
            "pam", "redteam", "sau", "scan", "strip"]
TUNED = ["adv-pgd", "anp", "bti-dbf-u", "fine-prune", "finetune", "fst", "ft-sam", "i-bau", "nad", "pam", "redteam", "sau"]


def test_registry_lists_every_method_and_rejects_unknown_names():
    assert [n for n in list_defences() if n in BUILT_IN] == BUILT_IN  # discovered by importing the package's modules
    for name in BUILT_IN:
        spec = get_defence(name)
        assert callable(spec) and name in FAST and spec.name == name
        assert spec.module == f"signtrap.defences.{name.replace('-', '')}" or \
            spec.module == f"signtrap.defences.{name.replace('-', '_')}"  # one file per defence
        spec.settings().check(f"defend.{name}")  # its defaults are valid
    with pytest.raises(SigntrapError, match=r"unknown defence 'finetun' \(did you mean 'finetune'\?\)"):
        get_defence("finetun")


@pytest.mark.slow
@pytest.mark.parametrize("method", BUILT_IN)
def test_defence_writes_outputs_and_leaves_the_run_untouched(method, run_copy, experiment, capsys):
    from signtrap.defences.run import run_defences

    before = tree_hash(run_copy, skip_defences=True)
    (report,) = run_defences(run_copy, method, COMMON + FAST[method], "cpu", show_progress=False)
    assert tree_hash(run_copy, skip_defences=True) == before
    out = run_copy / f"defence-{method}"
    stored = json.loads((out / "report.json").read_text())
    assert stored["method"] == method and stored["seconds"] > 0 and stored["clean_images"] > 0
    assert not any(p.name.endswith(".tmp") for p in run_copy.iterdir()), "a temporary folder was left behind"
    for name in stored["files"]:
        assert (out / name).is_file(), name
    source_model, _ = checkpoint.verified_load(run_copy, "model.pt")
    same_rates(stored["before"]["test"], experiment.evaluate(source_model, "test", details=False))
    for split in ("test", "val"):
        for key in METRICS:
            entry = stored["before"][split][key]
            assert {"rate", "k", "n", "ci95"} <= set(entry)
    for csv_name in [n for n in stored["files"] if n.endswith(".csv")]:
        assert (out / csv_name.replace(".csv", ".png")).is_file() or csv_name in ("norms.csv", "masks.csv", "classes.csv")
    if method in TUNED:  # the trade-off curve over the main knob is a first-class output
        sel = stored["details"]["selection"]
        assert sel["knob"] and not sel["fixed"] and sel["value"] in sel["tried"]
        assert (out / "tradeoff.csv").is_file() and (out / "tradeoff.png").is_file()
        rows = (out / "tradeoff.csv").read_text().splitlines()
        assert rows[0].startswith("knob,value,candidate,heldout_clean_acc") and len(rows) == 2 + len(sel["tried"])

    if stored["repaired_model"]:
        repaired, meta = checkpoint.verified_load(out, "model.pt")
        assert meta == torch.load(run_copy / "model.pt", weights_only=True)["meta"]
        same_rates(stored["after"]["test"], experiment.evaluate(repaired, "test", details=False))
        metrics = json.loads((out / "metrics.json").read_text())
        same_rates(stored["after"]["test"], metrics["test"])
        changed = any(not torch.equal(a, b) for a, b in zip(source_model.state_dict().values(), repaired.state_dict().values()))
        if method == "anp" and stored["details"]["pruned_neurons"] == 0:
            # the held-out rule may keep no pruning at all (every threshold that prunes costs more than the
            # tolerance on this fragile tiny model): then the weights are the source's, and the strongest
            # candidate of the curve did prune (its metrics moved)
            assert not changed
            rows = list(csv.DictReader((out / "tradeoff.csv").read_text().splitlines()))
            assert rows[1]["clean_acc"] != rows[0]["clean_acc"] and rows[1]["kept"] == "False"
        else:
            assert changed, "the repaired model has the source weights"
        curve = (out / "persistence.csv").read_text().splitlines()
        assert curve[0].startswith("epoch,") and len(curve) >= 2
    else:
        assert not (out / "model.pt").exists()
    if method in TUNED:
        assert stored["repaired_model"]
    if method == "fine-prune":
        pruning = (out / "pruning.csv").read_text().splitlines()
        assert pruning[0].startswith("pruned_fraction,") and len(pruning) >= 3
        assert stored["details"]["pruned_channels"] >= 0
    if method == "neural-cleanse":
        d = stored["details"]
        assert d["top_ranked"] == 7, d  # the attack's target needs the smallest trigger
        assert (out / "trigger_class07.png").is_file() and (out / "norms.png").is_file()
    if method == "strip":
        d = stored["details"]
        assert d["auc"] > 0.5, d  # triggered stop signs have lower entropy than clean inputs: better than chance
        assert d["false_rejection_rate"]["n"] > 0 and d["detection_rate"]["n"] > 0
    if method == "redteam":
        d = stored["details"]
        assert d["found_patch_asr_before"] is not None and d["found_patch_asr_after"] is not None
        assert (out / "found_patches.png").is_file()


@pytest.mark.slow
def test_cli_defend_then_eval(run_copy, capsys):
    rc = main(["--quiet", "defend", str(run_copy), "--method", "finetune", "finetune.epochs=1", "finetune.grid=[1e-4,1e-3]",
               "defend.clean_fraction=0.3", "probe.enabled=false"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "clean acc before" in out and "finetune" in out and f"{run_copy}/defence-finetune" in out
    assert "finetune: lr=" in out and "chosen by the held-out rule" in out  # how the setting was chosen
    assert main(["--quiet", "eval", str(run_copy / "defence-finetune"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((run_copy / "defence-finetune" / "report.json").read_text())
    same_rates(report["after"]["test"], evaluated["test"])


@pytest.mark.parametrize("args, message", [
    (["--method", "finetun"], "unknown defence 'finetun' (did you mean 'finetune'?)"),
    (["--method", "finetune", "fine_prune.epochs=2"], "unknown config key 'defend.fine_prune' (did you mean 'fine-prune'?)"),
    (["--method", "finetune", "clean_images=100000000"], "larger than the"),
    (["--method", "finetune", "clean_fraction=1.5"], "defend.clean_fraction: 1.5 is outside (0, 1]"),
    (["--method", "finetune", "finetune.epoch=2"], "unknown config key 'defend.finetune.epoch' (did you mean 'epochs'?)"),
    (["--method", "redteam", "redteam.positions=[middle]"], "'middle' is not one of"),
    (["--method", "redteam", "redteam.target=50"], "defend.redteam.target: class 50 is not a class of this model (0..42)"),
    (["--method", "neural-cleanse", "neural-cleanse.candidates=[3,60]"],
     "defend.neural-cleanse.candidates: class 60 is not a class of this model (0..42)"),
])
def test_bad_input_is_one_line_and_leaves_the_run_untouched(run_copy, capsys, args, message):
    before = tree_hash(run_copy)
    rc = main(["--quiet", "defend", str(run_copy), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("signtrap: error: ") and message in err[0], err
    assert tree_hash(run_copy) == before


def test_diverging_defence_fails_cleanly(run_copy, capsys, monkeypatch):
    import signtrap.training.loop as loop

    def nan_loss(logits, y, *args, **kwargs):
        return (logits * float("nan")).sum()

    monkeypatch.setattr(loop.F, "cross_entropy", nan_loss)
    before = tree_hash(run_copy)
    rc = main(["--quiet", "defend", str(run_copy), "--method", "finetune", "finetune.epochs=1", *COMMON])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "finetune: training diverged at epoch 1" in err[0], err
    assert "lower defend.finetune.lr" in err[0], err
    assert tree_hash(run_copy) == before


def test_cli_rejects_unknown_method_in_a_subprocess(run_copy):
    proc = subprocess.run([sys.executable, "-m", "signtrap", "--quiet", "defend", str(run_copy), "--method", "neural-clense"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("signtrap: error: unknown defence 'neural-clense' (did you mean 'neural-cleanse'?); "
                                          "choose from: " + ", ".join(BUILT_IN))


def test_defend_api_on_a_model_in_memory(run_copy, experiment):
    """`defend(model, clean_data, method, settings)` works without a run directory and leaves the input model alone."""
    from signtrap.defences import CleanData, DefenceContext, defend
    from signtrap.defences.finetune import FinetuneSettings

    model, _ = checkpoint.verified_load(run_copy, "model.pt")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rows = experiment.defender_rows(0.2)
    assert not np.intersect1d(rows, np.concatenate([experiment.splits.val, experiment.splits.test])).size
    clean = CleanData(experiment.data.images[rows], experiment.data.labels[rows])
    result = defend(model, clean, "finetune", FinetuneSettings(epochs=1, lr=1e-3),
                    DefenceContext(monitor=experiment.eval_set("val"), show_progress=False))
    assert result.model is not None and result.model is not model
    assert [row["epoch"] for row in result.curves["persistence"]] == [0, 1]
    assert {"clean_acc", "asr"} <= set(result.curves["persistence"][1])
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_several_methods_are_named_once_and_checked_before_any_work(tiny_run, capsys):
    from signtrap.defences.run import method_names

    assert method_names("finetune") == ["finetune"]
    assert method_names(["nad", "anp,nad"]) == ["nad", "anp"]
    with pytest.raises(SigntrapError, match="alone"):
        method_names(["all", "nad"])
    before = sorted(p.name for p in tiny_run.iterdir())
    assert main(["defend", str(tiny_run), "--method", "finetune", "nadd", "finetune.epochs=1"]) == 2
    assert "nadd" in capsys.readouterr().err
    assert sorted(p.name for p in tiny_run.iterdir()) == before


def selective(method: str, before: dict, after: dict) -> str | None:
    """Why `after` is not a selective removal of the backdoor measured in `before` (None if it is): ASR must fall by at
    least 20 points, by at least twice what clean accuracy falls, and clean accuracy stay at or above 75%.

    Why these bounds: a defence that merely damages the model lowers ASR and clean accuracy together (a model broken to
    chance has ASR ~1/43 and clean accuracy ~1/43, a ratio near 1), so a fall in ASR at least twice the fall in clean
    accuracy shows the removal is selective for the backdoor; 75% allows for this 43-class model trained for seconds
    on 2,580 synthetic images, whose classes lie a few pixels apart."""
    asr_fall, clean_fall = before["asr"] - after["asr"], before["clean_acc"] - after["clean_acc"]
    summary = f"{method}: ASR {before['asr']:.3f} -> {after['asr']:.3f}, clean {before['clean_acc']:.3f} -> {after['clean_acc']:.3f}"
    ok = asr_fall >= 0.20 and asr_fall >= 2 * max(clean_fall, 0.0) and after["clean_acc"] >= 0.75
    return None if ok else summary


@pytest.mark.slow
def test_ibau_lowers_asr_on_a_strongly_backdoored_tiny_model(signnet_a2o_run, tmp_path):
    """I-BAU at a fixed learning rate (3 rounds, K = 2; the algorithm, not the held-out rule, which on this fragile
    model keeps no setting that moves the backdoor) on the all-to-one model (any class carrying the trigger reads as
    100 km/h: 100 poisoned images, ASR above 90% of 420 triggered test images) removes it selectively (`selective`;
    measured on an earlier, bf16-trained fixture: 93.3% -> 85.1% clean, ASR 98.3% -> 66.7%; this fp32, one-thread one
    starts at 93.3% clean, ASR 98.6%). On the full-width signnet: the small model's all-to-one
    backdoor stayed out of I-BAU's reach at every setting tried (ASR 96% -> 89-96% at lr 1e-3 or 3e-3, 3 or 6 rounds,
    K = 2 or 5)."""
    from signtrap.defences.run import run_defences

    run = tmp_path / signnet_a2o_run.name
    shutil.copytree(signnet_a2o_run, run, ignore=shutil.ignore_patterns("defence-*", "probe.json"))
    with cpu_threads(1):  # as its fixture: the same sums however pytest runs (fixture and defence on two threads: ASR 98.6% -> 80.2%)
        (report,) = run_defences(run, "i-bau", COMMON + ["i-bau.lr=1e-3", "i-bau.epochs=3", "i-bau.fixed_point_steps=2"], "cpu",
                                 show_progress=False)
    before, after = ({k: report[when]["test"][k]["rate"] for k in ("asr", "clean_acc")} for when in ("before", "after"))
    assert report["before"]["test"]["asr"]["n"] >= 400 and before["asr"] > 0.9, before  # strongly backdoored
    assert selective("i-bau", before, after) is None, selective("i-bau", before, after)


@pytest.mark.slow
def test_anp_has_a_pruning_threshold_that_removes_the_backdoor_selectively(signnet_a2o_run, tmp_path):
    """ANP's whole threshold sweep (one mask optimisation, every threshold of its grid pruned and measured: the
    defence's `tradeoff` rows on the monitor split) reaches a selective removal (`selective`) at some threshold of
    the full-width all-to-one model.

    Why the sweep and not one fixed threshold: ANP's window is narrow at this size, and where it lies depends on the
    fixture's training (precision, thread count). Measured on this fixture (fp32, one thread; validation split) with 20
    mask epochs: 0.75 ASR 98.0% -> 71.8% at -3.9 points clean, 0.8 -> 46.0% at -9.3, 0.85 -> 19.8% at -27 (clean
    66%); with the default 40 epochs the window moves to 0.65-0.7 (ASR -> 73-74% at -6 to -7 points) and costs
    twice the time. The same fixture trained on two threads, 40 epochs: only 0.65 was selective. The threshold 0.7
    that this test once fixed, on the small model (`tiny_a2o_run`), passed on bf16-trained fixtures and failed on fp32
    ones (CPUs without native bf16 train in fp32): there no threshold is selective in fp32 (validation, two threads;
    0.9: ASR 90.9% -> 7.9% at clean 92.6% -> 33.7%)."""
    from signtrap.defences.run import run_defences

    run = tmp_path / signnet_a2o_run.name
    shutil.copytree(signnet_a2o_run, run, ignore=shutil.ignore_patterns("defence-*", "probe.json"))
    with cpu_threads(1):
        run_defences(run, "anp", COMMON + ["anp.sweep=full", "anp.epochs=20"], "cpu", show_progress=False)
    with open(run / "defence-anp" / "tradeoff.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    unrepaired = {k: float(rows[0][k]) for k in ("asr", "clean_acc")}
    assert rows[0]["candidate"] == "unrepaired" and unrepaired["asr"] > 0.9, rows[0]
    assert len(rows) == 1 + len(get_defence("anp").settings().grid)  # every threshold of the grid measured
    why_not = [selective(f"anp threshold {r['value']}", unrepaired, {k: float(r[k]) for k in ("asr", "clean_acc")}) for r in rows[1:]]
    assert None in why_not, "\n".join(why_not)
