"""The DataModule every dataset shares; a dataset subclass only says where its samples are."""
from __future__ import annotations

import functools

import os
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from deeplab_lit.errors import UserError
from datamodules.dataset import Sample, SegmentationDataset
from datamodules.loaders import collated, distributed_rank, eval_sampler, pad_collate, train_sampler, worker_init
from datamodules.readers import IGNORE_INDEX, VOC_PALETTE, valid_value_table
from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD, MEAN_RGB_UINT8, train_transform


def default_data_dir() -> Path:
    """Where `data.root: ""` points for the real datasets: $DEEPLAB_LIT_DATA or ./data."""
    return Path(os.environ.get("DEEPLAB_LIT_DATA", "data"))


class SegmentationDataModule(L.LightningDataModule):
    """Subclasses set `num_classes`, `class_names`, `train_split`, `eval_splits`, `prepare_command`
    and implement `samples(split)`; everything else (transforms, loaders, sharding) lives here.

    `data.batch_size` and `data.eval_batch_size` are per process: under DDP the effective training
    batch is batch_size x world size.
    """

    num_classes: int
    class_names: list[str]
    train_split: str = "train"
    eval_splits: tuple[str, ...] = ("train", "val")
    # Splits without ground truth that can still be listed for prediction (VOC test, Cityscapes test).
    prediction_splits: tuple[str, ...] = ()
    palette = VOC_PALETTE  # colours of the class indices (256 x 3 uint8) for palette PNGs
    prepare_command: str = ""
    default_root_name: str = ""
    ignore_index = IGNORE_INDEX
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    mean_rgb_uint8 = MEAN_RGB_UINT8

    def __init__(self, data_cfg, seed: Optional[int] = None):
        super().__init__()
        self.cfg = data_cfg
        self._seed = seed
        self.root = Path(data_cfg.root) if data_cfg.root else default_data_dir() / self.default_root_name
        self.train_dataset: Optional[SegmentationDataset] = None
        self.val_dataset: Optional[SegmentationDataset] = None
        self._eval_datasets: dict[str, SegmentationDataset] = {}

    # -- what a dataset subclass provides -------------------------------------------------------
    def samples(self, split: str) -> list[Sample]:
        raise NotImplementedError

    def mask_values(self) -> tuple[np.ndarray, str, Optional[np.ndarray]]:
        """(legal stored values as a 256-bool table, their description, optional value -> id map)."""
        return valid_value_table(self.num_classes), f"0..{self.num_classes - 1} or 255", None

    def check_root(self) -> None:
        if not self.root.is_dir():
            raise UserError(
                f"data.root {self.root} does not exist; prepare it with "
                f"`python -m datamodules.prepare {self.prepare_command} --root {self.root}` or set data.root"
            )

    def unlabelled_images(self, split: str) -> list[tuple[str, Path]]:
        """(name, image file) of a split without ground truth (one of `prediction_splits`)."""
        raise NotImplementedError

    def images(self, split: str) -> list[tuple[str, Path]]:
        """(name, image file) of every image of a split, with or without ground truth, in the split's order:
        what `python -m deeplab_lit.predict --split NAME` segments."""
        known = (*self.eval_splits, *self.prediction_splits)
        if split not in known:
            raise UserError(f"split {split!r} is not one of {', '.join(known)} for data.name={self.cfg.name}")
        self.check_root()
        if split in self.prediction_splits:
            return self.unlabelled_images(split)
        return [(sample.name, sample.image) for sample in self.samples(split)]

    # -- datasets -------------------------------------------------------------------------------
    @property
    def seed(self) -> int:
        """The data seed: the one given, else torch's initial seed (what seed_everything set), so
        that every DDP rank agrees on the training permutation."""
        return self._seed if self._seed is not None else torch.initial_seed() % 2**31

    def _dataset(self, split: str, *, train: bool) -> SegmentationDataset:
        valid, expected, label_map = self.mask_values()
        if train:
            transform = train_transform(
                crop_size=self.cfg.crop_size,
                scale_range=tuple(self.cfg.scale_range),
                flip=self.cfg.flip,
                seed=self.seed,
                scale_step=self.cfg.scale_step,
            )
        else:
            transform = None  # the whole image as it is; padding to a stride multiple belongs to inference
        return SegmentationDataset(
            self.samples(split),
            transform,
            valid_values=valid,
            expected_values=expected,
            label_map=label_map,
            with_rgb=not train,
        )

    def setup(self, stage: Optional[str] = None) -> None:
        self.check_root()
        if stage in ("fit", None) and self.train_dataset is None:
            self.train_dataset = self._dataset(self.train_split, train=True)
        if self.val_dataset is None:
            self.val_dataset = self.eval_dataset("val")

    def eval_dataset(self, split: str) -> SegmentationDataset:
        """The whole-image evaluation dataset of a split (items carry "rgb")."""
        if split not in self.eval_splits:
            raise UserError(f"split {split!r} is not one of {', '.join(self.eval_splits)} for this dataset")
        if split not in self._eval_datasets:
            self.check_root()
            self._eval_datasets[split] = self._dataset(split, train=False)
        return self._eval_datasets[split]

    # -- loaders --------------------------------------------------------------------------------
    def _loader_kwargs(self) -> dict:
        workers = self.cfg.num_workers
        return dict(
            num_workers=workers,
            persistent_workers=workers > 0,
            worker_init_fn=worker_init if workers > 0 else None,
            pin_memory=torch.cuda.is_available(),
        )

    # -- resume: Lightning stores this in checkpoints and restores it before building the loaders --
    _resume_batches = 0

    def state_dict(self) -> dict:
        """Batches already trained in the current epoch (0 at an epoch boundary)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.state.fn != "fit":
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        return {"batches_done_in_epoch": 0 if done >= trainer.num_training_batches else int(done)}

    def load_state_dict(self, state: dict) -> None:
        self._resume_batches = int(state.get("batches_done_in_epoch", 0))

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        world, rank = distributed_rank()
        sampler = train_sampler(self.train_dataset, seed=self.seed, num_replicas=world, rank=rank)
        sampler.skip_next(self._resume_batches * self.cfg.batch_size)
        self._resume_batches = 0
        if len(sampler) < self.cfg.batch_size:
            raise UserError(
                f"data.batch_size={self.cfg.batch_size} is larger than this process's share of the "
                f"training set ({len(sampler)} images); lower data.batch_size"
            )
        # Augmentation randomness: worker w of rank r draws from the seed of (data seed, rank) + w.
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, rank]).generate_state(1)[0]))
        if self.cfg.num_workers == 0:
            self.train_dataset.seed(int(torch.randint(2**31, (1,), generator=generator)))
        return DataLoader(
            self.train_dataset,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            drop_last=True,
            generator=generator,
            collate_fn=collated,
            **self._loader_kwargs(),
        )

    def eval_dataloader(self, split: str) -> DataLoader:
        dataset = self.eval_dataset(split)
        world, rank = distributed_rank()
        return DataLoader(
            dataset,
            batch_size=self.cfg.eval_batch_size,
            sampler=eval_sampler(len(dataset), world, rank),
            collate_fn=functools.partial(pad_collate, image_fill=self.mean_rgb_uint8),
            **self._loader_kwargs(),
        )

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        """`trainer.test` evaluates on val: the papers report val numbers (VOC test is server-only)."""
        return self.eval_dataloader("val")
