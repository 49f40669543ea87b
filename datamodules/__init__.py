"""LightningDataModules for VOC 2012, VOC + SBD train_aug, Cityscapes and the synthetic set.

`build_datamodule(cfg.data)` looks `data.name` up in DATAMODULES: a new dataset is one file with a
`SegmentationDataModule` subclass plus one `register` line here (the config's allowed names come from it).
"""
from __future__ import annotations

from typing import Optional

from datamodules.base import SegmentationDataModule
from datamodules.cityscapes import CityscapesDataModule
from datamodules.synthetic import SyntheticDataModule
from datamodules.voc import VOCAugDataModule, VOCDataModule
from deeplab_lit.errors import UserError
from deeplab_lit.registry import Registry

DATAMODULES: Registry[type[SegmentationDataModule]] = Registry("data.name")
DATAMODULES.register("voc", VOCDataModule, "PASCAL VOC 2012: train 1,464, val 1,449")
DATAMODULES.register("voc_aug", VOCAugDataModule, "VOC 2012 + SBD: train_aug 10,582, VOC val 1,449")
DATAMODULES.register("cityscapes", CityscapesDataModule, "Cityscapes fine: train 2,975, val 500, 19 classes")
DATAMODULES.register("synthetic", SyntheticDataModule, "embedded synthetic shapes: 300 / 60 images, 6 classes")


def build_datamodule(data_cfg, seed: Optional[int] = None) -> SegmentationDataModule:
    """The DataModule for `data_cfg.name`. `seed` fixes the training order and augmentation; by
    default it is torch's initial seed, i.e. what `lightning.seed_everything(cfg.seed)` set."""
    return DATAMODULES[data_cfg.name](data_cfg, seed=seed)


def validate_data_config(cfg) -> None:
    """The data rules, each named by its key; called once when a run is resolved."""
    DATAMODULES[cfg.name]
    if not isinstance(cfg.crop_size, int) or cfg.crop_size < 1:
        raise UserError(f"data.crop_size={cfg.crop_size} must be a positive number of pixels")
    if any(not isinstance(n, int) or n < 1 for n in (cfg.batch_size, cfg.eval_batch_size)):
        raise UserError(f"data.batch_size and data.eval_batch_size must be at least 1, got {cfg.batch_size} and "
                        f"{cfg.eval_batch_size}")
    if not isinstance(cfg.num_workers, int) or cfg.num_workers < 0:
        raise UserError(f"data.num_workers={cfg.num_workers} must be 0 or more")
    low_high = list(cfg.scale_range)
    if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1]:
        raise UserError(f"data.scale_range={low_high}: needs [lo, hi] with 0 < lo <= hi")
    if cfg.scale_step < 0:
        raise UserError(f"data.scale_step={cfg.scale_step} must be 0 (continuous scales) or a positive step")


__all__ = ["DATAMODULES", "SegmentationDataModule", "build_datamodule", "validate_data_config"]
