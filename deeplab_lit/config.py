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
    aspp_dropout: float = 0.1  # after the v3 ASPP projection: TF DeepLab's 0.1 (the paper is silent)
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


# ---------------------------------------------------------------------------------------------------
# Loading


def list_experiments() -> dict[str, str]:
    """Every experiment name with its one-line description (bases in experiments/base/ excluded)."""
    out = {}
    for path in sorted(EXPERIMENTS_DIR.glob("*.yaml")):
        out[path.stem] = str(_compose(path).get("description", "")).strip().splitlines()[0:1]
        out[path.stem] = out[path.stem][0] if out[path.stem] else ""
    return out


def load_experiment(name: str, overrides=()) -> Config:
    """Resolve experiment `name` (bases, then the file, then `overrides`) into a validated Config."""
    path = EXPERIMENTS_DIR / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
        hint = difflib.get_close_matches(name, names, n=1)
        raise UserError(
            f"unknown experiment '{name}'"
            + (f" (did you mean '{hint[0]}'?)" if hint else "")
            + "; `python -m deeplab_lit.fit --list` lists all experiments"
        )
    raw = _compose(path)
    raw["name"] = name
    for override in overrides:
        key, value = parse_override(override)
        _set_dotted(raw, key, value)
    return config_from_dict(raw)


def parse_override(text: str) -> tuple[str, Any]:
    """`"model.output_stride=8"` -> ("model.output_stride", 8); values are read as YAML."""
    text = text[2:] if text.startswith("--") else text
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UserError(f"override '{text}' is not of the form section.key=value")
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        raise UserError(f"override {key}: cannot read value '{value}' (YAML syntax)") from None


def config_from_dict(raw: dict) -> Config:
    """Validate a nested dict (unknown keys, types, choices) and build the Config dataclasses."""
    _check_keys(raw, Config, "")
    parser = _parser()
    try:
        namespace = parser.parse_object({"cfg": raw})
        cfg = parser.instantiate(namespace).cfg
    except Exception as error:  # jsonargparse raises ArgumentError/TypeError with a multi-line text
        raise UserError(_one_line(str(error))) from None
    _check_semantics(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def flat_keys() -> set[str]:
    """Every dotted key of the schema (`trainer.*` excluded: those are Trainer arguments)."""
    keys = set()
    for section, hint in _hints(Config).items():
        if dataclasses.is_dataclass(hint):
            keys.update(f"{section}.{name}" for name in _hints(hint))
        elif section != "trainer":
            keys.add(section)
    return keys


def effective_eval_output_stride(cfg: Config) -> int:
    return cfg.eval.output_stride or cfg.model.output_stride


# ---------------------------------------------------------------------------------------------------


def _compose(path: Path) -> dict:
    """A YAML file merged over its `base:` files (recursively; later bases and the file win)."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML ({_one_line(str(error))})") from None
    bases = data.pop("base", [])
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        base_path = EXPERIMENTS_DIR / "base" / f"{base}.yaml"
        if not base_path.is_file():
            raise UserError(f"{path}: base '{base}' not found ({base_path})")
        _deep_merge(merged, _compose(base_path))
    _deep_merge(merged, data)
    return merged


def _deep_merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict) and key not in _REPLACED_DICTS:
            _deep_merge(into[key], value)
        else:
            into[key] = value


_REPLACED_DICTS = {"metrics"}  # paper.metrics of a row replaces its base's, it does not extend it


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {key}: '{part}' is not a section")
    node[leaf] = value


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _check_keys(raw: dict, cls, prefix: str) -> None:
    hints = _hints(cls)
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            hint = difflib.get_close_matches(key, list(hints), n=1)
            valid = ", ".join(hints)
            where = f"section '{prefix[:-1]}'" if prefix else "the top level"
            raise UserError(
                f"unknown config key '{dotted}'"
                + (f" (did you mean '{prefix}{hint[0]}'?)" if hint else "")
                + f"; valid keys in {where}: {valid}"
            )
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise UserError(f"config key '{dotted}' is a section; set its keys, e.g. {dotted}.<key>=...")
            _check_keys(value, hints[key], dotted + ".")
        elif dotted == "trainer":
            _check_trainer_keys(value)


def _check_trainer_keys(trainer: dict) -> None:
    if not isinstance(trainer, dict):
        raise UserError("config key 'trainer' is a section of lightning.Trainer arguments")
    from lightning import Trainer

    valid = [name for name in inspect.signature(Trainer.__init__).parameters if name != "self"]
    for key in trainer:
        if key not in valid:
            hint = difflib.get_close_matches(key, valid, n=1)
            raise UserError(
                f"unknown config key 'trainer.{key}': not an argument of lightning.Trainer"
                + (f" (did you mean 'trainer.{hint[0]}'?)" if hint else "")
            )


def _check_semantics(cfg: Config) -> None:
    """Rules the types cannot express; each message names the key."""
    if len(cfg.model.multi_grid) != 3:
        raise UserError(f"model.multi_grid={cfg.model.multi_grid}: needs three rates (r1, r2, r3)")
    if cfg.eval.output_stride not in (None, 8, 16, 32):
        raise UserError(f"eval.output_stride={cfg.eval.output_stride} is not valid; choose one of 8, 16, 32")
    lo_hi = cfg.data.scale_range
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
        raise UserError(f"data.scale_range={lo_hi}: needs [lo, hi] with 0 < lo <= hi")
    if not cfg.eval.scales or min(cfg.eval.scales) <= 0:
        raise UserError(f"eval.scales={cfg.eval.scales}: needs one or more positive scales")
    for number, key in [(cfg.data.crop_size, "data.crop_size"), (cfg.data.batch_size, "data.batch_size")]:
        if number < 1:
            raise UserError(f"{key}={number}: must be positive")


_PARSER = None


def _parser():
    global _PARSER
    if _PARSER is None:
        from jsonargparse import ArgumentParser

        _PARSER = ArgumentParser(exit_on_error=False)
        _PARSER.add_class_arguments(Config, "cfg")
    return _PARSER


def _one_line(text: str) -> str:
    """jsonargparse's multi-line 'Parser key "cfg.x": Expected ... Got value: v' as one line."""
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    text = text.replace('Parser key "cfg.', 'config key "').replace("typing.", "")
    for literal in ("Literal[",):
        if literal in text:
            text = text.replace("Expected a Literal[", "expected one of [")
    return text
