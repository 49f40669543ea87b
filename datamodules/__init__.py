"""LightningDataModules for VOC 2012, VOC + SBD train_aug, Cityscapes and the synthetic set.

`build_datamodule(cfg.data)` looks `data.name` up in DATAMODULES: a new dataset is one file with a
`SegmentationDataModule` subclass plus one line here.
"""
from __future__ import annotations

from typing import Optional

from deeplab_lit.errors import UserError
from datamodules.base import SegmentationDataModule
from datamodules.cityscapes import CityscapesDataModule
from datamodules.synthetic import SyntheticDataModule
from datamodules.voc import VOCAugDataModule, VOCDataModule

DATAMODULES: dict[str, type[SegmentationDataModule]] = {
    "voc": VOCDataModule,
    "voc_aug": VOCAugDataModule,
    "cityscapes": CityscapesDataModule,
    "synthetic": SyntheticDataModule,
}


def build_datamodule(data_cfg, seed: Optional[int] = None) -> SegmentationDataModule:
    """The DataModule for `data_cfg.name`. `seed` fixes the training order and augmentation; by
    default it is torch's initial seed, i.e. what `lightning.seed_everything(cfg.seed)` set."""
    if data_cfg.name not in DATAMODULES:
        raise UserError(f"data.name={data_cfg.name!r} is not one of {', '.join(DATAMODULES)}")
    return DATAMODULES[data_cfg.name](data_cfg, seed=seed)


__all__ = ["DATAMODULES", "SegmentationDataModule", "build_datamodule"]
