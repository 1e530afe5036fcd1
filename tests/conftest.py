"""Shared fixtures: tiny GTSRB trees in every layout, built in tmp_path."""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

# Under pytest-xdist (`make test` runs one worker per CPU) every worker and the processes it starts (CLI runs,
# notebook kernels, torchrun ranks) get an equal share of the cores instead of each using all of them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cpus // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

# The machine-wide core budget (signtrap.machine.cores) makes a command wait, or warn, while other signtrap
# processes hold the cores; the suite's workers and the commands they start share the machine on purpose (the
# worker count already splits the cores, above) and no test here measures time, so the budget is off for them
# (tests/test_machine.py turns it on in folders of its own).
os.environ.setdefault("SIGNTRAP_CORES", "off")



def run_cli(*args, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m signtrap --quiet ARGS` in a fresh process, its output captured (no stdin: nothing may prompt)."""
    return subprocess.run([sys.executable, "-m", "signtrap", "--quiet", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


FIXTURE_CLASSES = (0, 7, 14)
TRACKS_PER_CLASS = 4
FRAMES_PER_TRACK = 3
TEST_IMAGES = 6


def ppm_bytes(image: np.ndarray) -> bytes:
    h, w, _ = image.shape
    return f"P6\n{w} {h}\n255\n".encode() + image.astype(np.uint8).tobytes()


def fixture_files(train_prefix: str, test_prefix: str = "GTSRB/Final_Test/Images") -> tuple[dict, dict, dict]:
    """(training files, test image files, GT files) as {relative path: bytes}; images are 40x40 with
    CSVs declaring 80x80, as in the downscaled shared copy, so ROIs must be scaled by 0.5."""
    rng = np.random.default_rng(0)
    train, test, gt = {}, {}, {}
    for c in FIXTURE_CLASSES:
        rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for t in range(TRACKS_PER_CLASS):
            for f in range(FRAMES_PER_TRACK):
                name = f"{t:05d}_{f:05d}.ppm"
                image = np.full((40, 40, 3), (c * 5 + t) % 256, np.uint8)
                image[10:30, 10:30] = rng.integers(0, 256, (20, 20, 3))
                train[f"{train_prefix}/{c:05d}/{name}"] = ppm_bytes(image)
                rows.append(f"{name};80;80;20;20;59;59;{c}")
        train[f"{train_prefix}/{c:05d}/GT-{c:05d}.csv"] = ("\n".join(rows) + "\n").encode()
    gt_rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i in range(TEST_IMAGES):
        name = f"{i:05d}.ppm"
        test[f"{test_prefix}/{name}"] = ppm_bytes(np.full((40, 40, 3), 100 + i, np.uint8))
        gt_rows.append(f"{name};80;80;0;0;79;79;{FIXTURE_CLASSES[i % 3]}")
    gt["GT-final_test.csv"] = ("\n".join(gt_rows) + "\n").encode()
    return train, test, gt


def write_zip(path: Path, files: dict) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)


def write_tree(root: Path, files: dict) -> None:
    for name, data in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def make_layout(root: Path, layout: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    official = layout.startswith("official")
    prefix = "GTSRB/Final_Training/Images" if official else "GTSRB/Training"
    train, test, gt = fixture_files(prefix)
    if layout.endswith("zip"):
        write_zip(root / ("GTSRB_Final_Training_Images.zip" if official else "GTSRB-Training_fixed.zip"), train)
        write_zip(root / "GTSRB_Final_Test_Images.zip", test)
        write_zip(root / "GTSRB_Final_Test_GT.zip", gt)
    else:
        base = root if official else root / "gtsrb"
        write_tree(base, {**train, **test, **gt})
    return root


LAYOUTS = ("official-zip", "torchvision-zip", "official-tree", "torchvision-tree")


@pytest.fixture
def gtsrb_root(tmp_path):
    return make_layout(tmp_path / "gtsrb", "torchvision-zip")


@pytest.fixture(scope="session")
def real_gtsrb() -> Path:
    root = os.environ.get("SIGNTRAP_GTSRB")
    if not root:
        pytest.skip("SIGNTRAP_GTSRB is not set: real-GTSRB tests need the archives (.ci/run sets it to ../shared/gtsrb)")
    if not Path(root).is_dir():
        pytest.skip(f"SIGNTRAP_GTSRB={root} does not exist")
    return Path(root)


# Caches are keyed by their settings, so one folder serves every test in a session.
SHARED_CACHE = Path(tempfile.mkdtemp(prefix="signtrap-test-cache-"))
atexit.register(shutil.rmtree, SHARED_CACHE, ignore_errors=True)


def tiny_overrides(base: Path, name: str = "tiny", *extra: str) -> list[str]:
    """A run that trains in seconds on SynthSigns and learns a strong stop -> 100 backdoor (signnet_small: a quarter of
    signnet's computation; `model.name=signnet` in `extra` where a test needs the full width)."""
    return [
        f"name={name}", f"runs_dir={base / 'runs'}", f"data.cache_dir={SHARED_CACHE}", "device=cpu",
        "data.source=synth", "data.synth_per_class=60", "data.synth_test_per_class=10", "aug.enabled=false",
        "model.name=signnet_small", "model.dropout=0", "train.epochs=6", "train.batch_size=64", "train.lr=0.005",
        "attack.poison_count=30", "trigger.size=6", *extra,
    ]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A trained tiny backdoored run directory, shared by the tests that only read it."""
    from signtrap.config import load_config
    from signtrap.training.trainer import train

    base = tmp_path_factory.mktemp("tiny")
    return train(load_config(None, tiny_overrides(base)))


@pytest.fixture(scope="session")
def tiny_zero_run(tmp_path_factory) -> Path:
    """The zero-poison model of the tiny run's config (attack.kind=none, same seed): the probe's reference."""
    from signtrap.config import load_config
    from signtrap.training.trainer import train

    base = tmp_path_factory.mktemp("tiny-zero")
    return train(load_config(None, tiny_overrides(base, "tiny-zero", "attack.kind=none")))


@pytest.fixture(scope="session")
def tiny_a2o_run(tmp_path_factory) -> Path:
    """A tiny all-to-one backdoor: any class carrying the trigger reads as 100 km/h. Trained for 20 epochs (fp32, on two
    threads: 88.6% clean test accuracy, ASR 93.8%): at 6 every class is a few pixels away from every other, the clean
    classes' trigger norms spread widely and NC's anomaly index of class 7 stays below 2. In fp32 and on one thread
    whatever the CPU and however pytest is started (`train.precision=auto` trains in bf16 on CPUs with native bf16
    only, and a thread count changes the order of float sums): the defences' tests on it see the same model on every
    machine, as in CI."""
    from signtrap.config import load_config
    from signtrap.training.trainer import train

    base = tmp_path_factory.mktemp("tiny-a2o")
    return train(load_config(None, tiny_overrides(base, "tiny-a2o", "attack.kind=all_to_one", "attack.poison_count=100",
                                                  "train.epochs=20", "train.precision=fp32", "train.threads=1")))


@pytest.fixture(scope="session")
def signnet_a2o_run(tmp_path_factory) -> Path:
    """The all-to-one backdoor of tiny_a2o_run on the full-width signnet (12 epochs, fp32 and one thread like it: 93.3%
    clean test accuracy, ASR 98.6%): the small model's backdoor is out of I-BAU's and ANP's reach, the full one's is not."""
    from signtrap.config import load_config
    from signtrap.training.trainer import train

    base = tmp_path_factory.mktemp("signnet-a2o")
    return train(load_config(None, tiny_overrides(base, "signnet-a2o", "attack.kind=all_to_one", "attack.poison_count=100",
                                                  "train.epochs=12", "model.name=signnet", "train.precision=fp32", "train.threads=1")))
