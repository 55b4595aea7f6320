"""QTensor: a blockwise 4-bit tensor as a JAX pytree.

Storage follows bitsandbytes: the tensor is flattened row-major (as stored, so
a ``[out, in]`` PyTorch Linear weight), cut into blocks of ``block_size``
elements (the last one may be partial), each block scaled by its absmax and
every element replaced by a 4-bit code, two codes a byte (element 2j in the
high nibble). With double quantization the float32 absmax are themselves
quantized: ``absmax - offset`` in blocks of ``nested_block_size`` to the signed
8-bit dynamic map, with one float32 ``nested_absmax`` a nested block.

Arrays (pytree children): ``packed`` uint8 ``[..., ceil(n / 2)]``, ``absmax``
(float32, or uint8 codes when double-quantized) ``[..., n_blocks]``,
``nested_absmax`` float32 ``[..., n_nested]`` and ``offset`` float32 ``[...]``
(``None`` without double quantization). Leading ``...`` axes appear when
QTensors are stacked, e.g. by ``nn.scan`` over layers: ``shape`` then reports
``stack_shape + logical_shape``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

ALLOWED_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
ALLOWED_NESTED_BLOCK_SIZES = (256,)


@jax.tree_util.register_pytree_node_class
class QTensor:
    """A 4-bit blockwise-quantized array (see the module docstring for the layout).

    Attributes:
      packed: uint8 codes, two a byte, ``[..., ceil(n / 2)]``.
      absmax: float32 absmax a block, or uint8 codes of ``absmax - offset`` when
        double-quantized, ``[..., n_blocks]``.
      nested_absmax: float32 ``[..., ceil(n_blocks / nested_block_size)]`` or None.
      offset: float32 ``[...]`` (the mean of the absmax) or None.
      logical_shape: shape of one (unstacked) tensor.
      dtype: dtype the tensor had before quantization (the default to dequantize to).
      qtype: ``"nf4"``, ``"fp4"`` or ``"int4"``.
      block_size: elements a block.
      nested_block_size: absmax values a nested block, or None without double quantization.
    """

    __slots__ = ("packed", "absmax", "nested_absmax", "offset", "logical_shape", "dtype",
                 "qtype", "block_size", "nested_block_size")

    def __init__(self, packed: Any, absmax: Any, nested_absmax: Any, offset: Any, *,
                 logical_shape: tuple[int, ...], dtype: Any, qtype: str, block_size: int,
                 nested_block_size: Optional[int]):
        self.packed = packed
        self.absmax = absmax
        self.nested_absmax = nested_absmax
        self.offset = offset
        self.logical_shape = tuple(int(d) for d in logical_shape)
        self.dtype = jnp.dtype(dtype)
        self.qtype = qtype
        self.block_size = int(block_size)
        self.nested_block_size = None if nested_block_size is None else int(nested_block_size)

    # -- pytree -------------------------------------------------------------------------------
    def tree_flatten(self):
        children = (self.packed, self.absmax, self.nested_absmax, self.offset)
        aux = (self.logical_shape, self.dtype.name, self.qtype, self.block_size,
               self.nested_block_size)
        return children, aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        logical_shape, dtype, qtype, block_size, nested_block_size = aux
        obj = object.__new__(cls)
        obj.packed, obj.absmax, obj.nested_absmax, obj.offset = children
        obj.logical_shape = logical_shape
        obj.dtype = jnp.dtype(dtype)
        obj.qtype = qtype
        obj.block_size = block_size
        obj.nested_block_size = nested_block_size
        return obj

    # -- shape facts --------------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.nested_block_size is not None

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """Leading axes added by stacking (e.g. layers under ``nn.scan``); () for one tensor."""
        return tuple(np.shape(self.packed)[:-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stack_shape + self.logical_shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))

    @property
    def num_elements(self) -> int:
        """Elements of one (unstacked) tensor."""
        return int(math.prod(self.logical_shape))

    @property
    def num_blocks(self) -> int:
        return -(-self.num_elements // self.block_size)

    @property
    def nbytes(self) -> int:
        """Bytes of all stored arrays together."""
        total = 0
        for a in (self.packed, self.absmax, self.nested_absmax, self.offset):
            if a is not None:
                total += int(np.prod(np.shape(a))) * jnp.dtype(a.dtype).itemsize
        return total

    @property
    def bits_per_param(self) -> float:
        """Stored bits a parameter (4.127 for NF4 + double quantization at block 64)."""
        return 8.0 * self.nbytes / max(self.size, 1)

    def arrays(self) -> dict[str, Any]:
        """The stored arrays by name (absent ones left out)."""
        out = {"packed": self.packed, "absmax": self.absmax}
        if self.double_quant:
            out["nested_absmax"] = self.nested_absmax
            out["offset"] = self.offset
        return out

    def replace(self, **arrays: Any) -> "QTensor":
        """A copy with some arrays replaced (metadata kept)."""
        children = dict(packed=self.packed, absmax=self.absmax,
                        nested_absmax=self.nested_absmax, offset=self.offset)
        children.update(arrays)
        return QTensor(**children, logical_shape=self.logical_shape, dtype=self.dtype,
                       qtype=self.qtype, block_size=self.block_size,
                       nested_block_size=self.nested_block_size)

    def __repr__(self) -> str:
        dq = f", double_quant({self.nested_block_size})" if self.double_quant else ""
        return (f"QTensor({self.qtype}, shape={self.shape}, dtype={self.dtype.name}, "
                f"block_size={self.block_size}{dq})")


def is_qtensor(x: Any) -> bool:
    return isinstance(x, QTensor)
