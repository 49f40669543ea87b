"""The CRF parameter search on a real (2-step) checkpoint: grid, fine stage, outputs, sweep mode."""
import csv
import json

import numpy as np
import pytest
import yaml

from deeplab_lit.crf_validation import confusion, fine_ranges, grid, miou_from_confusion
from test_fit import cli, run_fit


def test_confusion_and_miou_match_a_direct_count():
    labels = np.array([[0, 1, 1], [2, 2, 0]])
    masks = np.array([[0, 1, 255], [2, 1, 0]])
    matrix = confusion(labels, masks, 3)
    assert matrix.tolist() == [[2, 0, 0], [0, 1, 1], [0, 0, 1]]  # rows: truth, columns: prediction
    assert miou_from_confusion(matrix) == pytest.approx(np.mean([1.0, 0.5, 0.5]))


def test_grids():
    points = grid({"bi_w": [3, 4], "bi_xy_std": [30], "bi_rgb_std": [3, 5]}, {"pos_w": 3})
    assert points == [
        {"pos_w": 3, "bi_w": 3, "bi_xy_std": 30, "bi_rgb_std": 3}, {"pos_w": 3, "bi_w": 3, "bi_xy_std": 30, "bi_rgb_std": 5},
        {"pos_w": 3, "bi_w": 4, "bi_xy_std": 30, "bi_rgb_std": 3}, {"pos_w": 3, "bi_w": 4, "bi_xy_std": 30, "bi_rgb_std": 5},
    ]
    assert fine_ranges({"bi_w": 4, "bi_xy_std": 50, "bi_rgb_std": 1}) == {
        "bi_w": [3.0, 3.5, 4.0, 4.5, 5.0], "bi_xy_std": [40.0, 45.0, 50.0, 55.0, 60.0], "bi_rgb_std": [1.0, 2.0, 3.0]
    }


@pytest.mark.slow
def test_search_end_to_end_and_sweep_mode(tmp_path):
    checkpoint = run_fit(tmp_path, "largefov", "crf.iterations=2", wandb_mode="disabled") / "checkpoints" / "last.ckpt"
    out = tmp_path / "search"
    result = cli("deeplab_lit.crf.search", "--checkpoint", str(checkpoint), "--images", "2", "--out", str(out),
                 "--bi-w", "3", "5", "--bi-xy-std", "30", "--bi-rgb-std", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "crf_search.csv")))
    coarse = [r for r in rows if r["stage"] == "coarse"]
    assert len(coarse) == 2 and {float(r["bi_w"]) for r in coarse} == {3.0, 5.0}
    assert len(rows) > 2 and all(float(r["pos_w"]) == 3.0 and float(r["pos_xy_std"]) == 3.0 for r in rows)  # fine stage; w2, σγ fixed
    report = json.loads((out / "crf_search.json").read_text())
    assert report["images"] == 2 and report["best"]["miou"] == max(float(r["miou"]) for r in rows)
    best = yaml.safe_load((out / "crf_best.yaml").read_text())["crf"]
    assert best["bi_w"] == report["best"]["bi_w"] and best["iterations"] == 2
    assert list(out.glob("crf_unaries_*.npz"))  # cached for the next run, as arrays (never a pickle)

    evaluated = cli("deeplab_lit.evaluate", "--checkpoint", str(checkpoint), "--crf-params", str(out / "crf_best.yaml"),
                    "--crf.enabled=true", "--trainer.limit_val_batches=2", "--json", str(tmp_path / "e.json"))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads((tmp_path / "e.json").read_text())["config"]["crf"]["bi_w"] == best["bi_w"]

    single = cli("deeplab_lit.crf.search", "--checkpoint", str(checkpoint), "--images", "2", "--out", str(out),
                 "--crf.bi_w=5", "--crf.bi_xy_std=30", "--crf.bi_rgb_std=3")
    assert single.returncode == 0, single.stderr[-2000:]
    line = json.loads(single.stdout.strip().splitlines()[-1])
    expected = next(float(r["miou"]) for r in coarse if float(r["bi_w"]) == 5.0)
    assert line["val/mIoU_crf"] == pytest.approx(expected, abs=1e-9)

    partial = cli("deeplab_lit.crf.search", "--checkpoint", str(checkpoint), "--crf.bi_w=5")
    assert partial.returncode == 2 and "give all three" in partial.stderr
