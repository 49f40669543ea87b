"""Augmentation, collate, samplers, seeding and distributed sharding of the data loaders."""
from __future__ import annotations

import os
import socket
import time

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import datamodules.base as base
from deeplab_lit.config import DataConfig
from deeplab_lit.errors import UserError
from datamodules import build_datamodule
from datamodules.dataset import Sample, SegmentationDataset
from datamodules.loaders import ShardSampler, pad_collate, sample_seed, train_sampler, tune_malloc
from datamodules.readers import valid_value_table
from datamodules.synthetic import generate_synthetic
from datamodules.transforms import MEAN_RGB_UINT8, RandomScaleCrop, axis_window, train_transform
from test_data_trees import write_jpeg, write_palette_png



@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, sizes={"train": 12, "val": 7})
    return root


def cfg(root, **overrides):
    return DataConfig(**{"name": "synthetic", "root": str(root), "num_workers": 0, "batch_size": 4, "crop_size": 65, **overrides})


def one_image_dataset(tmp_path, mask: np.ndarray, transform, copies: int = 1) -> SegmentationDataset:
    write_jpeg(tmp_path / "a.jpg", np.random.default_rng(0), *mask.shape)
    write_palette_png(tmp_path / "a.png", mask)
    samples = [Sample(f"a{i}", tmp_path / "a.jpg", tmp_path / "a.png") for i in range(copies)]
    return SegmentationDataset(samples, transform, valid_values=valid_value_table(21), expected_values="0..20 or 255")


# -- augmentation ---------------------------------------------------------------------------------


def test_padding_fills_mask_with_255_and_image_with_the_mean(tmp_path):
    mask = np.full((30, 40), 3, np.uint8)  # no 255 of its own: every 255 below is padding
    transform = train_transform(crop_size=64, scale_range=(1.0, 1.0), flip=True, seed=0)
    dataset = one_image_dataset(tmp_path, mask, transform)
    for _ in range(5):
        item = dataset[0]
        padded = item["mask"] == 255
        assert int(padded.sum()) == 64 * 64 - 30 * 40
        assert set(item["mask"].unique().tolist()) == {3, 255}
        assert item["image"].dtype == torch.uint8 and item["mask"].dtype == torch.uint8  # normalised on the device
        image = item["image"].permute(1, 2, 0).numpy()
        assert (image[padded.numpy()] == np.array(MEAN_RGB_UINT8, np.uint8)).all()


def test_train_transform_is_one_scale_crop_then_the_flip():
    transform = train_transform(crop_size=321, scale_range=(0.5, 2.0), flip=True)
    names = [type(t).__name__ for t in transform.transforms]
    assert names == ["RandomScaleCrop", "HorizontalFlip"]  # normalised on the device
    scale_crop = transform.transforms[0]
    assert scale_crop.scale_range == (0.5, 2.0) and scale_crop.scales is None
    assert (scale_crop.fill, scale_crop.fill_mask) == ((124, 116, 104), 255)
    assert transform.strict is True
    assert "HorizontalFlip" not in [type(t).__name__ for t in train_transform(crop_size=9, scale_range=(1, 1), flip=False).transforms]
    with pytest.raises(ValueError, match="'scale_rnge' are not valid for transform RandomScaleCrop"):
        RandomScaleCrop(crop_size=9, scale_rnge=(1, 2), strict=True)


def textured(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3)).astype(np.uint8), (0, 0), 1.5)
    return image, rng.integers(0, 21, (height, width)).astype(np.uint8)


@pytest.mark.parametrize("scale", [1.0, 1.25, 1.5, 2.0])
def test_scale_crop_equals_albumentations_scale_then_crop(scale):
    """The crop interpolates only its own pixels, yet equals albumentations' RandomScale of the whole
    image followed by a crop at the same offset, bit for bit (the image's sides times the scale are whole
    numbers here, so both use the same scale; offsets that are whole scaled pixels)."""
    image, mask = textured(120, 160)
    crop, compared = 96, 0
    reference_scale = A.Compose([A.RandomScale(scale_limit=(scale - 1, scale - 1), p=1.0)], strict=True)
    scaled = reference_scale(image=image, mask=mask)
    assert scaled["image"].shape[:2] == (int(120 * scale), int(160 * scale))
    def whole_pixel_windows(size):
        windows = {axis_window(size, scale, crop, u) for u in np.linspace(0, 0.9999, 500)}
        return sorted(w for w in windows if (w.start * scale + w.skip).is_integer())

    for rows, cols in zip(whole_pixel_windows(120), reversed(whole_pixel_windows(160))):
        top, left = int(rows.start * scale + rows.skip), int(cols.start * scale + cols.skip)  # the crop's offset
        expected = A.Crop(x_min=left, y_min=top, x_max=left + crop, y_max=top + crop)(**scaled)
        out = RandomScaleCrop(crop_size=crop).apply(image, scale=scale, rows=rows, cols=cols)
        out_mask = RandomScaleCrop(crop_size=crop).apply_to_mask(mask, scale=scale, rows=rows, cols=cols)
        assert np.array_equal(out, expected["image"]) and np.array_equal(out_mask, expected["mask"])
        compared += 1
    assert compared >= 10


def test_scale_crop_pads_a_small_side_like_pad_if_needed():
    image, mask = textured(40, 160)  # at scale 1.5: 60 rows (padded to 96, centred), 240 columns (cropped)
    scaled = A.RandomScale(scale_limit=(0.5, 0.5), p=1.0)(image=image, mask=mask)
    padded = A.PadIfNeeded(min_height=96, min_width=96, position="center", border_mode=cv2.BORDER_CONSTANT,
                           fill=MEAN_RGB_UINT8, fill_mask=255)(**scaled)  # fmt: skip
    rows, cols = axis_window(40, 1.5, 96, 0.3), axis_window(160, 1.5, 96, 0.0)
    assert rows == (0, 40, 0, 60, 18) and cols.start == 0
    transform = RandomScaleCrop(crop_size=96, fill=MEAN_RGB_UINT8, fill_mask=255)
    out = transform.apply(image, scale=1.5, rows=rows, cols=cols)
    out_mask = transform.apply_to_mask(mask, scale=1.5, rows=rows, cols=cols)
    assert np.array_equal(out, padded["image"][:, :96]) and np.array_equal(out_mask, padded["mask"][:, :96])


@pytest.mark.parametrize("scale", [0.6, 1.0, 1.37, 2.0, 3.5])
def test_crop_offsets_cover_the_scaled_image(scale):
    """Every window stays inside the image, yields the crop, and the offsets span the whole scaled axis."""
    size, crop = 90, 48
    scaled = int(size * scale)
    offsets = []
    for u in np.linspace(0, 0.9999, 400):
        window = axis_window(size, scale, crop, u)
        assert 0 <= window.start < window.stop <= size and window.length == min(crop, scaled)
        resized = cv2.resize(np.zeros((1, window.stop - window.start), np.uint8), None, fx=scale, fy=1)
        assert resized.shape[1] >= window.skip + window.length  # the scaled window holds the crop
        # The first crop pixel samples at or right of the window's first pixel (no replicated edge).
        assert window.start == 0 or (window.skip + 0.5) / scale - 0.5 >= 0
        offsets.append(window.start * scale + window.skip)
        assert offsets[-1] + window.length <= max(scaled, crop) + 1e-9
    if scaled <= crop:
        assert set(offsets) == {0.0}
    else:
        assert min(offsets) == 0 and max(offsets) >= scaled - crop - scale - 1


@pytest.mark.parametrize("scale_range", [(0.5, 1.5), (0.5, 2.0)])
def test_random_scale_stays_in_the_range(tmp_path, scale_range):
    """The crop is larger than any scaled image, so the non-padding area is the scaled image."""
    mask = np.full((40, 60), 1, np.uint8)
    transform = train_transform(crop_size=130, scale_range=scale_range, flip=False, seed=0)
    dataset = one_image_dataset(tmp_path, mask, transform)
    widths = []
    for _ in range(60):
        content = dataset[0]["mask"] != 255
        rows, cols = content.any(1).nonzero(), content.any(0).nonzero()
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert int(content.sum()) == height * width  # one solid rectangle
        assert abs(width / 60 - height / 40) < 0.05  # aspect ratio kept
        widths.append(width / 60)
    low, high = scale_range
    assert low - 0.02 <= min(widths) and max(widths) <= high + 0.02
    assert min(widths) < low + 0.25 and max(widths) > high - 0.25  # the range is used, not just its middle


def test_flip_is_independent_of_the_scale_when_reseeded_per_sample(tmp_path):
    """Per-sample seeds must not make the transforms' draws coincide (albumentations' own
    `set_random_seed` seeds every transform alike: the flip was then the scale's draw, corr. -0.86)."""
    mask = np.zeros((40, 40), np.uint8)
    mask[:, :20], mask[:, 20:] = 1, 2
    dataset = one_image_dataset(tmp_path, mask, train_transform(crop_size=80, scale_range=(0.5, 1.5), flip=True, seed=0))
    scales, flips = [], []
    for seed in range(400):
        out = dataset[(0, sample_seed(0, 0, seed))]["mask"].numpy()
        columns = np.flatnonzero((out != 255).any(0))
        scales.append(len(columns) / 40)
        flips.append(out[40, columns[0]] == 2)  # the right half on the left
    scales, flips = np.array(scales), np.array(flips)
    assert abs(np.corrcoef(scales, flips)[0, 1]) < 0.15
    for half in (scales < 1.0, scales >= 1.0):
        assert 0.35 < flips[half].mean() < 0.65 and half.sum() > 120


def test_flip_happens_only_when_enabled(tmp_path):
    mask = np.zeros((20, 20), np.uint8)
    mask[:, :10], mask[:, 10:] = 1, 2
    for flip, expected in ((False, {1}), (True, {1, 2})):
        dataset = one_image_dataset(tmp_path, mask, train_transform(crop_size=20, scale_range=(1, 1), flip=flip, seed=0))
        assert {int(dataset[0]["mask"][0, 0]) for _ in range(30)} == expected


# -- collate ----------------------------------------------------------------------------------------


def test_pad_collate_pads_image_mask_rgb_and_keeps_content():
    def item(h, w, value):
        return {"image": torch.full((3, h, w), value, dtype=torch.uint8), "mask": torch.full((h, w), value, dtype=torch.uint8),
                "name": f"{h}x{w}", "rgb": torch.full((h, w, 3), value, dtype=torch.uint8)}  # fmt: skip

    batch = pad_collate([item(3, 5, 7), item(4, 2, 9)], image_fill=(124, 116, 104))
    assert batch["image"].shape == (2, 3, 4, 5) and batch["mask"].shape == (2, 4, 5) and batch["rgb"].shape == (2, 4, 5, 3)
    assert batch["name"] == ["3x5", "4x2"]
    assert batch["mask"][0].tolist() == [[7] * 5] * 3 + [[255] * 5]
    assert batch["mask"][1].tolist() == [[9, 9, 255, 255, 255]] * 4
    assert batch["image"][0, :, 3].tolist() == [[124] * 5, [116] * 5, [104] * 5]  # the mean colour
    assert (batch["image"][0, :, :3] == 7).all() and batch["image"].dtype == torch.uint8
    assert (batch["rgb"][1, :, 2:] == 0).all() and (batch["rgb"][1, :, :2] == 9).all()
    single = pad_collate([item(3, 5, 7)])
    assert single["mask"].shape == (1, 3, 5) and (single["mask"] == 7).all()


@pytest.mark.parametrize("workers", [0, 1])
def test_training_batches_are_written_in_place_and_equal_the_items(synthetic_root, workers):
    """The worker writes each crop straight into the batch (`__getitems__`): one buffer, in shared memory
    in a worker, holding exactly what the per-item path gives for the same (index, seed) keys."""
    dm = build_datamodule(cfg(synthetic_root, num_workers=workers, batch_size=4), seed=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    keys = list(loader.sampler)[:4]
    batch = next(iter(loader))
    items = [dm.train_dataset[key] for key in keys]
    assert batch["name"] == [item["name"] for item in items]
    assert torch.equal(batch["image"], torch.stack([item["image"] for item in items]))
    assert torch.equal(batch["mask"], torch.stack([item["mask"] for item in items]))
    assert batch["image"].shape == (4, 3, 65, 65) and batch["image"].dtype == batch["mask"].dtype == torch.uint8
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)  # stored as the crops are
    assert batch["image"].untyped_storage().data_ptr() == batch["mask"].untyped_storage().data_ptr()
    assert batch["image"].is_shared() == (workers > 0)


def test_eval_loader_batches_images_of_different_sizes(tmp_path, synthetic_root):
    dm = build_datamodule(cfg(synthetic_root, eval_batch_size=3, num_workers=1))  # a worker, as every config has
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert [len(b["name"]) for b in batches] == [3, 3, 1]
    assert batches[0]["rgb"].dtype == torch.uint8 and batches[0]["mask"].dtype == batches[0]["image"].dtype == torch.uint8
    assert sum(len(b["name"]) for b in batches) == len(dm.val_dataset) == 7


# -- samplers and sharding --------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 5, 7, 12])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_eval_shards_cover_every_index_exactly_once(length, world):
    shards = [list(ShardSampler(length, world, rank)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(length))
    assert [len(ShardSampler(length, world, rank)) for rank in range(world)] == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_train_sampler_is_seeded_sharded_and_epoch_dependent():
    dataset = list(range(11))
    ranks = [train_sampler(dataset, seed=3, num_replicas=2, rank=r) for r in range(2)]
    orders = [[index for index, _ in s] for s in ranks]
    assert [len(o) for o in orders] == [5, 5] and not set(orders[0]) & set(orders[1])  # drop_last: 10 of 11
    assert orders == [[i for i, _ in train_sampler(dataset, seed=3, num_replicas=2, rank=r)] for r in range(2)]
    ranks[0].set_epoch(1)
    assert [index for index, _ in ranks[0]] != orders[0]
    assert [i for i, _ in train_sampler(dataset, seed=4, num_replicas=2, rank=0)] != orders[0]


def test_train_sampler_seeds_samples_by_epoch_and_index_and_skips_for_resume():
    sampler = train_sampler(list(range(12)), seed=3)
    full = list(sampler)
    assert full == [(index, sample_seed(3, 0, index)) for index, _ in full]
    assert len({seed for _, seed in full}) == 12
    sampler.skip_next(5)
    assert list(sampler) == full[5:]  # a resumed epoch continues where it stopped
    assert list(sampler) == full  # the skip applies to one iteration only
    sampler.set_epoch(1)
    assert all(seed == sample_seed(3, 1, index) for index, seed in sampler)


def test_loaders_shard_by_rank(synthetic_root, monkeypatch):
    """Ranks simulated through the (world, rank) the loaders read from torch.distributed."""
    seen_eval, seen_train = [], []
    for rank in range(3):
        monkeypatch.setattr(base, "distributed_rank", lambda rank=rank: (3, rank))
        dm = build_datamodule(cfg(synthetic_root, batch_size=2), seed=5)
        dm.setup("fit")
        seen_eval.append([n for b in dm.val_dataloader() for n in b["name"]])
        seen_train.append([n for b in dm.train_dataloader() for n in b["name"]])
    assert sorted(n for names in seen_eval for n in names) == sorted(s.name for s in dm.val_dataset.samples)
    assert [len(names) for names in seen_eval] == [3, 2, 2]
    assert [len(names) for names in seen_train] == [4, 4, 4]
    assert len({n for names in seen_train for n in names}) == 12  # 12 images, disjoint shards


def _ddp_worker(rank, world, port, root, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        dm = build_datamodule(cfg(root, batch_size=2), seed=11)
        dm.setup("fit")
        train = dm.train_dataloader()
        train.sampler.set_epoch(0)
        names = {
            "val": [n for b in dm.val_dataloader() for n in b["name"]],
            "train": [n for b in train for n in b["name"]],
            "replicas": train.sampler.num_replicas,
        }
        torch.save(names, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gloo_group_shards_exactly(tmp_path, synthetic_root):
    """A real two-process gloo group (spawned: forking after torch's thread pools exist can hang)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.start_processes(
        _ddp_worker, args=(2, port, str(synthetic_root), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 180
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two gloo ranks did not finish within 180 s")
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    assert [r["replicas"] for r in results] == [2, 2]
    val = [r["val"] for r in results]
    assert sorted(val[0] + val[1]) == [f"val_{i:04d}" for i in range(7)] and [len(v) for v in val] == [4, 3]
    train = [r["train"] for r in results]
    assert [len(t) for t in train] == [6, 6] and not set(train[0]) & set(train[1])


# -- seeding and workers ----------------------------------------------------------------------------


def batches(dm, count):
    loader = iter(dm.train_dataloader())
    return [next(loader) for _ in range(count)]


def test_same_seed_same_data_different_seed_different(synthetic_root):
    def run(seed, workers):
        dm = build_datamodule(cfg(synthetic_root, num_workers=workers), seed=seed)
        dm.setup("fit")
        return batches(dm, 2)

    a, b, c = run(1, 0), run(1, 0), run(2, 0)
    assert [x["name"] for x in a] == [x["name"] for x in b] and all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert [x["name"] for x in a] != [x["name"] for x in c]
    # With workers: the same order (the sampler's), and reproducible augmentation.
    d, e = run(1, 2), run(1, 2)
    assert [x["name"] for x in d] == [x["name"] for x in a]
    assert all(torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"]) for x, y in zip(d, e))


def test_seed_defaults_to_torch_initial_seed(synthetic_root):
    torch.manual_seed(1234)
    dm = build_datamodule(cfg(synthetic_root))
    assert dm.seed == 1234
    dm.setup("fit")
    assert dm.train_dataloader().sampler.seed == 1234


def test_workers_do_not_share_augmentation_state(tmp_path):
    """albumentations keeps its own RNG; forked workers would inherit one state and crop alike."""
    mask = (np.arange(80 * 80).reshape(80, 80) % 21).astype(np.uint8)
    transform = train_transform(crop_size=32, scale_range=(0.5, 2.0), flip=True, seed=0)
    dataset = one_image_dataset(tmp_path, mask, transform, copies=4)
    dm = build_datamodule(cfg(tmp_path, num_workers=2, batch_size=1), seed=0)
    dm.train_dataset = dataset
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.drop_last and loader.worker_init_fn is not None
    masks = [b["mask"] for b in loader]  # worker 0 makes batches 0 and 2, worker 1 batches 1 and 3
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[2], masks[3])


def test_batch_larger_than_the_training_set(synthetic_root):
    dm = build_datamodule(cfg(synthetic_root, batch_size=13))
    dm.setup("fit")
    with pytest.raises(UserError, match=r"data.batch_size=13 is larger than this process's share of the training set \(12 images\)"):
        dm.train_dataloader()


def test_tune_malloc_applies_on_glibc():
    assert tune_malloc() is True
