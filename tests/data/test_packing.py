"""Packing: best-fit decreasing rows, their order, overlong examples, the run-log summary."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qlora_jax import data
from qlora_jax.data.packing import fill_fraction, pack_rows
from tests.data.conftest import random_sentence


def _greedy_rows(lengths, order, capacity):
    """Rows filled in order, a new one when the next example does not fit (the old layout)."""
    rows, used = [[]], 0
    for i in order:
        if rows[-1] and used + lengths[i] > capacity:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += lengths[i]
    return rows


@pytest.mark.parametrize("capacity", [64, 2048])
def test_pack_rows_covers_each_example_once_within_capacity(rng, capacity):
    # Long-tailed lengths (log-normal), as instruction data has.
    n = 3000
    lengths = np.clip(rng.lognormal(np.log(capacity / 8), 0.9, n).astype(np.int64), 1, capacity)
    order = rng.permutation(n)
    rows = pack_rows(lengths, order, capacity)
    assert sorted(i for r in rows for i in r) == list(range(n))
    assert all(sum(lengths[i] for i in r) <= capacity for r in rows)
    # Near the lower bound ceil(sum / T) (FFD/BFD: <= 11/9 OPT + 1) and fewer rows than greedy.
    bound = math.ceil(lengths.sum() / capacity)
    assert bound <= len(rows) <= 11 / 9 * bound + 1
    assert len(rows) < len(_greedy_rows(lengths, order, capacity))
    # Rows follow the order of their first example; members keep the order's order.
    position = np.empty(n, np.int64)
    position[order] = np.arange(n)
    firsts = [position[r[0]] for r in rows]
    assert firsts == sorted(firsts)
    assert all(list(position[list(r)]) == sorted(position[list(r)]) for r in rows)
    # Deterministic: the same order gives the same rows; another order other rows.
    assert pack_rows(lengths, order, capacity) == rows
    assert pack_rows(lengths, rng.permutation(n), capacity) != rows
    assert fill_fraction(lengths, rows, capacity) == pytest.approx(
        lengths.sum() / (len(rows) * capacity))


def test_pack_rows_refuses_an_example_longer_than_a_row():
    with pytest.raises(data.DataError, match="does not fit a row of 8"):
        pack_rows(np.array([3, 9, 2]), [0, 1, 2], 8)


def _records(rng, n, lo, hi):
    return [{"prompt": random_sentence(rng, lo, hi), "response": random_sentence(rng, lo, hi)}
            for _ in range(n)]


def test_overlong_examples_are_truncated_and_counted_or_refused(write_jsonl, llama_tok, rng):
    records = _records(rng, 6, 2, 4) + _records(rng, 3, 20, 30)   # 3 of > 40 tokens
    path = write_jsonl(records)
    full = data.build_dataset(path, llama_tok, 200)
    longest = int(full.lengths.max())
    assert full.truncated == 0 and (full.lengths > 40).sum() == 3
    cut = data.build_dataset(path, llama_tok, 40, packing=True)
    assert cut.truncated == 3 and len(cut) == 9 and int(cut.lengths.max()) == 40
    assert "3 examples longer than 40 tokens were truncated" in cut.summary()
    with pytest.raises(data.DataError, match=rf"3 of 9 examples .* seq_len=40 .*longest has "
                                             rf"{longest}.*data.overlong='truncate'"):
        data.build_dataset(path, llama_tok, 40, overlong="error")
    with pytest.raises(data.DataError, match="overlong='cut' is not allowed"):
        data.build_dataset(path, llama_tok, 40, overlong="cut")
    section = dict(data.default_config(), path=path, overlong="error")
    with pytest.raises(data.DataError, match="longer than seq_len=40"):
        data.datasets_from_config(section, llama_tok, 40)


def test_summary_reports_rows_and_padding(write_jsonl, llama_tok, rng):
    path = write_jsonl(_records(rng, 40, 1, 10))
    padded = data.build_dataset(path, llama_tok, 64)
    packed = data.build_dataset(path, llama_tok, 64, packing=True)
    tokens = int(padded.lengths.sum())
    rows = packed.make_rows(np.arange(len(packed)))
    assert f"40 examples one a row in 40 rows of 64 tokens ({tokens / (40 * 64):.1%} tokens" \
        in padded.summary()
    assert f"40 examples packed into {len(rows)} rows of 64 tokens " \
           f"({tokens / (len(rows) * 64):.1%} tokens" in packed.summary()
    assert len(rows) < 20
    # The layout is part of the fingerprint: a packed run does not resume an unpacked position.
    assert packed.fingerprint() != padded.fingerprint()
