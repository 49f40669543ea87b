"""The LightningModule every DeepLab generation shares.

What is common: cross-entropy ignoring 255; SGD with momentum and weight decay over parameter groups
(ImageNet-initialised vs new layers, weights vs biases and norms) so each generation's lr multipliers
are data, not code; a poly (or step) schedule stepped every iteration from `trainer.max_steps`;
dataset-level metrics (pixel counts accumulated over the whole validation set and gathered over DDP
ranks, never averaged per batch); BatchNorm frozen, fine-tuned or synchronised.

Validation counts, for every metric key and every image, the intersection and union of each class
(int64; ignored pixels, including the 255 padding of `pad_collate`, never count) and the split's
confusion matrix; the first `qualitative_images` predicted label maps are kept. At the end of the epoch
the ranks' records are gathered (every rank gets all of them, in dataset order: the evaluation sampler
gives rank r the images r, r + n, ..., so interleaving the ranks' lists restores the order) and the
reported mIoU is computed from the summed counts by `records.miou_from_counts`, the same function and the
same integers a reader of `per_image.npz` uses: the file reproduces the reported number exactly.

Where the loss is computed is the recipe's `optim.loss_at` (losses.py): at the logits' resolution
(v1, v2) or at the input's (v3, v3+).

The module receives built objects, as lightning-hydra-template passes a built `net`: the network
(`models.build_model`, which also owns the BatchNorm policy), the optimisation recipe (`OptimConfig`
and the number of steps), the evaluation protocols and the CRF parameters. It never reads a config
dict; what a checkpoint must carry to rebuild it is added by the training code (`checkpoints.py`).
"""
from __future__ import annotations

import random
import time
from collections import deque

import lightning as L
import numpy as np
import torch
import torch.nn as nn

from deeplab_lit.config import CRFConfig, OptimConfig, PerfConfig
from deeplab_lit.errors import UserError
from deeplab_lit.inference import predict_probs
from deeplab_lit.modules.losses import IGNORE_INDEX, loss_terms
from deeplab_lit.models.batchnorm import batchnorm_layers
from deeplab_lit.preprocessing import IMAGENET_MEAN, IMAGENET_STD, prepare_batch
from deeplab_lit.protocols import MetricKey, Protocol
from deeplab_lit.records import PerImageCounts, iou_from_counts, miou_from_counts



def poly_factor(step: int, max_steps: int, power: float) -> float:
    """DeepLab's poly policy: (1 - step / max_steps) ** power, 0 from max_steps on."""
    return max(0.0, 1.0 - step / max_steps) ** power


def step_factor(step: int, step_size: int, gamma: float) -> float:
    """v1's schedule: x gamma every step_size iterations."""
    return gamma ** (step // step_size)


class NonFiniteLossError(UserError):
    """Training diverged; the last good checkpoint is kept."""


class SegmentationModule(L.LightningModule):
    def __init__(self, network: nn.Module, *, class_names, recipe: OptimConfig, max_steps: int,
                 protocols=(Protocol(),), crf: CRFConfig = CRFConfig(), log_images: int = 4,
                 qualitative_images: int = 0, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 perf: PerfConfig = PerfConfig()):
        super().__init__()
        self.mean, self.std = tuple(mean), tuple(std)
        self.perf = perf
        if perf.channels_last:
            network.to(memory_format=torch.channels_last)
        self.model = network
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.recipe = recipe
        self.max_steps = max_steps
        self.crf = crf
        self.log_images = log_images
        self.qualitative_images = max(0, int(qualitative_images))
        self.set_protocols(protocols)
        self._wandb_images_logged = 0

    def batchnorm_layers(self):
        return batchnorm_layers(self.model)

    # ---------------------------------------------------------------------------- optimisation
    def parameter_groups(self) -> list[dict]:
        """SGD groups: {pretrained, new} x {weights, biases and norm parameters}.

        lr multipliers: new layers `optim.new_lr_mult`, biases `optim.bias_lr_mult` on top (Caffe's
        lr_mult 1/2 for ImageNet layers and 10/20 for the classifier in v1/v2); biases and norm
        parameters get weight decay only if `optim.bias_weight_decay`. Without
        `optim.depthwise_weight_decay` the weights of depthwise convs form their own groups without
        weight decay (TF DeepLab: `regularize_depthwise=False` in Xception, `weights_regularizer=None`
        in `_split_separable_conv2d`).
        """
        optim = self.recipe
        depthwise = set() if optim.depthwise_weight_decay else {
            id(m.weight) for m in self.model.modules()
            if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels}
        groups = []
        for origin, named in self.model.named_parameter_groups().items():
            origin_mult = optim.new_lr_mult if origin == "new" else 1.0
            weights = [p for name, p in named if p.requires_grad and p.ndim > 1 and id(p) not in depthwise]
            depthwise_weights = [p for name, p in named if p.requires_grad and id(p) in depthwise]
            biases = [p for name, p in named if p.requires_grad and p.ndim <= 1]
            if weights:
                groups.append(
                    {"name": f"{origin}", "params": weights, "lr_mult": origin_mult, "weight_decay": optim.weight_decay}
                )
            if depthwise_weights:
                groups.append(
                    {"name": f"{origin}_depthwise", "params": depthwise_weights, "lr_mult": origin_mult,
                     "weight_decay": 0.0}
                )
            if biases:
                groups.append(
                    {
                        "name": f"{origin}_bias",
                        "params": biases,
                        "lr_mult": origin_mult * optim.bias_lr_mult,
                        "weight_decay": optim.weight_decay if optim.bias_weight_decay else 0.0,
                    }
                )
        for group in groups:
            group["lr"] = optim.lr * group["lr_mult"]
        return groups

    def lr_factor(self, step: int) -> float:
        optim = self.recipe
        if optim.schedule == "step":
            return step_factor(step, optim.step_size, optim.step_gamma)
        return poly_factor(step, self.max_steps, optim.poly_power)

    def configure_optimizers(self):
        groups = self.parameter_groups()
        # Learning-rate curves: `lr-SGD` (the base rate) and one `lr-SGD/<group>` per group whose rate differs.
        self._lr_mults = {group["name"]: group["lr_mult"] for group in groups if group["lr_mult"] != 1.0}
        optimizer = torch.optim.SGD(groups, lr=self.recipe.lr, momentum=self.recipe.momentum)
        # Stepped every iteration (interval "step"), so the learning rate decays smoothly within epochs.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # ---------------------------------------------------------------------------- training
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """uint8 images become normalised floats here, on the device (deeplab_lit/preprocessing.py)."""
        memory_format = torch.channels_last if self.perf.channels_last else torch.contiguous_format
        return prepare_batch(batch, self.mean, self.std, memory_format)

    def on_fit_start(self) -> None:
        if self.perf.compile:  # in place: the state dict keeps its names, so checkpoints are unchanged
            self.model.compile()

    def forward(self, images: torch.Tensor) -> dict:
        return self.model(images)

    def loss_terms(self, outputs: dict, masks: torch.Tensor) -> list[torch.Tensor]:
        return loss_terms(outputs, masks, self.recipe.loss_at, self.model.align_corners)

    def compute_loss(self, outputs: dict, masks: torch.Tensor) -> torch.Tensor:
        terms = self.loss_terms(outputs, masks)
        return terms[0] if len(terms) == 1 else torch.stack(terms).sum()

    def training_step(self, batch, batch_idx):
        outputs = self(batch["image"])
        loss = self.compute_loss(outputs, batch["mask"])
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss became {loss.item()} at step {self.global_step}; stopping (the last good checkpoint is "
                "kept); lower optim.lr or check the data"
            )
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(batch["image"]))
        lr = self.recipe.lr * self.lr_factor(self.global_step)
        self.log("lr-SGD", lr, on_step=True, on_epoch=False)
        for name, mult in getattr(self, "_lr_mults", {}).items():
            self.log(f"lr-SGD/{name}", lr * mult, on_step=True, on_epoch=False)
        return loss

    # ---------------------------------------------------------------------------- resume
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Random states travel with the checkpoint, so a resumed run draws the same dropout masks and
        worker seeds as an uninterrupted one."""
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # plain types and tensors only: Lightning reads checkpoints with torch.load(weights_only=True)
            "numpy": _numpy_state_to_plain(np.random.get_state()),
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        if not states:
            return
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])
        name, keys, position, has_gauss, cached = states["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
        random.setstate(states["python"])

    # ---------------------------------------------------------------------------- evaluation
    def set_protocols(self, protocols: list[Protocol]) -> None:
        """Which protocols validation computes; each metric key gets its own dataset-level counts."""
        self.protocols = list(protocols)
        self.metric_keys = [key.text for protocol in self.protocols for key in protocol.metric_keys()]
        self._reset_counts()

    def _reset_counts(self) -> None:
        self._counts = {key: _Counts(self.num_classes) for key in self.metric_keys}
        self._unnamed = 0

    @staticmethod
    def metric_key(protocol: Protocol, crf: bool) -> str:
        return MetricKey(protocol.name, crf).text

    def on_validation_epoch_start(self) -> None:
        self._eval_started = time.time()
        self._reset_counts()
        self._wandb_images_logged = 0
        # The reference CRF runs one image per process: on CPU, keep every core busy by refining
        # images asynchronously while the network predicts the next ones (a bounded queue).
        self._crf_pool, self._crf_pending = None, deque()
        if any(p.crf for p in self.protocols) and self.crf.backend == "pydensecrf":
            from deeplab_lit.crf import ReferenceCRFPool

            self._crf_pool = ReferenceCRFPool()

    def validation_step(self, batch, batch_idx):
        masks = batch["mask"]
        names = self._names(batch)
        for protocol in self.protocols:
            probs = predict_probs(self.model, batch["image"], protocol)
            self._update(self.metric_key(protocol, False), probs, masks, names)
            if protocol.crf and getattr(self, "_crf_pool", None) is not None:
                self._submit_crf(self.metric_key(protocol, True), probs, batch["rgb"], masks, names)
            elif protocol.crf:
                refined = self.apply_crf(probs, batch["rgb"])
                self._update(self.metric_key(protocol, True), refined, masks, names)
            if protocol is self.protocols[0]:
                self.log_prediction_images(batch, probs)

    def apply_crf(self, probs: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        from deeplab_lit.crf import dense_crf

        return dense_crf(probs, rgb, params=self.crf, backend=self.crf.backend)

    def _submit_crf(self, key: str, probs: torch.Tensor, rgb: torch.Tensor, masks: torch.Tensor,
                    names: list[str]) -> None:
        for prob, image, mask, name in zip(probs.float().cpu().numpy(), rgb.cpu().numpy(), masks.cpu(), names):
            self._crf_pending.append((key, self._crf_pool.submit(prob, image, self.crf), mask, name))
        while len(self._crf_pending) > 2 * self._crf_pool.workers:
            self._collect_crf()

    def _collect_crf(self) -> None:
        key, result, mask, name = self._crf_pending.popleft()  # first in, first out: the order is kept
        refined = torch.from_numpy(result.get())[None].to(self.device)
        self._update(key, refined, mask[None].to(self.device), [name])

    def _finish_crf(self) -> None:
        if getattr(self, "_crf_pool", None) is None:
            return
        while self._crf_pending:
            self._collect_crf()
        self._crf_pool.close()
        self._crf_pool = None

    def _names(self, batch) -> list[str]:
        """The batch's image ids; batches without any (unit tests) get '#0', '#1', ... in order."""
        if "name" in batch:
            return list(batch["name"])
        first, self._unnamed = self._unnamed, self._unnamed + len(batch["mask"])
        return [f"#{first + i}" for i in range(len(batch["mask"]))]

    def _update(self, key: str, probs: torch.Tensor, masks: torch.Tensor, names: list[str] | None = None) -> None:
        """Count one batch of predictions for metric key `key`: per image and class, intersection and
        union (int64), and the split's confusion matrix. The padding image of a rank without images
        (name "") is left out; its labels are all ignored anyway."""
        predictions = probs.argmax(dim=1)
        if names is None:
            names = self._names({"mask": masks})
        confusion = per_image_confusion(predictions, masks, self.num_classes)  # B x C x C, on the device
        counts = self._counts[key]
        counts.confusion += confusion.sum(0).cpu()
        diagonal = confusion.diagonal(dim1=1, dim2=2)
        union = (confusion.sum(1) + confusion.sum(2) - diagonal).cpu().numpy()
        intersection = diagonal.cpu().numpy()
        for index, name in enumerate(names):
            if not name:
                continue
            counts.names.append(name)
            counts.intersection.append(intersection[index].copy())
            counts.union.append(union[index].copy())
            if len(counts.predictions) < self.qualitative_images:
                counts.predictions[name] = predictions[index].to(torch.uint8).cpu().numpy()

    def on_validation_epoch_end(self) -> None:
        self._finish_crf()
        gathered = self._gather_counts()
        self._reset_counts()
        self.last_results = {}
        for key in self.metric_keys:
            per_image, predictions = gathered[key]
            per_class = iou_from_counts(per_image.intersection.sum(0), per_image.union.sum(0))
            miou = miou_from_counts(per_image.intersection.sum(0), per_image.union.sum(0))
            confusion = per_image.confusion
            accuracy = float(np.trace(confusion) / confusion.sum()) if confusion.sum() else float("nan")
            metric_key = MetricKey.parse(key)
            self.log(metric_key.logged("mIoU"), miou, sync_dist=False)
            self.log(metric_key.logged("pixel_acc"), accuracy, sync_dist=False)
            if key == "mIoU":
                for name, value in zip(self.class_names, per_class.tolist()):
                    self.log(f"val/iou/{name}", value, sync_dist=False)
            self.last_results[key] = {
                "mIoU": miou,
                "pixel_acc": accuracy,
                "per_class_iou": dict(zip(self.class_names, [float(v) for v in per_class.tolist()])),
                "per_image": per_image,
                "predictions": predictions,
            }

    def _gather_counts(self) -> dict[str, tuple[PerImageCounts, dict]]:
        """Every rank's counts, on every rank, in dataset order (ranks interleaved: rank r's j-th image is
        image r + j * world size of the split), with the first `qualitative_images` predictions."""
        local = {key: (c.names, c.intersection, c.union, c.confusion.numpy(), c.predictions)
                 for key, c in self._counts.items()}
        ranks = [local]
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, local)
        empty = np.zeros((0, self.num_classes), np.int64)
        gathered = {}
        for key in self.metric_keys:
            parts = [rank[key] for rank in ranks]
            order = dataset_order([len(p[0]) for p in parts])
            names = [parts[r][0][j] for r, j in order]
            intersection = np.stack([parts[r][1][j] for r, j in order]) if order else empty
            union = np.stack([parts[r][2][j] for r, j in order]) if order else empty
            confusion = sum(p[3] for p in parts)
            shown = {}
            for name in names:
                for part in parts:
                    if name in part[4] and len(shown) < self.qualitative_images:
                        shown[name] = part[4][name]
            gathered[key] = (PerImageCounts(tuple(names), intersection, union, confusion), shown)
        return gathered

    def log_prediction_images(self, batch, probs: torch.Tensor) -> None:
        """A few validation images with predicted and true masks, when a W&B logger is attached."""
        from lightning.pytorch.loggers import WandbLogger

        limit = self.log_images
        logger = next((lg for lg in self.loggers if isinstance(lg, WandbLogger)), None)
        if logger is None or self._wandb_images_logged >= limit or self.global_rank != 0 or "rgb" not in batch:
            return
        import wandb

        labels = {i: name for i, name in enumerate(self.class_names)}
        labels[IGNORE_INDEX] = "ignore"
        images = []
        for rgb, mask, prob in zip(batch["rgb"], batch["mask"], probs):
            if self._wandb_images_logged >= limit:
                break
            images.append(
                wandb.Image(
                    rgb.cpu().numpy(),
                    masks={
                        "prediction": {"mask_data": prob.argmax(0).cpu().numpy().astype("uint8"), "class_labels": labels},
                        "ground_truth": {"mask_data": mask.cpu().numpy().astype("uint8"), "class_labels": labels},
                    },
                )
            )
            self._wandb_images_logged += 1
        if images:
            logger.experiment.log({"val/predictions": images}, commit=False)


def _numpy_state_to_plain(state) -> tuple:
    name, keys, position, has_gauss, cached = state
    return name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)


def dataset_order(lengths: list[int]) -> list[tuple[int, int]]:
    """(rank, position) of each image in dataset order, given how many images each rank evaluated:
    the evaluation sampler gives rank r of n the images r, r + n, r + 2n, ..., so image i is position
    i // n of rank i % n."""
    return [(rank, j) for j in range(max(lengths, default=0)) for rank in range(len(lengths)) if j < lengths[rank]]


class _Counts:
    """One metric key's validation counts on this rank, in the order the images came."""

    def __init__(self, num_classes: int):
        self.names: list[str] = []
        self.intersection: list[np.ndarray] = []
        self.union: list[np.ndarray] = []
        self.confusion = torch.zeros((num_classes, num_classes), dtype=torch.int64)
        self.predictions: dict[str, np.ndarray] = {}


def per_image_confusion(predictions: torch.Tensor, masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """B x C x C int64 confusion matrices (rows ground truth, columns prediction) of a batch; pixels
    labelled IGNORE_INDEX (255: void, and the padding of batched images) are left out."""
    batch = predictions.shape[0]
    valid = masks != IGNORE_INDEX
    image = torch.arange(batch, device=masks.device).view(batch, *([1] * (masks.ndim - 1))).expand_as(masks)
    codes = (image[valid] * num_classes + masks[valid]) * num_classes + predictions[valid]
    if codes.is_cuda and torch.are_deterministic_algorithms_enabled():
        counts = torch.bincount(codes.cpu(), minlength=batch * num_classes ** 2).to(codes.device)
    else:
        counts = torch.bincount(codes, minlength=batch * num_classes ** 2)
    return counts.view(batch, num_classes, num_classes)
