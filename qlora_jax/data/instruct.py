"""Instruction data for causal LMs: prompt templates, tokenisation, response-only loss.

Each record becomes a sequence of token ids and a per-token flag "this token is learned":

    [start] prompt-tokens  response-tokens [end]
       0       0 ... 0        1 ... 1        1

where start is the tokenizer's bos (or [CLS]) and end its eos (or [SEP]). Loss is taken only on
response tokens and the closing end token, as in the QLoRA recipe (source tokens carry label
-100 there). Prompt and response pieces are tokenised separately (add_special_tokens=False) and
concatenated, so the boundary is exact; at inference, encode the prompt the same way.

Templates:

- ``alpaca``: `ALPACA_PROMPT` (or `ALPACA_PROMPT_NO_INPUT` when ``input`` is empty or absent),
  the Stanford Alpaca prompt, followed by ``output``.
- ``prompt_response``: ``prompt`` verbatim, then ``response`` verbatim (put any separator you
  want in the prompt).
- ``chat``: the checkpoint's own Jinja chat template, rendered and tokenised as transformers
  does (`qlora_jax.data.chat_template`; no start token is added: the template writes its
  own), with loss on the content and end-of-turn token(s) of every assistant message. Only a
  checkpoint without a chat template falls back, with a warning, to `FALLBACK_CHAT`: each
  message as ``"<|{role}|>\\n{content}\\n"``, except that an assistant message is
  ``"<|assistant|>\\n{content}"`` followed by the end token (a format no checkpoint was
  trained on, so serve the adapter with the same fallback).

`encode_prompt` gives the ids of a prompt for generation, exactly as training saw them (for chat
with a template: the template with ``add_generation_prompt=True``).
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from qlora_jax.data.chat_template import apply_chat_template
from qlora_jax.data.errors import DataError
from qlora_jax.data.packing import fill_fraction, pack_rows
from qlora_jax.data.tokenizer import Tokenizer

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

_END = object()  # marks the position of the end token in a list of segments
#: The made-up chat format used only for checkpoints without a chat template.
FALLBACK_CHAT = "<|{role}|>\n{content}\n"


def _warn_fallback(tokenizer: Tokenizer) -> None:
    warnings.warn("the tokenizer has no chat template (tokenizer_config.json chat_template, "
                  "chat_template.jinja or GGUF metadata): chat records are rendered with "
                  "qlora_jax's fallback '<|role|>' format, which the checkpoint never saw; give "
                  "the checkpoint's chat template for serving-compatible adapters", stacklevel=3)


def segments(record: dict[str, Any], fmt: str) -> list[tuple[Any, bool]]:
    """Splits a record into (text or end marker, learned) pieces in order.

    Args:
        record: one validated record (see qlora_jax.data.jsonl).
        fmt: "alpaca", "prompt_response" or "chat".

    Returns:
        [(text, learned)], where text is a str or the end-token marker.
    """
    if fmt == "alpaca":
        extra = record.get("input") or ""
        template = ALPACA_PROMPT if extra.strip() else ALPACA_PROMPT_NO_INPUT
        prompt = template.format(instruction=record["instruction"], input=extra)
        return [(prompt, False), (record["output"], True), (_END, True)]
    if fmt == "prompt_response":
        return [(record["prompt"], False), (record["response"], True), (_END, True)]
    if fmt == "chat":
        out: list[tuple[Any, bool]] = []
        for message in record["messages"]:
            role, content = message["role"], message["content"]
            if role == "assistant":
                out += [("<|assistant|>\n", False), (content, True), (_END, True)]
            else:
                out.append((FALLBACK_CHAT.format(role=role, content=content), False))
        return out
    raise DataError(f"{fmt!r} is not an instruction format; use alpaca, prompt_response or chat")


def encode_prompt(record: dict[str, Any], fmt: str, tokenizer: Tokenizer) -> list[int]:
    """Ids a model sees before it writes the response, exactly as in training (for generation).

    Args:
        record: an alpaca record (``output`` may be absent), a prompt_response record
            (``response`` may be absent), or a chat record whose messages end before the
            assistant turn to generate (earlier assistant turns keep their end token).
        fmt: "alpaca", "prompt_response" or "chat".
        tokenizer: the tokenizer the data was built with.

    Returns:
        [start] + prompt ids; for chat, the chat template's rendering with the generation prompt
        (the fallback: ending with the ``<|assistant|>`` header).
    """
    if fmt == "chat" and tokenizer.chat_template:
        return apply_chat_template(tokenizer, record["messages"], add_generation_prompt=True)[0]
    if fmt == "chat":
        _warn_fallback(tokenizer)
        segs = segments({"messages": record["messages"]}, fmt) + [("<|assistant|>\n", False)]
    else:
        segs = segments({"output": "", "response": "", **record}, fmt)[:1]
    start = tokenizer.start_id
    ids = [] if start is None else [start]
    texts = [text for text, _ in segs if text is not _END]
    encoded = iter(tokenizer.encode_batch(texts, add_special_tokens=False))
    for text, _ in segs:
        ids += [tokenizer.end_id] if text is _END else next(encoded)
    return ids


OVERLONG = ("truncate", "error")


def tokenize_records(records: Sequence[dict[str, Any]], fmt: str, tokenizer: Tokenizer,
                     seq_len: int, overlong: str = "truncate"
                     ) -> tuple[list[np.ndarray], list[np.ndarray], int, int]:
    """Tokenises instruction records into ids and learned-token flags, truncated to seq_len.

    Args:
        records: validated records of one format.
        fmt: their format.
        tokenizer: the checkpoint's tokenizer.
        seq_len: maximum tokens an example keeps.
        overlong: what to do with an example longer than seq_len: ``"truncate"`` (cut its
            right end; counted) or ``"error"`` (refuse the data).

    Returns:
        (ids, learned, dropped, truncated): int32 [n_i] ids and bool [n_i] flags per kept
        example, the number of examples dropped because no learned token survived truncation,
        and the number of examples cut to seq_len.

    Raises:
        DataError: the tokenizer has no end token (and, for chat, no chat template), or the
            chat template refuses a conversation; ``overlong="error"`` and an example is longer
            than seq_len; an unknown ``overlong``.
    """
    if overlong not in OVERLONG:
        raise DataError(f"overlong={overlong!r} is not allowed; use one of {OVERLONG}")
    if fmt == "chat" and tokenizer.chat_template:  # the template writes its end-of-turn tokens
        pairs = [apply_chat_template(tokenizer, r["messages"]) for r in records]
        return _truncate([np.asarray(i, np.int32) for i, _ in pairs],
                         [np.asarray(m, np.bool_) for _, m in pairs], seq_len, overlong)
    end = tokenizer.end_id
    if end is None:
        raise DataError("the tokenizer names no eos (or [SEP]) token, so responses cannot be "
                        "terminated; pass eos_token=... to load_tokenizer")
    if fmt == "chat":
        _warn_fallback(tokenizer)
    start = tokenizer.start_id
    pieces = [segments(r, fmt) for r in records]
    texts = [text for segs in pieces for text, _ in segs if text is not _END]
    encoded = iter(tokenizer.encode_batch(texts, add_special_tokens=False))
    all_ids, all_learned = [], []
    for segs in pieces:
        ids: list[int] = [] if start is None else [start]
        learned: list[bool] = [] if start is None else [False]
        for text, is_learned in segs:
            chunk = [end] if text is _END else next(encoded)
            ids += chunk
            learned += [is_learned] * len(chunk)
        all_ids.append(np.asarray(ids, np.int32))
        all_learned.append(np.asarray(learned, np.bool_))
    return _truncate(all_ids, all_learned, seq_len, overlong)


def _truncate(ids: list[np.ndarray], learned: list[np.ndarray], seq_len: int,
              overlong: str = "truncate") -> tuple[list[np.ndarray], list[np.ndarray], int, int]:
    """Cuts examples to seq_len (or refuses them, ``overlong="error"``) and drops those left
    without a learned token after the first; returns (ids, learned, dropped, truncated)."""
    longer = [len(i) for i in ids if len(i) > seq_len]
    if longer and overlong == "error":
        raise DataError(f"{len(longer)} of {len(ids)} examples are longer than seq_len={seq_len}"
                        f" tokens (the longest has {max(longer)}); raise train.seq_len, or set "
                        "data.overlong='truncate' to cut them")
    kept_ids, kept_learned, dropped = [], [], 0
    for i, flags in zip(ids, learned):
        i, flags = i[:seq_len], flags[:seq_len]
        # Token 0 is never predicted, so at least one learned token after it must remain.
        if not flags[1:].any():
            dropped += 1
            continue
        kept_ids.append(i)
        kept_learned.append(flags)
    if dropped:
        warnings.warn(f"{dropped} of {len(ids)} examples have no response token within "
                      f"seq_len={seq_len} and were dropped; raise seq_len to keep them",
                      stacklevel=3)
    return kept_ids, kept_learned, dropped, len(longer)


class InstructDataset:
    """Tokenised instruction examples, collated into causal-LM batches.

    Rows hold one example each (padding), or several examples (``packing=True``), packed into
    rows of seq_len by best-fit decreasing (`qlora_jax.data.packing.pack_rows`: deterministic,
    rows in the order of their first example). A batch has, all of shape [B, T]:

    - ``input_ids`` int32 (pad_id after the tokens),
    - ``targets`` int32: the next token, ``targets[t] = input_ids[t + 1]`` within an example,
    - ``loss_mask`` float32: 1 where ``targets[t]`` is a learned (response or end) token of the
      same example; 0 on prompt tokens, on the last token of each example (its next token belongs
      to another example) and on padding, so no loss crosses an example boundary,
    - ``segment_ids`` int32: 1, 2, ... for the examples of a row, 0 on padding,
    - ``position_ids`` int32: position within its example (restarts at 0 for each example),
    - ``attention_mask`` int32: 1 on tokens, 0 on padding,

    and ``weights`` float32 [B]: 1 for a real row, 0 for a padding row. With packing the model must
    attend only within a segment (mask from ``segment_ids``) and use ``position_ids``; without
    it ``attention_mask`` suffices.

    Attributes:
        ids: int32 token ids per example.
        learned: bool flags per example (True = the token carries loss when predicted).
        seq_len: row length T.
        packing: whether rows hold several examples.
        pad_id: id written on padding.
        format: the record format.
        dropped: examples dropped at truncation.
        truncated: examples cut to seq_len.
    """

    kind = "causal_lm"

    def __init__(self, ids: list[np.ndarray], learned: list[np.ndarray], seq_len: int,
                 pad_id: int, packing: bool = False, fmt: str = "", dropped: int = 0,
                 truncated: int = 0):
        if not ids:
            raise DataError("no usable examples (all were empty or dropped at truncation)")
        self.ids, self.learned = ids, learned
        self.seq_len, self.pad_id, self.packing = seq_len, pad_id, packing
        self.format, self.dropped, self.truncated = fmt, dropped, truncated
        self._lengths = np.array([len(x) for x in ids], np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per example, int64 [N]."""
        return self._lengths

    def make_rows(self, order: np.ndarray) -> list[tuple[int, ...]]:
        """Groups example indices, in `order`, into rows of at most seq_len tokens."""
        if not self.packing:
            return [(int(i),) for i in order]
        return pack_rows(self._lengths, order, self.seq_len)

    def summary(self) -> str:
        """One line for the run log: examples, rows, token fill of the rows, truncations."""
        rows = self.make_rows(np.arange(len(self)))
        fill = fill_fraction(self._lengths, rows, self.seq_len)
        layout = "packed into" if self.packing else "one a row in"
        line = (f"{len(self)} examples {layout} {len(rows)} rows of {self.seq_len} tokens "
                f"({fill:.1%} tokens, {1 - fill:.1%} padding)")
        if self.truncated:
            line += f"; {self.truncated} examples longer than {self.seq_len} tokens were truncated"
        if self.dropped:
            line += f"; {self.dropped} dropped (no response token within seq_len)"
        return line

    def row_length(self, row: Sequence[int]) -> int:
        """Tokens in a row."""
        return int(sum(self._lengths[i] for i in row))

    def collate(self, rows: Sequence[Sequence[int]], batch_size: int,
                seq_len: int | None = None) -> dict[str, np.ndarray]:
        """Batch of `batch_size` rows (missing rows are padding with weight 0), T = seq_len."""
        t = self.seq_len if seq_len is None else seq_len
        if len(rows) > batch_size:
            raise DataError(f"{len(rows)} rows do not fit a batch of {batch_size}")
        shape = (batch_size, t)
        batch = {
            "input_ids": np.full(shape, self.pad_id, np.int32),
            "targets": np.zeros(shape, np.int32),
            "loss_mask": np.zeros(shape, np.float32),
            "segment_ids": np.zeros(shape, np.int32),
            "position_ids": np.zeros(shape, np.int32),
            "attention_mask": np.zeros(shape, np.int32),
            "weights": np.zeros((batch_size,), np.float32),
        }
        for b, row in enumerate(rows):
            batch["weights"][b] = 1.0
            start = 0
            for segment, i in enumerate(row, start=1):
                ids, learned = self.ids[i], self.learned[i]
                n = len(ids)
                end = start + n
                if end > t:
                    raise DataError(f"row of {self.row_length(row)} tokens does not fit T={t}")
                batch["input_ids"][b, start:end] = ids
                batch["targets"][b, start:end - 1] = ids[1:]
                batch["loss_mask"][b, start:end - 1] = learned[1:]
                batch["segment_ids"][b, start:end] = segment
                batch["position_ids"][b, start:end] = np.arange(n, dtype=np.int32)
                batch["attention_mask"][b, start:end] = 1
                start = end
        return batch

    def fingerprint(self) -> str:
        """Short string that changes when the examples or row layout change (checked on resume)."""
        crc = zlib.crc32(np.concatenate(self.ids).tobytes())
        crc = zlib.crc32(np.concatenate(self.learned).tobytes(), crc)
        layout = "bfd" if self.packing else "0"  # the packing algorithm fixes the rows too
        return f"{self.kind}:{len(self)}:{crc:08x}:{self.seq_len}:{layout}"


def to_hf_labels(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Hugging Face style labels of an unpacked causal-LM batch (to compare with transformers).

    ``labels[t] = input_ids[t]`` where that token carries loss (``loss_mask[t - 1] == 1``), else
    -100; a transformers causal LM shifts these internally, so its loss equals ours.

    Args:
        batch: a batch of an `InstructDataset` built with ``packing=False``.

    Returns:
        int32 [B, T] labels.

    Raises:
        DataError: the batch holds packed rows (HF labels cannot stop loss at boundaries).
    """
    if (batch["segment_ids"] > 1).any():
        raise DataError("packed rows have no Hugging Face label equivalent; build with "
                        "packing=False")
    labels = np.full(batch["input_ids"].shape, -100, np.int32)
    learned = batch["loss_mask"][:, :-1] == 1
    labels[:, 1:][learned] = batch["input_ids"][:, 1:][learned]
    return labels
