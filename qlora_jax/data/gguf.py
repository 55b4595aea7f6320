"""The tokenizer of a llama.cpp GGUF file, rebuilt from its metadata (see qlora_jax.formats)."""

from __future__ import annotations

from typing import Any

from qlora_jax.data.errors import DataError
from qlora_jax.data.tokenizer import Tokenizer
from qlora_jax.formats.gguf import GGUFError, architecture, open_reader, read_metadata
from qlora_jax.formats.gguf_vocab import VocabError, special_ids, tokenizer_from_metadata


class GGUFTokenizer(Tokenizer):
    """A `Tokenizer` read from a GGUF file.

    Attributes:
        metadata: the file's ``tokenizer.*`` metadata (vocabulary, merges, ids, chat template),
            kept so that ``save_pretrained(..., format="gguf", tokenizer=tok)`` writes it back
            unchanged.
        path: the GGUF file.
    """

    def __init__(self, *args: Any, metadata: dict[str, Any], path: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.metadata = metadata
        self.path = path


def load_gguf_tokenizer(path: str, bos_token: str | None = None, eos_token: str | None = None,
                        pad_token: str | None = None) -> GGUFTokenizer:
    """The tokenizer, special tokens and chat template of a GGUF file (or a directory of one).

    Raises:
        DataError: an unreadable file, or a tokenizer model / pre-tokenizer not supported.
    """
    try:
        reader = open_reader(path)
        arch = architecture(reader, reader.path)
        meta = read_metadata(reader, [k for k in reader.fields if k.startswith("tokenizer.")])
        ctx = read_metadata(reader, [f"{arch}.context_length"]).get(f"{arch}.context_length")
        tok = tokenizer_from_metadata(meta, reader.path)
    except (GGUFError, VocabError, FileNotFoundError) as e:
        raise DataError(str(e)) from e
    special = special_ids(meta)
    for role, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token)):
        if token is not None:
            if tok.token_to_id(token) is None:
                raise DataError(f"{role}_token {token!r} is not in the vocabulary of {path}")
            special[role] = tok.token_to_id(token)
    template = meta.get("tokenizer.chat_template")
    return GGUFTokenizer(tok, special, int(ctx) if ctx else None,
                         template if isinstance(template, str) else None,
                         metadata=meta, path=str(reader.path))
