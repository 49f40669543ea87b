"""Two-process DDP (gloo, CPU) evaluation gives exactly the single-process metrics on an odd-length split."""
import json
import os
import shutil
import subprocess
import sys

import pytest

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
    checkpoint = run_fit(tmp_path, "v3", "model.backbone=resnet50", wandb_mode="disabled") / "checkpoints" / "last.ckpt"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}
    common = [sys.executable, "-m", "deeplab_lit.evaluate", "--checkpoint", str(checkpoint),
              f"--data.root={odd_split}", "--trainer.accelerator=cpu"]
    reports = {}
    for devices, extra in [(1, []), (2, ["--trainer.strategy=ddp"])]:
        out = tmp_path / f"eval{devices}.json"
        result = subprocess.run([*common, f"--trainer.devices={devices}", *extra, "--json", str(out)],
                                capture_output=True, text=True, env=env, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        reports[devices] = json.loads(out.read_text())
    single, double = reports[1]["results"]["mIoU"], reports[2]["results"]["mIoU"]
    assert double["mIoU"] == single["mIoU"]
    assert double["pixel_acc"] == single["pixel_acc"]
    assert double["per_class_iou"] == single["per_class_iou"]
