"""The embedded synthetic dataset: format, determinism, atomic first-use writing in the cache."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datamodules.synthetic as synthetic
from deeplab_lit.config import DataConfig
from deeplab_lit.errors import UserError
from datamodules import build_datamodule
from datamodules.prepare import main as prepare_main
from datamodules.synthetic import SYNTHETIC_CLASSES, ensure_synthetic, generate_synthetic

SMALL = {"train": 6, "val": 3}


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generator_is_deterministic(tmp_path):
    generate_synthetic(tmp_path / "a", seed=0, sizes=SMALL)
    generate_synthetic(tmp_path / "b", seed=0, sizes=SMALL)
    generate_synthetic(tmp_path / "c", seed=1, sizes=SMALL)
    a, b, c = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert len(a) == 2 * 9 + 2 + 1  # jpg + png per image, two lists, synthetic.json
    assert a == b
    assert a["JPEGImages/train_0000.jpg"] != c["JPEGImages/train_0000.jpg"]


@pytest.fixture(scope="module")
def full_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "synthetic"
    start = time.perf_counter()
    ensure_synthetic(root)
    return root, time.perf_counter() - start


def test_full_set_format_and_content(full_set):
    root, seconds = full_set
    assert seconds < 60  # about 2 s on the 2-core dev machine
    lists = root / "ImageSets" / "Segmentation"
    train, val = (lists / "train.txt").read_text().split(), (lists / "val.txt").read_text().split()
    assert (len(train), len(val)) == (300, 60) and not set(train) & set(val)
    assert json.loads((root / "synthetic.json").read_text())["classes"] == SYNTHETIC_CLASSES
    pixels = np.zeros(256, np.int64)
    images_with = np.zeros(256, np.int64)
    areas = []
    for name in train:
        with Image.open(root / "SegmentationClass" / f"{name}.png") as png:
            assert png.mode == "P" and png.size == (160, 120)
            mask = np.asarray(png)
        with Image.open(root / "JPEGImages" / f"{name}.jpg") as jpg:
            assert jpg.size == (160, 120) and jpg.mode == "RGB"
        counts = np.bincount(mask.reshape(-1), minlength=256)
        pixels += counts
        images_with += counts > 0
        areas += [counts[c] for c in range(1, 6) if counts[c]]
    assert set(np.flatnonzero(pixels)) == {0, 1, 2, 3, 4, 5, 255}
    assert images_with[255] == 300  # every image has objects and therefore a 255 boundary band
    assert min(images_with[1:6]) >= 80  # every class is well represented
    assert 0.02 < pixels[255] / pixels.sum() < 0.12  # a thin band, as in VOC
    assert np.percentile(areas, 10) < 400 and np.percentile(areas, 90) > 2000  # several scales


def test_boundary_band_surrounds_objects(full_set):
    root, _ = full_set
    mask = np.asarray(Image.open(root / "SegmentationClass" / "val_0000.png"))
    # No object pixel touches a background pixel directly: a 255 band always lies between them.
    horizontal = {(a, b) for a, b in zip(mask[:, :-1].reshape(-1), mask[:, 1:].reshape(-1)) if a != b}
    vertical = {(a, b) for a, b in zip(mask[:-1].reshape(-1), mask[1:].reshape(-1)) if a != b}
    assert horizontal | vertical and all(255 in pair for pair in horizontal | vertical)


def test_empty_root_uses_the_cache_and_writes_it_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPLAB_LIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(synthetic, "SPLIT_SIZES", SMALL)
    calls = []
    real = synthetic.generate_synthetic
    monkeypatch.setattr(synthetic, "generate_synthetic", lambda out, **kw: calls.append(out) or real(out, sizes=SMALL, **kw))
    dm = build_datamodule(DataConfig(name="synthetic", root="", num_workers=0, batch_size=2, crop_size=33))
    dm.prepare_data()
    dm.setup("fit")
    assert dm.root == tmp_path / "cache" / "synthetic"
    assert (len(dm.train_dataset), len(dm.val_dataset), dm.num_classes) == (6, 3, 6)
    assert dm.class_names == ["background", "disc", "square", "triangle", "star", "cross"]
    assert len(calls) == 1 and calls[0].parent == tmp_path / "cache"  # written beside, then renamed
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["synthetic"]
    build_datamodule(DataConfig(name="synthetic")).setup("fit")
    assert len(calls) == 1


def test_a_killed_generation_leaves_nothing(tmp_path, monkeypatch):
    def dies_halfway(out, **kwargs):
        (Path(out) / "JPEGImages").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "generate_synthetic", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(tmp_path / "synthetic")
    assert list(tmp_path.iterdir()) == []


def _race(root, barrier):
    barrier.wait()
    ensure_synthetic(Path(root))


def test_two_processes_racing_both_get_one_complete_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "SPLIT_SIZES", SMALL)  # inherited by the forked processes
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    processes = [context.Process(target=_race, args=(str(tmp_path / "synthetic"), barrier)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert [p.exitcode for p in processes] == [0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]
    reference = tmp_path / "reference"
    generate_synthetic(reference, sizes=SMALL)
    assert digest(tmp_path / "synthetic") == digest(reference)


def test_stale_version_is_regenerated(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "SPLIT_SIZES", SMALL)
    root = tmp_path / "synthetic"
    generate_synthetic(root, sizes={"train": 2, "val": 1})
    meta = json.loads((root / "synthetic.json").read_text())
    (root / "synthetic.json").write_text(json.dumps({**meta, "version": 0}))
    ensure_synthetic(root)
    assert len((root / "ImageSets/Segmentation/train.txt").read_text().split()) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]


def test_foreign_directory_is_not_overwritten(tmp_path):
    (tmp_path / "synthetic").mkdir()
    (tmp_path / "synthetic" / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match=r"exists and is not a synthetic dataset \(no synthetic.json\)"):
        ensure_synthetic(tmp_path / "synthetic")
    assert (tmp_path / "synthetic" / "mine.txt").read_text() == "keep"


def test_explicit_root_must_exist(tmp_path):
    with pytest.raises(UserError, match=rf"data.root {tmp_path / 'x'} does not exist.*prepare synthetic --root"):
        build_datamodule(DataConfig(name="synthetic", root=str(tmp_path / "x"))).setup("fit")


def test_prepare_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(synthetic, "SPLIT_SIZES", SMALL)
    assert prepare_main(["synthetic", "--root", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out == f"synthetic dataset in {tmp_path / 's'}: train 6, val 3\n"
    dm = build_datamodule(DataConfig(name="synthetic", root=str(tmp_path / "s"), num_workers=0))
    dm.setup("validate")
    assert len(dm.val_dataset) == 3
