"""LightningModules: one base and one per DeepLab generation (its paper's loss).

`build_module(spec)` builds the network from the run specification and hands the module built
objects: the network, the recipe, the protocols and the CRF parameters.
"""
from __future__ import annotations

from deeplab_lit.modules.base import SegmentationModule
from deeplab_lit.modules.v1 import V1Module
from deeplab_lit.modules.v2 import V2Module
from deeplab_lit.modules.v3 import V3Module
from deeplab_lit.registry import Registry

MODULES: Registry[type[SegmentationModule]] = Registry("model.generation")
MODULES.register("v1", V1Module, "loss on the ground truth shrunk to the logits (Caffe label shrink)")
MODULES.register("v2", V2Module, "v1's loss per MSC scale and on the fused logits")
MODULES.register("v3", V3Module, "loss on logits upsampled to the full-resolution ground truth")
MODULES.register("v3plus", V3Module, "as v3")


def build_module(spec, network=None) -> SegmentationModule:
    """The LightningModule of a `RunSpec`; `network` defaults to `build_model(spec.config.model, ...)`."""
    from deeplab_lit.models import build_model

    config = spec.config
    if network is None:
        network = build_model(config.model, spec.dataset.num_classes)
    return MODULES[config.model.generation](
        network, class_names=spec.dataset.class_names, recipe=config.optim, max_steps=config.trainer["max_steps"],
        protocols=spec.protocols, crf=config.crf, log_images=config.wandb.log_images,
        qualitative_images=config.eval.qualitative_images)


__all__ = ["MODULES", "SegmentationModule", "build_module"]
