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
from qlora_jax.quant.qtensor import QTensor

__all__ = ["dequantize", "linear", "linear_grad_input"]


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
