"""The torch backend: batched mean-field inference of the dense CRF, CPU or CUDA.

It computes what pydensecrf computes with `DenseCRF2D` + `unary_from_softmax` +
`addPairwiseGaussian` + `addPairwiseBilateral` + `inference(iterations)` (densecrf 2013):

    unary        U = -log(clip(probs, 1e-5, 1))                      (pydensecrf.utils.unary_from_softmax)
    Q_0          = softmax(-U)
    Q_{t+1}      = softmax(-U + sum_k w_k n_k * K_k(n_k * Q_t))     (Potts: compatibility -w, subtracted)

with K_k the permutohedral-lattice Gaussian filter (pixel itself included) over the features
(x/sxy, y/sxy) for the smoothness kernel and (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb) for the appearance
kernel (x = column, y = row, unrounded float32 divisions as densecrf does), and n_k = 1/sqrt(K_k(1))
densecrf's default NORMALIZE_SYMMETRIC. Everything runs in float32, as densecrf does.

Layout: the marginals are kept as HW x B x S x C (pixels, images, stacked parameter settings,
labels), so that both kernels see a plain 2-D matrix without copies:
- the smoothness kernel depends only on (H, W, pos_xy_std): it is built once for one image size (and
  cached), and filters the (HW) x (B*S*C) view, i.e. all images and settings as extra channels. With
  sxy = 1 its lattice has more vertices than pixels, so from the second use of a size on it is
  multiplied out into one sparse matrix (ExplicitKernel, 2-3x faster);
- the appearance lattice depends on the image: one lattice over HW*B points with the image index as
  a group (images never share a vertex) filters the (HW*B) x (S*C) view.

Costs on one core of the 2-core dev machine (500x375, 21 labels, v2 ResNet parameters, measured
under load from other processes, so indicative): appearance lattice build 150-300 ms, one mean-field
iteration ~50 ms (pydensecrf: ~100 ms), smoothness lattice ~130 ms and its explicit form ~300 ms, both
once per image size.
"""
from __future__ import annotations

import functools
from collections import defaultdict
from typing import Sequence

import torch
from torch import Tensor

from deeplab_lit.crf.lattice import ExplicitKernel, PermutohedralLattice
from deeplab_lit.crf.params import CRFParams

UNARY_CLIP = 1e-5  # pydensecrf.utils.unary_from_softmax's default clip
NORM_EPS = 1e-20  # densecrf: norm = 1 / sqrt(K(1) + 1e-20)
# Vertices per point above which the smoothness kernel is multiplied out (ExplicitKernel). Measured on
# 500x375: sxy 1 -> 1.16 vertices/pixel, 32 entries/row, 2.4x faster; sxy 1.25 -> 0.74, 1.4x faster;
# sxy 1.5 -> 0.52, 1.35x slower.
EXPLICIT_MIN_VERTICES_PER_POINT = 0.7


def normalized_lattice(features: Tensor, groups: Tensor | None = None) -> PermutohedralLattice:
    """A lattice whose filter applies densecrf's NORMALIZE_SYMMETRIC kernel n * K(n * x), n = 1/sqrt(K(1))."""
    lattice = PermutohedralLattice(features, groups)
    ones = torch.ones(features.shape[0], 1, dtype=torch.float32, device=features.device)
    norm = torch.rsqrt(lattice.filter(ones)[:, 0] + NORM_EPS)
    lattice.scale_points(norm, norm)
    return lattice


def _pixel_grid(height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Column and row coordinates (float32) of the pixels in row-major order."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=device),
                            torch.arange(width, dtype=torch.float32, device=device), indexing="ij")
    return xs.reshape(-1), ys.reshape(-1)


def _divide(values: Tensor, std: float) -> Tensor:
    """values / std in float32 as densecrf does (a true division: torch would multiply by 1/std for a scalar)."""
    return values / torch.full_like(values, std)


class SmoothnessKernel:
    """The smoothness kernel of one image size, shared by every image of that size (cached below).

    `operator()` returns the lattice; from the second use on, if the lattice is dense (narrow kernel,
    about one vertex per pixel) it is replaced by its ExplicitKernel, which filters 2-3x faster but costs
    about ten lattice passes to build: a size seen once never pays for it.
    """

    def __init__(self, lattice: PermutohedralLattice):
        self._lattice: PermutohedralLattice | None = lattice
        self._explicit: ExplicitKernel | None = None
        self.uses = 0

    def operator(self) -> PermutohedralLattice | ExplicitKernel:
        self.uses += 1
        lattice = self._lattice
        if (self._explicit is None and self.uses >= 2
                and lattice.num_vertices >= EXPLICIT_MIN_VERTICES_PER_POINT * lattice.num_points):
            self._explicit = ExplicitKernel(lattice)
            self._lattice = None  # no longer needed: free its operators
        return self._explicit if self._explicit is not None else lattice

    @property
    def is_explicit(self) -> bool:
        return self._explicit is not None


@functools.lru_cache(maxsize=8)
def smoothness_kernel(height: int, width: int, xy_std: float, device: torch.device) -> SmoothnessKernel:
    """The position-only kernel of one H x W image (shared by every image of that size), cached."""
    xs, ys = _pixel_grid(height, width, device)
    return SmoothnessKernel(normalized_lattice(torch.stack([_divide(xs, xy_std), _divide(ys, xy_std)], 1)))


def appearance_kernel(images: Tensor, xy_std: float, rgb_std: float) -> PermutohedralLattice:
    """The bilateral kernel of a batch of images (B x H x W x 3 uint8), points ordered (pixel, image)."""
    batch, height, width, _ = images.shape
    xs, ys = _pixel_grid(height, width, images.device)
    position = torch.stack([_divide(xs, xy_std), _divide(ys, xy_std)], 1)[:, None, :].expand(-1, batch, -1)
    colour = _divide(images.permute(1, 2, 0, 3).reshape(height * width, batch, 3).to(torch.float32), rgb_std)
    features = torch.cat([position, colour], 2).reshape(-1, 5)
    groups = torch.arange(batch, device=images.device).repeat(height * width)
    return normalized_lattice(features, groups)


def _negative_unary(probs: Tensor) -> Tensor:
    """B x C x H x W probabilities -> -U as HW x B x 1 x C float32."""
    batch, classes, height, width = probs.shape
    log_probs = torch.log(probs.to(torch.float32).clamp(UNARY_CLIP, 1.0))
    return log_probs.permute(2, 3, 0, 1).reshape(height * width, batch, 1, classes).contiguous()


def _mean_field(neg_unary: Tensor, appearance: PermutohedralLattice | None,
                smoothness: PermutohedralLattice | ExplicitKernel | None,
                settings: Sequence[CRFParams]) -> list[Tensor]:
    """Mean field for S settings sharing both kernels; returns each setting's Q as HW x B x C.

    neg_unary: HW x B x 1 x C. The settings may differ in bi_w, pos_w and iterations. The loop works in
    preallocated buffers: on CPU, allocating and zeroing these large tensors costs as much as the
    arithmetic. When all settings share the weights (always for a single one) the weights are folded
    into the slice operators and the filters add straight into the message.
    """
    pixels, batch, _, classes = neg_unary.shape
    count = len(settings)
    device = neg_unary.device
    shape = (pixels, batch, count, classes)
    bi_ws = [float(s.bi_w) for s in settings]
    pos_ws = [float(s.pos_w) for s in settings]
    shared_weights = len(set(bi_ws)) == 1 and len(set(pos_ws)) == 1
    # One pass per kernel: (lattice, weighted slice or None, per-setting weights, view of Q, work buffers).
    passes = []
    for lattice, weights, view in ((smoothness, pos_ws, (pixels, batch * count * classes)),
                                   (appearance, bi_ws, (pixels * batch, count * classes))):
        if lattice is not None and any(w != 0 for w in weights):
            folded = lattice.weighted(weights[0]) if shared_weights else None
            passes.append((lattice, folded, weights, view, lattice.work_buffers(view[1], device)))

    results: list[Tensor | None] = [None] * count
    q = exp_normalize(neg_unary).expand(shape).contiguous()
    message = torch.empty(shape, dtype=torch.float32, device=device)
    filtered = None if shared_weights else torch.empty(shape, dtype=torch.float32, device=device)
    for index, setting in enumerate(settings):
        if setting.iterations == 0:
            results[index] = q[:, :, index].clone()
    for iteration in range(1, max(s.iterations for s in settings) + 1):
        message.copy_(neg_unary.expand(shape))
        for lattice, folded, weights, view, work in passes:
            if folded is not None:
                lattice.filter(q.view(view), out=message.view(view), accumulate=True, weighted=folded, work=work)
            else:
                lattice.filter(q.view(view), out=filtered.view(view), work=work)
                message.addcmul_(filtered, torch.tensor(weights, device=device)[:, None])
        exp_normalize(message, out=q)
        for index, setting in enumerate(settings):
            if setting.iterations == iteration:
                results[index] = q[:, :, index].clone()
    return results  # type: ignore[return-value]


def exp_normalize(message: Tensor, out: Tensor | None = None) -> Tensor:
    """softmax over the last dimension (densecrf's expAndNormalize), into `out` if given.

    densecrf subtracts each pixel's maximum before exponentiating; that only guards against overflow
    and changes the result by float rounding. When all messages lie within +-80 (always, for weights of
    the papers' size: the unary is >= log(1e-5) and the filtered marginals are bounded) the shift is
    skipped, which makes this about twice as fast as torch.softmax on rows of 21 labels on CPU;
    otherwise it falls back to torch.softmax.
    """
    low, high = torch.aminmax(message)
    if float(low) < -80.0 or float(high) > 80.0:
        result = torch.softmax(message, dim=-1)
        return result if out is None else out.copy_(result)
    out = torch.exp(message, out=out)
    return out.div_(out.sum(-1, keepdim=True))


def _to_nchw(q: Tensor, height: int, width: int) -> Tensor:
    pixels, batch, classes = q.shape
    return q.reshape(height, width, batch, classes).permute(2, 3, 0, 1).contiguous()


@torch.no_grad()
def crf_torch(probs: Tensor, images: Tensor, params: CRFParams) -> Tensor:
    """Refined probabilities (float32 B x C x H x W) of validated inputs on one device."""
    return crf_torch_many(probs, images, [params], output="probs")[0]


@torch.no_grad()
def crf_torch_many(probs: Tensor, images: Tensor, settings: Sequence[CRFParams], output: str = "labels",
                   max_stacked: int | None = None, images_per_pass: int | None = None) -> list[Tensor]:
    """Run the CRF for many settings on the same (validated) batch, sharing lattices and passes.

    Settings are grouped by (bi_xy_std, bi_rgb_std, pos_xy_std): one appearance lattice per group,
    the smoothness kernel cached per pos_xy_std; within a group up to `max_stacked` settings run
    together as extra channels (default: 1 on CPU, where stacking measured 20% slower than one setting
    after another because the weights can no longer be folded into the operators; 8 on GPU, to fill
    the device). `images_per_pass` images share one appearance lattice and one pass (default: 1 on
    CPU, where a 4-image pass measured 1.3x slower per image: the sort grows as n log n and the working
    set leaves the cache; the whole batch on GPU). output="labels" returns int64 B x H x W per setting
    (argmax), "probs" float32 B x C x H x W.
    """
    if output not in ("labels", "probs"):
        raise ValueError(f"output must be 'labels' or 'probs', got {output!r}")
    on_cpu = probs.device.type == "cpu"
    max_stacked = (1 if on_cpu else 8) if max_stacked is None else max_stacked
    images_per_pass = (1 if on_cpu else len(probs)) if images_per_pass is None else images_per_pass
    if max_stacked < 1 or images_per_pass < 1:
        raise ValueError(f"max_stacked and images_per_pass must be >= 1, got {max_stacked}, {images_per_pass}")
    passes = [_crf_pass(probs[start:start + images_per_pass], images[start:start + images_per_pass], settings,
                        output, max_stacked) for start in range(0, len(probs), images_per_pass)]
    return [torch.cat([results[index] for results in passes]) for index in range(len(settings))]


def _crf_pass(probs: Tensor, images: Tensor, settings: Sequence[CRFParams], output: str,
              max_stacked: int) -> list[Tensor]:
    """crf_torch_many for images that share one appearance lattice."""
    batch, classes, height, width = probs.shape
    neg_unary = _negative_unary(probs)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, setting in enumerate(settings):
        groups[setting.bilateral_key + (float(setting.pos_xy_std),)].append(index)

    results: list[Tensor | None] = [None] * len(settings)
    for (bi_xy_std, bi_rgb_std, pos_xy_std), members in groups.items():
        # A kernel whose weight is 0 in every setting of the group is not built at all.
        appearance = smoothness = None
        if any(settings[i].bi_w != 0 for i in members):
            appearance = appearance_kernel(images, bi_xy_std, bi_rgb_std)
        if any(settings[i].pos_w != 0 for i in members):
            smoothness = smoothness_kernel(height, width, pos_xy_std, probs.device).operator()
        for start in range(0, len(members), max_stacked):
            chunk = members[start:start + max_stacked]
            qs = _mean_field(neg_unary, appearance, smoothness, [settings[i] for i in chunk])
            for index, q in zip(chunk, qs):
                if output == "labels":
                    results[index] = q.argmax(-1).reshape(height, width, batch).permute(2, 0, 1).contiguous()
                else:
                    results[index] = _to_nchw(q, height, width)
        del appearance
    return results  # type: ignore[return-value]
