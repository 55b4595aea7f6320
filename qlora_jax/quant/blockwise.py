"""Blockwise 4-bit quantization and dequantization in plain jnp (the ``"xla"`` path).

Numerics follow bitsandbytes >= 0.50 exactly (see docs in ``qtensor.py``):
absmax a block in float32, normalisation as ``x * (1 / absmax)`` clipped to
[-1, 1], nearest code with ties to the lower value, high nibble first; double
quantization of the absmax to the signed 8-bit dynamic map by exact nearest
rounding; dequantization in float32, then one cast to the requested dtype.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.quant import codebooks
from qlora_jax.quant.qtensor import (ALLOWED_BLOCK_SIZES, ALLOWED_NESTED_BLOCK_SIZES, QTensor)

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# bitsandbytes clamps the partial last block's absmax to this (it stores the clamped value).
_TINY = np.float32(1e-38)
# 1e-38 is subnormal and XLA on CPU treats subnormals as zero in comparisons, so
# compare against the smallest normal float32 instead (nothing lies in between).
_MIN_NORMAL = np.float32(np.finfo(np.float32).tiny)


def _sorted_table(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Midpoints of the sorted table and the code of each sorted position.

    Returns (midpoints float32 [k-1], sorted_to_code uint8 [k]). The sort is
    stable, so FP4's +0.0 (code 0) sorts before -0.0 (code 8) as in
    bitsandbytes; a value exactly on a midpoint maps to the lower position
    (``searchsorted(midpoints, s, side="left")``).
    """
    order = np.argsort(values, kind="stable")
    svals = values[order]
    mids = ((svals[:-1] + svals[1:]) / np.float32(2)).astype(np.float32)
    return mids, order.astype(np.uint8)


def _codebook_tables(qtype: str) -> tuple[np.ndarray, np.ndarray]:
    values = codebooks.codebook(qtype)
    if qtype == "int4":
        values = values[:15]  # code 15 is unused
    return _sorted_table(values)


def validate_settings(qtype: str, block_size: int, nested_block_size: Optional[int]) -> None:
    if qtype not in codebooks.QTYPES:
        raise ValueError(f"unknown qtype {qtype!r}; expected one of {codebooks.QTYPES}")
    if block_size not in ALLOWED_BLOCK_SIZES:
        raise ValueError(
            f"block_size={block_size} is not allowed; bitsandbytes accepts {ALLOWED_BLOCK_SIZES}")
    if nested_block_size is not None and nested_block_size not in ALLOWED_NESTED_BLOCK_SIZES:
        raise ValueError(f"nested_block_size={nested_block_size} is not allowed; "
                         f"bitsandbytes' double quantization uses {ALLOWED_NESTED_BLOCK_SIZES}")


def _nearest_code(s: jax.Array, mids: np.ndarray, sorted_to_code: np.ndarray) -> jax.Array:
    """Index of the nearest table value for each s (ties to the lower value)."""
    if mids.size <= 16:
        # A short table: count the midpoints strictly below s (vectorises well).
        idx = jnp.zeros(s.shape, jnp.int32)
        for m in mids:
            idx = idx + (s > m).astype(jnp.int32)
    else:
        idx = jnp.searchsorted(jnp.asarray(mids), s, side="left").astype(jnp.int32)
    return jnp.asarray(sorted_to_code)[idx]


def _blocks(flat: jax.Array, block_size: int, fill: float = 0.0) -> jax.Array:
    n = flat.shape[0]
    nb = -(-n // block_size)
    pad = nb * block_size - n
    if pad:
        flat = jnp.concatenate([flat, jnp.full((pad,), fill, flat.dtype)])
    return flat.reshape(nb, block_size)


@functools.partial(jax.jit, static_argnames=("qtype", "block_size", "nested_block_size"))
def _quantize_flat(flat: jax.Array, *, qtype: str, block_size: int,
                   nested_block_size: Optional[int]):
    n = flat.shape[0]
    flat = flat.astype(jnp.float32)
    full = n - n % block_size
    parts_s, parts_absmax = [], []
    if full:
        # Full blocks: x * (1 / absmax); an all-zero block keeps absmax 0 and codes for 0.0.
        x = flat[:full].reshape(-1, block_size)
        absmax = jnp.max(jnp.abs(x), axis=1)
        safe = jnp.where(absmax == 0, jnp.float32(1.0), absmax)
        s = jnp.clip(x * (jnp.float32(1.0) / safe)[:, None], -1.0, 1.0)
        parts_s.append(jnp.where((absmax == 0)[:, None], 0.0, s).reshape(-1))
        parts_absmax.append(absmax)
    if full < n:
        # The partial last block: x / absmax, and its absmax stored clamped to 1e-38.
        tail = flat[full:]
        am = jnp.max(jnp.abs(tail))
        tiny = am < _MIN_NORMAL
        s = jnp.where(tiny, 0.0, jnp.clip(tail / am, -1.0, 1.0))
        # Select the bits (a float select may become a max, which flushes 1e-38 to 0).
        am = jax.lax.bitcast_convert_type(
            jnp.where(tiny, _TINY.view(np.uint32), jax.lax.bitcast_convert_type(am, jnp.uint32)),
            jnp.float32)
        parts_s.append(s)
        parts_absmax.append(am[None])
    s = jnp.concatenate(parts_s) if len(parts_s) > 1 else parts_s[0]
    absmax = jnp.concatenate(parts_absmax) if len(parts_absmax) > 1 else parts_absmax[0]
    if n % 2:
        s = jnp.concatenate([s, jnp.zeros((1,), s.dtype)])  # the pad nibble encodes 0.0
    mids, order = _codebook_tables(qtype)
    codes = _nearest_code(s, mids, order)
    packed = ((codes[0::2] << 4) | codes[1::2]).astype(jnp.uint8)
    if nested_block_size is None:
        return packed, absmax, None, None
    qabsmax, nested_absmax, offset = _double_quantize(absmax, nested_block_size)
    return packed, qabsmax, nested_absmax, offset


def _double_quantize(absmax: jax.Array, nested_block_size: int):
    """Quantizes ``absmax - mean(absmax)`` blockwise to the signed 8-bit dynamic map."""
    nb = absmax.shape[0]
    # Subtract the offset as stored (rounded to float32), not fused into an FMA.
    offset = _rounded(jnp.mean(absmax, dtype=jnp.float32))
    centred = _blocks(absmax - offset, nested_block_size)
    nested_absmax = jnp.max(jnp.abs(centred), axis=1)
    safe = jnp.where(nested_absmax == 0, jnp.float32(1.0), nested_absmax)
    s = jnp.clip(centred * (jnp.float32(1.0) / safe)[:, None], -1.0, 1.0).reshape(-1)[:nb]
    mids, order = _sorted_table(codebooks.DYNAMIC_MAP)
    codes = _nearest_code(s, mids, order).astype(jnp.uint8)
    return codes, nested_absmax, offset


def quantize(x: Any, qtype: str = "nf4", block_size: int = 64, double_quant: bool = True,
             nested_block_size: int = 256) -> QTensor:
    """Quantizes a float array blockwise to 4 bits, as ``bitsandbytes.functional.quantize_4bit``.

    Args:
      x: any-shape float32, bfloat16 or float16 array, quantized in its stored
        row-major order (pass a ``[out, in]`` weight to match a PyTorch checkpoint).
      qtype: ``"nf4"``, ``"fp4"`` or ``"int4"``.
      block_size: elements a block; one of 32, 64, ..., 4096.
      double_quant: also quantize the absmax (bitsandbytes' ``compress_statistics``).
      nested_block_size: absmax values a nested block (256).

    Returns:
      A QTensor. Raises ValueError for NaN or Inf values (when ``x`` is concrete),
      non-float dtypes, empty arrays or settings bitsandbytes does not allow.
    """
    nested = nested_block_size if double_quant else None
    validate_settings(qtype, block_size, nested)
    dtype = jnp.result_type(x)
    if dtype not in [jnp.dtype(d) for d in FLOAT_DTYPES]:
        raise ValueError(f"quantize expects a float32, bfloat16 or float16 array, got {dtype}")
    shape = tuple(np.shape(x))
    if int(np.prod(shape)) == 0:
        raise ValueError(f"cannot quantize an empty array of shape {shape}")
    if not isinstance(x, jax.core.Tracer):
        bad = ~jnp.isfinite(jnp.asarray(x))
        if bool(jnp.any(bad)):
            count = int(jnp.sum(bad))
            raise ValueError(f"cannot quantize an array of shape {shape} holding {count} NaN or "
                             "Inf value(s); fix or drop them before quantizing")
    flat = jnp.reshape(jnp.asarray(x), (-1,))
    packed, absmax, nested_absmax, offset = _quantize_flat(
        flat, qtype=qtype, block_size=block_size, nested_block_size=nested)
    return QTensor(packed, absmax, nested_absmax, offset, logical_shape=shape, dtype=dtype,
                   qtype=qtype, block_size=block_size, nested_block_size=nested)


def dequantize_absmax(q: QTensor) -> jax.Array:
    """The float32 absmax a block of one (unstacked) QTensor, decoding double quantization."""
    if not q.double_quant:
        return q.absmax.astype(jnp.float32)
    dyn = jnp.asarray(codebooks.DYNAMIC_MAP)
    nb = q.absmax.shape[-1]
    scale = jnp.repeat(q.nested_absmax, q.nested_block_size, total_repeat_length=None)[:nb]
    # Two float32 steps as bitsandbytes: round the product, then add the offset.
    return _rounded(dyn[q.absmax.astype(jnp.int32)] * scale) + q.offset


def _rounded(v: jax.Array) -> jax.Array:
    """``v`` unchanged, but kept from being fused into a following add.

    Without the select XLA (on CPU at least) may contract the multiply that made
    ``v`` and an add that uses it into one fused multiply-add, which rounds once
    instead of twice and so differs from bitsandbytes in the last bit.
    """
    return jnp.where(jnp.isnan(v), jnp.float32(jnp.nan), v)


def dequantize_xla(q: QTensor, dtype: Any = None) -> jax.Array:
    """Plain-jnp dequantization; works on stacked QTensors (leading axes) too."""
    dtype = q.dtype if dtype is None else jnp.dtype(dtype)
    if q.stack_shape:
        flat = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[len(q.stack_shape):]), q)
        out = jax.vmap(lambda t: _dequantize_one(t, dtype))(flat)
        return out.reshape(q.shape)
    return _dequantize_one(q, dtype)


def _dequantize_one(q: QTensor, dtype: Any) -> jax.Array:
    n = q.num_elements
    table = jnp.asarray(codebooks.codebook(q.qtype))
    hi = q.packed >> 4
    lo = q.packed & 0xF
    codes = jnp.stack([hi, lo], axis=-1).reshape(-1)
    nb, bs = q.num_blocks, q.block_size
    pad = nb * bs - codes.shape[0]
    if pad > 0:
        codes = jnp.concatenate([codes, jnp.zeros((pad,), codes.dtype)])
    codes = codes[: nb * bs].reshape(nb, bs)
    absmax = dequantize_absmax(q)
    values = table[codes.astype(jnp.int32)] * absmax[:, None]
    return values.reshape(-1)[:n].astype(dtype).reshape(q.logical_shape)


def quantize_like(x: jax.Array, like: QTensor) -> QTensor:
    """Quantizes ``x`` (shape ``like.shape``, stacked axes included) with ``like``'s settings.

    Used to requantize a merged weight with the same data type, block size and
    nesting (PEFT's merge into a 4-bit base), and keeps the original dtype.
    """
    if tuple(x.shape) != tuple(like.shape):
        raise ValueError(f"quantize_like: shape {tuple(x.shape)} differs from {like.shape}")
    settings = dict(qtype=like.qtype, block_size=like.block_size,
                    nested_block_size=like.nested_block_size)
    stack = like.stack_shape
    flat = jnp.reshape(x, (int(np.prod(stack)) if stack else 1, -1))
    packed, absmax, nested_absmax, offset = jax.vmap(
        lambda row: _quantize_flat(row, **settings))(flat)

    def unstack(a):
        if a is None:
            return None
        return a.reshape(stack + a.shape[1:]) if stack else a[0]

    return QTensor(unstack(packed), unstack(absmax), unstack(nested_absmax), unstack(offset),
                   logical_shape=like.logical_shape, dtype=like.dtype, qtype=like.qtype,
                   block_size=like.block_size, nested_block_size=like.nested_block_size)
