"""Issue 11: never lose a user's data. Each test reproduces one case of the issue with tiny SynthSigns runs
and asserts the safe outcome (the numbers in the comments are the issue's)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cli, tiny_overrides
from signtrap.runs import state as runstate
from signtrap.cli import build_parser
from signtrap.errors import SigntrapError
from signtrap.fileio import atomic_dir, atomic_path, clean_orphans, sha256_file, tmp_prefix, umask


# ---------------------------------------------------------------- helpers


def one_line_error(result: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """The command failed with exit status `code` and exactly one line `signtrap: error: ...` naming `needles`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("signtrap: error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under `folder` but the lock (which names its last holder): (SHA-256, mtime); equal
    snapshots mean nothing of the run was touched."""
    return {p.relative_to(folder).as_posix(): (sha256_file(p), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != runstate.LOCK_FILE}


def copy_run(tiny_run: Path, base: Path, name: str) -> Path:
    """A copy of the shared tiny run at base/runs/NAME, so `tiny_overrides(base, NAME)` addresses it."""
    dst = base / "runs" / name
    shutil.copytree(tiny_run, dst)
    return dst


@pytest.fixture
def readonly():
    """make(path): a folder nothing can be created in, even by root (chattr +i), undone at teardown."""
    made = []

    def make(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            result = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
            if result.returncode:
                pytest.skip("running as root where chattr +i is not available: no folder can be made read-only")
        else:
            path.chmod(0o555)
        made.append(path)
        return path

    yield make
    for path in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        else:
            path.chmod(0o755)


class Payload:
    """Any class: a pickle holding an instance is code to run, not weights."""


HOLD = ("import sys, time\nfrom signtrap.runs.state import locked\n"
        "with locked(sys.argv[1], 'signtrap train'):\n    print('held', flush=True)\n    time.sleep(600)\n")


@contextlib.contextmanager
def held_by_another_process(run_dir: Path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- 1. export --out never deletes what signtrap did not make


def test_export_out_never_replaces_a_folder_signtrap_did_not_make(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path, tiny_run.name)  # the folder carries the config's name, as `signtrap train` makes it
    before = snapshot(run)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.txt").write_text("precious")
    one_line_error(run_cli("export", run, "--out", victim), "victim", "thesis.txt", "Refusing to replace it")
    assert (victim / "thesis.txt").read_text() == "precious" and sorted(p.name for p in victim.iterdir()) == ["thesis.txt"]
    # --out runs: the folder holding every run, the source included
    one_line_error(run_cli("export", run, "--out", tmp_path / "runs"), "would replace")
    # export.out_dir: runs in the run's own config makes the default export folder the run directory itself
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["export"]["out_dir"] = str(tmp_path / "runs")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    before["config.yaml"] = (sha256_file(run / "config.yaml"), (run / "config.yaml").stat().st_mtime_ns)
    one_line_error(run_cli("export", run), "would replace")
    assert snapshot(run) == before


def test_atomic_dir_replaces_only_an_empty_folder_or_one_of_its_own_kind(tmp_path):
    def export_like(folder: Path, marker: str = "signtrap.export/1") -> None:
        (folder / "model.json").write_text(json.dumps({"format": marker}))

    target = tmp_path / "out"
    with atomic_dir(target, kind="export") as tmp:
        export_like(tmp)
        (tmp / "a.onnx").write_text("1")
    with atomic_dir(target, kind="export") as tmp:  # a previous export: replaced
        export_like(tmp)
    assert sorted(p.name for p in target.iterdir()) == [".signtrap-written.json", "model.json"]  # and the record of what it wrote
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask()  # not mkdtemp's private 0700

    ran = []
    defence = tmp_path / "defence-x"
    defence.mkdir()
    (defence / "report.json").write_text(json.dumps({"method": "x"}))
    with pytest.raises(SigntrapError, match="not a previous export folder \\(it is a defence output\\)"):
        with atomic_dir(defence, kind="export"):
            ran.append(1)
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    for kind in ("export", None):  # named or read off the new contents: refused before the block runs
        with pytest.raises(SigntrapError, match="notes.txt"):
            with atomic_dir(user, kind=kind):
                ran.append(1)
    # the kind read off the new contents: an export may not replace a defence output at the end either
    with pytest.raises(SigntrapError, match="defence output"):
        with atomic_dir(defence) as tmp:
            export_like(tmp)
    assert not ran and (user / "notes.txt").read_text() == "mine" and (defence / "report.json").is_file()
    with pytest.raises(SigntrapError, match="would replace"):
        with atomic_dir(tmp_path, kind="export", protect=[tmp_path / "runs" / "a"]):
            ran.append(1)
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty") as tmp:  # an empty folder may always be replaced
        (tmp / "x").write_text("x")
    assert (tmp_path / "empty" / "x").read_text() == "x"


# ---------------------------------------------------------------- 2. one process per run directory


def test_a_second_train_of_the_same_run_is_refused_naming_the_holder(tmp_path):
    # long (it is stopped once the second is refused; 40 epochs could end first now that evaluation is faster), its
    # output to a file: a pipe nobody reads until the end could fill and stall it
    args = tiny_overrides(tmp_path, "same", "train.epochs=400", "train.threads=1")
    log = (tmp_path / "first.log").open("w")
    # Ctrl-C must reach it as it reaches a terminal's job: a test run started in the background (`make test &`, a
    # queued script) passes SIGINT down *ignored*, and Python keeps an ignored SIGINT ignored
    first = subprocess.Popen([sys.executable, "-m", "signtrap", "--quiet", "train", *args], stdout=log, stderr=log, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lock = tmp_path / "runs" / "same" / runstate.LOCK_FILE
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            if json.loads(lock.read_text())["pid"] == first.pid:
                break
        time.sleep(0.2)
    second = run_cli("train", *args)
    one_line_error(second, f"in use by process {first.pid} on host {socket.gethostname()}", "signtrap train")
    assert first.poll() is None, "the first training ended before the second was refused: the test raced"
    first.send_signal(signal.SIGINT)  # the refused second left the first alone: Ctrl-C stops it cleanly
    try:
        first.wait(timeout=300)
    finally:
        if first.poll() is None:  # not stopped by Ctrl-C: no orphan left training
            first.kill()
        log.close()
    assert first.returncode == 130, (first.returncode, (tmp_path / "first.log").read_text()[-2000:])  # its own exit, not a crash
    run = tmp_path / "runs" / "same"
    assert runstate.lock_holder(run) is None  # released with the process
    assert runstate.inspect(run).status in (runstate.RESUMABLE, runstate.NEW), runstate.inspect(run)  # resumable or nothing


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    run = tmp_path / "runs" / "r"
    with held_by_another_process(run) as holder:
        assert runstate.lock_holder(run).pid == holder.pid
        with pytest.raises(runstate.RunLockedError, match=f"in use by process {holder.pid}"):
            with runstate.locked(run):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert runstate.lock_holder(run) is None  # the kernel dropped the dead process's lock
    with runstate.locked(run) as lock:
        assert lock.took_over is not None and lock.took_over.pid == holder.pid
        with runstate.locked(run):  # re-entrant within one process (`signtrap run` -> train)
            pass
    fresh = tmp_path / "runs" / "fresh"
    with runstate.locked(fresh):
        assert fresh.is_dir()
    assert not fresh.exists()  # created for the lock and left empty: removed again


def test_eval_report_and_defend_refuse_a_run_another_process_holds(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path, "busy")
    with held_by_another_process(run) as holder:
        one_line_error(run_cli("eval", run), f"in use by process {holder.pid}")
        one_line_error(run_cli("report", run), f"in use by process {holder.pid}")
        one_line_error(run_cli("defend", run, "--method", "finetune"), f"in use by process {holder.pid}")


# ---------------------------------------------------------------- 3. validate before touching anything


def test_overwrite_with_an_invalid_override_leaves_the_old_run_untouched(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path, "keep")
    before = snapshot(run)
    one_line_error(run_cli("train", *tiny_overrides(tmp_path, "keep", "attack.poison_count=500"), "--overwrite"), "500 poisoned")
    assert snapshot(run) == before


def test_a_failed_validation_leaves_no_run_directory(tmp_path):
    one_line_error(run_cli("train", *tiny_overrides(tmp_path, "fresh", "attack.poison_count=500")), "500 poisoned")
    assert not (tmp_path / "runs" / "fresh").exists()
    one_line_error(run_cli("train", *tiny_overrides(tmp_path, "fresh"), "--resume"), "nothing to resume")
    assert not (tmp_path / "runs" / "fresh").exists()


def test_train_never_writes_into_a_folder_that_is_not_a_run(tmp_path):
    victim = tmp_path / "runs" / "victim"
    victim.mkdir(parents=True)
    (victim / "thesis.txt").write_text("precious")
    for flags in ((), ("--overwrite",)):
        one_line_error(run_cli("train", *tiny_overrides(tmp_path, "victim"), *flags), "not a signtrap run directory")
    assert sorted(p.name for p in victim.iterdir()) == ["thesis.txt"]


def test_an_interrupted_run_is_neither_restarted_silently_nor_resumed_from_garbage(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path, "cut")
    (run / "model.pt").unlink()  # killed after its last epoch checkpoint, before the model was written
    assert runstate.inspect(run).status == runstate.RESUMABLE
    before = snapshot(run)
    one_line_error(run_cli("train", *tiny_overrides(tmp_path, "cut")), "--resume", "--overwrite")
    assert snapshot(run) == before  # last.pt not discarded
    torch.save({"epoch": 3}, run / "last.pt")  # malformed: KeyError/RuntimeError tracebacks before
    one_line_error(run_cli("train", *tiny_overrides(tmp_path, "cut"), "--resume"), "last.pt: not a usable epoch checkpoint")
    (run / "last.pt").write_bytes(b"not a checkpoint")
    one_line_error(run_cli("train", *tiny_overrides(tmp_path, "cut"), "--resume"), "last.pt: unreadable checkpoint")


def test_overrides_may_follow_flags():
    parser = build_parser()
    args = parser.parse_args(["train", "--resume", "train.epochs=3", "--name", "x", "seed=2"])
    assert args.resume and args.name == "x" and [args.config, *args.overrides] == ["train.epochs=3", "seed=2"]
    args = parser.parse_args(["run", "c.yaml", "--skip", "bench", "train.epochs=3"])
    assert args.config == "c.yaml" and args.overrides == ["train.epochs=3"] and args.skip == ["bench"]
    args = parser.parse_args(["data", "prepare", "--force", "data.size=24"])
    assert args.force and args.config == "data.size=24"


# ---------------------------------------------------------------- 4. a resumed pipeline is bit-identical


@pytest.mark.slow
def test_interrupted_then_resumed_pipeline_gives_identical_defended_weights(tmp_path):
    def args(name: str) -> list[str]:
        # one thread, fewer than the machine's cores: before the fix only train() applied it, so a resumed
        # pipeline whose train stage was skipped defended on every core
        return [*tiny_overrides(tmp_path, name, "train.epochs=2", "train.threads=1", "defend.methods=[finetune]",
                                "defend.finetune.epochs=3", "defend.finetune.augment=false", "defend.probe.enabled=false"),
                "--skip", "export", "--skip", "bench", "--skip", "report"]

    assert run_cli("run", *args("whole")).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "signtrap", "--quiet", "run", *args("cut")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = tmp_path / "runs" / "cut" / "pipeline.json"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            if json.loads(record.read_text())["stages"]["defend:finetune"]["status"] == "running":
                break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(record.read_text())["stages"]["defend:finetune"]["status"] == "running"  # what SIGKILL leaves
    resumed = run_cli("run", *args("cut"), "--json")
    assert resumed.returncode == 0, resumed.stderr
    stages = {s["name"]: s for s in json.loads(resumed.stdout)["stages"]}
    assert stages["train"]["status"] == "skipped" and stages["defend:finetune"]["status"] == "ran"
    assert "interrupted" in stages["defend:finetune"]["reason"]
    a = torch.load(tmp_path / "runs" / "whole" / "defence-finetune" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "runs" / "cut" / "defence-finetune" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# ---------------------------------------------------------------- 5. read-only output: one line, before any work


def test_read_only_outputs_are_one_line_before_any_work(tiny_run, tmp_path, readonly):
    locked_dir = readonly(tmp_path / "ro")
    one_line_error(run_cli("train", *tiny_overrides(locked_dir, "r")), "not writable")
    # a cache that would have to be generated first: refused before generating (the check comes first)
    one_line_error(run_cli("data", "prepare", "--source", "synth", "--per-class", "3", "--cache-dir", locked_dir / "cache",
                       "data.synth_seed=4242"), "not writable")
    one_line_error(run_cli("report", tiny_run, "--out", locked_dir), "not writable")
    one_line_error(run_cli("export", tiny_run, "--out", locked_dir / "export"), "not writable")
    run = copy_run(tiny_run, tmp_path, "frozen")
    before = snapshot(run)
    readonly(run)
    one_line_error(run_cli("eval", run), "not writable")
    assert snapshot(run) == before


# ---------------------------------------------------------------- 7. corrupted cache; eval trusts the checkpoint


def test_corrupted_cache_is_detected(tmp_path):
    cache = tmp_path / "cache"
    args = tiny_overrides(tmp_path, "c", f"data.cache_dir={cache}", "data.synth_per_class=4", "data.synth_test_per_class=2")
    assert run_cli("data", "prepare", *args).returncode == 0
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["files"]["images.npy"]["sha256"] == sha256_file(folder / "images.npy")
    images = folder / "images.npy"
    data = bytearray(images.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the full hash sees it
    images.write_bytes(bytes(data))
    assert run_cli("data", "info", *args).returncode == 0  # the cheap check (sizes, headers) passes
    one_line_error(run_cli("data", "info", "--verify", *args), "corrupted data cache", "images.npy")
    one_line_error(run_cli("train", *args), "corrupted data cache", "images.npy")  # training verifies: its hash goes into provenance
    assert not (tmp_path / "runs" / "c").exists()
    images.write_bytes(bytes(data[:-10]))  # truncated: every load sees it
    one_line_error(run_cli("data", "info", *args), "corrupted data cache", "images.npy is")
    assert run_cli("data", "prepare", "--force", *args).returncode == 0  # a signtrap cache: rebuilt in place
    assert run_cli("data", "info", "--verify", *args).returncode == 0


def test_eval_refuses_a_config_that_disagrees_with_the_checkpoint(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path, "edited")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["attack"]["target"] = 3  # the issue: ASR 0% written over the real figures
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    metrics = (run / "metrics.json").read_bytes()
    one_line_error(run_cli("eval", run), "attack.target is 3 in the config but 7 in the checkpoint")
    assert (run / "metrics.json").read_bytes() == metrics


# ---------------------------------------------------------------- 8. the smaller cases


def test_malformed_checksums_and_unsafe_pickles_are_one_full_line(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path, "sums")
    (run / "checksums.json").write_text(json.dumps({"model.pt": 5}))  # TypeError traceback before
    one_line_error(run_cli("eval", run), "checksums.json: malformed")

    torch.save({"state_dict": {}, "meta": Payload()}, run / "model.pt")  # runs Payload's code when unpickled
    (run / "checksums.json").write_text(json.dumps({"model.pt": sha256_file(run / "model.pt")}))
    line = one_line_error(run_cli("eval", run), "model.pt: refused: it holds a Python object (test_safety.Payload)")
    assert line.endswith("(signtrap loads checkpoints with weights_only=True)")  # not cut mid-word


def test_artefacts_follow_the_umask(tiny_run):
    mode = 0o666 & ~umask()
    for name in ("model.pt", "last.pt", "metrics.json", "config.yaml", "checksums.json"):
        assert stat.S_IMODE((tiny_run / name).stat().st_mode) == mode, name  # 0600 before (mkstemp's mode)


def test_temporary_files_of_dead_writers_are_cleaned_at_the_next_start(tiny_run, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "out"
    folder.mkdir()
    live = folder / f"{tmp_prefix('x.json')}abc.tmp"  # this process's: never touched
    orphan = folder / tmp_prefix("x.json").replace(f".p{os.getpid()}-", f".p{dead.pid}-")
    orphan = orphan.with_name(orphan.name + "abc.tmp")
    other = folder / tmp_prefix("y.json").replace(f".p{os.getpid()}-", f".p{dead.pid}-")
    other = other.with_name(other.name + "abc.tmp")
    for p in (live, orphan, other):
        p.write_text("partial")
    with atomic_path(folder / "x.json") as tmp:  # the next writer of x.json removes x.json's orphans
        tmp.write_text("{}")
    assert live.exists() and not orphan.exists() and other.exists()
    assert clean_orphans(folder) == [other]
    # in a run directory, whose lock guarantees no other writer, also the ones written before names carried a PID
    run = copy_run(tiny_run, tmp_path, "orphans")
    for name in (".last.pt.abc123.tmp", ".metrics.json.k2j3.tmp"):
        (run / name).write_text("partial")
    (run / "defence-x").mkdir()
    (run / "defence-x" / ".export.q1w2.tmp").mkdir()
    (run / ".my-notes.v2.tmp").write_text("the user's")  # named like one, but not a file signtrap writes: kept
    with runstate.locked(run):
        pass
    assert list(run.rglob("*.tmp")) == [run / ".my-notes.v2.tmp"]


def test_sweep_refuses_a_point_another_process_holds(tmp_path, capfd):
    from signtrap.cli import main

    overrides = [o for o in tiny_overrides(tmp_path, "x") if not o.startswith("name=")]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "overrides": overrides, "grid": {"attack.poison_count": [10]}}))
    point = tmp_path / "runs" / "s" / "attack.poison_count=10"
    with held_by_another_process(point) as holder:
        assert main(["sweep", str(path), "--dry-run"]) == 2
    assert f"in use by process {holder.pid}" in capfd.readouterr().err


def test_one_notion_of_run_state(tiny_run, tmp_path):
    from signtrap.config import load_config

    cfg = load_config(None, tiny_overrides(tmp_path, "state"))
    run = copy_run(tiny_run, tmp_path, "state")
    assert runstate.inspect(run, cfg).status == runstate.DONE
    # settings that do not shape the trained model do not make it stale; training settings do, and say which
    assert runstate.inspect(run, load_config(None, tiny_overrides(tmp_path, "state", "defend.finetune.epochs=1"))).done
    stale = runstate.inspect(run, load_config(None, tiny_overrides(tmp_path, "state", "train.epochs=7")))
    assert stale.status == runstate.STALE and stale.diff == ("train.epochs: 6 -> 7",)
    (run / "metrics.json").unlink()
    assert runstate.inspect(run, cfg).status == runstate.RESUMABLE  # last.pt holds the final epoch
    (run / "last.pt").unlink()
    assert runstate.inspect(run, cfg).status == runstate.INCOMPLETE
    assert runstate.inspect(tmp_path / "runs" / "absent", cfg).status == runstate.NEW
    with pytest.raises(SigntrapError, match="--overwrite"):
        runstate.decide(runstate.inspect(run, cfg))
    assert runstate.decide(runstate.inspect(run, cfg), overwrite=True) == "fresh"
