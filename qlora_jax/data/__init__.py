"""Data: tokenisation, instruction and classification datasets, resumable batch loaders.

API (what qlora_jax.train and users call)::

    from qlora_jax import data

    tok = data.load_tokenizer(model_dir)            # tokenizer.json + special tokens, no transformers
    ids, loss_mask = data.apply_chat_template(tok, messages)  # the checkpoint's chat template
    train_ds = data.build_dataset("stdlib_docstrings", tok, seq_len=128, split="train")
    eval_ds = data.build_dataset("stdlib_docstrings", tok, seq_len=128, split="validation")
    # or, from the `data` section of an experiment config (see `default_config`):
    train_ds, eval_ds = data.datasets_from_config(config.data, tok, seq_len=config.train.seq_len)

    loader = data.TrainLoader(train_ds, batch_size=32, seed=0)    # endless, shuffled per epoch
    batch = next(loader)                                          # dict of numpy arrays
    saved = loader.state                                          # JSON-able, put in checkpoints
    loader = data.TrainLoader(train_ds, batch_size=32, seed=0, state=saved)  # continues exactly
    for batch in data.EvalLoader(eval_ds, batch_size=64): ...    # one pass, padded last batch

Datasets (``build_dataset`` picks the class from the records' format):

- `ClassificationDataset` (records ``text`` + ``label``; ``kind == "classification"``): batches
  ``input_ids`` int32 [B, T], ``attention_mask`` int32 [B, T], ``labels`` int32 [B],
  ``weights`` float32 [B]. ``num_labels`` and ``label_names`` size the head.
- `InstructDataset` (Alpaca ``instruction``/``input``/``output``, ``prompt``/``response`` or chat
  ``messages``; ``kind == "causal_lm"``): batches ``input_ids``, ``targets`` (next token,
  already shifted), ``loss_mask`` (float32, 1 only where the target is a response token or the
  closing eos of the same example), ``segment_ids``, ``position_ids``, ``attention_mask``, all
  [B, T], and ``weights`` [B]. Loss = sum(CE(logits, targets) * loss_mask) / sum(loss_mask).
  With ``packing=True`` rows hold several examples (best-fit decreasing, see
  `qlora_jax.data.packing`): attend within equal ``segment_ids`` and use ``position_ids``.

Every batch has ``weights`` float32 [B]: 1 for real rows, 0 for rows that pad the last eval batch.
Shapes are fixed ([B, seq_len], or one of ``length_buckets``), so a jitted step compiles once per
shape. Bad input raises `DataError` (a ValueError) naming the file, line and problem, before any
model work.

Builtin datasets (see qlora_jax/data/assets/README.md): ``"stdlib_docstrings"`` (splits
train/validation/test; 8 labels; Python standard-library docstrings labelled by module family)
and ``"stdlib_chat"`` (splits train/validation; chat conversations about standard-library
functions, answered in a fixed three-line card).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from qlora_jax.data.builtin import BUILTINS, CLASSIFICATION, builtin_labels, builtin_path
from qlora_jax.data.chat_template import apply_chat_template
from qlora_jax.data.classification import ClassificationDataset, resolve_labels
from qlora_jax.data.errors import DataError
from qlora_jax.data.instruct import (ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, OVERLONG,
                                     InstructDataset,
                                     encode_prompt, to_hf_labels,
                                     tokenize_records)
from qlora_jax.data.jsonl import FORMATS, load_records
from qlora_jax.data.loader import EvalLoader, TrainLoader
from qlora_jax.data.tokenizer import Tokenizer, load_tokenizer

Dataset = ClassificationDataset | InstructDataset


def build_dataset(path: str, tokenizer: Tokenizer | str, seq_len: int, *, split: str = "train",
                  format: str = "auto", packing: bool = False,
                  label_names: Sequence[str] | None = None,
                  overlong: str = "truncate") -> Dataset:
    """Reads, validates and tokenises a dataset.

    Args:
        path: a builtin dataset name (``"stdlib_docstrings"``, ``"stdlib_chat"``) or a JSONL file.
        tokenizer: a `Tokenizer`, or a checkpoint directory / tokenizer.json path to load.
        seq_len: tokens per row (T); longer examples are cut at the right (see ``overlong``).
        split: split of a builtin dataset ("train", "validation", "test"); ignored for files.
        format: "auto" or one of "alpaca", "prompt_response", "chat", "classification".
        packing: pack several instruction examples per row (ignored for classification).
        label_names: classification label list (index = id); builtins bring their own. Pass the
            training set's ``label_names`` when building its evaluation set.
        overlong: instruction examples longer than seq_len: ``"truncate"`` (cut, counted in
            the dataset's ``truncated``) or ``"error"`` (raise).

    Returns:
        A `ClassificationDataset` or an `InstructDataset`.

    Raises:
        DataError: missing or empty file, unknown format, malformed record, label out of range,
            bad seq_len, tokenizer without the needed special tokens.
    """
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise DataError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if path in BUILTINS:
        file = builtin_path(path, split)
        if label_names is None and path in CLASSIFICATION:
            label_names = builtin_labels(path)
    else:
        file = path
    fmt, records = load_records(file, format)
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    if fmt == "classification":
        labels, names = resolve_labels(records, file, label_names)
        return ClassificationDataset([r["text"] for _, r in records], labels, names, tokenizer,
                                     seq_len)
    ids, learned, dropped, truncated = tokenize_records([r for _, r in records], fmt, tokenizer,
                                                        seq_len, overlong)
    return InstructDataset(ids, learned, seq_len, tokenizer.pad_id, packing, fmt, dropped,
                           truncated)


def default_config() -> ml_collections.ConfigDict:
    """The ``data`` section of an experiment config, with its defaults."""
    c = ml_collections.ConfigDict()
    # Builtin dataset name or JSONL file of training records.
    c.path = "stdlib_docstrings"
    # JSONL file of evaluation records; "" = the builtin's "validation" split, or none for files.
    c.eval_path = ""
    # Record format: "auto", "alpaca", "prompt_response", "chat" or "classification".
    c.format = "auto"
    # Pack several instruction examples into each row (the model must honour segment_ids).
    c.packing = False
    # Instruction examples longer than train.seq_len: "truncate" (cut, counted in the log) or
    # "error" (refuse the data).
    c.overlong = "truncate"
    # Optional shorter row lengths to pad batches to (each compiles once); () = seq_len only.
    c.length_buckets = ()
    # Classification label names for string labels; () = builtin labels or derived from data.
    c.labels = ()
    return c


def datasets_from_config(config: Mapping[str, Any] | ml_collections.ConfigDict,
                         tokenizer: Tokenizer | str, seq_len: int
                         ) -> tuple[Dataset, Dataset | None]:
    """Builds (train, eval or None) from a ``data`` config section (see `default_config`)."""
    known = set(default_config().keys())
    unknown = sorted(set(config.keys()) - known)
    if unknown:
        raise DataError(f"unknown data config keys {unknown}; known: {sorted(known)}")
    get = lambda key: config[key] if key in config else default_config()[key]  # noqa: E731
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    labels = list(get("labels")) or None
    train = build_dataset(get("path"), tokenizer, seq_len, split="train", format=get("format"),
                          packing=bool(get("packing")), label_names=labels,
                          overlong=get("overlong"))
    names = getattr(train, "label_names", None)
    evaluation = None
    if get("eval_path"):
        evaluation = build_dataset(get("eval_path"), tokenizer, seq_len, format=get("format"),
                                   packing=bool(get("packing")), label_names=names,
                                   overlong=get("overlong"))
    elif get("path") in BUILTINS:
        evaluation = build_dataset(get("path"), tokenizer, seq_len, split="validation",
                                   format=get("format"), packing=bool(get("packing")),
                                   label_names=names, overlong=get("overlong"))
    return train, evaluation


__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "BUILTINS", "apply_chat_template", "ClassificationDataset", "DataError",
    "Dataset", "EvalLoader", "FORMATS", "OVERLONG", "InstructDataset", "Tokenizer", "TrainLoader",
    "build_dataset", "encode_prompt", "datasets_from_config", "default_config", "load_tokenizer",
    "to_hf_labels",
]
