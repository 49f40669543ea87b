"""Sweep files are valid W&B sweeps whose grid points are exactly the papers' rows; SLURM agents.

Grid points are expanded into command lines by W&B's own `${args}` code
(`wandb.sdk.launch.sweeps.utils.create_sweep_command_args`, what `wandb agent` runs) and parsed by
fit's own argument parser, so a point that resolves here resolves under an agent.
"""
import hashlib
import importlib.util
import inspect
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args
from wandb.sdk.lib.config_util import save_config_file_from_dict

from deeplab_lit import fit
from deeplab_lit.config import resolve_experiment, build_protocols, flat_keys, list_experiments, load_experiment, to_dict, to_yaml

REPO = Path(__file__).resolve().parent.parent
SWEEPS = REPO / "sweeps"
SWEEP_FILES = sorted(SWEEPS.glob("*.yaml"))
LOAD = {path.name: yaml.safe_load(path.read_text()) for path in SWEEP_FILES}
FIT_SWEEPS = sorted(name for name, sweep in LOAD.items() if sweep["program"] == "deeplab_lit.fit")
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
       "NO_ALBUMENTATIONS_UPDATE": "1"}

# ---------------------------------------------------------------------------------------------------
# What each sweep must train: one entry per grid cell (seeds aside), the values that define its paper
# row (docs/papers.md) and the paper's numbers. A key "protocols" lists the evaluation protocols of the run
# as (name, output stride, number of scales, flip).

V1_CRF = {"crf.enabled": True, "crf.bi_w": 4, "crf.bi_xy_std": 121, "crf.bi_rgb_std": 5, "crf.pos_w": 3,
          "crf.pos_xy_std": 3, "crf.search": False}  # the released LargeFOV model's values
SEARCHED_CRF = {"crf.enabled": True, "crf.pos_w": 3, "crf.pos_xy_std": 3, "crf.search": True, "crf.search_images": 100}
V2_VGG_CRF = {"crf.enabled": True, "crf.bi_w": 4, "crf.bi_xy_std": 65, "crf.bi_rgb_std": 3, "crf.pos_w": 2,
              "crf.pos_xy_std": 2, "crf.search": False}  # the released DeepLabv2_VGG16 (LargeFOV) model's values
V2_R101_CRF = {"crf.enabled": True, "crf.bi_w": 4, "crf.bi_xy_std": 67, "crf.bi_rgb_std": 3, "crf.pos_w": 3,
               "crf.pos_xy_std": 1}
V1 = {"model.backbone": "vgg16", "model.output_stride": 8, "data.batch_size": 20, "trainer.max_steps": 6000,
      "optim.loss_at": "logits", "eval.canvas": [513, 513]}
V2_VGG = {"model.backbone": "vgg16", "model.head": "fc", "data.batch_size": 10, "data.scale_range": [1.0, 1.0],
          "trainer.max_steps": 20000, "optim.loss_at": "logits"}
V2_R101 = {"model.backbone": "resnet101", "model.output_stride": 8, "model.bn": "frozen", "data.batch_size": 10,
           "optim.lr": 0.00025, "trainer.max_steps": 20000}
MSC = [1.0, 0.75, 0.5]
V3 = {"model.backbone": "resnet101", "model.output_stride": 16, "data.crop_size": 513, "data.batch_size": 16,
      "optim.lr": 0.007, "trainer.max_steps": 30000, "data.scale_step": 0.25, "eval.canvas": [513, 513]}
BLOCK7 = {**V3, "model.cascade_blocks": 3, "model.head": "classifier"}
V3_ASPP = {**V3, "model.head": "aspp", "model.cascade_blocks": 0, "model.image_pooling": False}
SIX = 6  # scales 0.5 ... 1.75


def cell(experiment, **values):
    return {"experiment": experiment, **{key.replace("__", "."): value for key, value in values.items()}}


def fov_cells():
    return [
        cell("v1_7x7", **V1, **SEARCHED_CRF, model__fc6_kernel=7, model__aspp_rates=[4], model__fc6_width=4096,
             paper__miou=64.38, paper__miou_crf=67.64),
        cell("v1_4x4", **V1, **SEARCHED_CRF, model__fc6_kernel=4, model__aspp_rates=[4], model__fc6_width=4096,
             model__msc_features=False, paper__miou=59.80, paper__miou_crf=63.74),
        cell("v1_4x4_r8", **V1, **SEARCHED_CRF, model__fc6_kernel=4, model__aspp_rates=[8], model__fc6_width=4096,
             paper__miou=63.41, paper__miou_crf=67.14),
        cell("largefov", **{**V1, "data.batch_size": 30}, **V1_CRF, model__fc6_kernel=3, model__aspp_rates=[12],
             model__fc6_width=1024, model__pool5_avg=True, model__msc_features=False, paper__miou=62.25,
             paper__miou_crf=67.64),
    ]


def msc_cells():
    return [
        cell("v1_msc", **V1, **SEARCHED_CRF, model__fc6_kernel=4, model__aspp_rates=[4], model__msc_features=True,
             model__pretrained="run:v1_4x4", paper__miou=61.30, paper__miou_crf=65.21),
        cell("v1_msc_largefov", **{**V1, "data.batch_size": 30}, **SEARCHED_CRF, model__fc6_kernel=3,
             model__aspp_rates=[12], model__fc6_width=1024, model__msc_features=True, model__pretrained="run:largefov",
             paper__miou=64.21, paper__miou_crf=68.70),
    ]


def aspp_cells():
    return [
        cell("v2_largefov", **V2_VGG, **V2_VGG_CRF, model__aspp_rates=[12], model__pool5_avg=True, paper__miou=65.76,
             paper__miou_crf=69.84),
        cell("aspp_s", **V2_VGG, **SEARCHED_CRF, model__aspp_rates=[2, 4, 8, 12], paper__miou=66.98,
             paper__miou_crf=69.73),
        cell("aspp_l", **V2_VGG, **SEARCHED_CRF, model__aspp_rates=[6, 12, 18, 24], paper__miou=68.96,
             paper__miou_crf=71.57),
    ]


def resnet_cells(crf=False):
    crf_values = V2_R101_CRF if crf else {"crf.enabled": False}
    return [
        cell("v2_r101", **V2_R101, **crf_values, model__head="classifier", model__msc_scales=[],
             data__scale_range=[1.0, 1.0], paper__miou=68.72),
        cell("v2_r101_msc", **V2_R101, **crf_values, model__head="classifier", model__msc_scales=MSC,
             data__scale_range=[1.0, 1.0], paper__miou=71.27),
        cell("v2_r101_msc_coco", **V2_R101, **crf_values, model__head="classifier", model__msc_scales=MSC,
             data__scale_range=[1.0, 1.0], paper__miou=73.28),
        cell("v2_r101_msc_coco_aug", **V2_R101, **crf_values, model__head="classifier", model__msc_scales=MSC,
             data__scale_range=[0.5, 1.5], paper__miou=74.87),
        cell("v2_r101_largefov", **V2_R101, **crf_values, model__head="atrous_classifier", model__aspp_rates=[12],
             model__msc_scales=MSC, data__scale_range=[0.5, 1.5], paper__miou=75.54),
        cell("v2_r101_aspp", **V2_R101, **V2_R101_CRF, model__head="atrous_classifier",
             model__aspp_rates=[6, 12, 18, 24], model__msc_scales=MSC, data__scale_range=[0.5, 1.5],
             paper__miou=76.35, paper__miou_crf=77.69),
    ]


def v3_cell(**extra):
    return cell("v3", **V3_ASPP, model__image_pooling=True, model__multi_grid=[1, 2, 4],
                model__aspp_rates=[6, 12, 18], paper__miou=77.21,
                protocols=[("", 16, 1, False), ("os8", 8, 1, False), ("os8_ms", 8, SIX, False),
                           ("os8_ms_flip", 8, SIX, True)], **extra)


V3PLUS_PROTOCOLS = [("", 16, 1, False), ("ms", 16, SIX, False), ("ms_flip", 16, SIX, True), ("os8", 8, 1, False),
                    ("os8_ms", 8, SIX, False), ("os8_ms_flip", 8, SIX, True)]
V3_TABLE3 = {(1, 1, 1): (68.39, 73.21, 75.34), (1, 2, 1): (70.23, 75.67, 76.09), (1, 2, 3): (73.14, 75.78, 75.96),
             (1, 2, 4): (73.45, 75.74, 75.85), (2, 2, 2): (71.45, 74.30, 74.70)}
X65 = {**V3, "model.backbone": "xception65", "model.multi_grid": [1, 1, 1], "optim.weight_decay": 0.00004,
       "optim.depthwise_weight_decay": False}
X65_ALL_PROTOCOLS = [("", 16, 1, False), ("ms", 16, SIX, False), ("ms_flip", 16, SIX, True), ("os8", 8, 1, False),
                     ("os8_ms", 8, SIX, False), ("os8_ms_flip", 8, SIX, True)]
X65_SC_PROTOCOLS = [("", 16, 1, False), ("ms_flip", 16, SIX, True), ("os8", 8, 1, False), ("os8_ms_flip", 8, SIX, True)]
X65_CITYSCAPES = {"data.name": "cityscapes", "model.multi_grid": [1, 1, 1], "model.separable": True,
                  "data.crop_size": 769, "data.batch_size": 16, "trainer.max_steps": 90000,
                  "eval.canvas": [1025, 2049]}

EXPECTED = {
    "fov.yaml": fov_cells(),
    "msc.yaml": msc_cells(),
    "aspp.yaml": aspp_cells(),
    "resnet.yaml": resnet_cells(),
    "crf.yaml": resnet_cells(crf=True)[:5],  # the other v1/v2 experiments score the CRF themselves
    "cityscapes.yaml": [
        cell("cityscapes_v2_r101", data__name="cityscapes", model__head="classifier", eval__mode="slide",
             eval__slide_crop=769, paper__miou=66.6),
        cell("cityscapes_v2_r101_largefov", data__name="cityscapes", model__head="atrous_classifier",
             model__aspp_rates=[12], eval__mode="slide", paper__miou=69.2),
        cell("cityscapes_v2_r101_aspp", data__name="cityscapes", model__head="atrous_classifier",
             model__aspp_rates=[6, 12, 18, 24], data__scale_range=[1.0, 1.0], eval__mode="slide", paper__miou=70.4),
        cell("cityscapes_v2_r101_aspp_aug", data__name="cityscapes", model__aspp_rates=[6, 12, 18, 24],
             data__scale_range=[0.5, 1.5], crf__enabled=True, crf__search=True, eval__mode="slide", paper__miou=71.0,
             paper__miou_crf=71.4),
        cell("cityscapes_v3", data__name="cityscapes", model__generation="v3", data__crop_size=769,
             data__batch_size=16, trainer__max_steps=90000, eval__canvas=[1025, 2049], paper__miou=77.23,
             protocols=[("", 16, 1, False), ("os8", 8, 1, False), ("os8_ms", 8, 3, False),
                        ("os8_ms_flip", 8, 3, True)]),
        cell("cityscapes_v3plus", data__name="cityscapes", model__generation="v3plus", data__crop_size=769,
             data__batch_size=16, trainer__max_steps=90000, eval__canvas=[1025, 2049], paper__miou=None),
    ],
    "multi_grid.yaml": [
        *[cell(f"v3_block7_mg{''.join(map(str, mg))}", **BLOCK7, model__multi_grid=mg, paper__miou=miou)
          for mg, miou in [([1, 1, 1], 75.76), ([1, 2, 1], 76.66), ([1, 2, 3], 76.11), ([1, 2, 4], 76.02),
                           ([2, 2, 2], 74.62)]],
        cell("v3_aspp_mg111", **V3_ASPP, model__multi_grid=[1, 1, 1], model__aspp_rates=[6, 12, 18], paper__miou=75.36),
        cell("v3_aspp_mg121", **V3_ASPP, model__multi_grid=[1, 2, 1], model__aspp_rates=[6, 12, 18], paper__miou=75.93),
        cell("v3_aspp_mg124", **V3_ASPP, model__multi_grid=[1, 2, 4], model__aspp_rates=[6, 12, 18], paper__miou=76.58),
        cell("v3_aspp_mg124_r24", **V3_ASPP, model__multi_grid=[1, 2, 4], model__aspp_rates=[6, 12, 18, 24],
             paper__miou=76.46),
    ],
    "output_stride.yaml": [
        *[cell(f"v3_r50_block7_os{os_}", **{**BLOCK7, "model.backbone": "resnet50", "model.output_stride": os_},
               model__multi_grid=[1, 1, 1], eval__output_stride=None, paper__miou=miou)
          for os_, miou in [(8, 75.18), (16, 73.88), (32, 70.06), (64, 59.99), (128, 42.34), (256, 20.29)]],
        cell("v3_train_os8", **{**V3, "model.output_stride": 8, "data.batch_size": 6}, paper__miou=74.45,
             paper__metrics={"val/mIoU_os8": 75.62}, protocols=[("", 16, 1, False), ("os8", 8, 1, False)]),
        cell("v3_train_os32", **{**V3, "model.output_stride": 32, "data.batch_size": 24}, paper__miou=75.90,
             paper__metrics={"val/mIoU_os8": 75.75, "val/mIoU_os32": 75.43},
             protocols=[("", 16, 1, False), ("os8", 8, 1, False), ("os32", 32, 1, False)]),
    ],
    "inference.yaml": [
        v3_cell(paper__metrics={"val/mIoU_os8": 78.51, "val/mIoU_os8_ms": 79.45, "val/mIoU_os8_ms_flip": 79.77}),
        cell("v3plus", **V3, model__generation="v3plus", model__decoder_channels=48, model__decoder_convs=2,
             paper__miou=78.85, protocols=V3PLUS_PROTOCOLS,
             paper__metrics={"val/mIoU_ms": 80.09, "val/mIoU_ms_flip": 80.22, "val/mIoU_os8": 79.35,
                             "val/mIoU_os8_ms": 80.43, "val/mIoU_os8_ms_flip": 80.57}),
        cell("v3plus_train_os32", model__generation="v3plus", model__output_stride=32, paper__miou=77.37,
             paper__metrics={"val/mIoU_os16": 77.80, "val/mIoU_os8": 77.92},
             protocols=[("", 32, 1, False), ("os16", 16, 1, False), ("os8", 8, 1, False)]),
        cell("v3_coco", **V3_ASPP, model__image_pooling=True, optim__lr=0.0001,
             paper__metrics={"val/mIoU_os8_ms_flip": 82.70}, protocols=[("", 16, 1, False), ("os8_ms_flip", 8, SIX, True)]),
    ],
    "decoder.yaml": [
        cell("v3plus_1conv", **V3, model__generation="v3plus", model__decoder_channels=width, model__decoder_convs=1,
             **{f"paper.metrics.decoder_channels_{width}": miou})
        for width, miou in [(8, 77.61), (16, 77.92), (32, 78.16), (48, 78.21), (64, 77.94)]
    ],
    "xception.yaml": [
        cell("v3_xception65", **X65, model__generation="v3", model__separable=False, paper__miou=79.17,
             protocols=X65_ALL_PROTOCOLS, paper__metrics={"val/mIoU_ms": 80.57, "val/mIoU_ms_flip": 80.79,
                                                          "val/mIoU_os8": 79.64, "val/mIoU_os8_ms": 81.15,
                                                          "val/mIoU_os8_ms_flip": 81.34}),
        cell("v3plus_xception65", **X65, model__generation="v3plus", model__separable=False, paper__miou=79.93,
             protocols=X65_ALL_PROTOCOLS, paper__metrics={"val/mIoU_ms": 81.38, "val/mIoU_ms_flip": 81.44,
                                                          "val/mIoU_os8": 80.22, "val/mIoU_os8_ms": 81.60,
                                                          "val/mIoU_os8_ms_flip": 81.63}),
        cell("v3plus_xception65_sc", **X65, model__generation="v3plus", model__separable=True, paper__miou=79.79,
             protocols=X65_SC_PROTOCOLS, paper__metrics={"val/mIoU_ms_flip": 81.21, "val/mIoU_os8": 80.02,
                                                         "val/mIoU_os8_ms_flip": 81.39}),
        cell("v3plus_xception65_sc_coco", **X65, model__separable=True, paper__miou=82.20, protocols=X65_SC_PROTOCOLS,
             paper__metrics={"val/mIoU_ms_flip": 83.34, "val/mIoU_os8": 82.45, "val/mIoU_os8_ms_flip": 83.58}),
        cell("v3plus_xception65_sc_jft", **X65, model__separable=True, paper__miou=83.03, protocols=X65_SC_PROTOCOLS,
             paper__metrics={"val/mIoU_ms_flip": 84.22, "val/mIoU_os8": 83.39, "val/mIoU_os8_ms_flip": 84.56}),
    ],
    "cityscapes_xception.yaml": [
        cell("cityscapes_v3_xception65", **X65_CITYSCAPES, model__backbone="xception65", model__generation="v3",
             model__image_pooling=True, paper__miou=77.33),
        cell("cityscapes_v3plus_xception65", **X65_CITYSCAPES, model__backbone="xception65",
             model__generation="v3plus", model__image_pooling=True, paper__miou=78.79,
             protocols=[("", 16, 1, False), ("os8_ms_flip", 8, 3, True)],
             paper__metrics={"val/mIoU_os8_ms_flip": 80.42}),
        cell("cityscapes_v3plus_xception65_noip", **X65_CITYSCAPES, model__backbone="xception65",
             model__generation="v3plus", model__image_pooling=False, paper__miou=79.14),
        cell("cityscapes_v3plus_xception71", **X65_CITYSCAPES, model__backbone="xception71",
             model__generation="v3plus", model__image_pooling=False, paper__miou=79.55),
    ],
    "timm_backbones.yaml": [
        cell("v3plus_timm", **{**V3, "model.backbone": name}, model__generation="v3plus", model__multi_grid=[1, 1, 1],
             paper__miou=None, protocols=[("", 16, 1, False), ("os8", 8, 1, False)])
        for name in ["timm:resnet50d", "timm:resnest50d", "timm:regnety_032"]
    ],
    "decoder_convs.yaml": [  # one conv: decoder.yaml's 48-wide cell; two: v3plus in inference.yaml
        cell("v3plus_1conv", **V3, model__generation="v3plus", model__decoder_channels=48, model__decoder_convs=3,
             **{"paper.metrics.decoder_convs_3": 78.02}),
    ],
    "decoder_variants.yaml": [
        cell("v3plus_1conv_128", **V3, model__generation="v3plus", model__decoder_convs=1, model__decoder_width=128,
             paper__miou=77.25),
        cell("v3plus_1conv_1x1", **V3, model__generation="v3plus", model__decoder_convs=1, model__decoder_kernel=1,
             paper__miou=78.07),
        cell("v3plus_conv2_conv3", **V3, model__generation="v3plus", model__decoder_convs=1,
             model__decoder_features=["layer2", "layer1"], paper__miou=78.61),
    ],
    "lr_recipe.yaml": [
        cell(f"v2_largefov_poly_b{batch}_{steps // 1000}k", **{**V2_VGG, "data.batch_size": batch,
                                                              "trainer.max_steps": steps},
             model__aspp_rates=[12], optim__schedule="poly", crf__enabled=False, paper__miou=miou)
        for batch, steps, miou in [(30, 6000, 63.42), (30, 10000, 64.90), (10, 10000, 64.71)]
    ],
    "cascade.yaml": [
        *[cell(f"v3_r50_block{b}", **{**BLOCK7, "model.backbone": "resnet50", "model.cascade_blocks": b - 4},
               model__multi_grid=[1, 1, 1], paper__miou=miou) for b, miou in [(4, 64.81), (5, 72.14), (6, 74.29)]],
        *[cell(f"v3_block{b}_mg{''.join(map(str, mg))}", **{**BLOCK7, "model.cascade_blocks": b - 4},
               model__multi_grid=list(mg), paper__miou=miou)
          for mg, values in V3_TABLE3.items() for b, miou in zip((4, 5, 6), values)],
    ],
    "training.yaml": [
        cell("v3_no_bn_finetune", **V3_ASPP, model__image_pooling=True, model__bn="frozen_stats", paper__miou=75.95),
        cell("v3_downsample_gt", **V3_ASPP, model__image_pooling=True, optim__loss_at="logits", paper__miou=76.01),
        cell("v3_crop321", **{**V3_ASPP, "data.crop_size": 321}, model__image_pooling=True, paper__miou=67.22),
        *[cell(f"v3_batch{b}", **{**V3_ASPP, "data.batch_size": b}, model__image_pooling=True, paper__miou=miou)
          for b, miou in [(4, 64.43), (8, 75.76), (12, 76.49)]],
    ],
}


def lookup(cfg, key):
    """A dotted key of the resolved config ('paper.metrics.x' reaches into dicts); 'protocols' too."""
    if key == "protocols":
        return [(p.name, p.output_stride, len(p.scales), p.flip) for p in build_protocols(cfg)]
    node = to_dict(cfg)
    if key.startswith("paper.metrics."):
        return node["paper"]["metrics"].get(key.removeprefix("paper.metrics."))
    for part in key.split("."):
        node = node[part]
    return node


def grid_points(sweep):
    names = list(sweep["parameters"])
    choices = [spec["values"] if "values" in spec else [spec["value"]] for spec in sweep["parameters"].values()]
    return [dict(zip(names, values)) for values in itertools.product(*choices)]


def sweep_args(point):
    """`${args}` exactly as `wandb agent` expands it."""
    return create_sweep_command_args({"args": {key: {"value": value} for key, value in point.items()}})["args"]


def agent_command(sweep, point):
    """The whole command line an agent runs: the sweep's `command` with W&B's macros filled in."""
    macros = {"env": ["/usr/bin/env"], "interpreter": ["python"], "program": [sweep["program"]],
              "args": sweep_args(point)}
    out = []
    for part in sweep["command"]:
        out += macros[part[2:-1]] if part.startswith("${") else [part]
    return out


def resolve(point):
    """Parse a grid point's command line the way fit does, then resolve the experiment."""
    args, overrides = fit.parse_args(sweep_args(point))
    return load_experiment(args.experiment, overrides), overrides


# ---------------------------------------------------------------------------------------------------
# Structure: what W&B accepts (the server validates with the wandb/sweeps JSON schema; these are its
# rules for the keys used here), and what this project needs of every file.

SWEEP_KEYS = {"program", "method", "metric", "parameters", "command", "name", "description", "run_cap",
              "early_terminate", "project", "entity"}
DISTRIBUTIONS = {"uniform": {"min", "max"}, "int_uniform": {"min", "max"}, "q_uniform": {"min", "max", "q"},
                 "log_uniform_values": {"min", "max"}}


@pytest.mark.parametrize("name", sorted(LOAD))
def test_sweep_is_a_valid_wandb_sweep_config(name):
    sweep = LOAD[name]
    assert set(sweep) <= SWEEP_KEYS and {"program", "method", "metric", "parameters", "command"} <= set(sweep)
    assert sweep["method"] in ("grid", "random", "bayes")
    crf_search = sweep["program"] == "deeplab_lit.crf_search"  # maximises the CRF's score, not the network's
    assert sweep["metric"] == {"name": "val/mIoU_crf" if crf_search else "val/mIoU", "goal": "maximize"}
    assert sweep["command"] == ["${env}", "${interpreter}", "-m", "${program}", "${args}"]
    assert importlib.util.find_spec(sweep["program"]) is not None
    for key, spec in sweep["parameters"].items():
        assert len({"value", "values", "distribution"} & set(spec)) == 1, key
        if "values" in spec:
            assert spec["values"] and len({json.dumps(v) for v in spec["values"]}) == len(spec["values"]), key
        if "distribution" in spec:
            assert sweep["method"] != "grid", f"{key}: a grid needs discrete values"
            assert set(spec) == {"distribution"} | DISTRIBUTIONS[spec["distribution"]], key
            assert spec["min"] < spec["max"], key
    if sweep["method"] == "grid":
        assert len(set(sweep["parameters"]["seed"]["values"])) >= 2, "every grid cell needs two seeds or more"
    else:
        assert isinstance(sweep.get("run_cap"), int), "a random or bayes sweep needs a run cap"
    if not crf_search:
        # experiments default to offline W&B; a sweep's run must report to its sweep
        assert "experiment" in sweep["parameters"] and sweep["parameters"]["wandb.mode"] == {"value": "online"}


@pytest.mark.parametrize("name", FIT_SWEEPS)
def test_every_parameter_is_a_config_key(name):
    from lightning import Trainer

    trainer_args = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
    for key in LOAD[name]["parameters"]:
        assert key == "experiment" or key in flat_keys() or (
            key.startswith("trainer.") and key.removeprefix("trainer.") in trainer_args), key


def test_the_sweeps_cover_every_paper_row():
    swept = {point["experiment"] for name in FIT_SWEEPS for point in grid_points(LOAD[name])}
    assert swept == set(list_experiments()) - {"demo"}
    assert set(EXPECTED) == set(FIT_SWEEPS)


# ---------------------------------------------------------------------------------------------------
# Every grid point resolves to exactly one paper row, and every row is trained with two seeds or more.


def expected_cell(name, point):
    swept = {k: v for k, v in point.items() if k not in ("experiment", "seed", "wandb.mode")}
    candidates = [c for c in EXPECTED[name]
                  if c["experiment"] == point["experiment"] and all(c.get(k) == v for k, v in swept.items())]
    assert len(candidates) == 1, f"{name}: grid point {point} is not exactly one paper row"
    return candidates[0]


@pytest.mark.parametrize("name", FIT_SWEEPS)
def test_grid_points_resolve_to_exactly_the_paper_rows(name):
    seeds = {}
    for point in grid_points(LOAD[name]):
        cfg, overrides = resolve(point)
        assert (cfg.name, cfg.seed, cfg.wandb.mode) == (point["experiment"], point["seed"], "online")
        expected = expected_cell(name, point)
        for key, value in expected.items():
            if key != "experiment":
                assert lookup(cfg, key) == value, f"{name} {point}: {key}"
        seeds.setdefault(EXPECTED[name].index(expected), set()).add(cfg.seed)
    assert sorted(seeds) == list(range(len(EXPECTED[name]))), f"{name}: rows not covered"
    assert all(len(s) >= 2 for s in seeds.values())


def test_no_two_grid_points_share_a_run_directory():
    """fit derives the run directory from the experiment and its overrides: a cell in two sweep files
    (or twice in one) would have two agents training into one directory when the sweeps run at once."""
    owners = {}
    for name in FIT_SWEEPS:
        for point in grid_points(LOAD[name]):
            cfg, overrides = resolve(point)
            run_dir = resolve_experiment(cfg.name, overrides).default_run_dir()
            assert run_dir not in owners, f"{run_dir}: {owners.get(run_dir)} and {name} {point}"
            owners[run_dir] = (name, point)
    assert len(owners) == sum(len(grid_points(LOAD[name])) for name in FIT_SWEEPS)


def test_agent_command_lines_print_the_resolved_config():
    """Two points through the real program, as `wandb agent` would start them (+ --print-config)."""
    checked = []
    for name, point in [("decoder.yaml", grid_points(LOAD["decoder.yaml"])[0]),
                        ("crf.yaml", grid_points(LOAD["crf.yaml"])[-1])]:
        command = agent_command(LOAD[name], point)
        checked.append(command)
        result = subprocess.run([*command, "--print-config"], capture_output=True, text=True, env=ENV, cwd=REPO,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stdout == to_yaml(resolve(point)[0])
    assert checked[0] == ["/usr/bin/env", "python", "-m", "deeplab_lit.fit", "--experiment=v3plus_1conv",
                          "--model.decoder_channels=8", "--seed=0", "--wandb.mode=online"]
    assert checked[1][4:] == ["--experiment=v2_r101_largefov", "--crf.enabled=True", "--seed=1",
                              "--wandb.mode=online"]


def test_crf_search_sweep_points_are_accepted_by_the_search(tmp_path):
    from deeplab_lit import crf_search as search

    sweep = LOAD["crf_search.yaml"]
    parameters = sweep["parameters"]
    # the union of v1's (w1 5-10, xy 50-100, rgb 3-10) and v2's (3-6, 30-100, 3-6) cross-validation ranges
    assert [(parameters[k]["min"], parameters[k]["max"]) for k in ("crf.bi_w", "crf.bi_xy_std", "crf.bi_rgb_std")] \
        == [(3, 10), (30, 120), (3, 10)]
    for bound in ("min", "max"):
        point = {k: spec["value"] if "value" in spec else spec[bound] for k, spec in parameters.items()}
        args, overrides = search.parse_args(sweep_args(point))
        assert (args.checkpoint, args.images) == (parameters["checkpoint"]["value"], 100)
        assert sorted(overrides) == sorted(f"{k}={point[k]}" for k in ("crf.bi_w", "crf.bi_xy_std", "crf.bi_rgb_std"))
    # the real program takes the arguments (it checks the crf.* keys first) and stops at the checkpoint
    result = subprocess.run(agent_command(sweep, point), capture_output=True, text=True, env=ENV, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --checkpoint {parameters['checkpoint']['value']}: no such file"


# ---------------------------------------------------------------------------------------------------
# SLURM: the job script, the launcher, and the script's own logic (fresh job, requeued job, USR1).


def _load_launcher():
    spec = importlib.util.spec_from_file_location("slurm_launch", SWEEPS / "slurm" / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LAUNCH = _load_launcher()
SWEEP = "ent/proj/abcd1234"


def test_sbatch_script_for_given_arguments(tmp_path):
    script = LAUNCH.render_sbatch(SWEEP, gpus=4, cpus_per_gpu=6, time="12:00:00", partition="gpu", account="lab",
                                  mem="128G", extra_sbatch=("--constraint=a100",), setup="source .venv/bin/activate",
                                  log_dir=tmp_path, workdir=REPO)
    lines = script.splitlines()
    assert [line for line in lines if line.startswith("#SBATCH")] == [
        "#SBATCH --job-name=sweep-abcd1234", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=24", "#SBATCH --time=12:00:00",
        f"#SBATCH --output={tmp_path}/%x-%j.out", "#SBATCH --open-mode=append", "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@180", "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --mem=128G",
        "#SBATCH --constraint=a100",
    ]
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    # sbatch reads #SBATCH lines only up to the first command
    assert max(i for i, line in enumerate(lines) if line.startswith("#SBATCH")) < first_command
    assert lines[first_command:first_command + 5] == [
        "set -uo pipefail", f"cd {REPO}", "source .venv/bin/activate", "export SLURM_JOB_NAME=interactive",
        "export NO_ALBUMENTATIONS_UPDATE=1"]
    assert f"export WANDB_DIR={tmp_path}/job-${{SLURM_JOB_ID}}" in lines
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    plain = LAUNCH.render_sbatch("abcd1234", log_dir=tmp_path).splitlines()
    assert "#SBATCH --gpus-per-node=1" in plain and not any(line.startswith("#SBATCH --partition") for line in plain)


@pytest.mark.parametrize("kwargs, message", [
    ({"sweep": "ent/proj/abc; rm -rf /"}, "is not SWEEP_ID, PROJECT/SWEEP_ID or ENTITY/PROJECT/SWEEP_ID"),
    ({"time": "1 day"}, "--time '1 day' must not be empty or contain spaces"),
    ({"gpus": 0}, "must be positive"),
])
def test_sbatch_rejects_bad_arguments(kwargs, message):
    from deeplab_lit.errors import UserError

    arguments = {"sweep": SWEEP, **kwargs}
    with pytest.raises(UserError, match=re.escape(message)):
        LAUNCH.render_sbatch(arguments.pop("sweep"), **arguments)


def test_launcher_dry_run_writes_the_script_and_the_submissions(tmp_path):
    result = subprocess.run([sys.executable, str(SWEEPS / "slurm" / "launch.py"), "submit", SWEEP, "--jobs", "3",
                             "--gpus", "2", "--log-dir", str(tmp_path), "--dry-run"],
                            capture_output=True, text=True, env=ENV, cwd=REPO)
    assert result.returncode == 0, result.stderr
    script = tmp_path / "abcd1234" / "agent.sbatch"
    assert result.stdout.splitlines() == [f"{script}: 3 job(s) of one agent on 2 GPU(s)",
                                          *[f"sbatch --parsable {script}"] * 3]
    assert script.read_text() == LAUNCH.render_sbatch(SWEEP, gpus=2, log_dir=tmp_path / "abcd1234")


def run_job(tmp_path, setup):
    """Run the real job script under bash; the cluster's commands (wandb, env, scontrol) are shell functions."""
    script = tmp_path / "agent.sbatch"
    script.write_text(LAUNCH.render_sbatch(SWEEP, setup=setup, log_dir=tmp_path / "logs", workdir=REPO))
    env = {**ENV, "SLURM_JOB_ID": "4242", "TEST_OUT": str(tmp_path)}
    return subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_fresh_job_starts_one_agent_for_one_run(tmp_path):
    job = run_job(tmp_path, """wandb() { printf '%s\\n' "$@" > "$TEST_OUT/called"; }""")
    out, err = job.communicate(timeout=120)
    assert job.returncode == 0, err
    assert (tmp_path / "called").read_text().splitlines() == ["agent", "--count", "1", "--forward-signals", SWEEP]
    assert (tmp_path / "logs" / "job-4242").is_dir()


def test_requeued_job_resumes_the_run_its_agent_took(tmp_path):
    point = {"experiment": "v3_block7_mg121", "model.multi_grid": [1, 2, 4], "crf.enabled": True, "seed": 1,
             "wandb.mode": "online"}
    params = tmp_path / "logs" / "job-4242" / "wandb" / "sweep-abcd1234" / "config-r9x8yz.yaml"
    save_config_file_from_dict(str(params), {k: {"value": v} for k, v in point.items()})  # as the agent writes it
    job = run_job(tmp_path, """env() { printf '%s\\n' "$@" > "$TEST_OUT/called"; }""")
    out, err = job.communicate(timeout=120)
    assert job.returncode == 0, err
    called = (tmp_path / "called").read_text().splitlines()
    assert called[:9] == ["WANDB_RUN_ID=r9x8yz", "WANDB_RESUME=allow", "WANDB_SWEEP_ID=abcd1234",
                          f"WANDB_SWEEP_PARAM_PATH={params}", "WANDB_ENTITY=ent", "WANDB_PROJECT=proj", "python", "-m",
                          "deeplab_lit.fit"]
    assert called[9:] == sweep_args(point) == ["--experiment=v3_block7_mg121", "--model.multi_grid=[1, 2, 4]",
                                               "--crf.enabled=True", "--seed=1", "--wandb.mode=online"]
    cfg, _ = resolve(point)
    assert cfg.model.multi_grid == (1, 2, 4) and cfg.crf.enabled is True


def test_usr1_before_the_time_limit_requeues_and_waits_for_the_run(tmp_path):
    setup = ("""wandb() { touch "$TEST_OUT/started"; sleep 3; return 7; }; """
             """scontrol() { printf '%s\\n' "$@" > "$TEST_OUT/scontrol"; }""")
    started = time.monotonic()
    job = run_job(tmp_path, setup)
    while not (tmp_path / "started").exists():
        assert job.poll() is None and time.monotonic() - started < 60, job.communicate()
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    out, err = job.communicate(timeout=60)
    assert job.returncode == 7, err  # the run's own exit status, after it ended
    assert time.monotonic() - started >= 3
    assert (tmp_path / "scontrol").read_text().splitlines() == ["requeue", "4242"]
    assert "job 4242: time limit near, requeueing" in out


def test_next_command_refuses_two_runs_in_one_job(tmp_path):
    from deeplab_lit.errors import UserError

    for run_id in ("a", "b"):
        params = tmp_path / "wandb" / "sweep-x" / f"config-{run_id}.yaml"
        save_config_file_from_dict(str(params), {"seed": {"value": 0}})
    with pytest.raises(UserError, match="2 sweep runs in one job's W&B directory"):
        LAUNCH.next_command(SWEEP, tmp_path)


# ---------------------------------------------------------------------------------------------------
# DDP: a two-process run started with sweep-style arguments resolves the same config on every rank.
# Lightning's launcher (the same one fit's Trainer uses for strategy ddp) re-runs the command line for
# rank 1; each rank parses its own argv with fit's parser.

PROBE = """
import hashlib, json, os, sys
import torch.distributed as dist
from lightning.fabric import Fabric
from deeplab_lit.config import load_experiment, to_yaml
from deeplab_lit.fit import parse_args

args, overrides = parse_args(sys.argv[1:])
cfg = load_experiment(args.experiment, overrides)
fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
fabric.launch()
mine = {"rank": fabric.global_rank, "argv": sys.argv[1:], "sha": hashlib.sha256(to_yaml(cfg).encode()).hexdigest(),
        "multi_grid": cfg.model.multi_grid, "seed": cfg.seed}
gathered = [None] * fabric.world_size
dist.all_gather_object(gathered, mine)
if fabric.global_rank == 0:
    with open(os.environ["PROBE_OUT"], "w") as stream:
        json.dump(gathered, stream)
"""


def test_ddp_ranks_resolve_the_same_config_from_sweep_arguments(tmp_path):
    point = {"experiment": "v3_block7_mg121", "model.multi_grid": [1, 2, 4], "crf.enabled": True, "seed": 3,
             "wandb.mode": "online"}
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    result = subprocess.run([sys.executable, str(probe), *sweep_args(point)], capture_output=True, text=True,
                            env={**ENV, "PROBE_OUT": str(tmp_path / "ranks.json")}, cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    expected = hashlib.sha256(to_yaml(resolve(point)[0]).encode()).hexdigest()
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["argv"] for r in ranks] == [sweep_args(point)] * 2
    assert [r["sha"] for r in ranks] == [expected] * 2
    assert [(r["multi_grid"], r["seed"]) for r in ranks] == [([1, 2, 4], 3)] * 2
