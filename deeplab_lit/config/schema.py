"""The configuration schema: every key of an experiment, its type, default, role and one line of doc.

Sections are frozen dataclasses; sequences are tuples and mappings read-only, so a resolved config
cannot change under the code that received it. `--help` is generated from this file (`help.py`).

Each key has a role, the one place that says what changing it means:
- RUN: changes what is trained (the run directory's digest covers it; `evaluate` refuses it);
- EVALUATION: changes only how the trained weights are evaluated (`evaluate` accepts it);
- INFRASTRUCTURE: changes where or how fast, never the numbers (data location, workers, devices,
  logging); runs that differ only here share a run directory and a report row.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Mapping, Optional

from deeplab_lit.crf.params import CRFParams

RUN, EVALUATION, INFRASTRUCTURE = "run", "evaluation", "infrastructure"


def key(default: Any, doc: str, role: Optional[str] = None, choices: Optional[str] = None):
    """A config field: its default, one line of documentation, its role (default: its section's, see
    SECTION_ROLES), and (for --help) where its allowed values come from when the type does not say."""
    kind = "default_factory" if isinstance(default, (dict, list)) else "default"
    return field(**{kind: (lambda: type(default)(default)) if kind == "default_factory" else default},
                 metadata={"doc": doc, "role": role, "choices": choices})


def _freeze(instance) -> None:
    """Lists -> tuples, dicts -> read-only mappings, in place on a frozen dataclass (after __init__)."""
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if isinstance(value, list):
            object.__setattr__(instance, f.name, tuple(value))
        elif isinstance(value, dict):
            object.__setattr__(instance, f.name, MappingProxyType(dict(value)))


@dataclass(frozen=True)
class Section:
    """Base of the config sections: freezes list and dict values after __init__."""

    def __post_init__(self):
        _freeze(self)


@dataclass(frozen=True)
class ModelConfig(Section):
    """The network. `models.build_model(cfg.model, num_classes)` reads these fields.

    `head` selects the classifier on top of the backbone (one registry entry each):
      fc                VGG-16 fc6 (kernel `fc6_kernel`, width `fc6_width`) -> fc7 -> fc8, one branch per
                        rate in `aspp_rates`, logits summed (v1 FOV rows, v2 VGG LargeFOV / ASPP-S / ASPP-L)
      classifier        one 1x1 classifier (v2 ResNet baseline, v3 cascaded-block rows)
      atrous_classifier one 3x3 classifier per rate in `aspp_rates`, logits summed (v2 ResNet LargeFOV, ASPP-L)
      aspp              v3 ASPP (1x1 + 3x3 atrous + optional image pooling, BN+ReLU, concat, 1x1 project)
                        and a 1x1 classifier (v3, v3+)
    """

    generation: str = key("v3", "DeepLab generation (its head layout and loss)", choices="models.GENERATIONS")
    backbone: str = key("resnet101", "feature extractor; timm:<name> = any timm model with a dilated output stride",
                        choices="models.BACKBONES")
    output_stride: Literal[8, 16, 32, 64, 128, 256] = key(16, "training output stride of the backbone (atrous beyond "
                                                                "it; 64-256 need cascaded blocks, v3 Table 1)")
    multi_grid: tuple[int, ...] = key((1, 1, 1), "multi-grid (r1, r2, r3): unit rates of block4 and cascaded blocks")
    cascade_blocks: int = key(0, "copies of block4 appended as block5.. (v3 Tables 1-3); 0 = none")
    head: str = key("aspp", "classifier on the backbone", choices="models.HEADS")
    aspp_rates: tuple[int, ...] = key((6, 12, 18), "atrous rates of the head's branches")
    aspp_rates_absolute: bool = key(False, "use aspp_rates as given at every output stride (v3 rescales them "
                                           "from output stride 16 otherwise)")
    aspp_channels: int = key(256, "channels of each v3 ASPP branch and of its projection")
    aspp_dropout: float = key(0.1, "dropout after the v3 ASPP projection (TF DeepLab's 0.1; the paper is silent)")
    image_pooling: bool = key(True, "v3 ASPP image-level pooling branch")
    pool5_avg: bool = key(False, "3x3 average pooling between pool5 and fc6 (pool5a of the LargeFOV prototxts)")
    fc6_kernel: int = key(3, "VGG fc6 kernel size (v1 field of view)")
    fc6_width: int = key(1024, "VGG fc6/fc7 filters (4096, or 1024 for LargeFOV)")
    dropout: float = key(0.5, "dropout after VGG fc6 and fc7")
    msc_features: bool = key(False, "v1 MSc: MLPs on the input and pool1..pool4 concatenated before fc8")
    msc_dropout: float = key(0.5, "v1 MSc: dropout after each MLP ReLU (the released MSc prototxt)")
    msc_scales: tuple[float, ...] = key((), "v2 MSC input pyramid, e.g. [1.0, 0.75, 0.5]; empty = off")
    msc_sizes: Literal["floor", "caffe"] = key("floor", "v2 MSC scaled input size: floor(n*s), or Caffe's Interp "
                                                        "((n-1)//q)*p+1 for s = p/q")
    decoder_channels: int = key(48, "v3+ decoder: 1x1 projection width of each low-level feature")
    decoder_convs: int = key(2, "v3+ decoder: number of refinement convs per low-level feature")
    decoder_width: int = key(256, "v3+ decoder: channels of the refinement convs")
    decoder_kernel: int = key(3, "v3+ decoder: kernel of the refinement convs (v3+ Table 2: 3 or 1)")
    decoder_features: tuple[str, ...] = key((), "v3+ decoder: low-level features, coarse to fine; empty = the "
                                                "backbone's stride-4 feature (ResNet: Conv2 = [layer1]; Conv3 + "
                                                "Conv2 = [layer2, layer1])")
    separable: bool = key(False, "depthwise separable 3x3 convs (depthwise, BN, ReLU, pointwise, BN, ReLU) in the "
                                 "ASPP branches and the v3+ decoder (v3+ Table 5 'SC')")
    pretrained: str = key("none", "initialisation: imagenet (torchvision's file in the torch hub cache; xception and "
                                  "timm backbones: timm's in the Hugging Face cache), none, a PATH to a state dict, "
                                  "or run:<experiment> (that experiment's finished run, same seed)")
    trainable: tuple[str, ...] = key((), "train only parameters whose names start with these prefixes (v1 MSc "
                                         "stage); empty = all")
    bn: Literal["frozen", "frozen_stats", "finetune", "sync"] = key(
        "finetune", "BatchNorm: frozen (Caffe: statistics and affine fixed), frozen_stats (TF fine_tune_batch_norm="
                    "false: statistics fixed, affine trained), finetune, sync (across processes)")
    align_corners: bool = key(True, "bilinear resizes align corners, as Caffe's Interp (v1, v2) and TF DeepLab's "
                                    "resize_bilinear (v3, v3+) do; false = PyTorch's half-pixel convention")
    bn_momentum: float = key(0.0003, "BatchNorm momentum, PyTorch convention (TF decay 0.9997 = 0.0003)")


@dataclass(frozen=True)
class DataConfig(Section):
    name: str = key("synthetic", "dataset", choices="datamodules.DATAMODULES")
    root: str = key("", "dataset directory; empty = $DEEPLAB_LIT_DATA/<dataset> (synthetic: a cache directory)",
                    INFRASTRUCTURE)
    crop_size: int = key(321, "training crop, pixels (square)")
    batch_size: int = key(10, "training batch per process")
    eval_batch_size: int = key(1, "evaluation batch per process (images padded with the mean colour and 255)",
                               EVALUATION)
    num_workers: int = key(2, "DataLoader worker processes", INFRASTRUCTURE)
    scale_range: tuple[float, ...] = key((0.5, 1.5), "random scale [low, high] of training images; [1, 1] = none")
    scale_step: float = key(0.0, "random scales in steps of this size within the range (TF DeepLab: 0.25); "
                                 "0 = continuous")
    flip: bool = key(True, "random horizontal flip in training")


@dataclass(frozen=True)
class OptimConfig(Section):
    lr: float = key(0.007, "base learning rate (SGD)")
    momentum: float = key(0.9, "SGD momentum")
    weight_decay: float = key(1e-4, "weight decay of weights (biases and norms: see bias_weight_decay)")
    schedule: Literal["poly", "step"] = key("poly", "learning-rate schedule, stepped every iteration")
    poly_power: float = key(0.9, "poly: lr x (1 - step / max_steps) ** power")
    step_size: int = key(2000, "step: lr x step_gamma every step_size iterations (v1)")
    step_gamma: float = key(0.1, "step: the factor")
    new_lr_mult: float = key(1.0, "lr multiplier of newly initialised layers (classifier, ASPP, decoder)")
    bias_lr_mult: float = key(1.0, "extra lr multiplier of biases (Caffe's 2x in v1/v2)")
    bias_weight_decay: bool = key(False, "apply weight decay to biases and norm parameters")
    loss_at: Literal["input", "logits"] = key("input", "loss on logits upsampled to the input (v3) or on the "
                                                       "ground truth shrunk to the logits (v1, v2)")
    depthwise_weight_decay: bool = key(True, "apply weight decay to depthwise conv weights (TF DeepLab's Xception "
                                             "and separable convs: no)")


@dataclass(frozen=True)
class ProtocolConfig(Section):
    """An extra evaluation protocol; unset values are the main protocol's (`eval.*`)."""

    name: str = key("", "metric suffix: val/mIoU_<name>")
    output_stride: Optional[int] = key(None, "evaluation output stride")
    scales: Optional[tuple[float, ...]] = key(None, "input scales averaged")
    flip: Optional[bool] = key(None, "average with the horizontal flip")
    mode: Optional[Literal["whole", "slide"]] = key(None, "whole image or sliding window")
    slide_crop: Optional[int] = key(None, "sliding window size")
    slide_stride: Optional[int] = key(None, "sliding window step")
    canvas: Optional[tuple[int, ...]] = key(None, "pad to at least [height, width] first")


@dataclass(frozen=True)
class EvalConfig(Section):
    output_stride: Optional[int] = key(None, "evaluation output stride (8, 16, 32); empty = the training one")
    scales: tuple[float, ...] = key((1.0,), "input scales whose probabilities are averaged")
    flip: bool = key(False, "also average the horizontally flipped input")
    mode: Literal["whole", "slide"] = key("whole", "whole image, or overlapping windows (Cityscapes)")
    slide_crop: int = key(769, "sliding window size, pixels")
    slide_stride: int = key(513, "sliding window step, pixels")
    canvas: tuple[int, ...] = key((), "pad every image to at least [height, width] with the mean colour before "
                                      "predicting (TF eval_crop_size, Caffe test crop); empty = to the stride only")
    protocols: tuple[ProtocolConfig, ...] = key((), "extra protocols fit's final evaluation reports, e.g. "
                                                    "[{name: os8, output_stride: 8}]")
    qualitative_images: int = key(4, "predicted label maps of the first N images saved beside the summary "
                                     "(predictions/) for the report's qualitative panel; 0 = none")

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "protocols", tuple(
            p if isinstance(p, ProtocolConfig) else ProtocolConfig(**p) for p in self.protocols))


@dataclass(frozen=True)
class CRFConfig(CRFParams):
    """The dense CRF of the evaluation: the CRF's own parameter type plus when and how to run it."""

    enabled: bool = key(False, "refine with the dense CRF (reports val/mIoU_crf beside val/mIoU)")
    backend: Literal["torch", "pydensecrf"] = key("torch", "torch (CPU/GPU, batched) or pydensecrf (reference)")
    search: bool = key(False, "cross-validate w1, sigma_alpha, sigma_beta on search_images val images (the papers' "
                              "coarse-to-fine search) and evaluate with the values found; runs only with crf.enabled")
    search_images: int = key(100, "val images of the CRF search (v1/v2: 100)")
    # The coarse grid covers v1's and v2's ranges together (v1/v2 Sec. 4.1); crf_validation.py reads these.
    search_bi_w: tuple[float, ...] = key((3.0, 4.0, 5.0, 6.0, 8.0, 10.0),
                                         "w1 values of the search's coarse grid (v1: 5..10, v2: 3..6)")
    search_bi_xy_std: tuple[float, ...] = key(tuple(float(v) for v in range(30, 121, 10)),
                                              "sigma_alpha values of the coarse grid (v1: 50..100, v2: 30..100)")
    search_bi_rgb_std: tuple[float, ...] = key((3.0, 4.0, 5.0, 6.0, 8.0, 10.0),
                                               "sigma_beta values of the coarse grid (v1: 3..10, v2: 3..6)")
    search_fine: bool = key(True, "refine around the coarse best (steps w1 0.5, sigma_alpha 5, sigma_beta 1)")

    @property
    def params(self) -> CRFParams:
        """The six parameters alone (what crf/ computes with)."""
        return CRFParams(**{f.name: getattr(self, f.name) for f in dataclasses.fields(CRFParams)})


@dataclass(frozen=True)
class PerfConfig(Section):
    """How fast, never what: these keys do not change a run's identity (same results within float
    tolerance). Off by default until a GPU measurement (benchmarks/gpu.py) shows each one pays."""

    channels_last: bool = key(False, "network and batches in channels-last memory format (tensor cores prefer "
                                     "NHWC convolutions; same logits within float tolerance)")
    compile: bool = key(False, "torch.compile the network when fit starts (nn.Module.compile: checkpoints keep "
                               "their parameter names); the first steps, and evaluation's first new sizes, pay "
                               "the compilation")
    cudnn_benchmark: bool = key(False, "let cuDNN pick the fastest convolution algorithms for the fixed training "
                                       "crop (trainer benchmark=True); evaluation's varying sizes re-tune per size")


@dataclass(frozen=True)
class WandbConfig(Section):
    mode: Literal["offline", "online", "disabled"] = key("offline", "offline (sync later), online, disabled")
    project: str = key("deeplab_lit", "W&B project")
    entity: Optional[str] = key(None, "W&B entity (user or team)")
    group: Optional[str] = key(None, "W&B group; empty = the experiment's ablation")
    tags: tuple[str, ...] = key((), "extra W&B tags")
    log_images: int = key(4, "validation images logged with predicted and true masks")


@dataclass(frozen=True)
class PaperConfig(Section):
    """The paper row this experiment reproduces (data for the report, not for training)."""

    source: str = key("", "paper, e.g. DeepLab v2 (arXiv 1606.00915)")
    table: str = key("", "table(s) of the paper, e.g. v2 Table 3")
    miou: Optional[float] = key(None, "the paper's mIoU (%)")
    miou_crf: Optional[float] = key(None, "the paper's mIoU after the CRF (%)")
    metrics: dict[str, float] = key({}, "further paper numbers by metric name, e.g. {val/mIoU_os8: 78.51}")
    requires: str = key("", "what the row needs beyond this project (COCO pre-training, ...)")


@dataclass(frozen=True)
class Config(Section):
    name: str = key("", "experiment name (the file's name in experiments/)", INFRASTRUCTURE)
    description: str = key("", "one line: what the row is", INFRASTRUCTURE)
    ablation: str = key("", "the W&B group / report table this row belongs to", INFRASTRUCTURE)
    seed: int = key(0, "seed of initialisation, data order and augmentation")
    output_dir: str = key("runs", "where run directories are created", INFRASTRUCTURE)
    keep_best_on_val: bool = key(False, "also keep checkpoints/best-on-val.pt, the weights of the best val/mIoU seen "
                                        "during training: selected on the evaluation split, so never the paper "
                                        "comparison (fit reports the final weights)", INFRASTRUCTURE)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    crf: CRFConfig = field(default_factory=CRFConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    trainer: dict[str, Any] = key({}, "lightning.Trainer arguments (max_steps, devices, precision, ...)")
    wandb: WandbConfig = field(default_factory=WandbConfig)
    paper: PaperConfig = field(default_factory=PaperConfig)


SECTIONS: dict[str, type] = {name: hint for name, hint in typing.get_type_hints(Config).items()
                              if dataclasses.is_dataclass(hint)}

# Trainer arguments are Lightning's, not ours: their roles are listed here.
TRAINER_INFRASTRUCTURE = frozenset({
    "accelerator", "devices", "strategy", "num_nodes", "enable_progress_bar", "enable_model_summary",
    "logger", "default_root_dir", "profiler", "barebones", "plugins"})
TRAINER_EVALUATION = frozenset({"precision", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
                                "inference_mode"})


# The role of every key of a section unless the key says otherwise.
SECTION_ROLES = {"model": RUN, "data": RUN, "optim": RUN, "eval": EVALUATION, "crf": EVALUATION,
                 "perf": INFRASTRUCTURE, "wandb": INFRASTRUCTURE, "paper": INFRASTRUCTURE}


def key_role(dotted: str) -> str:
    """The role of a dotted key ("model.output_stride", "trainer.devices", "seed")."""
    section, _, name = dotted.partition(".")
    if section == "trainer":
        if name in TRAINER_INFRASTRUCTURE:
            return INFRASTRUCTURE
        return EVALUATION if name in TRAINER_EVALUATION else RUN
    if section in SECTIONS:
        found = {f.name: f for f in dataclasses.fields(SECTIONS[section])}.get(name)
        role = found.metadata.get("role") if found is not None else None
        return role or SECTION_ROLES[section]
    found = {f.name: f for f in dataclasses.fields(Config)}.get(section)
    return (found.metadata.get("role") if found is not None else None) or RUN


def plain(value: Any) -> Any:
    """Dataclasses, tuples and read-only mappings as plain dicts and lists (for YAML, JSON, checkpoints)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
