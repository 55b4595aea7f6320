"""A GGUF tokenizer's metadata <-> a ``tokenizers.Tokenizer``.

llama.cpp stores no tokenizer.json: a GGUF lists ``tokenizer.ggml.tokens`` (ids in order), their
``token_type`` (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte), ``merges`` (BPE),
``scores`` (SentencePiece), the model (``"gpt2"``: byte-level BPE; ``"llama"``: SentencePiece
BPE with byte fallback) and ``pre``, the name of the regex that splits text before BPE. These
are rebuilt into the `tokenizers` objects that produce the same ids as llama.cpp (and as
transformers' GGUF loader), and written back out from a `tokenizers.Tokenizer`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by `tokenizer.ggml.pre`.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
#: `tokenizer.ggml.pre` -> (regex, digits split one by one before it).
PRE_TOKENIZERS: dict[str, tuple[str, bool]] = {
    "default": (_GPT2, False), "gpt2": (_GPT2, False), "gpt-2": (_GPT2, False),
    "phi-2": (_GPT2, False),
    "smollm": (_GPT2, True), "starcoder": (_GPT2, True), "refact": (_GPT2, True),
    "llama3": (_LLAMA3, False), "llama-v3": (_LLAMA3, False), "llama-bpe": (_LLAMA3, False),
    "smaug-bpe": (_LLAMA3, False), "falcon3": (_LLAMA3, False), "dbrx": (_LLAMA3, False),
    "qwen2": (_QWEN2, False), "deepseek-r1-qwen": (_QWEN2, False),
}


class VocabError(ValueError):
    """A tokenizer that cannot be read from, or written to, GGUF metadata."""


def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE spelling)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + \
        list(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _bpe_merges_from_scores(tokens: Sequence[str], scores: Sequence[float]
                            ) -> list[tuple[str, str]]:
    """SentencePiece BPE merges implied by a vocabulary: every split of a token into two tokens,
    best-scoring result first (ties: shorter left piece, then shorter right, then lower ids)."""
    ids = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score in zip(tokens, scores):
        pairs = [(token[:k], token[k:]) for k in range(1, len(token))
                 if token[:k] in ids and token[k:] in ids]
        pairs.sort(key=lambda p: (ids[p[0]], ids[p[1]]))
        found.extend((float(score), left, right) for left, right in pairs)
    order = sorted(range(len(found)), key=lambda i: (-found[i][0], -len(found[i][1]),
                                                     -len(found[i][2]), i))
    return [(found[i][1], found[i][2]) for i in order]


def _merges(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    out = []
    for m in meta["tokenizer.ggml.merges"]:
        left, sep, right = m.partition(" ")
        if not sep:
            raise VocabError(f"malformed merge {m!r} in tokenizer.ggml.merges")
        out.append((left, right))
    return out


def tokenizer_from_metadata(meta: Mapping[str, Any], file: str = "GGUF") -> Tokenizer:
    """The `tokenizers.Tokenizer` a GGUF's ``tokenizer.ggml.*`` metadata describes.

    Raises:
      VocabError: no vocabulary, an unsupported tokenizer model or pre-tokenizer (named).
    """
    kind = meta.get("tokenizer.ggml.model")
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise VocabError(f"{file}: no tokenizer.ggml.tokens; this GGUF carries no tokenizer")
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if kind == "gpt2":
        tok = _byte_level(meta, tokens, file)
    elif kind == "llama":
        tok = _sentencepiece(meta, tokens)
    else:
        raise VocabError(f"{file}: tokenizer.ggml.model {kind!r} is not supported; qlora_jax "
                         "reads 'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE)")
    alphabet = set(byte_alphabet().values()) if kind == "gpt2" else None
    vocab = tok.get_vocab()
    special = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types)
               if ty == CONTROL and (alphabet is None or set(t) <= alphabet)]
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    tok.post_processor = _template(meta, tokens)
    return tok


def _byte_level(meta: Mapping[str, Any], tokens: list[str], file: str) -> Tokenizer:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise VocabError(f"{file}: tokenizer.ggml.pre {pre!r} is not supported; known: "
                         f"{sorted(PRE_TOKENIZERS)}")
    spell = byte_alphabet()
    alphabet = set(spell.values())
    vocab = {}
    for i, t in enumerate(tokens):
        key = t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8"))
        vocab[key] = i
    merges = _merges(meta) if "tokenizer.ggml.merges" in meta else []
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    regex, digits = PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if regex == _GPT2:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(meta: Mapping[str, Any], tokens: list[str]) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = _merges(meta)
    else:
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        merges = _bpe_merges_from_scores(tokens, scores)
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _template(meta: Mapping[str, Any], tokens: list[str]) -> Any:
    """The post-processor: bos before / eos after a sequence when the file asks for them."""
    default_bos = meta.get("tokenizer.ggml.model") == "llama"
    pieces = []
    specials = []
    for flag, key, default in (("add_bos_token", "bos_token_id", default_bos),
                               ("add_eos_token", "eos_token_id", False)):
        ident = meta.get(f"tokenizer.ggml.{key}")
        on = bool(meta.get(f"tokenizer.ggml.{flag}", default)) and ident is not None
        pieces.append(tokens[ident] if on else None)
        if on:
            specials.append((tokens[ident], int(ident)))
    bos, eos = pieces
    single = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
    pair = single + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
    return processors.TemplateProcessing(single=single, pair=pair,
                                         special_tokens=list(dict.fromkeys(specials)))


def special_ids(meta: Mapping[str, Any]) -> dict[str, Optional[int]]:
    """bos/eos/pad/unk ids named by the metadata (None where absent)."""
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id",
            "unk": "unknown_token_id"}
    out = {}
    for role, key in keys.items():
        value = meta.get(f"tokenizer.ggml.{key}")
        out[role] = int(value) if value is not None else None
    return out


def _pre_name(pre: Any) -> str:
    """The `tokenizer.ggml.pre` name of a byte-level tokenizer.json pre-tokenizer."""
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and \
            steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        for name in ("llama-bpe", "qwen2"):
            if regex == PRE_TOKENIZERS[name][0]:
                return name
    raise VocabError(f"the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} has no GGUF "
                     f"equivalent qlora_jax knows (byte-level GPT-2, SmolLM, Llama-3, Qwen2)")


def metadata_from_tokenizer(tok: Tokenizer, special: Mapping[str, Optional[int]],
                            chat_template: Optional[str], vocab_size: int) -> dict[str, Any]:
    """GGUF ``tokenizer.*`` metadata for a byte-level BPE or SentencePiece-BPE tokenizer.

    Args:
      tok: the tokenizer (a BPE model: byte-level, or Metaspace with byte fallback).
      special: ``bos``/``eos``/``pad``/``unk`` ids (None where absent).
      chat_template: written as ``tokenizer.chat_template`` when given.
      vocab_size: the model's embedding rows; the token list is padded to it (``[PAD<i>]``).

    Raises:
      VocabError: a tokenizer GGUF cannot express, or more tokens than embedding rows.
    """
    spec = json.loads(tok.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise VocabError(f"a {model.get('type')} tokenizer cannot be written to GGUF; "
                         "byte-level BPE and SentencePiece BPE can")
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    n = max(by_id) + 1 if by_id else 0
    if n > vocab_size:
        raise VocabError(f"the tokenizer has {n} tokens but the model only {vocab_size} "
                         "embedding rows")
    missing = [i for i in range(n) if i not in by_id]
    if missing:
        raise VocabError(f"the tokenizer has no token for ids {missing[:5]}")
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens = [by_id[i] for i in range(n)] + [f"[PAD{i}]" for i in range(n, vocab_size)]
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or \
        (spec.get("decoder") or {}).get("type") == "ByteLevel"
    types = []
    for i, t in enumerate(tokens):
        if i >= n:
            types.append(UNUSED)
        elif i in added:
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        elif i == special.get("unk"):
            types.append(UNKNOWN)
        elif not byte_level and re.fullmatch(r"<0x[0-9A-F]{2}>", t):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    meta: dict[str, Any] = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                            "tokenizer.ggml.merges": merges}
    if byte_level:
        meta["tokenizer.ggml.model"] = "gpt2"
        meta["tokenizer.ggml.pre"] = _pre_name(spec.get("pre_tokenizer") or {})
    else:
        pre = spec.get("pre_tokenizer") or {}
        if pre.get("type") != "Metaspace" or not model.get("byte_fallback"):
            raise VocabError("a BPE tokenizer that is neither byte-level nor SentencePiece-style "
                             "(Metaspace + byte fallback) cannot be written to GGUF")
        meta["tokenizer.ggml.model"] = "llama"
        meta["tokenizer.ggml.add_space_prefix"] = pre.get("prepend_scheme", "always") != "never"
        rank = {"".join(m.split(" ", 1)): r for r, m in reversed(list(enumerate(merges)))}
        meta["tokenizer.ggml.scores"] = [-float(rank[t] + 1) if t in rank else 0.0
                                         for t in tokens]
    names = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id",
             "unk": "unknown_token_id"}
    for role, key in names.items():
        if special.get(role) is not None:
            meta[f"tokenizer.ggml.{key}"] = int(special[role])
    first, last = _template_edges(spec)
    for role, flag, edge in (("bos", "add_bos_token", first), ("eos", "add_eos_token", last)):
        ident = special.get(role)
        meta[f"tokenizer.ggml.{flag}"] = ident is not None and edge == by_id.get(ident)
    if chat_template:
        meta["tokenizer.chat_template"] = chat_template
    return meta


def _template_edges(spec: Mapping[str, Any]) -> tuple[Optional[str], Optional[str]]:
    """The special tokens the post-processor puts before / after a single sequence."""
    post = spec.get("post_processor") or {}
    procs = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for p in procs:
        if p.get("type") == "TemplateProcessing":
            single = p.get("single", [])
            ids = [(x.get("SpecialToken") or {}).get("id") for x in single]
            return (ids[0] if ids else None), (ids[-1] if len(ids) > 1 else None)
    return None, None


def typed_entries(meta: Mapping[str, Any]) -> list[tuple[str, Any, Any, Any]]:
    """``(key, value, GGUFValueType, sub_type)`` for ``tokenizer.*`` metadata, typed as
    llama.cpp writes them (ids uint32, token types int32, scores float32, flags bool)."""
    import gguf
    T = gguf.GGUFValueType
    out = []
    for key, value in meta.items():
        if isinstance(value, list):
            if not value:
                continue  # GGUF has no empty arrays
            sub = T.INT32 if key.endswith("token_type") else \
                T.FLOAT32 if key.endswith("scores") else T.STRING
            out.append((key, value, T.ARRAY, sub))
        elif isinstance(value, bool):
            out.append((key, value, T.BOOL, None))
        elif isinstance(value, int):
            out.append((key, value, T.UINT32, None))
        elif isinstance(value, float):
            out.append((key, value, T.FLOAT32, None))
        else:
            out.append((key, str(value), T.STRING, None))
    return out
