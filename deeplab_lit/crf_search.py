"""python -m deeplab_lit.crf_search --checkpoint PATH [--images 100] [--out DIR]

The papers' cross-validation of the CRF (deeplab_lit/crf_validation.py): the network's probabilities on
N val images spread evenly over the split are computed once and cached; then a coarse grid over w1 (`crf.bi_w`), the appearance kernel's spatial
std σα (`crf.bi_xy_std`) and colour std σβ (`crf.bi_rgb_std`) is evaluated with w2 and σγ fixed at the
experiment's values, followed by a finer grid around the best coarse setting. Every setting's mIoU
goes into a table (printed, and written as CSV and JSON); the best parameters are written as
`crf_best.yaml`, which `evaluate --crf-params FILE` (and `fit`'s overrides, key by key) accept.
(`python -m deeplab_lit.crf.search` is the same command under its former name.)

Ranges. v1 (section 4.1) fixes w2 = 3, σγ = 3 and searches w1 in [5, 10], σα in [50, 100] and σβ in
[3, 10]; v2 (section 4.1) searches w1 in [3, 6], σα in [30, 100], σβ in [3, 6] coarse to fine. The
default coarse grid is the run's `crf.search_bi_w`, `crf.search_bi_xy_std`, `crf.search_bi_rgb_std` (by
default the union of both: w1 3..10, σα 30..120 step 10, σβ 3..10, as `fit` with `crf.search=true`
uses); the fine grid steps w1 by 0.5, σα by 5 and σβ by 1 around the best coarse point. Both are options.

As the program of a W&B sweep (sweeps/crf_search.yaml) it evaluates exactly one setting given as
`--crf.bi_w=.. --crf.bi_xy_std=.. --crf.bi_rgb_std=..` on the cached probabilities and logs
`val/mIoU_crf` (and the mIoU without CRF) to the sweep's run.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from deeplab_lit.cli import parser as command_parser
from deeplab_lit.cli import run
from deeplab_lit.config import parse_override, split_overrides
from deeplab_lit.crf_validation import (
    COARSE, FIXED, SEARCHED, baseline_miou, coarse_ranges, coarse_to_fine, evaluate_settings, fixed_params,
    search_unaries)
from deeplab_lit.errors import UserError
from deeplab_lit.files import atomic_write, write_json_atomic, write_text_atomic

CACHE_FORMAT = 1


def cache_unaries(checkpoint_path: str, images: int, cache_dir: Path) -> dict:
    """Probabilities (float16), RGB and masks of `images` val images spread evenly over the split, computed once.

    The cache is an `.npz` of arrays read back with `allow_pickle=False`: like a checkpoint, a file left
    in the output directory is data, never code. Returns {"entries": [{"probs", "rgb", "mask"}],
    "num_classes", "crf": the checkpoint's CRF section}."""
    from datamodules import build_datamodule
    from deeplab_lit.checkpoints import load_run

    stamp = f"{Path(checkpoint_path).resolve()}:{os.path.getmtime(checkpoint_path)}:{images}"
    cache = cache_dir / f"crf_unaries_{hashlib.sha1(stamp.encode()).hexdigest()[:10]}.npz"
    loaded = load_run(checkpoint_path)
    if cache.is_file():
        return read_cache(cache, loaded.spec)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = loaded.network(device).eval()
    protocol = loaded.spec.protocols[0]
    datamodule = build_datamodule(loaded.spec.config.data)
    datamodule.setup("validate")
    dataset = datamodule.val_dataset
    arrays = {"format": np.array(CACHE_FORMAT), "num_classes": np.array(loaded.spec.dataset.num_classes)}
    _, entries = search_unaries(model, dataset, protocol, images, device, loaded.spec.dataset.mean,
                                loaded.spec.dataset.std)
    for index, entry in enumerate(entries):
        arrays[f"probs_{index}"] = entry["probs"].numpy()
        arrays[f"rgb_{index}"] = entry["rgb"].numpy()
        arrays[f"mask_{index}"] = entry["mask"].numpy().astype(np.uint8)
    atomic_write(cache, lambda stream: np.savez(stream, **arrays))
    return read_cache(cache, loaded.spec)


def read_cache(path: Path, spec) -> dict:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (ValueError, OSError) as error:
        raise UserError(f"CRF cache {path}: not a cache of this command ({type(error).__name__}: refused); "
                        "delete it and run again") from None
    if int(arrays.get("format", -1)) != CACHE_FORMAT:
        raise UserError(f"CRF cache {path}: unknown format; delete it and run again")
    count = sum(1 for name in arrays if name.startswith("probs_"))
    entries = [{"probs": torch.from_numpy(arrays[f"probs_{i}"]), "rgb": torch.from_numpy(arrays[f"rgb_{i}"]),
                "mask": torch.from_numpy(arrays[f"mask_{i}"].astype(np.int64))} for i in range(count)]
    return {"entries": entries, "num_classes": int(arrays["num_classes"]), "crf": spec.config.crf}


def parse_args(argv):
    parser = command_parser("python -m deeplab_lit.crf_search", __doc__, config_keys=False)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--images", type=int, default=100, help="val images to cross-validate on (papers: 100)")
    parser.add_argument("--out", help="output directory (default: the checkpoint's directory)")
    for name in SEARCHED:  # default: the run's own crf.search_* grid
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, nargs="+",
                            help=f"coarse values (default: the run's crf.search_{name}; {COARSE[name]} unless set)")
    parser.add_argument("--no-fine", action="store_true", help="coarse grid only (also: the run's crf.search_fine)")
    args, rest = parser.parse_known_args(argv)
    return args, split_overrides(rest)


def main(argv: list[str]) -> int:
    from deeplab_lit.files import check_writable_dir

    args, overrides = parse_args(argv)
    single = {}
    for override in overrides:
        key, value = parse_override(override)
        if not key.startswith("crf.") or key[4:] not in SEARCHED + FIXED:
            raise UserError(f"--{key}: the search takes only crf.bi_w, crf.bi_xy_std, crf.bi_rgb_std (and fixed crf.pos_*)")
        single[key[4:]] = value
    if args.images < 1:
        raise UserError(f"--images {args.images}: give at least one image")
    if not Path(args.checkpoint).is_file():
        raise UserError(f"--checkpoint {args.checkpoint}: no such file")
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    check_writable_dir(out, "--out")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = cache_unaries(args.checkpoint, args.images, out)
    crf = data["crf"]
    fixed = fixed_params(crf)
    entries, num_classes = data["entries"], data["num_classes"]
    base = baseline_miou(entries, num_classes)

    if set(SEARCHED) <= set(single):  # one sweep point
        setting = {**fixed, **single}
        miou = evaluate_settings(entries, num_classes, [setting], device)[0]
        print(json.dumps({"setting": setting, "val/mIoU": base, "val/mIoU_crf": miou}))
        _log_to_wandb_run({"val/mIoU": base, "val/mIoU_crf": miou, **{f"crf/{k}": v for k, v in setting.items()}})
        return 0
    if set(single) & set(SEARCHED):
        raise UserError("give all three of crf.bi_w, crf.bi_xy_std, crf.bi_rgb_std for one setting, or none for the grid")

    fixed.update(single)
    given = {"bi_w": args.bi_w, "bi_xy_std": args.bi_xy_std, "bi_rgb_std": args.bi_rgb_std}
    ranges = {name: given[name] or values for name, values in coarse_ranges(crf).items()}
    result = coarse_to_fine(entries, num_classes, fixed, device, ranges, fine=crf.search_fine and not args.no_fine)
    write_outputs(out, result.rows, result.rows[0], base, result.images)
    return 0


def write_outputs(out: Path, rows: list[dict], best: dict, base: float, images: int) -> None:
    import io

    import yaml

    columns = ["stage", "bi_w", "bi_xy_std", "bi_rgb_std", "pos_w", "pos_xy_std", "iterations", "miou"]
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows({c: r[c] for c in columns} for r in rows)
    write_text_atomic(out / "crf_search.csv", table.getvalue())
    best_params = {k: best[k] for k in ("iterations", "bi_w", "bi_xy_std", "bi_rgb_std", "pos_w", "pos_xy_std")}
    write_json_atomic(out / "crf_search.json", {"images": images, "miou_without_crf": base, "best": best, "rows": rows})
    write_text_atomic(out / "crf_best.yaml", yaml.safe_dump({"crf": best_params}, sort_keys=False))
    print(f"{'stage':<7}{'w1':>6}{'σα':>7}{'σβ':>6}{'mIoU':>9}")
    for row in rows[:15]:
        print(f"{row['stage']:<7}{row['bi_w']:>6g}{row['bi_xy_std']:>7g}{row['bi_rgb_std']:>6g}{100 * row['miou']:>9.2f}")
    print(f"{len(rows)} settings on {images} images; without CRF {100 * base:.2f}, best {100 * best['miou']:.2f}")
    print(f"best parameters: {out / 'crf_best.yaml'} (use: evaluate --checkpoint ... --crf-params {out / 'crf_best.yaml'})")


def _log_to_wandb_run(metrics: dict) -> None:
    """Inside a W&B sweep agent, log to the run the agent started; otherwise do nothing."""
    if not os.environ.get("WANDB_SWEEP_ID"):
        return
    import wandb

    run_ = wandb.init()
    run_.log(metrics)
    run_.finish()


if __name__ == "__main__":
    run(main)
