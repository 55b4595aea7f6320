"""``qj.data.load_tokenizer`` on GGUF files, against transformers' GGUF tokenizer.

The real SmolLM2 vocabulary (byte-level BPE, ``pre = "smollm"``) and a synthetic SentencePiece
("llama") vocabulary written with ``gguf.GGUFWriter``.
"""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest

from qlora_jax import data

TEXTS = [
    "Hello, world! How are you?",
    "12345 + 678 = 99.5 and 3,000,000",
    "Hello  world\n\n  indented\t\ttabs   trailing   ",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "héllo naïve café — 日本語のテキスト 🙂👍🏽 Ünïcödé",
    "It's we'll DON'T they've I'm",
    " leading space",
    "",
    "def f(x):\n    return x**2  # square\n",
]


@pytest.fixture(scope="module")
def smollm2_tokenizers(smollm2_gguf):
    import transformers
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm2_gguf),
                                                     gguf_file=os.path.basename(smollm2_gguf))
    return data.load_tokenizer(smollm2_gguf), ref


def test_smollm2_ids_equal_transformers(smollm2_tokenizers):
    ours, ref = smollm2_tokenizers
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids)
    # Special tokens in text stay whole; skip_special_tokens drops them.
    ids = ours.encode("<|im_start|>x<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and ours.decode(ids) == "x"


def test_smollm2_digits_split_as_llama_cpp(smollm2_tokenizers):
    """pre "smollm" splits every numeral first (llama.cpp, and SmolLM2's own tokenizer.json);
    transformers' GGUF loader does not, which differs only on non-ASCII numerals after a space."""
    ours, _ = smollm2_tokenizers
    pieces = ours.backend.pre_tokenizer.pre_tokenize_str("ab ٣٤x 12")
    assert [p for p, _ in pieces] == ["ab", "Ġ", "Ù£", "Ù¤", "x", "Ġ", "1", "2"]


def test_smollm2_specials_and_template(smollm2_tokenizers):
    ours, ref = smollm2_tokenizers
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (
        ref.convert_tokens_to_ids(ref.bos_token), ref.convert_tokens_to_ids(ref.eos_token),
        ref.convert_tokens_to_ids(ref.pad_token), ref.convert_tokens_to_ids(ref.unk_token))
    assert ours.chat_template == ref.chat_template and "<|im_start|>" in ours.chat_template
    assert ours.vocab_size == len(ref) == 49152
    assert ours.model_max_length == 8192


# A small SentencePiece BPE vocabulary: specials, the 256 byte tokens, then pieces by score.
_PIECES = ["\u2581", "e", "t", "h", "a", "i", "n", "s", "o", "r", "l", "d", "w", "\u2581t", "he",
           "\u2581the", "in", "\u2581a", "er", "\u2581w", "or", "ing", "\u2581s", "re", "on",
           "\u2581o",
           "is", "\u2581th", "ll", "\u2581in", "\u2581is", "ld", "\u2581wor", "\u2581world",
           "\u2581he", "llo", "\u2581hello", "H", "W", "!", ","]


def _write_sentencepiece_gguf(path: str, add_bos: bool) -> None:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(_PIECES)
    scores = [0.0] * 259 + [-float(i) for i in range(len(_PIECES))]
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("add_bos", [True, False])
def test_sentencepiece_ids_equal_transformers(tmp_path, add_bos):
    import transformers
    path = str(tmp_path / "sp.gguf")
    _write_sentencepiece_gguf(path, add_bos)
    ours = data.load_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    texts = ["hello world", "Hello World!", "the thing is in the world, is it",
             "  two  spaces", "ünï 日本 🙂", "</s> hello <s>", ""]
    for text in texts:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    assert (ours.bos_id, ours.eos_id, ours.unk_id) == (1, 2, 0)
    assert ours.chat_template == ref.chat_template


def test_unsupported_tokenizers_named(tmp_path):
    path = str(tmp_path / "x.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("some-new-regex")
    w.add_token_list(["a", "b"])
    w.add_token_merges([])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(data.DataError, match="tokenizer.ggml.pre 'some-new-regex'"):
        data.load_tokenizer(path)
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("bert")
    w.add_token_list(["a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(data.DataError, match="tokenizer.ggml.model 'bert'"):
        data.load_tokenizer(path)
    _write_sentencepiece_gguf(path, True)
    with pytest.raises(data.DataError, match="pad_token 'nope' is not in the vocabulary"):
        data.load_tokenizer(path, pad_token="nope")


def _write_metadata_only(path: str, meta: dict) -> None:
    from qlora_jax.formats.gguf_vocab import typed_entries
    w = gguf.GGUFWriter(path, "llama")
    for key, value, vtype, sub in typed_entries(meta):
        w.add_key_value(key, value, vtype, sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.slow
def test_smollm2_converted_back_to_metadata(smollm2_tokenizers, tmp_path):
    """A tokenizer without GGUF metadata (as read from tokenizer.json) converts to the same
    vocabulary, merges, pre-tokenizer name and ids the original file holds."""
    from qlora_jax.formats.gguf_vocab import metadata_from_tokenizer
    ours, _ = smollm2_tokenizers
    special = {"bos": ours.bos_id, "eos": ours.eos_id, "pad": ours.pad_id, "unk": ours.unk_id}
    meta = metadata_from_tokenizer(ours.backend, special, ours.chat_template, ours.vocab_size)
    src = ours.metadata
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.chat_template",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.add_bos_token"):
        assert meta[key] == src[key], key
    _write_metadata_only(str(tmp_path / "t.gguf"), meta)
    again = data.load_tokenizer(str(tmp_path / "t.gguf"))
    for text in TEXTS:
        assert again.encode(text) == ours.encode(text)


def test_sentencepiece_converted_back(tmp_path):
    import transformers

    from qlora_jax.formats.gguf_vocab import metadata_from_tokenizer
    _write_sentencepiece_gguf(str(tmp_path / "sp.gguf"), True)
    src = data.load_tokenizer(str(tmp_path / "sp.gguf"))
    special = {"bos": src.bos_id, "eos": src.eos_id, "pad": None, "unk": src.unk_id}
    meta = metadata_from_tokenizer(src.backend, special, None, src.vocab_size + 3)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_bos_token"]
    assert meta["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 6]
    assert meta["tokenizer.ggml.tokens"][-3:] == ["[PAD300]", "[PAD301]", "[PAD302]"]
    out = tmp_path / "out"
    out.mkdir()
    _write_metadata_only(str(out / "sp2.gguf"), meta)
    again = data.load_tokenizer(str(out / "sp2.gguf"))
    ref = transformers.AutoTokenizer.from_pretrained(str(out), gguf_file="sp2.gguf")
    for text in ("hello world", "the thing is in the world, is it", "ünï 🙂", "  x"):
        assert again.encode(text) == src.encode(text) == ref(text)["input_ids"], text
