"""The reference backend: Krähenbühl's densecrf through pydensecrf, one image at a time, pooled over cores.

`refine_image` is exactly the recipe DeepLab's public code uses: unary = -log(probs) through
`pydensecrf.utils.unary_from_softmax` (probabilities clipped at 1e-5), `addPairwiseGaussian(sxy=pos_xy_std,
compat=pos_w)`, `addPairwiseBilateral(sxy=bi_xy_std, srgb=bi_rgb_std, rgbim=image, compat=bi_w)` (Potts,
DIAG_KERNEL, NORMALIZE_SYMMETRIC defaults), `inference(iterations)`.

densecrf is single-threaded C++, so batches are spread over a process pool. `ReferenceCRFPool` keeps the
pool alive across calls (for evaluation loops) and takes images of different sizes:

    with ReferenceCRFPool(workers=8) as pool:
        for refined in pool.imap((p, rgb) for p, rgb in pairs, params=cfg.crf):  # C x H x W, H x W x 3
            ...
        future = pool.submit(probs_chw, rgb_hwc, params)  # .get() -> C x H x W float32
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from typing import Any, Iterable, Iterator

import numpy as np
import pydensecrf.densecrf as dcrf
import torch
from pydensecrf.utils import unary_from_softmax
from torch import Tensor

from deeplab_lit.crf.params import CRFParams, resolve_params


def refine_image(probs: np.ndarray, image: np.ndarray, params: CRFParams) -> np.ndarray:
    """One image through pydensecrf: probs C x H x W float, image H x W x 3 uint8 -> C x H x W float32."""
    classes, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.asarray(probs, dtype=np.float32))))
    crf.addPairwiseGaussian(sxy=float(params.pos_xy_std), compat=float(params.pos_w))
    crf.addPairwiseBilateral(sxy=float(params.bi_xy_std), srgb=float(params.bi_rgb_std),
                             rgbim=np.ascontiguousarray(image, dtype=np.uint8), compat=float(params.bi_w))
    refined = np.asarray(crf.inference(int(params.iterations)), dtype=np.float32)
    return refined.reshape(classes, height, width)


def _leave_sigterm_to_the_parent() -> None:
    """Pool workers ignore SIGTERM sent to the process group: the parent saves its state and ends them."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _refine_job(job: tuple[np.ndarray, np.ndarray, CRFParams]) -> np.ndarray:
    return refine_image(*job)


def default_workers() -> int:
    """All cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _default_context() -> str:
    # fork starts workers in milliseconds and they only run numpy + densecrf (no torch, no CUDA);
    # elsewhere (macOS, Windows) fall back to spawn, which re-imports this module in each worker.
    return "fork" if sys.platform.startswith("linux") else "spawn"


class ReferenceCRFPool:
    """A process pool running pydensecrf, one image per task. workers=1 runs in this process."""

    def __init__(self, workers: int | None = None, mp_context: str | None = None):
        self.workers = default_workers() if workers is None else int(workers)
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._pool = None
        if self.workers > 1:
            context = multiprocessing.get_context(mp_context or _default_context())
            self._pool = context.Pool(self.workers, initializer=_leave_sigterm_to_the_parent)

    def __enter__(self) -> "ReferenceCRFPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def imap(self, pairs: Iterable[tuple[np.ndarray, np.ndarray]], params: Any = None) -> Iterator[np.ndarray]:
        """Refine (probs C x H x W, image H x W x 3 uint8) pairs, in order; sizes may differ between pairs."""
        params = resolve_params(params)
        jobs = ((np.asarray(p, dtype=np.float32), np.asarray(im), params) for p, im in pairs)
        if self._pool is None:
            return map(_refine_job, jobs)
        return self._pool.imap(_refine_job, jobs)

    def submit(self, probs: np.ndarray, image: np.ndarray, params: Any = None):
        """Start one image; returns an object whose .get() gives the refined C x H x W float32 array."""
        job = (np.asarray(probs, dtype=np.float32), np.asarray(image), resolve_params(params))
        if self._pool is None:
            return _Done(_refine_job(job))
        return self._pool.apply_async(_refine_job, (job,))

    def refine(self, probs: Tensor, images: Tensor, params: Any = None) -> Tensor:
        """Batched like dense_crf: probs N x C x H x W, images N x H x W x 3 (validated) -> float32 CPU tensor."""
        probs_np = probs.detach().to("cpu", torch.float32).numpy()
        images_np = images.detach().cpu().numpy()
        refined = list(self.imap(zip(probs_np, images_np), params))
        if not refined:
            return torch.empty(probs.shape, dtype=torch.float32)
        return torch.from_numpy(np.stack(refined))


class _Done:
    """The result of a job run in-process, with the AsyncResult interface."""

    def __init__(self, value: np.ndarray):
        self._value = value

    def get(self, timeout: float | None = None) -> np.ndarray:
        return self._value

    def ready(self) -> bool:
        return True
