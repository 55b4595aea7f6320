"""A tiny scanned model that follows the qlora_jax model protocol (for LoRA tests)."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax

from qlora_jax.lora import LoraConfig, LoraDense, ModuleSite
from qlora_jax.models.base import LoraModelMixin
from qlora_jax.quant.config import QuantConfig


class _Layer(nn.Module):
    plan: Any
    quant: Optional[QuantConfig]
    width: int

    @nn.compact
    def __call__(self, x: jax.Array, _: Any, deterministic: bool = True):
        spec = (lambda n: None if self.plan is None else self.plan.spec_at(("layers", n)))
        h = LoraDense(self.width, name="q_proj", lora=spec("q_proj"), quant=self.quant,
                      impl="xla")(x, deterministic)
        h = LoraDense(self.width, name="v_proj", lora=spec("v_proj"), quant=self.quant,
                      use_bias=True,
                      impl="xla")(nn.tanh(h), deterministic)
        return (x + h).astype(x.dtype), None


class ToyModel(nn.Module, LoraModelMixin):
    """x [B, D] -> [B, V] through `layers` scanned residual blocks and a head."""

    lora: Optional[LoraConfig] = None
    quant: Optional[QuantConfig] = None
    layers: int = 3
    width: int = 64
    vocab: int = 5

    def module_sites(self) -> list[ModuleSite]:
        sites = [ModuleSite(("layers", n), tuple(f"model.layers.{i}.{n}" for i in range(self.layers)))
                 for n in ("q_proj", "v_proj")]
        return sites + [ModuleSite(("lm_head",), ("lm_head",), "head")]

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        plan = self.lora_plan()
        stack = nn.scan(_Layer, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True}, length=self.layers,
                        in_axes=(nn.broadcast, nn.broadcast))
        x, _ = stack(plan, self.quant, self.width, name="layers")(x, None, deterministic)
        head = None if plan is None else plan.spec_at(("lm_head",))
        return LoraDense(self.vocab, name="lm_head", lora=head, impl="xla")(x)
