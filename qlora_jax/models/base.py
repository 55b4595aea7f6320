"""What every qlora_jax model provides to the LoRA machinery.

A model is a Flax linen module with the attributes ``lora`` (a LoraConfig or
None) and ``quant`` (a QuantConfig or None), and a ``module_sites()`` method
listing its modules with their Hugging Face names. ``lora_plan()`` resolves
the config against them once (cached), and every ``LoraDense`` of the model
receives that plan and finds its adapter by its own scope path.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

from qlora_jax.lora.config import LoraConfig
from qlora_jax.lora.plan import LoraPlan, ModuleSite, resolve


@functools.lru_cache(maxsize=64)
def _resolve_cached(config: LoraConfig, sites: tuple[ModuleSite, ...],
                    default_targets: tuple[str, ...]) -> LoraPlan:
    return resolve(config, sites, default_targets)


class LoraModelMixin:
    """Mixin for models: ``lora_plan()`` from ``self.lora`` and ``self.module_sites()``."""

    #: PEFT's default target modules for the family (used when target_modules is None).
    default_lora_targets: Sequence[str] = ("q_proj", "v_proj")

    def module_sites(self) -> list[ModuleSite]:  # pragma: no cover - each model implements it
        raise NotImplementedError

    def lora_plan(self) -> Optional[LoraPlan]:
        lora = getattr(self, "lora", None)
        if lora is None:
            return None
        return _resolve_cached(lora, tuple(self.module_sites()), tuple(self.default_lora_targets))
