"""The papers' cross-validation of the dense CRF's parameters, as a library (the CRF search command and
`fit`'s `crf.search` protocol use it).

v1 Sec. 4.1 / v2 Sec. 4.1: "we cross-validate the CRF parameters ... We use default values of w2 = 3 and
σγ = 3 and we search for the best values of w1, σα, and σβ by cross-validation on 100 images from val.
We employ a coarse-to-fine search scheme. The initial search range of the parameters are w1 ∈ [3 : 6],
σα ∈ [30 : 10 : 100] and σβ ∈ [3 : 6] ..., and then we refine the search step sizes around the first
round's best values. We employ 10 mean field iterations." (w2 and σγ are the row's own values here.)

Choices where the papers are silent:
- which 100 images: evenly spaced over the val list (indices round(i (N - 1) / 99)), so the subset spans
  the split rather than its first ids;
- the coarse grid covers v1's and v2's ranges together (w1 3..10, σα 30..120 step 10, σβ 3..10: the
  defaults of `crf.search_bi_w`, `crf.search_bi_xy_std`, `crf.search_bi_rgb_std`), the fine grid steps w1
  by 0.5, σα by 5, σβ by 1 (two steps either side of the coarse best; `crf.search_fine`);
- the score is the mIoU of one confusion matrix over the search images (as every metric here).

The search images are val images, and the run then reports on the whole val set, those images included:
the papers did the same (100 val images held out for the cross-validation, the tables on all of val), so
the CRF rows here follow them; the search subset is recorded (`crf_search.indices` of summary.json) so a
reader can tell.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from deeplab_lit.config.schema import CRFConfig

SEARCHED = ("bi_w", "bi_xy_std", "bi_rgb_std")
FIXED = ("iterations", "pos_w", "pos_xy_std")
FINE_STEPS = {"bi_w": 0.5, "bi_xy_std": 5.0, "bi_rgb_std": 1.0}


def coarse_ranges(crf) -> dict:
    """The coarse grid of a `crf` config section: `crf.search_bi_w`, `crf.search_bi_xy_std`,
    `crf.search_bi_rgb_std` (one place for the grid: the command's defaults are the config's)."""
    return {name: list(getattr(crf, f"search_{name}")) for name in SEARCHED}


def fixed_params(crf) -> dict:
    """What the search holds fixed: w2, σγ and the iterations. v1/v2 Sec. 4.1 fix w2 = 3, σγ = 3 and use
    10 mean-field iterations; here they are the row's own values."""
    return {name: getattr(crf, name) for name in FIXED}


def with_best(crf, best: dict):
    """`crf` (a frozen CRF parameter type: CRFParams, the config's CRFConfig) with the searched w1, σα, σβ:
    a new object, checked by the type's own validation; everything else (w2, σγ, backend) unchanged."""
    return dataclasses.replace(crf, **{name: float(best[name]) for name in SEARCHED})


COARSE = coarse_ranges(CRFConfig())


def search_indices(length: int, images: int) -> list[int]:
    """`images` indices spread evenly over a split of `length` images (all of them if fewer)."""
    if images >= length:
        return list(range(length))
    if images == 1:
        return [0]
    return sorted({round(i * (length - 1) / (images - 1)) for i in range(images)})


def confusion(labels: np.ndarray, masks: np.ndarray, num_classes: int) -> np.ndarray:
    valid = masks != 255
    index = num_classes * masks[valid].astype(np.int64) + labels[valid].astype(np.int64)
    return np.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def miou_from_confusion(matrix: np.ndarray) -> float:
    union = matrix.sum(0) + matrix.sum(1) - np.diag(matrix)
    present = union > 0
    return float((np.diag(matrix)[present] / union[present]).mean())


def grid(ranges: dict, fixed: dict) -> list[dict]:
    keys = list(ranges)
    return [{**fixed, **dict(zip(keys, values))} for values in itertools.product(*(ranges[k] for k in keys))]


def fine_ranges(best: dict) -> dict:
    return {
        key: sorted({max(step, round(best[key] + k * step, 3)) for k in (-2, -1, 0, 1, 2)})
        for key, step in FINE_STEPS.items()
    }


def search_unaries(model, dataset, protocol, images: int, device, mean, std) -> tuple[list[int], list[dict]]:
    """The search images (`images` spread evenly over `dataset`) and their unaries under `protocol`."""
    indices = search_indices(len(dataset), images)
    return indices, collect_unaries(model, dataset, protocol, indices, device, mean, std)


@torch.no_grad()
def collect_unaries(model, dataset, protocol, indices, device, mean, std) -> list[dict]:
    """The network's probabilities (float16), RGB and mask of each image of `indices`; `mean`/`std` are
    the dataset's normalisation (RunSpec.dataset)."""
    from rich.progress import track

    from deeplab_lit.inference import predict_probs
    from deeplab_lit.preprocessing import normalise

    entries = []
    for index in track(indices, description="CRF search: probabilities", transient=True):
        item = dataset[index]
        probs = predict_probs(model, normalise(item["image"][None].to(device), mean, std), protocol)[0]
        entries.append({"probs": probs.half().cpu(), "rgb": torch.as_tensor(item["rgb"]), "mask": item["mask"]})
    return entries


def evaluate_settings(entries: list[dict], num_classes: int, settings: list[dict], device) -> list[float]:
    """mIoU of every setting over the entries (lattices shared across settings per image)."""
    from deeplab_lit.crf import dense_crf_many

    matrices = [np.zeros((num_classes, num_classes), np.int64) for _ in settings]
    for entry in entries:
        probs = entry["probs"].float()[None].to(device)
        probs = probs / probs.sum(1, keepdim=True)  # float16 storage: renormalise exactly
        labels = dense_crf_many(probs, entry["rgb"][None].to(device), settings, output="labels")
        mask = entry["mask"].numpy()
        for matrix, label in zip(matrices, labels):
            matrix += confusion(label[0].cpu().numpy(), mask, num_classes)
    return [miou_from_confusion(m) for m in matrices]


def baseline_miou(entries: list[dict], num_classes: int) -> float:
    matrix = np.zeros((num_classes, num_classes), np.int64)
    for entry in entries:
        matrix += confusion(entry["probs"].float().argmax(0).numpy(), entry["mask"].numpy(), num_classes)
    return miou_from_confusion(matrix)


@dataclass
class SearchResult:
    images: int
    best: dict  # the six CRF parameters found
    best_miou: float  # on the search images
    miou_without_crf: float  # on the search images
    rows: list[dict] = field(default_factory=list)  # every setting: stage, parameters, miou; best first
    indices: list[int] = field(default_factory=list)  # the search images' positions in the split, if known

    def record(self) -> dict:
        return {"images": self.images, "indices": list(self.indices), "best": self.best,
                "best_miou": self.best_miou, "miou_without_crf": self.miou_without_crf, "settings": len(self.rows)}


def coarse_to_fine(entries: list[dict], num_classes: int, fixed: dict, device, ranges: dict | None = None,
                   fine: bool = True) -> SearchResult:
    """The coarse grid over w1, σα, σβ (w2, σγ, iterations in `fixed`), then the fine grid around its best."""
    settings = grid(ranges or COARSE, fixed)
    rows = [dict(s, stage="coarse", miou=m) for s, m in zip(settings, evaluate_settings(entries, num_classes,
                                                                                          settings, device))]
    if fine:
        best = max(rows, key=lambda r: r["miou"])
        seen = {tuple(r[k] for k in SEARCHED) for r in rows}
        extra = [s for s in grid(fine_ranges(best), fixed) if tuple(s[k] for k in SEARCHED) not in seen]
        rows += [dict(s, stage="fine", miou=m) for s, m in zip(extra, evaluate_settings(entries, num_classes, extra,
                                                                                         device))]
    rows.sort(key=lambda r: -r["miou"])
    best = {k: rows[0][k] for k in (*FIXED, *SEARCHED)}
    return SearchResult(len(entries), best, rows[0]["miou"], baseline_miou(entries, num_classes), rows)


def search_run(model, dataset, protocol, crf, num_classes: int, device, mean, std) -> SearchResult:
    """The papers' protocol for a run's `crf` section (v1/v2 Sec. 4.1): unaries of `crf.search_images` val
    images under the run's evaluation `protocol`, then the coarse grid of `crf.search_*` with w2, σγ and
    the iterations fixed, refined around its best unless `crf.search_fine` is off."""
    indices, entries = search_unaries(model, dataset, protocol, crf.search_images, device, mean, std)
    result = coarse_to_fine(entries, num_classes, fixed_params(crf), device, coarse_ranges(crf), fine=crf.search_fine)
    return dataclasses.replace(result, indices=indices)
