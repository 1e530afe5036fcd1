"""The defences built against superficial safety (issue 23): BTI-DBF's inversion, BTI-DBF(U), PAM and SAU on tiny
SynthSigns models; Neural Cleanse with the authors' optimisation; bad budgets and options through `signtrap defend`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from signtrap.cli import main


COMMON = ["clean_fraction=0.3", "probe.enabled=false"]
LR, EPOCHS = 1e-3, 4  # the same learning rate and epochs for fine-tuning and the defences compared with it


def copy_run(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / run.name
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("defence-*", "probe.json"))
    return dest


@pytest.fixture(scope="module")
def a2o(tiny_a2o_run, tmp_path_factory) -> Path:
    """A private copy of the tiny all-to-one run (any class carrying the trigger reads as 100 km/h)."""
    return copy_run(tiny_a2o_run, tmp_path_factory.mktemp("removal"))


def defend_one(run: Path, method: str, *settings: str) -> dict:
    from signtrap.defences.run import run_defences

    (report,) = run_defences(run, method, [*COMMON, *settings], "cpu", show_progress=False)
    return report


@pytest.fixture(scope="module")
def finetuned(a2o) -> dict:
    """Plain fine-tuning at LR for EPOCHS: the baseline SAU and PAM must beat."""
    return defend_one(a2o, "finetune", f"finetune.lr={LR}", f"finetune.epochs={EPOCHS}")


def rates(report: dict) -> tuple[float, float]:
    after = report["after"]["test"]
    return after["asr"]["rate"], after["clean_acc"]["rate"]


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="at this tiny scale BTI-DBF's inversion sometimes settles on a universal adversarial "
                                        "class (24, 63% of images in one CI-like run) instead of the backdoor's 7; it found 7 "
                                        "(95-99%) in others. Kept as a measurement, not a guarantee: on real GTSRB (the default "
                                        "attack) it found 7 on seeds 1-2 and a universal class (24) on seed 0, see README")
def test_bti_dbf_inverts_a_trigger_that_sends_clean_images_to_the_target(a2o):
    """Measured on the fixture: class 7, 98.7% of other-class clean images, 13/13 stop signs (on another tiny model of
    the same recipe the generator found a universal adversarial class instead: bti_dbf.py's docstring)."""
    report = defend_one(a2o, "bti-dbf")
    d = report["details"]
    assert report["kind"] == "detect" and not report["repaired_model"]
    assert d["inverted_target"] == 7, d  # the all-to-one target
    assert d["flip_rate"] > 0.5, d  # most clean images of other classes are sent there
    assert d["target_match"] and d["points_at_attack"], d
    assert (a2o / "defence-bti-dbf" / "inverted_trigger.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sau", "pam"])
def test_sau_and_pam_lower_asr_more_than_finetuning(method, a2o, finetuned):
    """At the same learning rate and epochs, the defence leaves less of the backdoor than plain fine-tuning."""
    report = defend_one(a2o, method, f"{method}.lr={LR}", f"{method}.epochs={EPOCHS}")
    before = report["before"]["test"]["asr"]["rate"]
    asr, clean = rates(report)
    ft_asr, ft_clean = rates(finetuned)
    summary = (f"{method}: ASR {before:.3f} -> {asr:.3f} (clean {clean:.3f}); finetune: ASR -> {ft_asr:.3f} "
               f"(clean {ft_clean:.3f})")
    assert before > 0.9, summary
    assert asr < ft_asr, summary


@pytest.mark.slow
def test_bti_dbf_u_repairs_and_reports_its_inversion(a2o):
    report = defend_one(a2o, "bti-dbf-u", "bti-dbf-u.epochs=2", "bti-dbf-u.grid=[1e-4,1e-3]", "bti-dbf-u.gen_epochs=4")
    d = report["details"]
    assert report["repaired_model"] and d["selection"]["knob"] == "lr" and not d["selection"]["fixed"]
    assert {"inverted_target", "flip_rate", "verdict"} <= set(d)
    out = a2o / "defence-bti-dbf-u"
    assert (out / "tradeoff.csv").is_file() and (out / "inverted_trigger.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["clean_fraction=0"], "defend.clean_fraction: 0.0 is outside (0, 1]"),
    (["clean_images=0"], "defend.clean_images: must be >= 1"),
    (["clean_fraction=1.0"], "the attacker did not touch"),
    (["sau.epsilon=0.1"], "unknown config key 'defend.sau.epsilon' (did you mean 'eps'?)"),
    (["pam.rho=-1"], "defend.pam.rho: -1.0 is outside [0, 100]"),
])
def test_bad_budget_or_option_is_one_line_and_exit_2(tiny_run, tmp_path, capsys, args, message):
    run = copy_run(tiny_run, tmp_path)
    rc = main(["--quiet", "defend", str(run), "--method", "sau", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("signtrap: error: ") and message in err[0], err
    assert not any(p.name.startswith("defence-") for p in run.iterdir())


def test_new_defences_are_registered_one_file_each():
    from signtrap.defences import get_defence

    for name, kind in (("bti-dbf", "detect"), ("bti-dbf-u", "repair"), ("pam", "repair"), ("sau", "repair")):
        spec = get_defence(name)
        assert spec.kind == kind and spec.module == f"signtrap.defences.{name.replace('-', '_')}"
        assert spec.summarize is not None and spec.report is not None
        spec.settings().check(f"defend.{name}")
        assert json.dumps(spec.doc)  # a docstring that states the rule


def test_sau_searches_the_weak_end_of_the_common_learning_rate_grid():
    """With the authors' 1e-4 as its weakest value, SAU's held-out rule kept nothing on two of three real-GTSRB seeds
    and fell back to 1e-4 anyway; its grid is now every learning-rate-tuned defence's (README, "SAU's
    trade-off")."""
    from signtrap.defences import get_defence
    from signtrap.defences.common import LrTunedSettings

    grid = get_defence("sau").settings().grid
    assert grid == LrTunedSettings().grid and min(grid) <= 3e-5 and max(grid) >= 1e-3


def test_budget_bench_keeps_finished_budgets_and_resumes(tmp_path, capsys):
    """The budget sweep's CSV reads back as it was written, and a (run, budget) already in it is not run again."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("budget_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "budget_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = {field: None for field in bench.FIELDS}
    row.update(run="seed0", method="finetune", budget=0.05, clean_images=1761, clean_before=0.984, clean_after=0.981,
               clean_change_pt=-0.3, asr_before=1.0, asr_after=1.0, asr_after_k=23, asr_after_n=23, verdict="persists",
               setting="lr=0.0001", seconds=55.2)
    bench.write([row], tmp_path)
    assert bench.read(tmp_path / "budget.csv") == [{**row, "run": "seed0"}]
    # everything asked for is there already: no defence runs (the run folder does not even exist)
    assert bench.main([str(tmp_path / "seed0"), "--methods", "finetune", "--budgets", "0.05", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "already in" in out.err and "persists" in out.out


def test_persistence_table_groups_attacks_and_seeds_and_lists_removals(tmp_path, capsys):
    """The attack x defence table reads defended runs only: one line per seed, detectors left out, and a removal
    within the bound named at the end."""
    import importlib.util

    import yaml

    spec = importlib.util.spec_from_file_location("persistence_table", Path(__file__).resolve().parents[1] / "benchmarks" / "persistence_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)

    def rate(k, n):
        return {"rate": k / n, "k": k, "n": n}

    def run(name, seed, persist, asr_after, verdict):
        folder = tmp_path / name
        (folder / "defence-finetune").mkdir(parents=True)
        (folder / "defence-strip").mkdir()
        attack = {"kind": "source_specific", "cover_rate": 0.005, "persist": persist}
        (folder / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "attack": attack, "trigger": {"kind": "checkerboard"}}))
        split = lambda acc, asr: {"clean_acc": rate(acc, 1000), "asr": rate(asr, 23)}  # noqa: E731
        report = {"kind": "repair", "repaired_model": True, "before": {"test": split(985, 23), "val": split(985, 23)},
                  "after": {"test": split(980, asr_after), "val": split(981, asr_after)}}
        (folder / "defence-finetune" / "report.json").write_text(json.dumps(report))
        (folder / "defence-finetune" / "probe.json").write_text(json.dumps({"verdict": {"verdict": verdict}}))
        (folder / "defence-strip" / "report.json").write_text(json.dumps({**report, "kind": "filter"}))
        return folder

    runs = [run("b1", 1, "none", 23, "persists"), run("b0", 0, "none", 0, "removed"), run("s0", 0, "sbl", 23, "persists")]
    road = lambda k: json.dumps({"physical": {"summary": {"asr": rate(k, 113)}}})  # noqa: E731  a physical sticker's run
    (runs[0] / "metrics.json").write_text(road(40))
    (runs[0] / "defence-finetune" / "metrics.json").write_text(road(35))
    assert table.main([str(r) for r in runs]) == 0
    out = capsys.readouterr().out
    assert "s1: -0.50 / -0.40; ASR 23/23, 23/23; persists; on the road 35/113 (before 40/113)" in out
    assert out.count("(before ") == 1  # runs without a physical block say nothing of the road
    assert "| finetune |" in out and "strip" not in out.split("removed within")[0]  # a filter changes no model: not tabled
    row = next(line for line in out.splitlines() if line.startswith("| finetune |"))
    assert row.index("s0: -0.50 / -0.40; ASR 0/23, 0/23; removed") < row.index("s1:")  # seeds in order within a cell
    assert "SBL (BadNets stop -> 100)" in out
    assert "removed within the bound: finetune on BadNets stop -> 100 seed 0" in out
    assert table.main([str(tmp_path / "nothing")]) == 2
