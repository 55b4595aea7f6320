"""QuantConfig: how ``from_pretrained`` quantizes a model's linear weights."""

from __future__ import annotations

import dataclasses
from typing import Optional

from qlora_jax import module_names
from qlora_jax.quant.blockwise import validate_settings


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Settings to quantize the frozen linear weights of a model.

    Attributes:
      qtype: ``"nf4"`` (QLoRA's default), ``"fp4"`` or ``"int4"``.
      block_size: elements a quantization block (64 in QLoRA).
      double_quant: quantize the block scales too (4.127 bits a parameter at block 64).
      nested_block_size: scales a nested block (256).
      skip: module names (suffix match, as PEFT's target_modules) kept in full precision.
    """

    qtype: str = "nf4"
    block_size: int = 64
    double_quant: bool = True
    nested_block_size: int = 256
    skip: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        object.__setattr__(self, "skip", tuple(self.skip))
        validate_settings(self.qtype, self.block_size,
                          self.nested_block_size if self.double_quant else None)

    @property
    def nested(self) -> Optional[int]:
        return self.nested_block_size if self.double_quant else None

    def skips(self, module_name: str) -> bool:
        """True when ``module_name`` (dotted, Hugging Face style) stays unquantized."""
        return module_names.matches_any(module_name, self.skip)
