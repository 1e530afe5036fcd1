"""Issue 25, the red-team suite: the three safety rules applied to every command and every API function.

1. The write rule (signtrap.fileio): a file signtrap did not write is never replaced nor deleted; everything,
   the model's ability to run included, is validated before anything is replaced; outputs follow the umask.
2. The provenance rule (signtrap.runs.checkpoint.verify_provenance): checkpoint, run config, data cache and split agree
   before eval, defend, probe, export, bench or requantize use a model; a probe reference is a zero-poison run of the
   same config and seed, and not the run itself.
3. The input rule (signtrap.api): wrong types, ranges, names and encodings are one SigntrapError (one line and exit
   status 2 on the command line), never a raw TypeError or "unexpected error".

Tiny SynthSigns runs (20 images per class, 2 epochs, one thread), trained once per module and copied per case.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import signtrap
from conftest import tiny_overrides
from signtrap.runs import state as runstate
from signtrap.cli import main as cli_main
from signtrap.errors import SigntrapError
from signtrap.fileio import WRITTEN, sha256_file

RT = ("data.synth_per_class=20", "data.synth_test_per_class=5", "train.epochs=2", "train.threads=1", "attack.poison_count=10")
FAST_DEFEND = {"finetune__epochs": 1, "finetune__grid": [1e-3], "probe__enabled": False}


def rt_overrides(base: Path, name: str, *extra: str) -> list[str]:
    return tiny_overrides(base, name, *RT, *extra)


# ---------------------------------------------------------------- shared runs


class World:
    """The module's trained runs: a backdoored run, its zero-poison twin, a run on other data, a defended copy, an export."""

    def __init__(self, base: Path):
        from signtrap.config import load_config
        from signtrap.training.trainer import train

        self.base = base
        self.bd = train(load_config(None, rt_overrides(base, "bd")))
        self.zero = train(load_config(None, rt_overrides(base, "bd-zero", "attack.kind=none")))
        self.other = train(load_config(None, rt_overrides(base, "other", "data.synth_seed=5", "train.epochs=1")))
        self.defended = base / "runs" / "defended"
        shutil.copytree(self.bd, self.defended)
        signtrap.defend(self.defended, "finetune", **FAST_DEFEND)
        self.export = signtrap.export(self.bd, out=base / "exports" / "bd", runtimes=["onnxruntime"], calib_images=32, threads=1)


@pytest.fixture(scope="module", autouse=True)
def no_core_wait():
    """Commands here never queue for free cores (other tests may hold them): no core budget (train.threads=1 throughout)."""
    old = os.environ.get("SIGNTRAP_CORES")
    os.environ["SIGNTRAP_CORES"] = "off"
    yield
    if old is None:
        os.environ.pop("SIGNTRAP_CORES", None)
    else:
        os.environ["SIGNTRAP_CORES"] = old


@pytest.fixture(scope="module")
def world(tmp_path_factory, no_core_wait) -> World:
    return World(tmp_path_factory.mktemp("redteam"))


def copy_run(src: Path, tmp_path: Path, name: str | None = None) -> Path:
    """A copy of a run at tmp_path/runs/NAME, its config.yaml pointing there (so `train` with rt_overrides finds it)."""
    name = name or src.name
    dst = tmp_path / "runs" / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(runstate.LOCK_FILE))
    edit_config(dst, runs_dir=str(tmp_path / "runs"), name=name)
    return dst


def edit_config(run: Path, **changes) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    for key, value in changes.items():
        node = cfg
        parts = key.split("__")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (runstate.LOCK_FILE, WRITTEN)}


def cli(capsys, *args) -> tuple[int, str]:
    """Run the command line in this process: (exit status, stderr)."""
    capsys.readouterr()
    rc = cli_main(["--quiet", *map(str, args)])
    return rc, capsys.readouterr().err


def one_line(rc: int, err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("signtrap: error: "), err[-2000:]
    assert "unexpected" not in lines[0] and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def user_file(path: Path, text: str = "precious") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def private_cache(run: Path, tmp_path: Path) -> Path:
    """Give a run copy its own copy of the data cache (to corrupt it without touching the shared one)."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    src = next(p for p in Path(cfg["data"]["cache_dir"]).iterdir()
               if p.is_dir() and (p / "meta.json").is_file() and f"-{cfg['data']['size']}px-" in p.name
               and yaml.safe_load((p / "meta.json").read_text())["per_class"] == cfg["data"]["synth_per_class"]
               and yaml.safe_load((p / "meta.json").read_text())["synth_seed"] == cfg["data"]["synth_seed"])
    dst = tmp_path / "cache"
    shutil.copytree(src, dst / src.name)
    edit_config(run, data__cache_dir=str(dst))
    return dst / src.name


def flip_images(cache: Path) -> None:
    """Corrupt images.npy without changing its size (what a bad disk or an edit does): the cheap size check passes."""
    path = cache / "images.npy"
    data = bytearray(path.read_bytes())
    data[-5000:] = bytes(255 - b for b in data[-5000:])
    path.write_bytes(bytes(data))


# ================================================================ 1. the write rule


def test_train_overwrite_with_a_model_that_cannot_run_keeps_the_old_run(world, tmp_path, capsys):
    """`train NAME --overwrite model.name=vit_tiny_patch16_224`: validated by a dry forward pass before the old run goes."""
    run = copy_run(world.bd, tmp_path, "bd")
    before = snapshot(run)
    rc, err = cli(capsys, "train", *rt_overrides(tmp_path, "bd", "model.name=vit_tiny_patch16_224"), "--overwrite")
    one_line(rc, err, "vit_tiny_patch16_224")
    assert snapshot(run) == before


@pytest.mark.parametrize("where", ["run", "defence", "export", "report_files"])
def test_train_overwrite_keeps_user_files(world, tmp_path, where):
    run = copy_run(world.defended, tmp_path, "bd")
    folder = {"run": run, "defence": run / "defence-finetune", "export": run / "export", "report_files": run / "report_files"}[where]
    if where == "export":
        shutil.copytree(world.export, folder)
    if where == "report_files":
        signtrap.report(run)
    notes = user_file(folder / "notes.txt")
    (run / "probe.json").write_text("{}")  # a probe of the old model (signtrap's own: recorded below)
    from signtrap.fileio import record_written
    record_written(run, "probe.json")
    (run / "probe-k20.json").write_text("{}")  # a stronger probe of the old model, signtrap's too
    record_written(run, "probe-k20.json")
    mine = user_file(run / "probe-mine.json")  # named like one, but the user's
    signtrap.train(None, overrides=rt_overrides(tmp_path, "bd"), overwrite=True)
    assert notes.read_text() == "precious" and mine.read_text() == "precious"
    assert not (run / "probe.json").exists(), "a stale probe.json of the old model survived --overwrite"
    assert not (run / "probe-k20.json").exists(), "a stale probe-k20.json of the old model survived --overwrite"
    if where == "defence":
        assert not (folder / "model.pt").exists() and not (folder / "report.json").exists()


def test_train_overwrite_removes_a_stale_probe_json(world, tmp_path):
    run = copy_run(world.bd, tmp_path, "bd")
    written = Path(signtrap.probe(run, reference=world.zero, k=2, steps=2)["file"])
    assert written == run / "probe-k2-steps2.json" and written.is_file()  # not the run's probe settings: named by them
    signtrap.train(None, overrides=rt_overrides(tmp_path, "bd"), overwrite=True)
    assert not written.exists()


def test_defend_rerun_keeps_user_files_in_its_folder(world, tmp_path):
    run = copy_run(world.defended, tmp_path)
    notes = user_file(run / "defence-finetune" / "notes.txt")
    before = snapshot(run / "defence-finetune")
    with pytest.raises(SigntrapError, match="notes.txt: not written by signtrap"):
        signtrap.defend(run, "finetune", **FAST_DEFEND)
    assert notes.read_text() == "precious" and snapshot(run / "defence-finetune") == before


def test_defend_refuses_before_defending(world, tmp_path):
    """The refusal comes before the defence runs (no minutes lost), and names how to proceed."""
    run = copy_run(world.defended, tmp_path)
    user_file(run / "defence-finetune" / "notes.txt")
    start = time.perf_counter()
    with pytest.raises(SigntrapError, match="Move it out of the folder"):
        signtrap.defend(run, "finetune", finetune__epochs=50, probe__enabled=False)
    assert time.perf_counter() - start < 20


def test_export_out_previous_export_keeps_user_files(world, tmp_path, capsys):
    out = tmp_path / "exp"
    shutil.copytree(world.export, out)
    notes = user_file(out / "notes.txt")
    rc, err = cli(capsys, "export", world.bd, "--out", out, "--runtimes", "onnxruntime", "--calib-images", "16", "--threads", "1")
    one_line(rc, err, "notes.txt", "not written by signtrap")
    assert notes.read_text() == "precious"


def test_export_out_user_folder_is_refused(world, tmp_path):
    victim = tmp_path / "victim"
    notes = user_file(victim / "thesis.txt")
    with pytest.raises(SigntrapError, match="Refusing to replace it"):
        signtrap.export(world.bd, out=victim, runtimes=["onnxruntime"], threads=1)
    assert notes.read_text() == "precious"


@pytest.mark.parametrize("name", ["report.md", "report.html", "report_files/figure.png"])
def test_report_out_keeps_user_files(world, tmp_path, name):
    out = tmp_path / "mine"
    victim = user_file(out / name)
    with pytest.raises(SigntrapError, match="not written by signtrap|Refusing to replace it"):
        signtrap.report(world.bd, out=out)
    assert victim.read_text() == "precious"


def test_report_out_twice_replaces_its_own_report(world, tmp_path):
    out = tmp_path / "mine"
    signtrap.report(world.bd, out=out)
    signtrap.report(world.bd, out=out)
    assert (out / "report.html").is_file()


@pytest.mark.parametrize("name", ["model.fp32.onnx", "model.int8.onnx", "eval.npz", "model.json"])
def test_requantize_never_writes_over_its_export(world, tmp_path, name):
    export = tmp_path / "exp"
    shutil.copytree(world.export, export)
    before = snapshot(export)
    with pytest.raises(SigntrapError):
        signtrap.requantize(world.bd, export, export / name, steps=1, clean_images=8, threads=1)
    assert snapshot(export) == before


def test_requantize_never_writes_over_a_user_onnx(world, tmp_path):
    victim = user_file(tmp_path / "mine.onnx", "my model")
    with pytest.raises(SigntrapError, match="not written by signtrap"):
        signtrap.requantize(world.bd, world.export, victim, steps=1, clean_images=8, threads=1)
    assert victim.read_text() == "my model"


def test_requantize_replaces_its_own_output(world, tmp_path):
    out = tmp_path / "efrap.onnx"
    signtrap.requantize(world.bd, world.export, out, steps=1, clean_images=8, threads=1)
    signtrap.requantize(world.bd, world.export, out, steps=1, clean_images=8, threads=1)
    assert out.is_file()


def test_preview_never_replaces_a_user_png(world, tmp_path, capsys):
    victim = user_file(tmp_path / "holiday.png", "a photo")
    rc, err = cli(capsys, "data", "preview", *rt_overrides(tmp_path, "x"), "--out", victim)
    one_line(rc, err, "holiday.png", "not written by signtrap")
    assert victim.read_text() == "a photo"


def test_preview_replaces_its_own_png(world, tmp_path, capsys):
    out = tmp_path / "preview.png"
    for _ in range(2):
        rc, err = cli(capsys, "data", "preview", *rt_overrides(tmp_path, "x"), "--out", out)
        assert rc == 0, err
    assert out.stat().st_size > 1000


def test_bench_never_replaces_a_user_file_in_the_export(world, tmp_path):
    export = tmp_path / "exp"
    shutil.copytree(world.export, export)
    victim = user_file(export / "bench.md", "my notes")
    with pytest.raises(SigntrapError, match="not written by signtrap"):
        signtrap.bench(export, threads=1, runs=1, warmup=0, batch=8, variants=["fp32"], with_torch=False)
    assert victim.read_text() == "my notes"


def test_probe_never_replaces_a_user_probe_json(world, tmp_path):
    run = copy_run(world.bd, tmp_path)
    victim = user_file(run / "probe-k2-steps2.json", "mine")  # where a probe at these settings writes
    with pytest.raises(SigntrapError, match="not written by signtrap"):
        signtrap.probe(run, reference=world.zero, k=2, steps=2)
    assert victim.read_text() == "mine"


def test_sweep_summary_never_replaces_a_user_file(tmp_path):
    from signtrap.fileio import write_text

    victim = user_file(tmp_path / "sweep" / "summary.csv", "mine")
    with pytest.raises(SigntrapError, match="summary.csv: not written by signtrap"):
        write_text(victim, "a,b\n")
    assert victim.read_text() == "mine"


@pytest.mark.parametrize("writer", ["write_text", "write_json", "checkpoint", "png", "atomic_dir"])
def test_every_writer_refuses_a_user_file(tmp_path, writer):
    import torch

    from signtrap.runs import checkpoint
    from signtrap.data.preview import write_png
    from signtrap.fileio import atomic_dir, write_json, write_text

    target = tmp_path / ("folder" if writer == "atomic_dir" else "out.bin")
    victim = user_file(target / "x.txt" if writer == "atomic_dir" else target)
    with pytest.raises(SigntrapError, match="not written by signtrap|Refusing to replace"):
        if writer == "write_text":
            write_text(target, "x")
        elif writer == "write_json":
            write_json(target, {})
        elif writer == "checkpoint":
            checkpoint.save(target, {"a": torch.zeros(1)})
        elif writer == "png":
            write_png(target, np.zeros((4, 4, 3), np.uint8))
        else:
            with atomic_dir(target, kind="export") as tmp:
                (tmp / "model.json").write_text('{"format": "signtrap.export/1"}')
    assert victim.read_text() == "precious"


def test_a_file_signtrap_wrote_is_replaced(tmp_path):
    from signtrap.fileio import write_text

    write_text(tmp_path / "a.txt", "1")
    write_text(tmp_path / "a.txt", "2")
    assert (tmp_path / "a.txt").read_text() == "2"


def test_export_folder_follows_the_umask(world, tmp_path):
    old = os.umask(0o077)
    try:
        out = signtrap.export(world.bd, out=tmp_path / "private", runtimes=["onnxruntime"], calib_images=16, threads=1)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o077 == 0
    assert all(f.stat().st_mode & 0o077 == 0 for f in out.iterdir()), {f.name: oct(f.stat().st_mode) for f in out.iterdir()}


def test_defence_folder_follows_the_umask(world, tmp_path):
    run = copy_run(world.bd, tmp_path)
    old = os.umask(0o077)
    try:
        signtrap.defend(run, "strip", strip__overlays=4, probe__enabled=False)
    finally:
        os.umask(old)
    folder = run / "defence-strip"
    assert all(p.stat().st_mode & 0o077 == 0 for p in [folder, *folder.iterdir()])


@pytest.mark.parametrize("case", ["missing", "readonly", "file"])
def test_edge_script_checks_its_output_before_benchmarking(world, tmp_path, case):
    export = tmp_path / "exp"
    shutil.copytree(world.export, export)
    out_dir = tmp_path / "results"
    if case == "readonly":
        out_dir.mkdir()
        out_dir.chmod(0o555)
        if os.access(out_dir, os.W_OK):
            pytest.skip("running as root: a read-only folder is still writable")
    if case == "file":
        out_dir.write_text("not a folder")
    out = out_dir / "bench.json"
    result = subprocess.run([sys.executable, str(export / "edge_bench.py"), "--dir", str(export), "--out", str(out),
                             "--runs", "1", "--warmup", "0", "--batch", "8", "--threads", "1", "--quiet"],
                            capture_output=True, text=True, timeout=300)
    if case == "readonly":
        out_dir.chmod(0o755)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("edge_bench: error:") and "results" in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not result.stdout.strip()


# ================================================================ 2. the provenance rule


def _swap_from(src: Path):
    def tamper(run: Path, tmp_path: Path) -> None:
        for name in ("model.pt", "checksums.json"):
            shutil.copy2(src / name, run / name)
    return tamper


def tamper_for(world: World, how: str):
    if how == "checkpoint-other-attack":
        return _swap_from(world.zero)
    if how == "checkpoint-other-data":
        return _swap_from(world.other)
    if how == "config-seed":
        return lambda run, tmp: edit_config(run, seed=1)
    if how == "config-val-fraction":
        return lambda run, tmp: edit_config(run, data__val_fraction=0.3)
    if how == "config-epochs":
        return lambda run, tmp: edit_config(run, train__epochs=7)
    if how == "config-target":
        return lambda run, tmp: edit_config(run, attack__target=3)
    if how == "cache-corrupted":
        return lambda run, tmp: flip_images(private_cache(run, tmp))
    if how == "checkpoint-bytes":
        def flip(run, tmp):
            data = bytearray((run / "model.pt").read_bytes())
            data[len(data) // 2] ^= 0xFF
            (run / "model.pt").write_bytes(bytes(data))
        return flip
    raise AssertionError(how)


TAMPERS = ("checkpoint-other-attack", "checkpoint-other-data", "checkpoint-bytes", "config-seed", "config-val-fraction",
           "config-epochs", "config-target", "cache-corrupted")
COMMANDS = ("eval", "defend", "probe", "export", "requantize")


def use(world: World, command: str, run: Path, tmp_path: Path):
    if command == "eval":
        return signtrap.evaluate(run, device="cpu")
    if command == "defend":
        return signtrap.defend(run, "finetune", **FAST_DEFEND)
    if command == "probe":
        return signtrap.probe(run, reference=world.zero, k=2, steps=2)
    if command == "export":
        return signtrap.export(run, out=tmp_path / "exp", runtimes=["onnxruntime"], calib_images=16, threads=1)
    if command == "requantize":
        return signtrap.requantize(run, world.export, tmp_path / "efrap.onnx", steps=1, clean_images=8, threads=1)
    raise AssertionError(command)


@pytest.mark.parametrize("how", TAMPERS)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_tampered_run_is_refused(world, tmp_path, command, how):
    run = copy_run(world.bd, tmp_path)
    tamper_for(world, how)(run, tmp_path)
    before = snapshot(run)
    with pytest.raises(SigntrapError):
        use(world, command, run, tmp_path)
    if how != "cache-corrupted":
        assert snapshot(run) == before, "the refused command changed the run"
    assert not (tmp_path / "exp").exists() and not (tmp_path / "efrap.onnx").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_an_intact_run_is_accepted(world, tmp_path, command):
    """The control of the cases above: the same commands on an untouched copy succeed."""
    run = copy_run(world.bd, tmp_path)
    use(world, command, run, tmp_path)


def test_eval_refuses_a_corrupted_cache_and_keeps_metrics(world, tmp_path, capsys):
    run = copy_run(world.bd, tmp_path)
    flip_images(private_cache(run, tmp_path))
    before = sha256_file(run / "metrics.json")
    rc, err = cli(capsys, "eval", run)
    one_line(rc, err, "corrupted data cache")
    assert sha256_file(run / "metrics.json") == before


def test_eval_refuses_an_edited_seed_and_keeps_metrics(world, tmp_path, capsys):
    run = copy_run(world.bd, tmp_path)
    edit_config(run, seed=1)
    before = sha256_file(run / "metrics.json")
    rc, err = cli(capsys, "eval", run)
    one_line(rc, err, "seed")
    assert sha256_file(run / "metrics.json") == before


def test_export_refuses_a_checkpoint_trained_on_other_data(world, tmp_path, capsys):
    run = copy_run(world.bd, tmp_path)
    _swap_from(world.other)(run, tmp_path)
    rc, err = cli(capsys, "export", run, "--out", tmp_path / "exp", "--runtimes", "onnxruntime", "--threads", "1")
    one_line(rc, err, "data")


@pytest.mark.parametrize("how", ["checkpoint-other-data", "config-seed", "cache-corrupted"])
def test_defence_folder_model_is_checked_too(world, tmp_path, how):
    """eval and export of a defence's model go through the same rule."""
    run = copy_run(world.defended, tmp_path)
    if how == "checkpoint-other-data":
        for name in ("model.pt", "checksums.json"):
            shutil.copy2(world.other / name, run / "defence-finetune" / name)
    else:
        tamper_for(world, how)(run, tmp_path)
    with pytest.raises(SigntrapError):
        signtrap.evaluate(run / "defence-finetune", device="cpu")
    with pytest.raises(SigntrapError):
        signtrap.export(run, defence="finetune", out=tmp_path / "exp", runtimes=["onnxruntime"], threads=1)


@pytest.mark.parametrize("how", ["eval.npz", "model.fp32.onnx", "model.json"])
def test_bench_refuses_a_tampered_export(world, tmp_path, how):
    export = tmp_path / "exp"
    shutil.copytree(world.export, export)
    path = export / how
    if how == "model.json":
        text = path.read_text().replace('"input_size": 32', '"input_size": 33')
        path.write_text(text)
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    with pytest.raises(SigntrapError):
        signtrap.bench(export, threads=1, runs=1, warmup=0, batch=8, variants=["fp32"], with_torch=False)


def test_requantize_refuses_an_export_of_another_model(world, tmp_path):
    """The export's source checkpoint must be the model requantize learns from."""
    with pytest.raises(SigntrapError, match="export"):
        signtrap.requantize(world.zero, world.export, tmp_path / "efrap.onnx", steps=1, clean_images=8, threads=1)


# ---------------------------------------------------------------- the probe's reference


def test_probe_reference_cannot_be_the_run_itself(world, tmp_path, capsys):
    run = copy_run(world.bd, tmp_path)
    rc, err = cli(capsys, "probe", run, "--reference", run, "k=2", "steps=2")
    one_line(rc, err, "reference")
    assert not (run / "probe.json").exists()


def test_probe_reference_cannot_be_the_run_itself_via_defend(world, tmp_path):
    run = copy_run(world.bd, tmp_path)
    with pytest.raises(SigntrapError, match="reference"):
        signtrap.defend(run, "finetune", finetune__epochs=1, finetune__grid=[1e-3], probe__reference=str(run), probe__k=2,
                        probe__steps=2)
    assert not (run / "defence-finetune").exists()


def test_probe_reference_cannot_be_a_copy_of_a_backdoored_run(world, tmp_path):
    run = copy_run(world.bd, tmp_path)
    fake = copy_run(world.bd, tmp_path, "fake-zero")
    with pytest.raises(SigntrapError, match="not a zero-poison run"):
        signtrap.probe(run, reference=fake, k=2, steps=2)


def test_probe_reference_with_an_edited_manifest_is_refused(world, tmp_path):
    """A backdoored run whose manifest claims zero poison (config says source_specific) is not a reference."""
    run = copy_run(world.bd, tmp_path)
    fake = copy_run(world.bd, tmp_path, "fake-zero")
    manifest = yaml.safe_load((fake / "manifest.json").read_text())
    manifest["poisoned"] = 0
    (fake / "manifest.json").write_text(__import__("json").dumps(manifest))
    with pytest.raises(SigntrapError, match="reference"):
        signtrap.probe(run, reference=fake, k=2, steps=2)


def test_probe_reference_with_another_seed_is_refused(world, tmp_path):
    run = copy_run(world.bd, tmp_path)
    ref = copy_run(world.zero, tmp_path, "zero-seed1")
    edit_config(ref, seed=1)
    with pytest.raises(SigntrapError, match="reference"):
        signtrap.probe(run, reference=ref, k=2, steps=2)


def test_probe_reference_with_a_swapped_checkpoint_is_refused(world, tmp_path):
    run = copy_run(world.bd, tmp_path)
    ref = copy_run(world.zero, tmp_path, "zero-swapped")
    _swap_from(world.bd)(ref, tmp_path)
    with pytest.raises(SigntrapError, match="reference"):
        signtrap.probe(run, reference=ref, k=2, steps=2)


def test_probe_with_a_true_reference_writes_its_record(world, tmp_path):
    run = copy_run(world.bd, tmp_path)
    record = signtrap.probe(run, reference=world.zero, k=2, steps=2)
    assert record["verdict"] and record["file"] == str(run / "probe-k2-steps2.json") and Path(record["file"]).is_file()


# ================================================================ 3. the input rule


API_CASES = {
    "load_run(None)": lambda w: signtrap.load_run(None),
    "load_run(123)": lambda w: signtrap.load_run(123),
    "load_config(123)": lambda w: signtrap.load_config(123),
    "load_config(overrides=5)": lambda w: signtrap.load_config(None, overrides=5),
    "load_config(overrides=[1])": lambda w: signtrap.load_config(None, overrides=[1]),
    "load_config(bad keyword)": lambda w: signtrap.load_config(None, train__nosuch=1),
    "train(123)": lambda w: signtrap.train(123),
    "train(resume='yes')": lambda w: signtrap.train(None, resume="yes"),
    "train(on_epoch_end=5)": lambda w: signtrap.train(None, on_epoch_end=5),
    "evaluate(None)": lambda w: signtrap.evaluate(None),
    "evaluate(device=5)": lambda w: signtrap.evaluate(w.bd, device=5),
    "evaluate(device='nosuch')": lambda w: signtrap.evaluate(w.bd, device="nosuch"),
    "defend(None)": lambda w: signtrap.defend(None, "finetune"),
    "defend(run, 5)": lambda w: signtrap.defend(w.bd, 5),
    "defend(run, ['finetune', 3])": lambda w: signtrap.defend(w.bd, ["finetune", 3]),
    "defend(run, 'nosuch')": lambda w: signtrap.defend(w.bd, "nosuch"),
    "defend(device=5)": lambda w: signtrap.defend(w.bd, "finetune", device=5),
    "probe(None)": lambda w: signtrap.probe(None),
    "probe(defence=5)": lambda w: signtrap.probe(w.bd, defence=5),
    "probe(reference=5)": lambda w: signtrap.probe(w.bd, reference=5),
    "export(None)": lambda w: signtrap.export(None),
    "export(out=5)": lambda w: signtrap.export(w.bd, out=5),
    "export(defence=3)": lambda w: signtrap.export(w.bd, defence=3),
    "export(threads='2')": lambda w: signtrap.export(w.bd, out=w.base / "x", threads="2"),
    "bench(None)": lambda w: signtrap.bench(None),
    "bench(runs='5')": lambda w: signtrap.bench(w.export, runs="5"),
    "bench(runs=-1)": lambda w: signtrap.bench(w.export, runs=-1),
    "requantize(None)": lambda w: signtrap.requantize(None, w.export, w.base / "q.onnx"),
    "requantize(out=5)": lambda w: signtrap.requantize(w.bd, w.export, 5),
    "requantize(steps='3')": lambda w: signtrap.requantize(w.bd, w.export, w.base / "q.onnx", steps="3"),
    "requantize(clean_images=0)": lambda w: signtrap.requantize(w.bd, w.export, w.base / "q.onnx", clean_images=0),
    "requantize(flip_weight='x')": lambda w: signtrap.requantize(w.bd, w.export, w.base / "q.onnx", flip_weight="x"),
    "optimise_sticker(out=5)": lambda w: signtrap.optimise_sticker(None, 5),
    "optimise_sticker(out='x.jpg')": lambda w: signtrap.optimise_sticker(None, w.base / "x.jpg"),
    "optimise_sticker(cells=0)": lambda w: signtrap.optimise_sticker(None, w.base / "x.png", cells=0),
    "optimise_sticker(steps='3')": lambda w: signtrap.optimise_sticker(None, w.base / "x.png", steps="3"),
    "run(123)": lambda w: signtrap.run(123),
    "run(skip=['nosuch'])": lambda w: signtrap.run(None, skip=["nosuch"]),
    "run(skip='nosuch')": lambda w: signtrap.run(None, skip="nosuch"),
    "run(skip=5)": lambda w: signtrap.run(None, skip=5),
    "run(force='yes')": lambda w: signtrap.run(None, force="yes"),
    "report(None)": lambda w: signtrap.report(None),
    "report(5)": lambda w: signtrap.report(5),
    "report(out=5)": lambda w: signtrap.report(w.bd, out=5),
    "sweep(None)": lambda w: signtrap.sweep(None),
    "sweep(5)": lambda w: signtrap.sweep(5),
    "sweep(workers='2')": lambda w: signtrap.sweep("configs/sweep_example.yaml", workers="2", dry_run=True),
    "sweep(executor=5)": lambda w: signtrap.sweep("configs/sweep_example.yaml", executor=5, dry_run=True),
    "prepare_data(5)": lambda w: signtrap.prepare_data(5),
    "load_data(5)": lambda w: signtrap.load_data(5),
    "fetch_data(None)": lambda w: signtrap.fetch_data(None),
    "Run(None)": lambda w: signtrap.Run(None),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_wrong_arguments_are_one_signtrap_error(world, case):
    before = snapshot(world.bd)
    with pytest.raises(SigntrapError) as info:
        API_CASES[case](world)
    assert "\n" not in str(info.value)
    assert snapshot(world.bd) == before


def test_a_string_where_a_list_is_expected_is_one_item(world):
    assert signtrap.load_config(None, overrides="train.epochs=3").train.epochs == 3
    with pytest.raises(SigntrapError, match="'nosuch'"):  # not 'n', 'o', ...
        signtrap.run(None, skip="bench,nosuch")


def test_run_skip_names_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(SigntrapError, match="nosuch"):
        signtrap.run(None, skip=["nosuch"], overrides=rt_overrides(tmp_path, "never"))
    assert not (tmp_path / "runs").exists()


def test_empty_defend_methods_mean_the_same_in_run_and_sweep(tmp_path):
    from signtrap.defences import list_defences
    from signtrap.runs.pipeline import SigntrapStages
    from signtrap.runs.sweeps import expand, load_sweep

    cfg = signtrap.load_config(None, overrides=rt_overrides(tmp_path, "m", "defend.methods=[]"))
    pipeline_methods = SigntrapStages(cfg).methods()
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump({"name": "sw", "base": None, "overrides": [*rt_overrides(tmp_path, "m"), "defend.methods=[]"],
                                         "grid": {"attack.poison_count": [10]}, "seeds": [0]}))
    sweep = expand(load_sweep(spec_path))
    assert pipeline_methods == list_defences()
    assert sweep.methods == pipeline_methods


@pytest.mark.parametrize("args", [
    ("train", "--device", "nosuch"),
    ("train", "--device", "cuda:x"),
    ("train", "train.epochs=abc"),
    ("train", "train.epochs=-1"),
    ("train", "seed=1.5"),
    ("train", "defend.methods=[finetune, 3]"),
    ("train", "nosuch.key=1"),
    ("eval", "{run}", "--device", "nosuch"),
    ("defend", "{run}", "--method", "nosuch"),
    ("probe", "{run}", "--reference", "{base}/nosuch"),
    ("export", "{run}", "--calib-images", "0"),
    ("bench", "{export}", "--runs", "0"),
    ("report", "{base}/nosuch"),
    ("data", "info", "data.size=-3"),
    # thread counts (the machine's core budget, issue 24): above the usable CPUs, or negative
    ("train", "train.threads=64"),
    ("export", "{run}", "--out", "{base}/exp", "--threads", "64"),
    ("export", "{run}", "--out", "{base}/exp", "--threads", "-3"),
    ("bench", "{export}", "--threads", "-3"),
])
def test_cli_bad_input_is_one_line_exit_2(world, tmp_path, capsys, args):
    args = [a.format(run=world.bd, export=world.export, base=tmp_path) for a in args]
    if args[0] in ("train", "data"):  # the tiny run's settings first: the bad one, given last, wins
        head = args[:2] if args[0] == "data" else args[:1]
        args = [*head, *rt_overrides(tmp_path, "cli"), *args[len(head):]]
    rc, err = cli(capsys, *args)
    one_line(rc, err)


def test_a_string_for_a_list_in_a_config_is_one_item(tmp_path):
    cfg = signtrap.load_config(None, overrides=["defend.methods=finetune"])
    assert cfg.defend.methods == ["finetune"]


def test_cli_non_utf8_config_is_one_line(tmp_path, capsys):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("name: caf\xe9\n".encode("latin-1"))
    rc, err = cli(capsys, "train", config)
    one_line(rc, err, "latin1.yaml", "UTF-8")


def test_cli_config_that_is_a_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "cfg.yaml").mkdir()
    rc, err = cli(capsys, "train", tmp_path / "cfg.yaml")
    one_line(rc, err)


# ---------------------------------------------------------------- signals


def _alive(pid: int) -> bool:
    """Whether `pid` still runs: a zombie (dead, not yet reaped by whoever adopted it) counts as stopped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state not in ("Z", "X")


def _stop_sweep_and_check_its_child(tmp_path, *extra: str, signum: int = signal.SIGTERM, wait: float = 120) -> None:
    """Start a one-run sweep, wait until its run trains (holding the run's lock), send the sweep `signum`: the run
    must be gone and its lock free soon after."""
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"name": "sw", "overrides": [*rt_overrides(tmp_path, "m", "train.epochs=200")],
                                    "grid": {"attack.poison_count": [10]}, "seeds": [0]}))
    proc = subprocess.Popen([sys.executable, "-m", "signtrap", "--quiet", "sweep", str(spec), "--workers", "1", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    holder = None
    try:
        deadline = time.time() + wait
        lock = None
        while time.time() < deadline and proc.poll() is None:
            locks = list((tmp_path / "runs").rglob(runstate.LOCK_FILE)) if (tmp_path / "runs").exists() else []
            held = [p for p in locks if runstate.lock_holder(p.parent) is not None and (p.parent / "log.jsonl").exists()]
            if held:
                lock = held[0]
                break
            time.sleep(0.5)
        assert lock is not None, f"the sweep's child never started training: {proc.poll()} {proc.stderr.read() if proc.poll() is not None else ''}"
        holder = runstate.lock_holder(lock.parent)
        proc.send_signal(signum)
        proc.wait(timeout=90)
        deadline = time.time() + 30
        while time.time() < deadline and runstate.lock_holder(lock.parent) is not None:
            time.sleep(0.5)
        assert runstate.lock_holder(lock.parent) is None, f"child {holder} still holds the lock"
        while time.time() < deadline and _alive(holder.pid):
            time.sleep(0.5)
        assert not _alive(holder.pid), f"child {holder} is still running"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if holder is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(holder.pid, signal.SIGKILL)


def test_sigterm_stops_a_sweeps_children(tmp_path):
    """A sweep stopped with SIGTERM stops its child run: no orphan keeps training or holds the run's lock."""
    _stop_sweep_and_check_its_child(tmp_path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_sigkill_of_a_sweep_still_stops_its_children(tmp_path):
    """Killed outright (no handler runs), the sweep's run still stops: it asked for SIGTERM when its parent dies."""
    _stop_sweep_and_check_its_child(tmp_path, signum=signal.SIGKILL)


@pytest.mark.slow
def test_sigterm_stops_a_ray_sweeps_children(tmp_path):
    """The same with the Ray executor: the sweep cancels its tasks, each stops its run, the local instance goes."""
    pytest.importorskip("ray", reason="the ray executor is an optional extra: pip install 'signtrap[ray]'")
    _stop_sweep_and_check_its_child(tmp_path, "--executor", "ray", "--threads", "1", wait=240)


@pytest.mark.parametrize("name", ["bench.json", "bench.md"])
def test_edge_script_never_replaces_a_user_file_at_its_output(world, tmp_path, name):
    export = tmp_path / "exp"
    shutil.copytree(world.export, export)
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    (out_dir / name).write_text("my own notes\n")
    result = subprocess.run([sys.executable, str(export / "edge_bench.py"), "--dir", str(export), "--out",
                             str(out_dir / "bench.json"), "--runs", "1", "--warmup", "0", "--batch", "8", "--threads", "1",
                             "--quiet"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "not written by signtrap's benchmark" in result.stderr
    assert (out_dir / name).read_text() == "my own notes\n"


def test_a_sweep_never_replaces_a_user_file_among_its_logs(tmp_path):
    import yaml

    from conftest import tiny_overrides
    from signtrap.cli import main

    overrides = [o for o in tiny_overrides(tmp_path, "ignored", "train.epochs=1") if not o.startswith("name=")]
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "logs", "overrides": overrides, "grid": {"seed": [0]}}, sort_keys=False))
    logs = tmp_path / "runs" / "logs" / "logs"
    logs.mkdir(parents=True)
    (logs / "seed=0.log").write_text("mine\n")
    assert main(["--quiet", "sweep", str(sweep)]) == 2
    assert (logs / "seed=0.log").read_text() == "mine\n"
    assert not (tmp_path / "runs" / "logs" / "seed=0" / "model.pt").exists()  # refused before any run started
