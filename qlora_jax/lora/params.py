"""Params-tree utilities: which leaves train, and splitting a tree into trainable and frozen parts.

The params tree holds frozen weights (float arrays or QTensors), adapters
(``lora_a`` / ``lora_b`` leaves, and DoRA's ``lora_magnitude``, beside the kernel they adapt) and
``modules_to_save`` weights (boxed in ``Trainable``). "Leaves" here treat a
QTensor and a Trainable box as single leaves.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from flax import traverse_util

from qlora_jax.lora.trainable import Trainable
from qlora_jax.quant.qtensor import QTensor

ADAPTER_NAMES = ("lora_a", "lora_b", "lora_magnitude")
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


def is_adapter_path(path: tuple[str, ...]) -> bool:
    return bool(path) and path[-1] in ADAPTER_NAMES


def trainable_mask(params: Params) -> Params:
    """A tree of bools: True exactly on adapter leaves and on ``modules_to_save`` leaves.

    QTensors and Trainable boxes count as one leaf each, so the mask is a prefix
    of the params tree (what ``optax.masked`` expects).
    """
    flat = flatten(params)
    return unflatten({p: bool(is_adapter_path(p) or isinstance(v, Trainable))
                      for p, v in flat.items()})


def partition(params: Params, mask: Params | None = None) -> tuple[Params, Params]:
    """Splits params into (trainable, frozen) trees holding disjoint leaves."""
    mask = trainable_mask(params) if mask is None else mask
    flat, flat_mask = flatten(params), flatten(mask)
    trainable = {p: v for p, v in flat.items() if flat_mask[p]}
    frozen = {p: v for p, v in flat.items() if not flat_mask[p]}
    return unflatten(trainable), unflatten(frozen)


def combine(*trees: Params) -> Params:
    """Inverse of ``partition``: merges trees with disjoint leaves into one."""
    out: dict[tuple[str, ...], Any] = {}
    for t in trees:
        for p, v in flatten(t).items():
            if p in out:
                raise ValueError(f"combine: leaf {'/'.join(p)} appears in more than one tree")
            out[p] = v
    return unflatten(out)


def adapters(params: Params) -> Params:
    """The adapter leaves only (``lora_a`` / ``lora_b`` / ``lora_magnitude``)."""
    return unflatten({p: v for p, v in flatten(params).items() if is_adapter_path(p)})


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
