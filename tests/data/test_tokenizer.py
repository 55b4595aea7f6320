"""Tokenizer wrapper: special tokens from the checkpoint files, truncation, padding."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from qlora_jax import data
from tests.data.conftest import random_sentence, word_level


def test_minilm_special_tokens(minilm_tok):
    assert (minilm_tok.cls_id, minilm_tok.sep_id, minilm_tok.pad_id) == (101, 102, 0)
    assert minilm_tok.bos_id is None and minilm_tok.eos_id is None
    assert (minilm_tok.start_id, minilm_tok.end_id) == (101, 102)


def test_minilm_matches_transformers(minilm_dir, minilm_tok, rng):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    path = os.path.join(os.path.dirname(data.__file__), "assets", "stdlib_docstrings.test.jsonl")
    with open(path) as f:
        texts = [json.loads(line)["text"] for line in f]
    texts = [texts[i] for i in rng.choice(len(texts), 24, replace=False)]
    for max_len in (None, 16):
        ours = minilm_tok.encode_batch(texts, max_length=max_len)
        theirs = ref(texts, truncation=max_len is not None, max_length=max_len)["input_ids"]
        assert ours == theirs


def test_truncation_keeps_special_tokens(minilm_tok, rng):
    text = " ".join(["word"] * int(rng.integers(40, 80)))
    ids = minilm_tok.encode(text, max_length=10)
    assert len(ids) == 10 and ids[0] == 101 and ids[-1] == 102
    with pytest.raises(data.DataError, match="max_length"):
        minilm_tok.encode(text, max_length=2)


def test_encode_padded(minilm_tok, rng):
    texts = [random_sentence(rng, 1, 30) for _ in range(5)]
    out = minilm_tok.encode_padded(texts, 12)
    assert out["input_ids"].shape == (5, 12) and out["input_ids"].dtype == np.int32
    for i, t in enumerate(texts):
        ids = minilm_tok.encode(t, max_length=12)
        n = int(out["attention_mask"][i].sum())
        assert n == len(ids) and list(out["input_ids"][i, :n]) == ids
        assert (out["input_ids"][i, n:] == 0).all() and (out["attention_mask"][i, n:] == 0).all()


def test_llama_style_from_config(llama_tok):
    assert llama_tok.token_to_id("<s>") == llama_tok.bos_id
    assert llama_tok.token_to_id("</s>") == llama_tok.eos_id
    assert llama_tok.encode("the hot")[0] == llama_tok.bos_id  # post-processor adds bos only
    assert llama_tok.encode("the hot")[-1] != llama_tok.eos_id


def test_special_tokens_without_config_files(tmp_path):
    tok = data.load_tokenizer(word_level(str(tmp_path), None))
    assert tok.bos_id == tok.token_to_id("<s>")  # from the post-processor template
    assert tok.eos_id == tok.token_to_id("</s>")  # well-known name
    assert tok.pad_id == tok.token_to_id("<pad>")


def test_special_tokens_from_config_json(tmp_path):
    d = word_level(str(tmp_path), None, template=False)
    probe = data.load_tokenizer(d)
    ids = {"bos_token_id": probe.token_to_id("hot"), "eos_token_id": [probe.token_to_id("word"), 7]}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(ids, f)
    tok = data.load_tokenizer(d)
    assert (tok.bos_id, tok.eos_id) == (ids["bos_token_id"], ids["eos_token_id"][0])
    assert tok.pad_id == tok.token_to_id("<pad>")
    over = data.load_tokenizer(os.path.join(d, "tokenizer.json"), eos_token="</s>", pad_token="</s>")
    assert over.eos_id == over.pad_id == tok.token_to_id("</s>")


def test_bad_tokenizer_input(tmp_path):
    with pytest.raises(data.DataError, match="no tokenizer.json"):
        data.load_tokenizer(str(tmp_path))
    d = word_level(str(tmp_path), None)
    with pytest.raises(data.DataError, match="not in the vocabulary"):
        data.load_tokenizer(d, eos_token="<|nope|>")
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        f.write("{broken")
    with pytest.raises(data.DataError, match="not valid JSON"):
        data.load_tokenizer(d)
