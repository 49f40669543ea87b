"""A trained model in three lines: `load_checkpoint(path)` returns a `Segmenter`.

    from deeplab_lit import load_checkpoint
    seg = load_checkpoint("runs/demo/default-seed0/checkpoints/model.pt", device="cpu")
    labels = seg.predict(rgb)          # rgb: H x W x 3 uint8 (grey H x W and RGBA are converted) -> H x W uint8

Inside `predict`, as in the run's evaluation: the dataset's normalisation (its mean/std), padding with the
mean colour to what the network needs, the run's main evaluation protocol (output stride, input scales,
flip, whole image or sliding window: `inference.predict_probs`) and, if the run's `crf.enabled`, the dense
CRF with the run's parameters. `overrides` change them like `evaluate`'s (`eval.*`, `crf.*`); keys that
would change the trained network are refused.

`seg.model` is the network (`DeepLab`, eval mode, on `device`), `seg.class_names` the class names in label
order, `seg.spec` the resolved run. `predict_batch` takes a list of images; images of the same size run
together, so an image's labels never depend on the others in its batch. `predict_probs` gives the
probabilities (C x H x W float32, after the CRF if it is on).

Any checkpoint of `fit` works (`model.pt`, `best-on-val.pt`, `last.ckpt`); the files are read as data
(`torch.load(weights_only=True)`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from deeplab_lit.errors import UserError
from deeplab_lit.preprocessing import normalise


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", overrides: Iterable[str] = ()) -> "Segmenter":
    """The run stored in a checkpoint or model file of `fit`, ready to segment images (see the module doc).
    `device`: "cpu", "cuda", "cuda:1", ... or "auto" (CUDA when available)."""
    from deeplab_lit.checkpoints import load_run

    return Segmenter(load_run(path, overrides, what="checkpoint"), device)


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, auto)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r}: CUDA is not available on this machine; use cpu or auto")
    return resolved


def as_rgb(image, what: str = "image") -> np.ndarray:
    """An H x W x 3 uint8 RGB array from an RGB, greyscale (H x W or H x W x 1) or RGBA array, or a PIL image.
    Alpha is dropped (the colour as stored, not composited)."""
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise UserError(f"{what}: expected uint8 pixels (0-255), got {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or array.shape[0] < 1 or array.shape[1] < 1:
        raise UserError(f"{what}: expected an H x W x 3 RGB image (or greyscale, or RGBA), got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        array = array[..., :3]
    return np.ascontiguousarray(array)


class Segmenter:
    """A trained network with its run's preprocessing and evaluation protocol (see the module docstring)."""

    def __init__(self, loaded, device: str | torch.device = "cpu"):
        self.spec = loaded.spec
        self.path = loaded.path
        self.step = loaded.step
        self.weights = loaded.weights  # "final", "best-on-val" or "checkpoint"
        self.device = resolve_device(device)
        self.model = loaded.network(self.device).eval()
        self.class_names: list[str] = list(self.spec.dataset.class_names)
        self.protocol = self.spec.protocols[0]  # the main protocol: eval.*, crf.enabled
        self.crf = self.spec.config.crf
        self.mean, self.std = self.spec.dataset.mean, self.spec.dataset.std

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __repr__(self) -> str:
        return (f"Segmenter({self.spec.name}, {self.weights} weights, step {self.step}, {self.num_classes} classes, "
                f"{self.device})")

    def normalise(self, rgb: torch.Tensor) -> torch.Tensor:
        """uint8 N x H x W x 3 -> float N x 3 x H x W, normalised with the dataset's mean and std (the mean
        colour becomes 0, so padding with 0 pads with the mean colour, as training and evaluation do)."""
        return normalise(rgb.permute(0, 3, 1, 2), self.mean, self.std)

    @torch.inference_mode()
    def _probs_same_size(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Probabilities N x C x H x W (on the device) of images that share one size."""
        from deeplab_lit.inference import predict_probs

        rgb = torch.from_numpy(np.stack(images)).to(self.device)
        probs = predict_probs(self.model, self.normalise(rgb), self.protocol)
        if self.protocol.crf:
            from deeplab_lit.crf import dense_crf

            probs = dense_crf(probs, rgb, params=self.crf, backend=self.crf.backend)
        return probs

    def _groups(self, images: Sequence) -> tuple[list[np.ndarray], dict[tuple[int, int], list[int]]]:
        arrays = [as_rgb(image, f"image {index}") for index, image in enumerate(images)]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, array in enumerate(arrays):
            groups.setdefault(array.shape[:2], []).append(index)
        return arrays, groups

    def predict_batch(self, images: Sequence, batch_size: Optional[int] = None) -> list[np.ndarray]:
        """H x W uint8 labels for each image (each at its own size); images of one size run together, at
        most `batch_size` at a time (default: all of them)."""
        arrays, groups = self._groups(images)
        labels: list[Optional[np.ndarray]] = [None] * len(arrays)
        for indices in groups.values():
            step = batch_size or len(indices)
            for start in range(0, len(indices), step):
                chunk = indices[start : start + step]
                predicted = self._probs_same_size([arrays[i] for i in chunk]).argmax(1).to(torch.uint8).cpu().numpy()
                for index, label in zip(chunk, predicted):
                    labels[index] = label
        return labels

    def predict(self, image) -> np.ndarray:
        """H x W uint8 class indices of one image (RGB uint8 H x W x 3; greyscale and RGBA are converted)."""
        return self.predict_batch([image])[0]

    def predict_probs(self, image) -> np.ndarray:
        """C x H x W float32 class probabilities of one image (after the CRF if the run's crf.enabled)."""
        return self._probs_same_size([as_rgb(image)])[0].float().cpu().numpy()
