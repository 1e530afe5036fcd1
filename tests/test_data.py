import csv
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURE_CLASSES, FRAMES_PER_TRACK, LAYOUTS, TEST_IMAGES, TRACKS_PER_CLASS, make_layout, ppm_bytes, write_zip
from signtrap.config import load_config
from signtrap.data import gtsrb
from signtrap.data.cache import TEST, TRAIN, cache_path, load, prepare
from signtrap.data.decode import decode_image
from signtrap.data.splits import track_split
from signtrap.errors import DataError


def data_cfg(root, tmp_path, *extra):
    return load_config(None, ["data.source=gtsrb", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", *extra]).data


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_the_same_images_and_labels(tmp_path, layout):
    reference = load(data_cfg(make_layout(tmp_path / "ref", "torchvision-zip"), tmp_path / "a"), progress=False)
    data = load(data_cfg(make_layout(tmp_path / layout, layout), tmp_path / "b"), progress=False)
    n_train = len(FIXTURE_CLASSES) * TRACKS_PER_CLASS * FRAMES_PER_TRACK
    assert len(data) == n_train + TEST_IMAGES
    assert (data.partition == TRAIN).sum() == n_train and (data.partition == TEST).sum() == TEST_IMAGES
    np.testing.assert_array_equal(data.images, reference.images)
    np.testing.assert_array_equal(data.labels, reference.labels)
    np.testing.assert_array_equal(data.tracks, reference.tracks)
    assert data.data_hash == reference.data_hash
    assert set(np.unique(data.labels)) == set(FIXTURE_CLASSES)


def test_roi_is_scaled_by_actual_over_declared_size(tmp_path):
    root = make_layout(tmp_path / "g", "official-zip")
    data = load(data_cfg(root, tmp_path, "data.size=40"), progress=False)
    # CSV declares 80x80 with ROI 20..59; the image is 40x40, so the sign box is 10..30
    assert tuple(data.rois[0]) == (10, 10, 30, 30)
    cropped = load(data_cfg(root, tmp_path, "data.size=20", "data.roi=true"), progress=False)
    raw = decode_image(zipfile.ZipFile(root / "GTSRB_Final_Training_Images.zip").read(
        "GTSRB/Final_Training/Images/00000/00000_00000.ppm"), "x")
    np.testing.assert_array_equal(cropped.images[0], raw[10:30, 10:30])


def test_cache_is_reused_and_keyed_by_settings(tmp_path):
    root = make_layout(tmp_path / "g", "torchvision-zip")
    cfg = data_cfg(root, tmp_path)
    path = prepare(cfg, progress=False)
    assert path == cache_path(cfg) and (path / "images.npy").is_file()
    assert cache_path(data_cfg(root, tmp_path, "data.size=24")) != path
    assert cache_path(data_cfg(root, tmp_path, "data.roi=true")) != path
    data = load(cfg, progress=False)
    assert isinstance(data.images, np.memmap) and data.images.dtype == np.uint8 and data.images.shape[1:] == (32, 32, 3)
    assert len(data.files) == len(data) and data.files[0].endswith("00000/00000_00000.ppm")
    assert not list(path.parent.glob(".*.tmp"))  # no half-written cache left behind


def test_zip_slip_is_refused(tmp_path):
    root = tmp_path / "g"
    root.mkdir()
    write_zip(root / "GTSRB-Training_fixed.zip", {"GTSRB/Training/00000/../../../evil.ppm": b"x"})
    with pytest.raises(DataError, match="zip-slip"):
        gtsrb.find_records(root)
    write_zip(root / "GTSRB-Training_fixed.zip", {"/etc/evil": b"x"})
    with pytest.raises(DataError, match="zip-slip"):
        gtsrb.find_records(root)


def test_truncated_ppm_names_the_file(tmp_path):
    root = make_layout(tmp_path / "g", "official-tree")
    victim = root / "GTSRB/Final_Training/Images/00007/00001_00002.ppm"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(DataError, match=r"00007/00001_00002\.ppm: truncated PPM"):
        load(data_cfg(root, tmp_path), progress=False)
    data = load(data_cfg(root, tmp_path, "data.skip_corrupt=true"), progress=False)
    assert data.meta["skipped"] == 1 and len(data) == len(FIXTURE_CLASSES) * TRACKS_PER_CLASS * FRAMES_PER_TRACK + TEST_IMAGES - 1


def test_missing_csv_and_missing_file_are_errors(tmp_path):
    root = make_layout(tmp_path / "g", "official-tree")
    (root / "GTSRB/Final_Training/Images/00014/GT-00014.csv").unlink()
    with pytest.raises(DataError, match="00014: class folder has no GT-00014.csv"):
        gtsrb.find_records(root)
    root = make_layout(tmp_path / "h", "official-tree")
    (root / "GTSRB/Final_Training/Images/00000/00002_00000.ppm").unlink()
    with pytest.raises(DataError, match="missing file '00002_00000.ppm'"):
        gtsrb.find_records(root)


def test_missing_root_and_unknown_layout(tmp_path):
    with pytest.raises(DataError, match="not found"):
        gtsrb.find_records(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "something.txt").write_text("x")
    with pytest.raises(DataError, match="no GTSRB training images found"):
        gtsrb.find_records(tmp_path / "empty")


def test_decode_rejects_garbage():
    with pytest.raises(DataError, match="img.png: corrupt"):
        decode_image(b"not an image", "img.png")
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    np.testing.assert_array_equal(decode_image(ppm_bytes(image), "ok"), image)
    commented = b"P6\n# a comment\n3 2\n255\n" + image.tobytes()
    np.testing.assert_array_equal(decode_image(commented, "ok"), image)


def test_track_split_holds_out_whole_tracks_per_class():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(5), 60)
    tracks = labels * 1000 + np.tile(np.repeat(np.arange(6), 10), 5)
    rows = rng.permutation(len(labels))
    train, val = track_split(labels, tracks, rows, 0.2, seed=3)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    assert not set(tracks[train]) & set(tracks[val])
    assert set(labels[train]) == set(labels[val]) == set(range(5))
    again, _ = track_split(labels, tracks, rows, 0.2, seed=3)
    other, _ = track_split(labels, tracks, rows, 0.2, seed=4)
    np.testing.assert_array_equal(train, again)
    assert not np.array_equal(train, other)


def csv_labels(root: Path) -> tuple[list[int], list[int]]:
    """The ClassId column of every training GT CSV and of the test GT CSV found under `root` (zips or trees),
    read with the csv module alone: what the loader must reproduce, whatever copy of GTSRB this is."""
    train, test = [], []
    texts = []
    for path in sorted(root.rglob("*")):
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as zf:
                texts += [(n, zf.read(n).decode("utf-8-sig")) for n in zf.namelist() if n.endswith(".csv")]
        elif path.suffix == ".csv":
            texts.append((path.name, path.read_text(encoding="utf-8-sig")))
    for name, text in texts:
        base = name.rsplit("/", 1)[-1]
        rows = list(csv.DictReader(io.StringIO(text), delimiter=";"))
        if base.startswith("GT-000"):
            train += [int(r["ClassId"]) for r in rows]
        elif base == "GT-final_test.csv":
            test += [int(r["ClassId"]) for r in rows]
    return train, test


def test_real_gtsrb(real_gtsrb, tmp_path_factory):
    from signtrap.datasets.gtsrb import STOP

    cfg = load_config(None, ["data.source=gtsrb", f"data.root={real_gtsrb}", f"data.cache_dir={tmp_path_factory.mktemp('c')}"]).data
    data = load(cfg, progress=False)
    train_labels, test_labels = csv_labels(real_gtsrb)
    assert train_labels and test_labels
    train = data.partition == TRAIN
    assert train.sum() == len(train_labels) and (data.partition == TEST).sum() == len(test_labels)
    assert np.array_equal(np.bincount(data.labels[train], minlength=43), np.bincount(train_labels, minlength=43))
    assert np.array_equal(np.bincount(data.labels[~train], minlength=43), np.bincount(test_labels, minlength=43))
    assert (data.labels[train] == STOP).sum() == train_labels.count(STOP) > 0
    assert len(np.unique(data.labels[train])) == len(set(train_labels))
    splits = data.splits(0.1, seed=0)
    assert not set(data.tracks[splits.train]) & set(data.tracks[splits.val])
    assert len(np.unique(data.labels[splits.val])) == len(set(train_labels))


def test_fetch_offline_fails_fast_and_says_what_to_place_where(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    from signtrap.data import fetch

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    with pytest.raises(DataError, match=r"cannot download GTSRB-Training_fixed\.zip .*place .*GTSRB_Final_Test_GT\.zip"):
        fetch.fetch(tmp_path / "g")
    assert not list((tmp_path / "g").iterdir())  # nothing half-downloaded
