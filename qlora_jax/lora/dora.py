"""DoRA (Liu et al. 2024) as PEFT defines it: a trained magnitude per output feature.

With ``V = W + s B A`` (``W`` ``[out, in]``, dequantized for a 4-bit base) and its per-row norm
``n = ||V||_row`` ``[out]``, the layer computes ``y = (m / n) * (x V^T) + bias``, where the
magnitude ``m`` (``lora_magnitude`` ``[out]``, PEFT's ``lora_magnitude_vector``) starts at
``n`` (outputs unchanged at init) and ``n`` is a constant in the backward pass
(``jax.lax.stop_gradient``; DoRA section 4.3, as PEFT). With dropout ``x_d`` on the adapter
input, PEFT's form: ``y = x W^T + (m/n - 1) x_d W^T + (m/n) s x_d A^T B^T + bias``.

In our layout (float kernel ``[in, out]``, ``lora_a`` ``[in, R]``, ``lora_b`` ``[R, out]``)
the norm is over the ``in`` axis.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from qlora_jax.quant.blockwise import dequantize_xla, quantize_like
from qlora_jax.quant.layer_view import LayerView
from qlora_jax.quant.qtensor import QTensor

MAGNITUDE = "lora_magnitude"


def dense_weight(kernel: Any) -> jax.Array:
    """The kernel as float32 ``[..., in, out]`` (a QTensor ``[..., out, in]`` dequantized)."""
    if isinstance(kernel, LayerView):
        kernel = kernel.materialize()
    if isinstance(kernel, QTensor):
        return jnp.swapaxes(dequantize_xla(kernel, jnp.float32), -1, -2)
    return jnp.asarray(kernel, jnp.float32)


def from_dense(w: jax.Array, like: Any) -> Any:
    """Inverse of ``dense_weight``: float32 ``[..., in, out]`` back to ``like``'s form."""
    if isinstance(like, QTensor):
        return quantize_like(jnp.swapaxes(w, -1, -2).astype(like.dtype), like)
    return w.astype(like.dtype)


def weight_norm(kernel: Any, a: jax.Array, b: jax.Array, scaling: float) -> jax.Array:
    """``||W + s B A||`` per output feature, float32 ``[..., out]`` (no gradient flows)."""
    w = dense_weight(jax.lax.stop_gradient(kernel))
    delta = jnp.einsum("...ir,...ro->...io", jax.lax.stop_gradient(a).astype(jnp.float32),
                       jax.lax.stop_gradient(b).astype(jnp.float32))
    return jax.lax.stop_gradient(jnp.linalg.norm(w + scaling * delta, axis=-2))


def merged_kernel(kernel: Any, a: jax.Array, b: jax.Array, magnitude: jax.Array,
                  scaling: float) -> Any:
    """``(m / n) * (W + s B A)``: the DoRA layer as one weight (4-bit: requantized)."""
    w = dense_weight(kernel)
    v = w + scaling * jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32),
                                 b.astype(jnp.float32))
    v = v * (magnitude.astype(jnp.float32) / jnp.linalg.norm(v, axis=-2))[..., None, :]
    return from_dense(v, kernel)
