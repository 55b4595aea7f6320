"""Record formats: detection, validation, clear errors naming the line and keys."""

from __future__ import annotations

import pytest

from qlora_jax import data
from qlora_jax.data.jsonl import load_records

ALPACA = {"instruction": "say hi", "input": "", "output": "hi"}
PROMPT = {"prompt": "Q: 1+1?\nA:", "response": " 2"}
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
CLS = {"text": "some text", "label": 1}


@pytest.mark.parametrize("record, fmt", [(ALPACA, "alpaca"), (PROMPT, "prompt_response"),
                                         (CHAT, "chat"), (CLS, "classification")])
def test_each_format_is_detected(write_jsonl, record, fmt):
    path = write_jsonl([record, "", {**record, "extra": 1}])  # blank lines, extra keys are fine
    found, records = load_records(path)
    assert found == fmt and [n for n, _ in records] == [1, 3]
    assert load_records(path, fmt)[0] == fmt


def test_unknown_record_names_line_and_keys(write_jsonl):
    path = write_jsonl([{"question": "q", "answer": "a"}])
    with pytest.raises(data.DataError, match=r"d.jsonl:1: keys found \['answer', 'question'\]"):
        load_records(path)
    path = write_jsonl([PROMPT, PROMPT, {"question": "q"}])
    with pytest.raises(data.DataError, match=r":3: keys found \['question'\].*prompt_response"):
        load_records(path)


def test_mixed_formats_rejected(write_jsonl):
    path = write_jsonl([ALPACA, CHAT])
    with pytest.raises(data.DataError, match=r":2: .*format is 'alpaca'.*looks like 'chat'"):
        load_records(path)


def test_forced_format_mismatch(write_jsonl):
    with pytest.raises(data.DataError, match=r":1: .*format is 'chat', which needs \['messages'\]"):
        load_records(write_jsonl([PROMPT]), "chat")


def test_file_errors(write_jsonl, tmp_path):
    with pytest.raises(data.DataError, match="not found"):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(data.DataError, match="empty"):
        load_records(write_jsonl(["", "  "]))
    with pytest.raises(data.DataError, match=r":2: invalid JSON"):
        load_records(write_jsonl([PROMPT, "{not json"]))
    with pytest.raises(data.DataError, match=r":1: expected a JSON object, got list"):
        load_records(write_jsonl(["[1, 2]"]))
    with pytest.raises(data.DataError, match="unknown data format 'csv'"):
        load_records(write_jsonl([PROMPT]), "csv")


@pytest.mark.parametrize("record, message", [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no 'assistant' message"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\]"),
    ({"prompt": 3, "response": "x"}, "'prompt' must be a string"),
    ({"instruction": "x", "output": "y", "input": 5}, "'input' must be a string"),
    ({"text": "x", "label": 1.5}, "'label' must be an int or a string"),
    ({"text": "x", "label": True}, "'label' must be an int or a string"),
])
def test_bad_records(write_jsonl, record, message):
    with pytest.raises(data.DataError, match=message):
        load_records(write_jsonl([record]))
