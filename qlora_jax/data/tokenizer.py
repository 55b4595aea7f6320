"""A checkpoint's tokenizer.json through the `tokenizers` library, with its special tokens.

No `transformers` at runtime: the special tokens come from the files a Hugging Face checkpoint
ships beside tokenizer.json, in this order of precedence: explicit arguments,
tokenizer_config.json, special_tokens_map.json, config.json (`*_token_id`), the template of the
tokenizer.json post-processor, and finally well-known token names found in the vocabulary.

The chat template comes from chat_template.jinja (transformers >= 4.50 writes it), else
chat_template.json, else tokenizer_config.json's ``chat_template`` (a string, or a list of
``{"name", "template"}`` of which "default" is used); it is rendered by
`qlora_jax.data.chat_template`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tokenizers

from qlora_jax.data.errors import DataError
from qlora_jax.formats.gguf import is_gguf

_ROLES = ("bos", "eos", "pad", "cls", "sep", "unk")
# Last-resort guesses, tried in order, when no file names a role's token.
_WELL_KNOWN = {
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
    "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>"),
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>"),
    "cls": ("[CLS]",),
    "sep": ("[SEP]",),
    "unk": ("<unk>", "[UNK]"),
}


class Tokenizer:
    """Wraps `tokenizers.Tokenizer` and knows the special token ids of its checkpoint.

    Attributes:
        bos_id: beginning-of-sequence id (Llama-style), or None.
        eos_id: end-of-sequence id, or None.
        pad_id: padding id: the pad token, else eos, else 0.
        cls_id: BERT's [CLS] id, or None.
        sep_id: BERT's [SEP] id, or None.
        vocab_size: size of the vocabulary including added tokens.
        model_max_length: tokenizer_config.json's `model_max_length` when sane, else None.
        chat_template: the checkpoint's Jinja chat template, or None.
        special_tokens: the named special tokens as strings, ``{"bos_token": "<s>", ...}``: the
            variables a chat template sees (transformers' ``special_tokens_map``).
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, special: dict[str, int | None],
                 model_max_length: int | None = None, chat_template: str | None = None,
                 special_tokens: dict[str, str] | None = None):
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        self.bos_id = special.get("bos")
        self.eos_id = special.get("eos")
        self.cls_id = special.get("cls")
        self.sep_id = special.get("sep")
        self.unk_id = special.get("unk")
        pad = special.get("pad")
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.model_max_length = model_max_length
        self.chat_template = chat_template
        if special_tokens is None:  # named from the ids (e.g. a GGUF's metadata)
            special_tokens = {f"{role}_token": tokenizer.id_to_token(i)
                              for role, i in special.items() if i is not None}
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}

    @property
    def start_id(self) -> int | None:
        """Id that opens a causal sequence: bos, else cls, else None."""
        return self.bos_id if self.bos_id is not None else self.cls_id

    @property
    def end_id(self) -> int | None:
        """Id that closes a response: eos, else sep, else None."""
        return self.eos_id if self.eos_id is not None else self.sep_id

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (padding and truncation disabled)."""
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = True,
               max_length: int | None = None) -> list[int]:
        """Token ids of one text.

        Args:
            text: the text.
            add_special_tokens: apply the checkpoint's post-processor template (BERT: [CLS] x
                [SEP]; Llama: <s> x).
            max_length: truncate to this many ids, special tokens included (they are kept).

        Returns:
            The ids.
        """
        return self.encode_batch([text], add_special_tokens, max_length)[0]

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True,
                     max_length: int | None = None) -> list[list[int]]:
        """Token ids of many texts (encoded in parallel by `tokenizers`); see `encode`."""
        if max_length is not None:
            n_special = self._tok.num_special_tokens_to_add(False) if add_special_tokens else 0
            if max_length <= n_special:
                raise DataError(f"max_length={max_length} leaves no room for text next to the "
                                f"{n_special} special tokens; use a larger seq_len")
            self._tok.enable_truncation(max_length)
        try:
            encodings = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        finally:
            self._tok.no_truncation()
        return [e.ids for e in encodings]

    def encode_padded(self, texts: Sequence[str], seq_len: int,
                      add_special_tokens: bool = True) -> dict[str, np.ndarray]:
        """Encodes, truncates and right-pads texts to one fixed shape.

        Returns:
            `input_ids` int32 [B, T] (pad_id after the text) and `attention_mask` int32 [B, T].
        """
        ids = self.encode_batch(texts, add_special_tokens, max_length=seq_len)
        out = np.full((len(ids), seq_len), self.pad_id, np.int32)
        mask = np.zeros((len(ids), seq_len), np.int32)
        for i, row in enumerate(ids):
            out[i, :len(row)] = row
            mask[i, :len(row)] = 1
        return {"input_ids": out, "attention_mask": mask}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or None."""
        return self._tok.token_to_id(token)


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); fix or remove it") from e
    return value if isinstance(value, dict) else {}


def _content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _template_specials(tok: tokenizers.Tokenizer) -> tuple[str | None, str | None]:
    """(first, last) special token of the post-processor's single-sequence template."""
    try:
        post = json.loads(tok.to_str()).get("post_processor") or {}
    except (ValueError, TypeError):
        return None, None
    processors = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for proc in processors:
        if proc.get("type") == "TemplateProcessing":
            single = proc.get("single", [])
            first = single[0].get("SpecialToken", {}).get("id") if single else None
            last = single[-1].get("SpecialToken", {}).get("id") if len(single) > 1 else None
            return first, last
        if proc.get("type") == "BertProcessing":
            return proc.get("cls", [None])[0], proc.get("sep", [None])[0]
    return None, None


def load_tokenizer(path: str, bos_token: str | None = None, eos_token: str | None = None,
                   pad_token: str | None = None) -> Tokenizer:
    """Loads the tokenizer of a checkpoint.

    Args:
        path: a checkpoint directory holding tokenizer.json (and optionally tokenizer_config.json,
            special_tokens_map.json, config.json), or the path of a tokenizer.json file, or a
            llama.cpp ``.gguf`` file (or a directory holding one and no config.json), whose
            tokenizer is rebuilt from its metadata (`qlora_jax.data.gguf`).
        bos_token: overrides the beginning-of-sequence token.
        eos_token: overrides the end-of-sequence token.
        pad_token: overrides the padding token.

    Returns:
        The wrapped tokenizer.

    Raises:
        DataError: no tokenizer.json there, or a named token is not in the vocabulary.
    """
    if is_gguf(path) and not os.path.isfile(os.path.join(path, "tokenizer.json")):
        from qlora_jax.data.gguf import load_gguf_tokenizer
        return load_gguf_tokenizer(path, bos_token, eos_token, pad_token)
    if os.path.isdir(path):
        directory, file = path, os.path.join(path, "tokenizer.json")
    else:
        directory, file = os.path.dirname(path) or ".", path
    if not os.path.isfile(file):
        raise DataError(f"no tokenizer.json at {file}: give a checkpoint directory that holds "
                        "one (slow sentencepiece/vocab-only tokenizers are not supported)")
    try:
        tok = tokenizers.Tokenizer.from_file(file)
    except Exception as e:  # the Rust side raises a bare Exception
        raise DataError(f"cannot read tokenizer {file}: {e}") from e
    tok_config = _read_json(os.path.join(directory, "tokenizer_config.json"))
    special_map = _read_json(os.path.join(directory, "special_tokens_map.json"))
    model_config = _read_json(os.path.join(directory, "config.json"))

    explicit = {"bos": bos_token, "eos": eos_token, "pad": pad_token}
    first, last = _template_specials(tok)
    special: dict[str, int | None] = {}
    for role in _ROLES:
        token = explicit.get(role)
        if token is not None:
            if tok.token_to_id(token) is None:
                raise DataError(f"{role}_token {token!r} is not in the vocabulary of {file}")
            special[role] = tok.token_to_id(token)
            continue
        ident = None
        for source in (tok_config, special_map):
            name = _content(source.get(f"{role}_token"))
            if name is not None and tok.token_to_id(name) is not None:
                ident = tok.token_to_id(name)
                break
        if ident is None:
            value = model_config.get(f"{role}_token_id")
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int) and 0 <= value < tok.get_vocab_size(True):
                ident = value
        if ident is None and role in ("bos", "cls") and first is not None:
            # A template that opens with a special token: that token is bos (or cls with a sep).
            is_bert = last is not None and first != last and "CLS" in first.upper()
            if (role == "cls") == is_bert:
                ident = tok.token_to_id(first)
        if ident is None and role in ("eos", "sep") and last is not None:
            is_bert = "SEP" in last.upper()
            if (role == "sep") == is_bert:
                ident = tok.token_to_id(last)
        if ident is None:
            for name in _WELL_KNOWN[role]:
                if tok.token_to_id(name) is not None:
                    ident = tok.token_to_id(name)
                    break
        special[role] = ident
    max_len = tok_config.get("model_max_length")
    max_len = max_len if isinstance(max_len, int) and 0 < max_len < 10**7 else None
    named = {}
    for role in _ROLES + ("mask",):
        name = explicit.get(role) or _content(tok_config.get(f"{role}_token")) or _content(
            special_map.get(f"{role}_token"))
        if name is not None:
            named[f"{role}_token"] = name
    return Tokenizer(tok, special, max_len, _chat_template(directory, tok_config), named)


def _chat_template(directory: str, tok_config: dict[str, Any]) -> str | None:
    """The checkpoint's chat template (see the module doc), or None."""
    jinja_file = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = _read_json(os.path.join(directory, "chat_template.json")).get("chat_template")
    if template is None:
        template = tok_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        if template is None and named:
            raise DataError(f"the tokenizer_config.json in {directory} has chat templates "
                            f"{sorted(map(str, named))} but none named 'default'")
    return template if isinstance(template, str) and template else None
