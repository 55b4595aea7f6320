"""Classification data: label mapping, range checks, batch layout."""

from __future__ import annotations

import numpy as np
import pytest

from qlora_jax import data
from tests.data.conftest import random_sentence


def test_string_labels_through_label_list(write_jsonl, minilm_tok, rng):
    names = ["neg", "neu", "pos"]
    picks = rng.integers(0, 3, 9)
    records = [{"text": random_sentence(rng, 1, 40), "label": names[k]} for k in picks]
    ds = data.build_dataset(write_jsonl(records), minilm_tok, 16, label_names=names)
    assert ds.kind == "classification" and ds.num_labels == 3
    assert ds.labels.tolist() == picks.tolist()
    batch = ds.collate([(i,) for i in range(len(ds))], 12)
    assert batch["input_ids"].shape == (12, 16) and batch["labels"].shape == (12,)
    assert batch["labels"][:9].tolist() == picks.tolist()
    assert batch["weights"].tolist() == [1.0] * 9 + [0.0] * 3
    for i, r in enumerate(records):
        ids = minilm_tok.encode(r["text"], max_length=16)
        n = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, :n].tolist() == ids and ids[-1] == minilm_tok.sep_id
        assert (batch["input_ids"][i, n:] == minilm_tok.pad_id).all()


def test_labels_derived_when_not_given(write_jsonl, minilm_tok):
    ds = data.build_dataset(write_jsonl([{"text": "a b", "label": "zeta"},
                                         {"text": "c d", "label": "alpha"}]), minilm_tok, 8)
    assert ds.label_names == ["alpha", "zeta"] and ds.labels.tolist() == [1, 0]
    ds = data.build_dataset(write_jsonl([{"text": "a", "label": 3}, {"text": "b", "label": 0}]),
                            minilm_tok, 8)
    assert ds.num_labels == 4 and ds.labels.tolist() == [3, 0]


@pytest.mark.parametrize("records, names, message", [
    ([{"text": "x", "label": 0}, {"text": "y", "label": 5}], ["a", "b"],
     r":2: label 5 is out of range for 2 labels \(valid: 0..1\)"),
    ([{"text": "x", "label": -1}], ["a", "b"], r":1: label -1 is out of range"),
    ([{"text": "x", "label": "c"}], ["a", "b"], r":1: label 'c' is not one of the 2 labels"),
    ([{"text": "x", "label": "a"}, {"text": "y", "label": 1}], None, "mix ints and strings"),
    ([{"text": "x", "label": "a"}], None, "at least 2 labels"),
])
def test_bad_labels(write_jsonl, minilm_tok, records, names, message):
    with pytest.raises(data.DataError, match=message):
        data.build_dataset(write_jsonl(records), minilm_tok, 8, label_names=names)


def test_bad_seq_len(write_jsonl, minilm_tok):
    path = write_jsonl([{"text": "x", "label": 0}, {"text": "y", "label": 1}])
    with pytest.raises(data.DataError, match="seq_len"):
        data.build_dataset(path, minilm_tok, 1)
    with pytest.raises(data.DataError, match="leaves no room"):
        data.build_dataset(path, minilm_tok, 2)
