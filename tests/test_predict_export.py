"""Using a trained model outside training: the files of a finished run, a quiet console, predict (formats,
sizes, corrupt input, VOC and Cityscapes layouts), the load API, export parity, best-on-val labelling."""
from __future__ import annotations

import csv
import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_fit import FAST, cli


def exported_runner(fmt, path):
    """The exported graph as a function: a float N x 3 x H x W tensor -> logits as a numpy array."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda image: session.run(["logits"], {"image": image.numpy()})[0]
    loaded = torch.jit.load(str(path))
    return lambda image: loaded(image).numpy()


ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
SYNTHETIC = ["background", "disc", "square", "triangle", "star", "cross"]
# What must never reach a user's console (see the issue: tips, advertisements, warnings our arguments cause).
NOISE = ["Tip:", "litlogger", "litmodels", "anonymous setting", "weights_only", "was not set", "Deprecat",
         "deprecated", "Epoch 0/-2", "v_num", "Warning", "WARNING", "Traceback"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A real 2-step fit of v3+ (ResNet-50) as a user runs it: a subprocess, offline W&B, console captured."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    args = [sys.executable, "-m", "deeplab_lit.fit", "--experiment", "v3plus", "--run-dir", str(run_dir),
            *[f"--{o}" for o in FAST], "--model.backbone=resnet50", "--wandb.mode=offline",
            "--trainer.limit_val_batches=1", "--eval.protocols=[]"]  # the main protocol only: a shorter test
    result = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


@pytest.fixture(scope="module")
def model_file(finished_run):
    return finished_run[0] / "checkpoints" / "model.pt"


def test_the_console_of_a_run_is_free_of_noise(finished_run):
    _, result = finished_run
    for text in NOISE:
        assert text not in result.stdout and text not in result.stderr, (text, result.stdout, result.stderr)
    assert result.stderr.strip() == "", result.stderr
    assert "train step" in result.stdout and "2/2" in result.stdout and "val mIoU:" in result.stdout
    assert "final weights, step 2 (model.pt)" in result.stdout and "W&B offline run:" in result.stdout


def test_the_files_of_a_finished_run(finished_run):
    run_dir, _ = finished_run
    checkpoints = run_dir / "checkpoints"
    # one full state for resuming, one weights-only model file: no second full copy of the same step
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "model.pt", "per_image.npz", "predictions", "summary.json"]
    assert {"config.yaml", "metrics.csv", "wandb", "wandb_id", "checkpoints"} <= {p.name for p in run_dir.iterdir()}
    last, model = checkpoints / "last.ckpt", checkpoints / "model.pt"
    assert model.stat().st_size < 0.51 * last.stat().st_size  # no optimizer state, no loops
    content = torch.load(model, weights_only=True)
    assert content["format"] == "deeplab_lit.model/1" and content["global_step"] == 2
    assert content["deeplab_lit"]["weights"] == "final" and content["deeplab_lit"]["class_names"] == SYNTHETIC
    assert not any(k.startswith("model.") for k in content["state_dict"])
    full = torch.load(last, weights_only=True)
    for key, value in content["state_dict"].items():  # the same step's weights
        assert torch.equal(value, full["state_dict"][f"model.{key}"]), key
    summary = json.loads((checkpoints / "summary.json").read_text())
    assert summary["checkpoint"] == str(model) and summary["weights"] == "final" and "best_on_val" not in summary
    assert {(r["checkpoint"], r["step"]) for r in summary["results"].values()} == {(str(model), 2)}
    with open(run_dir / "metrics.csv") as stream:
        rows = list(csv.DictReader(stream))
    columns = set(rows[0])
    assert {"step", "epoch", "train/loss", "lr-SGD", "val/mIoU", "val/pixel_acc", "val/iou/disc"} <= columns
    assert not any(c.startswith("lr-SGD/") for c in columns)  # v3+: every group has the base rate
    assert sum(bool(r["train/loss"]) for r in rows) == 2 and any(r["val/mIoU"] for r in rows)
    wandb_log = next((run_dir / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    assert b"final/iou_per_class" in wandb_log and b"final/confusion_matrix" in wandb_log


def test_evaluate_accepts_the_model_file(model_file, tmp_path):
    out = tmp_path / "eval.json"
    result = cli("deeplab_lit.evaluate", "--checkpoint", str(model_file), "--trainer.limit_val_batches=1",
                 "--eval.protocols=[]", "--json", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "final weights, step 2" in result.stdout
    record = json.loads(out.read_text())
    assert record["weights"] == "final" and record["results"]["mIoU"]["checkpoint"] == str(model_file)


# ---------------------------------------------------------------------------------------------------
# The load API and predict


def write_images(directory: Path) -> dict[str, np.ndarray]:
    """Three sizes and three kinds: RGB JPEG, greyscale PNG, RGBA PNG; returns the RGB each becomes."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    rgb = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    grey = rng.integers(0, 255, (97, 65), dtype=np.uint8)
    rgba = rng.integers(0, 255, (65, 81, 4), dtype=np.uint8)
    Image.fromarray(rgb).save(directory / "a_rgb.png")
    Image.fromarray(grey, mode="L").save(directory / "b_grey.png")
    Image.fromarray(rgba, mode="RGBA").save(directory / "c_rgba.png")
    return {"a_rgb": rgb, "b_grey": np.repeat(grey[..., None], 3, 2), "c_rgba": rgba[..., :3]}


def test_the_load_api_in_three_lines(model_file):
    from deeplab_lit import load_checkpoint
    from deeplab_lit.models import DeepLab

    seg = load_checkpoint(model_file, device="cpu")
    assert isinstance(seg.model, DeepLab) and not seg.model.training and seg.class_names == SYNTHETIC
    rgb = np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    labels = seg.predict(rgb)
    assert labels.shape == (50, 70) and labels.dtype == np.uint8 and labels.max() < 6
    assert np.array_equal(seg.predict(rgb[..., 0]), seg.predict(np.repeat(rgb[..., :1], 3, 2)))  # greyscale
    probs = seg.predict_probs(rgb)
    assert probs.shape == (6, 50, 70) and np.allclose(probs.sum(0), 1, atol=1e-5)
    assert np.array_equal(probs.argmax(0), labels)
    batch = seg.predict_batch([rgb, rgb[:40, :33], rgb])  # two sizes: each image as if alone
    assert all(np.array_equal(a, b) for a, b in zip(batch, [labels, seg.predict(rgb[:40, :33]), labels]))
    # last.ckpt holds the same step's weights: the same labels
    assert np.array_equal(load_checkpoint(model_file.parent / "last.ckpt").predict(rgb), labels)
    light = subprocess.run([sys.executable, "-c", "import deeplab_lit, sys; print('torch' in sys.modules)"],
                           capture_output=True, text=True, env=ENV)
    assert light.stdout.strip() == "False"  # `import deeplab_lit` stays light


def test_predict_formats_at_each_images_size_equal_the_load_api(model_file, tmp_path):
    from deeplab_lit import load_checkpoint
    from deeplab_lit.predict import main as predict_main
    from datamodules.readers import VOC_PALETTE

    images = write_images(tmp_path / "in")
    seg = load_checkpoint(model_file)
    expected = {name: seg.predict(rgb) for name, rgb in images.items()}
    for fmt in ("index", "color", "overlay"):
        out = tmp_path / fmt
        assert predict_main(["--checkpoint", str(model_file), "--input", str(tmp_path / "in"), "--out", str(out),
                             "--format", fmt, "--batch-size", "2", "--device", "cpu"]) == 0
        assert sorted(p.name for p in out.iterdir()) == [f"{name}.png" for name in sorted(images)]
        for name, rgb in images.items():
            with Image.open(out / f"{name}.png") as png:
                assert png.size == (rgb.shape[1], rgb.shape[0])
                if fmt == "index":
                    assert png.mode == "P" and np.array_equal(np.asarray(png), expected[name])
                    assert np.array_equal(np.asarray(png.getpalette()).reshape(-1, 3)[:6], VOC_PALETTE[:6])
                elif fmt == "color":
                    assert png.mode == "RGB" and np.array_equal(np.asarray(png), VOC_PALETTE[expected[name]])
                else:
                    blend = np.rint(0.5 * rgb.astype(np.float32) + 0.5 * VOC_PALETTE[expected[name]]).astype(np.uint8)
                    assert png.mode == "RGB" and np.abs(np.asarray(png).astype(int) - blend).max() <= 1
    # a single file and a glob give the same output names
    assert predict_main(["--checkpoint", str(model_file), "--input", str(tmp_path / "in" / "b_grey.png"),
                         "--out", str(tmp_path / "one")]) == 0
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["b_grey.png"]
    assert predict_main(["--checkpoint", str(model_file), "--input", str(tmp_path / "in" / "*_r*.png"),
                         "--out", str(tmp_path / "glob")]) == 0
    assert sorted(p.name for p in (tmp_path / "glob").iterdir()) == ["a_rgb.png", "c_rgba.png"]


def test_a_corrupt_image_is_one_line_exit_2_and_earlier_outputs_are_complete(model_file, tmp_path):
    images = write_images(tmp_path / "in")
    (tmp_path / "in" / "b_grey.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    result = cli("deeplab_lit.predict", "--checkpoint", str(model_file), "--input", str(tmp_path / "in"), "--out",
                 str(out), "--batch-size", "1")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ") and "b_grey.png" in result.stderr
    assert [p.name for p in out.iterdir()] == ["a_rgb.png"]  # written before it, complete; no temporary files
    with Image.open(out / "a_rgb.png") as png:
        assert png.size == (images["a_rgb"].shape[1], images["a_rgb"].shape[0])
        png.load()


def test_predict_refuses_what_does_not_fit(model_file, tmp_path):
    cases = [
        (["--input", str(tmp_path / "missing")], "no such file or directory"),
        (["--input", str(tmp_path), "--format", "voc"], "needs a model of the 21 VOC classes"),
        (["--split", "test"], "test.txt"),
        (["--input", str(tmp_path), "--model.output_stride=8"], "changes the trained network"),
    ]
    write_images(tmp_path)
    for args, message in cases:
        result = cli("deeplab_lit.predict", "--checkpoint", str(model_file), "--out", str(tmp_path / "o"), *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr, result.stderr


def untrained_model_file(path: Path, data: list[str]) -> Path:
    """A model file of a v3+ network with random weights for another dataset (layout tests need no training)."""
    from deeplab_lit.checkpoints import save_model_file
    from deeplab_lit.config import resolve_experiment
    from deeplab_lit.models import build_model

    spec = resolve_experiment("v3plus", ["model.backbone=resnet50", "model.pretrained=none", *data])
    torch.manual_seed(0)
    network = build_model(spec.config.model, spec.dataset.num_classes).eval()
    return save_model_file(path, network, spec, step=0)


def test_voc_test_split_in_the_evaluation_servers_layout(tmp_path):
    from deeplab_lit.prediction import voc_competition
    from deeplab_lit.config import resolve_experiment

    root = tmp_path / "voc"
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    ids = ["2008_000006", "2008_000011"]
    (voc / "ImageSets" / "Segmentation" / "test.txt").write_text("\n".join(ids) + "\n")
    sizes = {"2008_000006": (48, 64), "2008_000011": (70, 33)}
    for name, (h, w) in sizes.items():
        Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
    model = untrained_model_file(tmp_path / "voc_model.pt", ["data.name=voc_aug", f"data.root={root}"])
    out = tmp_path / "out"
    result = cli("deeplab_lit.predict", "--checkpoint", str(model), "--split", "test", "--format", "voc",
                 "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    folder = out / "results" / "VOC2012" / "Segmentation" / "comp6_test_cls"
    assert sorted(p.name for p in folder.iterdir()) == [f"{i}.png" for i in ids]
    for name, (h, w) in sizes.items():
        with Image.open(folder / f"{name}.png") as png:
            assert png.mode == "P" and png.size == (w, h) and np.asarray(png).max() < 21
    assert "tar -czf results.tgz" in result.stdout
    # comp5 = VOC 2012 data only (from scratch on `voc`); anything with outside data is comp6
    assert voc_competition(resolve_experiment("v3plus", ["data.name=voc", "model.pretrained=none"])) == "comp5"
    assert voc_competition(resolve_experiment("v3plus", ["data.name=voc"])) == "comp6"  # ImageNet weights


def test_cityscapes_test_split_as_the_benchmark_wants(tmp_path):
    from datamodules.cityscapes import LABEL_TO_TRAIN_ID, TRAIN_ID_TO_LABEL_ID

    root = tmp_path / "cityscapes"
    frames = {"berlin": "berlin_000000_000019", "bonn": "bonn_000004_000019"}
    for city, frame in frames.items():
        (root / "leftImg8bit" / "test" / city).mkdir(parents=True)
        Image.fromarray(np.full((32, 64, 3), 90, np.uint8)).save(
            root / "leftImg8bit" / "test" / city / f"{frame}_leftImg8bit.png")
    (root / "gtFine").mkdir()
    model = untrained_model_file(tmp_path / "cs_model.pt", ["data.name=cityscapes", f"data.root={root}"])
    out = tmp_path / "out"
    result = cli("deeplab_lit.predict", "--checkpoint", str(model), "--split", "test", "--format", "cityscapes",
                 "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    evaluated = set(TRAIN_ID_TO_LABEL_ID[:19].tolist())
    assert TRAIN_ID_TO_LABEL_ID[0] == 7 and TRAIN_ID_TO_LABEL_ID[18] == 33  # road, bicycle
    assert np.array_equal(LABEL_TO_TRAIN_ID[TRAIN_ID_TO_LABEL_ID[:19]], np.arange(19))
    names = [p for p in out.rglob("*.png")]
    for city, frame in frames.items():
        # what cityscapesscripts' evalPixelLevelSemanticLabeling looks for: one <city>_<seq>_<frame>*.png
        matches = [p for p in names if fnmatch.fnmatch(p.name, f"{frame}*.png")]
        assert [p.relative_to(out).as_posix() for p in matches] == [f"{city}/{frame}_labelIds.png"]
        with Image.open(matches[0]) as png:
            assert png.mode == "L" and png.size == (64, 32) and set(np.unique(np.asarray(png))) <= evaluated


# ---------------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch_at_two_sizes(model_file, tmp_path, fmt):
    from deeplab_lit import load_checkpoint
    from deeplab_lit.export import main as export_main
    from deeplab_lit.inference import predict_logits_whole

    out = tmp_path / f"model.{fmt}"
    assert export_main(["--checkpoint", str(model_file), "--format", fmt, "--out", str(out)]) == 0
    seg = load_checkpoint(model_file)
    run = exported_runner(fmt, out)
    rng = np.random.default_rng(2)
    for height, width in [(70, 97), (97, 65)]:  # neither the traced size nor a stride multiple
        rgb = rng.integers(0, 255, (2, height, width, 3), dtype=np.uint8)
        with torch.no_grad():
            expected = predict_logits_whole(seg.model, seg.normalise(torch.from_numpy(rgb))).numpy()
        got = run(torch.from_numpy(rgb).permute(0, 3, 1, 2).float())
        assert got.shape == (2, 6, height, width)
        # float32 logits of magnitude ~60 differ in their last bits between runtimes (onnxruntime: 1.2e-4 at
        # most, ~30 ulp); the probabilities agree within 1e-4, the logits within 1e-6 of their range
        probs_got, probs_expected = (torch.from_numpy(a).softmax(1).numpy() for a in (got, expected))
        assert np.abs(probs_got - probs_expected).max() < 1e-4, np.abs(probs_got - probs_expected).max()
        assert np.abs(got - expected).max() < 1e-6 * max(1.0, float(np.abs(expected).max())) * 5
        agreement = (got[0].argmax(0) == seg.predict(rgb[0])).mean()
        assert agreement == 1.0 if fmt == "torchscript" else agreement > 0.999


# ---------------------------------------------------------------------------------------------------
# Best-on-val: an option, labelled, never the reported number


def test_keep_best_on_val_is_labelled_and_never_reported(tmp_path, capsys):
    from deeplab_lit.config import resolve_experiment
    from deeplab_lit.training import train

    overrides = [*FAST, "model.backbone=resnet50", "trainer.max_steps=2", "trainer.val_check_interval=1",
                 "trainer.limit_val_batches=1", "eval.protocols=[]", "wandb.mode=disabled", "keep_best_on_val=true"]
    spec = resolve_experiment("v3plus", overrides)
    assert spec.run_tag == resolve_experiment("v3plus", overrides[:-1]).run_tag  # infrastructure: same run
    run_dir = tmp_path / "run"
    assert train(spec, run_dir=str(run_dir)) == 0
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best-on-val.pt", "last.ckpt", "model.pt", "per_image.npz", "predictions",
                                                         "summary.json"]
    best = torch.load(checkpoints / "best-on-val.pt", weights_only=True)
    assert best["deeplab_lit"]["weights"] == "best-on-val" and best["global_step"] in (1, 2)
    summary = json.loads((checkpoints / "summary.json").read_text())
    assert summary["best_on_val"]["checkpoint"] == str(checkpoints / "best-on-val.pt")
    assert summary["best_on_val"]["step"] == best["global_step"] and "never compared" in summary["best_on_val"]["note"]
    assert {r["checkpoint"] for r in summary["results"].values()} == {str(checkpoints / "model.pt")}
    assert "best-on-val (selected on val, not comparable with the paper)" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_of_a_v2_msc_network_follows_the_input_size(tmp_path, fmt):
    """The v2 MSC pyramid's scaled sizes are graph operations, not the traced size frozen."""
    from deeplab_lit.checkpoints import save_model_file
    from deeplab_lit.config import resolve_experiment
    from deeplab_lit.exporting import export, exportable
    from deeplab_lit import load_checkpoint
    from deeplab_lit.inference import predict_logits_whole
    from deeplab_lit.models import build_model

    spec = resolve_experiment("v2_r101_msc", ["model.backbone=resnet50", "model.pretrained=none",
                                              "data.name=synthetic", "data.root="])
    torch.manual_seed(0)
    model = save_model_file(tmp_path / "msc.pt", build_model(spec.config.model, 6).eval(), spec, step=0)
    seg = load_checkpoint(model)
    path = export(exportable(seg), tmp_path / f"msc.{fmt}", fmt)
    run = exported_runner(fmt, path)
    for height, width in [(70, 97), (97, 65)]:
        rgb = np.random.default_rng(3).integers(0, 255, (1, height, width, 3), dtype=np.uint8)
        with torch.no_grad():
            expected = predict_logits_whole(seg.model, seg.normalise(torch.from_numpy(rgb))).numpy()
        got = run(torch.from_numpy(rgb).permute(0, 3, 1, 2).float())
        probs_got, probs_expected = (torch.from_numpy(a).softmax(1).numpy() for a in (got, expected))
        assert got.shape == expected.shape and np.abs(probs_got - probs_expected).max() < 1e-4


def test_metrics_csv_keeps_the_rows_up_to_the_resumed_step(tmp_path):
    """metrics.csv: one row per logging call, `step` first; a resumed run continues after its checkpoint's step."""
    from deeplab_lit.trainer import csv_metrics_logger

    first = csv_metrics_logger(tmp_path)
    for step in range(4):
        first.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    first.log_metrics({"val/mIoU": 0.5}, 3)
    first.finalize("interrupted")
    resumed = csv_metrics_logger(tmp_path, resume_step=1)  # last.ckpt was at step 1: steps 2, 3 are trained again
    resumed.log_metrics({"train/loss": 0.1, "lr-SGD": 0.01}, 2)
    resumed.finalize("finished")
    with open(tmp_path / "metrics.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert [r["step"] for r in rows] == ["0", "1", "2"]
    assert list(rows[0]) == ["step", "lr-SGD", "train/loss"]  # val/mIoU was logged after step 1 only
    assert rows[2]["lr-SGD"] == "0.01" and rows[0]["lr-SGD"] == "" and rows[1]["train/loss"] == "0.5"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temporary file left
