"""Packed rows: several examples in one row, told apart by segment ids.

A packed row ``[B, T]`` carries ``segment_ids`` (int32; 1, 2, ... one id an example, contiguous;
0 is padding) and ``position_ids`` (restarting at 0 in each segment). A token attends only to
earlier tokens of its own segment, so each example's outputs equal its outputs alone.

Two attention paths:

- XLA (CPU, and wherever the fused kernel does not apply): a boolean mask ``[B, 1, T, T]``
  (``segment_mask``) into ``jax.nn.dot_product_attention``.
- Fused (GPUs): JAX's Pallas flash-attention kernel
  (``jax.experimental.pallas.ops.gpu.attention.mha``), which compares segment ids tile by tile
  and never materialises a ``[T, T]`` mask; forward and backward (custom VJP) are Triton kernels.
  ``jax.nn.dot_product_attention``'s cuDNN path takes one length a row
  (``query_seq_lengths``), not several segments: cuDNN's packed layout is reachable only
  through JAX's private ``jax._src.cudnn`` module (Hopper only), so it is not used.

Shape names: B batch, T tokens, H heads, G key/value heads, K head dim.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

#: Query/key tile of the fused kernel's forward pass; the backward uses tiles of 32.
FUSED_BLOCK = 128
_BACKWARD_BLOCK = 32


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Position ids ``[B, T]`` restarting at 0 where the segment id changes (padding counts on)."""
    t = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    starts = jnp.where((segment_ids != prev) | (t == 0)[None, :], t[None, :], 0)
    return t[None, :] - jax.lax.cummax(starts, axis=1)


def segment_mask(segment_ids: jax.Array, valid: Optional[jax.Array] = None,
                 sliding_window: Optional[int] = None) -> jax.Array:
    """Boolean ``[B, 1, T, T]``: key s is visible to query t if s <= t, same segment (within
    ``sliding_window`` tokens), and ``valid[s]`` (when given)."""
    t = jnp.arange(segment_ids.shape[-1])
    causal = t[None, :] <= t[:, None]
    if sliding_window is not None:
        causal = causal & (t[:, None] - t[None, :] < sliding_window)
    m = causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if valid is not None:
        m = m & valid.astype(bool)[:, None, :]
    return m[:, None]


def fused_fits(t: int, head_dim: int, sliding_window: Optional[int]) -> bool:
    """True when the fused kernel takes rows of ``t`` tokens: no sliding window, a power-of-two
    head dim 16..256, and ``t`` a multiple of the tile (or one tile of a multiple of 32)."""
    tile_ok = t % FUSED_BLOCK == 0 or (t <= FUSED_BLOCK and t % _BACKWARD_BLOCK == 0)
    return sliding_window is None and head_dim in (16, 32, 64, 128, 256) and tile_ok


def segment_attention_impl(impl: str, t: int, head_dim: int, dtype: Any,
                           sliding_window: Optional[int]) -> str:
    """``"pallas"`` (the fused kernel) or ``"xla"`` (the segment mask) for packed rows.

    ``"auto"``: the fused kernel on GPUs where it fits (``fused_fits``, bf16/f16), else XLA.
    ``"pallas"``: the fused kernel (interpret mode off GPUs), or an error where it does not fit.

    Raises:
      ValueError: ``impl="cudnn"`` (cuDNN takes no segments here) or ``"pallas"`` where the
        kernel does not fit.
    """
    fits = fused_fits(t, head_dim, sliding_window)
    if impl == "cudnn":
        raise ValueError("attention='cudnn' does not take segment_ids (packed rows); use 'auto', "
                         "'pallas' or 'xla'")
    if impl == "pallas":
        if not fits:
            raise ValueError(f"attention='pallas' needs no sliding window (got "
                             f"{sliding_window}), a power-of-two head dim 16..256 (got "
                             f"{head_dim}) and rows of a multiple of {FUSED_BLOCK} tokens "
                             f"(got {t}); use 'auto' or 'xla'")
        return "pallas"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "pallas" if impl == "auto" and fits and half and jax.default_backend() == "gpu" \
        else "xla"


def fused_segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                            scale: float, interpret: bool = False,
                            forward_block: int = FUSED_BLOCK,
                            backward_block: int = _BACKWARD_BLOCK) -> jax.Array:
    """Causal attention within segments, ``[B, T, H, K] x [B, T, G, K] -> [B, T, H, K]``.

    The Pallas flash-attention kernel (forward and backward); key/value heads are repeated to H
    for GQA. ``interpret=True`` runs it in Pallas interpret mode (CPU tests). The tile sizes
    (``benchmarks.attention --sweep`` times others) must divide T.
    """
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    t, h, g = q.shape[1], q.shape[2], k.shape[2]
    if h != g:
        k, v = jnp.repeat(k, h // g, axis=2), jnp.repeat(v, h // g, axis=2)
    fwd, bwd = min(forward_block, t), min(backward_block, t)
    blocks = pallas_attention.BlockSizes(block_q=fwd, block_k=fwd, block_q_dkv=bwd,
                                         block_kv_dkv=bwd, block_q_dq=bwd, block_kv_dq=bwd)
    return pallas_attention.mha(q, k, v, segment_ids.astype(jnp.int32), sm_scale=scale,
                                causal=True, block_sizes=blocks, interpret=interpret)
