"""LoraDense: a Flax ``nn.Dense`` whose frozen kernel is a float array or a QTensor, plus adapters.

Parameters (names kept from ``nn.Dense`` so a base checkpoint loads unchanged):

- ``kernel``: float ``[in, out]`` (Flax layout), or a QTensor ``[out, in]``
  (PyTorch/bitsandbytes layout, so its bytes equal a bitsandbytes checkpoint's);
- ``bias``: ``[out]`` when ``use_bias``;
- ``lora_a`` ``[in, R]`` and ``lora_b`` ``[R, out]`` when the module is given a LoraSpec
  (``lora.plan.resolve`` gives each module a model's LoraConfig targets its spec).

``y = x W (+ b) + scaling * dropout(x) A B``. A zero B leaves ``y`` unchanged to the bit.
With DoRA (``use_dora``) also ``lora_magnitude`` ``[out]`` and PEFT's formula (lora/dora.py).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta

from qlora_jax.lora import dora
from qlora_jax.lora.config import LoraSpec
from qlora_jax.quant import ops as qops
from qlora_jax.quant.blockwise import quantize
from qlora_jax.quant.config import QuantConfig
from qlora_jax.quant.layer_view import LayerView
from qlora_jax.quant.qtensor import QTensor

Initializer = Callable[..., jax.Array]
Axes = tuple[Optional[str], ...]


def adapter_axes(kernel_axes: Axes) -> tuple[Axes, Axes]:
    """Logical axes of ``lora_a`` ``[in, R]`` and ``lora_b`` ``[R, out]`` for a kernel's
    ``(in, out)`` axes: ``(in, "rank")`` and ``("rank", out)``."""
    axis_in, axis_out = kernel_axes
    return (axis_in, "rank"), ("rank", axis_out)


def declare_axes(init: Initializer, axes: Axes) -> Initializer:
    """``init`` boxed with the logical ``axes`` of what it creates (unchanged without axes)."""
    return nn.with_logical_partitioning(init, axes) if axes else init


def lora_a_init(spec: LoraSpec) -> Initializer:
    """A's initializer: PEFT's Kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(in)), or N(0, 1/r)."""
    def init(key: jax.Array, shape: tuple[int, int], dtype: Any = jnp.float32) -> jax.Array:
        fan_in = shape[0]
        if spec.init == "gaussian":
            return (jax.random.normal(key, shape, jnp.float32) / spec.r).astype(dtype)
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
    return init


def lora_b_init(spec: LoraSpec) -> Initializer:
    """B's initializer: zeros, except for ``init="random"`` (a non-identity start)."""
    def init(key: jax.Array, shape: tuple[int, int], dtype: Any = jnp.float32) -> jax.Array:
        if spec.init == "random":
            bound = 1.0 / math.sqrt(shape[0])
            return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
        return jnp.zeros(shape, dtype)
    return init


class LoraDense(nn.Module):
    """A linear layer with an optional 4-bit frozen kernel and optional LoRA adapters.

    Attributes:
      features: output features (``out``).
      use_bias: add a bias.
      dtype: compute dtype (None: promote inputs and parameters).
      param_dtype: dtype of float kernel/bias created at init.
      kernel_init / bias_init: initializers of the frozen weight (init only).
      lora: this module's adapter settings (rank, scaling, dropout, init), or None for no
        adapter.
      quant: quantize the kernel at init (loading code builds QTensors directly).
      impl: implementation of the 4-bit matmul: ``"auto"``, ``"xla"``, ``"pallas"``.
      lora_dtype: dtype of the adapter parameters.
      kernel_axes: logical axes of the float kernel ``[in, out]`` (e.g. ``("embed", "mlp")``);
        the bias and the adapters take theirs from it. Empty: none declared.
    """

    features: int
    use_bias: bool = False
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()
    lora: Optional[LoraSpec] = None
    quant: Optional[QuantConfig] = None
    impl: str = "auto"
    lora_dtype: Any = jnp.float32
    kernel_axes: Axes = ()

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True,
                 adapter_index: Optional[jax.Array] = None) -> jax.Array:
        """x ``[..., in]`` -> ``[..., out]``; dropout on the adapter input unless deterministic.

        Adapters stacked by ``qj.lora.stack_adapters`` (``lora_a`` ``[N, in, R]``) need
        ``adapter_index`` (int ``[B]``, x ``[B, ..., in]``): row b uses adapter
        ``adapter_index[b]`` (a gather per row over one shared frozen kernel).
        """
        in_features = x.shape[-1]
        if self.has_variable("params", "kernel"):
            # Loaded weights may be a QTensor whatever `quant` says: read them as they are.
            kernel = meta.unbox(self.get_variable("params", "kernel"))
        else:
            kernel = self.param("kernel", declare_axes(self._init_kernel, self.kernel_axes),
                                (in_features, self.features))
        if isinstance(kernel, (QTensor, LayerView)):  # a view: one layer of a stack, in place
            if kernel.shape != (self.features, in_features):
                raise ValueError(f"{'.'.join(self.scope.path)}: 4-bit kernel is {kernel.shape}, "
                                 f"expected [out, in] = {(self.features, in_features)}")
            compute = self.dtype or x.dtype
            y = qops.linear(x.astype(compute), kernel, impl=self.impl)
        else:
            x_c, k_c = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
            y = jnp.dot(x_c, k_c)
        bias = None
        if self.use_bias:
            bias = self.param("bias", declare_axes(self.bias_init, self.kernel_axes[1:]),
                              (self.features,), self.param_dtype)
        spec = self.lora
        if spec is None:
            return y + bias.astype(y.dtype) if bias is not None else y
        if self.has_variable("params", "lora_a") and jnp.ndim(
                meta.unbox(self.get_variable("params", "lora_a"))) == 3:
            if spec.use_dora:
                raise ValueError(f"{'.'.join(self.scope.path)}: stacked adapters "
                                 "(qj.lora.stack_adapters) are LoRA only, not DoRA")
            y = y + self._stacked_delta(x, spec, adapter_index).astype(y.dtype)
            return y + bias.astype(y.dtype) if bias is not None else y
        a_axes, b_axes = adapter_axes(self.kernel_axes) if self.kernel_axes else ((), ())
        a = self.param("lora_a", declare_axes(lora_a_init(spec), a_axes), (in_features, spec.r),
                       self.lora_dtype)
        b = self.param("lora_b", declare_axes(lora_b_init(spec), b_axes), (spec.r, self.features),
                       self.lora_dtype)
        h = x
        dropped = spec.dropout > 0.0 and not deterministic
        if spec.dropout > 0.0:
            h = nn.Dropout(rate=spec.dropout)(h, deterministic=deterministic)
        h, a_c, b_c = nn.dtypes.promote_dtype(h, a, b, dtype=self.dtype)
        delta = jnp.dot(jnp.dot(h, a_c), b_c) * jnp.asarray(spec.scaling, h.dtype)
        if spec.use_dora:
            y = self._dora(y, h, kernel, a, b, delta, spec.scaling, dropped)
        else:
            y = y + delta.astype(y.dtype)
        return y + bias.astype(y.dtype) if bias is not None else y

    def _dora(self, y: jax.Array, h: jax.Array, kernel: Any, a: jax.Array, b: jax.Array,
              delta: jax.Array, scaling: float, dropped: bool) -> jax.Array:
        """PEFT's DoRA output from the base output ``y`` (no bias) and the scaled update."""
        m = self.param(dora.MAGNITUDE, declare_axes(
            lambda _, shape: dora.weight_norm(kernel, a, b, scaling).astype(self.lora_dtype),
            self.kernel_axes[1:]), (self.features,))
        norm = dora.weight_norm(kernel, a, b, scaling)  # a constant for the gradient
        scale = (m.astype(jnp.float32) / norm).astype(y.dtype)
        if dropped:  # the base term sees the dropped-out input too, as in PEFT
            base_d = jnp.dot(h.astype(y.dtype), dora.dense_weight(kernel).astype(y.dtype))
            return y + (scale - 1) * base_d + scale * delta.astype(y.dtype)
        return scale * (y + delta.astype(y.dtype))

    def _stacked_delta(self, x: jax.Array, spec: LoraSpec,
                       adapter_index: Optional[jax.Array]) -> jax.Array:
        """``scaling * x A_i B_i`` with ``i = adapter_index[b]`` for row b (stacked adapters)."""
        a = meta.unbox(self.get_variable("params", "lora_a"))  # [N, in, R]
        b = meta.unbox(self.get_variable("params", "lora_b"))  # [N, R, out]
        if adapter_index is None:
            raise ValueError(f"{'.'.join(self.scope.path)}: the params hold {a.shape[0]} stacked "
                             "adapters (qj.lora.stack_adapters); pass adapter_index (int [B]) "
                             "to pick each row's adapter")
        if x.ndim < 2 or jnp.shape(adapter_index) != x.shape[:1]:
            raise ValueError(f"adapter_index must be [B] = {list(x.shape[:1])} for x of shape "
                             f"{list(x.shape)}, got {list(jnp.shape(adapter_index))}")
        a = jnp.take(a, adapter_index, axis=0)  # [B, in, R]
        b = jnp.take(b, adapter_index, axis=0)  # [B, R, out]
        h, a, b = nn.dtypes.promote_dtype(x, a, b, dtype=self.dtype)
        lead = h.shape
        h3 = h.reshape(lead[0], -1, lead[-1])  # [B, T, in]
        low = jnp.einsum("bti,bir->btr", h3, a)
        delta = jnp.einsum("btr,bro->bto", low, b) * jnp.asarray(spec.scaling, h.dtype)
        return delta.reshape(lead[:-1] + (b.shape[-1],))

    def _init_kernel(self, key: jax.Array, shape: tuple[int, int]) -> Any:
        w = self.kernel_init(key, shape, self.param_dtype)
        if self.quant is None:
            return w
        return quantize(w.T, self.quant.qtype, self.quant.block_size, self.quant.double_quant,
                        self.quant.nested_block_size)
