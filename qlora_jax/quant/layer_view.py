"""LayerView: one layer of a QTensor stacked over layers, read where it lies.

Inside a scan over stacked layers, slicing each 4-bit weight out of its ``[L, ...]``
buffer costs a device copy a weight a layer (XLA materialises a dynamic slice that feeds
a kernel). A ``LayerView`` keeps the whole stacked QTensor and the layer index instead;
the GPU dequantization kernel reads that layer's codes and scales in place
(``kernels.gpu.dequantize_layer``). Anything else calls ``materialize()``, the sliced
QTensor, so a view is correct everywhere a QTensor is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qlora_jax.quant.qtensor import QTensor

# Flat offsets in the kernels are int32: a stack must keep every array under this size.
MAX_IN_PLACE_ELEMENTS = 2 ** 31 - 1


@jax.tree_util.register_pytree_node_class
class LayerView:
    """Layer ``index`` of ``stacked`` (a QTensor with one leading layer axis).

    Attributes:
      stacked: the QTensor ``[L, ...]`` (its arrays are not copied).
      index: int32 scalar, the layer (traced inside a scan).
    """

    __slots__ = ("stacked", "index")

    def __init__(self, stacked: QTensor, index):
        if not isinstance(stacked, QTensor) or len(stacked.stack_shape) != 1:
            raise ValueError(f"LayerView needs a QTensor stacked along one layer axis, got "
                             f"{stacked!r}")
        self.stacked = stacked
        self.index = index

    def tree_flatten(self):
        return (self.stacked, self.index), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.stacked, obj.index = children
        return obj

    # -- the facts of one layer's QTensor -----------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.stacked.logical_shape

    @property
    def logical_shape(self) -> tuple[int, ...]:
        return self.stacked.logical_shape

    @property
    def dtype(self):
        return self.stacked.dtype

    def materialize(self) -> QTensor:
        """The layer as a QTensor of its own (a dynamic slice of every array)."""
        i = jnp.asarray(self.index, jnp.int32)
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False),
                            self.stacked)

    def fits_int32(self) -> bool:
        """True when every stacked array is small enough for the kernels' int32 offsets."""
        return fits_int32(self.stacked)

    def __repr__(self) -> str:
        return f"LayerView({self.stacked!r}, index={self.index})"


def fits_int32(stacked: QTensor) -> bool:
    """True when every array of ``stacked`` is small enough for the kernels' int32 offsets."""
    return all(a.size <= MAX_IN_PLACE_ELEMENTS for a in jax.tree.leaves(stacked))
