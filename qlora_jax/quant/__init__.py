"""4-bit blockwise quantization compatible with bitsandbytes (NF4, FP4) plus Int4.

    q = qj.quant.quantize(w, "nf4", block_size=64, double_quant=True)
    w2 = qj.quant.dequantize(q)               # == bitsandbytes dequantize_4bit
    y = qj.quant.linear(x, q)                 # x @ dequantize(q).T
    sd = qj.quant.to_bnb_state_dict(q, "model.layers.0.mlp.up_proj.weight")
"""

from qlora_jax.quant.blockwise import quantize
from qlora_jax.quant.bnb_format import from_bnb_state_dict, to_bnb_state_dict
from qlora_jax.quant.codebooks import DYNAMIC_MAP, FP4, INT4, NF4, QTYPES, codebook
from qlora_jax.quant.config import QuantConfig
from qlora_jax.quant.ops import IMPLS, dequantize, linear, resolve_impl
from qlora_jax.quant.qtensor import ALLOWED_BLOCK_SIZES, QTensor, is_qtensor

__all__ = [
    "ALLOWED_BLOCK_SIZES", "DYNAMIC_MAP", "FP4", "IMPLS", "INT4", "NF4", "QTYPES", "QTensor",
    "QuantConfig", "codebook", "dequantize", "from_bnb_state_dict", "is_qtensor", "linear",
    "quantize", "resolve_impl", "to_bnb_state_dict",
]
