"""`signtrap sweep`: grid expansion and names, parallel local runs, skipping finished runs, summary
with defences, clear errors, and the Ray executor giving the same summary as the local one."""
import csv
import io
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_overrides
from signtrap.cli import main

# 2 epochs on 1161 SynthSigns training images, one thread per run
EXTRA = ("data.synth_per_class=30", "train.epochs=2", "train.threads=1")
METRICS = ("poisoned", "clean_acc", "asr", "asr_n", "stop_recall", "false_trigger")


def write_sweep(base: Path, name: str, grid: dict, *extra: str, **keys) -> Path:
    overrides = [o for o in tiny_overrides(base, "ignored", *EXTRA, *extra) if not o.startswith("name=")]
    path = base / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "overrides": overrides, "grid": grid, **keys}, sort_keys=False))
    return path


def sweep(capfd, *args: str) -> tuple[int, str, str]:
    code = main(["sweep", *map(str, args)])
    out, err = capfd.readouterr()
    return code, out, err


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


GRID = {"attack.poison_count": [10, 20], "trigger.kind": ["checkerboard", "yellow_square"]}


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    """A 2x2 sweep with a 1-epoch fine-tuning defence, 2 runs at a time."""
    base = tmp_path_factory.mktemp("sweep")
    path = write_sweep(base, "grid", GRID, "defend.methods=[finetune]", "defend.finetune.epochs=1")
    code = main(["--quiet", "sweep", str(path), "--workers", "2", "--threads", "1"])
    return base, path, code


@pytest.mark.slow
def test_grid_sweep_runs_every_combination_and_summarises(grid_sweep):
    base, path, code = grid_sweep
    root = base / "runs" / "grid"
    assert code == 0, sorted(p.name for p in (root / "logs").iterdir())
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "logs")
    assert names == [f"attack.poison_count={c},trigger.kind={k}" for c in (10, 20) for k in ("checkerboard", "yellow_square")]
    for name in names:  # ordinary run directories, defended
        assert {"config.yaml", "manifest.json", "model.pt", "metrics.json"} <= {p.name for p in (root / name).iterdir()}
        assert (root / name / "defence-finetune" / "report.json").is_file()
        cfg = yaml.safe_load((root / name / "config.yaml").read_text())
        assert cfg["name"] == name and cfg["runs_dir"] == str(root) and cfg["train"]["epochs"] == 2
    rows = read_csv(root / "summary.csv")
    assert len(rows) == 8 and {r["defence"] for r in rows} == {"none", "finetune"}
    for r in rows:
        assert r["poisoned"] == r["attack.poison_count"] and r["status"] == "trained"
        assert 0.0 <= float(r["asr"]) <= 1.0 and 0.0 <= float(r["clean_acc"]) <= 1.0
        if r["defence"] == "finetune":  # before = the trained model's own numbers
            none = next(n for n in rows if n["run"] == r["run"] and n["defence"] == "none")
            assert float(r["asr_before"]) == float(none["asr"]) and float(r["clean_acc_before"]) == float(none["clean_acc"])
    md = (root / "summary.md").read_text()
    assert "defences after training: finetune" in md and md.count("| finetune |") == 4
    assert (root / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_rerun_skips_finished_runs(grid_sweep, capfd):
    base, path, code = grid_sweep
    assert code == 0
    root = base / "runs" / "grid"
    models = sorted(root.glob("*/model.pt")) + sorted(root.glob("*/defence-*/model.pt"))
    assert len(models) == 8
    before = {p: p.stat().st_mtime_ns for p in models}
    summary = read_csv(root / "summary.csv")
    code, out, err = sweep(capfd, path, "--workers", "2")
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in models} == before  # nothing retrained or re-defended
    assert "0 to do" in err and err.count("skipped attack.poison_count=") == 4
    again = read_csv(root / "summary.csv")
    assert [r["status"] for r in again] == ["skipped"] * 8
    assert [{k: r[k] for k in METRICS} for r in again] == [{k: r[k] for k in METRICS} for r in summary]


def test_bad_grid_key_is_one_line_with_a_suggestion(tmp_path, capfd):
    path = write_sweep(tmp_path, "bad", {"attack.poison_rat": [0.0, 0.01]})
    code, out, err = sweep(capfd, path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "grid key 'attack.poison_rat' is not a config key" in lines[0]
    assert "did you mean 'attack.poison_rate'" in lines[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("grid", [{}, None, {"attack.poison_rate": []}])
def test_empty_grid_is_one_line(tmp_path, capfd, grid):
    path = write_sweep(tmp_path, "empty", grid)
    code, out, err = sweep(capfd, path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "empty" in err, err
    assert not (tmp_path / "runs").exists()


def test_bad_grid_value_is_caught_before_anything_runs(tmp_path, capfd):
    path = write_sweep(tmp_path, "badvalue", {"trigger.kind": ["checkerboard", "chekerboard"]})
    code, out, err = sweep(capfd, path)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "run trigger.kind=chekerboard" in err and "did you mean 'checkerboard'" in err
    assert not (tmp_path / "runs").exists()


def test_run_names_and_dry_run(tmp_path, capfd):
    from signtrap.runs.sweeps import run_name

    assert run_name({"attack.poison_rate": 0.005, "trigger.kind": "checkerboard", "seed": 1}) == \
        "attack.poison_rate=0.005,trigger.kind=checkerboard,seed=1"
    assert run_name({"defend.methods": ["finetune", "strip"], "data.root": "/a b/c"}) == "defend.methods=finetune+strip,data.root=_a_b_c"
    path = write_sweep(tmp_path, "dry", {"attack.poison_rate": [0.0, 0.01]}, seeds=[3, 4])
    code, out, err = sweep(capfd, path, "--dry-run")
    assert code == 0
    assert out.split() == [w for rate in ("0.0", "0.01") for seed in (3, 4) for w in
                           ("train", str(tmp_path / "runs" / "dry" / f"attack.poison_rate={rate},seed={seed}"))]
    assert not (tmp_path / "runs").exists()


def test_ray_missing_says_how_to_install(tmp_path, capfd, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    path = write_sweep(tmp_path, "noray", {"attack.poison_rate": [0.0]})
    code, out, err = sweep(capfd, path, "--executor", "ray")
    assert code == 2 and err.strip() == "signtrap: error: the ray executor needs Ray, an optional extra: pip install 'signtrap[ray]'"


@pytest.mark.slow
def test_failed_run_fails_the_sweep_clearly(tmp_path, capfd):
    path = write_sweep(tmp_path, "fail", {"attack.poison_count": [500]})  # more than the stop images there are
    code, out, err = sweep(capfd, path)
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("signtrap: error:")]
    assert len(errors) == 2 and "sweep run attack.poison_count=500 failed (run exited with 1: pipeline stage train failed: config attack: 500 poisoned" in errors[0]
    assert "1 of 1 runs failed" in errors[1]
    assert read_csv(tmp_path / "runs" / "fail" / "summary.csv")[0]["status"] == "failed"
    assert not (tmp_path / "runs" / "fail" / "attack.poison_count=500").exists()  # nothing made, nothing left behind


@pytest.mark.slow
def test_ray_executor_gives_the_local_summary(grid_sweep, tmp_path, capfd):
    pytest.importorskip("ray", reason="the ray executor is an optional extra: pip install 'signtrap[ray]'")
    base, _, code = grid_sweep
    assert code == 0
    # the two checkerboard runs of the local 2x2 sweep, now as Ray tasks started by the executor's own local instance
    path = write_sweep(tmp_path, "ray", {"attack.poison_count": [10, 20]}, "trigger.kind=checkerboard")
    code, out, err = sweep(capfd, path, "--executor", "ray", "--threads", "1", "--no-defend")
    assert code == 0, err
    assert "ray executor: 2 runs" in err
    ray_rows = read_csv(tmp_path / "runs" / "ray" / "summary.csv")
    local_rows = [r for r in read_csv(base / "runs" / "grid" / "summary.csv")
                  if r["trigger.kind"] == "checkerboard" and r["defence"] == "none"]
    assert [r["status"] for r in ray_rows] == ["trained", "trained"]
    assert [{k: r[k] for k in ("attack.poison_count", *METRICS)} for r in ray_rows] == \
        [{k: r[k] for k in ("attack.poison_count", *METRICS)} for r in local_rows]
