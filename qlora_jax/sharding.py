"""Sharding: a device mesh, logical-axis rules, and the shardings of parameters and batches.

The mesh has three axes, sized by the experiment config (``config.mesh``):

- ``data``: pure data parallelism (parameters replicated, the batch split);
- ``fsdp``: the batch split *and* parameters (and optimizer state) split, gathered per layer;
- ``tensor``: heads, MLP width and vocabulary split inside each matmul.

Model code names axes logically (``batch``, ``length``, ``embed``, ``heads``, ``kv``, ``mlp``,
``vocab``, ``layers``, ``rank``, ``qblocks``; ``act_embed`` for the model width of activations)
and never names a mesh axis; ``DEFAULT_RULES`` (or ``config.mesh.rules``) maps each logical name
to mesh axes, in the form ``flax.linen.logical_axis_rules`` takes. Parameters get their logical
names from the model that declares them (``model.param_axes()``: each module names the axes of
the parameters it creates; adapters take theirs from their kernel's), so the same rules shard
float kernels, adapters and the arrays inside QTensors: a QTensor's packed codes and absmax are
split along their block axis consistently, on whole blocks (``qlora_jax.quant.partition``).
Nothing here knows a model family.

A mesh axis that does not divide a dimension is dropped for that dimension (the dimension is
replicated instead), so any model runs on any mesh; ``describe`` tells what was split.

A step traced under ``jax.set_mesh(mesh)`` and ``flax.linen.logical_axis_rules(rules)``
(``in_mesh`` wraps a jitted step so; the train and eval step makers do it) pins the model's
activations to the batch split (``models.axes.constrain``) and all-gathers each 4-bit weight
over the batch axes right where it is used (``quant.partition.gather_for_compute``), i.e. one
layer at a time inside the loop over layers. Without these hints XLA's sharding propagation
copied the parameters' ``embed``-on-``fsdp`` layout onto the activations and moved whole-batch
activations between devices instead of weights (benchmarks/FSDP_NOTES.md).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from flax.core import meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qlora_jax.quant.partition import fit_spec, mesh_axes_for, qtensor_axes, qtensor_specs
from qlora_jax.quant.qtensor import QTensor

MESH_AXES = ("data", "fsdp", "tensor")

#: logical axis -> mesh axes (tuple: split over their product, in order).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    # LoRA B [R, out]: its out axis is heads/kv/mlp (tensor); the rank axis takes fsdp so
    # adapters and their optimizer state are split over fsdp too (A splits on embed).
    ("rank", "fsdp"),
    ("qblocks", ("fsdp", "tensor")),
    ("norm", None),
    ("act_embed", None),
)

def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices).

    Raises:
      ValueError: the axis sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = (int(data), int(fsdp), int(tensor))
    if min(sizes) < 1:
        raise ValueError(f"mesh sizes must be >= 1, got data={data} fsdp={fsdp} tensor={tensor}")
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh data x fsdp x tensor = {data} x {fsdp} x {tensor} = "
                         f"{math.prod(sizes)} does not match the {len(devices)} available devices")
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def rules_from_config(mesh_cfg: Any = None) -> tuple[tuple[str, Any], ...]:
    """The rules of ``config.mesh.rules`` (a list of [logical, mesh axes]) or the defaults."""
    rules = getattr(mesh_cfg, "rules", None) if mesh_cfg is not None else None
    if not rules:
        return DEFAULT_RULES
    out = []
    for item in rules:
        name, axes = item[0], item[1]
        if isinstance(axes, list):
            axes = tuple(axes)
        for a in (axes if isinstance(axes, tuple) else (axes,)):
            if a is not None and a not in MESH_AXES:
                raise ValueError(f"mesh rule {name!r} -> {axes!r}: unknown mesh axis {a!r}; "
                                 f"mesh axes are {MESH_AXES}")
        seq = axes if isinstance(axes, tuple) else (axes,)
        if name == "qblocks" and "tensor" in seq and "fsdp" in seq \
                and seq.index("tensor") < seq.index("fsdp"):
            # Known bug (benchmarks/FSDP_NOTES.md): with this split the forward is right but
            # the updates on a 2x2x2 mesh are wrong. Refuse it rather than train wrongly.
            raise ValueError(f"mesh rule 'qblocks' -> {axes!r}: splitting 4-bit codes tensor "
                             "before fsdp gives wrong updates (a known, unexplained bug); use "
                             "('fsdp', 'tensor')")
        out.append((name, axes))
    return tuple(out)


# -- parameter trees --------------------------------------------------------------------------

def _is_leaf(x: Any) -> bool:
    # QTensors and boxed parameters (flax AxisMetadata, e.g. a modules_to_save mark) are leaves.
    return isinstance(x, (QTensor, meta.AxisMetadata))


def _flatten(tree: Any) -> dict[tuple[str, ...], Any]:
    if hasattr(tree, "unfreeze"):
        tree = tree.unfreeze()
    return traverse_util.flatten_dict(tree, is_leaf=lambda _, v: _is_leaf(v))


def _unbox(x: Any) -> Any:
    return x.unbox() if isinstance(x, meta.AxisMetadata) else x


def _rebox(like: Any, value: Any) -> Any:
    return like.replace_boxed(value) if isinstance(like, meta.AxisMetadata) else value


# -- logical axes of parameters ---------------------------------------------------------------

def logical_axes(params: Any, axes: Any) -> Any:
    """A tree like ``params`` whose leaves are tuples of logical names (None: replicated).

    Args:
      params: a params tree (or a part of one: its paths are looked up in ``axes``).
      axes: the model's declared axes (``model.param_axes()``): one tuple of names a parameter,
        a QTensor kernel named like the float kernel it stands for.

    A QTensor maps to a QTensor whose array fields hold their names (its stack axes, then
    ``"qblocks"``); boxes keep their box.

    Raises:
      ValueError: a parameter the model does not declare, or one whose rank differs from its
        declaration's (e.g. adapters stacked for several tasks).
    """
    flat_axes = _flatten(axes)
    out = {}
    for path, leaf in _flatten(params).items():
        if path not in flat_axes:
            raise ValueError(f"parameter {'/'.join(path)} is not one of the model's parameters "
                             "(its param_axes() does not name it)")
        value, names = _unbox(leaf), flat_axes[path]
        if isinstance(value, QTensor):
            stack = len(value.stack_shape)
            lead = tuple(names[:stack]) if names is not None else (None,) * stack
            out[path] = _rebox(leaf, qtensor_axes(value, lead))
            continue
        ndim = np.ndim(value)
        names = (None,) * ndim if names is None else tuple(names)
        if len(names) != ndim:
            raise ValueError(f"parameter {'/'.join(path)} of shape {np.shape(value)} is declared "
                             f"with {len(names)} logical axes {names}")
        out[path] = _rebox(leaf, names)
    return traverse_util.unflatten_dict(out)


# -- logical -> mesh --------------------------------------------------------------------------

def param_shardings(params: Any, axes: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                    memory_kind: Optional[str] = None) -> Any:
    """``NamedSharding``s for every array of ``params`` (QTensor fields and boxes included).

    ``axes``: the model's declared axes (``model.param_axes()``; see ``logical_axes``).
    """
    kw = {} if memory_kind is None else {"memory_kind": memory_kind}

    def named(spec: Optional[P]) -> Optional[NamedSharding]:
        return None if spec is None else NamedSharding(mesh, spec, **kw)

    out = {}
    flat_axes = _flatten(logical_axes(params, axes))
    for path, leaf in _flatten(params).items():
        value, names = _unbox(leaf), _unbox(flat_axes[path])
        if isinstance(value, QTensor):
            specs = qtensor_specs(value, names, mesh.shape, rules)
            sh = value.replace(packed=named(specs.packed), absmax=named(specs.absmax),
                               nested_absmax=named(specs.nested_absmax),
                               offset=named(specs.offset))
        else:
            sh = named(fit_spec(tuple(np.shape(value)), names, mesh.shape, rules))
        out[path] = _rebox(leaf, sh)
    return traverse_util.unflatten_dict(out)


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                   ndim: int = 2) -> NamedSharding:
    """Batches ``[B, T, ...]``: B split over the batch mesh axes, the rest replicated."""
    axes = tuple(a for a in mesh_axes_for("batch", rules) if mesh.shape[a] > 1)
    lead = axes if len(axes) > 1 else (axes[0] if axes else None)
    return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> int:
    """Rows a global batch must be a multiple of (the product of the batch mesh axes)."""
    return math.prod(mesh.shape[a] for a in mesh_axes_for("batch", rules))


def shard_batch(batch: dict[str, Any], mesh: Mesh,
                rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> dict[str, jax.Array]:
    """Places a host batch (numpy arrays with this process's rows) on the mesh.

    One process: ``jax.device_put``. Several processes: each passes its own rows and the global
    array is assembled with ``jax.make_array_from_process_local_data``.
    """
    out = {}
    for k, v in batch.items():
        sh = batch_sharding(mesh, rules, np.ndim(v))
        if jax.process_count() > 1:
            out[k] = jax.make_array_from_process_local_data(sh, np.asarray(v))
        else:
            out[k] = jax.device_put(np.asarray(v), sh)
    return out


def shard_params(params: Any, axes: Any, mesh: Mesh,
                 rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                 memory_kind: Optional[str] = None) -> Any:
    """``jax.device_put`` of params onto their shardings (``axes``: ``model.param_axes()``)."""
    return jax.device_put(params, param_shardings(params, axes, mesh, rules, memory_kind))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


class in_mesh:  # noqa: N801 - used like a function (a decorator)
    """A jitted function called (and lowered) under ``jax.set_mesh(mesh)`` and
    ``flax.linen.logical_axis_rules(rules)``, so that the activation hints and per-use weight
    gathers of the model apply while it is traced.

        step = in_mesh(jax.jit(step_fn, in_shardings=..., out_shardings=...), mesh, rules)
    """

    def __init__(self, jitted: Callable[..., Any], mesh: Mesh,
                 rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
        self.jitted, self.mesh, self.rules = jitted, mesh, tuple(rules)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.jitted(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.jitted.lower(*args, **kwargs)


def describe(params: Any, axes: Any, mesh: Mesh,
             rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> str:
    """One line a parameter: path, shape and PartitionSpec (what got split where)."""
    lines = []
    sh = _flatten(param_shardings(params, axes, mesh, rules))
    for path, leaf in _flatten(params).items():
        s, v = _unbox(sh[path]), _unbox(leaf)
        if isinstance(v, QTensor):
            lines.append(f"{'/'.join(path)} QTensor{v.shape} packed {s.packed.spec} "
                         f"absmax {s.absmax.spec}")
        else:
            lines.append(f"{'/'.join(path)} {tuple(np.shape(v))} {s.spec}")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_RULES", "MESH_AXES", "batch_divisor", "batch_sharding", "describe", "in_mesh",
    "logical_axes", "make_mesh", "param_shardings", "replicated", "rules_from_config",
    "shard_batch", "shard_params",
]
