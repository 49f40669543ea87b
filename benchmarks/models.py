"""Parameters and multiply-accumulates of every DeepLab network in docs/papers.md.

    python benchmarks/models.py [--json FILE] [--device meta|cpu|cuda] [--classes 21]

One row per distinct network of the paper tables (rows that differ only in data, recipe or
initialisation share a network, and v1's LargeFOV = v2's `v2_largefov`). GMACs = multiply-accumulates
of convolutions and matrix products (torch.utils.flop_counter, deeplab_lit.models.complexity), batch 1,
eval mode: for v2 MSC models that is all three scales. Counted at 513x513 and at the paper's crop
(321 for v1/v2, 513 for v3/v3+, 769 for the Cityscapes rows). `@OS8` rows are the same weights evaluated at
output stride 8. `+SC`: separable convs in ASPP and decoder (v3+ Table 5).

By default the models are built on the meta device: shapes and counts are exact (the test suite checks
meta == cpu) and nothing is computed, so the table takes seconds. `--device cpu` runs real forwards.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deeplab_lit.config import ModelConfig  # noqa: E402
from deeplab_lit.models import build_model, count_macs, count_parameters  # noqa: E402

VGG = dict(backbone="vgg16", output_stride=8, head="fc")
R101_V2 = dict(generation="v2", backbone="resnet101", output_stride=8)
MSC = [1.0, 0.75, 0.5]
V3 = dict(generation="v3", backbone="resnet101", multi_grid=[1, 2, 4])
X65 = dict(backbone="xception65", multi_grid=[1, 1, 1])

# id: (model fields, paper crop, evaluation output stride or None)
NETWORKS = {
    "v1_7x7": (dict(VGG, generation="v1", fc6_kernel=7, aspp_rates=[4], fc6_width=4096), 321, None),
    "v1_4x4": (dict(VGG, generation="v1", fc6_kernel=4, aspp_rates=[4], fc6_width=4096), 321, None),
    "v1_4x4_r8": (dict(VGG, generation="v1", fc6_kernel=4, aspp_rates=[8], fc6_width=4096), 321, None),
    "largefov": (dict(VGG, generation="v1", fc6_kernel=3, aspp_rates=[12], fc6_width=1024), 321, None),
    "v1_msc": (dict(VGG, generation="v1", fc6_kernel=4, aspp_rates=[4], fc6_width=4096, msc_features=True),
               321, None),
    "v1_msc_largefov": (dict(VGG, generation="v1", fc6_kernel=3, aspp_rates=[12], fc6_width=1024,
                             msc_features=True), 321, None),
    "aspp_s": (dict(VGG, generation="v2", fc6_kernel=3, aspp_rates=[2, 4, 8, 12], fc6_width=1024), 321, None),
    "aspp_l": (dict(VGG, generation="v2", fc6_kernel=3, aspp_rates=[6, 12, 18, 24], fc6_width=1024), 321, None),
    "v2_r101": (dict(R101_V2, head="classifier"), 321, None),
    "v2_r101_msc": (dict(R101_V2, head="classifier", msc_scales=MSC), 321, None),
    "v2_r101_largefov": (dict(R101_V2, head="atrous_classifier", aspp_rates=[12], msc_scales=MSC), 321, None),
    "v2_r101_aspp": (dict(R101_V2, head="atrous_classifier", aspp_rates=[6, 12, 18, 24], msc_scales=MSC),
                     321, None),
    "v3_r50_block7_os8": (dict(generation="v3", backbone="resnet50", output_stride=8, head="classifier",
                               cascade_blocks=3), 513, None),
    "v3_r50_block7_os16": (dict(generation="v3", backbone="resnet50", output_stride=16, head="classifier",
                                cascade_blocks=3), 513, None),
    "v3_r50_block7_os32": (dict(generation="v3", backbone="resnet50", output_stride=32, head="classifier",
                                cascade_blocks=3), 513, None),
    "v3_block7_mg124": (dict(V3, head="classifier", cascade_blocks=3), 513, None),
    "v3_aspp_mg124": (dict(V3, image_pooling=False), 513, None),
    "v3_aspp_mg124_r24": (dict(V3, image_pooling=False, aspp_rates=[6, 12, 18, 24]), 513, None),
    "v3": (dict(V3), 513, None),
    "v3 @OS8": (dict(V3), 513, 8),
    "v3_train_os32": (dict(V3, output_stride=32), 513, None),
    "v3plus_1conv": (dict(V3, generation="v3plus", decoder_convs=1), 513, None),
    "v3plus": (dict(V3, generation="v3plus"), 513, None),
    "v3plus @OS8": (dict(V3, generation="v3plus"), 513, 8),
    "v3plus_train_os32": (dict(V3, generation="v3plus", output_stride=32), 513, None),
    # v3+ Table 5 (VOC) and Table 7 (a) (Cityscapes, crop 769) with the aligned Xception
    "v3_xception65": (dict(X65, generation="v3"), 513, None),
    "v3_xception65 @OS8": (dict(X65, generation="v3"), 513, 8),
    "v3plus_xception65": (dict(X65, generation="v3plus"), 513, None),
    "v3plus_xception65 @OS8": (dict(X65, generation="v3plus"), 513, 8),
    "v3plus_xception65_sc": (dict(X65, generation="v3plus", separable=True), 513, None),
    "v3plus_xception65_sc @OS8": (dict(X65, generation="v3plus", separable=True), 513, 8),
    "cityscapes_v3plus_xception65_noip": (dict(X65, generation="v3plus", separable=True, image_pooling=False), 769,
                                          None),
    "cityscapes_v3plus_xception71": (dict(X65, generation="v3plus", separable=True, image_pooling=False,
                                          backbone="xception71"), 769, None),
    # beyond the papers: v3plus_timm with each backbone of sweeps/timm_backbones.yaml
    **{f"v3plus_timm ({name})": (dict(generation="v3plus", backbone=name, multi_grid=[1, 1, 1]), 513, None)
       for name in ("timm:resnet50d", "timm:resnest50d", "timm:regnety_032")},
}


def measure(name: str, fields: dict, crop: int, eval_stride, device: str, num_classes: int) -> dict:
    cfg = ModelConfig(**fields)
    with torch.device(device):
        model = build_model(cfg, num_classes)
    if eval_stride is not None:
        model.set_output_stride(eval_stride)
    head = ("decoder" if cfg.generation == "v3plus" else cfg.head) + (" +SC" if cfg.separable else "")
    return {
        "id": name, "generation": cfg.generation, "backbone": cfg.backbone, "output_stride": model.output_stride,
        "head": head + (" +MSc" if cfg.msc_features else "") + (" +MSC" if cfg.msc_scales else ""),
        "params_M": round(count_parameters(model) / 1e6, 2),
        "gmacs_513": round(count_macs(model, (513, 513)) / 1e9, 1),
        "crop": crop,
        "gmacs_crop": round(count_macs(model, (crop, crop)) / 1e9, 1),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--device", default="meta", help="meta (default: counts only), cpu or cuda")
    parser.add_argument("--classes", type=int, default=21)
    args = parser.parse_args(argv)
    rows = [measure(name, *spec, args.device, args.classes) for name, spec in NETWORKS.items()]
    print("| id | generation | backbone | OS | head | params (M) | GMACs @513 | crop | GMACs @crop |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['id']}` | {r['generation']} | {r['backbone']} | {r['output_stride']} | {r['head']} | "
              f"{r['params_M']:.2f} | {r['gmacs_513']:.1f} | {r['crop']} | {r['gmacs_crop']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
