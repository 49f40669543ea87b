"""Real tiny runs -> the dashboard -> a screenshot in headless Chromium (docs/dashboard.png).

    python scripts/dashboard_screenshot.py [--runs runs/dashboard] [--out report/dashboard] [--steps 120]
                                           [--skip-training] [--shot docs/dashboard.png]

Trains, on the embedded synthetic set with the quick-start demo's CPU recipe (ResNet-50 from scratch,
crop 81, batch 8, lr 0.02, 80 steps), the rows 8 and 48 of v3+ Table 1 (decoder 1x1 width) with seeds
0 and 1, plus the demo itself at 80 steps: five short runs (minutes each on 2 CPU cores). Each run keeps a CSV log
(Lightning's CSVLogger under `<run dir>/csv/`) when its Trainer has none, so the curves panel has data
offline. Then builds the report (`python -m deeplab_lit.report --runs ... --confusion
v3plus_table1_decoder/1`), checks in Chromium that no image of the page is broken, and saves the top of
the page as a palette PNG (under 300 KB).

Runs on the synthetic set are never compared with the papers' VOC numbers: they fill v3+ Table 1 in
the dashboard's "On the synthetic set" section.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CPU_RECIPE = ["model.backbone=resnet50", "model.multi_grid=[1, 2, 4]", "model.pretrained=none",
              "model.bn_momentum=0.1", "data.name=synthetic", "data.root=", "data.crop_size=81", "data.batch_size=8",
              "data.num_workers=0", "data.scale_range=[0.75, 1.5]", "optim.lr=0.02", "eval.protocols=[]",
              "wandb.mode=disabled", "trainer.log_every_n_steps=5"]


def csv_log_callback():
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import CSVLogger

    class KeepCSVLog(Callback):
        """Adds Lightning's CSVLogger for the training of a run whose Trainer has none, and takes it away
        (written) when training ends: `training.train` treats every logger as a W&B one afterwards."""

        added = None

        def on_fit_start(self, trainer, pl_module):
            if not any(isinstance(logger, CSVLogger) for logger in trainer.loggers):
                self.added = CSVLogger(trainer.default_root_dir, name="csv")
                trainer.loggers = [*trainer.loggers, self.added]

        def on_fit_end(self, trainer, pl_module):
            if self.added is not None:
                self.added.finalize("success")
                trainer.loggers = [logger for logger in trainer.loggers if logger is not self.added]

    return KeepCSVLog()


def train_runs(runs: Path, steps: int) -> None:
    from deeplab_lit.config import resolve_experiment
    from deeplab_lit.training import train

    common = [*CPU_RECIPE, f"output_dir={runs}", f"trainer.max_steps={steps}",
              f"trainer.val_check_interval={max(1, steps // 4)}"]
    plan = [("v3plus_1conv", [f"model.decoder_channels={width}", f"seed={seed}"])
            for width in (48, 8) for seed in (0, 1)]
    plan.append(("demo", ["wandb.mode=disabled", f"output_dir={runs}", "data.num_workers=0",
                          f"trainer.max_steps={steps}", f"trainer.val_check_interval={max(1, steps // 4)}",
                          "trainer.log_every_n_steps=5"]))
    for experiment, extra in plan:
        overrides = [*common, *extra] if experiment != "demo" else extra
        spec = resolve_experiment(experiment, overrides)
        if (spec.default_run_dir() / "checkpoints" / "summary.json").is_file():
            print(f"have {spec.default_run_dir()}")
            continue
        print(f"training {experiment} {' '.join(extra)} -> {spec.default_run_dir()}", flush=True)
        assert train(spec, callbacks=[csv_log_callback()]) == 0


def shrink(png: Path, limit: int = 300_000) -> int:
    """Quantise the screenshot to a palette PNG (and narrow it if needed) until it is under `limit` bytes."""
    from PIL import Image

    image = Image.open(png).convert("RGB")
    for scale in (1.0, 0.85, 0.7, 0.6, 0.5):
        resized = image if scale == 1.0 else image.resize((int(image.width * scale), int(image.height * scale)),
                                                           Image.LANCZOS)
        for colours in (128, 64, 32):
            buffer = io.BytesIO()
            resized.quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
                buffer, format="PNG", optimize=True)
            if buffer.tell() <= limit:
                png.write_bytes(buffer.getvalue())
                return buffer.tell()
    raise SystemExit(f"cannot get {png} under {limit} bytes")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=str(REPO / "runs" / "dashboard"))
    parser.add_argument("--out", default=str(REPO / "report" / "dashboard"))
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU)")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--shot", default=str(REPO / "docs" / "dashboard.png"))
    parser.add_argument("--height", type=int, default=3000, help="screenshot height in CSS pixels")
    args = parser.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads crawl on a shared CPU
    sys.path.insert(0, str(REPO))
    runs, out = Path(args.runs), Path(args.out)
    if not args.skip_training:
        import torch

        torch.set_num_threads(args.threads)
        train_runs(runs, args.steps)
    from deeplab_lit.report import main as report_main
    from deeplab_lit.report.browser import check_images, find_chromium, screenshot

    assert report_main(["--runs", str(runs), "--out", str(out), "--confusion", "v3plus_table1_decoder/1"]) == 0
    if find_chromium() is None:
        raise SystemExit("no Chromium: apt-get install chromium (the report is in " + str(out) + ")")
    seen = check_images(out / "report.html")
    print(f"Chromium: {seen['images']} images, broken: {seen['broken'] or 'none'}")
    if seen["broken"]:
        return 1
    shot = screenshot(out / "report.html", Path(args.shot), width=1280, height=args.height)
    print(f"wrote {shot} ({shrink(shot)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
