"""Attack procedures as plugins (signtrap.attacks): SBL's two tasks, and settings errors in one line."""
from __future__ import annotations


import pytest

from conftest import run_cli, tiny_overrides
from signtrap.config import load_config
from signtrap.errors import ConfigError
from signtrap.fileio import read_json


def test_sbl_settings_are_checked_through_the_registry():
    cfg = load_config(None, ["attack.persist=sbl", "attack.sbl.epochs=2", "attack.sbl.method=naive"])
    assert cfg.attack.phase("sbl").epochs == 2 and cfg.attack.phase("sbl").method == "naive"
    with pytest.raises(ConfigError, match="unknown config key 'attack.sbl.epoch'"):
        load_config(None, ["attack.persist=sbl", "attack.sbl.epoch=2"])
    with pytest.raises(ConfigError, match="attack.sbl: set, but attack.persist is none"):
        load_config(None, ["attack.sbl.epochs=2"])
    with pytest.raises(ConfigError, match="needs a backdoor"):
        load_config(None, ["attack.persist=sbl", "attack.kind=none"])
    assert load_config(None, ["attack.dormant=int8"]).attack.persist == "int8"  # the sleeper's older spelling


def test_bad_attack_option_is_one_line_and_exit_2(tmp_path):
    result = run_cli("train", *tiny_overrides(tmp_path, "bad", "attack.persist=sbl", "attack.sbl.lambd=-1"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("attack.sbl.lambd: must be >= 0")


@pytest.mark.slow
def test_sbl_runs_both_tasks_and_keeps_its_backdoor(tmp_path):
    from signtrap.training.trainer import train

    run = train(load_config(None, tiny_overrides(tmp_path, "sbl", "attack.persist=sbl", "attack.sbl.epochs=2",
                                                 "attack.sbl.fisher_images=64", "train.threads=1")))
    report = read_json(run / "attack.json")
    assert report["procedure"] == "sbl" and report["task2_images"] > 0 and report["fisher_mean"] > 0
    assert set(report["after_task2"]["val"]) == {"clean_acc", "asr", "stop_recall", "false_trigger"}
    metrics = read_json(run / "metrics.json")
    assert metrics["test"]["asr"]["rate"] >= 0.5  # task 2 (clean, EWC-anchored) keeps the backdoor it started in
    assert metrics["test"]["asr"]["rate"] == pytest.approx(report["after_task2"]["test"]["asr"])  # the saved model is task 2's
