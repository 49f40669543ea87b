"""Decode + augmentation throughput of one data worker, at the training crops 321 and 513.

    python benchmarks/data.py [--samples 400] [--crops 321 513] [--images 64]

Writes VOC-sized (500x375) JPEGs and palette-PNG masks in VOC layout to a temporary directory
(photo-like detail so they decode about as slowly as VOC's ~100 KB JPEGs), then times, each in a
fresh process so glibc's malloc state is not shared between rows:
  dataset   batches of 10 made by the dataset in a plain loop, glibc default malloc (untuned)
  tuned     the same after the worker set-up (mallopt thresholds, cv2 single thread)
  loader    DataLoader with 1 worker and batch 10, through the real train_dataloader() (the worker
            also writes the batch into shared memory; its CPU time is read from /proc)
Each row gives samples per wall-clock second and per CPU second (of the one process doing the work).
Crop 321 uses v2's scale range 0.5-1.5, crop 513 v3's 0.5-2.0.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

SCALES = {321: (0.5, 1.5), 513: (0.5, 2.0)}


def write_voc_like(root: Path, count: int) -> float:
    """VOC layout with `count` 500x375 images; returns the mean JPEG size in KB."""
    import cv2
    import numpy as np

    from datamodules.readers import write_index_png
    from datamodules.synthetic import draw_example
    from datamodules.voc import write_ids

    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "SegmentationClass").mkdir()
    sizes = []
    for index in range(count):
        rng = np.random.default_rng(index)
        image, labels = draw_example(rng, 500, 375)
        # Fine texture like a photo's, so the JPEG carries as much detail as VOC's (~100 KB).
        grain = cv2.GaussianBlur(rng.normal(0, 60, image.shape).astype(np.float32), (0, 0), 0.65)
        image = np.clip(image + grain, 0, 255).astype(np.uint8)
        path = voc / "JPEGImages" / f"{index:06d}.jpg"
        cv2.imwrite(str(path), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        sizes.append(path.stat().st_size)
        write_index_png(voc / "SegmentationClass" / f"{index:06d}.png", labels)  # classes 0..5 and 255
    ids = [f"{i:06d}" for i in range(count)]
    write_ids(voc / "ImageSets" / "Segmentation" / "train.txt", ids)
    write_ids(voc / "ImageSets" / "Segmentation" / "val.txt", ids)
    return sum(sizes) / len(sizes) / 1024


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), e.g. a DataLoader worker."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(root: str, crop: int, mode: str, samples: int) -> dict[str, float]:
    """Samples per wall-clock second and per CPU second of one configuration (in its own process).

    The CPU figure is what one dedicated core would sustain; it is the one to trust on a machine
    shared with other jobs, where the wall-clock figure depends on the load."""
    import cv2

    from deeplab_lit.config import DataConfig
    from datamodules import build_datamodule
    from datamodules.loaders import tune_malloc

    cfg = DataConfig(name="voc", root=root, crop_size=crop, scale_range=list(SCALES[crop]), batch_size=10,
                     num_workers=1 if mode == "loader" else 0)  # fmt: skip
    dm = build_datamodule(cfg, seed=0)
    dm.setup("fit")
    dataset = dm.train_dataset
    if mode == "loader":
        loader = dm.train_dataloader()
        batches = iter(loader)
        next(batches)  # worker start-up is not throughput
        (worker,) = batches._workers  # persistent: the same process for every epoch
        wall, cpu, seen = time.perf_counter(), _cpu_seconds(worker.pid), 0
        while seen < samples:
            try:
                seen += len(next(batches)["name"])
            except StopIteration:
                batches = iter(loader)
        return {"wall": seen / (time.perf_counter() - wall), "cpu": seen / (_cpu_seconds(worker.pid) - cpu)}
    cv2.setNumThreads(0)  # one core, as in a worker: only malloc differs between dataset and tuned
    if mode == "tuned":
        tune_malloc()
    size = cfg.batch_size
    batches = [[i % len(dataset) for i in range(start, start + size)] for start in range(0, samples, size)]
    dataset.__getitems__(batches[0])  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    for keys in batches:
        dataset.__getitems__(keys)  # what the DataLoader's worker calls for a batch
    done = len(batches) * size
    return {"wall": done / (time.perf_counter() - wall), "cpu": done / (time.process_time() - cpu)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--crops", type=int, nargs="+", default=[321, 513], choices=sorted(SCALES))
    parser.add_argument("--modes", nargs="+", default=["dataset", "tuned", "loader"])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        root, crop, mode = args.child
        print(json.dumps(measure(root, int(crop), mode, args.samples)))
        return
    with tempfile.TemporaryDirectory() as root:
        kb = write_voc_like(Path(root), args.images)
        print(f"{args.images} images 500x375, mean JPEG {kb:.0f} KB; {args.samples} samples per row; one worker")
        print(f"{'crop':>5} {'mode':>8} {'samples/s (wall)':>17} {'samples/CPU-s':>14}")
        for crop in args.crops:
            for mode in args.modes:
                # A fresh interpreter per row: mallopt() cannot be undone within a process.
                out = subprocess.run(
                    [sys.executable, __file__, "--samples", str(args.samples), "--child", root, str(crop), mode],
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
                rates = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{crop:>5} {mode:>8} {rates['wall']:>17.0f} {rates['cpu']:>14.0f}", flush=True)


if __name__ == "__main__":
    main()
