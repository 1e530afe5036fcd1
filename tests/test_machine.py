"""The machine's core budget (signtrap.machine.cores): concurrent signtrap processes hold disjoint cores, a
process that finds none free waits and names the holders, and thread counts are bounded by the cores this
process may use. Read back from each process (what it claimed), never a timing. Every test uses its own
budget folder (SIGNTRAP_CORES_DIR), so other signtrap processes on the machine do not enter."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_overrides
from signtrap.cli import main as cli_main
from signtrap.errors import ConfigError
from signtrap.machine import cores

N = cores.allowance()
needs_two = pytest.mark.skipif(N < 2, reason="needs a process allowed at least 2 CPU cores")

# Claims cores as every computing command does, reports them, and holds them until its `go` file appears.
HOLD = """
import json, os, sys, time
from pathlib import Path
import torch
from signtrap.machine import cores
from signtrap.machine.environment import cpu_threads
go = Path(sys.argv[2])
with cpu_threads(int(sys.argv[1])) as threads:
    print(json.dumps({"pid": os.getpid(), "cores": cores.claimed().cores, "threads": threads,
                      "torch": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS")}), flush=True)
    while not go.exists():
        time.sleep(0.05)
print(json.dumps({"released": True, "omp": os.environ.get("OMP_NUM_THREADS")}), flush=True)
"""


@pytest.fixture
def budget(tmp_path, monkeypatch) -> dict:
    folder = tmp_path / "cores"
    env = {**os.environ, cores.ENV_DIR: str(folder)}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", cores.ENV_POLICY, "WORLD_SIZE"):
        env.pop(name, None)
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(cores.ENV_DIR, str(folder))
    return env


def hold(tmp_path: Path, env: dict, threads: int, name: str):
    """A holder process: (Popen, its go file, its stderr file)."""
    err = tmp_path / f"{name}.err"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(threads), str(tmp_path / f"{name}.go")], env=env,
                            stdout=subprocess.PIPE, stderr=open(err, "w"), text=True)
    return proc, tmp_path / f"{name}.go", err


def wait_for(predicate, what: str, limit: float = 300.0) -> None:
    deadline = time.time() + limit
    while not predicate():
        assert time.time() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


@needs_two
def test_two_processes_started_together_hold_disjoint_cores(tmp_path, budget):
    procs = [hold(tmp_path, budget, 1, name) for name in ("a", "b")]
    try:
        seen = [json.loads(p.stdout.readline()) for p, _, _ in procs]  # both hold their claim now
        assert all(len(s["cores"]) == 1 and s["threads"] == s["torch"] == 1 and s["omp"] == "1" for s in seen), seen
        assert not set(seen[0]["cores"]) & set(seen[1]["cores"]), seen
        assert set(seen[0]["cores"]) | set(seen[1]["cores"]) <= set(cores.allowed_cpus())
        held = cores.holders()  # read back from the budget itself: each core names its process
        assert {held[c]["pid"] for s in seen for c in s["cores"]} == {s["pid"] for s in seen}
    finally:
        for p, go, _ in procs:
            go.touch()
            p.wait(timeout=120)
    assert all(p.returncode == 0 for p, _, _ in procs)
    assert cores.holders() == {c: None for c in cores.allowed_cpus()}  # released at exit


@needs_two
def test_a_second_default_process_waits_naming_the_holder_then_takes_the_cores(tmp_path, budget):
    first, first_go, _ = hold(tmp_path, budget, 0, "first")
    second = None
    try:
        mine = json.loads(first.stdout.readline())
        assert sorted(mine["cores"]) == cores.allowed_cpus() and mine["threads"] == N  # the default: all it may use
        second, second_go, second_err = hold(tmp_path, budget, 0, "second")
        wait_for(lambda: "waiting for a free CPU core" in second_err.read_text(), "the second process to wait")
        assert f"pid {mine['pid']}" in second_err.read_text()
        assert second.poll() is None
        first_go.touch()
        theirs = json.loads(second.stdout.readline())
        assert first.wait(timeout=120) == 0
        assert theirs["threads"] == N and sorted(theirs["cores"]) == cores.allowed_cpus()
        second_go.touch()
        assert second.wait(timeout=120) == 0
    finally:
        first_go.touch()
        if second is not None:
            (tmp_path / "second.go").touch()
            second.wait(timeout=120)
        first.wait(timeout=120)


@needs_two
def test_default_threads_take_only_the_free_cores(tmp_path, budget):
    one, one_go, _ = hold(tmp_path, budget, 1, "one")
    try:
        taken = json.loads(one.stdout.readline())["cores"]
        with cores.claim(0) as claim:  # this process: the default takes what is free, without waiting
            assert len(claim.cores) == N - 1 and not set(claim.cores) & set(taken)
            assert claim.threads == N - 1 and os.environ["OMP_NUM_THREADS"] == str(N - 1)
            with cores.claim(1) as inner:  # nested: the outer claim, no second claim
                assert inner.cores == claim.cores and inner.threads == 1
        assert "OMP_NUM_THREADS" not in os.environ
    finally:
        one_go.touch()
        one.wait(timeout=120)


def test_share_policy_never_waits(tmp_path, budget, monkeypatch):
    procs = [hold(tmp_path, budget, 1, f"h{i}") for i in range(N)]
    try:
        for p, _, _ in procs:
            json.loads(p.stdout.readline())
        monkeypatch.setenv(cores.ENV_POLICY, "share")
        with cores.claim(0) as claim:
            assert claim.cores == [] and claim.threads == 1
    finally:
        for p, go, _ in procs:
            go.touch()
            p.wait(timeout=120)


def test_thread_counts_are_bounded_by_the_allowance(budget):
    assert cores.check_threads(0) == 0 and cores.check_threads(N) == N
    for bad in (N + 1, 64, -3):
        with pytest.raises(ConfigError, match="train.threads="):
            cores.check_threads(bad)
    with pytest.raises(ConfigError, match="cannot be negative"):
        cores.check_threads(-1, stored=True)
    assert cores.check_threads(N + 1, stored=True) == N  # a value stored in a run made on a bigger machine: capped


def one_line(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("signtrap: error: "), (rc, err)
    assert "unexpected" not in err[0]
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def test_train_threads_above_the_allowance_or_negative_refused_before_anything(tmp_path, budget, capsys):
    for value, needle in ((N + 1, f"more than the {N} CPU core"), (64, "64"), (-3, "train.threads")):
        capsys.readouterr()
        rc = cli_main(["--quiet", "train", *tiny_overrides(tmp_path, "refused"), f"train.threads={value}"])
        one_line(capsys, rc, needle)
        assert not (tmp_path / "runs" / "refused").exists()


def test_export_and_bench_threads_refused(tiny_run, tmp_path, budget, capsys):
    for value, needle in ((N + 1, f"more than the {N} CPU core"), (-3, "cannot be negative")):
        capsys.readouterr()
        rc = cli_main(["--quiet", "export", str(tiny_run), "--out", str(tmp_path / "x"), "--threads", str(value)])
        one_line(capsys, rc, "threads", needle)
        assert not (tmp_path / "x").exists()
        folder = tmp_path / "not-an-export"
        folder.mkdir(exist_ok=True)
        rc = cli_main(["--quiet", "bench", str(folder), "--threads", str(value)])
        one_line(capsys, rc, "threads", str(value))  # (the API's own argument check may word a negative one first)


def test_training_records_the_cores_it_held(tmp_path, budget):
    from signtrap.config import load_config
    from signtrap.training.trainer import train

    run = train(load_config(None, tiny_overrides(tmp_path, "held", "train.epochs=1", "train.threads=1")))
    machine = json.loads((run / "provenance.json").read_text())["machine"]
    assert len(machine["cores_claimed"]) == 1 and machine["torch_threads"] == 1 and machine["usable_cpus"] == N
    assert cores.claimed() is None and cores.holders() == {c: None for c in cores.allowed_cpus()}


def test_plain_progress_shows_slow_units_as_seconds_each(capsys):
    from signtrap.machine.progress import PlainProgress

    bar = PlainProgress(12, "search", "class")
    bar.start -= 60.0  # six classes in a minute: 0.1 class/s, which "0 class/s" would hide
    bar.n = 6
    bar._print()
    line = capsys.readouterr().err
    assert "6/12 class (10.0 s/class, eta 60s)" in line, line
    bar.n = 600
    bar._print()
    assert "(10 class/s" in capsys.readouterr().err
