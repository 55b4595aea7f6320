"""Bin packing of variable-length examples into rows of a fixed length (for packed training).

`pack_rows` is best-fit decreasing: examples are taken longest first and each goes into the
fullest row that still has room for it (a new row when none has). Like first-fit decreasing it
never needs more than 11/9 of the optimal row count (plus one); on instruction data both leave a
percent or two of a row empty. It is deterministic: ties in length are broken by the position in
``order``, and the rows come back ordered by their earliest member in ``order``, members in that
order too, so a shuffled ``order`` gives shuffled rows (the loader's epoch permutation carries over
to the packed rows) and the same ``order`` always gives the same rows.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from qlora_jax.data.errors import DataError


def pack_rows(lengths: np.ndarray, order: Sequence[int], capacity: int) -> list[tuple[int, ...]]:
    """Groups the examples of ``order`` into rows of at most ``capacity`` tokens.

    Args:
        lengths: tokens per example, int [N] (indexed by example).
        order: the example indices to pack (a permutation of some of 0..N-1).
        capacity: tokens a row holds (T).

    Returns:
        Rows as tuples of example indices; every index of ``order`` is in exactly one row.

    Raises:
        DataError: an example is longer than ``capacity``.
    """
    order = np.asarray(order, np.int64)
    sizes = np.asarray(lengths, np.int64)[order]
    if sizes.size and int(sizes.max()) > capacity:
        raise DataError(f"an example of {int(sizes.max())} tokens does not fit a row of "
                        f"{capacity}")
    members: list[list[int]] = []       # positions in `order`, per row
    free: list[tuple[int, int]] = []    # (free tokens, row), sorted; full rows are left out
    for pos in np.argsort(-sizes, kind="stable").tolist():
        size = int(sizes[pos])
        k = bisect.bisect_left(free, (size, -1))  # the fullest row with room
        if k < len(free):
            room, row = free.pop(k)
            members[row].append(pos)
        else:
            room, row = capacity, len(members)
            members.append([pos])
        if room - size > 0:
            bisect.insort(free, (room - size, row))
    rows = sorted((sorted(m) for m in members), key=lambda m: m[0])
    return [tuple(int(order[p]) for p in m) for m in rows]


def fill_fraction(lengths: np.ndarray, rows: Sequence[Sequence[int]], capacity: int) -> float:
    """Fraction of the token slots of ``rows`` (each ``capacity`` long) that hold tokens."""
    if not rows:
        return 0.0
    used = sum(int(lengths[i]) for row in rows for i in row)
    return used / (len(rows) * capacity)
