"""Public 4-bit ops with a choice of implementation: ``dequantize`` and ``linear``.

``impl`` picks the code path: ``"xla"`` (plain jnp, fused by XLA), ``"pallas"``
(the kernels in ``qlora_jax.quant.kernels``; interpret mode on CPU) or
``"auto"`` (Pallas on GPU and TPU, jnp on CPU).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.quant import kernels
from qlora_jax.quant.blockwise import dequantize_xla
from qlora_jax.quant.layer_view import LayerView, fits_int32
from qlora_jax.quant.partition import gather_for_compute, splits_4bit_codes
from qlora_jax.quant.qtensor import QTensor

IMPLS = ("auto", "xla", "pallas")
# "0" turns the low-rank branch inside the GEMV off (the separate dots run instead): for
# measuring one against the other (benchmarks/RESULTS.md, session 8).
FUSE_LOW_RANK_ENV = "QLORA_JAX_FUSE_LOW_RANK"


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


def linear(x: jax.Array, q: QTensor, impl: str = "auto",
           low_rank: Optional[tuple[jax.Array, jax.Array]] = None) -> jax.Array:
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

    ``low_rank=(low, b)`` (``low`` ``[..., R]``, ``b`` ``[R, out]``: a LoRA branch, ``x A``
    times its scale) adds ``low @ b``: inside the decoding GEMV's float32 sums where
    ``fuses_low_rank`` says so (one row, Pallas; one rounding to ``x.dtype`` and no kernel of
    its own), else as an XLA dot added to the result. Differentiable in ``x``, ``low``, ``b``.
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
    x2 = x.reshape((-1, x.shape[-1]))
    if low_rank is None:
        return _linear(x2, q, impl).reshape(lead + (q.shape[0],))
    low, b = low_rank
    if low.shape[:-1] != lead or b.shape != (low.shape[-1], q.shape[0]):
        raise ValueError(f"linear: low_rank wants low [..., R] with x's leading shape "
                         f"{list(lead)} and b [R, {q.shape[0]}]; got {list(low.shape)} and "
                         f"{list(b.shape)}")
    low2 = low.reshape((-1, low.shape[-1]))
    if fuses_low_rank(x2, q, low2.shape[-1], impl):
        y = _linear_low_rank(x2, q, low2, b, impl)
    else:
        y = _linear(x2, q, impl) + _dot(low2, b.astype(low2.dtype)).astype(x.dtype)
    return y.reshape(lead + (q.shape[0],))


def fuses_low_rank(x2: jax.Array, q: Any, rank: int, impl: str = "auto") -> bool:
    """True when ``linear(..., low_rank=)`` adds a rank-``rank`` branch inside the kernel for
    the rows ``x2`` ``[M, in]`` (see ``kernels.fuses_low_rank``): the Pallas GEMV at one row,
    on a weight it reads where it lies (no mesh splits its codes)."""
    if resolve_impl(impl) != "pallas" or os.environ.get(FUSE_LOW_RANK_ENV, "1") == "0":
        return False
    if isinstance(q, LayerView):
        if not _in_place(x2, q, "pallas"):
            return False
    elif splits_4bit_codes(q):
        return False
    return kernels.fuses_low_rank(x2, q, rank)



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


def _dot(a: jax.Array, b: jax.Array, **kw) -> jax.Array:
    """``a @ b``; float32 operands at full float32 precision (as the 4-bit kernels compute
    float32 inputs), not the GPU's TF32 default."""
    full = a.dtype == jnp.float32 and b.dtype == jnp.float32
    return jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST if full else None, **kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _linear_low_rank(x2: jax.Array, q: Any, low2: jax.Array, b: jax.Array, impl: str
                     ) -> jax.Array:
    return kernels.linear_low_rank(x2, q, low2[0], b)


def _linear_low_rank_fwd(x2, q, low2, b, impl):
    return _linear_low_rank(x2, q, low2, b, impl), (q, low2, b)


def _linear_low_rank_bwd(impl, res, dy):
    q, low2, b = res
    dlow = _dot(dy, b.T.astype(dy.dtype), preferred_element_type=jnp.float32)
    db = _dot(low2.T.astype(jnp.float32), dy.astype(jnp.float32))
    return (_matmul(dy, q, impl), zero_cotangent(q), dlow.astype(low2.dtype),
            db.astype(b.dtype))


_linear_low_rank.defvjp(_linear_low_rank_fwd, _linear_low_rank_bwd)
