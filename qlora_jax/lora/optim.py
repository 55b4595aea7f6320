"""Optimizers that keep state only for trainable leaves."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from qlora_jax.lora.params import Params, flatten, trainable_mask, unflatten


def masked(tx: optax.GradientTransformation, mask: Any = None) -> optax.GradientTransformation:
    """Wraps any optax optimizer so that it holds state only for the trainable leaves.

    ``init`` and ``update`` take the whole params tree (frozen QTensors
    included). Updates of frozen leaves are ``None`` so ``optax.apply_updates``
    is not used for them: apply with ``qj.lora.apply_updates``, which leaves
    frozen leaves untouched (no zero-add over 4-bit weights).

    Args:
      tx: the inner optimizer (e.g. ``optax.adamw(2e-4)``).
      mask: a bool tree (prefix of params) or a callable params -> mask;
        default ``trainable_mask``.
    """
    def get_mask(params: Params) -> Params:
        if mask is None:
            return trainable_mask(params)
        return mask(params) if callable(mask) else mask

    def select(tree: Params, m: Params) -> Params:
        fm = flatten(m)
        return unflatten({p: v for p, v in flatten(tree).items() if fm.get(p, False)})

    def init_fn(params: Params) -> Any:
        return tx.init(select(params, get_mask(params)))

    def update_fn(updates: Params, state: Any, params: Params | None = None):
        if params is None:
            raise ValueError("qj.lora.masked needs params in update() to know the trainable leaves")
        m = get_mask(params)
        sub_updates = select(updates, m)
        new_updates, state = tx.update(sub_updates, state, select(params, m))
        return new_updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def apply_updates(params: Params, updates: Params) -> Params:
    """Adds updates to the leaves they name; every other leaf is returned as is."""
    flat = flatten(params)
    for p, u in flatten(updates).items():
        if p not in flat:
            raise KeyError(f"update for {'/'.join(p)}, which is not a parameter")
        old = flat[p]
        flat[p] = jax.tree.map(lambda a, b: (a + b).astype(a.dtype), old, u)
    return unflatten(flat)


def state_nbytes(state: Any) -> int:
    """Bytes of all arrays in an optimizer state."""
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)
               if hasattr(x, "dtype"))
