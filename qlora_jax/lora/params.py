"""Which leaves of a params tree train, and splitting a tree into trainable and frozen parts.

The params tree holds frozen weights (float arrays or QTensors), adapters
(``lora_a`` / ``lora_b`` leaves, and DoRA's ``lora_magnitude``, beside the kernel they adapt) and
``modules_to_save`` weights (boxed in ``Trainable``). "Leaves" here treat a
QTensor and a Trainable box as single leaves.
"""

from __future__ import annotations

from typing import Any

from qlora_jax.lora.trainable import Trainable
from qlora_jax.lora.tree import Params, flatten, unflatten

ADAPTER_NAMES = ("lora_a", "lora_b", "lora_magnitude")


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


