"""python -m datamodules.prepare {voc,sbd,cityscapes,synthetic} [--root DIR]

voc         download VOCtrainval_11-May-2012.tar (md5-checked, resumable), extract, check the lists
            (1,464 train / 1,449 val on the official archive).
sbd         needs voc in the same root; download benchmark.tgz, extract, convert the SBD .mat masks
            needed by train_aug to palette PNGs once (so training never parses .mat files) and write
            ImageSets/Segmentation/train_aug.txt (10,582 on the official archives).
cityscapes  checks a tree the user downloaded (the site needs a login) and says what is missing.
synthetic   writes the embedded synthetic dataset.

A root that already holds the extracted trees (VOCdevkit/VOC2012/..., benchmark_RELEASE/dataset/...)
is used as it is: nothing is downloaded. --url takes http://, https:// or file:///path (a local
mirror, copied); archives are extracted safely (nothing outside the root, no links out, no device
files, no setuid bits; see datamodules/download.py). Mistakes end with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import scipy.io

from deeplab_lit.errors import UserError
from datamodules.base import default_data_dir
from datamodules.cityscapes import DOWNLOAD_HELP, SPLIT_SIZES, check_cityscapes_tree
from datamodules.download import download, extract_tree
from datamodules.readers import check_mask_values, valid_value_table, write_index_png
from datamodules.synthetic import default_synthetic_root, ensure_synthetic
from datamodules.voc import read_ids, split_file, voc_dir, voc_samples, write_ids

# https, on the archive's new home: the Oxford sysadmin's pytorch/vision PR #9216 names
# thor.robots.ox.ac.uk the long-term address (the old http://host.robots.ox.ac.uk was offline for
# months and now redirects there), and torchvision 0.29's voc.py downloads this URL with this md5.
# The md5 check, not the transport, is what guarantees the archive is the official one.
VOC_URL = "https://thor.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
VOC_MD5 = "6cd6e144f989b92b3379bac3b3de84fd"
SBD_URL = "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz"
SBD_MD5 = "82b4d87ceb2ed10f6038a1cba92111cb"
OFFICIAL_COUNTS = {"train": 1464, "val": 1449, "train_aug": 10582}
SBD_CLASSES = 21  # SBD uses VOC's 20 classes + background, and no 255 boundary


def _archive_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _report(label: str, counts: dict[str, int], official: dict[str, int] = OFFICIAL_COUNTS) -> None:
    """One line of counts, with the official archive's count beside any that differs."""
    parts = [f"{split} {n:,}" + ("" if official.get(split) in (None, n) else f" (official: {official[split]:,})")
             for split, n in counts.items()]  # fmt: skip
    print(f"{label}: " + ", ".join(parts))


def prepare_voc(root: Path, *, url: str = VOC_URL, md5: str = VOC_MD5, keep_archive: bool = False) -> dict[str, int]:
    """Download and extract VOC 2012 unless `root` already has it; return the train/val counts."""
    root = Path(root)
    if not (voc_dir(root) / "JPEGImages").is_dir():
        archive = download(url, root / _archive_name(url), md5)
        extract_tree(archive, root, "VOCdevkit")
        if not keep_archive:
            archive.unlink()
    voc = voc_dir(root)
    hint = f"the VOC tree in {root} is incomplete; delete it and run `python -m datamodules.prepare voc --root {root}`"
    counts = {split: len(voc_samples(voc, split, hint)) for split in ("train", "val")}
    _report(f"VOC 2012 in {voc}", counts)
    return counts


def read_sbd_mask(path: Path) -> np.ndarray:
    """The class map of an SBD `cls/<id>.mat` (struct GTcls, field Segmentation), as uint8."""
    try:
        gt = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)["GTcls"]
        mask = np.asarray(gt.Segmentation)
    except FileNotFoundError:
        raise UserError(f"SBD mask {path} does not exist; re-extract benchmark.tgz") from None
    except (KeyError, AttributeError):
        raise UserError(f"SBD mask {path} has no GTcls.Segmentation; is it an SBD cls/ file?") from None
    except Exception as error:  # scipy raises ValueError/TypeError/MatReadError for damaged files
        raise UserError(f"SBD mask {path} is unreadable ({error}); re-extract benchmark.tgz") from None
    if mask.ndim != 2 or mask.min() < 0 or mask.max() > 255:
        raise UserError(f"SBD mask {path} is not a 2-D class map of values 0..{SBD_CLASSES - 1}")
    mask = mask.astype(np.uint8)
    check_mask_values(mask, valid_value_table(SBD_CLASSES), path, f"0..{SBD_CLASSES - 1}")
    return mask


def prepare_sbd(
    root: Path, *, url: str = SBD_URL, md5: str = SBD_MD5, keep_archive: bool = False
) -> dict[str, int]:
    """Add SBD to a VOC root: masks converted to SegmentationClassAug/ and the train_aug list.

    train_aug = (VOC train | SBD train | SBD val) - VOC val. Only ids without a VOC mask are
    converted: where VOC has a mask it wins (it carries the 255 boundaries SBD lacks).
    """
    root = Path(root)
    voc = voc_dir(root)
    if not (voc / "JPEGImages").is_dir():
        raise UserError(f"{root} has no VOC 2012 tree; run `python -m datamodules.prepare voc --root {root}` first")
    sbd = root / "benchmark_RELEASE" / "dataset"
    if not sbd.is_dir():
        archive = download(url, root / _archive_name(url), md5)
        extract_tree(archive, root, "benchmark_RELEASE")
        if not keep_archive:
            archive.unlink()
    hint = f"the SBD tree {sbd} is incomplete; delete {root / 'benchmark_RELEASE'} and run this again"
    voc_hint = f"run `python -m datamodules.prepare voc --root {root}`"
    voc_train, voc_val = read_ids(split_file(voc, "train"), voc_hint), read_ids(split_file(voc, "val"), voc_hint)
    sbd_train, sbd_val = read_ids(sbd / "train.txt", hint), read_ids(sbd / "val.txt", hint)
    train_aug = sorted((set(voc_train) | set(sbd_train) | set(sbd_val)) - set(voc_val))

    voc_masks, aug_masks = voc / "SegmentationClass", voc / "SegmentationClassAug"
    aug_masks.mkdir(exist_ok=True)
    have_voc = {p.stem for p in voc_masks.glob("*.png")}
    to_convert = [i for i in train_aug if i not in have_voc and not (aug_masks / f"{i}.png").is_file()]
    for done, image_id in enumerate(to_convert, 1):
        mask = read_sbd_mask(sbd / "cls" / f"{image_id}.mat")
        partial = aug_masks / f".{image_id}.png.partial"  # renamed when complete: safe to interrupt
        write_index_png(partial, mask)
        os.replace(partial, aug_masks / f"{image_id}.png")
        if done % 1000 == 0 or done == len(to_convert):
            print(f"converted {done:,}/{len(to_convert):,} SBD masks to {aug_masks}")

    write_ids(split_file(voc, "train_aug"), train_aug)
    counts = {"train": len(voc_train), "val": len(voc_val)}
    counts["train_aug"] = len(voc_samples(voc, "train_aug", hint))  # checks every image and mask exists
    from_sbd = sum(1 for i in train_aug if i not in have_voc)
    _report(f"VOC 2012 + SBD in {voc} (train_aug: {len(train_aug) - from_sbd:,} VOC masks, {from_sbd:,} SBD masks)", counts)
    return counts


def prepare_cityscapes(root: Path) -> dict[str, int]:
    """Check a user-downloaded Cityscapes tree; UserError names what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"Cityscapes root {root} does not exist; {DOWNLOAD_HELP}")
    problems = check_cityscapes_tree(root)
    if problems:
        for problem in problems:
            print(f"  {problem}")
        raise UserError(f"the Cityscapes tree in {root} is incomplete: {problems[0]}; {DOWNLOAD_HELP}")
    _report(f"Cityscapes in {root}", dict(SPLIT_SIZES), official={})
    return dict(SPLIT_SIZES)


def prepare_synthetic(root: Path) -> dict[str, int]:
    root = ensure_synthetic(Path(root))
    counts = {split: len(read_ids(split_file(root, split), "")) for split in ("train", "val")}
    _report(f"synthetic dataset in {root}", counts, official={})
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datamodules.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=["voc", "sbd", "cityscapes", "synthetic"])
    parser.add_argument("--root", type=Path, help="dataset root (default: data/voc, data/cityscapes, "
                        "or the cache directory for synthetic)")  # fmt: skip
    parser.add_argument("--url", help="voc/sbd: download from this mirror instead of the official URL "
                        "(http://, https:// or file:///absolute/path)")  # fmt: skip
    parser.add_argument("--md5", help="voc/sbd: the md5 the archive at --url must have (default: the official one)")
    parser.add_argument("--keep-archive", action="store_true", help="voc/sbd: keep the archive after extraction")
    args = parser.parse_args(argv)
    try:
        if args.dataset == "synthetic":
            prepare_synthetic(args.root or default_synthetic_root())
        elif args.dataset == "cityscapes":
            prepare_cityscapes(args.root or default_data_dir() / "cityscapes")
        else:
            prepare = prepare_voc if args.dataset == "voc" else prepare_sbd
            url, md5 = (VOC_URL, VOC_MD5) if args.dataset == "voc" else (SBD_URL, SBD_MD5)
            prepare(args.root or default_data_dir() / "voc", url=args.url or url, md5=args.md5 or md5,
                    keep_archive=args.keep_archive)  # fmt: skip
    except UserError as error:
        print(f"error: {str(error).replace(chr(10), ' ')}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
