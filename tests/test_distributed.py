"""Two-process DDP (gloo, CPU) evaluation gives exactly the single-process metrics on an odd-length split,
and one per-image record in dataset order that reproduces them exactly."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from deeplab_lit.records import miou_from_counts, read_per_image
from test_fit import run_fit


@pytest.fixture(scope="module")
def odd_split(tmp_path_factory):
    """A copy of the synthetic tree whose val list has 7 images (odd: DistributedSampler would pad)."""
    from datamodules.synthetic import default_synthetic_root, ensure_synthetic

    source = ensure_synthetic(default_synthetic_root())
    root = tmp_path_factory.mktemp("odd") / "synthetic7"
    shutil.copytree(source, root)
    lists = root / "ImageSets" / "Segmentation"
    (lists / "val.txt").write_text("\n".join((lists / "val.txt").read_text().split()[:7]) + "\n")
    return root


@pytest.mark.slow
def test_two_process_ddp_evaluation_equals_single_process(tmp_path, odd_split):
    """On the 7-image split; and on a 1-image split, where the rank without an image evaluates a fully
    ignored one and contributes nothing. The ranks' per-image records are gathered into one
    `<json stem>.per_image.npz` in the split's order, equal to the single process's, and the mIoU recomputed
    from it equals the reported one exactly."""
    one = tmp_path / "one_image"
    shutil.copytree(odd_split, one)
    lists = one / "ImageSets" / "Segmentation"
    (lists / "val.txt").write_text((lists / "val.txt").read_text().split()[0] + "\n")
    checkpoint = run_fit(tmp_path, "v3", "model.backbone=resnet50", wandb_mode="disabled") / "checkpoints" / "last.ckpt"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}
    reports, per_image = {}, {}
    for root, devices, extra in [(odd_split, 1, []), (odd_split, 2, ["--trainer.strategy=ddp"]), (one, 1, []),
                                 (one, 2, ["--trainer.strategy=ddp"])]:
        out = tmp_path / f"eval-{root.name}-{devices}.json"
        result = subprocess.run([sys.executable, "-m", "deeplab_lit.evaluate", "--checkpoint", str(checkpoint),
                                 f"--data.root={root}", "--trainer.accelerator=cpu", f"--trainer.devices={devices}",
                                 *extra, "--json", str(out)], capture_output=True, text=True, env=env, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        reports[root.name, devices] = json.loads(out.read_text())["results"]["mIoU"]
        per_image[root.name, devices] = read_per_image(out.with_name(f"{out.stem}.per_image.npz"))["mIoU"]
        assert reports[root.name, devices]["mIoU"] == miou_from_counts(
            per_image[root.name, devices].intersection.sum(0), per_image[root.name, devices].union.sum(0))
    for root in (odd_split, one):
        name = root.name
        single, double = reports[name, 1], reports[name, 2]
        assert double["mIoU"] == single["mIoU"]
        assert double["pixel_acc"] == single["pixel_acc"]
        assert double["per_class_iou"] == single["per_class_iou"]
        order = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
        assert list(per_image[name, 2].names) == list(per_image[name, 1].names) == order
        assert np.array_equal(per_image[name, 2].intersection, per_image[name, 1].intersection)
        assert np.array_equal(per_image[name, 2].union, per_image[name, 1].union)
        assert np.array_equal(per_image[name, 2].confusion, per_image[name, 1].confusion)
        # the first images' predictions (eval.qualitative_images, 4 by default), gathered from both ranks
        shown = {devices: {p.name: p.read_bytes() for p in (tmp_path / f"eval-{name}-{devices}.predictions" / "mIoU")
                           .iterdir()} for devices in (1, 2)}
        assert shown[2] == shown[1] and sorted(shown[1]) == sorted(f"{n}.png" for n in order[:4])

