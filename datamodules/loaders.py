"""Samplers, collate and worker set-up shared by every DataModule.

The Trainer runs with `use_distributed_sampler=False`, so sharding under torch.distributed is done
here: training uses torch's DistributedSampler (one replica when not distributed, so the order of
epoch e is always the permutation seeded by seed + e and a resumed run sees the same order);
evaluation uses `ShardSampler`, which never pads, so the ranks together see every image exactly once.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import signal
from typing import Iterator

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler, Sampler, get_worker_info

from datamodules.readers import IGNORE_INDEX

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc caps M_MMAP_THRESHOLD at 32 MiB on 64-bit; a 2x-scaled Cityscapes frame (25 MB) still fits.
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 256 * 1024 * 1024


def distributed_rank() -> tuple[int, int]:
    """(world size, rank) of torch.distributed, or (1, 0) outside a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


# The index an evaluation rank without images of its own receives: the dataset returns its first image
# with every label ignored (255), so the rank takes part in the collective steps (metric gathering)
# and contributes nothing to any metric.
PADDING_INDEX = -1


class ShardSampler(Sampler[int]):
    """Rank r of n takes indices r, r + n, r + 2n, ...: disjoint shards that together cover the
    dataset exactly once (no padding duplicates, unlike DistributedSampler); lengths differ by <= 1."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.length, self.num_replicas, self.rank = length, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return max(0, math.ceil((self.length - self.rank) / self.num_replicas))


def eval_sampler(length: int, num_replicas: int = 1, rank: int = 0):
    """The rank's shard; a rank left without images (more ranks than images) evaluates PADDING_INDEX."""
    shard = ShardSampler(length, num_replicas, rank)
    return shard if len(shard) or not length else [PADDING_INDEX]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch: independent of worker, rank and position."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class TrainSampler(DistributedSampler):
    """torch's DistributedSampler (shuffled, seeded, drop_last; one replica outside DDP) that

    - yields `(index, augmentation seed)` pairs, the seed a function of (seed, epoch, index) only, so a
      sample is augmented the same way whichever worker draws it and whatever that worker drew before;
    - can skip the samples of the batches a resumed run already trained on in its interrupted epoch
      (`skip_next`, for the next iteration only), so resuming mid-epoch continues the same order.
    Together they make a killed-and-resumed run see exactly the data of an uninterrupted one.
    """

    def __init__(self, dataset, *, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self._skip = 0

    def skip_next(self, samples: int) -> None:
        self._skip = samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        skip, self._skip = self._skip, 0
        for index in list(super().__iter__())[skip:]:
            yield index, sample_seed(self.seed, self.epoch, index)


def train_sampler(dataset, *, seed: int, num_replicas: int = 1, rank: int = 0) -> TrainSampler:
    """Shuffled, drop_last, and seeded: epoch e's order is a function of (seed, e) only. Lightning
    calls `set_epoch` on it at every epoch."""
    return TrainSampler(dataset, seed=seed, num_replicas=num_replicas, rank=rank)


def pad_collate(items: list[dict], image_fill: tuple[int, int, int] = (0, 0, 0)) -> dict:
    """Batch whole images of different sizes: pad at the bottom/right to the largest, the uint8 image
    with `image_fill` (the datamodule passes its mean colour), the mask with 255 (ignored) and the rgb
    with 0. At batch size 1 (the evaluation default) nothing is padded."""
    height = max(item["mask"].shape[0] for item in items)
    width = max(item["mask"].shape[1] for item in items)

    def padded(tensor: torch.Tensor, value: float, channels_last: bool = False) -> torch.Tensor:
        h, w = tensor.shape[:2] if channels_last else tensor.shape[-2:]
        if (h, w) == (height, width):
            return tensor
        pad = (0, 0, 0, width - w, 0, height - h) if channels_last else (0, width - w, 0, height - h)
        return F.pad(tensor, pad, value=value)

    def padded_image(image: torch.Tensor) -> torch.Tensor:
        if tuple(image.shape[-2:]) == (height, width):
            return image
        canvas = torch.tensor(image_fill, dtype=image.dtype).view(3, 1, 1).repeat(1, height, width)
        canvas[:, : image.shape[1], : image.shape[2]] = image
        return canvas

    batch = {
        "image": torch.stack([padded_image(item["image"]) for item in items]),
        "mask": torch.stack([padded(item["mask"], IGNORE_INDEX) for item in items]),
        "name": [item["name"] for item in items],
    }
    if "rgb" in items[0]:
        batch["rgb"] = torch.stack([padded(item["rgb"], 0, channels_last=True) for item in items])
    return batch


def batch_buffers(count: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised uint8 images (count x 3 x height x width, channels-last memory) and masks
    (count x height x width) in one allocation: shared memory inside a DataLoader worker, so that the
    batch travels to the main process as a file descriptor (what torch's default_collate allocates for
    each of them; one allocation costs about 1 ms), ordinary memory otherwise."""
    pixels = count * height * width
    shared = get_worker_info() is not None
    storage = torch.UntypedStorage._new_shared(4 * pixels) if shared else torch.UntypedStorage(4 * pixels)
    flat = torch.empty(0, dtype=torch.uint8).set_(storage)
    images = flat[: 3 * pixels].view(count, height, width, 3).permute(0, 3, 1, 2)
    return images, flat[3 * pixels :].view(count, height, width)


def collated(batch: dict) -> dict:
    """The training loader's collate: `SegmentationDataset.__getitems__` returns the batch already made."""
    return batch


def tune_malloc() -> bool:
    """Keep large buffers on the heap instead of fresh mmap()s.

    Every augmented sample allocates several 1-25 MB arrays (decoded image, rescaled image, float32
    crop). With glibc's defaults these sizes straddle the dynamic mmap threshold, so many allocations
    become mmap + page faults on fresh zeroed pages + munmap, and the heap top is trimmed back to the
    kernel after each sample. `MALLOC_MMAP_THRESHOLD_`/`MALLOC_TRIM_THRESHOLD_` in the environment
    would do the same, but glibc reads them only at process start and DataLoader workers are forked
    after that, so the worker sets them with mallopt(). Returns False where glibc is not the libc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def worker_init(worker_id: int) -> None:
    """DataLoader worker set-up: SIGTERM left to the main process, malloc thresholds, single-threaded
    OpenCV (workers are the parallelism; OpenCV's own thread pool would oversubscribe the cores), and an
    augmentation seed derived from torch's per-worker seed (the loader's seeded generator + worker id).

    Schedulers (SLURM, Kubernetes) send SIGTERM to the whole process group. A worker that died of it
    would make the main process fail with "DataLoader worker killed" before it could save a checkpoint;
    ignoring it here lets the main process save and exit, which ends the workers."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    tune_malloc()
    cv2.setNumThreads(0)
    info = get_worker_info()
    if info is not None and hasattr(info.dataset, "seed"):
        info.dataset.seed(torch.initial_seed())
