"""DeepLab v3 (arXiv 1706.05587) and v3+ (arXiv 1802.02611).

The loss is the base module's: logits upsampled to the full-resolution ground truth (v3 section 4:
"we upsample the final logits instead of downsampling the ground truth"). BatchNorm is fine-tuned
with momentum 0.0003 (TF decay 0.9997); the rest of the recipe is data in experiments/base/v3.yaml.
"""
from __future__ import annotations

from deeplab_lit.modules.base import SegmentationModule


class V3Module(SegmentationModule):
    pass
