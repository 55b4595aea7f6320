"""Reading JSONL files and recognising their record format.

Formats (keys of one JSON object a line; extra keys are ignored):

- ``alpaca``: ``instruction`` (str), ``output`` (str), optional ``input`` (str).
- ``prompt_response``: ``prompt`` (str), ``response`` (str).
- ``chat``: ``messages``, a non-empty list of ``{"role": str, "content": str}`` with at least one
  ``assistant`` message.
- ``classification``: ``text`` (str), ``label`` (int or str).

With ``format="auto"`` the format of a file is the one its first record matches; every other
record must match the same format.
"""

from __future__ import annotations

import json
import os
from typing import Any

from qlora_jax.data.errors import DataError

FORMATS = ("alpaca", "prompt_response", "chat", "classification")
INSTRUCT_FORMATS = ("alpaca", "prompt_response", "chat")
_REQUIRED = {
    "alpaca": ("instruction", "output"),
    "prompt_response": ("prompt", "response"),
    "chat": ("messages",),
    "classification": ("text", "label"),
}


def read_jsonl(path: str) -> list[tuple[int, dict[str, Any]]]:
    """Reads a JSONL file.

    Args:
        path: the file; blank lines are skipped.

    Returns:
        (1-based line number, record) pairs.

    Raises:
        DataError: missing file, invalid JSON, a line that is not an object, or no records.
    """
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path} (give a JSONL file path or a builtin "
                        "dataset name such as 'stdlib_docstrings')")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}); each line must be "
                                "one JSON object") from e
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got "
                                f"{type(record).__name__}")
            records.append((lineno, record))
    if not records:
        raise DataError(f"{path} holds no records (empty file)")
    return records


def match_format(record: dict[str, Any]) -> str | None:
    """The format a record matches, or None (see the module docstring)."""
    for name in FORMATS:
        if all(key in record for key in _REQUIRED[name]):
            return name
    return None


def _describe(path: str, lineno: int, record: dict[str, Any]) -> str:
    return f"{path}:{lineno}: keys found {sorted(record)}"


def check_record(path: str, lineno: int, record: dict[str, Any], fmt: str) -> None:
    """Raises DataError naming the line when a record is not a valid `fmt` record."""
    missing = [k for k in _REQUIRED[fmt] if k not in record]
    if missing:
        raise DataError(f"{_describe(path, lineno, record)}; format {fmt!r} needs "
                        f"{list(_REQUIRED[fmt])} (missing {missing})")
    if fmt == "chat":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{path}:{lineno}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise DataError(f"{path}:{lineno}: messages[{i}] must be an object with string "
                                f"'role' and 'content', got {m!r:.80}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{path}:{lineno}: no 'assistant' message, nothing to learn from")
        return
    if fmt == "classification":
        if not isinstance(record["text"], str):
            raise DataError(f"{path}:{lineno}: 'text' must be a string")
        label = record["label"]
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise DataError(f"{path}:{lineno}: 'label' must be an int or a string, got {label!r}")
        return
    for key in _REQUIRED[fmt] + (("input",) if fmt == "alpaca" else ()):
        if key in record and record[key] is not None and not isinstance(record[key], str):
            raise DataError(f"{path}:{lineno}: {key!r} must be a string, got "
                            f"{type(record[key]).__name__}")


def load_records(path: str, fmt: str = "auto") -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    """Reads a JSONL file and validates every record against one format.

    Args:
        path: the JSONL file.
        fmt: one of FORMATS, or "auto" (the format of the first record).

    Returns:
        (format, [(line number, record)]).

    Raises:
        DataError: see `read_jsonl`; unknown format name; a record that matches no format or
            another format than the file's, naming its line and the keys found.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; use 'auto' or one of {list(FORMATS)}")
    records = read_jsonl(path)
    if fmt == "auto":
        lineno, first = records[0]
        fmt = match_format(first)
        if fmt is None:
            raise DataError(
                f"{_describe(path, lineno, first)}; this matches no known format. Expected "
                "'instruction'+'output' (alpaca), 'prompt'+'response', 'messages' (chat) or "
                "'text'+'label' (classification)")
    for lineno, record in records:
        if not all(k in record for k in _REQUIRED[fmt]):
            found = match_format(record)
            hint = f" (it looks like {found!r})" if found else ""
            raise DataError(f"{_describe(path, lineno, record)}; the file's format is {fmt!r}, "
                            f"which needs {list(_REQUIRED[fmt])}{hint}")
        check_record(path, lineno, record, fmt)
    return fmt, records
