"""Position-wise blocks run over sequence chunks, so no ``[B, T, F]`` intermediate of a whole
long row is alive at once.

A Llama MLP block on ``T`` tokens holds three ``[B, T, F]`` activations (gate, up, their product;
F = 3.5 D in Llama-3): at 128k tokens of llama-8b, 3.5 GiB each, more than the layer's input. The
block is position-wise, so running it on chunks of ``C`` tokens gives the same numbers; each
chunk is rematerialised (``jax.checkpoint``), so the forward keeps only the chunk inputs (the
block's own input, ``[B, T, D]``) and the backward recomputes one chunk at a time: the peak falls
from O(T F) to O(C F).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def map_chunks(fn: Callable[[jax.Array, jax.Array], jax.Array], h: jax.Array,
               chunk: int) -> jax.Array:
    """``fn`` over chunks of ``chunk`` positions of ``h`` ``[B, T, D]``, concatenated.

    Args:
      fn: ``(x [B, C, D], j int32 []) -> [B, C, D]``, position-wise (``j``: the chunk's index,
        e.g. to fold into a dropout key).
      h: the input, ``[B, T, D]``; T need not be a multiple of ``chunk`` (the last chunk is
        zero-padded and the padding dropped).
      chunk: positions a chunk (> 0).
    """
    if chunk <= 0:
        raise ValueError(f"map_chunks: chunk must be positive, got {chunk}")
    b, t, d = h.shape
    n = -(-t // chunk)
    x = h if n * chunk == t else jnp.pad(h, ((0, 0), (0, n * chunk - t), (0, 0)))
    xs = x.reshape(b, n, chunk, d).swapaxes(0, 1)                  # [n, B, C, D]
    step = jax.checkpoint(lambda a: fn(a[0], a[1]), prevent_cse=False)
    ys = jax.lax.map(step, (xs, jnp.arange(n, dtype=jnp.int32)))
    return ys.swapaxes(0, 1).reshape(b, n * chunk, -1)[:, :t]
