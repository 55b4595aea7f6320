"""Perplexity of a causal LM on a token dataset.

    ppl = qj.eval.perplexity(model, params, batches)

``batches`` yields ``[B, T]`` int arrays, or dicts with ``input_ids`` and
optionally ``attention_mask`` and ``labels`` (-100 = ignored, as in
transformers). Token t+1 is predicted from tokens <= t; a prediction counts
when its target is a real token (mask 1, label not -100) and so is its input.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterable, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np

Batch = Union[np.ndarray, jax.Array, Mapping[str, Any]]


@functools.partial(jax.jit, static_argnames=("model",))
def _nll_sum(model: Any, params: Any, ids: jax.Array, mask: jax.Array,
             labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = model.apply({"params": params}, ids, mask).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    target = labels[:, 1:]
    valid = (target != -100) & (mask[:, 1:] == 1) & (mask[:, :-1] == 1)
    picked = jnp.take_along_axis(logp, jnp.where(valid, target, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)), jnp.sum(valid)


def nll(model: Any, params: Any, batches: Iterable[Batch]) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, number of predicted tokens)."""
    total, count = 0.0, 0
    for batch in batches:
        if isinstance(batch, Mapping):
            ids = jnp.asarray(batch["input_ids"])
            mask = batch.get("attention_mask")
            labels = batch.get("labels")
        else:
            ids, mask, labels = jnp.asarray(batch), None, None
        if ids.ndim != 2:
            raise ValueError(f"a batch of token ids must be [B, T], got shape {ids.shape}")
        mask = jnp.ones(ids.shape, jnp.int32) if mask is None else jnp.asarray(mask, jnp.int32)
        labels = ids if labels is None else jnp.asarray(labels)
        s, n = _nll_sum(model, params, ids, mask, labels.astype(ids.dtype))
        total += float(s)
        count += int(n)
    return total, count


def perplexity(model: Any, params: Any, token_batches: Iterable[Batch]) -> float:
    """``exp(mean next-token NLL)`` over all predicted tokens of all batches.

    Raises:
      ValueError: the model is not a causal LM, or no token was predicted.
    """
    if getattr(model, "task", None) != "CAUSAL_LM":
        raise ValueError(f"perplexity needs a causal LM; {type(model).__name__} is not one")
    total, count = nll(model, params, token_batches)
    if count == 0:
        raise ValueError("perplexity: the batches hold no token to predict")
    return math.exp(total / count)
