"""Cityscapes on a small tree in the real layout: labelIds -> trainIds, checks and bad input."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from cityscapesscripts.helpers.labels import id2label, trainId2label
from PIL import Image

from deeplab_lit.config import DataConfig
from deeplab_lit.errors import UserError
from datamodules import build_datamodule
from datamodules.cityscapes import check_cityscapes_tree
from datamodules.prepare import main as prepare_main
from test_data_trees import write_cityscapes_tree


def cfg(root):
    return DataConfig(name="cityscapes", root=str(root), num_workers=0, batch_size=2, crop_size=16)


def official_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """The benchmark's mapping, straight from cityscapesscripts' id2label (255 and -1 -> 255)."""
    out = np.empty_like(label_ids)
    for label_id in np.unique(label_ids):
        train_id = id2label[int(label_id)].trainId
        out[label_ids == label_id] = train_id if 0 <= train_id < 255 else 255
    return out


def test_train_ids_equal_the_cityscapesscripts_table_for_every_label_id(tmp_path):
    masks = write_cityscapes_tree(tmp_path)
    dm = build_datamodule(cfg(tmp_path))
    dm.setup("fit")
    assert dm.num_classes == 19
    assert dm.class_names == [trainId2label[i].name for i in range(19)]
    assert dm.class_names[:3] == ["road", "sidewalk", "building"]
    assert len(dm.train_dataset) == 3 and len(dm.val_dataset) == 2
    for index, sample in enumerate(dm.val_dataset.samples):
        item = dm.val_dataset[index]
        assert sorted(np.unique(masks[sample.name])) == list(range(34))  # every labelId present
        assert np.array_equal(item["mask"].numpy(), official_train_ids(masks[sample.name]))
        assert set(np.unique(item["mask"].numpy())) == set(range(19)) | {255}
        rgb = cv2.imread(str(sample.image))[..., ::-1]
        assert np.array_equal(item["rgb"].numpy(), rgb)
    train_item = dm.train_dataset[0]
    assert train_item["image"].shape == (3, 16, 16) and train_item["mask"].shape == (16, 16)
    assert dm.train_dataset.samples[0].name == "aachen_000000_000019"


def test_complete_tree_check_counts_what_is_missing(tmp_path):
    write_cityscapes_tree(tmp_path, counts={"train": 2, "val": 1})
    next((tmp_path / "gtFine/val").glob("*/*_labelIds.png")).unlink()
    assert check_cityscapes_tree(tmp_path) == [
        "leftImg8bit/train has 2 images, the full set has 2975",
        "leftImg8bit/val has 1 images, the full set has 500",
        f"1 val images have no gtFine labelIds mask, e.g. {tmp_path}/leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png",
    ]


def test_tree_without_gtfine(tmp_path, capsys):
    write_cityscapes_tree(tmp_path)
    shutil.rmtree(tmp_path / "gtFine")
    with pytest.raises(UserError, match=r"has no gtFine/ directory; Cityscapes needs a registered account"):
        build_datamodule(cfg(tmp_path)).setup("fit")
    assert prepare_main(["cityscapes", "--root", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert f"{tmp_path}/gtFine/ is missing (from gtFine_trainvaltest.zip)" in captured.out
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"error: the Cityscapes tree in {tmp_path} is incomplete")
    assert "csDownload" in captured.err and "leftImg8bit_trainvaltest.zip" in captured.err


def test_prepare_cityscapes_command_line_one_line_exit_2(tmp_path):
    """The real command line, end to end: no traceback, one line, exit code 2."""
    missing = tmp_path / "nowhere"
    result = subprocess.run(
        [sys.executable, "-m", "datamodules.prepare", "cityscapes", "--root", str(missing)],
        capture_output=True, text=True, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: Cityscapes root {missing} does not exist; Cityscapes needs a registered")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_image_without_mask(tmp_path):
    write_cityscapes_tree(tmp_path)
    mask = next((tmp_path / "gtFine/train").glob("bremen/*_labelIds.png"))
    mask.unlink()
    with pytest.raises(UserError, match=rf"image .*bremen_000001_000019_leftImg8bit.png has no mask {mask}"):
        build_datamodule(cfg(tmp_path)).setup("fit")


def test_label_id_outside_the_table(tmp_path):
    write_cityscapes_tree(tmp_path, counts={"val": 1})
    (path,) = (tmp_path / "gtFine/val").glob("*/*_labelIds.png")
    label_ids = np.asarray(Image.open(path)).copy()
    label_ids[0, 0] = 40
    Image.fromarray(label_ids, mode="L").save(path)
    dm = build_datamodule(cfg(tmp_path))
    dm.setup("validate")
    with pytest.raises(UserError, match=rf"mask {path} holds value 40 \(1 pixels\); expected a Cityscapes labelId 0..33"):
        dm.val_dataset[0]
