"""The fully connected CRF of Krähenbühl & Koltun (2011) as DeepLab v1/v2 apply it to the network's softmax.

    refined = dense_crf(probs, images, params=cfg.crf, backend="torch")

- `probs`: float N x C x H x W softmax output at the image's resolution (torch tensor on any device,
  or numpy array); `images`: uint8 N x H x W x 3 RGB (torch tensor or numpy array).
- `params`: CRFConfig, dict, CRFParams or None (DeepLab v2 ResNet-101: w1 4, xy 67, rgb 3, w2 3, xy 1,
  10 iterations); attributes other than the six parameters (`enabled`, `backend`) are ignored.
- Returns refined probabilities of the same shape, dtype, device and type (tensor or array).

Backends: "pydensecrf" is the reference (densecrf C++, one image per process, `workers` processes);
"torch" is a batched re-implementation of the same computation (permutohedral lattice in tensor
operations, see lattice.py) that runs on CPU or CUDA and agrees with the reference (tests/test_crf.py).

For parameter searches, `dense_crf_many` runs many settings on the same inputs, reusing the lattices.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from torch import Tensor

from deeplab_lit.crf.checks import check_backend, check_inputs
from deeplab_lit.crf.errors import CRFInputError
from deeplab_lit.crf.lattice import LatticeRangeError
from deeplab_lit.crf.mean_field import crf_torch, crf_torch_many
from deeplab_lit.crf.params import CRFParams, resolve_params
from deeplab_lit.crf.reference import ReferenceCRFPool, default_workers, refine_image

__all__ = ["dense_crf", "dense_crf_many", "CRFParams", "CRFInputError", "ReferenceCRFPool", "refine_image",
           "resolve_params", "default_workers"]


def _run_torch(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except LatticeRangeError as error:
        raise CRFInputError(f"CRF parameters out of range: {error}") from None


def dense_crf(probs: Tensor | np.ndarray, images: Tensor | np.ndarray, params: Any = None, backend: str = "torch",
              workers: int | None = None) -> Tensor | np.ndarray:
    """Refine softmax probabilities with the dense CRF; see the module docstring.

    workers: processes for backend="pydensecrf" (default: all cores; 1 = in this process). Ignored by "torch",
    which uses torch's own threads (torch.set_num_threads) or the probabilities' GPU.
    """
    check_backend(backend)
    params = resolve_params(params)
    was_numpy = isinstance(probs, np.ndarray)
    probs_t, images_t = check_inputs(probs, images)
    if probs_t.shape[0] == 0:
        refined = probs_t.clone()
    elif backend == "torch":
        refined = _run_torch(crf_torch, probs_t, images_t, params)
    else:
        workers = min(workers or default_workers(), probs_t.shape[0])
        with ReferenceCRFPool(workers) as pool:
            refined = pool.refine(probs_t, images_t, params)
    refined = refined.to(device=probs_t.device, dtype=probs_t.dtype)
    return refined.cpu().numpy() if was_numpy else refined


def dense_crf_many(probs: Tensor | np.ndarray, images: Tensor | np.ndarray, settings: Sequence[Any],
                   output: str = "labels", max_stacked: int | None = None,
                   images_per_pass: int | None = None) -> list[Tensor]:
    """The torch CRF for many parameter settings on the same batch, e.g. a grid search on cached unaries.

    Returns one tensor per setting, in order, on the probabilities' device: output="labels" int64
    N x H x W (argmax of the refined probabilities), "probs" float32 N x C x H x W.

    Costs (per 500x375 image, 21 labels, one CPU core; see the README): settings that share
    (bi_xy_std, bi_rgb_std, pos_xy_std) share one appearance lattice, whose build costs about 3-5
    mean-field iterations; every setting then costs its iterations (~50 ms each). The smoothness
    kernel depends only on the image size and pos_xy_std and is cached across calls. So a grid over
    w1 is cheap, a grid over (sigma_alpha, sigma_beta) pays one lattice per pair and image.
    max_stacked: settings run together as extra channels (default 1 on CPU, 8 on GPU);
    images_per_pass: images sharing one lattice and pass (default 1 on CPU, the whole batch on GPU).
    """
    resolved = [resolve_params(s) for s in settings]
    probs_t, images_t = check_inputs(probs, images)
    if not resolved:
        return []
    return _run_torch(crf_torch_many, probs_t, images_t, resolved, output=output, max_stacked=max_stacked,
                      images_per_pass=images_per_pass)
