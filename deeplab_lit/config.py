"""Experiments: load, compose, override, validate.

An experiment is a YAML file in `experiments/` holding a few keys on top of shared bases named by its
`base:` entry (a name or a list of names, resolved recursively, later files winning). The merged dict
is validated against the typed dataclasses below; overrides are dotted strings such as
`"model.output_stride=8"` whose values are read as YAML and then type-checked like the files.

Every key of DESIGN.md's public interface is a field here; a key not declared here is an error that
names it and lists the valid keys of its section. `trainer.*` is the exception: its keys are checked
against the signature of `lightning.Trainer` instead.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from deeplab_lit.errors import UserError

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


@dataclass
class ModelConfig:
    """The network. `models.build_model(cfg.model, num_classes)` reads these fields.

    `head` selects the classifier on top of the backbone (one registry entry each):
      fc                VGG-16 fc6 (kernel `fc6_kernel`, width `fc6_width`) -> fc7 -> fc8, one branch per
                        rate in `aspp_rates`, logits summed (v1 FOV rows, v2 VGG LargeFOV / ASPP-S / ASPP-L)
      classifier        one 1x1 classifier (v2 ResNet baseline)
      atrous_classifier one 3x3 classifier per rate in `aspp_rates`, logits summed (v2 ResNet LargeFOV, ASPP-L)
      aspp              v3 ASPP (1x1 + 3x3 atrous + optional image pooling, BN+ReLU, concat, 1x1 project)
                        and a 1x1 classifier (v3, v3+)
    """

    generation: Literal["v1", "v2", "v3", "v3plus"] = "v3"
    backbone: Literal["vgg16", "resnet50", "resnet101"] = "resnet101"
    output_stride: Literal[8, 16, 32] = 16
    multi_grid: list[int] = field(default_factory=lambda: [1, 1, 1])
    cascade_blocks: int = 0
    head: Literal["fc", "classifier", "atrous_classifier", "aspp"] = "aspp"
    aspp_rates: list[int] = field(default_factory=lambda: [6, 12, 18])
    # v3 gives ASPP rates for output stride 16 and doubles them at 8 (halves at 32); true = use as given.
    aspp_rates_absolute: bool = False
    aspp_channels: int = 256
    image_pooling: bool = True
    fc6_kernel: int = 3
    fc6_width: int = 1024
    dropout: float = 0.5
    msc_features: bool = False  # v1 "MSc": MLPs on the input and pool1..pool4 concatenated before fc8
    msc_scales: list[float] = field(default_factory=list)  # v2 MSC input pyramid, e.g. [1.0, 0.75, 0.5]
    decoder_channels: int = 48
    decoder_convs: int = 2
    pretrained: str = "none"  # imagenet | none | PATH (a state dict: torchvision's or our own)
    bn: Literal["frozen", "finetune", "sync"] = "finetune"
    bn_momentum: float = 0.0003  # PyTorch convention: TF decay 0.9997 = momentum 0.0003


@dataclass
class DataConfig:
    name: Literal["voc", "voc_aug", "cityscapes", "synthetic"] = "synthetic"
    root: str = ""  # empty = the default location of the dataset (synthetic: a cache directory)
    crop_size: int = 321
    batch_size: int = 10
    eval_batch_size: int = 1
    num_workers: int = 2
    scale_range: list[float] = field(default_factory=lambda: [0.5, 1.5])
    flip: bool = True


@dataclass
class OptimConfig:
    lr: float = 0.007
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: Literal["poly", "step"] = "poly"
    poly_power: float = 0.9
    step_size: int = 2000  # v1: lr x step_gamma every step_size iterations
    step_gamma: float = 0.1
    new_lr_mult: float = 1.0  # newly initialised layers (classifier, ASPP, decoder) vs ImageNet ones
    bias_lr_mult: float = 1.0  # Caffe convention of v1/v2: biases learn 2x (new layers: 20x)
    bias_weight_decay: bool = False


@dataclass
class EvalConfig:
    output_stride: Optional[int] = None  # None = the training output stride
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    mode: Literal["whole", "slide"] = "whole"
    slide_crop: int = 769
    slide_stride: int = 513
    # Extra protocols that fit's final evaluation reports beside the main one, e.g.
    # {name: os8_ms_flip, output_stride: 8, scales: [...], flip: true} -> val/mIoU_os8_ms_flip
    protocols: list[dict] = field(default_factory=list)


@dataclass
class CRFConfig:
    enabled: bool = False
    iterations: int = 10
    bi_w: float = 4.0
    bi_xy_std: float = 67.0
    bi_rgb_std: float = 3.0
    pos_w: float = 3.0
    pos_xy_std: float = 1.0
    backend: Literal["torch", "pydensecrf"] = "torch"


@dataclass
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "deeplab_lit"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    log_images: int = 4


@dataclass
class PaperConfig:
    """The paper row this experiment reproduces (data for the report, not for training)."""

    source: str = ""  # e.g. "DeepLab v2 (arXiv 1606.00915)"
    table: str = ""  # e.g. "v2 Table 3"
    miou: Optional[float] = None
    miou_crf: Optional[float] = None
    # Further paper numbers keyed by the metric name they correspond to, e.g. {"val/mIoU_os8": 78.51}
    metrics: dict = field(default_factory=dict)
    requires: str = ""  # what the row needs beyond this project (COCO pre-training, ...)


@dataclass
class Config:
    name: str = ""
    description: str = ""
    ablation: str = ""  # the W&B group / report table this row belongs to
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    crf: CRFConfig = field(default_factory=CRFConfig)
    trainer: dict = field(default_factory=dict)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    paper: PaperConfig = field(default_factory=PaperConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
