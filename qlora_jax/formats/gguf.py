"""llama.cpp's GGUF container: metadata, Hugging Face names, dequantized tensors, writing.

A GGUF file holds key/value metadata (``general.architecture``, ``llama.block_count``,
``tokenizer.ggml.tokens``, ...) and tensors named llama.cpp's way (``token_embd.weight``,
``blk.3.attn_q.weight``, ...), each in one of ggml's types (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
K-quants, ...). This module:

- finds the file (`find_gguf`), reads the metadata into Python values (`read_metadata`),
- turns it into a Hugging Face ``config.json`` dict (`hf_config`),
- exposes the tensors under Hugging Face names, dequantized to float32 one at a time
  (`GGUFTensors`, a Mapping like ``safetensors_io.CheckpointReader``), with llama.cpp's q/k row
  permutation undone (`unpermute_qk`; llama.cpp's converter applies `permute_qk` to Llama's
  q_proj and k_proj so that its rotary kernel can rotate adjacent pairs),
- writes a GGUF from metadata and lazily produced tensors (`write_gguf`).

Dequantization and quantization are the ``gguf`` package's (``gguf.quants``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple, Optional

import numpy as np

#: GGUF architectures read as Llama-family models: architecture -> HF model_type.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
#: Architectures whose q/k rows llama.cpp's converter permutes (Qwen2's NeoX rope needs none).
PERMUTED = ("llama",)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_HF_TO_GGUF = {v: k for k, v in _GLOBAL_NAMES.items()}
_HF_TO_GGUF_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
#: GGUF tensors that carry no weight of ours (handled through the config or ignored).
_IGNORED = ("rope_freqs.weight",)


class GGUFError(ValueError):
    """A GGUF file that cannot be read as a supported model (the message names file and cause)."""


def is_gguf(path: str) -> bool:
    """True for a ``*.gguf`` path or a directory holding a ``.gguf`` file and no config.json."""
    path = os.fspath(path)
    if path.endswith(".gguf") and not os.path.isdir(path):
        return True  # a missing file is reported as such by find_gguf
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        return any(n.endswith(".gguf") for n in os.listdir(path))
    return False


def find_gguf(path: str) -> str:
    """The GGUF file at ``path`` (a ``.gguf`` file, or a directory holding exactly one).

    Raises:
      FileNotFoundError: nothing there, or a directory without a ``.gguf`` file.
      GGUFError: a directory with several ``.gguf`` files (name the one to read).
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such GGUF file or directory: {path!r}")
    names = sorted(n for n in os.listdir(path) if n.endswith(".gguf"))
    if not names:
        raise FileNotFoundError(f"{path!r} holds no .gguf file")
    if len(names) > 1:
        raise GGUFError(f"{path!r} holds {len(names)} .gguf files ({', '.join(names[:4])}); "
                        "pass the path of the one to read")
    return os.path.join(path, names[0])


class TensorInfo(NamedTuple):
    """One tensor's entry in a GGUF header (``shape`` in ggml order: innermost dimension first)."""

    name: str
    shape: tuple[int, ...]
    tensor_type: Any  # gguf.GGMLQuantizationType
    n_bytes: int
    data_offset: int  # from the start of the file


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}


class GGUFFile:
    """A GGUF file's header: metadata as Python values and the tensor table (no tensor read).

    A direct parse of the little-endian layout (magic, version, counts, key/values, tensor
    infos, aligned data), much faster than ``gguf.GGUFReader`` on large vocabularies.

    Attributes:
      path: the file; fields: metadata key -> value (lists for arrays); tensors: `TensorInfo`s.
    """

    def __init__(self, path: str):
        import mmap
        import struct

        import gguf
        self.path = path
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            pos = 0

            def take(fmt: str) -> Any:
                nonlocal pos
                value = struct.unpack_from(fmt, mm, pos)[0]
                pos += struct.calcsize(fmt)
                return value

            def string() -> str:
                nonlocal pos
                n = take("<Q")
                pos += n
                return mm[pos - n:pos].decode("utf-8", errors="replace")

            def value(vtype: int) -> Any:
                nonlocal pos
                if vtype in _SCALARS:
                    return take(_SCALARS[vtype])
                if vtype == 8:
                    return string()
                if vtype == 9:
                    sub, n = take("<I"), take("<Q")
                    if sub in _NUMPY:
                        arr = np.frombuffer(mm, _NUMPY[sub], count=n, offset=pos)
                        pos += arr.nbytes
                        return arr.tolist()
                    return [value(sub) for _ in range(n)]
                raise ValueError(f"unknown value type {vtype}")

            if mm[:4] != b"GGUF":
                raise ValueError("no GGUF magic")
            pos = 4
            version = take("<I")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} (big-endian or unknown) is not read")
            n_tensors, n_kv = take("<Q"), take("<Q")
            self.fields: dict[str, Any] = {}
            for _ in range(n_kv):
                key = string()
                self.fields[key] = value(take("<I"))
            infos = []
            for _ in range(n_tensors):
                name = string()
                dims = tuple(take("<Q") for _ in range(take("<I")))
                infos.append((name, dims, take("<I"), take("<Q")))
            align = int(self.fields.get("general.alignment", 32))
            start = pos + (-pos % align)
            size = len(mm)
        self.tensors: list[TensorInfo] = []
        for name, dims, code, offset in infos:
            qtype = gguf.GGMLQuantizationType(code)
            block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
            n_bytes = int(np.prod(dims, dtype=np.int64)) // block * nbytes
            self.tensors.append(TensorInfo(name, dims, qtype, n_bytes, start + offset))
        self.size = size

    def read(self, t: TensorInfo) -> np.ndarray:
        """One tensor's stored data (F32/F16 as floats, other types as uint8 blocks), read with a
        plain file read (a memory map's pages would stay resident after conversion)."""
        import gguf
        raw = np.fromfile(self.path, np.uint8, count=t.n_bytes, offset=t.data_offset)
        if raw.size != t.n_bytes:
            raise GGUFError(f"{self.path}: tensor {t.name!r} runs past the end of the file "
                            "(truncated download?)")
        dims = tuple(reversed(t.shape))
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            return raw.view(np.float32).reshape(dims)
        if t.tensor_type == gguf.GGMLQuantizationType.F16:
            return raw.view(np.float16).reshape(dims)
        return raw.reshape(gguf.quants.quant_shape_to_byte_shape(dims, t.tensor_type))


def open_reader(path: str) -> GGUFFile:
    """The header of the GGUF file at ``path``, with a clear error if it is not one."""
    file = find_gguf(path)
    try:
        return GGUFFile(file)
    except Exception as e:  # struct.error, ValueError, UnicodeDecodeError on bad bytes
        raise GGUFError(f"{file}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def read_metadata(reader: GGUFFile, keys: Optional[Iterable[str]] = None) -> dict[str, Any]:
    """Metadata as Python values (str, int, float, bool, lists); all keys or only ``keys``."""
    if keys is None:
        return dict(reader.fields)
    return {k: reader.fields[k] for k in keys if k in reader.fields}


def architecture(reader: Any, file: str = "") -> str:
    """``general.architecture``, checked against the supported ones."""
    arch = read_metadata(reader, ["general.architecture"]).get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{file or 'GGUF'}: architecture {arch!r} is not supported; qlora_jax "
                        f"reads GGUF architectures {sorted(ARCHITECTURES)}")
    return arch


def _rope_scaling(meta: Mapping[str, Any], arch: str, reader: Any, file: str) -> dict[str, Any]:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        return _llama3_scaling(np.asarray(reader.read(freqs), np.float32).reshape(-1), meta,
                               arch, file)
    if kind in (None, "none") or not factor:
        return {}
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        out = {"rope_type": "yarn", "factor": float(factor)}
        orig = meta.get(f"{arch}.rope.scaling.original_context_length")
        if orig:
            out["original_max_position_embeddings"] = int(orig)
        return out
    raise GGUFError(f"{file}: rope scaling type {kind!r} is not supported (linear, yarn, "
                    "llama3 through rope_freqs are)")


def llama3_factors(head_dim: int, theta: float, factor: float, low: float, high: float,
                   original: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1 rope scaling, as llama.cpp stores in ``rope_freqs``."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < original / high, 1.0,
                   np.where(wavelen > original / low, factor, mid))
    return out.astype(np.float32)


def _llama3_scaling(freqs: np.ndarray, meta: Mapping[str, Any], arch: str, file: str
                    ) -> dict[str, Any]:
    """Llama 3.1 rope parameters recovered from ``rope_freqs.weight`` (checked by recomputing)."""
    head_dim = 2 * freqs.size
    theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    factor = float(freqs.max())
    # The factors fix the rope completely: any parameters that reproduce them are equivalent.
    for high in (4.0, 2.0, 8.0):
        for original in [8192] + [2 ** k for k in range(4, 18) if k != 13]:
            want = llama3_factors(head_dim, theta, factor, 1.0, high, original)
            if np.allclose(want, freqs, rtol=1e-5, atol=1e-6):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                        "high_freq_factor": high, "original_max_position_embeddings": original}
    raise GGUFError(f"{file}: rope_freqs.weight holds per-frequency rope factors that match no "
                    "Llama 3 scaling (low_freq_factor 1, high_freq_factor 2/4/8, original "
                    "context a power of two); this GGUF is not supported")


def hf_config(reader: Any, file: str = "") -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for the model a GGUF describes.

    Raises:
      GGUFError: an unsupported architecture or rope scaling, or missing size fields.
    """
    arch = architecture(reader, file)
    meta = read_metadata(reader, [k for k in reader.fields
                                  if not k.startswith("tokenizer.ggml.") or k.endswith("_id")])
    a = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    missing = [k for k in ("embedding_length", "feed_forward_length", "block_count",
                           "attention.head_count") if a(k) is None]
    if missing:
        raise GGUFError(f"{file}: metadata lacks {[f'{arch}.{k}' for k in missing]}")
    names = {t.name for t in reader.tensors}
    heads = int(a("attention.head_count"))
    hidden = int(a("embedding_length"))
    vocab = a("vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        vocab = len(tokens) if tokens is not None else (int(embd.shape[1]) if embd else None)
    if vocab is None:
        raise GGUFError(f"{file}: no vocabulary size ({arch}.vocab_size, tokens or token_embd)")
    head_dim = a("attention.key_length") or a("rope.dimension_count") or hidden // heads
    cfg: dict[str, Any] = {
        "model_type": ARCHITECTURES[arch],
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]],
        "vocab_size": int(vocab), "hidden_size": hidden,
        "intermediate_size": int(a("feed_forward_length")),
        "num_hidden_layers": int(a("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(a("attention.head_count_kv", heads)),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(a("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(a("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
    }
    if arch == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
    else:
        cfg["use_sliding_window"] = False
    scaling = _rope_scaling(meta, arch, reader, file)
    if scaling:
        cfg["rope_scaling"] = scaling
    for role, key in (("bos", "bos_token_id"), ("pad", "padding_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            cfg[f"{role}_token_id"] = int(value)
    # generate stops at every end id: eos, and end-of-turn / end-of-message ids when named.
    ends = [int(meta[f"tokenizer.ggml.{k}"]) for k in ("eos_token_id", "eot_token_id",
                                                         "eom_token_id")
            if meta.get(f"tokenizer.ggml.{k}") is not None]
    ends = list(dict.fromkeys(ends))
    if ends:
        cfg["eos_token_id"] = ends[0] if len(ends) == 1 else ends
    return cfg


def hf_name(gguf_name: str) -> Optional[str]:
    """The Hugging Face key of a GGUF tensor name (None for one without a counterpart)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLK.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def gguf_name(hf_key: str) -> str:
    """The GGUF tensor name of a Hugging Face key (KeyError for one GGUF has no name for)."""
    if hf_key in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf_key]
    m = _HF_LAYER.match(hf_key)
    if m and m.group(2) in _HF_TO_GGUF_LAYER:
        return f"blk.{m.group(1)}.{_HF_TO_GGUF_LAYER[m.group(2)]}"
    raise KeyError(f"no GGUF name for tensor {hf_key!r}")


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order from Hugging Face's: per head, the rows of the two rotary halves
    interleaved (``[H*K, ...]`` -> ``[H, 2, K/2, ...]`` -> swap -> ``[H*K, ...]``)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of `permute_qk`: Hugging Face's q/k row order from llama.cpp's."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


class GGUFTensors(Mapping[str, np.ndarray]):
    """The tensors of a GGUF file under Hugging Face keys, dequantized to float32 on access.

    Like ``CheckpointReader``: ``tensors[key]`` reads and decodes that one tensor (a plain file
    read); ``shape(key)`` is known without reading. q_proj/k_proj rows come back in
    Hugging Face's order.

    Raises:
      GGUFError: an unsupported architecture, or a tensor type the ``gguf`` package cannot decode.
    """

    def __init__(self, path: str, reader: Any = None):
        self.path = find_gguf(path)
        self.directory = self.path
        self.reader = reader if reader is not None else open_reader(self.path)
        self.arch = architecture(self.reader, self.path)
        cfg = hf_config(self.reader, self.path)
        self.hf_config = cfg
        self._heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
        self._tensors: dict[str, Any] = {}
        for t in self.reader.tensors:
            key = hf_name(t.name)
            if key is not None:
                self._tensors[key] = t
            elif t.name not in _IGNORED:
                self._tensors[t.name] = t  # reported as unused by the loader

    def __getitem__(self, key: str) -> np.ndarray:
        from gguf.quants import dequantize
        t = self._tensors[key]
        data = self.reader.read(t)
        try:
            w = dequantize(data, t.tensor_type)
        except NotImplementedError as e:
            raise GGUFError(f"{self.path}: tensor {t.name!r} has type {t.tensor_type.name}, "
                            "which the gguf package cannot decode") from e
        w = np.asarray(w, np.float32).reshape(self.shape(key))
        proj = key.split(".")[-2] if key.endswith(".weight") or key.endswith(".bias") else ""
        if self.arch in PERMUTED and proj in self._heads and key.startswith("model.layers."):
            w = unpermute_qk(w, self._heads[proj])
        return w

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape in Hugging Face order (``[out, in]`` for a Linear weight)."""
        return tuple(int(d) for d in reversed(self._tensors[key].shape))

    def file_of(self, key: str) -> str:
        return self.path


Produce = Callable[[], np.ndarray]


def write_gguf(path: str, arch: str, metadata: Iterable[tuple[str, Any, Any, Any]],
               tensors: Iterable[tuple[str, tuple[int, ...], str, Produce]]) -> None:
    """Writes a GGUF file, producing one tensor at a time.

    Args:
      path: the file to write (created or truncated).
      arch: ``general.architecture``.
      metadata: ``(key, value, GGUFValueType, sub_type or None)`` entries.
      tensors: ``(name, shape in numpy order, ggml type name, produce)``; ``produce()`` returns
        the tensor already encoded (float32/float16 array, or uint8 blocks for quantized types).
    """
    import gguf
    writer = gguf.GGUFWriter(path, arch)
    try:
        for key, value, vtype, sub in metadata:
            writer.add_key_value(key, value, vtype, sub)
        tensors = list(tensors)
        for name, shape, type_name, _ in tensors:
            qtype = gguf.GGMLQuantizationType[type_name]
            block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
            n = int(np.prod(shape, dtype=np.int64))
            # With raw_dtype given, a non-uint8 dtype means "shape is the logical shape".
            writer.add_tensor_info(name, shape, np.dtype(np.float32), n // block * nbytes,
                                   raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, shape, type_name, produce in tensors:
            writer.write_tensor_data(produce())
    finally:
        writer.close()
