"""Dense CRF speed: milliseconds per VOC-sized image (500x375, 21 labels, 10 mean-field iterations).

    python benchmarks/crf.py [--images 8] [--repeats 3] [--threads N] [--json FILE]

Rows (v2 ResNet-101 parameters: w1 4, xy 67, rgb 3, w2 3, xy 1):
  pydensecrf 1 core      the reference, one image after another in this process
  pydensecrf pool        ReferenceCRFPool over all cores (what evaluation uses on CPU)
  torch cpu b1 / b4      the torch backend, batch 1 and 4, torch.set_num_threads(--threads, default all cores)
  torch cpu b1 1 thread  the torch backend on one core (same resources as the first row)
  torch cpu b1 cold      batch 1 with the cached smoothness lattice rebuilt for every image
  torch cuda b1 / b8     when CUDA is available (synchronised)

Inputs are scikit-image sample photographs resized to 500x375 with noisy 21-class softmax maps whose
labels follow the photo's regions. Each row runs `--repeats` passes over the images after one warm-up
call; the table gives the median pass (ms per image) and the speed-up over pydensecrf on one core.

OMP_WAIT_POLICY defaults to PASSIVE here: on a CPU shared with other processes, OpenMP threads that
spin at barriers wait for descheduled siblings and multi-threaded torch becomes several times slower
than one thread. Set OMP_WAIT_POLICY=ACTIVE to measure the default behaviour.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must be set before torch loads libgomp

import numpy as np  # noqa: E402
import torch  # noqa: E402
from skimage import data, filters, transform  # noqa: E402

from deeplab_lit.crf import ReferenceCRFPool, dense_crf, default_workers  # noqa: E402
from deeplab_lit.crf.mean_field import smoothness_kernel  # noqa: E402

HEIGHT, WIDTH, CLASSES = 375, 500, 21
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "hubble_deep_field", "retina")


def voc_like_inputs(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """count x 21 x 375 x 500 probabilities and count x 375 x 500 x 3 uint8 images."""
    rng = np.random.default_rng(0)
    images, probs = [], []
    for index in range(count):
        photo = getattr(data, PHOTOS[index % len(PHOTOS)])()
        image = (transform.resize(photo, (HEIGHT, WIDTH), anti_aliasing=True) * 255).round().astype(np.uint8)
        brightness = filters.gaussian(image.mean(2) / 255.0, sigma=3)
        labels = np.digitize(brightness, np.quantile(brightness, np.linspace(0, 1, CLASSES + 1)[1:-1]))
        logits = 2.0 * np.eye(CLASSES, dtype=np.float32)[labels].transpose(2, 0, 1)
        logits += rng.normal(0, 1.5, logits.shape).astype(np.float32)
        images.append(image)
        probs.append(torch.softmax(torch.from_numpy(logits), 0))
    return torch.stack(probs), torch.from_numpy(np.stack(images))


def time_passes(run, repeats: int, sync=lambda: None) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds (this process, all threads) of `repeats` calls after one warm-up call."""
    run()  # warm-up: lazy initialisation, caches, CUDA context
    sync()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def batched(probs, images, batch_size, device="cpu"):
    def run():
        for start in range(0, len(probs), batch_size):
            dense_crf(probs[start:start + batch_size].to(device), images[start:start + batch_size].to(device))
    return run


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=default_workers(), help="torch CPU threads")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    probs, images = voc_like_inputs(args.images)
    count = len(probs)
    cores = default_workers()
    rows = {}

    def record(name, timings, cpu_counts=True):
        wall, cpu = timings
        rows[name] = {"wall_ms": 1000 * statistics.median(wall) / count,
                      "cpu_ms": 1000 * statistics.median(cpu) / count if cpu_counts else None}
        base = rows["pydensecrf 1 core"]["wall_ms"] if rows.get("pydensecrf 1 core") else None
        speedup = base / rows[name]["wall_ms"] if base else 1.0
        cpu_text = f"{rows[name]['cpu_ms']:9.1f}" if cpu_counts else f"{'-':>9s}"
        print(f"{name:30s} {rows[name]['wall_ms']:9.1f} {cpu_text} {speedup:8.2f}x", flush=True)

    print(f"{count} images 500x375, {CLASSES} labels, 10 iterations; {cores} cores, torch {torch.__version__}, "
          f"{args.threads} torch threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'':30s} {'wall ms':>9s} {'cpu ms':>9s} {'speed-up':>9s}   (per image; cpu = this process, all threads)")
    record("pydensecrf 1 core", time_passes(
        lambda: dense_crf(probs, images, backend="pydensecrf", workers=1), args.repeats))
    with ReferenceCRFPool(workers=cores) as pool:
        # The workers' CPU time is not this process's: only wall time is meaningful for the pool.
        record(f"pydensecrf pool {cores} procs", time_passes(lambda: pool.refine(probs, images), args.repeats),
               cpu_counts=False)

    torch.set_num_threads(args.threads)
    record(f"torch cpu b1 {args.threads} threads", time_passes(batched(probs, images, 1), args.repeats))
    record(f"torch cpu b4 {args.threads} threads", time_passes(batched(probs, images, 4), args.repeats))

    def cold():
        for index in range(count):
            smoothness_kernel.cache_clear()
            dense_crf(probs[index:index + 1], images[index:index + 1])
    record(f"torch cpu b1 cold {args.threads} thr", time_passes(cold, args.repeats))
    torch.set_num_threads(1)
    record("torch cpu b1 1 thread", time_passes(batched(probs, images, 1), args.repeats))
    torch.set_num_threads(args.threads)

    if torch.cuda.is_available():
        sync = torch.cuda.synchronize
        record("torch cuda b1", time_passes(batched(probs, images, 1, "cuda"), args.repeats, sync))
        record(f"torch cuda b{min(8, count)}", time_passes(batched(probs, images, 8, "cuda"), args.repeats, sync))
        print(f"GPU: {torch.cuda.get_device_name()}")

    result = {"images": count, "height": HEIGHT, "width": WIDTH, "classes": CLASSES, "cores": cores,
              "torch_threads": args.threads, "ms_per_image": rows}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
