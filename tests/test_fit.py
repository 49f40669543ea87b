"""`fit`, `evaluate` and `summary` end to end on the synthetic dataset (real networks, tiny crops)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from deeplab_lit.config import load_experiment, resolve_experiment
from deeplab_lit.errors import UserError
from deeplab_lit.fit import main as fit_main
from deeplab_lit.training import train

FAST = [
    "data.name=synthetic",
    "data.root=",
    "model.pretrained=none",
    "data.crop_size=65",
    "data.batch_size=2",
    "data.num_workers=0",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "eval.canvas=[]",  # v3/v3+ evaluate on a 513x513 canvas (TF eval_crop_size): the CPU tests use the image size
]


def run_fit(tmp_path, name, *extra, wandb_mode="offline"):
    run_dir = tmp_path / name
    args = ["--experiment", name, "--run-dir", str(run_dir), *[f"--{o}" for o in [*FAST, f"wandb.mode={wandb_mode}", *extra]]]
    assert fit_main(args) == 0
    return run_dir


# v1, v2 with MSC, v3, v3+: each generation's recipe, 2 steps, checkpoint + summary + offline W&B run.
@pytest.mark.parametrize(
    "name, extra",
    [
        ("largefov", ["crf.iterations=2"]),
        ("v2_r101_msc", ["model.backbone=resnet50"]),
        pytest.param("v3", ["model.backbone=resnet50"], marks=pytest.mark.slow),  # four protocols, MS + flip
        pytest.param("v3plus", ["model.backbone=resnet50"], marks=pytest.mark.slow),
    ],
)
def test_fit_two_steps_of_each_generation(tmp_path, name, extra):
    run_dir = run_fit(tmp_path, name, *extra)
    checkpoints = run_dir / "checkpoints"
    # The full state for resuming, the final weights, the record: no second full copy of the same step.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "model.pt", "per_image.npz", "predictions", "summary.json"]
    summary = json.loads((checkpoints / "summary.json").read_text())
    assert summary["experiment"] == name and summary["steps"] == 2
    assert summary["weights"] == "final" and summary["checkpoint"] == str(checkpoints / "model.pt")
    assert all(r["checkpoint"] == str(checkpoints / "model.pt") and r["step"] == 2 for r in summary["results"].values())
    assert 0 <= summary["metrics"]["val/mIoU"] <= 1
    assert summary["protocol"]["train_output_stride"] == load_experiment(name).model.output_stride
    assert summary["protocol"]["effective_batch_size"] == 2
    assert summary["paper"]["miou"] == load_experiment(name).paper.miou
    assert set(summary["per_class_iou"]) == {"background", "disc", "square", "triangle", "star", "cross"}
    if name == "largefov":  # CRF rows report before and after
        assert set(summary["metrics"]) >= {"val/mIoU", "val/mIoU_crf"}
    if name == "v3":  # v3 Table 6 protocols, each under its own name
        assert set(summary["metrics"]) >= {"val/mIoU", "val/mIoU_os8", "val/mIoU_os8_ms", "val/mIoU_os8_ms_flip"}
    checkpoint = torch.load(checkpoints / "last.ckpt", weights_only=True)  # plain data and tensors only
    assert checkpoint["deeplab_lit"]["config"]["name"] == name and checkpoint["global_step"] == 2
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


@pytest.mark.slow
def test_wandb_disabled_leaves_no_files(tmp_path):
    run_dir = run_fit(tmp_path, "v3", "model.backbone=resnet50", "trainer.limit_val_batches=1", wandb_mode="disabled")
    assert not (run_dir / "wandb").exists() and not (run_dir / "wandb_id").exists()
    assert not Path("wandb").exists()


class Preempt(Callback):
    """Sends this process SIGTERM after `at` optimizer steps, as a cluster's preemption would."""

    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_resumes_to_identical_weights(tmp_path):
    overrides = [*FAST, "model.backbone=resnet50", "trainer.max_steps=4", "trainer.val_check_interval=4",
                 "trainer.limit_val_batches=1", "wandb.mode=disabled", "seed=3"]
    train(resolve_experiment("v3", overrides), run_dir=str(tmp_path / "straight"))

    interrupted = tmp_path / "interrupted"
    with pytest.raises(SystemExit):
        train(resolve_experiment("v3", overrides), run_dir=str(interrupted), callbacks=[Preempt(2)])
    saved = torch.load(interrupted / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2
    train(resolve_experiment("v3", overrides), run_dir=str(interrupted))  # finds last.ckpt, resumes
    resumed, straight = weights(interrupted), weights(tmp_path / "straight")
    assert torch.load(interrupted / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


class Diverge(Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == 1:
            batch["image"][:] = float("nan")


def test_nan_loss_stops_with_a_message_naming_the_step(tmp_path):
    overrides = [*FAST, "model.backbone=resnet50", "trainer.max_steps=3", "trainer.val_check_interval=1",
                 "trainer.limit_val_batches=1", "wandb.mode=disabled"]
    with pytest.raises(UserError, match=r"loss became nan at step 1; stopping \(the last good checkpoint is kept\)"):
        train(resolve_experiment("v3", overrides), run_dir=str(tmp_path / "nan"), callbacks=[Diverge()])
    kept = torch.load(tmp_path / "nan" / "checkpoints" / "last.ckpt", weights_only=True)
    assert kept["global_step"] == 1


def cli(*args):
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def v3plus_checkpoint(tmp_path_factory):
    run_dir = run_fit(tmp_path_factory.mktemp("eval"), "v3plus", "model.backbone=resnet50", wandb_mode="disabled")
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_evaluate_end_to_end_with_protocol_overrides(v3plus_checkpoint, tmp_path):
    out = tmp_path / "eval.json"
    result = cli("deeplab_lit.evaluate", "--checkpoint", str(v3plus_checkpoint), "--eval.output_stride=8",
                 "--eval.scales=[0.75, 1.0]", "--eval.flip=true", "--trainer.limit_val_batches=3", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "mIoU" in result.stdout and "pixel acc" in result.stdout and "background" in result.stdout
    report = json.loads(out.read_text())
    assert report["results"]["mIoU"]["protocol"] == {
        "output_stride": 8, "scales": [0.75, 1.0], "flip": True, "mode": "whole", "crf": False
    }
    assert 0 <= report["metrics"]["val/mIoU"] <= 1


@pytest.mark.slow
def test_evaluate_bad_inputs_exit_2_with_one_line(v3plus_checkpoint, tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    cases = [
        (["--checkpoint", str(tmp_path / "missing.ckpt")], "missing.ckpt: no such file"),
        (["--checkpoint", str(garbage)], "cannot be read as a checkpoint"),
        (["--checkpoint", str(v3plus_checkpoint), "--experiment", "v3"], "was trained for experiment 'v3plus', not 'v3'"),
        (["--checkpoint", str(v3plus_checkpoint), "--model.output_stride=8"], "changes the trained network"),
    ]
    for args, message in cases:
        result = cli("deeplab_lit.evaluate", *args)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr


def test_summary_end_to_end():
    result = cli("deeplab_lit.summary", "--experiment", "largefov", "--json", "--sizes", "65")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["train_output_stride"] == 8 and info["atrous_rates"]["head"] == [12]
    assert info["parameters"] > 20_000_000 and info["gmacs"]["65x65"] > 0
    assert "rate 12" in info["field_of_view"]


@pytest.mark.slow
def test_quick_start_demo_learns(tmp_path):
    """README command 1: the demo trains a real v3+ from scratch on the synthetic set to mIoU >= 0.5."""
    run_dir = tmp_path / "demo"
    result = cli("deeplab_lit.fit", "--experiment", "demo", "--run-dir", str(run_dir), "--wandb.mode=disabled")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "checkpoints" / "summary.json").read_text())
    assert summary["steps"] == load_experiment("demo").trainer["max_steps"]
    assert summary["metrics"]["val/mIoU"] >= 0.5, summary["per_class_iou"]
    assert "mIoU" in result.stdout and "cross" in result.stdout  # the per-class table is printed


@pytest.mark.slow
def test_evaluate_logs_into_the_checkpoints_offline_wandb_run(tmp_path):
    run_dir = run_fit(tmp_path, "v3", "model.backbone=resnet50", "trainer.limit_val_batches=1")
    run_id = (run_dir / "wandb_id").read_text().strip()
    result = cli("deeplab_lit.evaluate", "--checkpoint", str(run_dir / "checkpoints" / "last.ckpt"),
                 "--eval.output_stride=8", "--trainer.limit_val_batches=1", "--wandb.resume=true")
    assert result.returncode == 0, result.stderr[-2000:]
    runs = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2  # the training run and its resumed evaluation, under the same run id
