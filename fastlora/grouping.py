"""Rows of a mixed-adapter batch grouped by adapter: computed once per batch, reused by every layer.

A mixed batch gives each row (token or sequence) an adapter index, −1 meaning "base only". The fused op
works on rows grouped by adapter, so the grouping (a stable sort and the group sizes) is computed once
from the indices and handed to every LoRA layer of the model that sees rows of the same shape. Building it
reads the runs (or group sizes) on the host: a few device syncs per batch, not per layer.
"""

from __future__ import annotations

import dataclasses
import numbers

import torch

__all__ = ["RowGrouping", "group_rows"]


# Rows already in runs of one adapter (a batch of sequences, one adapter each) are worked on in place, run
# by run, when there are at most this many runs per distinct adapter (plus this many): each segment costs
# a few small GEMM calls (about 30 µs of host time on the CPU), a gather of x (and a scatter of y) passes
# over (M, K) and (M, N). Measured at K = N = 1024, r = 16, fp32: 32 one-row requests over 16 adapters
# cost 3.1x the base layer run by run and 2.3x gathered; 8 sequences of 64 rows, 1.2x in place.
_RUNS_PER_ADAPTER = 1
_RUNS_ANYWAY = 4
# One adapter per sample of (B, T, K) x with at least this many rows a sample: the LoRA terms run batched over
# the samples (each sample's adapter gathered, B·r·(K + N) elements: small next to x at T >= 16), a fixed
# number of calls whatever the number of adapters.
_PER_SAMPLE_MIN_ROWS = 16
# Up to this many rows the index is grouped on the host (one read of it), above with tensor ops.
_HOST_ROWS = 256


@dataclasses.dataclass(frozen=True, eq=False)
class RowGrouping:
    """Rows grouped by adapter. Build it with ``group_rows``.

    Attributes:
        rows_shape: the leading dimensions of x it was built for (x is (*rows_shape, K)); M = their product.
        index: (M,) int64 adapter index of each row, on x's device; −1 = base only.
        order: None when the op works on the rows where they are (they come in few runs of one adapter
            each); else an (M,) int64 permutation that gathers them base-only first, then adapter 0's, 1's,
            ... (stable), and the op works on the gathered rows.
        segments: (start, stop, adapter) host triples covering [0, M) in that working order: each a run of
            rows of one adapter (−1 = base only).
        num_adapters: n.
        sample_index: (B,) int64, each sample's adapter, when the index was given per sample (shape
            ``rows_shape[:1]``) and samples have at least 16 rows; else None.
    """

    rows_shape: tuple[int, ...]
    index: torch.Tensor
    order: torch.Tensor | None
    segments: tuple[tuple[int, int, int], ...]
    num_adapters: int
    sample_index: torch.Tensor | None = None
    # Device-side derived tensors (the Triton backend's sorted rows), computed once per grouping.
    _derived: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def num_rows(self) -> int:
        return self.index.numel()

    def cached(self, key, build):
        """``build()``, computed on the first call with this (hashable) key and kept: every layer of the batch
        that asks with the same key (the same ranks, scalings, dtype, ...) shares it."""
        found = self._derived.get(key)
        if found is None:
            found = self._derived[key] = build()
        return found

    def device_sorted(self, build):
        """``build(index, num_adapters)``, computed on first use and kept: every layer shares it."""
        return self.cached(build, lambda: build(self.index, self.num_adapters))

    @property
    def used(self) -> tuple[int, ...]:
        """The adapters that have at least one row, ascending."""
        return tuple(sorted({a for _, _, a in self.segments if a >= 0}))


def _expand(index: torch.Tensor, rows_shape: tuple[int, ...]) -> torch.Tensor:
    """index broadcast to rows_shape: a prefix of rows_shape (one index per sample of (B, T, K) x) gains
    trailing dimensions; otherwise PyTorch's broadcasting rules apply."""
    shape = tuple(index.shape)
    if len(shape) < len(rows_shape) and shape == rows_shape[: len(shape)]:
        index = index.reshape(shape + (1,) * (len(rows_shape) - len(shape)))
    try:
        return index.expand(rows_shape)
    except RuntimeError:
        raise ValueError(f"adapter_index: expected a shape that is a prefix of x's leading dimensions "
                         f"{rows_shape} or broadcasts to them, got {shape}") from None  # fmt: skip


def group_rows(adapter_index: torch.Tensor, num_adapters: int, rows_shape: tuple[int, ...] | torch.Size) -> RowGrouping:
    """Group the rows of x (shape (*rows_shape, K)) by adapter.

    Args:
        adapter_index: integer tensor of adapter indices in [−1, num_adapters), −1 = base only; shape a
            prefix of ``rows_shape`` (e.g. (B,) for x of shape (B, T, K): one adapter per sequence) or
            broadcastable to it.
        num_adapters: n, the number of stacked adapters (>= 1).
        rows_shape: x's leading dimensions.

    Returns:
        A ``RowGrouping`` for x's device (the index's).
    """
    if isinstance(num_adapters, bool) or not isinstance(num_adapters, numbers.Integral) or num_adapters < 1:
        raise ValueError(f"num_adapters: expected an integer >= 1, got {num_adapters!r}")
    num_adapters = int(num_adapters)
    rows_shape = tuple(int(d) for d in rows_shape)
    if not isinstance(adapter_index, torch.Tensor):
        raise TypeError(f"adapter_index: expected an integer torch.Tensor, got {type(adapter_index).__name__}")
    if adapter_index.dtype.is_floating_point or adapter_index.dtype.is_complex or adapter_index.dtype == torch.bool:
        raise TypeError(f"adapter_index: expected an integer dtype, got {adapter_index.dtype}")
    index = _expand(adapter_index, rows_shape).reshape(-1).to(torch.int64)
    sample_index = None
    m = index.numel()
    per_sample = len(rows_shape) >= 2 and tuple(adapter_index.shape) == rows_shape[:1] and m > 0
    # Grouped by units of rows that share an index: whole samples when it is given per sample (B values to
    # read and sort, not B·T), else single rows.
    unit_index = adapter_index.reshape(-1).to(torch.int64) if per_sample else index
    per = m // rows_shape[0] if per_sample else 1
    if per_sample and per >= _PER_SAMPLE_MIN_ROWS:
        sample_index = unit_index
    units = unit_index.numel()
    # Small batches (decode) are read to the host once and grouped in Python: a dozen small tensor ops cost
    # more host time than the loops below at this size.
    values = unit_index.tolist() if units <= _HOST_ROWS else None
    if m:
        low, high = (min(values), max(values)) if values is not None else torch.stack(torch.aminmax(unit_index)).tolist()
        if low < -1 or high >= num_adapters:
            bad = index[(index < -1) | (index >= num_adapters)].unique()[:8].tolist()
            raise ValueError(f"adapter_index: expected values in [-1, {num_adapters}) (-1 = base only, "
                             f"{num_adapters} adapters), got {bad}")  # fmt: skip
    if m == 0:
        return RowGrouping(rows_shape, index, None, (), num_adapters)
    # Runs of equal indices in unit order: their starts and adapters (one host read for the whole batch).
    if values is not None:
        run_starts = [0, *(i for i in range(1, units) if values[i] != values[i - 1])]
        run_adapters = [values[i] for i in run_starts]
    else:
        starts = torch.cat((unit_index.new_zeros(1), (unit_index[1:] != unit_index[:-1]).nonzero().flatten() + 1))
        run_starts, run_adapters = torch.stack((starts, unit_index[starts])).tolist()
    distinct = len(set(run_adapters))
    if len(run_starts) <= _RUNS_PER_ADAPTER * distinct + _RUNS_ANYWAY:
        bounds = [*(start * per for start in run_starts), m]
        segments = tuple((bounds[i], bounds[i + 1], run_adapters[i]) for i in range(len(run_starts)))
        return RowGrouping(rows_shape, index, None, segments, num_adapters, sample_index)
    if values is not None:
        counts = [0] * (num_adapters + 1)
        for v in values:
            counts[v + 1] += 1
        order = torch.tensor(sorted(range(units), key=values.__getitem__), dtype=torch.int64, device=index.device)
    else:
        counts = torch.bincount(unit_index + 1, minlength=num_adapters + 1).tolist()
        order = torch.sort(unit_index, stable=True).indices
    if per > 1:  # sample order -> row order: each sample's rows in a row
        order = (order[:, None] * per + torch.arange(per, device=index.device)).reshape(-1)
    segments, start = [], 0
    for adapter, count in enumerate(counts, start=-1):
        if count:
            segments.append((start, start + count * per, adapter))
            start += count * per
    return RowGrouping(rows_shape, index, order, tuple(segments), num_adapters, sample_index)
