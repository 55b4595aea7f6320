"""QTensor <-> bitsandbytes ``Linear4bit`` state-dict entries.

A 4-bit weight saved by bitsandbytes (and so by ``transformers``'
``save_pretrained`` of a 4-bit model) is a group of entries under the weight's
name: the packed codes, the absmax, the code table, the nested statistics when
double-quantized, and a small JSON object stored as uint8 bytes. These two
functions write and read exactly those keys, dtypes and shapes.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from qlora_jax.quant import codebooks
from qlora_jax.quant.blockwise import validate_settings
from qlora_jax.quant.qtensor import QTensor

BNB_QTYPES = ("nf4", "fp4")
_DTYPE_NAMES = {"float32": np.float32, "bfloat16": None, "float16": np.float16}


def quant_state_key(prefix: str, qtype: str) -> str:
    return f"{prefix}.quant_state.bitsandbytes__{qtype}"


def to_bnb_state_dict(q: QTensor, prefix: str = "weight") -> dict[str, np.ndarray]:
    """The state-dict entries bitsandbytes' ``Linear4bit`` writes for this tensor.

    Args:
      q: an unstacked NF4 or FP4 QTensor (``[out, in]`` for a Linear weight).
      prefix: the weight's key, e.g. ``"model.layers.0.self_attn.q_proj.weight"``.

    Returns:
      A dict of numpy arrays: ``prefix`` (uint8 ``[ceil(n/2), 1]``),
      ``prefix.absmax``, ``prefix.quant_map`` and, when double-quantized,
      ``prefix.nested_absmax``, ``prefix.nested_quant_map``; plus
      ``prefix.quant_state.bitsandbytes__<qtype>`` (uint8 JSON bytes).
    """
    if q.qtype not in BNB_QTYPES:
        raise ValueError(f"bitsandbytes stores only {BNB_QTYPES}; this QTensor is {q.qtype!r}")
    if q.stack_shape:
        raise ValueError(f"to_bnb_state_dict takes one tensor; this QTensor is stacked "
                         f"(leading axes {q.stack_shape}): index it first")
    packed = np.asarray(q.packed, dtype=np.uint8).reshape(-1, 1)
    meta: dict[str, Any] = {
        "quant_type": q.qtype,
        "blocksize": q.block_size,
        "dtype": q.dtype.name,
        "shape": list(q.logical_shape),
    }
    sd = {prefix: packed}
    if q.double_quant:
        sd[f"{prefix}.absmax"] = np.asarray(q.absmax, dtype=np.uint8)
        sd[f"{prefix}.quant_map"] = codebooks.codebook(q.qtype).copy()
        sd[f"{prefix}.nested_absmax"] = np.asarray(q.nested_absmax, dtype=np.float32)
        sd[f"{prefix}.nested_quant_map"] = codebooks.DYNAMIC_MAP.copy()
        meta["nested_blocksize"] = q.nested_block_size
        meta["nested_dtype"] = "float32"
        meta["nested_offset"] = float(np.asarray(q.offset, dtype=np.float32))
    else:
        sd[f"{prefix}.absmax"] = np.asarray(q.absmax, dtype=np.float32)
        sd[f"{prefix}.quant_map"] = codebooks.codebook(q.qtype).copy()
    payload = json.dumps(meta).encode("utf-8")
    sd[quant_state_key(prefix, q.qtype)] = np.frombuffer(payload, dtype=np.uint8).copy()
    return sd


def is_bnb_weight(sd: Mapping[str, Any], prefix: str) -> bool:
    """True when ``sd`` holds a bitsandbytes 4-bit weight under ``prefix``."""
    return any(quant_state_key(prefix, t) in sd for t in BNB_QTYPES)


def from_bnb_state_dict(sd: Mapping[str, Any], prefix: str = "weight") -> QTensor:
    """Reads a bitsandbytes 4-bit weight from state-dict entries (numpy or torch arrays).

    Raises:
      KeyError: a required entry is missing (named in the message).
      ValueError: an entry has the wrong dtype or shape, the metadata is
        malformed, or a code table differs from bitsandbytes' tables.
    """
    qs_keys = [quant_state_key(prefix, t) for t in BNB_QTYPES if quant_state_key(prefix, t) in sd]
    if not qs_keys:
        raise KeyError(f"no bitsandbytes quant state for {prefix!r}: expected an entry "
                       f"'{prefix}.quant_state.bitsandbytes__nf4' (or __fp4)")
    raw = _np(sd[qs_keys[0]])
    try:
        meta = json.loads(bytes(raw.astype(np.uint8).tobytes()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{qs_keys[0]}: the quant state is not valid JSON bytes ({e})") from e
    for field in ("quant_type", "blocksize", "dtype", "shape"):
        if field not in meta:
            raise ValueError(f"{qs_keys[0]}: the quant state lacks {field!r} (has {sorted(meta)})")
    qtype, block_size = meta["quant_type"], int(meta["blocksize"])
    shape = tuple(int(d) for d in meta["shape"])
    nested = "nested_blocksize" in meta
    nested_block_size = int(meta["nested_blocksize"]) if nested else None
    if qtype not in BNB_QTYPES:
        raise ValueError(f"{qs_keys[0]}: unknown quant_type {qtype!r}")
    validate_settings(qtype, block_size, nested_block_size)
    if meta["dtype"] not in _DTYPE_NAMES:
        raise ValueError(f"{qs_keys[0]}: unsupported dtype {meta['dtype']!r}")

    def need(key: str) -> np.ndarray:
        if key not in sd:
            raise KeyError(f"bitsandbytes weight {prefix!r} is missing the entry {key!r}")
        return _np(sd[key])

    n = int(np.prod(shape))
    n_blocks = -(-n // block_size)
    packed = need(prefix)
    _check(packed, prefix, np.uint8, ((n + 1) // 2, 1), alt_shape=((n + 1) // 2,))
    absmax = need(f"{prefix}.absmax")
    quant_map = need(f"{prefix}.quant_map")
    _check(quant_map, f"{prefix}.quant_map", np.float32, (16,))
    if not np.array_equal(quant_map, codebooks.codebook(qtype)):
        raise ValueError(f"{prefix}.quant_map is not bitsandbytes' {qtype} codebook")
    nested_absmax = offset = None
    if nested:
        _check(absmax, f"{prefix}.absmax", np.uint8, (n_blocks,))
        n_nested = -(-n_blocks // nested_block_size)
        nested_absmax = need(f"{prefix}.nested_absmax")
        _check(nested_absmax, f"{prefix}.nested_absmax", np.float32, (n_nested,))
        nested_map = need(f"{prefix}.nested_quant_map")
        _check(nested_map, f"{prefix}.nested_quant_map", np.float32, (256,))
        if not np.array_equal(nested_map, codebooks.DYNAMIC_MAP):
            raise ValueError(f"{prefix}.nested_quant_map is not bitsandbytes' signed 8-bit "
                             "dynamic map")
        if "nested_offset" not in meta:
            raise ValueError(f"{qs_keys[0]}: a nested quant state needs 'nested_offset'")
        offset = np.asarray(np.float32(meta["nested_offset"]))
    else:
        _check(absmax, f"{prefix}.absmax", np.float32, (n_blocks,))
    import jax.numpy as jnp  # local: keeps this module importable without initialising JAX
    return QTensor(jnp.asarray(packed.reshape(-1)), jnp.asarray(absmax),
                   None if nested_absmax is None else jnp.asarray(nested_absmax),
                   None if offset is None else jnp.asarray(offset),
                   logical_shape=shape, dtype=jnp.dtype(meta["dtype"]), qtype=qtype,
                   block_size=block_size, nested_block_size=nested_block_size)


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _check(a: np.ndarray, key: str, dtype: Any, shape: tuple[int, ...],
           alt_shape: tuple[int, ...] | None = None) -> None:
    if a.dtype != np.dtype(dtype):
        raise ValueError(f"{key}: expected dtype {np.dtype(dtype).name}, found {a.dtype.name}")
    if a.shape != shape and a.shape != alt_shape:
        raise ValueError(f"{key}: expected shape {shape}, found {a.shape}")
