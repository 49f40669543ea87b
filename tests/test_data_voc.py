"""VOC 2012 and train_aug (VOC + SBD) on small trees in the real formats; bad VOC inputs."""
from __future__ import annotations

import dataclasses
import re
import shutil

import cv2
import numpy as np
import torch
import pytest
from PIL import Image

from deeplab_lit.config import DataConfig
from deeplab_lit.errors import UserError
from deeplab_lit.preprocessing import prepare_batch
from datamodules import build_datamodule, validate_data_config
from datamodules.prepare import main as prepare_main
from datamodules.prepare import prepare_sbd, prepare_voc
from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD
from test_data_trees import write_palette_png, write_sbd_tree, write_voc_tree

VOC_TRAIN = ["2008_000001", "2008_000002", "2008_000003", "2008_000004"]
VOC_VAL = ["2008_000101", "2008_000102", "2008_000103"]
SBD_ONLY = ["2009_000201", "2009_000202", "2009_000203", "2009_000204", "2009_000205"]
# SBD lists overlap VOC train (VOC mask must win) and VOC val (must be excluded from train_aug).
SBD_TRAIN = ["2008_000001", "2008_000101", "2009_000201", "2009_000202", "2009_000203"]
SBD_VAL = ["2008_000002", "2008_000102", "2009_000204", "2009_000205"]
TRAIN_AUG = sorted(set(VOC_TRAIN) | set(SBD_ONLY))  # 9 = (4 | 5 | 4) - 3 val, by hand


@pytest.fixture
def voc_root(tmp_path):
    root = tmp_path / "voc"
    voc_masks = write_voc_tree(root, VOC_TRAIN, VOC_VAL, extra_images=SBD_ONLY)
    sbd_masks = write_sbd_tree(root, SBD_TRAIN, SBD_VAL)
    return root, voc_masks, sbd_masks


def data_cfg(root, name="voc_aug", **overrides):
    return DataConfig(name=name, root=str(root), num_workers=0, batch_size=2, **overrides)


def test_prepare_builds_train_aug_with_the_official_rule(voc_root, capsys):
    root, voc_masks, sbd_masks = voc_root
    assert prepare_voc(root) == {"train": 4, "val": 3}  # extracted tree: no download attempted
    counts = prepare_sbd(root)
    assert counts == {"train": 4, "val": 3, "train_aug": 9}
    listed = (root / "VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt").read_text().split()
    assert listed == TRAIN_AUG
    assert not set(listed) & set(VOC_VAL)
    # Only SBD-only ids are converted; VOC train ids keep their VOC masks.
    converted = sorted(p.stem for p in (root / "VOCdevkit/VOC2012/SegmentationClassAug").glob("*.png"))
    assert converted == SBD_ONLY
    for image_id in SBD_ONLY:
        with Image.open(root / f"VOCdevkit/VOC2012/SegmentationClassAug/{image_id}.png") as png:
            assert png.mode == "P" and np.array_equal(np.asarray(png), sbd_masks[image_id])
    out = capsys.readouterr().out
    assert "train_aug 9 (official: 10,582)" in out and "5 SBD masks" in out


def test_voc_aug_datamodule_items(voc_root):
    root, voc_masks, sbd_masks = voc_root
    prepare_sbd(root)
    dm = build_datamodule(data_cfg(root, crop_size=33))
    dm.setup("fit")
    assert (dm.num_classes, len(dm.class_names), dm.ignore_index) == (21, 21, 255)
    assert dm.class_names[15] == "person" and dm.mean_rgb_uint8 == (124, 116, 104)
    assert sorted(s.name for s in dm.train_dataset.samples) == TRAIN_AUG
    assert [s.name for s in dm.val_dataset.samples] == VOC_VAL
    item = dm.train_dataset[0]
    assert item["image"].shape == (3, 33, 33) and item["image"].dtype == torch.uint8  # normalised on the device
    assert item["mask"].shape == (33, 33) and item["mask"].dtype == torch.uint8

    # Evaluation items: the whole image, the mask exactly as stored (255 included).
    train_aug = dm.eval_dataset("train_aug")
    names = [s.name for s in train_aug.samples]
    for image_id in ("2008_000001", "2008_000002"):  # in VOC train and in SBD: VOC's mask wins
        mask = train_aug[names.index(image_id)]["mask"].numpy()
        assert np.array_equal(mask, voc_masks[image_id]) and not np.array_equal(mask, sbd_masks[image_id])
    assert np.array_equal(train_aug[names.index("2009_000203")]["mask"].numpy(), sbd_masks["2009_000203"])
    item = dm.val_dataset[0]
    assert np.array_equal(item["mask"].numpy(), voc_masks[VOC_VAL[0]])
    assert 255 in item["mask"]
    rgb = cv2.imread(str(root / f"VOCdevkit/VOC2012/JPEGImages/{VOC_VAL[0]}.jpg"))[..., ::-1]
    assert np.array_equal(item["rgb"].numpy(), rgb) and item["rgb"].shape == (30, 40, 3)
    assert np.array_equal(item["image"].numpy(), rgb.transpose(2, 0, 1))
    expected = (rgb / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)  # what the module feeds the network
    normalised = prepare_batch({"image": item["image"][None]}, dm.mean, dm.std)["image"][0]
    np.testing.assert_allclose(normalised.numpy(), expected.transpose(2, 0, 1), atol=1e-5)


def test_voc_datamodule_stages_and_splits(voc_root):
    root, _, _ = voc_root
    dm = build_datamodule(data_cfg(root, name="voc"))
    dm.setup("validate")
    assert dm.train_dataset is None and len(dm.val_dataset) == 3
    dm.setup("fit")
    assert sorted(s.name for s in dm.train_dataset.samples) == VOC_TRAIN
    assert len(dm.eval_dataset("train")) == 4
    with pytest.raises(UserError, match=r"train_aug.txt does not exist.*prepare sbd"):
        dm.eval_dataset("train_aug")
    with pytest.raises(UserError, match="split 'test' is not one of train, val, train_aug"):
        dm.eval_dataset("test")


def test_root_that_is_the_voc2012_directory_itself(voc_root):
    root, voc_masks, _ = voc_root
    dm = build_datamodule(data_cfg(root / "VOCdevkit" / "VOC2012", name="voc"))
    dm.setup("validate")
    assert np.array_equal(dm.val_dataset[1]["mask"].numpy(), voc_masks[VOC_VAL[1]])


# -- bad input --------------------------------------------------------------------------------


def test_missing_root_names_path_and_prepare_command(tmp_path):
    missing = tmp_path / "nowhere"
    dm = build_datamodule(data_cfg(missing))
    expected = f"data.root {missing} does not exist; prepare it with `python -m datamodules.prepare voc --root {missing}`"
    with pytest.raises(UserError, match=re.escape(expected)):
        dm.setup("fit")


def test_root_without_voc_tree(tmp_path):
    with pytest.raises(UserError, match=r"holds neither VOCdevkit/VOC2012/JPEGImages nor JPEGImages"):
        build_datamodule(data_cfg(tmp_path, name="voc")).setup("fit")


def test_missing_split_file(voc_root):
    root, _, _ = voc_root
    (root / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(UserError, match=r"split list .*Segmentation/val.txt does not exist; run `python -m datamodules.prepare voc"):
        build_datamodule(data_cfg(root, name="voc")).setup("validate")


def test_image_without_mask(voc_root):
    root, _, _ = voc_root
    (root / f"VOCdevkit/VOC2012/SegmentationClass/{VOC_TRAIN[2]}.png").unlink()
    with pytest.raises(UserError, match=rf"image .*JPEGImages/{VOC_TRAIN[2]}.jpg has no mask .*SegmentationClass/{VOC_TRAIN[2]}.png"):
        build_datamodule(data_cfg(root, name="voc")).setup("fit")


def test_listed_image_missing(voc_root):
    root, _, _ = voc_root
    (root / f"VOCdevkit/VOC2012/JPEGImages/{VOC_VAL[0]}.jpg").unlink()
    with pytest.raises(UserError, match=rf"image .*{VOC_VAL[0]}.jpg \(listed in val.txt\) does not exist"):
        build_datamodule(data_cfg(root, name="voc")).setup("validate")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_image_names_the_file(voc_root, damage):
    root, _, _ = voc_root
    path = root / f"VOCdevkit/VOC2012/JPEGImages/{VOC_VAL[1]}.jpg"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a jpeg" * 50, "empty": b""}[damage])
    dm = build_datamodule(data_cfg(root, name="voc"))
    dm.setup("validate")
    dm.val_dataset[0]  # the others still load
    with pytest.raises(UserError, match=rf"image {path} is unreadable or truncated"):
        dm.val_dataset[1]


def test_truncated_mask_names_the_file(voc_root):
    root, _, _ = voc_root
    path = root / f"VOCdevkit/VOC2012/SegmentationClass/{VOC_VAL[2]}.png"
    path.write_bytes(path.read_bytes()[:60])
    dm = build_datamodule(data_cfg(root, name="voc"))
    dm.setup("validate")
    with pytest.raises(UserError, match=rf"mask {path} is unreadable or truncated"):
        dm.val_dataset[2]


def test_mask_value_outside_classes_names_file_and_value(voc_root):
    root, voc_masks, _ = voc_root
    path = root / f"VOCdevkit/VOC2012/SegmentationClass/{VOC_VAL[0]}.png"
    bad = voc_masks[VOC_VAL[0]].copy()
    bad[:2, :3] = 37
    write_palette_png(path, bad)
    dm = build_datamodule(data_cfg(root, name="voc"))
    dm.setup("validate")
    with pytest.raises(UserError, match=rf"mask {path} holds value 37 \(6 pixels\); expected 0..20 or 255"):
        dm.val_dataset[0]


def test_rgb_mask_is_rejected_rather_than_read_as_colours(voc_root):
    root, voc_masks, _ = voc_root
    path = root / f"VOCdevkit/VOC2012/SegmentationClass/{VOC_VAL[0]}.png"
    Image.fromarray(np.stack([voc_masks[VOC_VAL[0]]] * 3, axis=-1)).save(path)
    dm = build_datamodule(data_cfg(root, name="voc"))
    dm.setup("validate")
    with pytest.raises(UserError, match=rf"mask {path} is a RGB image; label masks must be palette"):
        dm.val_dataset[0]


def test_image_and_mask_of_different_sizes(voc_root):
    root, _, _ = voc_root
    path = root / f"VOCdevkit/VOC2012/SegmentationClass/{VOC_VAL[0]}.png"
    Image.fromarray(np.zeros((10, 12), np.uint8), mode="P").save(path)
    dm = build_datamodule(data_cfg(root, name="voc"))
    dm.setup("validate")
    with pytest.raises(UserError, match=r"is 40x30 but its mask .* is 12x10"):
        dm.val_dataset[0]


def test_sbd_mask_with_value_outside_classes(voc_root):
    root, _, _ = voc_root
    import scipy.io

    path = root / "benchmark_RELEASE/dataset/cls/2009_000204.mat"
    scipy.io.savemat(str(path), {"GTcls": {"Segmentation": np.full((30, 40), 23, np.uint8)}})
    with pytest.raises(UserError, match=rf"mask {path} holds value 23 \(1200 pixels\); expected 0..20"):
        prepare_sbd(root)


def test_sbd_mat_without_gtcls(voc_root):
    root, _, _ = voc_root
    import scipy.io

    path = root / "benchmark_RELEASE/dataset/cls/2009_000201.mat"
    scipy.io.savemat(str(path), {"GTinst": {"Segmentation": np.zeros((30, 40), np.uint8)}})
    with pytest.raises(UserError, match=rf"SBD mask {path} has no GTcls.Segmentation"):
        prepare_sbd(root)


def test_prepare_sbd_without_voc_and_cli_exit_code(tmp_path, capsys):
    write_sbd_tree(tmp_path, SBD_TRAIN, SBD_VAL)
    assert prepare_main(["sbd", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err == f"error: {tmp_path} has no VOC 2012 tree; run `python -m datamodules.prepare voc --root {tmp_path}` first\n"


def test_prepare_sbd_resumes_an_interrupted_conversion(voc_root):
    """A second run converts only what is missing and gives the same list."""
    root, _, _ = voc_root
    prepare_sbd(root)
    aug = root / "VOCdevkit/VOC2012/SegmentationClassAug"
    (aug / "2009_000202.png").unlink()
    shutil.rmtree(root / "benchmark_RELEASE/dataset/cls")
    (root / "benchmark_RELEASE/dataset/cls").mkdir()
    write_sbd_tree(root, ["2009_000202"], [])  # only the one .mat left to convert
    (root / "benchmark_RELEASE/dataset/train.txt").write_text("".join(f"{i}\n" for i in SBD_TRAIN))
    (root / "benchmark_RELEASE/dataset/val.txt").write_text("".join(f"{i}\n" for i in SBD_VAL))
    # Every other .mat is gone, so this only passes if the converted PNGs are reused.
    assert prepare_sbd(root)["train_aug"] == 9
    assert (aug / "2009_000202.png").is_file() and not list(aug.glob(".*partial"))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"crop_size": 0}, r"data.crop_size=0 must be a positive"),
        ({"scale_range": [1.5, 0.5]}, r"data.scale_range=\[1.5, 0.5\]: needs \[lo, hi\] with 0 < lo <= hi"),
        ({"num_workers": -1}, r"data.num_workers=-1 must be 0 or more"),
        ({"eval_batch_size": 0}, r"data.batch_size and data.eval_batch_size must be at least 1"),
        ({"name": "coco"}, r"data.name='coco' is unknown \(config key \"data.name\": expected one of \[voc, voc_aug, "
                           r"cityscapes, synthetic\]\)"),
    ],
)
def test_bad_config_values(tmp_path, override, message):
    cfg = dataclasses.replace(data_cfg(tmp_path), **override)
    with pytest.raises(UserError, match=message):
        validate_data_config(cfg)  # the data rules, checked once when a run is resolved
