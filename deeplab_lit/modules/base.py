"""The LightningModule every DeepLab generation shares.

What is common: cross-entropy ignoring 255; SGD with momentum and weight decay over parameter groups
(ImageNet-initialised vs new layers, weights vs biases and norms) so each generation's lr multipliers
are data, not code; a poly (or step) schedule stepped every iteration from `trainer.max_steps`;
dataset-level metrics (a confusion matrix accumulated over the whole validation set and summed over
DDP ranks by torchmetrics, never averaged per batch); BatchNorm frozen, fine-tuned or synchronised.

What differs per generation (subclasses in v1.py, v2.py, v3.py): where the loss is computed
(`compute_loss`).

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
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from deeplab_lit.config import CRFConfig, OptimConfig
from deeplab_lit.errors import UserError
from deeplab_lit.inference import predict_probs
from deeplab_lit.models.batchnorm import batchnorm_layers
from deeplab_lit.protocols import MetricKey, Protocol

IGNORE_INDEX = 255


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
                 protocols=(Protocol(),), crf: CRFConfig = CRFConfig(), log_images: int = 4):
        super().__init__()
        self.model = network
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.recipe = recipe
        self.max_steps = max_steps
        self.crf = crf
        self.log_images = log_images
        self.set_protocols(protocols)
        self._wandb_images_logged = 0

    def batchnorm_layers(self):
        return batchnorm_layers(self.model)

    # ---------------------------------------------------------------------------- optimisation
    def parameter_groups(self) -> list[dict]:
        """SGD groups: {pretrained, new} x {weights, biases and norm parameters}.

        lr multipliers: new layers `optim.new_lr_mult`, biases `optim.bias_lr_mult` on top (Caffe's
        lr_mult 1/2 for ImageNet layers and 10/20 for the classifier in v1/v2); biases and norm
        parameters get weight decay only if `optim.bias_weight_decay`.
        """
        optim = self.recipe
        groups = []
        for origin, named in self.model.named_parameter_groups().items():
            origin_mult = optim.new_lr_mult if origin == "new" else 1.0
            weights = [p for name, p in named if p.requires_grad and p.ndim > 1]
            biases = [p for name, p in named if p.requires_grad and p.ndim <= 1]
            if weights:
                groups.append(
                    {"name": f"{origin}", "params": weights, "lr_mult": origin_mult, "weight_decay": optim.weight_decay}
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
    def forward(self, images: torch.Tensor) -> dict:
        return self.model(images)

    def compute_loss(self, outputs: dict, masks: torch.Tensor) -> torch.Tensor:
        """v3/v3+: cross-entropy of the logits upsampled to the full-resolution ground truth."""
        return F.cross_entropy(outputs["out"], masks, ignore_index=IGNORE_INDEX)

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
        """Which protocols validation computes; each gets its own dataset-level metrics."""
        self.protocols = list(protocols)
        metrics = {}
        for protocol in self.protocols:
            for metric_key in protocol.metric_keys():
                metrics[metric_key.text] = nn.ModuleDict(
                    {
                        "iou": MulticlassJaccardIndex(
                            self.num_classes, average="none", ignore_index=IGNORE_INDEX, zero_division=float("nan")
                        ),
                        "acc": MulticlassAccuracy(self.num_classes, average="micro", ignore_index=IGNORE_INDEX),
                    }
                )
        device = next(self.model.parameters()).device
        self.eval_metrics = nn.ModuleDict(metrics).to(device)

    @staticmethod
    def metric_key(protocol: Protocol, crf: bool) -> str:
        return MetricKey(protocol.name, crf).text

    def on_validation_epoch_start(self) -> None:
        self._eval_started = time.time()
        self._wandb_images_logged = 0
        # The reference CRF runs one image per process: on CPU, keep every core busy by refining
        # images asynchronously while the network predicts the next ones (a bounded queue).
        self._crf_pool, self._crf_pending = None, deque()
        if any(p.crf for p in self.protocols) and self.crf.backend == "pydensecrf":
            from deeplab_lit.crf import ReferenceCRFPool

            self._crf_pool = ReferenceCRFPool()

    def validation_step(self, batch, batch_idx):
        masks = batch["mask"]
        for protocol in self.protocols:
            probs = predict_probs(self.model, batch["image"], protocol)
            self._update(self.metric_key(protocol, False), probs, masks)
            if protocol.crf and getattr(self, "_crf_pool", None) is not None:
                self._submit_crf(self.metric_key(protocol, True), probs, batch["rgb"], masks)
            elif protocol.crf:
                refined = self.apply_crf(probs, batch["rgb"])
                self._update(self.metric_key(protocol, True), refined, masks)
            if protocol is self.protocols[0]:
                self.log_prediction_images(batch, probs)

    def apply_crf(self, probs: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        from deeplab_lit.crf import dense_crf

        return dense_crf(probs, rgb, params=self.crf, backend=self.crf.backend)

    def _submit_crf(self, key: str, probs: torch.Tensor, rgb: torch.Tensor, masks: torch.Tensor) -> None:
        for prob, image, mask in zip(probs.float().cpu().numpy(), rgb.cpu().numpy(), masks.cpu()):
            self._crf_pending.append((key, self._crf_pool.submit(prob, image, self.crf), mask))
        while len(self._crf_pending) > 2 * self._crf_pool.workers:
            self._collect_crf()

    def _collect_crf(self) -> None:
        key, result, mask = self._crf_pending.popleft()
        refined = torch.from_numpy(result.get())[None].to(self.device)
        self._update(key, refined, mask[None].to(self.device))

    def _finish_crf(self) -> None:
        if getattr(self, "_crf_pool", None) is None:
            return
        while self._crf_pending:
            self._collect_crf()
        self._crf_pool.close()
        self._crf_pool = None

    def _update(self, key: str, probs: torch.Tensor, masks: torch.Tensor) -> None:
        predictions = probs.argmax(dim=1)
        self.eval_metrics[key]["iou"].update(predictions, masks)
        self.eval_metrics[key]["acc"].update(predictions, masks)

    def on_validation_epoch_end(self) -> None:
        self._finish_crf()
        self.last_results = {}
        self.last_confusion = {}
        for key, metric in self.eval_metrics.items():
            with metric["iou"].sync_context():  # the confusion matrix over every rank (pixels, rows = truth)
                self.last_confusion[key] = metric["iou"].confmat.detach().cpu().clone()
            per_class = metric["iou"].compute()
            accuracy = metric["acc"].compute()
            metric["iou"].reset()
            metric["acc"].reset()
            miou = mean_iou(per_class)
            metric_key = MetricKey.parse(key)
            self.log(metric_key.logged("mIoU"), miou, sync_dist=False)
            self.log(metric_key.logged("pixel_acc"), accuracy, sync_dist=False)
            if key == "mIoU":
                for name, value in zip(self.class_names, per_class.tolist()):
                    self.log(f"val/iou/{name}", value, sync_dist=False)
            self.last_results[key] = {
                "mIoU": float(miou),
                "pixel_acc": float(accuracy),
                "per_class_iou": dict(zip(self.class_names, [float(v) for v in per_class.tolist()])),
            }

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


def mean_iou(per_class: torch.Tensor) -> torch.Tensor:
    """Mean over the classes that occur in prediction or ground truth of the evaluated set.

    The per-class IoU comes from `MulticlassJaccardIndex(zero_division=nan)`: a class with an empty
    union is NaN and left out, rather than counted as 0 against the model.
    """
    return per_class.nanmean()
