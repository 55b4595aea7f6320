"""Partitioning by logical axis names, and of QTensors on whole blocks.

Arrays name their dimensions logically (``("embed", "heads")``, ``("batch", "length",
"act_embed")``); rules (``[(logical, mesh axes), ...]``, as ``flax.linen.logical_axis_rules``
takes them) map the names to mesh axes. ``fit_spec`` turns names into a ``PartitionSpec``
that always fits: a mesh axis of size 1, one already used by an earlier dimension, or one
whose size does not divide the dimension is dropped (that dimension is replicated instead).

A QTensor's packed codes and absmax are split along their flat block axis (``"qblocks"``)
on whole blocks only (``block_size / 2`` bytes of codes a block), so each device holds
complete blocks with their own scales.

The mesh and rules "in context" are JAX's and Flax's own: ``jax.set_mesh(mesh)`` and
``flax.linen.logical_axis_rules(rules)``, entered around the call that traces a step.
``gather_for_compute`` and ``splits_4bit_codes`` read them; both are no-ops without them.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from qlora_jax.quant.qtensor import QTensor

Rules = Sequence[tuple[str, Any]]

#: The logical name of a QTensor's flat block axis (packed codes and absmax).
QBLOCKS = "qblocks"


def mesh_axes_for(name: Optional[str], rules: Rules) -> tuple[str, ...]:
    """The mesh axes ``rules`` map the logical ``name`` to (first matching rule; () if none)."""
    if name is None:
        return ()
    for logical, axes in rules:
        if logical == name:
            if axes is None:
                return ()
            return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)
    return ()


def fit_spec(shape: Sequence[int], names: Sequence[Optional[str]], mesh_shape: Mapping[str, int],
             rules: Rules, block: int = 1) -> P:
    """A PartitionSpec for ``shape``: each dimension gets the mesh axes its name maps to,
    dropping axes of size 1, axes already used and axes whose product does not divide it.

    Args:
      shape: the array's shape.
      names: one logical name (or None: replicated) a dimension.
      mesh_shape: mesh axis -> size (``Mesh.shape`` or ``AbstractMesh.shape``).
      rules: logical -> mesh axes.
      block: a ``"qblocks"`` dimension is only split on multiples of ``block`` elements.
    """
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, names):
        chosen: list[str] = []
        for ax in mesh_axes_for(name, rules):
            size = mesh_shape[ax]
            if size == 1 or ax in used:
                continue
            total = math.prod(mesh_shape[a] for a in chosen) * size
            if dim % (total * (block if name == QBLOCKS else 1)) == 0:
                chosen.append(ax)
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return P(*spec)


def qtensor_axes(q: QTensor, lead: Optional[Sequence[Optional[str]]] = None) -> QTensor:
    """A QTensor like ``q`` whose array fields hold their logical names: the stack axes are
    ``lead`` (default ``"layers"`` each: the declared leading axes of the kernel ``q`` stands
    for), packed codes and absmax lie on ``"qblocks"``, the second-level scales and the offset
    are replicated."""
    lead = ("layers",) * len(q.stack_shape) if lead is None else tuple(lead)
    return q.replace(packed=lead + (QBLOCKS,), absmax=lead + (QBLOCKS,),
                     nested_absmax=None if q.nested_absmax is None else lead + (None,),
                     offset=None if q.offset is None else lead)


def codes_spec(q: QTensor, mesh_shape: Mapping[str, int], rules: Rules) -> P:
    """The PartitionSpec ``rules`` give ``q``'s packed codes (split on whole blocks).

    The absmax takes the same spec (one scale a block: its blocks split where the codes' do).
    """
    names = ("layers",) * len(q.stack_shape) + (QBLOCKS,)
    return fit_spec(tuple(q.packed.shape), names, mesh_shape, rules, q.block_size // 2)


def qtensor_specs(q: QTensor, names: QTensor, mesh_shape: Mapping[str, int],
                  rules: Rules) -> QTensor:
    """A QTensor like ``q`` whose array fields hold their PartitionSpecs, from ``names`` (a
    QTensor of logical names, ``qtensor_axes``): codes split on whole blocks, the absmax the
    same way (one scale a block, its blocks on the devices of their codes)."""
    packed = fit_spec(tuple(q.packed.shape), names.packed, mesh_shape, rules, q.block_size // 2)

    def small(a, n):
        return None if a is None else fit_spec(tuple(a.shape), n, mesh_shape, rules)
    return q.replace(packed=packed, absmax=packed,
                     nested_absmax=small(q.nested_absmax, names.nested_absmax),
                     offset=small(q.offset, names.offset))


def compute_rules(rules: Rules) -> tuple[tuple[str, Any], ...]:
    """``rules`` without the mesh axes that split the batch (how a weight is laid out for use).

    A weight split over a batch axis (``fsdp``) must be whole on every device of that axis
    when it multiplies the device's rows; splits over the other axes (``tensor``) stay.
    """
    batch_axes = set(mesh_axes_for("batch", rules))
    out = []
    for name, axes in rules:
        if name == "batch" or axes is None:
            out.append((name, axes))
            continue
        kept = tuple(a for a in (axes if isinstance(axes, (tuple, list)) else (axes,))
                     if a not in batch_axes)
        out.append((name, kept if len(kept) > 1 else (kept[0] if kept else None)))
    return tuple(out)


def context() -> Optional[tuple[Mapping[str, int], Rules]]:
    """(mesh shape, rules) of ``jax.set_mesh`` and ``flax.linen.logical_axis_rules`` in effect
    (None unless both are)."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return None
    return dict(mesh.shape), tuple(rules)


def gather_for_compute(q: QTensor) -> QTensor:
    """A (one-layer) QTensor all-gathered over the batch mesh axes, right where it is used.

    With a mesh and rules in context, the packed codes and absmax are constrained to their
    parameter split minus the batch axes (``fsdp``): XLA then gathers the 4-bit codes of this
    one weight (inside the loop over layers, one layer at a time) and dequantizes and
    multiplies locally, with the activations' batch split untouched. Without the constraint
    XLA dequantized each device's share of the weight and moved activations instead
    (all-gathers of the whole batch's ``[B * T, D]`` hidden states, all-reduces of whole-batch
    logits). A no-op without a mesh and rules in context.
    """
    ctx = context()
    if ctx is None:
        return q
    mesh_shape, rules = ctx
    stored = codes_spec(q, mesh_shape, rules)
    used = codes_spec(q, mesh_shape, compute_rules(rules))

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
            return put(a, used)
        k = math.prod(mesh_shape[ax] for ax in axes)
        return put(a.reshape(k, a.shape[-1] // k), P()).reshape(a.shape)

    return q.replace(packed=gather(q.packed), absmax=gather(q.absmax),
                     nested_absmax=put(q.nested_absmax, P()), offset=put(q.offset, P()))


def splits_4bit_codes(q: QTensor) -> bool:
    """True when, with a mesh and rules in context, the stored split of ``q``'s packed codes
    cuts them over devices (then a kernel cannot read one layer of a stack in place; it is
    gathered instead). False without them."""
    ctx = context()
    if ctx is None:
        return False
    return any(s is not None for s in codes_spec(q, *ctx))
