"""Loaders: seeded order, exact resume, eval coverage, fixed shapes, sharding, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qlora_jax import data
from tests.data.conftest import random_sentence


class Indexed:
    """A dataset whose batches say which examples they hold (``index``, -1 for padding)."""

    seq_len = 4
    packing = False

    def __init__(self, n: int):
        self.n = n
        self.lengths = np.full(n, 4)

    def __len__(self):
        return self.n

    def make_rows(self, order):
        return [(int(i),) for i in order]

    def row_length(self, row):
        return 4

    def collate(self, rows, batch_size, seq_len=None):
        index = np.full(batch_size, -1)
        index[:len(rows)] = [r[0] for r in rows]
        return {"index": index, "weights": (index >= 0).astype(np.float32)}

    def fingerprint(self):
        return f"indexed:{self.n}"


def _take(loader, k):
    return [next(loader) for _ in range(k)]


def _equal(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_each_epoch_is_a_seeded_permutation(rng):
    n, bs = int(rng.integers(20, 60)), 5
    seed = int(rng.integers(1 << 30))
    loader = data.TrainLoader(Indexed(n), bs, seed)
    per_epoch = n // bs
    epochs = [np.concatenate([b["index"] for b in _take(loader, per_epoch)]) for _ in range(3)]
    for e in epochs:
        assert len(set(e.tolist())) == len(e) == per_epoch * bs   # no repeats, remainder dropped
    assert not np.array_equal(epochs[0], epochs[1])                # reshuffled every epoch
    again = data.TrainLoader(Indexed(n), bs, seed)
    assert np.array_equal(np.concatenate([b["index"] for b in _take(again, per_epoch)]), epochs[0])
    other = data.TrainLoader(Indexed(n), bs, seed + 1)
    assert not np.array_equal(np.concatenate([b["index"] for b in _take(other, per_epoch)]),
                              epochs[0])


def _instruct(write_jsonl, tok, rng, packing, n=40, seq_len=48):
    records = [{"prompt": random_sentence(rng, 1, 15), "response": random_sentence(rng, 1, 15)}
               for _ in range(n)]
    return data.build_dataset(write_jsonl(records), tok, seq_len, packing=packing)


@pytest.mark.parametrize("packing, buckets", [(False, None), (True, None), (False, (16, 32))])
def test_resume_continues_exactly(write_jsonl, llama_tok, rng, packing, buckets):
    ds = _instruct(write_jsonl, llama_tok, rng, packing)
    seed = int(rng.integers(1 << 30))
    full = data.TrainLoader(ds, 4, seed, length_buckets=buckets)
    per_epoch = full.batches_per_epoch
    total = 3 * per_epoch
    reference = _take(full, total)
    for k in sorted({0, 1, per_epoch - 1, per_epoch, int(rng.integers(1, total))}):
        first = data.TrainLoader(ds, 4, seed, length_buckets=buckets)
        assert _equal(_take(first, k), reference[:k])
        saved = json.loads(json.dumps(first.state))          # it goes through a checkpoint
        resumed = data.TrainLoader(ds, 4, seed, state=saved, length_buckets=buckets)
        assert _equal(_take(resumed, total - k), reference[k:]), f"resume after {k} batches"


def test_fixed_shapes_and_buckets(write_jsonl, llama_tok, rng):
    ds = _instruct(write_jsonl, llama_tok, rng, packing=False)
    for batch in _take(data.TrainLoader(ds, 4, 0), 12):
        assert {k: v.shape for k, v in batch.items()} == {
            **{k: (4, 48) for k in ("input_ids", "targets", "loss_mask", "segment_ids",
                                    "position_ids", "attention_mask")}, "weights": (4,)}
    # 20 examples of 4 tokens, 20 longer than 24: one sorted window makes each batch short or long.
    records = [{"prompt": random_sentence(rng, 1, 2), "response": random_sentence(rng, 1, 2)}
               for _ in range(20)]
    records += [{"prompt": random_sentence(rng, 12, 16), "response": random_sentence(rng, 12, 16)}
                for _ in range(20)]
    mixed = data.build_dataset(write_jsonl(records, "mixed.jsonl"), llama_tok, 48, packing=False)
    assert max(mixed.lengths[:20]) <= 8 and min(mixed.lengths[20:]) > 24
    shapes = set()
    for batch in _take(data.TrainLoader(mixed, 4, int(rng.integers(1 << 30)),
                                        length_buckets=(8, 24)), 30):
        t = batch["input_ids"].shape[1]
        longest = int(batch["attention_mask"].sum(1).max())
        shapes.add(t)
        assert t == min(b for b in (8, 24, 48) if b >= longest), (t, longest)
    assert shapes == {8, 48}, shapes   # every batch is all short or all long (one sorted window)


@pytest.mark.parametrize("buckets", [None, (10, 20)])
def test_eval_covers_each_example_once(write_jsonl, minilm_tok, rng, buckets):
    n = int(rng.integers(10, 30))
    records = [{"text": random_sentence(rng, 1, 20), "label": int(rng.integers(0, 3))}
               for _ in range(n)]
    ds = data.build_dataset(write_jsonl(records), minilm_tok, 32, label_names=["a", "b", "c"])
    batches = list(data.EvalLoader(ds, 8, length_buckets=buckets))
    assert len(batches) == -(-n // 8) == len(data.EvalLoader(ds, 8))
    assert sum(b["weights"].sum() for b in batches) == n
    assert all(b["input_ids"].shape[0] == 8 for b in batches)
    real = [(tuple(b["input_ids"][i, :b["attention_mask"][i].sum()]), int(b["labels"][i]))
            for b in batches for i in range(8) if b["weights"][i] == 1]
    want = [(tuple(ids), int(label)) for ids, label in zip(ds.ids, ds.labels)]
    if buckets is None:
        assert real == want                                   # in file order
    else:
        assert sorted(real) == sorted(want)                   # sorted by length
    assert _equal(batches, list(data.EvalLoader(ds, 8, length_buckets=buckets)))


def test_shards_make_up_the_global_batch(rng):
    n, seed = 50, int(rng.integers(1 << 30))
    whole = _take(data.TrainLoader(Indexed(n), 8, seed), 10)
    parts = [_take(data.TrainLoader(Indexed(n), 8, seed, shard_index=i, shard_count=4), 10)
             for i in range(4)]
    for step, batch in enumerate(whole):
        assert np.array_equal(np.concatenate([p[step]["index"] for p in parts]), batch["index"])
    ev = [list(data.EvalLoader(Indexed(n), 8, shard_index=i, shard_count=2)) for i in range(2)]
    assert sorted(x for shard in ev for b in shard for x in b["index"] if x >= 0) == list(range(n))


def test_bad_loader_input(rng):
    with pytest.raises(data.DataError, match="fewer than batch_size=16"):
        data.TrainLoader(Indexed(10), 16, 0)
    with pytest.raises(data.DataError, match="not divisible by shard_count=3"):
        data.TrainLoader(Indexed(10), 4, 0, shard_count=3)
    with pytest.raises(data.DataError, match="batch_size must be positive"):
        data.EvalLoader(Indexed(10), 0)
    with pytest.raises(data.DataError, match="seed must be a non-negative int"):
        data.TrainLoader(Indexed(10), 2, -1)
    with pytest.raises(data.DataError, match="length_buckets"):
        data.TrainLoader(Indexed(10), 2, 0, length_buckets=(8,))
    state = data.TrainLoader(Indexed(10), 2, 0).state
    with pytest.raises(data.DataError, match="seed=0.*seed=1"):
        data.TrainLoader(Indexed(10), 2, 1, state=state)
    with pytest.raises(data.DataError, match="batch_size"):
        data.TrainLoader(Indexed(10), 5, 0, state=state)
    with pytest.raises(data.DataError, match="fingerprint"):
        data.TrainLoader(Indexed(12), 2, 0, state=state)
    with pytest.raises(data.DataError, match="malformed"):
        data.TrainLoader(Indexed(10), 2, 0, state={"epoch": "x"})
    with pytest.raises(data.DataError, match="out of range"):
        data.TrainLoader(Indexed(10), 2, 0, state={"epoch": 0, "index": 99})
