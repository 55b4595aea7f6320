"""``save_pretrained(..., format="gguf")``: a merged Llama-family model as one llama.cpp GGUF file.

Linear weights and the embedding are written in ``gguf_type`` (F16 by default, or Q8_0, BF16,
F32; a row whose length Q8_0's 32-value blocks do not divide falls back to F16), norms and biases
in F32, q/k rows in llama.cpp's permuted order, tensors produced and written one at a time. The
tokenizer travels as ``tokenizer=``: a tokenizer read from a GGUF (``qj.data.load_tokenizer``)
is written back with its metadata unchanged; one read from a Hugging Face directory is converted
(byte-level BPE: GPT-2, SmolLM, Llama-3 and Qwen2 pre-tokenizers; SentencePiece BPE); a path to
a ``.gguf`` copies that file's tokenizer. The file appears only when complete and is never
overwritten.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from qlora_jax.formats.gguf import (find_gguf, gguf_name, is_gguf, llama3_factors, open_reader,
                                    permute_qk, read_metadata, write_gguf)
from qlora_jax.formats.gguf_vocab import VocabError, metadata_from_tokenizer, typed_entries

#: ``gguf_type`` -> ggml type of the 2-D tensors.
GGUF_TYPES = {"f16": "F16", "q8_0": "Q8_0", "bf16": "BF16", "f32": "F32"}
_FILE_TYPE = {"F32": 0, "F16": 1, "Q8_0": 7, "BF16": 32}  # llama.cpp's LLAMA_FTYPE_*
_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


def check_args(model: Any, out: str, tokenizer: Any, gguf_type: str,
               keep_quantized: bool) -> dict[str, Any]:
    """Validates a GGUF save before any work; returns the tokenizer metadata to write.

    Raises:
      ValueError: a non-Llama model, unsupported rope scaling, unknown ``gguf_type``, a path not
        ending in ``.gguf``, ``keep_quantized``, a tokenizer GGUF cannot hold.
      FileExistsError: ``out`` exists.
      TypeError: no or an unusable ``tokenizer``.
    """
    out = os.fspath(out)
    family = getattr(model, "family", "")
    model_type = getattr(model.config, "model_type", "")
    if family != "llama" or model_type not in _ARCH:
        raise ValueError(f"format='gguf' writes Llama-family models ({sorted(_ARCH)}); "
                         f"this model is {model_type or type(model).__name__!r}")
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type={gguf_type!r} is not one of {sorted(GGUF_TYPES)}")
    if keep_quantized:
        raise ValueError("keep_quantized=True writes bitsandbytes 4-bit weights, which GGUF "
                         "cannot hold; use gguf_type='q8_0' (or 'f16') with format='gguf'")
    if not out.endswith(".gguf"):
        raise ValueError(f"format='gguf' writes one file: give a path ending in .gguf, not {out!r}")
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; remove it or choose another path (a GGUF is "
                              "never overwritten)")
    _rope(model.config)
    window = getattr(model.config, "sliding_window", None)
    if window is not None and window < model.config.max_position_embeddings:
        warnings.warn(f"sliding_window={window} is not stored in GGUF: llama.cpp attends over the "
                      f"whole context, so outputs differ beyond {window} tokens", stacklevel=4)
    return tokenizer_metadata(tokenizer, model.config.vocab_size)


def tokenizer_metadata(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """``tokenizer.*`` metadata from a GGUF path, a GGUF-read tokenizer or a converted one."""
    if tokenizer is None:
        raise TypeError("format='gguf' needs the model's tokenizer: pass tokenizer="
                        "qj.data.load_tokenizer(<the checkpoint you loaded>) (or the path of "
                        "the source .gguf)")
    try:
        if isinstance(tokenizer, (str, os.PathLike)):
            if not is_gguf(os.fspath(tokenizer)):
                raise TypeError(f"tokenizer={os.fspath(tokenizer)!r}: a path must name a .gguf "
                                "file; for a Hugging Face directory pass "
                                "qj.data.load_tokenizer(directory)")
            reader = open_reader(find_gguf(os.fspath(tokenizer)))
            meta = read_metadata(reader, [k for k in reader.fields
                                          if k.startswith("tokenizer.")])
        elif isinstance(getattr(tokenizer, "metadata", None), dict) and \
                "tokenizer.ggml.tokens" in tokenizer.metadata:
            meta = dict(tokenizer.metadata)
            if getattr(tokenizer, "chat_template", None):
                meta["tokenizer.chat_template"] = tokenizer.chat_template
        elif hasattr(tokenizer, "backend"):
            special = {r: getattr(tokenizer, f"{r}_id", None) for r in ("bos", "eos", "pad", "unk")}
            meta = metadata_from_tokenizer(tokenizer.backend, special,
                                           getattr(tokenizer, "chat_template", None), vocab_size)
        else:
            raise TypeError(f"tokenizer must be a qj.data.Tokenizer or a .gguf path, not "
                            f"{type(tokenizer).__name__}")
    except VocabError as e:
        raise ValueError(f"format='gguf': {e}") from e
    tokens = meta["tokenizer.ggml.tokens"]
    if len(tokens) > vocab_size:
        raise ValueError(f"format='gguf': the tokenizer has {len(tokens)} tokens but the model "
                         f"only {vocab_size} embedding rows")
    if len(tokens) < vocab_size:  # llama.cpp wants one token an embedding row
        pad = vocab_size - len(tokens)
        meta["tokenizer.ggml.tokens"] = tokens + [f"[PAD{i}]" for i in range(len(tokens),
                                                                           vocab_size)]
        for key, fill in (("tokenizer.ggml.token_type", 5), ("tokenizer.ggml.scores", 0.0)):
            if key in meta:
                meta[key] = list(meta[key]) + [fill] * pad
    return meta


def _rope(config: Any) -> dict[str, Any]:
    scaling = dict(config.rope_scaling)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear", "yarn", "llama3"):
        raise ValueError(f"rope scaling {kind!r} has no GGUF form qlora_jax writes (linear, "
                         "yarn and llama3 do)")
    return scaling


def _model_metadata(model: Any, arch: str, ggml_type: str) -> list[tuple[str, Any, Any, Any]]:
    import gguf
    T = gguf.GGUFValueType
    c = model.config
    u32 = lambda k, v: (f"{arch}.{k}", int(v), T.UINT32, None)  # noqa: E731
    f32 = lambda k, v: (f"{arch}.{k}", float(v), T.FLOAT32, None)  # noqa: E731
    out = [("general.name", "qlora_jax export", T.STRING, None),
           ("general.file_type", _FILE_TYPE[ggml_type], T.UINT32, None),
           u32("context_length", c.max_position_embeddings),
           u32("embedding_length", c.hidden_size), u32("feed_forward_length", c.intermediate_size),
           u32("block_count", c.num_hidden_layers), u32("attention.head_count",
                                                         c.num_attention_heads),
           u32("attention.head_count_kv", c.num_key_value_heads),
           u32("rope.dimension_count", c.head_dim), u32("vocab_size", c.vocab_size),
           f32("rope.freq_base", c.rope_theta),
           f32("attention.layer_norm_rms_epsilon", c.rms_norm_eps)]
    if c.head_dim * c.num_attention_heads != c.hidden_size:
        out += [u32("attention.key_length", c.head_dim), u32("attention.value_length", c.head_dim)]
    if ggml_type == "Q8_0":
        out.append(("general.quantization_version", gguf.GGML_QUANT_VERSION, T.UINT32, None))
    scaling = _rope(c)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("linear", "yarn"):
        out += [(f"{arch}.rope.scaling.type", kind, T.STRING, None),
                f32("rope.scaling.factor", scaling["factor"])]
        if "original_max_position_embeddings" in scaling:
            out.append(u32("rope.scaling.original_context_length",
                           scaling["original_max_position_embeddings"]))
    return out


def _encode(a: np.ndarray, type_name: str) -> np.ndarray:
    import gguf
    if type_name == "F32":
        return np.ascontiguousarray(a, np.float32)
    if type_name == "F16":
        return np.ascontiguousarray(a, np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(a, np.float32),
                                gguf.GGMLQuantizationType[type_name])


def write_gguf_model(model: Any, params: dict, out: str, tok_meta: dict[str, Any],
                     gguf_type: str = "f16") -> str:
    """Writes a plain (merged, unboxed) Llama-family model and its tokenizer as ``out``."""
    from qlora_jax.checkpoints.hf_save import _tensor_specs
    out = os.path.abspath(os.fspath(out))
    c = model.config
    arch = _ARCH[c.model_type]
    ggml_type = GGUF_TYPES[gguf_type]
    heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}
    tensors = []
    for key, _, shape, produce in _tensor_specs(model, params, jnp.float32, False):
        try:
            name = gguf_name(key)
        except KeyError as e:
            raise ValueError(f"format='gguf': tensor {key!r} has no llama.cpp name") from e
        if len(shape) == 1:
            kind = "F32"
        elif ggml_type in ("Q8_0",) and shape[-1] % 32:
            kind = "F16"
        else:
            kind = ggml_type
        proj = key.split(".")[-2]
        permute = heads.get(proj) if arch == "llama" else None

        def make(produce=produce, kind=kind, permute=permute) -> np.ndarray:
            a = np.asarray(produce(), np.float32)
            if permute:
                a = permute_qk(a, permute)
            return _encode(a, kind)
        tensors.append((name, tuple(shape), kind, make))
    scaling = _rope(c)
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        freqs = llama3_factors(c.head_dim, c.rope_theta, scaling["factor"],
                               scaling["low_freq_factor"], scaling["high_freq_factor"],
                               scaling["original_max_position_embeddings"])
        tensors.append(("rope_freqs.weight", freqs.shape, "F32", lambda f=freqs: f))
    metadata = _model_metadata(model, arch, ggml_type) + typed_entries(tok_meta)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        write_gguf(tmp, arch, metadata, tensors)
        if os.path.exists(out):
            raise FileExistsError(f"{out} appeared while writing; the GGUF was not saved")
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return out


def save_gguf(model: Any, params: dict, out: str, merge_lora: bool = True,
              tokenizer: Optional[Any] = None, gguf_type: str = "f16",
              keep_quantized: bool = False) -> str:
    """``save_pretrained(..., format="gguf")``; see the module docstring."""
    from qlora_jax.checkpoints.hf_save import plain_model
    tok_meta = check_args(model, out, tokenizer, gguf_type, keep_quantized)
    model, params = plain_model(model, params, merge_lora)
    return write_gguf_model(model, params, out, tok_meta, gguf_type)
