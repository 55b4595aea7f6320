"""Deterministic, resumable batch iteration over a dataset, and one-pass evaluation batches.

The order of epoch e is a permutation drawn from ``numpy.random.default_rng([seed, e])``, so any
epoch's batches can be rebuilt from (seed, epoch) alone and the position of a `TrainLoader` is a
small JSON-able dict. Batches are dicts of numpy arrays of fixed shapes: [B, T] with T = the
dataset's seq_len, or one of a few ``length_buckets`` (each bucket compiles once under jit).

A dataset is any object with: ``__len__``, ``lengths`` (tokens per example), ``seq_len``,
``make_rows(order) -> list[tuple[int, ...]]``, ``row_length(row)``,
``collate(rows, batch_size, seq_len) -> dict`` and ``fingerprint()`` (`InstructDataset` and
`ClassificationDataset` are).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from qlora_jax.data.errors import DataError

_GROUP_BATCHES = 32  # length grouping sorts windows of this many batches


def _check_buckets(buckets: Sequence[int] | None, seq_len: int) -> tuple[int, ...]:
    if not buckets:
        return (seq_len,)
    out = sorted({int(b) for b in buckets})
    if out[0] <= 0 or out[-1] > seq_len:
        raise DataError(f"length_buckets {list(buckets)} must lie in 1..seq_len={seq_len}")
    if out[-1] != seq_len:
        out.append(seq_len)
    return tuple(out)


def _check_sharding(batch_size: int, shard_index: int, shard_count: int) -> None:
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    if shard_count <= 0 or not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index={shard_index} must lie in 0..shard_count-1 "
                        f"(shard_count={shard_count})")
    if batch_size % shard_count:
        raise DataError(f"global batch_size={batch_size} is not divisible by "
                        f"shard_count={shard_count} (processes)")


def _batch_length(dataset: Any, rows: Sequence[Sequence[int]], buckets: tuple[int, ...]) -> int:
    longest = max((dataset.row_length(r) for r in rows), default=1)
    return next(b for b in buckets if b >= longest)


class TrainLoader(Iterator[dict[str, np.ndarray]]):
    """Endless iterator of training batches, shuffled by seed, epoch after epoch.

    Each epoch shuffles the examples, forms rows (`dataset.make_rows`: one example a row, or
    packed), optionally groups rows of similar length (``length_buckets``), cuts them into
    batches of ``batch_size`` rows and drops the incomplete last batch. ``state`` is the position
    of the next batch; a loader built with that state yields exactly the batches the original
    would have yielded next.

    Args:
        dataset: the dataset (see the module docstring).
        batch_size: global rows per batch (B, over all processes).
        seed: shuffling seed.
        state: a ``state`` dict to resume from (None: start at epoch 0, batch 0).
        length_buckets: optional row lengths T to pad to (the smallest that fits a batch's
            longest row); seq_len is always one. Rows are then grouped by length within windows
            of 32 batches and the batches of an epoch are shuffled.
        shard_index: this process's index (jax.process_index()).
        shard_count: number of processes (jax.process_count()); each gets batch_size //
            shard_count rows of every global batch.

    Raises:
        DataError: bad batch size or sharding, a dataset too small for one batch, a state from
            another seed, batch size or dataset.
    """

    def __init__(self, dataset: Any, batch_size: int, seed: int,
                 state: dict[str, Any] | None = None,
                 length_buckets: Sequence[int] | None = None,
                 shard_index: int = 0, shard_count: int = 1):
        _check_sharding(batch_size, shard_index, shard_count)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DataError(f"seed must be a non-negative int, got {seed!r}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, int(seed)
        self.buckets = _check_buckets(length_buckets, dataset.seq_len)
        self.shard_index, self.shard_count = shard_index, shard_count
        self._fingerprint = dataset.fingerprint()
        self._epoch, self._index = 0, 0
        self._plan_epoch, self._plan = -1, []
        if not self._batches(0):
            raise DataError(f"the dataset makes {len(dataset.make_rows(np.arange(len(dataset))))}"
                            f" rows, fewer than batch_size={batch_size}: lower the batch size")
        if state is not None:
            self.restore(state)

    def _batches(self, epoch: int) -> list[list[tuple[int, ...]]]:
        """Row groups of every batch of an epoch (cached for the current epoch)."""
        if epoch != self._plan_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            rows = self.dataset.make_rows(rng.permutation(len(self.dataset)))
            b = self.batch_size
            if len(self.buckets) > 1:
                window = b * _GROUP_BATCHES
                grouped = []
                for w in range(0, len(rows), window):
                    chunk = rows[w:w + window]
                    lengths = np.array([self.dataset.row_length(r) for r in chunk])
                    grouped += [chunk[i] for i in np.argsort(lengths, kind="stable")]
                rows = grouped
            batches = [rows[i:i + b] for i in range(0, len(rows) - b + 1, b)]
            if len(self.buckets) > 1:
                batches = [batches[i] for i in rng.permutation(len(batches))]
            self._plan_epoch, self._plan = epoch, batches
        return self._plan

    @property
    def batches_per_epoch(self) -> int:
        """Batches in the current epoch (constant unless packing changes the row count)."""
        return len(self._batches(self._epoch))

    @property
    def state(self) -> dict[str, Any]:
        """JSON-able position of the next batch: epoch, index, and what it is valid for."""
        return {"epoch": self._epoch, "index": self._index, "seed": self.seed,
                "batch_size": self.batch_size, "fingerprint": self._fingerprint}

    def restore(self, state: dict[str, Any]) -> None:
        """Moves to a position saved from `state`.

        Raises:
            DataError: the state is malformed or was saved for another seed, batch size or
                dataset.
        """
        try:
            epoch, index = int(state["epoch"]), int(state["index"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"malformed data loader state {state!r}: needs int 'epoch' and "
                            "'index'") from e
        for key, mine in (("seed", self.seed), ("batch_size", self.batch_size),
                          ("fingerprint", self._fingerprint)):
            # Values may come back from a checkpoint as numpy scalars; compare their text.
            if key in state and str(np.asarray(state[key]).item()) != str(mine):
                raise DataError(f"data loader state was saved with {key}={state[key]!r}, but this"
                                f" run has {key}={mine!r}: resume with the same data settings")
        if epoch < 0 or not 0 <= index <= len(self._batches(epoch)):
            raise DataError(f"data loader state epoch={epoch} index={index} is out of range")
        self._epoch, self._index = epoch, index

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batches = self._batches(self._epoch)
        if self._index >= len(batches):
            self._epoch, self._index = self._epoch + 1, 0
            batches = self._batches(self._epoch)
            if not batches:
                raise DataError(f"epoch {self._epoch} makes no full batch of {self.batch_size}")
        rows = batches[self._index]
        self._index += 1
        local = self.batch_size // self.shard_count
        t = _batch_length(self.dataset, rows, self.buckets)
        mine = rows[self.shard_index * local:(self.shard_index + 1) * local]
        return self.dataset.collate(mine, local, t)


class EvalLoader:
    """One pass over a dataset in its order, no shuffling; the last batch is padded.

    Rows that pad the last batch have ``weights`` 0 (and no loss mask), so sums weighted by
    ``weights`` count every example exactly once. Iterate it as often as you like; each pass is
    the same.

    Args:
        dataset: the dataset.
        batch_size: global rows per batch.
        length_buckets: as for `TrainLoader` (rows are then sorted by length).
        shard_index: this process's index.
        shard_count: number of processes.
    """

    def __init__(self, dataset: Any, batch_size: int,
                 length_buckets: Sequence[int] | None = None,
                 shard_index: int = 0, shard_count: int = 1):
        _check_sharding(batch_size, shard_index, shard_count)
        self.dataset, self.batch_size = dataset, batch_size
        self.buckets = _check_buckets(length_buckets, dataset.seq_len)
        self.shard_index, self.shard_count = shard_index, shard_count
        rows = dataset.make_rows(np.arange(len(dataset)))
        if len(self.buckets) > 1:
            lengths = np.array([dataset.row_length(r) for r in rows])
            rows = [rows[i] for i in np.argsort(lengths, kind="stable")]
        self._batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        local = self.batch_size // self.shard_count
        for rows in self._batches:
            t = _batch_length(self.dataset, rows, self.buckets)
            mine = rows[self.shard_index * local:(self.shard_index + 1) * local]
            yield self.dataset.collate(mine, local, t)
