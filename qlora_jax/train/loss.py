"""Losses as sums: (loss sum, weight sum, correct count), so micro-batches and eval batches add up.

Every function returns float32 sums rather than means; the caller divides the summed loss by the
summed weight of the whole (accumulated) batch. That makes gradient accumulation exact: the mean
over A micro-batches equals the mean over the full batch, whatever the number of loss tokens in each.

Shapes: B batch, T tokens, D model, V vocab, C classes.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Sums = tuple[jax.Array, jax.Array, jax.Array]


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-position cross-entropy and correctness in float32.

    Args:
      logits: [..., V] in any float dtype (upcast to float32 here, one row at a time in XLA).
      targets: int [...]; entries outside [0, V) give 0 loss and must be masked by the caller.

    Returns:
      (ce float32 [...], correct bool [...]).
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    safe = jnp.clip(targets, 0, logits.shape[-1] - 1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    correct = jnp.argmax(logits, axis=-1) == safe
    return lse - picked, correct


def causal_lm_sums(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> Sums:
    """Token-level CE summed over positions whose ``loss_mask`` is nonzero.

    Args:
      logits: [B, T, V].
      targets: int [B, T], the next token at each position (already shifted).
      loss_mask: float [B, T]; 0 on prompt tokens, padding and example ends.

    Returns:
      (sum of mask * CE, sum of mask, sum of mask * correct), float32 scalars.
    """
    ce, correct = token_cross_entropy(logits, targets)
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(ce * mask), jnp.sum(mask), jnp.sum(correct * mask)


def chunked_causal_lm_sums(hidden: jax.Array, head: Callable[[jax.Array], jax.Array],
                           targets: jax.Array, loss_mask: jax.Array, chunk: int) -> Sums:
    """``causal_lm_sums(head(hidden), ...)`` computed ``chunk`` positions at a time.

    Only ``[B, chunk, V]`` logits exist at once, forward and backward: the chunk loop is a
    ``lax.scan`` whose body is rematerialised (``jax.checkpoint``), so the backward pass recomputes
    each chunk's logits from its hidden states instead of keeping all of them.

    Args:
      hidden: final hidden states [B, T, D] (what the LM head consumes).
      head: hidden [B, c, D] -> logits [B, c, V] (closes over its parameters; differentiable).
      targets: int [B, T].
      loss_mask: float [B, T].
      chunk: positions per chunk (T is padded up to a multiple with masked positions).

    Returns:
      The same sums as `causal_lm_sums`.
    """
    b, t, _ = hidden.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        loss_mask = jnp.pad(loss_mask, ((0, 0), (0, pad)))
    # [n, B, c, ...]: scan runs over the leading chunk axis.
    to_chunks = lambda x: jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)  # noqa: E731
    xs = (to_chunks(hidden), to_chunks(targets), to_chunks(loss_mask))

    @jax.checkpoint
    def one(h, y, m):
        return causal_lm_sums(head(h), y, m)

    def body(carry, x):
        sums = one(*x)
        return tuple(c + s for c, s in zip(carry, sums)), None

    zero = jnp.zeros((), jnp.float32)
    sums, _ = jax.lax.scan(body, (zero, zero, zero), xs)
    return sums


def classification_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> Sums:
    """Example-level CE for a classification head.

    Args:
      logits: [B, C].
      labels: int [B].
      weights: float [B]; 0 for rows that pad the last eval batch.

    Returns:
      (sum of w * CE, sum of w, sum of w * correct), float32 scalars.
    """
    ce, correct = token_cross_entropy(logits, labels)
    w = weights.astype(jnp.float32)
    return jnp.sum(ce * w), jnp.sum(w), jnp.sum(correct * w)
