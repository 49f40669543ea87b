"""The paper tables the report compares with, as data: which experiments (and config values) make each
row, which metric each column reads, and where the paper's number is stored.

Paper numbers are not repeated here: each row names the experiment (and the key of its `paper`
section) that holds its number, so experiments/*.yaml stay the one source.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

@dataclass(frozen=True)
class Column:
    label: str
    metric: str = "val/mIoU"  # key of a run's metrics (fractions; shown as %)
    paper: str = "miou"  # miou | miou_crf | a key of the experiment's paper.metrics


@dataclass(frozen=True)
class Row:
    label: str
    experiments: tuple[str, ...]  # runs of any of these experiments ...
    where: tuple[tuple[str, Any], ...] = ()  # ... whose resolved config has these dotted values
    metric: Optional[str] = None  # single-column tables: this row's metric (an inference protocol)
    paper: Optional[str] = None  # this row's paper key (instead of the column's)
    paper_experiment: Optional[str] = None  # whose paper section holds it (default: experiments[0])


@dataclass(frozen=True)
class Table:
    id: str
    title: str
    rows: tuple[Row, ...]
    columns: tuple[Column, ...] = (Column("mIoU"),)
    sweeps: tuple[str, ...] = ()  # the files in sweeps/ whose grids train its rows (each cell in one file)
    compare_rows: bool = True  # the rows' ordering is the ablation's claim (not for the CRF table)
    note: str = ""


def row(label: str, experiment: str, metric: Optional[str] = None, paper: Optional[str] = None, **where) -> Row:
    """One experiment's runs; `where` keys use `__` for dots (model__decoder_channels=8)."""
    pairs = tuple((key.replace("__", "."), value) for key, value in where.items())
    return Row(label, (experiment,), pairs, metric, paper)


BEFORE_AFTER_CRF = (Column("before CRF", "val/mIoU", "miou"), Column("after CRF", "val/mIoU_crf", "miou_crf"))
V1_V2_VOC = ["v1_7x7", "v1_4x4", "v1_4x4_r8", "largefov", "v1_msc", "v1_msc_largefov", "v2_largefov", "aspp_s",
             "aspp_l", "v2_r101", "v2_r101_msc", "v2_r101_msc_coco", "v2_r101_msc_coco_aug", "v2_r101_largefov",
             "v2_r101_aspp"]
MS = "val/mIoU_os8_ms"

TABLES: tuple[Table, ...] = (
    Table("v1_table2_fov", "v1 Table 2: field of view of fc6 (VGG-16, VOC val)", (
        row("7x7, rate 4, 4096 wide", "v1_7x7"),
        row("4x4, rate 4, 4096 wide", "v1_4x4"),
        row("4x4, rate 8, 4096 wide", "v1_4x4_r8"),
        row("LargeFOV: 3x3, rate 12, 1024 wide", "largefov"),
    ), BEFORE_AFTER_CRF, sweeps=("fov.yaml",)),
    Table("v1_table1_msc", "v1 Table 1: multi-scale features (VGG-16, VOC val)", (
        row("DeepLab (4x4)", "v1_4x4"),
        row("DeepLab-MSc", "v1_msc"),
        row("DeepLab-LargeFOV", "largefov"),
        row("DeepLab-MSc-LargeFOV", "v1_msc_largefov"),
    ), BEFORE_AFTER_CRF, sweeps=("fov.yaml", "msc.yaml")),
    Table("v2_table2_recipe", "v2 Table 2: LargeFOV training recipe (VGG-16, VOC val, before CRF)", (
        row("step, batch 30, 6K iterations", "largefov"),
        row("poly, batch 30, 6K", "v2_largefov_poly_b30_6k"),
        row("poly, batch 30, 10K", "v2_largefov_poly_b30_10k"),
        row("poly, batch 10, 10K", "v2_largefov_poly_b10_10k"),
        row("poly, batch 10, 20K", "v2_largefov", paper="table2_miou"),
    ), sweeps=("fov.yaml", "lr_recipe.yaml", "aspp.yaml")),
    Table("v2_table3_aspp", "v2 Table 3: ASPP on VGG-16 (VOC val)", (
        row("LargeFOV", "v2_largefov"),
        row("ASPP-S {2, 4, 8, 12}", "aspp_s"),
        row("ASPP-L {6, 12, 18, 24}", "aspp_l"),
    ), BEFORE_AFTER_CRF, sweeps=("aspp.yaml",)),
    Table("v2_table4_resnet", "v2 Table 4: ResNet-101 (VOC val)", (
        row("ResNet-101", "v2_r101"),
        row("+ MSC", "v2_r101_msc"),
        row("+ COCO", "v2_r101_msc_coco"),
        row("+ scale aug", "v2_r101_msc_coco_aug"),
        row("LargeFOV", "v2_r101_largefov"),
        row("ASPP-L", "v2_r101_aspp"),
        row("ASPP-L + CRF", "v2_r101_aspp", metric="val/mIoU_crf", paper="miou_crf"),
    ), sweeps=("resnet.yaml",)),
    Table("v2_table9_cityscapes", "v2 Table 9: Cityscapes val, ResNet-101", (
        row("1x1 classifier", "cityscapes_v2_r101"),
        row("LargeFOV", "cityscapes_v2_r101_largefov"),
        row("ASPP-L", "cityscapes_v2_r101_aspp"),
        row("ASPP-L + scale aug", "cityscapes_v2_r101_aspp_aug"),
        row("ASPP-L + scale aug + CRF", "cityscapes_v2_r101_aspp_aug", metric="val/mIoU_crf", paper="miou_crf"),
    ), sweeps=("cityscapes.yaml",)),
    Table("crf_on_off", "CRF on vs off on the same checkpoint (v1 and v2, VOC val)",
          tuple(row(name, name, crf__enabled=True) for name in V1_V2_VOC), BEFORE_AFTER_CRF,
          sweeps=("fov.yaml", "msc.yaml", "aspp.yaml", "resnet.yaml", "crf.yaml"),
          compare_rows=False, note="Every run scores its final weights without and with the CRF; the paper "
                                   "gives both only for some rows."),
    Table("v3_table1_output_stride", "v3 Table 1: output stride, ResNet-50 + block7 (VOC val)", (
        row("output stride 8", "v3_r50_block7_os8"),
        row("output stride 16", "v3_r50_block7_os16"),
        row("output stride 32", "v3_r50_block7_os32"),
        row("output stride 64", "v3_r50_block7_os64"),
        row("output stride 128", "v3_r50_block7_os128"),
        row("output stride 256 (no atrous convolution)", "v3_r50_block7_os256"),
    ), sweeps=("output_stride.yaml",)),
    Table("v3_table2_cascade", "v3 Table 2: cascaded blocks, OS 16, MG (1, 1, 1) (VOC val)", (
        row("ResNet-50 block4", "v3_r50_block4"),
        row("ResNet-50 block5", "v3_r50_block5"),
        row("ResNet-50 block6", "v3_r50_block6"),
        row("ResNet-50 block7", "v3_r50_block7_os16"),
        row("ResNet-101 block4", "v3_block4_mg111"),
        row("ResNet-101 block5", "v3_block5_mg111"),
        row("ResNet-101 block6", "v3_block6_mg111"),
        row("ResNet-101 block7", "v3_block7_mg111"),
    ), sweeps=("cascade.yaml", "output_stride.yaml", "multi_grid.yaml"), compare_rows=False,
        note="The paper's claim is within each backbone: more cascaded blocks help, with diminishing returns."),
    Table("v3_table3_multi_grid", "v3 Table 3: multi-grid, ResNet-101 + block7, OS 16 (VOC val)", (
        row("MG (1, 1, 1)", "v3_block7_mg111"),
        row("MG (1, 2, 1)", "v3_block7_mg121"),
        row("MG (1, 2, 3)", "v3_block7_mg123"),
        row("MG (1, 2, 4)", "v3_block7_mg124"),
        row("MG (2, 2, 2)", "v3_block7_mg222"),
    ), sweeps=("multi_grid.yaml",)),
    Table("v3_table3_depths", "v3 Table 3: multi-grid at every depth, ResNet-101, OS 16 (VOC val)", tuple(
        row(f"MG {mg}, block{block}", f"v3_block{block}_mg{''.join(map(str, mg))}")
        for mg in ((1, 1, 1), (1, 2, 1), (1, 2, 3), (1, 2, 4), (2, 2, 2)) for block in (4, 5, 6, 7)
    ), sweeps=("cascade.yaml", "multi_grid.yaml")),
    Table("v3_table4_inference", "v3 Table 4: inference strategy of the cascaded model, block7 + MG (1, 2, 1)", (
        row("eval OS 16", "v3_block7_mg121"),
        row("eval OS 8", "v3_block7_mg121", metric="val/mIoU_os8", paper="val/mIoU_os8"),
        row("eval OS 8 + multi-scale", "v3_block7_mg121", metric=MS, paper=MS),
        row("eval OS 8 + multi-scale + flip", "v3_block7_mg121", metric=MS + "_flip", paper=MS + "_flip"),
    ), sweeps=("multi_grid.yaml",)),
    Table("v3_table5_aspp", "v3 Table 5: ASPP, ResNet-101, OS 16 (VOC val)", (
        row("MG (1, 1, 1), ASPP (6, 12, 18)", "v3_aspp_mg111"),
        row("MG (1, 2, 1), ASPP (6, 12, 18)", "v3_aspp_mg121"),
        row("MG (1, 2, 4), ASPP (6, 12, 18)", "v3_aspp_mg124"),
        row("MG (1, 2, 4), ASPP (6, 12, 18, 24)", "v3_aspp_mg124_r24"),
        row("MG (1, 2, 4), ASPP (6, 12, 18) + image pooling", "v3"),
    ), sweeps=("multi_grid.yaml", "inference.yaml")),
    Table("v3_table6_inference", "v3 Table 6: inference strategy on one v3 checkpoint (VOC val)", (
        row("eval OS 16", "v3"),
        row("eval OS 8", "v3", metric="val/mIoU_os8", paper="val/mIoU_os8"),
        row("eval OS 8 + multi-scale", "v3", metric=MS, paper=MS),
        row("eval OS 8 + multi-scale + flip", "v3", metric=MS + "_flip", paper=MS + "_flip"),
        row("+ MS-COCO pre-training (OS 8, multi-scale, flip)", "v3_coco", metric=MS + "_flip", paper=MS + "_flip"),
    ), sweeps=("inference.yaml",)),
    Table("v3_table8_training", "v3 Table 8: training protocol, OS 16 (VOC val)", (
        row("crop 513, upsampled logits, BN fine-tuned", "v3"),
        row("without BN fine-tuning", "v3_no_bn_finetune"),
        row("ground truth downsampled (no logit upsampling)", "v3_downsample_gt"),
        row("crop 321", "v3_crop321"),
    ), sweeps=("inference.yaml", "training.yaml")),
    Table("v3_table9_batch", "v3 Table 9: batch size with BN fine-tuning, OS 16 (VOC val)", (
        row("batch 4", "v3_batch4"),
        row("batch 8", "v3_batch8"),
        row("batch 12", "v3_batch12"),
        row("batch 16", "v3"),
    ), sweeps=("training.yaml", "inference.yaml")),
    Table("v3_table10_train_os", "v3 Table 10: train output stride x eval output stride (VOC val)", (
        row("train OS 8 (batch 6)", "v3_train_os8"),
        row("train OS 16 (batch 16)", "v3"),
        row("train OS 32 (batch 24)", "v3_train_os32"),
    ), (Column("eval OS 16", "val/mIoU", "miou"), Column("eval OS 8", "val/mIoU_os8", "val/mIoU_os8")),
        sweeps=("output_stride.yaml", "inference.yaml")),
    Table("v3_cityscapes", "v3 appendix: Cityscapes val, ResNet-101", (
        row("eval OS 16", "cityscapes_v3"),
        row("eval OS 8", "cityscapes_v3", metric="val/mIoU_os8", paper="val/mIoU_os8"),
        row("eval OS 8 + multi-scale", "cityscapes_v3", metric=MS, paper=MS),
        row("eval OS 8 + multi-scale + flip", "cityscapes_v3", metric=MS + "_flip", paper=MS + "_flip"),
    ), sweeps=("cityscapes.yaml",)),
    Table("v3plus_table1_decoder", "v3+ Table 1: decoder 1x1 projection width (one 3x3 conv, VOC val)", tuple(
        row(f"1x1 width {width}", "v3plus_1conv", paper=f"decoder_channels_{width}",
            model__decoder_channels=width, model__decoder_convs=1)
        for width in (8, 16, 32, 48, 64)
    ), sweeps=("decoder.yaml",)),
    Table("v3plus_table2_decoder_convs", "v3+ Table 2: decoder 3x3 convs (1x1 width 48, VOC val)", (
        row("one [3x3, 256]", "v3plus_1conv", model__decoder_channels=48, model__decoder_convs=1),
        Row("two [3x3, 256] (= v3plus)", ("v3plus_1conv", "v3plus"),
            (("model.decoder_channels", 48), ("model.decoder_convs", 2)), paper_experiment="v3plus"),
        row("three [3x3, 256]", "v3plus_1conv", paper="decoder_convs_3", model__decoder_channels=48,
            model__decoder_convs=3),
        row("one [3x3, 128]", "v3plus_1conv_128"),
        row("one [1x1, 256]", "v3plus_1conv_1x1"),
        row("Conv3 + Conv2, one [3x3, 256] each", "v3plus_conv2_conv3"),
    ), sweeps=("decoder.yaml", "decoder_convs.yaml", "decoder_variants.yaml", "inference.yaml")),
    Table("v3plus_table3_inference", "v3+ Table 3: inference strategy, ResNet-101 (VOC val)", (
        row("no decoder (= v3): train OS 16, eval OS 16", "v3"),
        row("no decoder: eval OS 8", "v3", metric="val/mIoU_os8", paper="val/mIoU_os8"),
        row("no decoder: eval OS 8 + multi-scale", "v3", metric=MS, paper=MS),
        row("no decoder: eval OS 8 + multi-scale + flip", "v3", metric=MS + "_flip", paper=MS + "_flip"),
        row("train OS 16, eval OS 16", "v3plus"),
        row("eval OS 16 + multi-scale", "v3plus", metric="val/mIoU_ms", paper="val/mIoU_ms"),
        row("eval OS 16 + multi-scale + flip", "v3plus", metric="val/mIoU_ms_flip", paper="val/mIoU_ms_flip"),
        row("eval OS 8", "v3plus", metric="val/mIoU_os8", paper="val/mIoU_os8"),
        row("eval OS 8 + multi-scale", "v3plus", metric=MS, paper=MS),
        row("eval OS 8 + multi-scale + flip", "v3plus", metric="val/mIoU_os8_ms_flip", paper="val/mIoU_os8_ms_flip"),
        row("no decoder: train OS 32, eval OS 32", "v3_train_os32", metric="val/mIoU_os32", paper="val/mIoU_os32"),
        row("train OS 32, eval OS 32", "v3plus_train_os32"),
        row("train OS 32, eval OS 16", "v3plus_train_os32", metric="val/mIoU_os16", paper="val/mIoU_os16"),
        row("train OS 32, eval OS 8", "v3plus_train_os32", metric="val/mIoU_os8", paper="val/mIoU_os8"),
    ), sweeps=("inference.yaml", "output_stride.yaml"), note="The first block reproduces v3's rows (v3+ Table 3 cites "
       "them from the v3 paper; its printed 78.45 for OS 8 + multi-scale is v3 Table 6's 79.45, used here)."),
    Table("v3plus_cityscapes", "v3+ on Cityscapes val (ResNet-101; the paper uses Xception-65)", (
        row("v3+ ResNet-101", "cityscapes_v3plus"),
    ), note="No paper number for ResNet-101; a public ResNet-101 reimplementation reports 80.97 with another "
            "recipe (crop 512x1024, 80k iterations, lr 0.01).", sweeps=("cityscapes.yaml",)),
)



@lru_cache(maxsize=None)
def experiment_config(name: str) -> dict:
    from deeplab_lit.config import load_experiment, plain

    return plain(load_experiment(name))


def paper_number(experiment: str, key: str) -> Optional[float]:
    paper = experiment_config(experiment)["paper"]
    value = paper.get(key) if key in ("miou", "miou_crf") else paper.get("metrics", {}).get(key)
    return None if value is None else float(value)


# ---------------------------------------------------------------------------------------------------
# v3+ with the modified aligned Xception (v3+ Tables 5 and 7), and beyond the papers: timm backbones.

def _protocol_rows(prefix: str, experiment: str, protocols: tuple[tuple[str, str], ...]) -> tuple[Row, ...]:
    """One row per (label, metric) of one experiment's checkpoint; the paper key is the metric's."""
    return tuple(row(f"{prefix}, {label}", experiment, metric=None if metric == "val/mIoU" else metric,
                     paper=None if metric == "val/mIoU" else metric) for label, metric in protocols)


_ALL_INFERENCE = (("eval OS 16", "val/mIoU"), ("eval OS 16 + MS", "val/mIoU_ms"),
                  ("eval OS 16 + MS + flip", "val/mIoU_ms_flip"), ("eval OS 8", "val/mIoU_os8"),
                  ("eval OS 8 + MS", "val/mIoU_os8_ms"), ("eval OS 8 + MS + flip", "val/mIoU_os8_ms_flip"))
_SC_INFERENCE = (("eval OS 16", "val/mIoU"), ("eval OS 16 + MS + flip", "val/mIoU_ms_flip"),
                 ("eval OS 8", "val/mIoU_os8"), ("eval OS 8 + MS + flip", "val/mIoU_os8_ms_flip"))
TIMM_BACKBONES = ("timm:resnet50d", "timm:resnest50d", "timm:regnety_032")

TABLES = TABLES + (
    Table("v3plus_table5_xception", "v3+ Table 5: inference strategy with Xception-65, train OS 16 (VOC val)", (
        *_protocol_rows("no decoder", "v3_xception65", _ALL_INFERENCE),
        *_protocol_rows("decoder", "v3plus_xception65", _ALL_INFERENCE),
        *_protocol_rows("decoder + SC", "v3plus_xception65_sc", _SC_INFERENCE),
        *_protocol_rows("decoder + SC + COCO", "v3plus_xception65_sc_coco", _SC_INFERENCE),
        *_protocol_rows("decoder + SC + COCO + JFT", "v3plus_xception65_sc_jft", _SC_INFERENCE),
    ), sweeps=("xception.yaml",),
        note="MS: scales 0.5-1.75; SC: depthwise separable convs in ASPP and decoder. The COCO and JFT rows need "
             "those pre-trained weights (model.pretrained=PATH); without them they start from ImageNet."),
    Table("v3plus_table7_cityscapes", "v3+ Table 7 (a): Cityscapes val, Xception (train_fine)", (
        row("X-65, ASPP + image-level", "cityscapes_v3_xception65"),
        row("X-65, decoder, ASPP + image-level", "cityscapes_v3plus_xception65"),
        row("X-65, decoder, ASPP", "cityscapes_v3plus_xception65_noip"),
        row("X-71, decoder, ASPP", "cityscapes_v3plus_xception71"),
        row("X-65, decoder, ASPP + image-level, eval OS 8 + MS 0.75-1.25 + flip (TF model zoo)",
            "cityscapes_v3plus_xception65", metric=MS + "_flip", paper=MS + "_flip"),
    ), sweeps=("cityscapes_xception.yaml",),
        note="Separable ASPP and decoder throughout (TF's defaults); the last row's number is TF's model zoo "
             "(xception65_cityscapes_trainfine), not the paper's."),
    Table("timm_backbones", "Beyond the papers: the v3+ recipe on timm backbones, train OS 16 (VOC val)", tuple(
        row(name.removeprefix("timm:"), "v3plus_timm", model__backbone=name) for name in TIMM_BACKBONES
    ), (Column("eval OS 16", "val/mIoU", "miou"), Column("eval OS 8", "val/mIoU_os8", "val/mIoU_os8")),
        sweeps=("timm_backbones.yaml",), compare_rows=False,
        note="No paper numbers: the papers use ResNet and Xception only. Each backbone starts from timm's "
             "ImageNet weights of its default tag."),
)
