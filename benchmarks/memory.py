"""Peak training memory of the v3 recipes, counted with fake tensors: no GPU, nothing computed.

    python benchmarks/memory.py [--rows v3_train_os8:1,6,8 v3:16] [--crop 513] [--json FILE]

A row is an experiment and a batch size. It runs two SGD steps of the experiment's own network, loss
(`optim.loss_at`) and optimiser settings (momentum, so the second step holds the momentum buffers) on a
random batch under torch's FakeTensorMode (tensors with shapes and dtypes but no data; fp32, as the
papers trained) and MemTracker, which records every tensor the steps allocate (parameters, gradients,
momentum, activations saved for the backward pass, temporaries) and the peak of their sum.

What a GPU adds on top of this count: the CUDA context (outside torch's statistics), cuDNN workspaces,
and the caching allocator's rounding and fragmentation; `benchmarks/gpu.py`'s `train_peak_memory` rows
measure `torch.cuda.max_memory_allocated` on a device. The default rows are v3 App. A's largest batches
that fit on the papers' GPUs: 6 at train output stride 8 and 16 at 16 (and 8 at OS 8 for comparison).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deeplab_lit.config import resolve_experiment  # noqa: E402
from deeplab_lit.errors import UserError  # noqa: E402
from deeplab_lit.models import build_model  # noqa: E402
from deeplab_lit.modules.losses import loss_terms  # noqa: E402

DEFAULT_ROWS = ["v3_train_os8:1,6,8", "v3:16"]
GIB = 2**30


def count_peak(experiment: str, batch: int, crop: int, overrides: tuple[str, ...] = ()) -> dict[str, float]:
    """Bytes at the peak of two training steps, by kind (`parameters`, `gradients`, `optimizer`,
    `activations`, `temporaries`, `buffers`) and in all (`total`)."""
    spec = resolve_experiment(experiment, ["model.pretrained=none", *overrides])
    optim = spec.config.optim
    with FakeTensorMode():
        model = build_model(spec.config.model, spec.dataset.num_classes).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum,
                                    weight_decay=optim.weight_decay)  # fmt: skip
        images = torch.randn(batch, 3, crop, crop)
        masks = torch.randint(0, spec.dataset.num_classes, (batch, crop, crop))
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            for step in range(2):
                if step:
                    tracker.reset_mod_stats()  # per-module statistics are per iteration; the peak is kept
                loss = sum(loss_terms(model(images), masks, optim.loss_at, model.align_corners))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        (peak,) = tracker.get_tracker_snapshot("peak").values()  # one device: the CPU
    kinds = {"Parameter": "parameters", "Gradient": "gradients", "Optstate": "optimizer", "Activation": "activations",
             "Temp": "temporaries", "Buffer": "buffers", "Total": "total"}  # fmt: skip
    return {kinds[str(getattr(kind, "value", kind))]: float(size) for kind, size in peak.items()
            if str(getattr(kind, "value", kind)) in kinds}


def parse_rows(rows: list[str]) -> list[tuple[str, int]]:
    """["v3_train_os8:1,6", "v3:16"] -> [("v3_train_os8", 1), ("v3_train_os8", 6), ("v3", 16)]."""
    parsed = []
    for row in rows:
        experiment, _, batches = row.partition(":")
        if not batches:
            raise ValueError(f"--rows {row!r}: write EXPERIMENT:BATCH[,BATCH...], e.g. v3_train_os8:6")
        parsed += [(experiment, int(batch)) for batch in batches.split(",")]
    return parsed


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, help="EXPERIMENT:BATCH[,BATCH...]")
    parser.add_argument("--crop", type=int, default=513)
    parser.add_argument("--override", action="append", default=[], help="a config override for every row")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    try:
        rows = parse_rows(args.rows)
        for experiment in dict.fromkeys(experiment for experiment, _ in rows):  # unknown names before any work
            resolve_experiment(experiment, args.override)
    except (ValueError, UserError) as error:
        parser.exit(2, f"error: {error}\n")
    results = []
    print(f"{'experiment':>14} {'OS':>3} {'batch':>5} {'crop':>5} {'total GiB':>10} {'activations':>12} {'seconds':>8}")
    for experiment, batch in rows:
        start = time.perf_counter()
        peak = count_peak(experiment, batch, args.crop, tuple(args.override))
        stride = resolve_experiment(experiment, args.override).config.model.output_stride
        row = {"experiment": experiment, "output_stride": stride, "batch": batch, "crop": args.crop,
               "overrides": args.override, **{f"{kind}_gib": size / GIB for kind, size in peak.items()}}  # fmt: skip
        results.append(row)
        print(f"{experiment:>14} {stride:>3} {batch:>5} {args.crop:>5} {row['total_gib']:>10.2f} "
              f"{row['activations_gib']:>12.2f} {time.perf_counter() - start:>8.1f}", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"schema": 1, "torch": torch.__version__, "rows": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
