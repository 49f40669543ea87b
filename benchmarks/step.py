"""Training-step time of this project's v3 ResNet-101 at output stride 8 against torchvision's DeepLab-v3.

    python benchmarks/step.py [--batch 2] [--crop 321] [--repeats 3] [--threads N] [--device cpu|cuda]
                              [--os16] [--json FILE]

Rows:
  ours v3 R101 OS8                  experiments/v3 with `model.pretrained=none model.output_stride=8`
                                    (resolve_experiment + build_model): ResNet-101, multi-grid (1, 2, 4)
                                    (layer4 dilations 4, 8, 16), ASPP 12/24/36 + image pooling, 1x1
                                    projection, dropout 0.1, 1x1 classifier
  torchvision deeplabv3_resnet101   torchvision.models.segmentation.deeplabv3_resnet101(weights=None,
                                    weights_backbone=None, num_classes=21, aux_loss=False): ResNet-101 at
                                    OS 8 (layer4 dilations 2, 4, 4), ASPP 12/24/36 + image pooling, 1x1
                                    projection, dropout 0.5, then an extra 3x3 256->256 conv + BN + ReLU
                                    before the 1x1 classifier
  ratio                             median step time of ours / median step time of torchvision: the
                                    figure this benchmark is for (below 1: ours is faster); then each
                                    round's ratio and their median (paired within a round, so less
                                    moved by load that changes between rounds; their spread shows the noise)
  ours v3 R101 OS16                 with --os16: experiments/v3 as trained (OS 16), for information; no
                                    ratio (torchvision's builder has no OS-16 DeepLab-v3)

Columns: parameters (all, trainable or not; torchvision's extra 3x3 conv + BN is the whole difference,
590,336), GMACs of one eval-mode forward of one image at the crop (deeplab_lit.models.count_macs, on the
meta device), and the median seconds of one training step with the list of timed steps.

A training step is the same for every network: train mode, fp32, a random batch of `--batch` images of
`--crop` x `--crop` (the same tensors for all networks) with random labels of 21 classes and a band of
255 (ignored) pixels, forward, cross-entropy with ignore_index 255 on the `out` output (both networks
return a dict whose `out` is the logits upsampled to the input size), backward, torch.optim.SGD step
(lr 0.007, momentum 0.9, weight decay 1e-4: experiments/v3's values, over all parameters), gradients
zeroed (set to None). On CUDA each step is synchronised.

Timing: one warm-up step per network, then `--repeats` interleaved rounds (ours, torchvision[, ours
OS 16], ours, torchvision, ...), so that other load on a shared machine falls on every network alike.
Absolute seconds on a shared machine are not comparable across runs; the ratio within one run is.
torch.set_num_threads(--threads, default all cores this process may use).

OMP_WAIT_POLICY defaults to PASSIVE here (see benchmarks/crf.py): on a CPU shared with other processes,
OpenMP threads that spin at barriers wait for descheduled siblings and multi-threaded torch becomes several
times slower than one thread. Set OMP_WAIT_POLICY=ACTIVE to measure the default behaviour.

--json FILE writes {"device", "torch", "torchvision", "batch", "crop", "threads", "repeats",
"omp_wait_policy", "rows": [{"name", "params", "gmacs_forward", "seconds_per_step" (median),
"steps_s" (every timed step), "ratio" (null but on ours OS 8)}], "ratio", "round_ratios", "round_ratio_median"}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must be set before torch loads libgomp

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deeplab_lit.config import resolve_experiment  # noqa: E402
from deeplab_lit.models import build_model, count_macs, count_parameters  # noqa: E402

CLASSES, IGNORE_INDEX = 21, 255
LR, MOMENTUM, WEIGHT_DECAY = 0.007, 0.9, 1e-4  # experiments/v3's optimiser; the same for every network
OURS, TORCHVISION, OURS_OS16 = "ours v3 R101 OS8", "torchvision deeplabv3_resnet101", "ours v3 R101 OS16"


def default_threads() -> int:
    """All cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ours(output_stride: int):
    spec = resolve_experiment("v3", ["model.pretrained=none", f"model.output_stride={output_stride}"])
    return build_model(spec.model_for_training(), CLASSES)


def theirs():
    return torchvision.models.segmentation.deeplabv3_resnet101(
        weights=None, weights_backbone=None, num_classes=CLASSES, aux_loss=False)


def forward_gmacs(builder, crop: int) -> float:
    """GMACs of one eval-mode forward of one crop x crop image, counted on the meta device (nothing computed)."""
    with torch.device("meta"):
        model = builder()
    return count_macs(model, (crop, crop)) / 1e9


def training_step(model, images, masks, sync):
    """One SGD step of `model` on (images, masks), as a closure."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def step():
        loss = F.cross_entropy(model(images)["out"], masks, ignore_index=IGNORE_INDEX)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
    return step


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2, help="images per step (at least 2: BatchNorm)")
    parser.add_argument("--crop", type=int, default=321, help="square input side")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds after one warm-up step")
    parser.add_argument("--threads", type=int, default=default_threads(), help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--os16", action="store_true", help="also time ours at output stride 16 (no ratio)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    builders = {OURS: lambda: ours(8), TORCHVISION: theirs}
    if args.os16:
        builders[OURS_OS16] = lambda: ours(16)

    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.crop, args.crop, device=device)
    masks = torch.randint(0, CLASSES, (args.batch, args.crop, args.crop), device=device)
    masks[:, :, : args.crop // 10] = IGNORE_INDEX  # a band of ignored pixels, as VOC's borders

    rows, steps = {}, {}
    for name, builder in builders.items():
        torch.manual_seed(0)
        with torch.device(device):
            model = builder()
        rows[name] = {"name": name, "params": count_parameters(model),
                      "gmacs_forward": round(forward_gmacs(builder, args.crop), 2), "steps_s": []}
        steps[name] = training_step(model, images, masks, sync)

    name_text = device.type if device.type != "cuda" else torch.cuda.get_device_name(device)
    print(f"batch {args.batch}, crop {args.crop}, {CLASSES} classes, fp32 on {name_text}; torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, {args.threads} torch threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average {os.getloadavg()[0]:.1f}", flush=True)
    for name, step in steps.items():  # warm-up: allocator, kernel selection, SGD momentum buffers
        step()
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            rows[name]["steps_s"].append(time.perf_counter() - start)

    for row in rows.values():
        row["seconds_per_step"] = statistics.median(row["steps_s"])
        row["ratio"] = None
    ratio = rows[OURS]["seconds_per_step"] / rows[TORCHVISION]["seconds_per_step"]
    round_ratios = [a / b for a, b in zip(rows[OURS]["steps_s"], rows[TORCHVISION]["steps_s"])]
    rows[OURS]["ratio"] = ratio

    print(f"{'':34s} {'params':>11s} {'GMACs':>7s} {'s/step':>8s}   steps (s)   (GMACs: one image's forward)")
    for row in rows.values():
        timed = " ".join(f"{s:.2f}" for s in row["steps_s"])
        print(f"{row['name']:34s} {row['params']:11,d} {row['gmacs_forward']:7.2f} {row['seconds_per_step']:8.2f}"
              f"   {timed}")
    print(f"{'ratio':34s} {'ours OS8 / torchvision':>28s} {ratio:8.3f}   per round "
          + " ".join(f"{r:.3f}" for r in round_ratios) + f" (median {statistics.median(round_ratios):.3f})")
    print(f"total {time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.1f}")

    result = {"device": name_text, "torch": torch.__version__, "torchvision": torchvision.__version__,
              "batch": args.batch, "crop": args.crop, "threads": args.threads, "repeats": args.repeats,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "rows": list(rows.values()),
              "ratio": ratio, "round_ratios": round_ratios,
              "round_ratio_median": statistics.median(round_ratios)}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
