"""The per-image evaluation record: counts per image and class in validation, the file beside the summary,
and the reported mIoU recomputed from it exactly."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from datamodules.loaders import pad_collate
from deeplab_lit.config import OptimConfig
from deeplab_lit.errors import UserError
from deeplab_lit.modules.base import SegmentationModule, dataset_order, per_image_confusion
from deeplab_lit.protocols import Protocol
from deeplab_lit.records import (
    MetricResult, PerImageCounts, SummaryRecord, iou_from_counts, miou_from_counts, per_image_path, predictions_dir,
    read_per_image)

CLASSES = ["background", "a", "b", "c"]


def module(qualitative=2):
    net = nn.Conv2d(3, len(CLASSES), 1)
    result = SegmentationModule(net, class_names=CLASSES, recipe=OptimConfig(), max_steps=10,
                                protocols=[Protocol(), Protocol(name="os8", output_stride=8)],
                                qualitative_images=qualitative)
    result.log = lambda *args, **kwargs: None
    return result


def item(name, height, width, seed):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, len(CLASSES), (height, width), generator=generator)
    mask[torch.rand(mask.shape, generator=generator) < 0.1] = 255
    return {"image": torch.zeros(3, height, width), "mask": mask, "name": name}


def numpy_counts(prediction, mask, classes):
    valid = mask != 255
    inter = np.array([np.sum((prediction == c) & (mask == c) & valid) for c in range(classes)])
    union = np.array([np.sum(((prediction == c) | (mask == c)) & valid) for c in range(classes)])
    return inter, union


def test_counts_per_image_ignore_padding_and_the_padding_rank_image():
    """Images of different sizes batched by pad_collate (padded area 255), and the padding image of a
    rank without images (name ""): per-image counts equal numpy's on each image's own pixels."""
    items = [item("img_a", 9, 7, 0), item("img_b", 5, 11, 1), item("img_c", 8, 8, 2)]
    padding = item("", 9, 7, 3)
    padding["mask"][:] = 255
    batches = [pad_collate(items[:2]), pad_collate([items[2], padding])]
    assert (batches[0]["mask"][1, 5:, :] == 255).all()  # pad_collate's padded area
    generator = torch.Generator().manual_seed(5)
    m = module()
    expected = {}
    for batch in batches:
        predictions = torch.randint(0, len(CLASSES), batch["mask"].shape, generator=generator)
        probs = F.one_hot(predictions, len(CLASSES)).permute(0, 3, 1, 2).float()
        for key in m.metric_keys:
            m._update(key, probs, batch["mask"], batch["name"])
        for index, name in enumerate(batch["name"]):
            if name:
                source = next(i for i in items if i["name"] == name)
                h, w = source["mask"].shape
                expected[name] = numpy_counts(predictions[index, :h, :w].numpy(), source["mask"].numpy(),
                                              len(CLASSES))
    m.on_validation_epoch_end()
    result = m.last_results["mIoU"]
    counts = result["per_image"]
    assert counts.names == ("img_a", "img_b", "img_c")
    for row, name in enumerate(counts.names):
        assert counts.intersection[row].tolist() == expected[name][0].tolist()
        assert counts.union[row].tolist() == expected[name][1].tolist()
    assert counts.intersection.dtype == np.int64 and counts.union.dtype == np.int64
    # the reported numbers are the counts' numbers, exactly
    assert result["mIoU"] == miou_from_counts(counts.intersection.sum(0), counts.union.sum(0)) == counts.miou
    total_i = sum(e[0] for e in expected.values())
    total_u = sum(e[1] for e in expected.values())
    assert result["mIoU"] == pytest.approx(np.mean(total_i / total_u), abs=1e-12)
    assert counts.confusion.sum() == sum(int((i["mask"] != 255).sum()) for i in items)
    assert np.array_equal(np.diag(counts.confusion), total_i)
    assert result["pixel_acc"] == total_i.sum() / counts.confusion.sum()
    # the first 2 images' predicted label maps (qualitative_images=2)
    assert list(result["predictions"]) == ["img_a", "img_b"] and result["predictions"]["img_a"].dtype == np.uint8


def test_iou_of_a_class_absent_everywhere_is_left_out():
    intersection, union = np.array([3, 0, 0]), np.array([4, 0, 5])
    assert np.isnan(iou_from_counts(intersection, union)[1])
    assert miou_from_counts(intersection, union) == (0.75 + 0.0) / 2
    assert np.isnan(miou_from_counts(np.zeros(3), np.zeros(3)))


def test_per_image_confusion_of_a_batch():
    predictions = torch.tensor([[[0, 1], [1, 1]], [[2, 2], [0, 1]]])
    masks = torch.tensor([[[0, 1], [255, 0]], [[2, 255], [1, 1]]])
    confusion = per_image_confusion(predictions, masks, 3)
    assert confusion[0].tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
    assert confusion[1].tolist() == [[0, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_dataset_order_interleaves_the_ranks_shards():
    # 7 images on 2 ranks: rank 0 has 0, 2, 4, 6 and rank 1 has 1, 3, 5
    assert dataset_order([4, 3]) == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2), (0, 3)]
    assert dataset_order([1, 0]) == [(0, 0)]  # rank 1 evaluated only the padding image
    assert dataset_order([]) == []


def record(tmp_path, json_name="summary.json"):
    names = ("x1", "x2", "x3")
    inter = np.array([[5, 0, 1, 0], [2, 3, 0, 0], [0, 0, 4, 0]])
    union = np.array([[6, 1, 2, 0], [4, 3, 0, 0], [1, 0, 5, 0]])
    counts = PerImageCounts(names, inter, union, np.eye(4, dtype=np.int64))
    result = MetricResult(miou=counts.miou, pixel_acc=0.5, per_class_iou={}, protocol={}, per_image=counts,
                          predictions={"x1": np.array([[0, 1], [2, 255]], np.uint8)})
    summary = SummaryRecord(kind="evaluate", experiment="demo", split="val", results={"mIoU": result}, config={},
                            class_names=CLASSES)
    return summary, summary.write(tmp_path / json_name)


def test_the_record_writes_its_side_files_and_reads_them_back(tmp_path):
    from PIL import Image

    summary, path = record(tmp_path)
    assert per_image_path(path) == tmp_path / "per_image.npz" and predictions_dir(path) == tmp_path / "predictions"
    data = json.loads(path.read_text())
    assert "per_image" not in data["results"]["mIoU"]  # never part of the JSON
    with np.load(tmp_path / "per_image.npz", allow_pickle=False) as npz:
        assert set(npz.files) == {"format_version", "names", "class_names", "mIoU.intersection", "mIoU.union",
                                  "mIoU.confusion"}
        assert npz["mIoU.intersection"].dtype == np.int64 and npz["mIoU.union"].shape == (3, 4)
        assert npz["names"].tolist() == ["x1", "x2", "x3"] and npz["class_names"].tolist() == CLASSES
    counts = read_per_image(tmp_path / "per_image.npz")["mIoU"]
    assert counts.miou == data["results"]["mIoU"]["mIoU"]  # exactly
    png = Image.open(tmp_path / "predictions" / "mIoU" / "x1.png")
    assert png.mode == "P" and np.asarray(png).tolist() == [[0, 1], [2, 255]]

    record(tmp_path, "os8_ms.json")  # evaluate --json os8_ms.json: its own side files
    assert (tmp_path / "os8_ms.per_image.npz").is_file() and (tmp_path / "os8_ms.predictions" / "mIoU").is_dir()


def test_a_broken_per_image_file_is_one_line(tmp_path):
    broken = tmp_path / "per_image.npz"
    broken.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a per_image.npz written by deeplab_lit"):
        read_per_image(broken)
