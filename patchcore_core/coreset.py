"""Memory-bank reduction by greedy minimax facility location (k-center), paper §3.2, Eq. 5, Alg. 1.

Owns the seeded random projection, the coreset size rule and the exact greedy selection. The
per-step primitives (`sq_distances_to`, `local_argmax`) give every row a value that depends only on
that row, so a version that partitions rows over processes selects exactly the same indices;
`MinDistances` holds one process's rows and applies those primitives lazily, with exact pruning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Value held by already-selected rows in a min-squared-distance vector: below every real squared
# distance (>= 0), so such a row loses every argmax and `torch.minimum` keeps it there.
SELECTED = -1.0

# Elements of a (rows, d) float32 workspace of exact distances: on CPU 2 MiB stays in cache
# (measured 2-3x faster than whole-array temporaries); on GPU 256 MiB keeps launches few.
_BLOCK_ELEMENTS = {"cpu": 1 << 19, "cuda": 1 << 26}
_CHUNK = 1 << 16  # rows per chunk of the one-off float64 passes over all rows
_U = 2.0**-24  # unit roundoff of float32


@dataclass(frozen=True)
class CoresetResult:
    """indices: (k,) int64 rows in selection order; radius: coverage radius (projected units)."""

    indices: torch.Tensor
    radius: float


def projection_matrix(dim_in: int, dim_out: int, seed: int) -> torch.Tensor:
    """Gaussian random projection ψ (Johnson-Lindenstrauss), entries N(0, 1/dim_out).

    Returns (dim_in, dim_out) float32 on CPU; the same for a given seed on every process.
    Project with `features @ projection_matrix(...)`.
    """
    if dim_in < 1 or dim_out < 1:
        raise ValueError(f"projection dims must be >= 1, got dim_in={dim_in}, dim_out={dim_out}")
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(dim_in, dim_out, generator=generator, dtype=torch.float32)
    return matrix / math.sqrt(dim_out)


def first_index(num_points: int, seed: int) -> int:
    """Seeded first row of the greedy selection, in [0, num_points); a function of its arguments."""
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    generator = torch.Generator().manual_seed(seed)
    return int(torch.randint(num_points, (1,), generator=generator))


def coreset_size(num_points: int, ratio: float | None, size: int | None) -> int:
    """Rows to keep: round(ratio * num_points) (at least 1) or `size`; give exactly one."""
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    if (ratio is None) == (size is None):
        raise ValueError(
            f"give exactly one of ratio or size, got ratio={ratio!r}, size={size!r}; "
            "e.g. --ratio 0.1 or --size 10000"
        )
    if ratio is not None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
        return min(num_points, max(1, round(ratio * num_points)))
    assert size is not None
    if not 1 <= size <= num_points:
        raise ValueError(
            f"size must be in [1, {num_points}] (the number of patches), got {size!r}; "
            "use a smaller --size or a --ratio"
        )
    return size


def sq_distances_to(points: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance of every row of `points` (n, d) to `centre` (d,); (n,) float32.

    Computed as ((x - c)**2) summed by a fixed pairwise halving of the d columns, using only
    elementwise ops: a row's value is bit-identical whatever rows share its block, and on CPU and
    CUDA alike (a library row-sum picks its summation order from the tensor shape).
    """
    work = torch.empty(points.shape, dtype=torch.float32, device=points.device)
    return _sq_distances_into(points, centre, work).clone()


def _sq_distances_into(
    points: torch.Tensor, centre: torch.Tensor, work: torch.Tensor
) -> torch.Tensor:
    """`sq_distances_to` computed in `work` (>= n rows, d columns; may be `points` itself);
    returns a (n,) view of it. `centre` is (d,), or (n, d) for one centre per row."""
    assert points.ndim == 2 and points.shape[1] >= 1, points.shape
    assert centre.shape in ((points.shape[1],), points.shape), (points.shape, centre.shape)
    diff = work[: len(points)]
    torch.sub(points.to(torch.float32), centre.to(torch.float32), out=diff)
    diff.mul_(diff)
    width = diff.shape[1]
    while width > 1:
        # fold columns [width - half, width) onto [0, half); for odd width the middle one waits
        half = width // 2
        diff[:, :half] += diff[:, width - half : width]
        width -= half
    return diff[:, 0]


def local_argmax(min_sq_dists: torch.Tensor, offset: int) -> tuple[float, int]:
    """(largest value, offset + its index) of a (n,) vector; ties go to the smallest index.

    `offset` is the global row of element 0, so proposals from row partitions compare directly:
    the global winner is the largest value, then the smallest global index.
    """
    assert min_sq_dists.ndim == 1 and len(min_sq_dists) > 0, min_sq_dists.shape
    index = int(torch.argmax(min_sq_dists))  # documented: first occurrence of the maximum
    return float(min_sq_dists[index]), offset + index


class MinDistances:
    """One process's rows (n, d) and their squared distance to the nearest centre so far.

    Exact and lazy. `min_sq` equals, bit for bit, applying `torch.minimum(min_sq,
    sq_distances_to(points, c))` then `min_sq[i] = SELECTED` for every `add_centre(c, i)` in
    order, but the work is reordered (a minimum does not depend on order):
    - centres are queued and applied to all rows every `window` centres through one matrix
      product (BLAS) that bounds each (row, centre) distance from below; `sq_distances_to` runs
      only on pairs whose bound does not prove that the pair cannot lower the row's value;
    - `argmax` brings only the rows at the top up to date: a row's value can only drop, so once
      the largest value belongs to a row that has seen every centre, it is the true maximum.
    Bounds keep a margin above the float rounding of all they compute (`_margins`), so the
    result never depends on the data; the speed does (near pairs still cost a distance each).

    Holds a reference to the points (copied only if not contiguous float32) plus 16 bytes a row.
    A class because it holds that state across the steps of one selection (one per Ray actor).
    """

    def __init__(self, points: torch.Tensor, *, window: int = 32, block_rows: int = 256) -> None:
        if points.ndim != 2 or points.shape[0] < 1 or points.shape[1] < 1:
            raise ValueError(f"points must be (n, d) with n, d >= 1, got {tuple(points.shape)}")
        if window < 1 or block_rows < 1:
            raise ValueError(f"window and block_rows must be >= 1, got {window} and {block_rows}")
        points = points.to(torch.float32).contiguous()
        n, d = points.shape
        starts = range(0, n, _CHUNK)  # chunked: a whole-array temporary would cost n x d bytes
        if not all(bool(torch.isfinite(points[lo : lo + _CHUNK]).all()) for lo in starts):
            raise ValueError("points contain NaN or infinite values; check the projected features")
        device = points.device
        self._points, self.num_rows, self.dim = points, n, d
        self.block_rows, self.num_blocks = block_rows, -(-n // block_rows)
        # |x - c|^2 = |x - mean|^2 - 2 x.b + (|b|^2 + 2 mean.b), b = c - mean: the centring keeps
        # the rounding (relative to |x - mean|, not |x|) small; per-row terms in float64, rounded
        self._mean = sum(points[lo : lo + _CHUNK].double().sum(0) for lo in starts) / n
        self._row_sq = torch.cat(
            [(points[lo : lo + _CHUNK].double() - self._mean).square().sum(1) for lo in starts]
        ).float()  # |x - mean|^2
        self._row_norm = torch.cat(
            [points[lo : lo + _CHUNK].double().norm(dim=1) for lo in starts]
        ).float()  # |x|
        self._mean_norm = float(self._mean.norm())
        self._queue = points.new_empty(window, d)  # centres not yet applied to every row
        self._queue_offset = points.new_empty(window, d)  # fl(centre - mean)
        self._queue_term = points.new_empty(window)  # fl(|b|^2 + 2 mean.b)
        self._queue_norm = [0.0] * window  # |b| (float64)
        self._pair_rows = max(1, _BLOCK_ELEMENTS.get(device.type, 1 << 19) // d)
        self._chunk_rows = max(block_rows, (1 << 24 if device.type == "cuda" else 1 << 19) // window)
        self._in_block = torch.arange(block_rows, device=device)
        self.pairs_computed = 0  # sq_distances_to evaluations so far (for benchmarks)
        self.reset()

    def reset(self) -> None:
        """Forget all centres: every row back to +inf (as before the first `add_centre`)."""
        n, padded = self.num_rows, self.num_blocks * self.block_rows
        device = self._points.device
        self._min_sq = torch.full((padded,), math.inf, device=device)
        self._min_sq[n:] = -math.inf  # padding of the last block: never proposed
        # seen[r]: how many centres row r has seen; every row has seen the first `_applied`
        self._seen = torch.zeros(padded, dtype=torch.int64, device=device)
        self._seen[n:] = torch.iinfo(torch.int64).max
        self._num_centres = self._applied = 0
        self._top_blocks = 1  # blocks that `argmax` brings up to date at once (adapts)
        self._block_max = self._min_sq.view(self.num_blocks, self.block_rows).amax(1)

    def row(self, local_index: int) -> torch.Tensor:
        """Point `local_index` (d,) float32, as given to the constructor."""
        return self._points[local_index]

    @property
    def min_sq(self) -> torch.Tensor:
        """(n,) float32 squared distance of each row to its nearest centre; SELECTED if picked."""
        self._flush()
        return self._min_sq[: self.num_rows].clone()

    def max_sq(self) -> float:
        """Largest value of `min_sq` (squared coverage radius of these rows; -1.0 if all picked)."""
        self._flush()
        return float(self._block_max.max())

    def add_centre(self, centre: torch.Tensor, local_index: int | None) -> None:
        """Queue min_sq <- min(min_sq, sq_distances_to(points, centre)); then row `local_index`
        (the centre's row if this process holds it, else None) becomes SELECTED."""
        assert centre.shape == (self.dim,), (centre.shape, self.dim)
        slot = self._num_centres - self._applied
        self._queue[slot] = centre.to(self._points.device, torch.float32)
        offset = self._queue[slot].double() - self._mean
        self._queue_offset[slot] = offset
        self._queue_term[slot] = offset.square().sum() + 2 * (self._mean @ offset)
        self._queue_norm[slot] = float(offset.norm())
        self._num_centres += 1
        if local_index is not None:  # min(SELECTED, any distance) stays SELECTED: set it now
            self._min_sq[local_index] = SELECTED
            block = local_index // self.block_rows
            lo = block * self.block_rows
            self._block_max[block] = self._min_sq[lo : lo + self.block_rows].max()
        if slot + 1 == len(self._queue):
            self._flush()

    def argmax(self, offset: int) -> tuple[float, int]:
        """`local_argmax(self.min_sq, offset)`: (largest value, offset + smallest row holding it).

        Brings rows up to date from the top down, in the top `_top_blocks` blocks (doubling
        until done), until every row whose value reaches the largest has seen all centres.
        """
        blocks = self._top_blocks
        while True:
            top = self._block_max.max()
            floor = self._block_max.topk(min(blocks, self.num_blocks)).values[-1]
            rows = (self._block_max >= floor).nonzero() * self.block_rows + self._in_block
            rows = rows.view(-1)
            values = self._min_sq.index_select(0, rows)
            stale = self._seen.index_select(0, rows) < self._num_centres
            if not bool((stale & (values >= top)).any()):  # the top is exact: done
                self._top_blocks = max(1, blocks // 2)
                return float(top), offset + int(rows[values == top].min())
            todo = rows[stale & (values >= floor)]
            for lo in range(0, len(todo), self._chunk_rows):  # bounded copies of the points
                part = todo[lo : lo + self._chunk_rows]
                self._update(part, self._points.index_select(0, part))
            changed = torch.unique(todo // self.block_rows)
            values = self._min_sq.view(self.num_blocks, self.block_rows).index_select(0, changed)
            self._block_max.index_copy_(0, changed, values.amax(1))
            blocks *= 2

    def _flush(self) -> None:
        """Apply the queued centres to every row."""
        if self._num_centres == self._applied:
            return
        for lo in range(0, self.num_rows, self._chunk_rows):
            hi = min(self.num_rows, lo + self._chunk_rows)
            self._update(slice(lo, hi), self._points[lo:hi])  # a slice: views, no gathers
        self._applied = self._num_centres
        self._block_max = self._min_sq.view(self.num_blocks, self.block_rows).amax(1)

    def _update(self, rows: torch.Tensor | slice, points: torch.Tensor) -> None:
        """Apply every queued centre to `rows` (r,) or a slice of r rows (their `points` (r, d));
        a pair gets an exact `sq_distances_to` only if its BLAS bound cannot rule it out (see
        `_margins`)."""
        queued = self._num_centres - self._applied
        eps, alpha, gamma = _margins(self.dim, points.device)
        norm = max(self._queue_norm[:queued])

        def take(values: torch.Tensor) -> torch.Tensor:  # a view for a slice: never written
            return values[rows] if isinstance(rows, slice) else values.index_select(0, rows)

        current = take(self._min_sq)
        row_sq = take(self._row_sq)
        # error of the bound: gamma (|x - mean|^2 + |b|^2 + 2 (|x| + |mean|) |b|)
        error = take(self._row_norm).add(self._mean_norm).mul_(2 * norm)
        error.add_(row_sq).add_(norm * norm).mul_(gamma)
        # pair (row, centre) may lower the row only if its bound is below
        # (min_sq + alpha)(1 + eps) + error; compared without |x - mean|^2 on both sides
        threshold = current.add(alpha).mul_(1 + eps).add_(error).sub_(row_sq)
        threshold.masked_fill_(current <= 0, -math.inf)
        product = torch.addmm(
            self._queue_term[:queued], points, self._queue_offset[:queued].T, alpha=-2
        )  # (r, queued): |b|^2 + 2 mean.b - 2 x.b
        pair_row, pair_centre = (product < threshold[:, None]).nonzero().unbind(1)
        self.pairs_computed += len(pair_row)
        new = current
        for lo in range(0, len(pair_row), self._pair_rows):
            r, c = pair_row[lo : lo + self._pair_rows], pair_centre[lo : lo + self._pair_rows]
            x = points.index_select(0, r)
            sq_dists = _sq_distances_into(x, self._queue.index_select(0, c), x)
            new = new.scatter_reduce(0, r, sq_dists, "amin")
        if isinstance(rows, slice):
            if new is not current:  # else no pair: `current` is the view itself
                self._min_sq[rows] = new
            self._seen[rows] = self._num_centres
        else:
            self._min_sq.index_copy_(0, rows, new)
            self._seen.index_fill_(0, rows, self._num_centres)


def _margins(dim: int, device: torch.device) -> tuple[float, float, float]:
    """(eps, alpha, gamma) that make every skipped pair in `MinDistances._update` safe.

    sq_distances_to (sub, square, halving sum: <= ceil(log2 d) + 3 roundings a term) gives
    s >= T (1 - (log2 d + 4) u) - d 2^-126 for the exact T = |x - c|^2 (the last term covers
    underflow, even flushed to zero). The bound |x - mean|^2 + (|b|^2 + 2 mean.b) - 2 x.b, b = c -
    mean, with the first two terms rounded from float64 and x.b by BLAS in any order, is within
    (d + 6) u_mm (|x - mean|^2 + |b|^2 + 2 (|x| + |mean|) |b|) of T, u_mm being the unit roundoff
    of float32 matmul (2^-8 if TF32 or bf16 matmul is allowed). eps = 8 (d + 8) u (also covering
    the roundings of the comparison), alpha = d 2^-120 and gamma = 4 (d + 8) u_mm exceed these.
    """
    reduced = torch.get_float32_matmul_precision() != "highest" or (
        device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    )
    unit_mm = 2.0**-8 if reduced else _U
    return 8 * (dim + 8) * _U, dim * 2.0**-120, 4 * (dim + 8) * unit_mm


def greedy_coreset(projected: torch.Tensor, num_samples: int, *, start: int) -> CoresetResult:
    """Greedy k-center selection (Alg. 1) over the rows of `projected` (N, d), usually ψ(features).

    Step i picks the row farthest from all rows picked so far (largest distance, then smallest
    index); row `start` is picked first. Rows are never picked twice, even among exact duplicates.
    Runs on the tensor's device. radius = max over all N rows of the Euclidean distance to the
    nearest picked row (Eq. 5 objective, in projected units). Exact: the same indices and min
    distances as updating every row with `sq_distances_to` at every step (`MinDistances`).
    """
    if projected.ndim != 2 or projected.shape[1] < 1:
        raise ValueError(
            f"projected must be (N, d) with d >= 1, got shape {tuple(projected.shape)}"
        )
    num_points = projected.shape[0]
    if not 1 <= num_samples <= num_points:
        raise ValueError(f"num_samples must be in [1, {num_points}], got {num_samples}")
    if not 0 <= start < num_points:
        raise ValueError(f"start must be a row index in [0, {num_points}), got {start}")
    state = MinDistances(projected)
    chosen = torch.empty(num_samples, dtype=torch.int64)
    index = start
    for step in range(num_samples):
        chosen[step] = index
        state.add_centre(state.row(index), index)
        if step + 1 < num_samples:
            _, index = state.argmax(0)
    return CoresetResult(indices=chosen, radius=math.sqrt(max(0.0, state.max_sq())))
