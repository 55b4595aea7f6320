"""Logical axes in model code: the axes parameters declare, and activation sharding hints.

Model code names axes logically (``embed``, ``heads``, ``kv``, ``mlp``, ``vocab``, ``norm``,
``rank``; ``layers`` for the stacked layer axis) and never a mesh axis; the rules that map them
to mesh axes live with the run (``qlora_jax.sharding``).

- Parameters declare their axes where they are created, with Flax's partitioning metadata
  (``nn.with_logical_partitioning``; ``nn.scan`` adds ``layers`` through
  ``metadata_params={nn.PARTITION_NAME: "layers"}``). A model's ``init`` returns the plain
  arrays (``unbox``); ``declared_axes`` reads the names from the boxed tree of Flax's own
  ``init`` (``LoraModelMixin.param_axes``).
- Activations: ``constrain`` is ``flax.linen.with_logical_constraint`` with one difference: a
  mesh axis that does not divide a dimension is dropped for it (the dimension is replicated),
  so any model runs on any mesh.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
from flax import traverse_util

from qlora_jax.quant.partition import context, fit_spec
from qlora_jax.quant.qtensor import QTensor

Axes = tuple[Optional[str], ...]


def _declared(x: Any) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def unbox(tree: Any) -> Any:
    """``tree`` with every declared-axes box replaced by its value (no sharding constraint)."""
    return jax.tree.map(lambda x: x.value if _declared(x) else x, tree, is_leaf=_declared)


def declared_axes(boxed_params: Any) -> dict[str, Any]:
    """The logical axes of each parameter of a boxed params tree, as a nested dict like it.

    A leaf gets the tuple of names its box declares (a QTensor kernel: the names of the float
    kernel it stands for, stack axes first), or None where no axes were declared.
    """
    if hasattr(boxed_params, "unfreeze"):
        boxed_params = boxed_params.unfreeze()
    flat = traverse_util.flatten_dict(
        boxed_params, is_leaf=lambda _, v: _declared(v) or isinstance(v, QTensor))
    return traverse_util.unflatten_dict(
        {path: tuple(v.names) if _declared(v) else None for path, v in flat.items()})


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
