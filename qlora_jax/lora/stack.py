"""Many adapters over one frozen base: adapter leaves stacked on an adapter axis.

    stacked = qj.lora.stack_adapters([params_a, params_b, params_c])
    out = qj.generate(model, stacked, ids, 64, adapter_index=jnp.array([0, 2, 1, 0]))

Every params tree must hold the same frozen base (the same arrays, or equal ones) and adapters
of the same shapes. The result keeps the base once; each adapter leaf gains an axis of size N
(the number of adapters) right before its own matrix axes, so layer-stacked leaves stay
layer-major: ``lora_a`` ``[L, in, R]`` becomes ``[L, N, in, R]``, a head's ``[in, R]`` becomes
``[N, in, R]``. ``LoraDense`` sees the extra axis and picks each batch row's adapter by
``adapter_index`` (a gather per row, as S-LoRA and Punica do).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.lora.params import is_adapter_path
from qlora_jax.lora.tree import flatten, unflatten
from qlora_jax.quant.qtensor import QTensor

#: Axes of an adapter leaf's own value (after any layer axes): A and B are matrices.
_OWN_NDIM = {"lora_a": 2, "lora_b": 2, "lora_magnitude": 1}


def own_ndim(name: str) -> int:
    """Axes of one adapter leaf named ``name`` for one layer and one adapter."""
    return _OWN_NDIM.get(name, 2)


def stack_adapters(trees: Sequence[Any]) -> Any:
    """Stacks the adapters of ``trees`` (params of one model) over their shared frozen base.

    Args:
      trees: two or more params trees of the same model with the same frozen weights.

    Returns:
      One params tree: the base of ``trees[0]`` and every adapter leaf stacked on a new
      adapter axis (index i = ``trees[i]``'s adapter).

    Raises:
      ValueError: fewer than two trees, trees of different structure or adapter shapes, or
        frozen weights that differ (adapters must share one base).
    """
    if len(trees) < 2:
        raise ValueError(f"stack_adapters needs at least two params trees, got {len(trees)}")
    flats = [flatten(t) for t in trees]
    keys = set(flats[0])
    if not any(is_adapter_path(p) for p in keys):
        raise ValueError("stack_adapters: the params hold no adapters (lora_a / lora_b)")
    out: dict[tuple[str, ...], Any] = {}
    for i, flat in enumerate(flats[1:], start=1):
        if set(flat) != keys:
            diff = sorted("/".join(p) for p in set(flat) ^ keys)[:3]
            raise ValueError(f"stack_adapters: tree {i} has other leaves than tree 0 "
                             f"(e.g. {diff}); all trees must come from one model")
    for path in sorted(keys):
        leaves = [f[path] for f in flats]
        if is_adapter_path(path):
            shapes = {tuple(np.shape(v)) for v in leaves}
            if len(shapes) != 1:
                raise ValueError(f"stack_adapters: {'/'.join(path)} has different shapes "
                                 f"{sorted(shapes)}; adapters must have the same rank and targets")
            axis = np.ndim(leaves[0]) - own_ndim(path[-1])
            out[path] = jnp.stack([jnp.asarray(v) for v in leaves], axis=axis)
            continue
        for i, v in enumerate(leaves[1:], start=1):
            if not _same(leaves[0], v):
                raise ValueError(f"stack_adapters: the frozen weight {'/'.join(path)} of tree {i} "
                                 "differs from tree 0's; stacked adapters share one base")
        out[path] = leaves[0]
    return unflatten(out)


def adapter_count(params: Any, plain: Any) -> int:
    """N when ``params`` hold adapters stacked by ``stack_adapters``, else 0.

    Args:
      params: the params to inspect.
      plain: the same model's params (or their shapes, ``jax.eval_shape``) with one adapter
        set: a stacked adapter leaf has one axis more than its plain counterpart.
    """
    ref = flatten(plain)
    for path, leaf in flatten(params).items():
        if path[-1] == "lora_a" and path in ref:
            extra = np.ndim(leaf) - len(np.shape(ref[path]))
            if extra == 1:
                return int(np.shape(leaf)[np.ndim(leaf) - 1 - own_ndim("lora_a")])
            if extra:
                raise ValueError(f"{'/'.join(path)} has shape {list(np.shape(leaf))}; the model "
                                 f"expects {list(np.shape(ref[path]))} (or one adapter axis more)")
            return 0
    return 0


def _same(a: Any, b: Any) -> bool:
    """True when two frozen leaves (arrays or QTensors) are the same object or equal."""
    if a is b:
        return True
    if isinstance(a, QTensor) != isinstance(b, QTensor):
        return False
    if isinstance(a, QTensor) and (a.logical_shape, a.qtype, a.block_size) != (
            b.logical_shape, b.qtype, b.block_size):
        return False
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.shape(x) == np.shape(y) and bool(np.array_equal(np.asarray(x), np.asarray(y)))
        for x, y in zip(la, lb))
