"""Sharding: logical axis names for parameters and activations, mapped to a device mesh by rules.

The mesh has three axes, sized by the experiment config (``config.mesh``):

- ``data``: pure data parallelism (parameters replicated, the batch split);
- ``fsdp``: the batch split *and* parameters (and optimizer state) split, gathered per layer;
- ``tensor``: heads, MLP width and vocabulary split inside each matmul.

Model code names axes logically (``batch``, ``length``, ``embed``, ``heads``, ``kv``, ``mlp``,
``vocab``, ``layers``, ``rank``, ``qblocks``; ``act_embed`` for the model width of activations)
and never names a mesh axis; ``DEFAULT_RULES`` (or ``config.mesh.rules``) maps each logical name
to mesh axes. Parameters get their logical names
from their path (``param_logical_axes``), so the same rules shard float kernels, adapters and the
arrays inside QTensors: a QTensor's packed codes and absmax are split along their block axis
consistently (the flat row-major layout keeps a block's codes and its scale on one device when
the split falls on block boundaries, which ``_fit`` checks).

A mesh axis that does not divide a dimension is dropped for that dimension (the dimension is
replicated instead), so any model runs on any mesh; ``describe`` tells what was split.

While a step is traced under ``use_mesh`` (``within_mesh`` wraps a step function; the train and
eval step makers do it), the model pins its activations to the batch split (``constrain``) and
each 4-bit weight is all-gathered over the batch axes right where it is used
(``gather_for_compute``), i.e. one layer at a time inside the scan over layers. Without these
hints XLA's sharding propagation copied the parameters' ``embed``-on-``fsdp`` layout onto the
activations and moved whole-batch activations between devices instead of weights
(benchmarks/FSDP_NOTES.md).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qlora_jax.lora.params import flatten, unflatten
from qlora_jax.lora.trainable import Trainable
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

# Float kernels [..., in, out] by module name: the logical names of (in, out).
_KERNEL_AXES = {
    "q_proj": ("embed", "heads"), "k_proj": ("embed", "kv"), "v_proj": ("embed", "kv"),
    "o_proj": ("heads", "embed"), "gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"), "lm_head": ("embed", "vocab"),
    # BERT family
    "query": ("embed", "heads"), "key": ("embed", "heads"), "value": ("embed", "heads"),
    "dense": ("embed", "mlp"), "classifier": ("embed", None),
}


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


# -- logical axes of parameters ---------------------------------------------------------------

def _leaf_axes(path: tuple[str, ...], shape: tuple[int, ...], stacked: bool) -> tuple:
    """Logical names for a float parameter at ``path`` with ``shape``."""
    lead = ("layers",) if stacked else ()
    name, module = path[-1], (path[-2] if len(path) > 1 else "")
    body = len(shape) - len(lead)
    if name == "embedding":
        return lead + ("vocab", "embed")[-body:]
    if name in ("kernel", "lora_a", "lora_b") and body == 2:
        io = _KERNEL_AXES.get(module, ("embed", "mlp"))
        if name == "kernel":
            return lead + io
        if name == "lora_a":
            return lead + (io[0], "rank")
        return lead + ("rank", io[1])
    if name == "bias" and body == 1:
        return lead + (_KERNEL_AXES.get(module, (None, None))[1],)
    return lead + (None,) * body


def _qtensor_axes(q: QTensor, stacked: bool) -> QTensor:
    lead = ("layers",) * len(q.stack_shape)
    return q.replace(packed=lead + ("qblocks",), absmax=lead + ("qblocks",),
                     nested_absmax=None if q.nested_absmax is None else lead + (None,),
                     offset=None if q.offset is None else lead)


def param_logical_axes(params: Any) -> Any:
    """A tree like ``params`` whose leaves are tuples of logical axis names (None: replicated).

    QTensors map to QTensors whose array fields hold the names; Trainable boxes keep their box.
    """
    out = {}
    for path, leaf in flatten(params).items():
        stacked = "layers" in path or "layer" in path
        box = isinstance(leaf, Trainable)
        value = leaf.value if box else leaf
        if isinstance(value, QTensor):
            axes = _qtensor_axes(value, stacked)
        else:
            axes = _leaf_axes(path, tuple(np.shape(value)), stacked and np.ndim(value) >= 1)
        out[path] = Trainable(axes) if box else axes
    return unflatten(out)


# -- logical -> mesh --------------------------------------------------------------------------

def _mesh_axes_for(name: Optional[str], rules: Sequence[tuple[str, Any]]) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, axes in rules:
        if logical == name:
            if axes is None:
                return ()
            return tuple(axes) if isinstance(axes, tuple) else (axes,)
    return ()


def _fit(shape: tuple[int, ...], names: Sequence[Optional[str]], mesh: Mesh,
         rules: Sequence[tuple[str, Any]], block: int = 1) -> P:
    """A PartitionSpec for ``shape``: each dim gets the mesh axes its name maps to, dropping
    axes of size 1, axes already used, and axes whose product does not divide the dim."""
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, names):
        chosen = []
        for ax in _mesh_axes_for(name, rules):
            size = mesh.shape[ax]
            if size == 1 or ax in used:
                continue
            total = math.prod(mesh.shape[a] for a in chosen) * size
            if dim % (total * (block if name == "qblocks" else 1)) == 0:
                chosen.append(ax)
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return P(*spec)


def param_shardings(params: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                    memory_kind: Optional[str] = None) -> Any:
    """``NamedSharding``s for every array of ``params`` (QTensor fields and boxes included)."""
    axes = param_logical_axes(params)
    kw = {} if memory_kind is None else {"memory_kind": memory_kind}

    def one(value, names, block=1):
        return NamedSharding(mesh, _fit(tuple(np.shape(value)), names, mesh, rules, block), **kw)

    out = {}
    flat_axes = flatten(axes)
    for path, leaf in flatten(params).items():
        names = flat_axes[path]
        box = isinstance(leaf, Trainable)
        value, names = (leaf.value, names.value) if box else (leaf, names)
        if isinstance(value, QTensor):
            # Packed bytes split on whole blocks (block_size / 2 bytes a block), and the absmax
            # split the same way, so each device holds complete blocks with their own scales.
            packed = one(value.packed, names.packed, value.block_size // 2)
            absmax_spec = P(*(tuple(packed.spec)[:-1] + (packed.spec[-1],)))
            sh = value.replace(
                packed=packed, absmax=NamedSharding(mesh, absmax_spec, **kw),
                nested_absmax=(None if value.nested_absmax is None
                               else one(value.nested_absmax, names.nested_absmax)),
                offset=None if value.offset is None else one(value.offset, names.offset))
        else:
            sh = one(value, names)
        out[path] = Trainable(sh) if box else sh
    return unflatten(out)


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                   ndim: int = 2) -> NamedSharding:
    """Batches ``[B, T, ...]``: B split over the batch mesh axes, the rest replicated."""
    axes = tuple(a for a in _mesh_axes_for("batch", rules) if mesh.shape[a] > 1)
    lead = axes if len(axes) > 1 else (axes[0] if axes else None)
    return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


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


def shard_params(params: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                 memory_kind: Optional[str] = None) -> Any:
    """``jax.device_put`` of params onto their shardings."""
    sh = param_shardings(params, mesh, rules, memory_kind)
    return jax.device_put(params, sh)


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
    """Activation sharding hint by logical names (a no-op outside ``use_mesh``).

    Model code calls it on the activations it produces (e.g. ``("batch", "length",
    "act_embed")`` for a hidden state ``[B, T, D]``) so that XLA keeps the batch split over
    the batch mesh axes; without such hints, sharding propagation may take the layout of a
    parameter (``embed`` on ``fsdp``) for the activations and replicate the batch instead.
    """
    ctx = _CONTEXT.get("mesh")
    if ctx is None:
        return x
    mesh, rules = ctx
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} logical names {tuple(names)} for an array "
                         f"of rank {x.ndim} (shape {x.shape})")
    spec = _fit(tuple(x.shape), names, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _compute_rules(rules: Sequence[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
    """``rules`` without the mesh axes that split the batch (how a weight is laid out for use).

    A weight split over a batch axis (``fsdp``) must be whole on every device of that axis
    when it multiplies the device's rows; splits over the other axes (``tensor``) stay.
    """
    batch_axes = set(_mesh_axes_for("batch", rules))
    out = []
    for name, axes in rules:
        if name == "batch" or axes is None:
            out.append((name, axes))
            continue
        kept = tuple(a for a in (axes if isinstance(axes, tuple) else (axes,))
                     if a not in batch_axes)
        out.append((name, kept if len(kept) > 1 else (kept[0] if kept else None)))
    return tuple(out)


def gather_for_compute(q: QTensor) -> QTensor:
    """A (one-layer) QTensor all-gathered over the batch mesh axes, right where it is used.

    Under ``use_mesh``, the packed codes and absmax are constrained to their parameter split
    minus the batch axes (``fsdp``): XLA then gathers the 4-bit codes of this one weight
    (inside the scan over layers, one layer at a time) and dequantizes and multiplies locally,
    with the activations' batch split untouched. Without the constraint XLA dequantized each
    device's share of the weight and moved activations instead (all-gathers of the whole
    batch's ``[B * T, D]`` hidden states, all-reduces of whole-batch logits). A no-op outside
    ``use_mesh``.
    """
    ctx = _CONTEXT.get("mesh")
    if ctx is None:
        return q
    mesh, rules = ctx
    stored = _codes_spec(q, mesh, rules)
    used = _codes_spec(q, mesh, _compute_rules(rules))
    rep = NamedSharding(mesh, P())

    def put(a, s):
        return None if a is None else jax.lax.with_sharding_constraint(a, s)

    def gather(a):
        # A flat one-layer array split over the batch axes only is gathered through a
        # [k, n / k] view. Constraining the flat [n] directly made XLA gather the layer slice
        # as [1, n] along dim 1; layout assignment then wanted that dim major-most and copied
        # every stacked [L, n] parameter into a transposed layout (the whole 4-bit model once
        # more in temp memory: 3.9 GiB a device for 70B on 8 devices). Through the view XLA
        # gathers a flat [n] along its only dim and needs no copy.
        axes = stored[-1] if isinstance(stored[-1], tuple) else (stored[-1],)
        axes = tuple(ax for ax in axes if ax is not None)
        if q.stack_shape or not axes or used[-1] is not None:
            return put(a, NamedSharding(mesh, used))
        k = math.prod(mesh.shape[ax] for ax in axes)
        return put(a.reshape(k, a.shape[-1] // k), rep).reshape(a.shape)

    return q.replace(packed=gather(q.packed), absmax=gather(q.absmax),
                     nested_absmax=put(q.nested_absmax, rep), offset=put(q.offset, rep))


def splits_4bit_codes(q: QTensor) -> bool:
    """True when, under ``use_mesh``, the stored split of ``q``'s packed codes cuts them over
    devices (then a kernel cannot read one layer of a stack in place; it is gathered instead).
    False outside ``use_mesh``."""
    ctx = _CONTEXT.get("mesh")
    if ctx is None:
        return False
    return any(s is not None for s in _codes_spec(q, *ctx))


def _codes_spec(q: QTensor, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> P:
    """The PartitionSpec ``rules`` give ``q``'s packed codes (split on whole blocks)."""
    names = ("layers",) * len(q.stack_shape) + ("qblocks",)
    return _fit(tuple(q.packed.shape), names, mesh, rules, q.block_size // 2)


def within_mesh(fn: Callable[..., Any], mesh: Mesh,
                rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Callable[..., Any]:
    """``fn`` traced under ``use_mesh(mesh, rules)`` (wrap a step before ``jax.jit``).

    The activation hints (``constrain``) and per-use weight gathers (``gather_for_compute``)
    of the model only exist when a mesh is in context while the step is traced.
    """
    import functools

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with use_mesh(mesh, rules):
            return fn(*args, **kwargs)
    return wrapped


_CONTEXT: dict[str, Any] = {}


@dataclasses.dataclass
class use_mesh:  # noqa: N801 - a context manager named like one
    """Within this context, ``constrain`` places activations on ``mesh`` by ``rules``."""

    mesh: Mesh
    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES

    def __enter__(self):
        self._prev = _CONTEXT.get("mesh")
        _CONTEXT["mesh"] = (self.mesh, tuple(self.rules))
        return self

    def __exit__(self, *exc):
        if self._prev is None:
            _CONTEXT.pop("mesh", None)
        else:
            _CONTEXT["mesh"] = self._prev
        return False


def describe(params: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> str:
    """One line a parameter: path, shape and PartitionSpec (what got split where)."""
    lines = []
    sh = flatten(param_shardings(params, mesh, rules))
    for path, leaf in flatten(params).items():
        s = sh[path]
        s = s.value if isinstance(s, Trainable) else s
        v = leaf.value if isinstance(leaf, Trainable) else leaf
        if isinstance(v, QTensor):
            lines.append(f"{'/'.join(path)} QTensor{v.shape} packed {s.packed.spec} "
                         f"absmax {s.absmax.spec}")
        else:
            lines.append(f"{'/'.join(path)} {tuple(np.shape(v))} {s.spec}")
    return "\n".join(lines)


def distributed_initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> bool:
    """``jax.distributed.initialize`` from arguments or the usual environment variables.

    Arguments win; otherwise ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` are read (cluster environments such as SLURM are detected by JAX itself
    when none is given and ``QLORA_JAX_DISTRIBUTED=auto``). Returns whether it initialised.
    """
    import os
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    n = num_processes if num_processes is not None else os.environ.get("JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else os.environ.get("JAX_PROCESS_ID")
    if coordinator is None and os.environ.get("QLORA_JAX_DISTRIBUTED") != "auto":
        return False
    # CPU collectives across processes. Set unconditionally: asking for the backend here
    # (jax.default_backend()) would start it, and jax.distributed must come first.
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # noqa: BLE001 - option name differs across JAX versions
        pass
    kwargs = {}
    if coordinator is not None:
        if n is None or pid is None:
            raise ValueError(f"coordinator {coordinator} given without the number of processes "
                             "and this process's id (--num_processes/--process_id or "
                             "JAX_NUM_PROCESSES/JAX_PROCESS_ID)")
        n, pid = int(n), int(pid)
        if n < 1 or not 0 <= pid < n:
            raise ValueError(f"process id {pid} must lie in 0..{n - 1} (number of processes {n})")
        kwargs.update(coordinator_address=coordinator, num_processes=n, process_id=pid)
    jax.distributed.initialize(**kwargs)
    return True


def tree_memory_kind(tree: Any) -> set[str]:
    """The memory kinds the arrays of a tree live in (e.g. ``{"pinned_host"}``)."""
    kinds = set()
    for leaf in jax.tree.leaves(tree):
        sh = getattr(leaf, "sharding", None)
        if sh is not None and getattr(sh, "memory_kind", None):
            kinds.add(sh.memory_kind)
    return kinds


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def map_shardings(fn: Callable[[NamedSharding], NamedSharding], shardings: Any) -> Any:
    return jax.tree.map(fn, shardings, is_leaf=lambda x: isinstance(x, NamedSharding))


__all__ = [
    "DEFAULT_RULES", "MESH_AXES", "batch_sharding", "constrain", "describe",
    "gather_for_compute", "within_mesh",
    "distributed_initialize", "make_mesh", "map_shardings", "param_logical_axes",
    "param_shardings", "replicated", "rules_from_config", "shard_batch", "shard_params",
    "tree_memory_kind", "use_mesh",
]
