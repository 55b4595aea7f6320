"""Pallas kernels for 4-bit weights: dequantize, ``x @ W.T`` and ``dy @ W``.

``qlora_jax.quant.ops`` calls the three functions below for ``impl="pallas"``
(and for ``impl="auto"`` on GPU and TPU). The backend picks the variant:

* GPU: Triton-style kernels (``gpu.py``), compiled by the Pallas Triton lowering.
* TPU: Mosaic TPU kernels (``tpu.py``).
* CPU: the GPU kernels in Pallas interpret mode (slow; for tests and debugging).

All variants compute the same function: dequantized values equal
``blockwise.dequantize_xla`` bit for bit, and the matmuls accumulate in float32.
"""

from __future__ import annotations

from typing import Any

import jax

from qlora_jax.quant.kernels import gpu
from qlora_jax.quant.layer_view import LayerView
from qlora_jax.quant.qtensor import QTensor

__all__ = ["dequantize", "dequantize_layer", "dot_dequantized", "linear", "linear_grad_input",
           "linear_grad_input_layer", "linear_layer", "reads_layer_in_place"]


def _tpu():
    from qlora_jax.quant.kernels import tpu  # imported lazily: only TPU hosts need it
    return tpu


def _on_tpu() -> bool:
    return jax.default_backend() == "tpu"


def dequantize(q: QTensor, dtype: Any = None) -> jax.Array:
    """Dequantizes ``q`` (any shape, stacked too) to ``dtype`` (default: its own dtype)."""
    if _on_tpu():
        return _tpu().dequantize(q, dtype)
    return gpu.dequantize(q, dtype)


def linear(x2d: jax.Array, q: QTensor) -> jax.Array:
    """``x2d @ W.T`` for a 2-D ``[out, in]`` QTensor: ``[M, in] -> [M, out]``, ``x2d.dtype``."""
    if _on_tpu():
        return _tpu().linear(x2d, q)
    return gpu.linear(x2d, q)


def linear_grad_input(dy2d: jax.Array, q: QTensor) -> jax.Array:
    """``dy2d @ W`` for a 2-D ``[out, in]`` QTensor: ``[M, out] -> [M, in]``, ``dy2d.dtype``."""
    if _on_tpu():
        return _tpu().linear_grad_input(dy2d, q)
    return gpu.linear_grad_input(dy2d, q)


# -- one layer of a stacked weight, read in place (quant.layer_view) ---------------------------

def reads_layer_in_place(a2d: jax.Array) -> bool:
    """True when ``linear`` of ``a2d`` with a ``LayerView`` reads the layer in place: the GPU
    kernels (and their interpret mode), at any row count (the fused GEMV / small-M kernels up
    to ``gpu.FUSED_MAX_TOKENS`` rows, the layer dequantization and cuBLAS above). On TPU the
    layer is sliced out of the stack first (``quant.ops`` checks the stack itself)."""
    del a2d
    return not _on_tpu()


def linear_layer(x2d: jax.Array, view: LayerView) -> jax.Array:
    """``x2d @ W_i.T`` for layer ``view.index`` of a stacked ``[L, out, in]`` weight, in place."""
    return gpu.linear_layer(x2d, view)


def linear_grad_input_layer(dy2d: jax.Array, view: LayerView) -> jax.Array:
    """``dy2d @ W_i`` for layer ``view.index`` of a stacked ``[L, out, in]`` weight, in place."""
    return gpu.linear_grad_input_layer(dy2d, view)


def dequantize_layer(view: LayerView, dtype: Any = None) -> jax.Array:
    """Layer ``view.index`` of a stacked QTensor dequantized to ``dtype``, read in place."""
    if _on_tpu():
        return _tpu().dequantize(view.materialize(), dtype)
    return gpu.dequantize_layer(view, dtype)


def dot_dequantized(a2d: jax.Array, w: jax.Array, transpose: bool) -> jax.Array:
    """``a2d @ w.T`` (``transpose=False``) or ``a2d @ w`` for a dequantized ``[out, in]`` weight,
    with the two-pass path's precision (float32 accumulation)."""
    return gpu.dot_dequantized(a2d, w, transpose)
