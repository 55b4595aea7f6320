"""Logical axes in model code: activation sharding hints.

Model code names the axes of its activations logically (``("batch", "length", "act_embed")``
for a hidden state ``[B, T, D]``) and never a mesh axis. ``constrain`` is
``flax.linen.with_logical_constraint`` with one difference: a mesh axis that does not divide a
dimension is dropped for it (the dimension is replicated), so any model runs on any mesh.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax

from qlora_jax.quant.partition import context, fit_spec


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
    """Activation sharding hint by logical names.

    A no-op unless a step is traced under ``jax.set_mesh(mesh)`` and
    ``flax.linen.logical_axis_rules(rules)``. Model code calls it on the activations it
    produces so that XLA keeps the batch split over the batch mesh axes; without such hints,
    sharding propagation may take the layout of a parameter (``embed`` on ``fsdp``) for the
    activations and replicate the batch instead.
    """
    ctx = context()
    if ctx is None:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} logical names {tuple(names)} for an array "
                         f"of rank {x.ndim} (shape {x.shape})")
    return jax.lax.with_sharding_constraint(x, fit_spec(tuple(x.shape), names, *ctx))
