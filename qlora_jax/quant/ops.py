"""Public 4-bit ops with a choice of implementation: ``dequantize`` and ``linear``.

``impl`` picks the code path: ``"xla"`` (plain jnp, fused by XLA), ``"pallas"``
(the kernels in ``qlora_jax.quant.kernels``; interpret mode on CPU) or
``"auto"`` (Pallas on GPU and TPU, jnp on CPU).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.quant import kernels
from qlora_jax.quant.blockwise import dequantize_xla
from qlora_jax.quant.layer_view import LayerView, fits_int32
from qlora_jax.quant.partition import gather_for_compute, splits_4bit_codes
from qlora_jax.quant.qtensor import QTensor

IMPLS = ("auto", "xla", "pallas")


def resolve_impl(impl: str) -> str:
    """Turns ``"auto"`` into ``"pallas"`` on GPU/TPU and ``"xla"`` on CPU."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    if impl != "auto":
        return impl
    if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu"):
        return "pallas"
    return "xla"


def dequantize(q: QTensor, dtype: Any = None, impl: str = "auto") -> jax.Array:
    """Dequantizes a QTensor to ``dtype`` (default: the dtype it was quantized from).

    Values equal ``bitsandbytes.functional.dequantize_4bit``: float32
    ``code_value * absmax`` (absmax decoded in two float32 steps when
    double-quantized), then one cast to ``dtype``.
    """
    if not isinstance(q, QTensor):
        raise TypeError(f"dequantize expects a QTensor, got {type(q).__name__}")
    if resolve_impl(impl) == "pallas":
        return kernels.dequantize(q, dtype)
    return dequantize_xla(q, dtype)


def linear(x: jax.Array, q: QTensor, impl: str = "auto") -> jax.Array:
    """``x @ dequantize(q).T`` for a ``[out, in]`` QTensor (PyTorch Linear layout).

    Args:
      x: ``[..., in]`` activations (float32, bfloat16 or float16); the weight is
        dequantized to ``x.dtype`` and the result has ``x.dtype``.
      q: an unstacked 2-D QTensor ``[out, in]``.
      impl: ``"auto"``, ``"xla"`` or ``"pallas"``.

    Returns:
      ``[..., out]``. Differentiable in ``x`` only: the backward pass computes
      ``dy @ W`` from the 4-bit weight again (nothing of W's size is kept for
      it) and the QTensor gets a zero cotangent.

    ``q`` may also be a ``LayerView`` (one layer of a stacked QTensor): with the Pallas
    kernels and more than ``FUSED_MAX_TOKENS`` rows it is dequantized in place, otherwise
    its layer is sliced out first.
    """
    if not isinstance(q, (QTensor, LayerView)):
        raise TypeError(f"linear expects a QTensor weight, got {type(q).__name__}")
    if len(q.shape) != 2:
        raise ValueError(f"linear expects a 2-D [out, in] QTensor, got shape {q.shape}")
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"linear: x has {x.shape[-1]} input features but the weight is "
                         f"[out, in] = {list(q.shape)}")
    impl = resolve_impl(impl)
    lead = x.shape[:-1]
    y = _linear(x.reshape((-1, x.shape[-1])), q, impl)
    return y.reshape(lead + (q.shape[0],))



def _for_compute(q: QTensor) -> QTensor:
    """The weight gathered over the batch mesh axes where it is used (see
    ``quant.partition.gather_for_compute``; a no-op without a mesh in context).

    Called inside the forward and the backward rule, so the residual the custom VJP keeps
    between them is the sharded weight, not the gathered one.
    """
    return gather_for_compute(q)


def reads_in_place(stacked: QTensor, impl: str = "auto") -> bool:
    """True when layers of ``stacked`` (a QTensor stacked along one layer axis) can be read in
    place as ``LayerView``s: the Pallas kernels, arrays within int32 offsets, and codes that
    no mesh in context splits over devices (those are sliced and gathered instead)."""
    return (resolve_impl(impl) == "pallas" and len(stacked.stack_shape) == 1
            and fits_int32(stacked) and not splits_4bit_codes(stacked))


def _in_place(a: jax.Array, q: Any, impl: str) -> bool:
    """True when a LayerView's layer is dequantized in place (else it is sliced first)."""
    return (isinstance(q, LayerView) and reads_in_place(q.stacked, impl)
            and kernels.reads_layer_in_place(a))


def _matmul_t(x2: jax.Array, q: Any, impl: str) -> jax.Array:
    if _in_place(x2, q, impl):
        return kernels.linear_layer(x2, q)
    q = _for_compute(q.materialize() if isinstance(q, LayerView) else q)
    if impl == "pallas":
        return kernels.linear(x2, q)
    w = dequantize_xla(q, x2.dtype)
    return jnp.dot(x2, w.T, preferred_element_type=jnp.float32).astype(x2.dtype)


def _matmul(dy: jax.Array, q: Any, impl: str) -> jax.Array:
    if _in_place(dy, q, impl):
        return kernels.linear_grad_input_layer(dy, q)
    q = _for_compute(q.materialize() if isinstance(q, LayerView) else q)
    if impl == "pallas":
        return kernels.linear_grad_input(dy, q)
    w = dequantize_xla(q, dy.dtype)
    return jnp.dot(dy, w, preferred_element_type=jnp.float32).astype(dy.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linear(x2: jax.Array, q: QTensor, impl: str) -> jax.Array:
    return _matmul_t(x2, q, impl)


def _linear_fwd(x2, q, impl):
    return _matmul_t(x2, q, impl), q


def _linear_bwd(impl, q, dy):
    dx = _matmul(dy, q, impl)
    return dx, zero_cotangent(q)


def zero_cotangent(tree: Any) -> Any:
    """A zero cotangent for a pytree with integer leaves (float0 for those)."""
    def zero(a):
        if jnp.issubdtype(a.dtype, jnp.inexact):
            return jnp.zeros(a.shape, a.dtype)
        return np.zeros(a.shape, dtype=jax.dtypes.float0)
    return jax.tree.map(zero, tree)


_linear.defvjp(_linear_fwd, _linear_bwd)
