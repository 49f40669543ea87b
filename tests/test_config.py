"""Experiments resolve, match the rows of docs/papers.md, and bad overrides fail in one line."""
import contextlib
import io
import re
from types import SimpleNamespace

import pytest

from deeplab_lit.config import (
    EVALUATION, INFRASTRUCTURE, RUN, flat_keys, key_role, list_experiments, load_experiment, resolve_experiment,
    resolve_file)
from deeplab_lit.config.help import key_rows
from deeplab_lit.errors import UserError

# id: the keys that define the row, as docs/papers.md states them.
V1 = dict(generation="v1", backbone="vgg16", head="fc", output_stride=8, crop=321, batch=20, lr=0.001, steps=6000,
          loss_at="logits", canvas=[513, 513])
V2_VGG = dict(generation="v2", backbone="vgg16", head="fc", fc6_width=1024, fc6_kernel=3, output_stride=8, crop=321,
              batch=10, lr=0.001, steps=20000, scale=[1.0, 1.0], loss_at="logits")
V2_R101 = dict(generation="v2", backbone="resnet101", output_stride=8, crop=321, batch=10, lr=0.00025, steps=20000,
               bn="frozen", loss_at="logits", msc_sizes="caffe")
V3 = dict(generation="v3", backbone="resnet101", output_stride=16, crop=513, batch=16, lr=0.007, steps=30000,
          scale=[0.5, 2.0], scale_step=0.25, bn="finetune", loss_at="input", canvas=[513, 513])
BLOCK7 = dict(V3, head="classifier", cascade_blocks=3)
X65 = dict(V3, backbone="xception65", multi_grid=[1, 1, 1], aspp_rates=[6, 12, 18], weight_decay=0.00004,
           depthwise_weight_decay=False)
X65_CITYSCAPES = dict(X65, data="cityscapes", crop=769, batch=16, steps=90000, separable=True, canvas=[1025, 2049])
ROWS = {
    "v1_7x7": {**V1, "fc6_kernel": 7, "aspp_rates": [4], "fc6_width": 4096, "crf_search": True, "miou": 64.38,
               "miou_crf": 67.64},
    "v1_4x4": {**V1, "fc6_kernel": 4, "aspp_rates": [4], "fc6_width": 4096, "crf_search": True, "miou": 59.80,
               "miou_crf": 63.74},
    "v1_4x4_r8": {**V1, "fc6_kernel": 4, "aspp_rates": [8], "fc6_width": 4096, "crf_search": True, "miou": 63.41,
                  "miou_crf": 67.14},
    "largefov": {**V1, "fc6_kernel": 3, "aspp_rates": [12], "fc6_width": 1024, "batch": 30, "pool5_avg": True,
                 "crf_search": False, "miou": 62.25, "miou_crf": 67.64},
    "v1_msc": {**V1, "fc6_kernel": 4, "aspp_rates": [4], "msc_features": True, "pretrained": "run:v1_4x4",
               "trainable": ["head.msc", "head.branches.0.fc8"], "crf_search": True, "miou": 61.30, "miou_crf": 65.21},
    "v1_msc_largefov": {**V1, "fc6_kernel": 3, "aspp_rates": [12], "fc6_width": 1024, "msc_features": True,
                        "batch": 30, "pool5_avg": True, "pretrained": "run:largefov", "crf_search": True,
                        "miou": 64.21, "miou_crf": 68.70},
    "v2_largefov": {**V2_VGG, "aspp_rates": [12], "pool5_avg": True, "crf_search": False, "miou": 65.76,
                    "miou_crf": 69.84},
    "v2_largefov_poly_b30_6k": {**V2_VGG, "aspp_rates": [12], "batch": 30, "steps": 6000, "miou": 63.42},
    "v2_largefov_poly_b30_10k": {**V2_VGG, "aspp_rates": [12], "batch": 30, "steps": 10000, "miou": 64.90},
    "v2_largefov_poly_b10_10k": {**V2_VGG, "aspp_rates": [12], "batch": 10, "steps": 10000, "miou": 64.71},
    "aspp_s": {**V2_VGG, "aspp_rates": [2, 4, 8, 12], "crf_search": True, "miou": 66.98, "miou_crf": 69.73},
    "aspp_l": {**V2_VGG, "aspp_rates": [6, 12, 18, 24], "crf_search": True, "miou": 68.96, "miou_crf": 71.57},
    "v2_r101": {**V2_R101, "head": "classifier", "msc_scales": [], "scale": [1.0, 1.0], "miou": 68.72},
    "v2_r101_msc": {**V2_R101, "head": "classifier", "msc_scales": [1.0, 0.75, 0.5], "scale": [1.0, 1.0],
                    "miou": 71.27},
    "v2_r101_msc_coco": {**V2_R101, "head": "classifier", "msc_scales": [1.0, 0.75, 0.5], "miou": 73.28},
    "v2_r101_msc_coco_aug": {**V2_R101, "head": "classifier", "scale": [0.5, 1.5], "miou": 74.87},
    "v2_r101_largefov": {**V2_R101, "head": "atrous_classifier", "aspp_rates": [12], "miou": 75.54},
    "v2_r101_aspp": {**V2_R101, "head": "atrous_classifier", "aspp_rates": [6, 12, 18, 24], "crf": True,
                     "miou": 76.35, "miou_crf": 77.69},
    "cityscapes_v2_r101": {"head": "classifier", "data": "cityscapes", "eval_mode": "slide", "miou": 66.6},
    "cityscapes_v2_r101_largefov": {"head": "atrous_classifier", "aspp_rates": [12], "eval_mode": "slide",
                                    "miou": 69.2},
    "cityscapes_v2_r101_aspp": {"aspp_rates": [6, 12, 18, 24], "scale": [1.0, 1.0], "miou": 70.4},
    "cityscapes_v2_r101_aspp_aug": {"aspp_rates": [6, 12, 18, 24], "scale": [0.5, 1.5], "crf": True,
                                    "miou": 71.0, "miou_crf": 71.4},
    "v3_r50_block7_os8": {**V3, "backbone": "resnet50", "cascade_blocks": 3, "output_stride": 8, "miou": 75.18},
    "v3_r50_block7_os16": {**V3, "backbone": "resnet50", "cascade_blocks": 3, "output_stride": 16, "miou": 73.88},
    "v3_r50_block7_os32": {**V3, "backbone": "resnet50", "cascade_blocks": 3, "output_stride": 32, "miou": 70.06},
    "v3_block7_mg111": {**V3, "cascade_blocks": 3, "multi_grid": [1, 1, 1], "miou": 75.76},
    "v3_block7_mg121": {**V3, "cascade_blocks": 3, "multi_grid": [1, 2, 1], "miou": 76.66},
    "v3_block7_mg123": {**V3, "cascade_blocks": 3, "multi_grid": [1, 2, 3], "miou": 76.11},
    "v3_block7_mg124": {**V3, "cascade_blocks": 3, "multi_grid": [1, 2, 4], "miou": 76.02},
    "v3_block7_mg222": {**V3, "cascade_blocks": 3, "multi_grid": [2, 2, 2], "miou": 74.62},
    "v3_aspp_mg111": {**V3, "head": "aspp", "multi_grid": [1, 1, 1], "aspp_rates": [6, 12, 18],
                      "image_pooling": False, "miou": 75.36},
    "v3_aspp_mg121": {**V3, "head": "aspp", "multi_grid": [1, 2, 1], "image_pooling": False, "miou": 75.93},
    "v3_aspp_mg124": {**V3, "head": "aspp", "multi_grid": [1, 2, 4], "image_pooling": False, "miou": 76.58},
    "v3_aspp_mg124_r24": {**V3, "head": "aspp", "aspp_rates": [6, 12, 18, 24], "image_pooling": False,
                          "miou": 76.46},
    "v3": {**V3, "head": "aspp", "multi_grid": [1, 2, 4], "aspp_rates": [6, 12, 18], "image_pooling": True,
           "cascade_blocks": 0, "miou": 77.21},
    "v3_train_os8": {**V3, "output_stride": 8, "batch": 6, "eval_os": 16, "miou": 74.45},
    "v3_train_os32": {**V3, "output_stride": 32, "batch": 24, "eval_os": 16, "miou": 75.90},
    "cityscapes_v3": {"generation": "v3", "data": "cityscapes", "crop": 769, "batch": 16, "steps": 90000,
                      "canvas": [1025, 2049], "miou": 77.23},
    "v3plus": {**V3, "generation": "v3plus", "decoder_channels": 48, "decoder_convs": 2, "miou": 78.85},
    "v3plus_1conv": {**V3, "generation": "v3plus", "decoder_channels": 48, "decoder_convs": 1, "miou": 78.21},
    "v3plus_train_os32": {"generation": "v3plus", "output_stride": 32, "miou": 77.37},
    "cityscapes_v3plus": {"generation": "v3plus", "data": "cityscapes", "crop": 769, "batch": 16, "steps": 90000,
                          "canvas": [1025, 2049]},
    # v3 Table 1 beyond output stride 32; Table 2; Table 3's other columns; Tables 8 and 9; Table 6 COCO
    **{f"v3_r50_block7_os{os_}": {**BLOCK7, "backbone": "resnet50", "output_stride": os_, "multi_grid": [1, 1, 1],
                                  "miou": miou} for os_, miou in [(64, 59.99), (128, 42.34), (256, 20.29)]},
    **{f"v3_r50_block{b}": {**BLOCK7, "backbone": "resnet50", "cascade_blocks": b - 4, "multi_grid": [1, 1, 1],
                            "miou": miou} for b, miou in [(4, 64.81), (5, 72.14), (6, 74.29)]},
    **{f"v3_block{b}_mg{''.join(map(str, mg))}": {**BLOCK7, "cascade_blocks": b - 4, "multi_grid": list(mg),
                                                   "miou": miou}
       for mg, values in [((1, 1, 1), (68.39, 73.21, 75.34)), ((1, 2, 1), (70.23, 75.67, 76.09)),
                          ((1, 2, 3), (73.14, 75.78, 75.96)), ((1, 2, 4), (73.45, 75.74, 75.85)),
                          ((2, 2, 2), (71.45, 74.30, 74.70))]
       for b, miou in zip((4, 5, 6), values)},
    "v3_no_bn_finetune": {**V3, "head": "aspp", "bn": "frozen_stats", "miou": 75.95},
    "v3_downsample_gt": {**V3, "head": "aspp", "loss_at": "logits", "miou": 76.01},
    "v3_crop321": {**V3, "head": "aspp", "crop": 321, "miou": 67.22},
    "v3_batch4": {**V3, "head": "aspp", "batch": 4, "miou": 64.43},
    "v3_batch8": {**V3, "head": "aspp", "batch": 8, "miou": 75.76},
    "v3_batch12": {**V3, "head": "aspp", "batch": 12, "miou": 76.49},
    "v3_coco": {**V3, "head": "aspp", "lr": 0.0001, "miou": None},
    "v3plus_1conv_128": {**V3, "generation": "v3plus", "decoder_convs": 1, "decoder_width": 128, "miou": 77.25},
    "v3plus_1conv_1x1": {**V3, "generation": "v3plus", "decoder_convs": 1, "decoder_kernel": 1, "miou": 78.07},
    "v3plus_conv2_conv3": {**V3, "generation": "v3plus", "decoder_convs": 1,
                           "decoder_features": ["layer2", "layer1"], "miou": 78.61},
    # v3+ Table 5 (Xception-65; same protocol as v3, weight decay 4e-5, no multi-grid) and Table 7 (a)
    "v3_xception65": {**X65, "generation": "v3", "separable": False, "miou": 79.17},
    "v3plus_xception65": {**X65, "generation": "v3plus", "decoder_convs": 2, "separable": False, "miou": 79.93},
    "v3plus_xception65_sc": {**X65, "generation": "v3plus", "separable": True, "miou": 79.79},
    "v3plus_xception65_sc_coco": {**X65, "generation": "v3plus", "separable": True, "miou": 82.20},
    "v3plus_xception65_sc_jft": {**X65, "generation": "v3plus", "separable": True, "miou": 83.03},
    "cityscapes_v3_xception65": {**X65_CITYSCAPES, "generation": "v3", "image_pooling": True, "miou": 77.33},
    "cityscapes_v3plus_xception65": {**X65_CITYSCAPES, "generation": "v3plus", "image_pooling": True, "miou": 78.79},
    "cityscapes_v3plus_xception65_noip": {**X65_CITYSCAPES, "generation": "v3plus", "image_pooling": False,
                                          "miou": 79.14},
    "cityscapes_v3plus_xception71": {**X65_CITYSCAPES, "backbone": "xception71", "generation": "v3plus",
                                     "image_pooling": False, "miou": 79.55},
    # beyond the papers: the v3+ recipe on a timm backbone (no paper number)
    "v3plus_timm": {**V3, "generation": "v3plus", "backbone": "timm:resnet50d", "multi_grid": [1, 1, 1],
                    "miou": None},
}

GETTERS = {
    "generation": lambda c: c.model.generation, "backbone": lambda c: c.model.backbone,
    "head": lambda c: c.model.head, "output_stride": lambda c: c.model.output_stride,
    "aspp_rates": lambda c: list(c.model.aspp_rates), "multi_grid": lambda c: list(c.model.multi_grid),
    "cascade_blocks": lambda c: c.model.cascade_blocks, "image_pooling": lambda c: c.model.image_pooling,
    "fc6_kernel": lambda c: c.model.fc6_kernel, "fc6_width": lambda c: c.model.fc6_width,
    "msc_features": lambda c: c.model.msc_features, "msc_scales": lambda c: list(c.model.msc_scales),
    "decoder_channels": lambda c: c.model.decoder_channels, "decoder_convs": lambda c: c.model.decoder_convs,
    "bn": lambda c: c.model.bn, "crop": lambda c: c.data.crop_size, "batch": lambda c: c.data.batch_size,
    "loss_at": lambda c: c.optim.loss_at, "canvas": lambda c: list(c.eval.canvas),
    "scale_step": lambda c: c.data.scale_step, "pool5_avg": lambda c: c.model.pool5_avg,
    "msc_sizes": lambda c: c.model.msc_sizes, "pretrained": lambda c: c.model.pretrained,
    "trainable": lambda c: list(c.model.trainable), "crf_search": lambda c: c.crf.search,
    "decoder_width": lambda c: c.model.decoder_width, "decoder_kernel": lambda c: c.model.decoder_kernel,
    "decoder_features": lambda c: list(c.model.decoder_features),
    "scale": lambda c: list(c.data.scale_range), "data": lambda c: c.data.name, "lr": lambda c: c.optim.lr,
    "steps": lambda c: c.trainer["max_steps"], "crf": lambda c: c.crf.enabled,
    "eval_mode": lambda c: c.eval.mode, "eval_os": lambda c: c.eval.output_stride,
    "miou": lambda c: c.paper.miou, "miou_crf": lambda c: c.paper.miou_crf,
    "separable": lambda c: c.model.separable, "weight_decay": lambda c: c.optim.weight_decay,
    "depthwise_weight_decay": lambda c: c.optim.depthwise_weight_decay,
}


def test_every_paper_row_has_an_experiment_and_nothing_else_exists():
    assert set(list_experiments()) == set(ROWS) | {"demo"}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_experiment_matches_paper_row(name):
    cfg = load_experiment(name)
    for key, expected in ROWS[name].items():
        assert GETTERS[key](cfg) == expected, f"{name}: {key}"
    assert cfg.description and cfg.paper.source


def test_recipes_per_generation():
    # CRF values: the released models' where they were released (LargeFOV v1, DeepLabv2_VGG16 = v2 LargeFOV,
    # DeepLabv2_ResNet101 = v2 ASPP-L); the paper's cross-validation in fit for the other rows
    v1, v2v, v2r, v3 = (load_experiment(n) for n in ["largefov", "v2_largefov", "v2_r101_aspp", "v3"])
    assert (v1.crf.bi_w, v1.crf.bi_xy_std, v1.crf.bi_rgb_std, v1.crf.pos_w, v1.crf.pos_xy_std) == (4, 121, 5, 3, 3)
    searched = [n for n in list_experiments() if load_experiment(n).crf.search and load_experiment(n).crf.enabled]
    assert sorted(searched) == ["aspp_l", "aspp_s", "cityscapes_v2_r101_aspp_aug", "v1_4x4", "v1_4x4_r8", "v1_7x7",
                                "v1_msc", "v1_msc_largefov"]
    assert all((load_experiment(n).crf.pos_w, load_experiment(n).crf.pos_xy_std) == (3, 3) for n in searched
               if n.startswith(("v1", "aspp")))  # v1 Sec. 4.1 / v2 Sec. 4.1.1: w2 = 3, sigma_gamma = 3
    assert (v1.optim.schedule, v1.optim.step_size, v1.optim.step_gamma) == ("step", 2000, 0.1)
    assert (v1.optim.new_lr_mult, v1.optim.bias_lr_mult, v1.optim.weight_decay) == (10, 2, 0.0005)
    assert (v2v.optim.schedule, v2v.optim.poly_power) == ("poly", 0.9)
    assert (v2v.crf.bi_w, v2v.crf.bi_xy_std, v2v.crf.bi_rgb_std, v2v.crf.pos_w, v2v.crf.pos_xy_std) == (4, 65, 3, 2, 2)
    assert (v2r.crf.bi_w, v2r.crf.bi_xy_std, v2r.crf.bi_rgb_std, v2r.crf.pos_w, v2r.crf.pos_xy_std) == (4, 67, 3, 3, 1)
    assert v2r.optim.new_lr_mult * v2r.optim.bias_lr_mult == 20 and not v2r.optim.bias_weight_decay
    assert (v3.model.bn_momentum, v3.optim.weight_decay, v3.optim.momentum) == (0.0003, 0.0001, 0.9)
    assert [p.name for p in v3.eval.protocols] == ["os8", "os8_ms", "os8_ms_flip"]
    assert v3.paper.metrics == {"val/mIoU_os8": 78.51, "val/mIoU_os8_ms": 79.45, "val/mIoU_os8_ms_flip": 79.77}


def test_overrides_are_typed():
    cfg = load_experiment("v3", ["model.output_stride=8", "model.multi_grid=[1, 2, 1]", "optim.lr=0.01",
                                 "crf.enabled=true", "trainer.max_steps=2", "wandb.tags=[a, b]"])
    assert cfg.model.output_stride == 8 and cfg.model.multi_grid == (1, 2, 1) and cfg.optim.lr == 0.01
    assert cfg.crf.enabled is True and cfg.trainer["max_steps"] == 2 and cfg.wandb.tags == ("a", "b")


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.output_stride=12", 'config key "model.output_stride": expected one of [8, 16, 32, 64, 128, 256]. Got value: 12'),
        ("model.outptu_stride=8", "unknown config key 'model.outptu_stride' (did you mean 'model.output_stride'?)"),
        ("trainer.max_step=3", "unknown config key 'trainer.max_step': not an argument of lightning.Trainer (did you mean 'trainer.max_steps'?)"),
        ("model.multi_grid=[1, 2]", "model.multi_grid=[1, 2]: needs three rates (r1, r2, r3)"),
        ("model.backbone=resnet18", 'config key "model.backbone": expected one of'),
        ("eval.output_stride=7", "eval.output_stride=7 is not valid; choose one of 8, 16, 32"),
        ("data.scale_range=[2.0, 0.5]", "data.scale_range=[2.0, 0.5]: needs [lo, hi] with 0 < lo <= hi"),
        ("noequals", "override 'noequals' is not of the form section.key=value"),
    ],
)
def test_bad_override_names_the_key(override, message):
    with pytest.raises(UserError) as error:
        load_experiment("v3", [override])
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_unknown_experiment_suggests():
    with pytest.raises(UserError, match=r"unknown experiment 'aspp_ll' \(did you mean 'aspp_l'\?\)"):
        load_experiment("aspp_ll")


def test_the_public_config_keys_exist():
    public_keys = {
        "model.generation", "model.backbone", "model.output_stride", "model.multi_grid", "model.aspp_rates",
        "model.image_pooling", "model.cascade_blocks", "model.msc_scales", "model.decoder_channels",
        "model.pretrained", "data.name", "data.root", "data.crop_size", "data.batch_size", "data.num_workers",
        "data.scale_range", "optim.lr", "optim.momentum", "optim.weight_decay", "optim.poly_power",
        "eval.output_stride", "eval.scales", "eval.flip", "eval.mode", "crf.enabled", "crf.iterations",
        "crf.bi_w", "crf.bi_xy_std", "crf.bi_rgb_std", "crf.pos_w", "crf.pos_xy_std", "crf.backend",
        "wandb.mode", "wandb.project", "wandb.entity", "wandb.group", "wandb.tags", "seed",
    }
    assert public_keys <= flat_keys()


def _fit(*args):
    """`python -m deeplab_lit.fit ARGS` as the command runs it (cli.run: one line and exit 2 for a UserError),
    in this process: a subprocess would pay torch's and Lightning's imports for every call."""
    from deeplab_lit.cli import run
    from deeplab_lit.fit import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run(main, list(args))
        except SystemExit as exit_:
            code = exit_.code
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_cli_list_print_config_and_errors():
    listed = _fit("--list")
    assert listed.returncode == 0 and len(listed.stdout.strip().splitlines()) == len(ROWS) + 1
    assert any(line.startswith("aspp_l ") and "ASPP-L" in line for line in listed.stdout.splitlines())
    printed = _fit("--experiment", "v3", "--model.output_stride=8", "--print-config")
    assert printed.returncode == 0 and "output_stride: 8" in printed.stdout and "name: v3" in printed.stdout
    for args, text in [
        (["--experiment", "nope"], "error: unknown experiment 'nope'"),
        (["--experiment", "v3", "--model.output_stride=12"], "model.output_stride"),
        (["--experiment", "v3", "--model.output_stride"], "override '--model.output_stride' has no value"),
    ]:
        result = _fit(*args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().count("\n") == 0 and text in result.stderr


# ---------------------------------------------------------------------------------------------------
# One run specification: --config files, the --print-config round trip, --help from the schema


def test_print_config_fed_back_through_config_resolves_to_the_identical_run(tmp_path):
    overrides = ["model.output_stride=8", "data.batch_size=6", "eval.flip=true", "seed=2"]
    printed = _fit("--experiment", "v3", *[f"--{o}" for o in overrides], "--print-config")
    assert printed.returncode == 0, printed.stderr
    path = tmp_path / "config.yaml"
    path.write_text(printed.stdout)
    again = _fit("--config", str(path), "--print-config")
    assert again.returncode == 0 and again.stdout == printed.stdout, again.stderr
    original, from_file = resolve_experiment("v3", overrides), resolve_file(path)
    assert from_file.config == original.config
    assert from_file.run_tag == original.run_tag != "default"  # same run directory as the original command
    assert from_file.default_run_dir() == original.default_run_dir()


def test_a_users_own_experiment_file_outside_the_repository(tmp_path):
    path = tmp_path / "mine" / "wide_decoder.yaml"
    path.parent.mkdir()
    path.write_text("base: v3plus\ndescription: my decoder\nmodel: {decoder_channels: 96}\n")
    spec = resolve_file(path, ["model.decoder_convs=1"])
    assert spec.name == "wide_decoder" and spec.config.description == "my decoder"
    assert (spec.config.model.generation, spec.config.model.decoder_channels, spec.config.model.decoder_convs) == \
        ("v3plus", 96, 1)
    assert spec.run_tag != "default" and spec.config.crf == load_experiment("v3plus").crf
    for text, message in [("base: nope\n", "base 'nope' not found"), ("[1, 2]\n", "expected a mapping"),
                          ("model: {decoder_chanels: 3}\n", "did you mean 'model.decoder_channels'")]:
        path.write_text(text)
        with pytest.raises(UserError, match=re.escape(message)):
            resolve_file(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(UserError, match="not a text file"):
        resolve_file(path)


def test_infrastructure_keys_share_the_run_directory_and_run_keys_do_not():
    base = resolve_experiment("v3")
    assert base.run_tag == "default"
    same = resolve_experiment("v3", ["data.num_workers=0", "trainer.devices=2", "wandb.mode=disabled",
                                     "data.root=/elsewhere", "model.output_stride=16"])  # the last is a no-op
    assert same.default_run_dir() == base.default_run_dir()
    changed = resolve_experiment("v3", ["optim.lr=0.01"])
    assert changed.run_tag != "default" and changed.default_run_dir() != base.default_run_dir()
    assert resolve_experiment("v3", ["seed=1"]).default_run_dir().name == "default-seed1"
    assert key_role("model.output_stride") == RUN and key_role("eval.output_stride") == EVALUATION
    assert key_role("trainer.devices") == INFRASTRUCTURE and key_role("trainer.max_steps") == RUN
    assert key_role("data.root") == INFRASTRUCTURE and key_role("crf.bi_w") == EVALUATION


def test_help_lists_every_key_with_type_default_and_doc():
    result = _fit("--help")
    assert result.returncode == 0
    for key in flat_keys():
        line = next((line for line in result.stdout.splitlines() if line.strip().startswith(f"--{key} ")), None)
        assert line is not None, key
    rows = {row[0]: row for row in key_rows()}
    assert rows["model.output_stride"][1:4] == ("8|16|32|64|128|256", "16", "run")
    assert rows["model.backbone"][1] == "vgg16|resnet50|resnet101|xception65|xception71|timm:<name>"
    assert rows["data.name"][1].startswith("voc|voc_aug")
    assert rows["crf.bi_xy_std"][1:4] == ("float", "67.0", "evaluation") and rows["crf.bi_xy_std"][4]
    assert all(row[4] for row in rows.values()), [k for k, r in rows.items() if not r[4]]


@pytest.mark.parametrize("override, message", [
    ("trainer.devices=0", "trainer.devices=0 must be a positive count"),
    ("trainer.precision=17-mixed", "trainer.precision='17-mixed' is not a Lightning precision"),
    ("trainer.accelerator=quantum", "trainer.accelerator='quantum' is not one of"),
    ("trainer.max_steps=-1", "trainer.max_steps=-1 must be a positive number of steps"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval=0 must be a number of steps"),
    ("trainer.strategy=dp", "trainer.strategy='dp' is not a Lightning strategy"),
    ("seed=-1", "seed=-1 must be an integer between 0 and 4294967295"),
    ("optim.lr=0", "optim.lr=0.0 must be a positive number"),
    ("optim.momentum=1.5", "optim.momentum=1.5 must be a number in [0, 1)"),
    ("eval.mode=slide", None),
    ("eval.slide_crop=0", None),
    ("eval.protocols=[{name: os8, output_stride: 7}]", "eval.protocols[0].output_stride=7 is not valid"),
    ("eval.protocols=[os8]", "eval.protocols[0] = 'os8': each protocol is a mapping with a name"),
    ("eval.protocols=[{name: x, flipp: true}]", "unknown config key 'eval.protocols[0].flipp' (did you mean"),
    ("eval.protocols=[{name: ms_crf}]", "eval.protocols[0].name='ms_crf' must not end in 'crf'"),
    ("eval.protocols=[{name: os8}, {name: os8}]", "eval.protocols[1].name='os8' is used twice"),
    ("eval.scales=[0]", "eval.scales=[0.0]: needs one or more positive scales"),
])
def test_values_that_would_fail_late_are_refused_when_resolved(override, message):
    if message is None:  # a window of 0 only matters in slide mode
        with pytest.raises(UserError, match=r"eval.slide_crop=0 must be an integer at least 1"):
            load_experiment("v3", ["eval.mode=slide", "eval.slide_crop=0"])
        return
    with pytest.raises(UserError, match=re.escape(message)):
        load_experiment("v3", [override])


def test_experiment_takes_names_only():
    for name in ["../experiments/v3", "experiments/v3.yaml", "v3.yaml", "/tmp/v3"]:
        result = _fit("--experiment", name, "--print-config")
        assert result.returncode == 2 and "give an experiment name" in result.stderr and "--config FILE" in result.stderr
