"""The permutohedral lattice of Adams, Baek & Davis (2010) in torch tensor operations.

High-dimensional Gaussian filtering `out_i = sum_j exp(-|f_i - f_j|^2 / 2) x_j` is approximated by
splatting every point onto the d+1 vertices of the lattice simplex that encloses it (barycentric
weights), blurring along each of the d+1 lattice directions with the kernel [1/2, 1, 1/2], and slicing
back with the same weights. This file replicates what Krähenbühl's densecrf (the code pydensecrf
wraps, `permutohedral.cpp`) computes, so that the torch CRF agrees with the reference:

- the elevation matrix E scaled by `sqrt(2/3) * (d+1)`, so the lattice filter has unit standard
  deviation in feature space (features are divided by the kernel stds beforehand);
- the closest remainder-0 point found by rounding `elevated / (d+1)` to the nearest integer, the
  simplex found by ranking the differences (ties: the lower coordinate index counts as larger,
  exactly as densecrf's pairwise comparison loop), and the same "bring back to the plane" fix-up;
- vertices keyed by their first d coordinates; missing blur neighbours contribute zero;
- blur with unnormalised weights (1/2, 1, 1/2), directions 0..d in order, and slice scaled by
  densecrf's constant `alpha = 1 / (1 + 2^-d)`. The pixel's own contribution is NOT removed (densecrf 2013
  keeps it; the 2011 version subtracted it).

What differs is only how it is computed: instead of a hash table filled point by point, all vertex
keys are packed into int64 codes (mixed radix over the key ranges, padded so that neighbour codes are
plain additions), deduplicated with one sort, and neighbours are found with `searchsorted`. Splat,
blur and slice are sparse CSR matrices, so one filtering pass is a handful of sparse-dense matrix
products (MKL on CPU, cuSPARSE on CUDA) over all channels at once.

Points may carry a `group` id (the image of a batch): groups never share a vertex, so one lattice
filters a whole batch of images with no interaction between them.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

_INT64_CODE_LIMIT = 2**62  # keep a factor of two of headroom below int64's range for neighbour offsets


class LatticeRangeError(ValueError):
    """The features span more lattice cells than an int64 code can address (absurdly small stds)."""


def _index_dtype(*sizes: int) -> torch.dtype:
    """int32 indices where they fit: MKL's LP64 interface takes them as they are (int64 ones would be
    converted on every product) and they halve the index traffic."""
    return torch.int32 if max(sizes) < 2**31 else torch.int64


def _sparse_csr(crow: Tensor, col: Tensor, val: Tensor, size: tuple[int, int]) -> Tensor:
    index = _index_dtype(val.numel(), *size)
    with warnings.catch_warnings():  # torch flags sparse CSR as beta; the operations used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow.to(index), col.to(index), val, size=size)


def enclosing_simplices(features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The simplex enclosing each point, following densecrf's `Permutohedral::init` step by step.

    features: float32 P x d (already divided by the kernel's standard deviations).
    Returns, in coordinate-major layout (one row per lattice coordinate, one column per point):
      rem0  int64 (d+1) x P, the remainder-0 vertex the simplex is built from,
      rank  int64 (d+1) x P, a permutation of 0..d per point (the simplex's ordering),
      bary  float32 (d+1) x P, the barycentric weight of vertex r = 0..d.
    Vertex r of point p has key rem0[k, p] + canonical[r][rank[k, p]] for k < d, see `_vertex_codes`.
    """
    num_points, d = features.shape
    device = features.device
    # Scale factors computed as densecrf does: in double, stored as float.
    inv_std_dev = float(torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32))
    scale = torch.tensor([1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev for i in range(d)],
                         dtype=torch.float32, device=device)
    cf = features.t() * scale[:, None]  # d x P
    # Elevate (y = E p): elevated[j] = sum_{k >= j} cf[k] - j cf[j-1], accumulated from the last coordinate.
    elevated = torch.empty(d + 1, num_points, dtype=torch.float32, device=device)
    running = torch.zeros(num_points, dtype=torch.float32, device=device)
    for j in range(d, 0, -1):
        elevated[j] = running - j * cf[j - 1]
        running = running + cf[j - 1]
    elevated[0] = running

    # Closest remainder-0 point: round elevated / (d+1) (to nearest, ties to even as SSE rounding does).
    down_factor = float(torch.tensor(1.0 / (d + 1), dtype=torch.float32))
    rounded = torch.round(elevated * down_factor)
    rem0 = rounded * (d + 1)
    coord_sum = rounded.sum(0).to(torch.int64)

    # Rank the residuals with densecrf's pairwise loop (on ties the lower index counts as larger),
    # counting in uint8 so that the comparisons add without type conversions (bool viewed as uint8).
    residual = elevated - rem0
    counts = torch.zeros(d + 1, num_points, dtype=torch.uint8, device=device)
    for i in range(d):
        for j in range(i + 1, d + 1):
            smaller = residual[i] < residual[j]
            counts[i] += smaller.view(torch.uint8)
            counts[j] += (~smaller).view(torch.uint8)
    rank = counts.to(torch.int64)
    # Bring the point back onto the plane (coordinates summing to 0).
    rank += coord_sum
    rem0 = rem0.to(torch.int64)
    wrap = (rank < 0).to(torch.int64) - (rank > d).to(torch.int64)
    rank += (d + 1) * wrap
    rem0 += (d + 1) * wrap

    # Barycentric coordinates (p. 10 of Adams et al.): with u[q] = v_i for the i of rank q,
    # b[0] = 1 + u[d] - u[0] (after densecrf's wrap-around), b[t] = u[d-t] - u[d-t+1] for t = 1..d.
    v = (elevated - rem0.to(torch.float32)) * down_factor
    u = torch.empty_like(v).scatter_(0, rank, v)
    bary = torch.empty_like(v)
    bary[1:] = u[:d].flip(0) - u[1:].flip(0)
    bary[0] = u[d] + (1.0 - u[0])  # in densecrf's order of float operations
    return rem0, rank, bary


class PermutohedralLattice:
    """A lattice built once for a set of points; `filter(x)` applies the (unnormalised) Gaussian.

    Vertex values live in (num_vertices + 2) rows: row 0 and the last row are padding that always holds
    zero, so that a missing blur neighbour can point there and every blur row keeps exactly three
    entries with ascending, distinct columns (no masking when building, a plain CSR for MKL/cuSPARSE).

    Operators (sparse CSR): `splat` rows x points, `blur` (d+1 of rows x rows), `slice` points x rows
    (densecrf's alpha folded in). `scale_points` folds per-point diagonal scalings into splat/slice,
    which is how the CRF applies densecrf's symmetric normalisation without extra passes.
    """

    def __init__(self, features: Tensor, groups: Tensor | None = None):
        if features.dim() != 2 or features.shape[0] == 0:
            raise ValueError(f"features must be P x d with P > 0, got shape {tuple(features.shape)}")
        features = features.to(torch.float32).contiguous()
        num_points, d = features.shape
        device = features.device
        self.num_points, self.dim = num_points, d

        rem0, rank, bary = enclosing_simplices(features)
        codes, strides = _vertex_codes(rem0, rank, groups)
        # Point-major (P x (d+1)) from here on, so that a stable sort keeps each vertex's points ascending.
        codes = codes.t().contiguous().view(-1)
        bary = bary.t().contiguous().view(-1)

        # One sort gives the vertex ids (dense, in code order), the splat matrix and the point -> vertex map.
        sorted_codes, order = torch.sort(codes, stable=True)
        is_new = torch.empty_like(sorted_codes, dtype=torch.bool)
        is_new[0] = True
        torch.ne(sorted_codes[1:], sorted_codes[:-1], out=is_new[1:])
        vertex_of_sorted = torch.cumsum(is_new, 0) - 1
        num_vertices = int(vertex_of_sorted[-1]) + 1
        self.num_vertices = num_vertices
        rows = num_vertices + 2
        self.num_rows = rows
        vertex_codes = torch.empty(num_vertices, dtype=torch.int64, device=device)
        vertex_codes.scatter_(0, vertex_of_sorted, sorted_codes)  # equal codes per vertex: deterministic
        row_of_entry = torch.empty_like(vertex_of_sorted).scatter_(0, order, vertex_of_sorted + 1)

        # Splat: rows x points; vertex v is row v + 1, columns (points) ascending within a row.
        counts = torch.bincount(vertex_of_sorted, minlength=num_vertices)
        self._splat_crow = torch.zeros(rows + 1, dtype=torch.int64, device=device)
        torch.cumsum(counts, 0, out=self._splat_crow[2:rows])
        self._splat_crow[rows] = codes.numel()
        self._splat_col = torch.div(order, d + 1, rounding_mode="floor")
        self._splat_val = bary[order]

        # Slice: points x rows, d+1 entries per row (columns sorted), alpha folded into the weights.
        slice_col, perm = torch.sort(row_of_entry.view(num_points, d + 1), dim=1)
        alpha = 1.0 / (1.0 + 2.0 ** (-d))
        self._slice_crow = torch.arange(0, num_points * (d + 1) + 1, d + 1, device=device)
        self._slice_col = slice_col.view(-1)
        self._slice_val = bary.view(num_points, d + 1).gather(1, perm).view(-1) * alpha

        index = _index_dtype(codes.numel(), rows)
        self._splat_crow, self._splat_col = self._splat_crow.to(index), self._splat_col.to(index)
        self._slice_crow, self._slice_col = self._slice_crow.to(index), self._slice_col.to(index)
        self.blur = self._blur_matrices(vertex_codes, strides)
        self.splat = _sparse_csr(self._splat_crow, self._splat_col, self._splat_val, (rows, num_points))
        self.slice = _sparse_csr(self._slice_crow, self._slice_col, self._slice_val, (num_points, rows))

    def _blur_matrices(self, vertex_codes: Tensor, strides: list[int]) -> list[Tensor]:
        """I + 1/2 (shift to n1 + shift to n2) along each lattice direction j = 0..d, as CSR matrices.

        densecrf's neighbours along direction j: n1 = key - 1 with coordinate j at key_j + d, n2 = key + 1
        with coordinate j at key_j - d (j = d changes only the implied coordinate). Missing ones add 0:
        they point at a padding row (0 for the lower column, the last row for the upper one). All
        directions are computed at once ((d+1) x vertices tensors): one search, a few large operations.
        """
        d, num_vertices, rows = self.dim, self.num_vertices, self.num_rows
        device = vertex_codes.device
        index = _index_dtype(3 * rows + 1)
        deltas = [-sum(strides) + ((d + 1) * strides[j] if j < d else 0) for j in range(d + 1)]
        own = torch.arange(1, num_vertices + 1, dtype=index, device=device)  # row of each vertex
        target = vertex_codes + torch.tensor(deltas, device=device)[:, None]  # (d+1) x vertices
        pos = torch.searchsorted(vertex_codes, target, out_int32=index == torch.int32)
        pos.clamp_(max=num_vertices - 1)
        found1 = vertex_codes[pos] == target
        n1 = torch.where(found1, pos + 1, -1)
        # n2 is n1's inverse relation: if n1(a) = b then n2(b) = a (and n2(b) exists only then).
        # Scattered into one flat (d+1) x rows table; misses land on each direction's row 0.
        n2 = torch.full((d + 1, rows), -1, dtype=index, device=device)
        flat_target = torch.where(found1, n1, 0).long() + rows * torch.arange(d + 1, device=device)[:, None]
        n2.view(-1).scatter_(0, flat_target.view(-1), torch.where(found1, own, -1).view(-1))
        n2 = n2[:, 1:num_vertices + 1]
        # Rows follow code order, so the neighbour with the smaller code has the smaller row.
        positive = torch.tensor([delta > 0 for delta in deltas], device=device)[:, None]
        lower, upper = torch.where(positive, n2, n1), torch.where(positive, n1, n2)
        lower_ok, upper_ok = lower >= 0, upper >= 0
        cols = torch.empty(d + 1, rows, 3, dtype=index, device=device)
        cols[:, 1:-1, 0] = torch.where(lower_ok, lower, 0)
        cols[:, 1:-1, 1] = own
        cols[:, 1:-1, 2] = torch.where(upper_ok, upper, rows - 1)
        cols[:, 0] = torch.tensor([0, 1, 2], dtype=index, device=device)  # padding rows: three zero weights
        cols[:, -1] = torch.tensor([rows - 3, rows - 2, rows - 1], dtype=index, device=device)
        weights = torch.zeros(d + 1, rows, 3, dtype=torch.float32, device=device)
        weights[:, 1:-1, 0] = lower_ok * 0.5
        weights[:, 1:-1, 1] = 1.0
        weights[:, 1:-1, 2] = upper_ok * 0.5
        crow = torch.arange(0, 3 * rows + 1, 3, dtype=index, device=device)
        return [_sparse_csr(crow, cols[j].view(-1), weights[j].view(-1), (rows, rows)) for j in range(d + 1)]

    def scale_points(self, splat_scale: Tensor, slice_scale: Tensor) -> None:
        """Fold diagonal scalings into the operator: filter(x) becomes slice_scale * K (splat_scale * x)."""
        self._splat_val = self._splat_val * splat_scale[self._splat_col.long()]
        self._slice_val = self._slice_val * slice_scale.repeat_interleave(self.dim + 1)
        self.splat = _sparse_csr(self._splat_crow, self._splat_col, self._splat_val, (self.num_rows, self.num_points))
        self.slice = self.weighted(1.0)

    def weighted(self, factor: float) -> Tensor:
        """The last operator of `filter` (slice) times a constant: the CRF folds a kernel's weight into it."""
        return _sparse_csr(self._slice_crow, self._slice_col, self._slice_val * factor,
                           (self.num_points, self.num_rows))

    def filter(self, x: Tensor, out: Tensor | None = None, accumulate: bool = False,
               weighted: Tensor | None = None, work: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """slice(blur_d(...blur_0(splat(x)))) for x float32 P x K (any K).

        out: write there (P x K) instead of a new tensor; accumulate: add to `out` instead of overwriting;
        weighted: `weighted(w)` to use as the slice operator (the filter times w);
        work: two rows x K buffers from `work_buffers(K)` to reuse across calls (the lattice itself keeps
        no state, so one cached lattice can serve concurrent callers).
        """
        width = x.shape[1]
        values, spare = work if work is not None else self.work_buffers(width, x.device)
        _spmm(self.splat, x, values)
        for blur in self.blur:
            _spmm(blur, values, spare)
            values, spare = spare, values
        if out is None:
            out = torch.empty(self.num_points, width, dtype=torch.float32, device=x.device)
            accumulate = False
        return _spmm(self.slice if weighted is None else weighted, values, out, accumulate)

    def work_buffers(self, width: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """Two uninitialised rows x width buffers for `filter` (the blur ping-pongs between them)."""
        device = self.splat.device if device is None else device
        return tuple(torch.empty(self.num_rows, width, dtype=torch.float32, device=device) for _ in range(2))


class ExplicitKernel:
    """A lattice's filter multiplied out into one points x points sparse matrix K = slice B_d..B_0 splat.

    Same interface as PermutohedralLattice (`filter`, `weighted`, `work_buffers`). When the lattice has
    about as many vertices as points (a narrow kernel: the CRF's smoothness kernel with sxy <= ~1.3 on a
    pixel grid, where K has ~30-50 entries per row), one product with K is 2-3x faster than the splat,
    blur and slice passes; for wider kernels K fills up quickly (sxy 2: ~125 entries per row, slower).
    Building it costs about ten lattice passes, so it pays off only for a kernel that is reused.

    MKL's sparse-sparse product leaves the columns of a row unsorted; its sparse-dense product does not
    need them sorted (tests compare K's filter with the lattice's), so they are left as they are.
    """

    def __init__(self, lattice: PermutohedralLattice):
        product = lattice.splat
        for blur in lattice.blur:
            product = blur @ product
        product = lattice.slice @ product
        self.num_points = lattice.num_points
        self._crow, self._col, self._val = product.crow_indices(), product.col_indices(), product.values()
        self.matrix = self.weighted(1.0)

    def weighted(self, factor: float) -> Tensor:
        """K times a constant."""
        return _sparse_csr(self._crow, self._col, self._val * factor, (self.num_points, self.num_points))

    def work_buffers(self, width: int, device: torch.device | None = None) -> None:
        return None

    def filter(self, x: Tensor, out: Tensor | None = None, accumulate: bool = False,
               weighted: Tensor | None = None, work: None = None) -> Tensor:
        """K x (or `weighted` x), into / added to `out` like PermutohedralLattice.filter."""
        if out is None:
            out = torch.empty(self.num_points, x.shape[1], dtype=torch.float32, device=x.device)
            accumulate = False
        return _spmm(self.matrix if weighted is None else weighted, x, out, accumulate)


def _spmm(sparse: Tensor, dense: Tensor, out: Tensor, accumulate: bool = False) -> Tensor:
    """out (+)= sparse @ dense, in place: `sparse @ dense` would zero-fill and copy a new output first.

    With beta=0 MKL ignores out's previous content (checked: even NaN does not propagate), so CPU buffers
    need no zeroing; on other devices the (cheap) zeroing keeps uninitialised memory out of the result.
    """
    if not accumulate and out.device.type != "cpu":
        out.zero_()
    return torch.addmm(out, sparse, dense, beta=1.0 if accumulate else 0.0, alpha=1.0, out=out)


def _vertex_codes(rem0: Tensor, rank: Tensor, groups: Tensor | None) -> tuple[Tensor, list[int]]:
    """int64 codes ((d+1) x P) of the d+1 vertices of each point's simplex, and the radix strides.

    A vertex key is rem0[k] + canonical[r][rank[k]] (k < d) with canonical[r][q] = r if q <= d - r else
    r - (d+1). Packed in mixed radix (key k times strides[k]), vertex r's code is
        base + r * sum(strides) - (d+1) * sum_{k < d, rank[k] > d - r} strides[k],
    computed for all r at once with a cumulative sum over the ranks. Each axis is padded by 2d around
    rem0's range: keys lie within rem0 +- d and their blur neighbours another d away, so a neighbour's
    code is the vertex code plus a constant per direction. The group (image) is the most significant digit.
    """
    d = rank.shape[0] - 1
    num_points = rank.shape[1]
    device = rank.device
    low = rem0[:d].amin(1) - 2 * d
    span = (rem0[:d].amax(1) - low + 2 * d + 1).tolist() if num_points else [1] * d
    low = low.tolist() if num_points else [0] * d
    num_groups = int(groups.max()) + 1 if groups is not None and groups.numel() else 1
    if math.prod(span) * num_groups >= _INT64_CODE_LIMIT:
        raise LatticeRangeError(
            f"the features span {math.prod(span) * num_groups:.3g} lattice cells (limit 2^62): the kernel "
            "standard deviations are too small for the feature ranges")
    strides = [math.prod(span[k + 1:]) for k in range(d)]

    base = torch.zeros(num_points, dtype=torch.int64, device=device)
    for k in range(d):
        base += (rem0[k] - low[k]) * strides[k]
    if groups is not None:
        base += groups.to(device=device, dtype=torch.int64) * math.prod(span)
    # above[t] = sum of strides[k] over the coordinates k < d whose rank exceeds t.
    stride_of_coordinate = torch.tensor(strides + [0], dtype=torch.int64, device=device)
    stride_by_rank = torch.empty_like(rank).scatter_(0, rank, stride_of_coordinate[:, None].expand(-1, num_points))
    above = torch.zeros_like(rank)
    above[:d] = stride_by_rank.flip(0).cumsum(0).flip(0)[1:]
    remainder = torch.arange(d + 1, device=device)[:, None]
    codes = base + remainder * sum(strides) - (d + 1) * above.flip(0)
    return codes, strides
