"""Params-tree helpers: flatten by path, map, count and measure (not part of ``qj.lora``'s API).

"Leaves" here treat a QTensor and a Trainable box (a ``modules_to_save`` mark) as single leaves.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from flax import traverse_util

from qlora_jax.lora.trainable import Trainable
from qlora_jax.quant.qtensor import QTensor

Params = dict[str, Any]


def is_leaf(x: Any) -> bool:
    """Leaf test for params trees: arrays, QTensors and Trainable boxes."""
    return isinstance(x, (QTensor, Trainable))


def flatten(params: Params) -> dict[tuple[str, ...], Any]:
    """``{path: leaf}`` with QTensors and Trainable boxes kept whole."""
    return traverse_util.flatten_dict(_as_dict(params), is_leaf=lambda _, v: is_leaf(v))


def unflatten(flat: dict[tuple[str, ...], Any]) -> Params:
    return traverse_util.unflatten_dict(flat)


def _as_dict(params: Any) -> Any:
    # FrozenDicts and other mappings become plain dicts.
    if hasattr(params, "unfreeze"):
        params = params.unfreeze()
    return params


def unbox(params: Params) -> Params:
    """Removes Trainable boxes (the plain tree ``nn.Module.apply`` also accepts)."""
    return jax.tree.map(lambda x: x.value if isinstance(x, Trainable) else x, params,
                        is_leaf=lambda x: isinstance(x, Trainable))


def map_leaves(fn: Callable[[tuple[str, ...], Any], Any], params: Params) -> Params:
    return unflatten({p: fn(p, v) for p, v in flatten(params).items()})


def count(params: Params, mask: Params | None = None) -> int:
    """Number of parameters (QTensors count their logical elements)."""
    flat = flatten(params)
    flat_mask = flatten(mask) if mask is not None else None
    total = 0
    for p, v in flat.items():
        if flat_mask is not None and not flat_mask[p]:
            continue
        v = v.value if isinstance(v, Trainable) else v
        total += v.size if isinstance(v, QTensor) else int(np.prod(np.shape(v)))
    return total


def nbytes(params: Params) -> int:
    """Bytes of all stored arrays (QTensors count packed codes and scales)."""
    total = 0
    for v in flatten(params).values():
        v = v.value if isinstance(v, Trainable) else v
        if isinstance(v, QTensor):
            total += v.nbytes
        else:
            total += int(np.prod(np.shape(v))) * np.dtype(v.dtype).itemsize
    return total
