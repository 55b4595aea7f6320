"""Text classification data: records ``{"text": str, "label": int | str}`` for encoders."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from qlora_jax.data.errors import DataError
from qlora_jax.data.tokenizer import Tokenizer


def resolve_labels(records: Sequence[tuple[int, dict[str, Any]]], path: str,
                   label_names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    """Maps the ``label`` of every record to an int id.

    Args:
        records: (line number, record) pairs of a classification file.
        path: the file, for messages.
        label_names: the label list (index = id). None: string labels get the sorted set of the
            strings found; int labels get names "0" .. str(max).

    Returns:
        (int32 [N] label ids, label names).

    Raises:
        DataError: a string label not in `label_names`, an int label below 0 or not below
            len(label_names), or int and string labels mixed in one file without a label list.
    """
    values = [r["label"] for _, r in records]
    if label_names is None:
        strings = {v for v in values if isinstance(v, str)}
        if strings and any(not isinstance(v, str) for v in values):
            raise DataError(f"{path}: labels mix ints and strings; give the label list "
                            "(data.labels) to map them")
        if strings:
            label_names = sorted(strings)
        else:
            top = max(values)
            label_names = [str(i) for i in range(max(top, 0) + 1)]
    names = list(label_names)
    if len(names) < 2:
        raise DataError(f"{path}: classification needs at least 2 labels, got {names}")
    index = {name: i for i, name in enumerate(names)}
    ids = np.empty(len(values), np.int32)
    for k, ((lineno, _), value) in enumerate(zip(records, values)):
        if isinstance(value, str):
            if value not in index:
                raise DataError(f"{path}:{lineno}: label {value!r} is not one of the "
                                f"{len(names)} labels {names[:10]}{'...' if len(names) > 10 else ''}")
            ids[k] = index[value]
        else:
            if not 0 <= value < len(names):
                raise DataError(f"{path}:{lineno}: label {value} is out of range for "
                                f"{len(names)} labels (valid: 0..{len(names) - 1})")
            ids[k] = value
    return ids, names


class ClassificationDataset:
    """Tokenised texts with integer labels, one example a row.

    A batch has ``input_ids`` int32 [B, T] (the checkpoint's special tokens included, e.g.
    [CLS] text [SEP], pad_id after), ``attention_mask`` int32 [B, T], ``labels`` int32 [B] and
    ``weights`` float32 [B] (1 for a real example, 0 for a padding row).

    Attributes:
        ids: int32 token ids per example.
        labels: int32 [N] label ids.
        label_names: names, index = label id.
        num_labels: len(label_names).
        seq_len: row length T.
        pad_id: id written on padding.
        texts: the raw texts (for inspection and error analysis).
    """

    kind = "classification"
    packing = False

    def __init__(self, texts: Sequence[str], labels: np.ndarray, label_names: Sequence[str],
                 tokenizer: Tokenizer, seq_len: int):
        if len(texts) == 0:
            raise DataError("no examples")
        self.texts = list(texts)
        self.labels = np.asarray(labels, np.int32)
        self.label_names = list(label_names)
        self.num_labels = len(self.label_names)
        self.seq_len, self.pad_id = seq_len, tokenizer.pad_id
        self.ids = [np.asarray(x, np.int32) for x in
                    tokenizer.encode_batch(self.texts, add_special_tokens=True, max_length=seq_len)]
        self._lengths = np.array([len(x) for x in self.ids], np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per example, int64 [N]."""
        return self._lengths

    def make_rows(self, order: np.ndarray) -> list[tuple[int, ...]]:
        """One row per example, in `order`."""
        return [(int(i),) for i in order]

    def row_length(self, row: Sequence[int]) -> int:
        """Tokens in a row."""
        return int(self._lengths[row[0]])

    def collate(self, rows: Sequence[Sequence[int]], batch_size: int,
                seq_len: int | None = None) -> dict[str, np.ndarray]:
        """Batch of `batch_size` rows (missing rows are padding with weight 0), T = seq_len."""
        t = self.seq_len if seq_len is None else seq_len
        if len(rows) > batch_size:
            raise DataError(f"{len(rows)} rows do not fit a batch of {batch_size}")
        batch = {
            "input_ids": np.full((batch_size, t), self.pad_id, np.int32),
            "attention_mask": np.zeros((batch_size, t), np.int32),
            "labels": np.zeros((batch_size,), np.int32),
            "weights": np.zeros((batch_size,), np.float32),
        }
        for b, (i,) in enumerate(rows):
            ids = self.ids[i]
            batch["input_ids"][b, :len(ids)] = ids
            batch["attention_mask"][b, :len(ids)] = 1
            batch["labels"][b] = self.labels[i]
            batch["weights"][b] = 1.0
        return batch

    def fingerprint(self) -> str:
        """Short string that changes when the examples change (checked on resume)."""
        crc = zlib.crc32(np.concatenate(self.ids).tobytes())
        crc = zlib.crc32(self.labels.tobytes(), crc)
        return f"{self.kind}:{len(self)}:{crc:08x}:{self.seq_len}"
