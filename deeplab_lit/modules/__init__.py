"""The LightningModule of every DeepLab generation.

`build_module(spec)` builds the network from the run specification and hands the module built
objects: the network, the recipe, the protocols and the CRF parameters. What differs between the
papers' training (where the loss is computed, the MSC loss terms, lr multipliers, schedule, BatchNorm)
is data of the recipe and the network, not code: every generation maps to `SegmentationModule`; the
registry is where a generation with a different training step would plug in its subclass.
"""
from __future__ import annotations

from deeplab_lit.modules.base import SegmentationModule
from deeplab_lit.registry import Registry

MODULES: Registry[type[SegmentationModule]] = Registry("model.generation")
MODULES.register("v1", SegmentationModule, "loss on the ground truth shrunk to the logits (optim.loss_at=logits)")
MODULES.register("v2", SegmentationModule, "v1's loss, one term per MSC scale and the fused logits")
MODULES.register("v3", SegmentationModule, "loss on logits upsampled to the ground truth (optim.loss_at=input)")
MODULES.register("v3plus", SegmentationModule, "as v3")


def build_module(spec, network=None) -> SegmentationModule:
    """The LightningModule of a `RunSpec`; `network` defaults to `build_model(spec.config.model, ...)`."""
    from deeplab_lit.models import build_model

    config = spec.config
    if network is None:
        network = build_model(spec.model_for_training(), spec.dataset.num_classes)
    return MODULES[config.model.generation](
        network, class_names=spec.dataset.class_names, recipe=config.optim, max_steps=config.trainer["max_steps"],
        protocols=spec.protocols, crf=config.crf, log_images=config.wandb.log_images,
        qualitative_images=config.eval.qualitative_images, mean=spec.dataset.mean, std=spec.dataset.std,
        perf=config.perf)


__all__ = ["MODULES", "SegmentationModule", "build_module"]
